//! Benchmarks of following the kernel's users (issue 12; root; real loop
//! devices and mounts). Prints a table; docs/benchmarks.md keeps the
//! numbers. Run: `cargo build --release -p devmgrd && cargo bench -p
//! devmgr-tests --bench kernel_users [-- SECTION...]` with SECTION one of:
//! - `storm`: Acquire+Release against Peer.Ping with 1,000 tmpfs mounts
//!   present and during a storm of mount+umount pairs of unrelated tmpfs
//!   (in a mount namespace of their own, which devmgrd follows), and
//!   devmgrd's CPU during the storm;
//! - `idle`: devmgrd's CPU over 60 s (`IDLE_SECONDS`) while a removal waits
//!   on a mounted loop device;
//! - `umount`: from `umount` to the mount leaving Holders and to
//!   RemovalCompleted, over 100 rounds (`ROUNDS`), and the kernel's own
//!   loop teardown (LOOP_CLR_FD + LOOP_CTL_REMOVE, without devmgrd) alone.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devmgr_tests::disks::{self, LoopDisk};
use devmgr_tests::*;
use futures_util::{FutureExt, StreamExt};

/// CPU time devmgrd has used, all threads (from schedstat, in ns).
fn cpu_of(pid: u32) -> Duration {
    let mut total = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            total += stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(total)
}

