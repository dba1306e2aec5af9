//! Bus-level benchmarks of the real devmgrd on a private dbus-daemon
//! (issue 3): Acquire+Release against a no-op Peer.Ping on the same
//! connection, Add+Remove latency with 10,000 pending removals and
//! Acquire/Release floods (closed loop, and paced at 25% and 50% of the
//! closed loop's rate) against the idle daemon and against control floods
//! (Ping, a minimal server sending an Acquire's messages, the bus's own
//! GetId), and GetManagedObjects at
//! 1,000 and 100,000 objects. Prints a table; docs/benchmarks.md keeps the
//! numbers. Run: `cargo bench -p devmgr-tests --bench bus [-- SECTION...]`
//! with SECTION one of `ping`, `interference`, `managed`, `state` (default:
//! all). `state`: Add+Remove with and without `--state-dir`.

use std::time::{Duration, Instant};

use devmgr_tests::*;
use zbus::{OwnedObjectPath, Variant};

/// Acquire+Release vs Peer.Ping on one connection (target ≤ 1.3×).
async fn ping_vs_acquire(bus: &TestBus) {
    const N: usize = 20_000;
    let c = Client::connect(&bus.address).await;
    let host = c.add_host("pinged").await;
    let object = c.object(&host).await;
    for _ in 0..2_000 {
        ping(&c).await;
        drop(object.acquire("warm-up", none()).await.expect("acquire"));
    }
    // Interleaved rounds, so drift on a shared machine hits both alike.
    let mut pings = Samples(Vec::with_capacity(N));
    let mut refs = Samples(Vec::with_capacity(N));
    for _ in 0..N / 1_000 {
        for _ in 0..1_000 {
            let t = Instant::now();
            ping(&c).await;
            pings.0.push(t.elapsed());
        }
        for _ in 0..1_000 {
            let t = Instant::now();
            let fd = object.acquire("bench", none()).await.expect("acquire");
            drop(fd);
            refs.0.push(t.elapsed());
        }
    }
    // Every release is processed by the time RefCount reads 0.
    let settled = Instant::now();
    while c.ref_count(&host).await != Some(0) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!("-- Acquire+Release vs Peer.Ping, one connection, {N} each");
    let (ping50, ping99) = pings.row("Peer.Ping round trip");
    let (acq50, acq99) = refs.row("Acquire round trip + close of the fd");
    println!(
        "ratio p50 {:.2}x  p99 {:.2}x  mean {:.2}x   (releases settled {:?} after the last)",
        acq50.as_secs_f64() / ping50.as_secs_f64(),
        acq99.as_secs_f64() / ping99.as_secs_f64(),
        refs.mean().as_secs_f64() / pings.mean().as_secs_f64(),
        settled.elapsed()
    );
}

/// One Add+Remove of an unrelated host, timed.
async fn add_remove(c: &Client, i: usize) -> Duration {
    let t = Instant::now();
    let host = c.add_host(&format!("probe{i}")).await;
    let (outcome, _) = c.remove(&host, none()).await.expect("remove");
    let took = t.elapsed();
    assert_eq!(outcome, "removed");
    took
}

async fn add_remove_samples(c: &Client, n: usize, offset: usize) -> Samples {
    // Warm up (caches, allocator, CPU frequency) before sampling.
    for i in 0..2_000 {
        add_remove(c, offset + n + i).await;
    }
    let mut s = Samples(Vec::with_capacity(n));
    for i in 0..n {
        s.0.push(add_remove(c, offset + i).await);
    }
    s
}

/// What the flooding clients call.
#[derive(Clone, Copy)]
enum Flood {
    /// `Acquire` on their own object, then close the fd.
    Acquire,
    /// `Peer.Ping` to devmgrd: a round trip the daemon does nothing for.
    Ping,
    /// The bus's own `GetId`: a round trip devmgrd never sees.
    BusGetId,
    /// `Acquire` on a minimal server in the bench that sends what devmgrd
    /// sends for an Acquire+Release (a PropertiesChanged, the reply with
    /// a pipe, a second PropertiesChanged) and does nothing else: what the
    /// bus costs for those messages.
    Mimic,
}

/// The mimic's object path and interface.
const MIMIC_PATH: &str = "/org/bench/Mimic";

