//! udev ingestion benchmarks of the real devmgrd (issue 5): a 100,000-event
//! replay through the whole path (parse → model → D-Bus signals) against a
//! raw parse of the same text, and a burst of 1,000 loop devices created at
//! once (hotplug → InterfacesAdded latency, for the udev and the kernel
//! source). Needs root, /dev/loop-control and, for the udev source, a
//! running systemd-udevd. Prints a table; docs/benchmarks.md keeps the
//! numbers. Run: `cargo build --release -p devmgrd && cargo bench -p
//! devmgr-tests --bench udev [-- replay|burst]`.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use devmgr_tests::*;
use drivers::uevent::Parser;
use futures_util::StreamExt;
use zbus::{MatchRule, MessageStream, OwnedObjectPath, OwnedVariant};

/// Signals of one member from devmgrd, from now on.
async fn signals(conn: &zbus::Connection, member: &'static str) -> MessageStream {
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(proto::BUS_NAME)
        .member(member)
        .build()
        .expect("match rule");
    MessageStream::for_match_rule(rule, conn, std::num::NonZeroUsize::new(1 << 20))
        .await
        .expect("subscribe")
}

/// `n` block devices added, then all removed: 2n events.
fn storm(n: usize) -> String {
    let mut text = String::with_capacity(n * 2 * 160);
    let mut seq = 0;
    for action in ["add", "remove"] {
        for i in 0..n {
            seq += 1;
            let path = format!("/devices/virtual/block/bench{i}");
            text.push_str(&format!(
                "KERNEL[{seq}.000000] {action} {path} (block)\nACTION={action}\nDEVPATH={path}\nSUBSYSTEM=block\nDEVTYPE=disk\nSEQNUM={seq}\n\n"
            ));
        }
    }
    text
}

fn parse_all(text: &str) -> usize {
    let mut parser = Parser::new(None);
    let mut n = text
        .lines()
        .filter_map(|l| parser.line(l))
        .filter(Result::is_ok)
        .count();
    n += parser.finish().into_iter().filter(Result::is_ok).count();
    n
}

async fn replay() {
    const DEVICES: usize = 50_000;
    let text = storm(DEVICES);
    let events = 2 * DEVICES;
    // Raw parse: the same parser, no daemon; best of 5.
    let mut raw = Duration::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(parse_all(&text), events);
        raw = raw.min(t.elapsed());
    }
    // The whole path: devmgrd replays from a FIFO; done when a client has
    // seen the last object's InterfacesRemoved.
    let dir = TempDir::unique("replay-bench");
    let fifo = events_fifo(&dir);
    let bus = TestBus::start();
    let fifo_arg = fifo.to_string_lossy().into_owned();
    let daemon = Daemon::start_with_args(&bus, &["--replay", &fifo_arg, "--subsystems", "block"]);
    let client = Client::connect(&bus.address).await;
    let mut removed = signals(&client.conn, "InterfacesRemoved").await;
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("FIFO");
        f.write_all(text.as_bytes()).expect("write");
    });
    let mut seen = 0;
    while seen < DEVICES {
        match tokio::time::timeout(Duration::from_secs(120), removed.next()).await {
            Ok(Some(Ok(_))) => seen += 1,
            _ => panic!("only {seen} of {DEVICES} removals seen"),
        }
    }
    let whole = t.elapsed();
    writer.join().expect("writer");
    drop(daemon);
    println!("-- replay of {events} events ({DEVICES} block devices added, then removed)");
    println!(
        "raw parse        {raw:>10.1?}  ({:>9.0} events/s)",
        events as f64 / raw.as_secs_f64()
    );
    println!(
        "whole path       {whole:>10.1?}  ({:>9.0} events/s)  parse → model → InterfacesAdded/Removed on the bus",
        events as f64 / whole.as_secs_f64()
    );
    println!(
        "ratio (whole-path throughput / raw parse, target ≥ 0.5): {:.3}",
        raw.as_secs_f64() / whole.as_secs_f64()
    );
}

/// Creates (or removes) loop devices `first..first+n` in one process,
/// printing `number time_ns` for each right after its ioctl returns.
fn loop_burst(request: u32, first: u32, n: u32) -> HashMap<String, u128> {
    let script = "import fcntl,os,sys,time\n\
fd=os.open('/dev/loop-control', os.O_RDWR)\n\
req,first,n=int(sys.argv[1]),int(sys.argv[2]),int(sys.argv[3])\n\
out=[]\n\
for i in range(first, first+n):\n    fcntl.ioctl(fd, req, i); out.append('%d %d' % (i, time.time_ns()))\n\
print('\\n'.join(out))\n";
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            script,
            &request.to_string(),
            &first.to_string(),
            &n.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("python3");
    assert!(out.status.success(), "loop-control (needs root)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (n, t) = l.split_once(' ')?;
            Some((format!("loop{n}"), t.parse().ok()?))
        })
        .collect()
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

async fn burst(source: &str) {
    const N: u32 = 1_000;
    let first = 20_000 + if source == "udev" { 0 } else { 2_000 };
    let bus = TestBus::start();
    let _daemon =
        Daemon::start_with_args(&bus, &["--udev-source", source, "--subsystems", "block"]);
    let client = Client::connect(&bus.address).await;
    let mut added = signals(&client.conn, "InterfacesAdded").await;
    // Names arrive on the bus while python still runs: record arrival times
    // in a task, match them with creation times afterwards.
    let collector = tokio::spawn(async move {
        let mut arrivals = HashMap::new();
        while arrivals.len() < N as usize {
            let Ok(Some(Ok(msg))) =
                tokio::time::timeout(Duration::from_secs(60), added.next()).await
            else {
                break;
            };
            let at = now_ns();
            type Ifaces = HashMap<String, HashMap<String, OwnedVariant>>;
            if let Ok((_, ifaces)) = msg.body().deserialize::<(OwnedObjectPath, Ifaces)>() {
                let name = ifaces
                    .get(proto::OBJECT_INTERFACE)
                    .and_then(|p| p.get("Name"))
                    .and_then(|v| String::try_from(v.try_clone().ok()?).ok());
                if let Some(name) = name.filter(|n| n.starts_with("loop")) {
                    arrivals.insert(name, at);
                }
            }
        }
        arrivals
    });
    let created = loop_burst(0x4C80, first, N);
    let arrivals = collector.await.expect("collector");
    let mut latencies: Vec<Duration> = created
        .iter()
        .filter_map(|(name, t)| {
            let at = arrivals.get(name)?;
            Some(Duration::from_nanos(
                u64::try_from(at.saturating_sub(*t)).unwrap_or(0),
            ))
        })
        .collect();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{source:<7} source: {} of {N} appeared; hotplug → InterfacesAdded p50 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    loop_burst(0x4C81, first, N);
}

fn main() {
    let wants = bench_sections();
    let runtime = bench_runtime();
    runtime.block_on(async {
        if wants("replay") {
            replay().await;
        }
        if wants("burst") {
            println!("-- a burst of 1,000 loop devices created at once");
            burst("kernel").await;
            burst("udev").await;
        }
    });
}
