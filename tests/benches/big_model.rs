//! Big models (issue 13), the real devmgrd on a private dbus-daemon: RSS
//! per object and Add/Remove reply times at 100k and 1M sim-scsi LUNs,
//! devctl status/list/tree, GetManagedObjects at 50k objects with a zbus
//! client, and how long an unrelated call waits while a 100k-LUN Add is
//! being published. Prints a table; docs/benchmarks.md keeps the numbers.
//! Run: `cargo bench -p devmgr-tests --bench big_model [-- SECTION...]`
//! with SECTION one of `memory`, `devctl`, `managed`, `publication`,
//! `floor` (the same signals from a minimal emitter; default: all).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devmgr_tests::*;
use zbus::{OwnedObjectPath, Variant};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

async fn add_luns(c: &Client, name: &str, luns: u32) -> (OwnedObjectPath, Duration) {
    let t = Instant::now();
    let host = c.add_sim_host(name, luns).await;
    (host, t.elapsed())
}

/// A client whose calls may take minutes (a 1M-LUN Add).
async fn patient_client(address: &str) -> Client {
    let conn = zbus::connection::Builder::address(address)
        .method_timeout(Duration::from_secs(600))
        .build()
        .await
        .expect("client connection");
    let manager = proto::proxies::ManagerProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("manager proxy");
    Client { conn, manager }
}

async fn memory() {
    println!("-- RSS per object 3 s after one Add of N sim-scsi LUNs (fresh daemon), reply times");
    println!(
        "{:>9} {:>10} {:>12} {:>12} {:>10} {:>11}",
        "LUNs", "RSS MiB", "B/object", "B/obj-base", "Add s", "Remove s"
    );
    for luns in [100_000u32, 999_990] {
        let bus = TestBus::start();
        let daemon = Daemon::start_with_args(&bus, &["--no-udev", "--max-objects", "0"]);
        let pid = daemon.child.id();
        let c = patient_client(&bus.address).await;
        let base = rss_kib(pid);
        let (host, add) = add_luns(&c, "host0", luns).await;
        // Settled: the allocator gives freed pages back after a delay.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = rss_kib(pid);
        let objects = f64::from(luns) + 2.0;
        let t = Instant::now();
        c.remove(&host, none()).await.expect("remove");
        let remove = t.elapsed();
        println!(
            "{luns:>9} {:>10.1} {:>12.0} {:>12.0} {:>10.2} {:>11.2}",
            rss as f64 / 1024.0,
            rss as f64 * 1024.0 / objects,
            (rss - base) as f64 * 1024.0 / objects,
            add.as_secs_f64(),
            remove.as_secs_f64()
        );
    }
}

/// Runs devctl; the time to its first line of output and to its end.
fn devctl_timed(address: &str, args: &[&str]) -> (Duration, Duration, usize) {
    let t = Instant::now();
    let mut child = Command::new(binary("devctl"))
        .args(["--address", address])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("devctl");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("a line");
    let first = t.elapsed();
    let mut lines = 1;
    while {
        line.clear();
        out.read_line(&mut line).expect("a line") > 0
    } {
        lines += 1;
    }
    let ok = child.wait().expect("wait").success();
    assert!(ok, "devctl {args:?} failed");
    (first, t.elapsed(), lines)
}

async fn devctl() {
    println!("-- devctl (first line, whole run; best of 3)");
    for luns in [100_000u32, 999_990] {
        let bus = TestBus::start();
        let _daemon = Daemon::start_with_args(&bus, &["--no-udev", "--max-objects", "0"]);
        let c = patient_client(&bus.address).await;
        add_luns(&c, "host0", luns).await;
        let commands: &[&[&str]] = if luns > 100_000 {
            &[&["status"], &["list"]]
        } else {
            &[&["status"], &["list"], &["tree"], &["list", "--json"]]
        };
        for args in commands {
            let best = (0..3)
                .map(|_| devctl_timed(&bus.address, args))
                .min_by_key(|r| r.1)
                .expect("runs");
            println!(
                "{:>9} objects  devctl {:<12} first line {:>7.1} ms  all {:>6.2} s  ({} lines)",
                luns + 2,
                args.join(" "),
                best.0.as_secs_f64() * 1e3,
                best.1.as_secs_f64(),
                best.2
            );
        }
    }
}

