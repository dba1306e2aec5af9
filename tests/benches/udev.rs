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

/// Signals of one member (from `sender` if named), from now on.
async fn signals(
    conn: &zbus::Connection,
    sender: Option<&'static str>,
    member: &'static str,
) -> MessageStream {
    let mut rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .member(member);
    if let Some(sender) = sender {
        rule = rule.sender(sender);
    }
    let rule = rule.build().expect("match rule");
    MessageStream::for_match_rule(rule, conn, std::num::NonZeroUsize::new(1 << 20))
        .await
        .expect("subscribe")
}

/// When each of `n` names (`name_of` a signal, those starting `loop`) was
/// first heard on `stream`; gives up after 60 s of silence.
async fn arrival_times(
    mut stream: MessageStream,
    n: usize,
    name_of: impl Fn(&zbus::Message) -> Option<String>,
) -> HashMap<String, u128> {
    let mut arrivals = HashMap::new();
    while arrivals.len() < n {
        let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(60), stream.next()).await
        else {
            break;
        };
        let at = now_ns();
        if let Some(name) = name_of(&msg).filter(|n| n.starts_with("loop")) {
            arrivals.entry(name).or_insert(at);
        }
    }
    arrivals
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
    let mut removed = signals(&client.conn, Some(proto::BUS_NAME), "InterfacesRemoved").await;
    // Everything devmgrd signals meanwhile, kept for the floor below.
    let everything = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(proto::BUS_NAME)
        .build()
        .expect("match rule");
    let mut sent = MessageStream::for_match_rule(
        everything,
        &client.conn,
        std::num::NonZeroUsize::new(1 << 22),
    )
    .await
    .expect("subscribe");
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
    // Every signal devmgrd sent for the replay, up to the last removal.
    let mut recorded = Vec::new();
    let mut removals = 0;
    while removals < DEVICES {
        match tokio::time::timeout(Duration::from_secs(10), sent.next()).await {
            Ok(Some(Ok(msg))) => {
                let header = msg.header();
                if header.member().is_some_and(|m| m == "InterfacesRemoved") {
                    removals += 1;
                }
                recorded.push(msg);
            }
            _ => panic!("the recording ended after {removals} removals"),
        }
    }
    drop(sent);
    drop(daemon);
    let floor = replay_floor(&bus, &recorded).await;
    println!("-- replay of {events} events ({DEVICES} block devices added, then removed)");
    println!(
        "raw parse        {raw:>10.1?}  ({:>9.0} events/s)",
        events as f64 / raw.as_secs_f64()
    );
    println!(
        "whole path       {whole:>10.1?}  ({:>9.0} events/s)  parse → model → InterfacesAdded/Removed on the bus",
        events as f64 / whole.as_secs_f64()
    );
    let bytes: usize = recorded.iter().map(|m| m.data().len()).sum();
    let mut members = std::collections::BTreeMap::new();
    for m in &recorded {
        let header = m.header();
        let key = format!(
            "{}.{}",
            header.interface().map_or("", |i| i.as_str()),
            header.member().map_or("", |m| m.as_str())
        );
        *members.entry(key).or_insert(0usize) += 1;
    }
    println!("devmgrd's signals: {members:?}");
    println!(
        "bus floor        {floor:>10.1?}  the same {} signals ({:.1} MB) from a minimal emitter, 512 per write",
        recorded.len(),
        bytes as f64 / 1e6
    );
    println!(
        "ratio (whole-path throughput / raw parse): {:.3}",
        raw.as_secs_f64() / whole.as_secs_f64()
    );
    println!(
        "ratio (whole-path throughput / bus floor, target ≥ 0.5): {:.3}",
        floor.as_secs_f64() / whole.as_secs_f64()
    );
}