/// Starts the minimal Acquire server on its own thread and single-thread
/// runtime, as devmgrd runs; returns its bus name.
fn start_mimic(address: &str) -> String {
    let (name_tx, name_rx) = std::sync::mpsc::channel();
    let address = address.to_owned();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            use futures_util::StreamExt;
            let conn = zbus::connection::Builder::address(address.as_str())
                .build()
                .await
                .expect("mimic connection");
            name_tx
                .send(conn.unique_name().expect("name").to_string())
                .expect("name");
            let mut calls = zbus::MessageStream::from(&conn);
            let mut next = 1u64;
            while let Some(Ok(call)) = calls.next().await {
                if call.message_type() != zbus::message::Type::MethodCall {
                    continue;
                }
                let header = call.header();
                let sender = header.sender().map(|s| s.to_string()).unwrap_or_default();
                let holders = vec![(next, sender, 0u32, 0u32, "flood".to_owned(), 0u64)];
                next += 1;
                // PropertiesChanged of Holders and RefCount, as devmgrd's.
                let announce = |holders: Vec<proto::HolderTuple>| {
                    let conn = &conn;
                    async move {
                        let count = holders.len() as u32;
                        let changed = std::collections::HashMap::from([
                            ("Holders", Variant::from(holders)),
                            ("RefCount", Variant::from(count)),
                        ]);
                        let invalidated: &[&str] = &[];
                        let _ = conn
                            .emit_signal(
                                None::<()>,
                                MIMIC_PATH,
                                "org.freedesktop.DBus.Properties",
                                "PropertiesChanged",
                                &(proto::OBJECT_INTERFACE, changed, invalidated),
                            )
                            .await;
                    }
                };
                announce(holders).await;
                let (theirs, _ours) = std::io::pipe().expect("pipe");
                let fd = zbus::OwnedFd::from(std::os::fd::OwnedFd::from(theirs));
                let reply = zbus::Message::method_return(&header)
                    .build(&(fd,))
                    .expect("reply");
                let _ = conn.send(&reply).await;
                // The release's PropertiesChanged (devmgrd sends it when
                // the client closes the handle).
                announce(Vec::new()).await;
            }
        });
    });
    name_rx.recv().expect("the mimic started")
}