async fn managed() {
    println!("-- GetManagedObjects, zbus client (best and median of 5)");
    for luns in [49_998u32, 100_000] {
        let bus = TestBus::start();
        let _daemon = Daemon::start(&bus);
        let c = patient_client(&bus.address).await;
        add_luns(&c, "host0", luns).await;
        let om = zbus::fdo::ObjectManagerProxy::builder(&c.conn)
            .destination(proto::BUS_NAME)
            .path(proto::MANAGER_PATH)
            .build()
            .await
            .expect("proxy");
        // The reply as it arrives, not decoded: what the daemon and the bus
        // cost, apart from the client's decoding of tens of megabytes.
        let mut raw = Vec::new();
        let mut bytes = 0;
        for _ in 0..5 {
            let t = Instant::now();
            let reply = managed_objects_raw(&c).await;
            raw.push(t.elapsed());
            bytes = reply.map_or(0, |m| m.data().len());
        }
        raw.sort();
        println!(
            "{:>9} objects  reply not decoded: best {:>7.1} ms  median {:>7.1} ms  ({:.1} MB)",
            luns + 2,
            raw[0].as_secs_f64() * 1e3,
            raw[2].as_secs_f64() * 1e3,
            bytes as f64 / 1e6
        );
        if let Ok(reply) = managed_objects_raw(&c).await {
            managed_controls(&bus, &c, &reply).await;
        }
        let mut times = Vec::new();
        let mut outcome = String::new();
        for _ in 0..5 {
            let t = Instant::now();
            let r = om.get_managed_objects().await;
            times.push(t.elapsed());
            outcome = match r {
                Ok(objects) => format!("{} objects", objects.len()),
                Err(e) => e.to_string().chars().take(60).collect(),
            };
        }
        times.sort();
        println!(
            "{:>9} objects  best {:>7.1} ms  median {:>7.1} ms  -> {outcome}",
            luns + 2,
            times[0].as_secs_f64() * 1e3,
            times[2].as_secs_f64() * 1e3
        );
    }
}

/// The controls for GetManagedObjects: the same reply bytes sent by a
/// minimal server through the same dbus-daemon (the bus's floor), and the
/// zbus client's decoding of them with no bus at all.
async fn managed_controls(bus: &TestBus, c: &Client, reply: &zbus::Message) {
    use futures_util::StreamExt;
    let server = zbus::connection::Builder::address(bus.address.as_str())
        .build()
        .await
        .expect("server");
    let server_name = server.unique_name().expect("unique name").to_string();
    let mut calls = zbus::MessageStream::from(&server);
    let answering = server.clone();
    let reply_copy = reply.clone();
    let answerer = tokio::spawn(async move {
        while let Some(Ok(call)) = calls.next().await {
            if call.message_type() != zbus::message::Type::MethodCall {
                continue;
            }
            let built = with_body_of(zbus::Message::method_return(&call.header()), &reply_copy);
            answering.send(&built).await.expect("send reply");
        }
    });
    let mut floor = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        c.conn
            .call_method(
                Some(server_name.as_str()),
                "/org/bench/Floor",
                Some("org.freedesktop.DBus.ObjectManager"),
                "GetManagedObjects",
                &(),
            )
            .await
            .expect("floor call");
        floor.push(t.elapsed());
    }
    answerer.abort();
    floor.sort();
    let mut decode = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let objects: zbus::fdo::ManagedObjects = reply.body().deserialize().expect("decode");
        decode.push(t.elapsed());
        drop(objects);
    }
    decode.sort();
    println!(
        "{:>17}  control, bus floor (the same bytes from a minimal server): best {:>7.1} ms  median {:>7.1} ms",
        "",
        floor[0].as_secs_f64() * 1e3,
        floor[2].as_secs_f64() * 1e3
    );
    println!(
        "{:>17}  control, zbus decoding the reply, no bus: best {:>7.1} ms  median {:>7.1} ms",
        "",
        decode[0].as_secs_f64() * 1e3,
        decode[2].as_secs_f64() * 1e3
    );
}

async fn publication() {
    println!(
        "-- an unrelated call (Get of another object's State) while a 100k-LUN Add is published"
    );
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let c = patient_client(&bus.address).await;
    let other = c.add_host("other").await;
    let idle = {
        let mut s = Samples(Vec::new());
        for _ in 0..2000 {
            let t = Instant::now();
            c.state(&other).await;
            s.0.push(t.elapsed());
        }
        s
    };
    let probe = patient_client(&bus.address).await;
    let adder = patient_client(&bus.address).await;
    let add = tokio::spawn(async move { add_luns(&adder, "host1", 100_000).await.1 });
    let mut during = Samples(Vec::new());
    while !add.is_finished() {
        let t = Instant::now();
        probe.state(&other).await;
        during.0.push(t.elapsed());
    }
    let took = add.await.expect("add");
    let mut idle = idle;
    idle.row("idle");
    during.row(&format!("during the Add ({:.2} s)", took.as_secs_f64()));
}