/// The bus floor of a replay: the signals devmgrd sent, the same bodies,
/// paths and members, from a minimal emitter on the same dbus-daemon,
/// written 512 at a time as devmgrd writes them, until a client has
/// received the last one.
async fn replay_floor(bus: &TestBus, recorded: &[zbus::Message]) -> Duration {
    let emitter = zbus::connection::Builder::address(bus.address.as_str())
        .build()
        .await
        .expect("emitter");
    let copies: Vec<zbus::Message> = recorded
        .iter()
        .map(|m| {
            let header = m.header();
            let builder = zbus::Message::signal(
                header.path().expect("path").clone(),
                header.interface().expect("interface").clone(),
                header.member().expect("member").clone(),
            );
            with_body_of(builder, m)
        })
        .collect();
    let client = Client::connect(&bus.address).await;
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(emitter.unique_name().expect("name").clone())
        .build()
        .expect("match rule");
    let mut received =
        MessageStream::for_match_rule(rule, &client.conn, std::num::NonZeroUsize::new(1 << 22))
            .await
            .expect("subscribe");
    let t = Instant::now();
    let sending = tokio::spawn(async move {
        for chunk in copies.chunks(512) {
            emitter.send_all(chunk).await.expect("send");
        }
        emitter
    });
    for seen in 0..recorded.len() {
        match tokio::time::timeout(Duration::from_secs(60), received.next()).await {
            Ok(Some(Ok(_))) => {}
            _ => panic!(
                "the floor's client saw only {seen} of {} signals",
                recorded.len()
            ),
        }
    }
    let took = t.elapsed();
    drop(sending.await.expect("emitter"));
    took
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

/// For each name stamped in both, how long after `from` it was in `to`.
fn between(from: &HashMap<String, u128>, to: &HashMap<String, u128>) -> Vec<Duration> {
    from.iter()
        .filter_map(|(name, t)| {
            let at = to.get(name)?;
            Some(Duration::from_nanos(
                u64::try_from(at.saturating_sub(*t)).unwrap_or(0),
            ))
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
    let daemon = Daemon::start_with_args(&bus, &["--udev-source", source, "--subsystems", "block"]);
    let client = Client::connect(&bus.address).await;
    let added = signals(&client.conn, Some(proto::BUS_NAME), "InterfacesAdded").await;
    // Names arrive on the bus while python still runs: record arrival times
    // in a task, match them with creation times afterwards.
    let collector = tokio::spawn(arrival_times(added, N as usize, |msg| {
        type Ifaces = HashMap<String, HashMap<String, OwnedVariant>>;
        let (_, ifaces) = msg.body().deserialize::<(OwnedObjectPath, Ifaces)>().ok()?;
        let name = ifaces.get(proto::OBJECT_INTERFACE)?.get("Name")?;
        String::try_from(name.try_clone().ok()?).ok()
    }));
    // The floor: the same events as udevd broadcasts them (netlink group
    // 2), received by a listener of our own, beside devmgrd's. The relay
    // control: the listener also passes each event on as a one-string
    // signal through the same dbus-daemon, to this client: what one hop
    // through the bus costs during the burst.
    let mut relay_collector = None;
    let mut floor = None;
    if source == "udev" {
        let relayed = signals(&client.conn, None, "Heard").await;
        relay_collector = Some(tokio::spawn(arrival_times(relayed, N as usize, |msg| {
            msg.body().deserialize::<(String,)>().ok().map(|(n,)| n)
        })));
        floor = Some(udev_listener(N as usize, bus.address.clone()));
    }
    let created = loop_burst(0x4C80, first, N);
    let arrivals = collector.await.expect("collector");
    let mut latencies: Vec<Duration> = between(&created, &arrivals);
    let row = |label: &str, latencies: &mut Vec<Duration>| {
        latencies.sort_unstable();
        let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
        println!(
            "{label:<38} {:>4} of {N}  p50 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}",
            latencies.len(),
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
        pct(0.99)
    };
    if latencies.len() < N as usize {
        let missing: Vec<&String> = created
            .keys()
            .filter(|n| !arrivals.contains_key(*n))
            .collect();
        println!("missing: {missing:?}; devmgrd's log:\n{}", daemon.log());
    }
    let p99 = row(
        &format!("{source} source: hotplug → InterfacesAdded"),
        &mut latencies,
    );
    if let Some(floor) = floor {
        let heard = floor.join().expect("listener");
        let mut floor_latencies: Vec<Duration> = between(&created, &heard);
        let floor99 = row("  floor: hotplug → udevd's broadcast", &mut floor_latencies);
        println!(
            "  p99 above the floor's p99: {:.1?} (target ≤ 2 ms)",
            p99.saturating_sub(floor99)
        );
        let relayed = match relay_collector {
            Some(collector) => collector.await.expect("relay collector"),
            None => HashMap::new(),
        };
        let mut relay_latencies: Vec<Duration> = between(&created, &relayed);
        let relay99 = row(
            "  control: broadcast relayed over the bus",
            &mut relay_latencies,
        );
        println!(
            "  p99 above the relay's p99: {:.1?}",
            p99.saturating_sub(relay99)
        );
        // Per device: how much later devmgrd's client heard of it than
        // our listener did.
        let mut behind: Vec<Duration> = arrivals
            .iter()
            .filter_map(|(name, at)| {
                let floor_at = heard.get(name)?;
                Some(Duration::from_nanos(
                    u64::try_from(at.saturating_sub(*floor_at)).unwrap_or(0),
                ))
            })
            .collect();
        row("  per device, InterfacesAdded − broadcast", &mut behind);
    }
    loop_burst(0x4C81, first, N);
}

/// A thread listening to udevd's broadcast of block devices, as devmgrd's
/// udev source does (same socket buffer), that stamps each `add` of a
/// loop device on arrival; it ends after `n` or 60 s of silence.
fn udev_listener(n: usize, bus: String) -> std::thread::JoinHandle<HashMap<String, u128>> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::socket::{setsockopt, sockopt};
    use std::os::fd::AsFd;
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let listener = std::thread::spawn(move || {
        // The relay: its own connection and a one-thread runtime, each
        // signal sent before the next event is read.
        let relay_runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let relay = relay_runtime
            .block_on(zbus::connection::Builder::address(bus.as_str()).build())
            .expect("relay connection");
        let socket = udev::MonitorBuilder::new()
            .and_then(|b| b.match_subsystem("block"))
            .and_then(|b| b.listen())
            .expect("udev monitor");
        setsockopt(&socket.as_fd(), sockopt::RcvBufForce, &(128 << 20)).expect("SO_RCVBUFFORCE");
        ready_tx.send(()).expect("ready");
        let mut heard = HashMap::new();
        while heard.len() < n {
            let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(60_000u16)) {
                Ok(0) => break,
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => panic!("poll: {e}"),
            }
            for event in socket.iter() {
                let at = now_ns();
                let name = event.sysname().to_string_lossy().into_owned();
                if event.event_type() == udev::EventType::Add && name.starts_with("loop") {
                    relay_runtime
                        .block_on(relay.emit_signal(
                            None::<()>,
                            "/org/bench/Relay",
                            "org.bench.Relay",
                            "Heard",
                            &(name.as_str(),),
                        ))
                        .expect("relay");
                    heard.insert(name, at);
                }
            }
        }
        heard
    });
    ready.recv().expect("the listener started");
    listener
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