/// Add+Remove p50/p99 with 10,000 pending removals and 8 flooding clients,
/// against the idle daemon (target ratio ≤ 1.2).
async fn interference(bus: &TestBus) {
    const N: usize = 5_000;
    let measurer = Client::connect(&bus.address).await;
    let mut idle = add_remove_samples(&measurer, N, 0).await;

    // 10,000 LUNs, each referenced, under a host whose removal is pending.
    let setup = Client::connect(&bus.address).await;
    let sim = setup.sim_scsi().await;
    let big = setup
        .add(
            "host",
            "pending",
            None,
            options(&[
                ("driver", Variant::from(sim.as_ref())),
                ("luns", Variant::from(10_000u32)),
            ]),
        )
        .await;
    let mut held = Vec::with_capacity(10_000);
    for lun in 0..10_000 {
        let path = setup
            .manager
            .find_object(
                "device",
                &format!("{}:0:0:{lun}", id_of(&setup, &big).await),
            )
            .await
            .expect("LUN");
        held.push(setup.acquire(&path).await);
    }
    let (outcome, pending) = setup.remove(&big, none()).await.expect("remove");
    assert_eq!((outcome.as_str(), pending.len()), ("pending", 10_001));

    println!("-- Add+Remove of an unrelated host, {N} samples each");
    let (idle50, idle99) = idle.row("idle daemon");
    // 8 clients, each on its own connection and object: first acquiring and
    // releasing as fast as the daemon answers (closed loop: on 2 shared
    // cores this saturates the bus, the daemon and the clients alike), then
    // paced at 25% and 50% of that rate, heavy but unsaturated loads.
    // Three controls flood in a closed loop with calls that cost the
    // daemon nothing (a Ping), that cost the bus what an Acquire+Release
    // costs it but reach a server doing nothing else (the mimic), or that
    // never leave the bus (its own GetId): what a saturating flood costs
    // any probe on this machine, whatever the daemon does.
    let mimic = start_mimic(&bus.address);
    // The closed-loop Acquire flood comes first: its rate is the
    // saturation rate the paced floods take 25% and 50% of.
    let idle_ratio = |label: &str, loaded: &mut Samples| {
        let (load50, load99) = loaded.row(label);
        println!(
            "ratio to idle p50 {:.2}x  p99 {:.2}x",
            load50.as_secs_f64() / idle50.as_secs_f64(),
            load99.as_secs_f64() / idle99.as_secs_f64(),
        );
        (load50, load99)
    };
    let (mut closed, saturation) = flooded(bus, &measurer, &mimic, Flood::Acquire, None, 1).await;
    let acquire = idle_ratio(
        &format!("10k pending + 8 × Acquire+Release, closed loop ({saturation:.0}/s)"),
        &mut closed,
    );
    for (n, share) in [(2, 0.25), (3, 0.5)] {
        let each = (saturation * share / 8.0).max(1.0) as u32;
        let (mut paced, rate) =
            flooded(bus, &measurer, &mimic, Flood::Acquire, Some(each), n).await;
        let (a50, a99) = idle_ratio(
            &format!(
                "… at {:.0}% of saturation: 8 × {each}/s ({rate:.0}/s)",
                share * 100.0
            ),
            &mut paced,
        );
        // The same pace of the same messages, to a server that does
        // nothing else: the bus's share of that load.
        let (mut control, rate) =
            flooded(bus, &measurer, &mimic, Flood::Mimic, Some(each), 10 + n).await;
        let (c50, c99) = idle_ratio(
            &format!("  control: the minimal server at 8 × {each}/s ({rate:.0}/s)"),
            &mut control,
        );
        println!(
            "  devmgrd / the minimal server at that pace: p50 {:.2}x  p99 {:.2}x",
            a50.as_secs_f64() / c50.as_secs_f64(),
            a99.as_secs_f64() / c99.as_secs_f64()
        );
    }
    let mut controls = Vec::new();
    for (n, flood, what) in [
        (4, Flood::Ping, "Peer.Ping to devmgrd"),
        (5, Flood::Mimic, "Acquire on the minimal server"),
        (6, Flood::BusGetId, "GetId to the bus"),
    ] {
        let (mut loaded, rate) = flooded(bus, &measurer, &mimic, flood, None, n).await;
        let row = idle_ratio(
            &format!("control: 10k pending + 8 × {what}, closed loop ({rate:.0}/s)"),
            &mut loaded,
        );
        controls.push((what, row));
    }
    for (what, (c50, c99)) in controls {
        println!(
            "closed-loop Acquire flood / closed-loop {what} flood: p50 {:.2}x  p99 {:.2}x",
            acquire.0.as_secs_f64() / c50.as_secs_f64(),
            acquire.1.as_secs_f64() / c99.as_secs_f64(),
        );
    }
    // The same 10k pending removals without the flood: what pending
    // removals alone cost (rule 12).
    let mut pending_only = add_remove_samples(&measurer, N, 1_000_000).await;
    let (p50, p99) = pending_only.row("10k pending removals, no flood");
    println!(
        "ratio p50 {:.2}x  p99 {:.2}x",
        p50.as_secs_f64() / idle50.as_secs_f64(),
        p99.as_secs_f64() / idle99.as_secs_f64(),
    );
    drop(held);
}