/// The bus floor: a minimal emitter on its own connection sends 100,000
/// InterfacesAdded signals shaped as devmgrd's (a LUN's 13 properties)
/// through the same kind of dbus-daemon, 512 per write as devmgrd does;
/// timed until a Ping after them returns (the bus has routed them all).
async fn floor() {
    println!("-- bus floor: 100,000 InterfacesAdded of a LUN's size from a minimal emitter");
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let c = Client::connect(&bus.address).await;
    let emitter = zbus::connection::Builder::address(bus.address.as_str())
        .build()
        .await
        .expect("emitter");
    let attributes: std::collections::HashMap<String, String> =
        [("scsi.host", "0"), ("scsi.lun", "12345")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
    let parent: OwnedObjectPath = proto::object_path(33_554_433).try_into().expect("path");
    let mut msgs = Vec::with_capacity(100_000);
    for i in 0..100_000u64 {
        let path: OwnedObjectPath = proto::object_path((i + 3) << 24 | 5)
            .try_into()
            .expect("path");
        let empty: Vec<proto::HolderTuple> = Vec::new();
        let props: std::collections::HashMap<&str, Variant<'_>> = [
            ("Attributes", Variant::from(attributes.clone())),
            ("Driver", Variant::from(parent.as_ref())),
            ("Holders", Variant::from(empty)),
            ("Id", Variant::from(i)),
            ("Kind", Variant::from("device")),
            ("LastError", Variant::from("")),
            ("Name", Variant::from(format!("0:0:0:{i}"))),
            ("Origin", Variant::from("api")),
            ("Parent", Variant::from(parent.as_ref())),
            ("RefCount", Variant::from(0u32)),
            ("State", Variant::from("live")),
            ("Subsystem", Variant::from("")),
            ("SysPath", Variant::from("")),
        ]
        .into_iter()
        .collect();
        let interfaces = std::collections::HashMap::from([(proto::OBJECT_INTERFACE, props)]);
        msgs.push(
            zbus::Message::signal(
                "/org/bench/Floor",
                "org.freedesktop.DBus.ObjectManager",
                "InterfacesAdded",
            )
            .build(&(path, interfaces))
            .expect("signal"),
        );
    }
    emit_timed(&emitter, &c, &msgs).await;
    // A removal of the host: per LUN, InterfacesRemoved and RemovalCompleted.
    println!("-- bus floor: a 100,000-LUN removal's 200,000 signals from a minimal emitter");
    let mut msgs = Vec::with_capacity(200_000);
    for i in 0..100_000u64 {
        let path: OwnedObjectPath = proto::object_path((i + 3) << 24 | 5)
            .try_into()
            .expect("path");
        let interfaces: &[&str] = &[proto::OBJECT_INTERFACE];
        msgs.push(
            zbus::Message::signal(
                "/org/bench/Floor",
                "org.freedesktop.DBus.ObjectManager",
                "InterfacesRemoved",
            )
            .build(&(&path, interfaces))
            .expect("signal"),
        );
        msgs.push(
            zbus::Message::signal(
                "/org/bench/Floor",
                proto::MANAGER_INTERFACE,
                "RemovalCompleted",
            )
            .build(&(&path, "device", format!("0:0:0:{i}")))
            .expect("signal"),
        );
    }
    emit_timed(&emitter, &c, &msgs).await;
}

/// Sends `msgs` from `emitter`, 512 per write as devmgrd writes them, and
/// prints how long until a Ping behind them returns (the bus has routed
/// them all).
async fn emit_timed(emitter: &zbus::Connection, c: &Client, msgs: &[zbus::Message]) {
    let bytes: usize = msgs.iter().map(|m| m.data().len()).sum();
    let t = Instant::now();
    for chunk in msgs.chunks(512) {
        emitter.send_all(chunk).await.expect("send");
    }
    let written = t.elapsed();
    ping(&Client {
        conn: emitter.clone(),
        manager: c.manager.clone(),
    })
    .await;
    println!(
        "{} signals ({:.1} MB): written in {:.2} s, routed by the bus in {:.2} s",
        msgs.len(),
        bytes as f64 / 1e6,
        written.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
}

fn main() {
    let wanted = bench_sections();
    let rt = bench_runtime();
    rt.block_on(async {
        if wanted("memory") {
            memory().await;
        }
        if wanted("devctl") {
            devctl().await;
        }
        if wanted("managed") {
            managed().await;
        }
        if wanted("publication") {
            publication().await;
        }
        if wanted("floor") {
            floor().await;
        }
    });
}