/// How many times devmgrd's threads were switched out (each a wake-up).
fn switches_of(pid: u32) -> u64 {
    let mut total = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            for line in status.lines() {
                if let Some(n) = line
                    .strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                {
                    total += n.trim().parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    total
}

fn daemon(bus: &TestBus) -> Daemon {
    Daemon::start_with_args(bus, &["--udev-source", "kernel", "--subsystems", "block"])
}

/// Interleaved Ping and Acquire+Release rounds; (ping p50, acquire p50).
async fn ping_vs_acquire(c: &Client, label: &str, n: usize) -> f64 {
    let host = c
        .add_host(&format!("pinged-{}", label.replace('/', " per ")))
        .await;
    let object = c.object(&host).await;
    for _ in 0..1_000 {
        ping(c).await;
        drop(object.acquire("warm-up", none()).await.expect("acquire"));
    }
    let mut pings = Samples(Vec::with_capacity(n));
    let mut refs = Samples(Vec::with_capacity(n));
    for _ in 0..n / 500 {
        for _ in 0..500 {
            let t = Instant::now();
            ping(c).await;
            pings.0.push(t.elapsed());
        }
        for _ in 0..500 {
            let t = Instant::now();
            drop(object.acquire("bench", none()).await.expect("acquire"));
            refs.0.push(t.elapsed());
        }
    }
    let (p, _) = pings.row(&format!("{label}: Peer.Ping"));
    let (a, _) = refs.row(&format!("{label}: Acquire + close"));
    let ratio = a.as_secs_f64() / p.as_secs_f64();
    println!("{label}: ratio p50 {ratio:.2}x");
    let _ = c.remove(&host, none()).await;
    ratio
}

/// A python process in a mount namespace of its own (util-linux unshare,
/// private propagation) that mounts tmpfs at will, driven by lines on its
/// stdin: `N` mounts N tmpfs and keeps them; `storm R` mounts and unmounts
/// one tmpfs, R pairs a second (0: as fast as it can), until told `stop`,
/// then prints the pairs done.
const MOUNTER: &str = r#"
import ctypes, os, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
base = sys.argv[1]
def mount(path):
    if libc.mount(b"none", path.encode(), b"tmpfs", 0, b"size=64k") != 0:
        raise OSError(ctypes.get_errno(), "mount " + path)
def umount(path):
    if libc.umount2(path.encode(), 0) != 0:
        raise OSError(ctypes.get_errno(), "umount " + path)
import time
stop = threading.Event()
pairs = [0]
def storm(rate):
    d = os.path.join(base, "storm"); os.makedirs(d, exist_ok=True)
    start = time.monotonic()
    while not stop.is_set():
        mount(d); umount(d); pairs[0] += 1
        if rate:
            ahead = start + pairs[0] / rate - time.monotonic()
            if ahead > 0: time.sleep(ahead)
print("ready", flush=True)
for line in sys.stdin:
    word = line.strip()
    if word.isdigit():
        for i in range(int(word)):
            d = os.path.join(base, "m%d" % i); os.makedirs(d, exist_ok=True); mount(d)
        print("mounted", flush=True)
    elif word.startswith("storm"):
        stop.clear(); pairs[0] = 0
        rate = float(word.split()[1]) if " " in word else 0
        t = threading.Thread(target=storm, args=(rate,)); t.start()
        print("storming", flush=True)
    elif word == "stop":
        stop.set(); t.join()
        print(pairs[0], flush=True)
"#;

struct Mounter {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Mounter {
    fn start(dir: &TempDir) -> Mounter {
        let mut child = Command::new("unshare")
            .args([
                "-m",
                "--propagation",
                "private",
                "/usr/bin/python3",
                "-c",
                MOUNTER,
            ])
            .arg(&dir.0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare + python3");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut m = Mounter { child, out };
        assert_eq!(m.line(), "ready");
        m
    }

    fn say(&mut self, word: &str) -> String {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{word}").expect("tell the mounter");
        stdin.flush().expect("flush");
        self.line()
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("the mounter's answer");
        line.trim().to_owned()
    }
}

impl Drop for Mounter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Acquire+Release vs Ping during a storm of `rate` pairs a second (0: as
/// fast as one python thread mounts); devmgrd's CPU meanwhile.
async fn during_storm(c: &Client, pid: u32, mounter: &mut Mounter, rate: u32, n: usize) -> f64 {
    let label = match rate {
        0 => "storm, unbounded".to_owned(),
        r => format!("storm, {r} pairs/s"),
    };
    let (cpu0, t0) = (cpu_of(pid), Instant::now());
    assert_eq!(mounter.say(&format!("storm {rate}")), "storming");
    let ratio = ping_vs_acquire(c, &label, n).await;
    let pairs: u64 = mounter.say("stop").parse().expect("pairs");
    let (cpu, took) = (cpu_of(pid) - cpu0, t0.elapsed());
    println!(
        "{label}: {pairs} mount+umount pairs in {took:.2?} ({:.0}/s) beside 1,000 mounts; \
         devmgrd used {cpu:.2?} of CPU ({:.1}% of one core, {:.1} µs per pair)",
        pairs as f64 / took.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / took.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / pairs.max(1) as f64
    );
    ratio
}

async fn storm(n: usize) {
    let following = ["--udev-source", "kernel", "--subsystems", "block"];
    for (what, args) in [
        ("devmgrd following the kernel's users", &following[..]),
        (
            "control: devmgrd --no-udev (no watcher)",
            &["--no-udev"][..],
        ),
    ] {
        let bus = TestBus::start();
        let daemon = Daemon::start_with_args(&bus, args);
        let pid = daemon.child.id();
        let c = Client::connect(&bus.address).await;
        println!("-- Acquire+Release vs Ping, {what} ({n} each)");
        let baseline = ping_vs_acquire(&c, "no extra mounts", n).await;
        let dir = TempDir::unique("storm");
        std::fs::create_dir_all(&dir.0).expect("dir");
        let mut mounter = Mounter::start(&dir);
        let t = Instant::now();
        assert_eq!(mounter.say("1000"), "mounted");
        println!(
            "1,000 tmpfs mounted in a namespace of their own in {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let present = ping_vs_acquire(&c, "1,000 mounts present", n).await;
        let paced = during_storm(&c, pid, &mut mounter, 1000, n).await;
        let unbounded = during_storm(&c, pid, &mut mounter, 0, n).await;
        println!(
            "ratios: {baseline:.2}x alone, {present:.2}x with 1,000 mounts, \
             {paced:.2}x in a 1,000 pairs/s storm, {unbounded:.2}x in an unbounded one"
        );
    }
}

/// A loop device with ext4 mounted, the mount among its holders in
/// devmgrd, and its removal pending: the disk, the mount point, the object.
async fn mounted_and_pending(
    c: &Client,
    tag: &str,
) -> (LoopDisk, std::path::PathBuf, zbus::OwnedObjectPath) {
    let mut disk = LoopDisk::create(tag, 16);
    disk.mkfs(&disk.node());
    let at = disk.mount_point("mnt");
    disk.mount(&disk.node(), &at);
    let path = c.appears(&disk.name()).await;
    eventually("the mount in Holders", || async {
        c.ref_count(&path).await == Some(1)
    })
    .await;
    let (outcome, _) = c.remove(&path, none()).await.expect("remove");
    assert_eq!(outcome, "pending");
    (disk, at, path)
}

async fn idle(seconds: u64) {
    let _one = disks::exclusive();
    let bus = TestBus::start();
    let daemon = daemon(&bus);
    let pid = daemon.child.id();
    let c = Client::connect(&bus.address).await;
    let (mut disk, at, path) = mounted_and_pending(&c, "idle").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (cpu0, sw0, t0) = (cpu_of(pid), switches_of(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (cpu, sw) = (cpu_of(pid) - cpu0, switches_of(pid) - sw0);
    println!(
        "-- a removal pending on a mounted loop device, idle for {:.0?}: devmgrd used {cpu:?} of CPU, {sw} context switches",
        t0.elapsed()
    );
    assert_eq!(c.state(&path).await.as_deref(), Some("removing"));
    disk.umount(&at);
}

/// The kernel's own teardown of a backed, unused loop device, without
/// devmgrd: LOOP_CLR_FD, close, then LOOP_CTL_REMOVE (what devmgrd does).
fn kernel_teardown(rounds: usize, image: &std::path::Path) -> Samples {
    let script = r#"
import fcntl, os, sys, time
n, image = int(sys.argv[1]), sys.argv[2]
ctl = os.open("/dev/loop-control", os.O_RDWR)
fcntl.ioctl(ctl, 0x4C80, n)
for _ in range(int(sys.argv[3])):
    backing = os.open(image, os.O_RDWR)
    dev = os.open("/dev/loop%d" % n, os.O_RDWR)
    fcntl.ioctl(dev, 0x4C00, backing)  # LOOP_SET_FD
    os.close(backing); os.close(dev)
    t = time.monotonic_ns()
    dev = os.open("/dev/loop%d" % n, os.O_RDONLY | os.O_EXCL)
    fcntl.ioctl(dev, 0x4C01)  # LOOP_CLR_FD
    os.close(dev)
    for attempt in range(1000):
        try:
            fcntl.ioctl(ctl, 0x4C81, n); break  # LOOP_CTL_REMOVE
        except OSError as e:
            if e.errno != 16: raise
            time.sleep(0.001)
    print(time.monotonic_ns() - t, flush=True)
    fcntl.ioctl(ctl, 0x4C80, n)
fcntl.ioctl(ctl, 0x4C81, n)
"#;
    let number = 39_000 + std::process::id() % 1000;
    let out = disks::run(
        "/usr/bin/python3",
        &[
            "-c",
            script,
            &number.to_string(),
            &image.to_string_lossy(),
            &rounds.to_string(),
        ],
    );
    Samples(
        out.lines()
            .filter_map(|l| l.parse::<u64>().ok())
            .map(Duration::from_nanos)
            .collect(),
    )
}

async fn umount(rounds: usize) {
    let _one = disks::exclusive();
    let bus = TestBus::start();
    let daemon = Daemon::start_with_env(
        &bus,
        &["--udev-source", "kernel", "--subsystems", "block"],
        &[(
            "RUST_LOG",
            "info,devmgrd::effects=debug,devmgrd::ingest=debug",
        )],
    );
    let c = Client::connect(&bus.address).await;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(proto::BUS_NAME)
        .build()
        .expect("match rule");
    let mut signals = zbus::MessageStream::for_match_rule(rule, &c.conn, None)
        .await
        .expect("signals");
    let mut unheld = Samples(Vec::new());
    let mut umounts = Samples(Vec::new());
    // When each umount(2) was called and each RemovalCompleted arrived.
    let (mut umounted, mut finished) = (Vec::new(), Vec::new());
    let mut completed = Samples(Vec::new());
    for round in 0..rounds {
        let (mut disk, at, path) = mounted_and_pending(&c, &format!("umount-{round}")).await;
        while let Some(Some(_)) = signals.next().now_or_never() {}
        umounted.push((disk.number, std::time::SystemTime::now()));
        let t = Instant::now();
        disk.umount(&at);
        umounts.0.push(t.elapsed());
        let mut seen_unheld = None;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), signals.next())
                .await
                .expect("a signal within 10 s")
                .expect("stream")
                .expect("message");
            let header = msg.header();
            let member = header.member().map(|m| m.to_string()).unwrap_or_default();
            let ours = header.path().is_some_and(|p| p.as_str() == path.as_str());
            if member == "PropertiesChanged" && ours && seen_unheld.is_none() {
                let (_, changed, _): (
                    String,
                    std::collections::HashMap<String, zbus::OwnedVariant>,
                    Vec<String>,
                ) = msg.body().deserialize().expect("body");
                if changed.get("RefCount").and_then(|v| u32::try_from(v).ok()) == Some(0) {
                    seen_unheld = Some(t.elapsed());
                }
            }
            if member == "RemovalCompleted" {
                let (object, _, _): (zbus::OwnedObjectPath, String, String) =
                    msg.body().deserialize().expect("body");
                if object == path {
                    break;
                }
            }
        }
        completed.0.push(t.elapsed());
        finished.push((disk.number, std::time::SystemTime::now()));
        unheld.0.push(seen_unheld.unwrap_or_default());
    }
    println!("-- umount of a mounted loop device with its removal pending ({rounds} rounds)");
    let images = TempDir::unique("teardown");
    std::fs::create_dir_all(&images.0).expect("dir");
    let image = images.0.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("image");
    let mut kernel = kernel_teardown(rounds, &image);
    // What the kernel took inside devmgrd's own removals (its debug log).
    let mut in_devmgrd = Samples(
        daemon
            .log()
            .lines()
            .filter_map(|l| l.split(" removed by the kernel in ").nth(1))
            .filter_map(|rest| rest.split(':').next())
            .filter_map(parse_duration)
            .collect(),
    );
    // devmgrd's own share, from its log's timestamps: from the umount(2)
    // call to the real removal's start (seeing the mount go, the model, the
    // executor; the mount leaves mountinfo before umount(2) returns, and
    // devmgrd often starts before it does, so this counts some of the
    // kernel's unmount too), and from the kernel's remove uevent to
    // RemovalCompleted at the client (the model, the bus). Between the two
    // is the kernel's loop teardown.
    let log = daemon.log();
    // Each round's loop device by its number (numbers come round again,
    // so in order): when devmgrd began to remove it, and when its kernel
    // `remove` uevent reached devmgrd.
    let by_loop = |needle: &str, number_after: &str| -> HashMap<u32, VecDeque<f64>> {
        let mut times: HashMap<u32, VecDeque<f64>> = HashMap::new();
        for l in log.lines().filter(|l| l.contains(needle)) {
            let Some(rest) = l.split(number_after).nth(1) else {
                continue;
            };
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let (Ok(n), Some(t)) = (digits.parse(), seconds_of_day(l)) {
                times.entry(n).or_default().push_back(t);
            }
        }
        times
    };
    let mut starts = by_loop("the real removal starts", "loop-remove ");
    let mut uevents = by_loop("uevent Remove", "/block/loop");
    let day = |t: &std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() % 86_400.0)
    };
    let span = |from: f64, to: f64| Duration::from_secs_f64((to - from).max(0.0));
    let (mut react, mut kernel_part, mut publish) = (
        Samples(Vec::new()),
        Samples(Vec::new()),
        Samples(Vec::new()),
    );
    for ((n, called), (_, done)) in umounted.iter().zip(&finished) {
        let next = |m: &mut HashMap<u32, VecDeque<f64>>| m.get_mut(n).and_then(VecDeque::pop_front);
        let (Some(start), Some(uevent)) = (next(&mut starts), next(&mut uevents)) else {
            continue;
        };
        react.0.push(span(day(called), start));
        kernel_part.0.push(span(start, uevent));
        publish.0.push(span(uevent, day(done)));
    }
    let mut rest = Samples(
        react
            .0
            .iter()
            .zip(&publish.0)
            .map(|(a, b)| *a + *b)
            .collect(),
    );
    if std::env::var_os("SHOW_LOG").is_some() {
        for line in daemon
            .log()
            .lines()
            .filter(|l| l.contains("removed by the kernel"))
        {
            println!("{line}");
        }
    }
    for (what, samples) in [
        ("umount(2) itself", &mut umounts),
        ("umount -> RefCount 0 (the mount left Holders)", &mut unheld),
        (
            "umount -> RemovalCompleted (removed for real)",
            &mut completed,
        ),
        ("  umount(2) call -> devmgrd starts the removal", &mut react),
        (
            "  the kernel: LOOP_CLR_FD .. remove uevent",
            &mut kernel_part,
        ),
        (
            "  remove uevent -> RemovalCompleted at the client",
            &mut publish,
        ),
        (
            "  devmgrd's share (the two above it but the kernel)",
            &mut rest,
        ),
        (
            "LOOP_CLR_FD + LOOP_CTL_REMOVE ioctls, in devmgrd",
            &mut in_devmgrd,
        ),
        (
            "kernel alone: LOOP_CLR_FD + LOOP_CTL_REMOVE (python)",
            &mut kernel,
        ),
    ] {
        samples.row(what);
        println!("{:<52} max {:?}", "", samples.percentile(1.0));
    }
}

/// The time of day (UTC, in seconds) of a log line's tracing timestamp
/// (`2026-12-03T12:15:10.607032Z`, after any colour codes).
fn seconds_of_day(line: &str) -> Option<f64> {
    let t = line.find('T')?;
    let clock = line.get(t + 1..t + 16)?;
    let mut parts = clock.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.trim_end_matches('Z').parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// A Duration as `{:?}` prints it (`12.3ms`, `850µs`, `1.2s`).
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| c.is_alphabetic() || c == 'µ')?);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "µs" | "us" => value / 1e6,
        "ns" => value / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

fn main() {
    let wanted = bench_sections();
    let n: usize = std::env::var("PING_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let seconds: u64 = std::env::var("IDLE_SECONDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(60);
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100);
    let rt = bench_runtime();
    if wanted("storm") {
        rt.block_on(storm(n));
    }
    if wanted("umount") {
        rt.block_on(umount(rounds));
    }
    if wanted("idle") {
        rt.block_on(idle(seconds));
    }
}