/// Add+Remove samples while 8 clients, each on its own connection and
/// object, flood (closed loop, or `pace` calls a second each); returns
/// them and the flood's rate in all.
async fn flooded(
    bus: &TestBus,
    measurer: &Client,
    mimic: &str,
    flood: Flood,
    pace: Option<u32>,
    n: usize,
) -> (Samples, f64) {
    const N: usize = 5_000;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flooders = Vec::new();
    for f in 0..8 {
        let c = Client::connect(&bus.address).await;
        let host = c.add_host(&format!("flood{f}-{n}")).await;
        let stop = stop.clone();
        let mimic = mimic.to_owned();
        flooders.push(tokio::spawn(async move {
            let object = c.object(&host).await;
            let mut tick = pace.map(|per_second| {
                let mut t = tokio::time::interval(Duration::from_secs(1) / per_second);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                t
            });
            let mut cycles = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                match flood {
                    Flood::Acquire => drop(
                        object
                            .acquire("flood", none())
                            .await
                            .expect("flood acquire"),
                    ),
                    Flood::Ping => ping(&c).await,
                    Flood::BusGetId => {
                        c.conn
                            .call_method(
                                Some("org.freedesktop.DBus"),
                                "/org/freedesktop/DBus",
                                Some("org.freedesktop.DBus"),
                                "GetId",
                                &(),
                            )
                            .await
                            .expect("GetId");
                    }
                    Flood::Mimic => drop(
                        c.conn
                            .call_method(
                                Some(mimic.as_str()),
                                MIMIC_PATH,
                                Some(proto::OBJECT_INTERFACE),
                                "Acquire",
                                &("flood", none()),
                            )
                            .await
                            .expect("mimic acquire"),
                    ),
                }
                cycles += 1;
            }
            cycles
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let loaded = add_remove_samples(measurer, N, 100_000 * (1 + n)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let elapsed = t.elapsed();
    let mut cycles = 0;
    for f in flooders {
        cycles += f.await.expect("flooder");
    }
    (loaded, cycles as f64 / elapsed.as_secs_f64())
}

async fn id_of(c: &Client, path: &OwnedObjectPath) -> u64 {
    c.object(path).await.id().await.expect("Id")
}

/// GetManagedObjects at 1,000 and 100,000 objects: time and reply size.
async fn managed_objects(bus: &TestBus) {
    let c = Client::connect(&bus.address).await;
    let sim = c.sim_scsi().await;
    println!("-- GetManagedObjects");
    let mut total = 1u32; // the sim-scsi driver
    for (i, target) in [1_000u32, 100_000].into_iter().enumerate() {
        let luns = target - total - 1;
        let t = Instant::now();
        c.add(
            "host",
            &format!("managed{i}"),
            None,
            options(&[
                ("driver", Variant::from(sim.as_ref())),
                ("luns", Variant::from(luns)),
            ]),
        )
        .await;
        let added = t.elapsed();
        total += luns + 1;
        assert_eq!(c.manager.object_count().await.expect("count"), total);
        let mut times = Samples(Vec::new());
        let mut bytes = 0;
        for _ in 0..5 {
            let t = Instant::now();
            let reply = managed_objects_raw(&c).await.expect("GetManagedObjects");
            times.0.push(t.elapsed());
            bytes = reply.data().len();
        }
        times.row(&format!(
            "{total} objects ({bytes} bytes, {} B/object)",
            bytes / total as usize
        ));
        println!("   (adding {} LUNs in one call took {added:.1?})", luns);
    }
}

/// Add+Remove latency without and with `--state-dir` (an fsync before
/// each reply), and the rate of 8 concurrent clients with it (their
/// changes share fsyncs).
async fn durable(bus: &TestBus, label: &str) {
    let c = Client::connect(&bus.address).await;
    add_remove_samples(&c, 5_000, 0)
        .await
        .row(&format!("Add+Remove, one client, {label}"));
    let started = Instant::now();
    let clients = 8;
    let each = 1_000;
    let tasks: Vec<_> = (0..clients)
        .map(|k| {
            let address = bus.address.clone();
            tokio::spawn(async move {
                let c = Client::connect(&address).await;
                for i in 0..each {
                    add_remove(&c, 1_000_000 * (k + 1) + i).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("client");
    }
    let rate = (clients * each) as f64 / started.elapsed().as_secs_f64();
    println!(
        "{:<52} {rate:.0} Add+Remove/s",
        format!("8 clients, {label}")
    );
}

fn main() {
    let wants = bench_sections();
    let runtime = bench_runtime();
    runtime.block_on(async {
        if wants("ping") {
            let bus = TestBus::start();
            let _daemon = Daemon::start(&bus);
            ping_vs_acquire(&bus).await;
        }
        if wants("interference") {
            let bus = TestBus::start();
            // One setup client holds all 10,000 references: no per-client cap.
            let _daemon =
                Daemon::start_with_args(&bus, &["--no-udev", "--max-references-per-client", "0"]);
            interference(&bus).await;
        }
        if wants("state") {
            let bus = TestBus::start();
            let daemon = Daemon::start(&bus);
            durable(&bus, "in memory").await;
            drop(daemon);
            let dir = TempDir::unique("bench-state");
            let state_dir = dir.0.to_str().expect("utf-8 path").to_owned();
            let _daemon = Daemon::start_with_args(&bus, &["--no-udev", "--state-dir", &state_dir]);
            durable(&bus, "--state-dir (fsync'd)").await;
        }
        if wants("managed") {
            let bus = TestBus::start();
            let _daemon = Daemon::start(&bus);
            managed_objects(&bus).await;
        }
    });
}
