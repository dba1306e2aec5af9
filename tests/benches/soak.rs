//! The soak (issue 6): devmgrd under mixed random clients for a while —
//! adds, removals (some forced), stops, re-enables, references taken and
//! dropped, clients connecting and leaving — while the kernel creates and
//! removes loop devices underneath (real uevents). devmgrd's memory (RSS)
//! and open files are sampled every 10 s; the verdict is against a stated
//! bound, printed, not asserted. Needs root. Run:
//! `cargo build --release -p devmgrd && SOAK_MINUTES=10 cargo bench -p devmgr-tests --bench soak`.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devmgr_tests::*;
use zbus::{OwnedObjectPath, Variant};

/// Memory growth after warm-up that counts as a leak, and fds likewise.
const RSS_BOUND_KIB: i64 = 16 * 1024;
const FD_BOUND: i64 = 16;

fn rss_kib(pid: u32) -> i64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(-1)
}

fn fds(pid: u32) -> i64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(-1, |d| d.count() as i64)
}

/// A tiny deterministic generator (no dependency needed for a soak).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

async fn client_loop(address: String, seed: u64, stop: Arc<AtomicBool>, ops: Arc<AtomicU64>) {
    let mut rng = Rng(seed | 1);
    while !stop.load(Ordering::Relaxed) {
        // Each round is a new connection: clients come and go.
        let c = Client::connect(&address).await;
        let mut mine: Vec<OwnedObjectPath> = Vec::new();
        let mut held = Vec::new();
        for _ in 0..200 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let n = ops.fetch_add(1, Ordering::Relaxed);
            match rng.below(8) {
                0 | 1 => {
                    let sim = c.sim_scsi().await;
                    let luns = rng.below(4) as u32;
                    let opts = if luns > 0 {
                        options(&[
                            ("driver", Variant::from(sim.as_ref())),
                            ("luns", Variant::from(luns)),
                        ])
                    } else {
                        none()
                    };
                    if let Ok(p) = c
                        .manager
                        .add("host", &format!("soak{seed}-{n}"), &root(), opts)
                        .await
                    {
                        mine.push(p);
                    }
                }
                2 | 3 => {
                    if let Some(p) = mine.get(rng.below(mine.len() as u64) as usize) {
                        if let Ok(fd) = c.object(p).await.acquire("soak", none()).await {
                            held.push(fd);
                        }
                    }
                }
                4 => {
                    if !held.is_empty() {
                        held.swap_remove(rng.below(held.len() as u64) as usize);
                    }
                }
                5 => {
                    if !mine.is_empty() {
                        let p = mine.swap_remove(rng.below(mine.len() as u64) as usize);
                        let force = rng.below(3) == 0;
                        let _ = c
                            .remove(&p, options(&[("force", Variant::from(force))]))
                            .await;
                    }
                }
                6 => {
                    if let Some(p) = mine.get(rng.below(mine.len() as u64) as usize) {
                        let _ = c.object(p).await.stop(none()).await;
                    }
                }
                _ => {
                    if let Some(p) = mine.get(rng.below(mine.len() as u64) as usize) {
                        let _ = c.object(p).await.reenable(none()).await;
                    }
                }
            }
        }
        // Leave: drop references and remove what is left (pending ones go
        // when the references close with the connection).
        drop(held);
        for p in mine {
            let _ = c.remove(&p, none()).await;
        }
    }
}

fn main() {
    let minutes: u64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(10);
    let runtime = bench_runtime();
    runtime.block_on(async {
        let bus = TestBus::start();
        let daemon =
            Daemon::start_with_args(&bus, &["--udev-source", "kernel", "--subsystems", "block"]);
        let pid = daemon.child.id();
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for seed in 1..=4u64 {
            workers.push(tokio::spawn(client_loop(
                bus.address.clone(),
                seed * 7919,
                stop.clone(),
                ops.clone(),
            )));
        }
        // The kernel's side: loop devices 12000-12019 created and removed
        // over and over by one python process, until told to stop.
        let churn = Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import errno,fcntl,os,time\n\
                 fd=os.open('/dev/loop-control', os.O_RDWR)\n\
                 n=0\n\
                 while True:\n\
                 \x20   for i in range(12000,12020): fcntl.ioctl(fd, 0x4C80, i)\n\
                 \x20   time.sleep(0.5)\n\
                 \x20   for i in range(12000,12020):\n\
                 \x20       while True:\n\
                 \x20           try: fcntl.ioctl(fd, 0x4C81, i); break\n\
                 \x20           except OSError as e:\n\
                 \x20               if e.errno != errno.EBUSY: raise\n\
                 \x20               time.sleep(0.05)\n\
                 \x20   n+=1; print(n, flush=True)",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("python3 loop churn (needs root)");
        let start = Instant::now();
        let total = Duration::from_secs(minutes * 60);
        println!("soak for {minutes} min: 4 random clients (reconnecting every 200 ops) + loop-device churn");
        println!("{:>6} {:>10} {:>6} {:>10}", "t (s)", "RSS (KiB)", "fds", "ops");
        let mut samples = Vec::new();
        while start.elapsed() < total {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let (r, f, o) = (rss_kib(pid), fds(pid), ops.load(Ordering::Relaxed));
            println!("{:>6} {r:>10} {f:>6} {o:>10}", start.elapsed().as_secs());
            samples.push((r, f));
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            let _ = w.await;
        }
        let mut churn = churn;
        let _ = churn.kill();
        let _ = churn.wait();
        let _ = Command::new("/usr/bin/python3")
            .args(["-c", "import fcntl,os\nfd=os.open('/dev/loop-control', os.O_RDWR)\nfor i in range(12000,12020):\n    try: fcntl.ioctl(fd, 0x4C81, i)\n    except OSError: pass"])
            .status();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (end_rss, end_fds) = (rss_kib(pid), fds(pid));
        // Warm-up: the first minute's samples set the baseline.
        let warm = samples.len().min(6).saturating_sub(1);
        let (base_rss, base_fds) = samples.get(warm).copied().unwrap_or((end_rss, end_fds));
        let max_rss = samples.iter().map(|s| s.0).max().unwrap_or(end_rss);
        let max_fds = samples.iter().map(|s| s.1).max().unwrap_or(end_fds);
        println!(
            "after {} ops: RSS {base_rss} KiB after warm-up, max {max_rss}, at the end (idle) {end_rss}; \
             fds {base_fds} after warm-up, max {max_fds}, at the end {end_fds}",
            ops.load(Ordering::Relaxed)
        );
        let ok = end_rss - base_rss <= RSS_BOUND_KIB && end_fds - base_fds <= FD_BOUND;
        println!(
            "verdict (bound: RSS growth ≤ {} MiB and fds ≤ +{FD_BOUND} from warm-up to the end): {}",
            RSS_BOUND_KIB / 1024,
            if ok { "within the bound" } else { "OUT OF BOUND" }
        );
        drop(daemon);
    });
}
