//! The lifecycle rules of shared/DESIGN.md §2, end to end: the real devmgrd
//! on a private dbus-daemon, driven through the typed proxies, with every
//! D-Bus signal a client sees asserted line by line and in order.
//!
//! Rule 8 (kernel removal) needs real uevents: tests/udev*.rs covers it
//! with issue 5's udev ingestion; the engine's scenarios cover it meanwhile.

use std::collections::HashMap;

use devmgr_tests::*;
use futures_util::StreamExt;
use zbus::{OwnedObjectPath, Variant};

/// One daemon on its own bus, a client, and the signals it sees.
struct Fx {
    _bus: TestBus,
    _daemon: Daemon,
    c: Client,
    log: SignalLog,
    sim: OwnedObjectPath,
}

impl Fx {
    async fn new() -> Fx {
        let bus = TestBus::start();
        let daemon = Daemon::start(&bus);
        let c = Client::connect(&bus.address).await;
        let mut log = SignalLog::new(&c.conn).await;
        let sim = c.sim_scsi().await;
        log.label(&sim, "sim-scsi");
        Fx {
            _bus: bus,
            _daemon: daemon,
            c,
            log,
            sim,
        }
    }

    /// A host bound to sim-scsi with `luns` LUNs; returns it and its LUNs
    /// (named `<n>:0:0:<lun>`), with the signals of its creation checked.
    async fn scsi_host(
        &mut self,
        number: u32,
        luns: u32,
    ) -> (OwnedObjectPath, Vec<OwnedObjectPath>) {
        let name = format!("host{number}");
        let host = self
            .c
            .add(
                "host",
                &name,
                None,
                options(&[
                    ("driver", Variant::from(self.sim.as_ref())),
                    ("luns", Variant::from(luns)),
                ]),
            )
            .await;
        let mut paths = Vec::new();
        for lun in 0..luns {
            let path = self
                .c
                .manager
                .find_object("device", &format!("{number}:0:0:{lun}"))
                .await
                .expect("scanned LUN");
            paths.push(path);
        }
        let lines = self.log.drain();
        assert_eq!(lines[0], format!("+ {name}"));
        assert_eq!(lines[1], format!("{name}.Driver = sim-scsi"));
        assert_eq!(lines.len(), 3 + luns as usize, "{lines:#?}");
        (host, paths)
    }

    /// Drains the signals and compares them with `expected`.
    fn expect(&mut self, expected: &[&str]) {
        let lines = self.log.drain();
        assert_eq!(lines, expected, "signals differ");
    }

    /// Waits for `expected`'s last line; compares everything up to it.
    async fn expect_later(&mut self, expected: &[&str]) {
        let last = expected.last().expect("a line to wait for");
        let lines = self.log.until(last).await;
        assert_eq!(lines, expected, "signals differ");
    }
}

fn paths(list: &[&OwnedObjectPath]) -> Vec<OwnedObjectPath> {
    list.iter().map(|p| (*p).clone()).collect()
}

fn assert_error(result: Result<impl std::fmt::Debug, proto::Error>, name: &str) {
    match result {
        Err(e) => assert_eq!(
            error_name(&e),
            format!("org.devmgr.DevMgr1.Error.{name}"),
            "{e}"
        ),
        Ok(v) => panic!("expected {name}, got Ok({v:?})"),
    }
}

/// Rule 1: an idle object goes at once; a busy one is pending, lists what
/// holds it, and completes by itself when released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_1_remove_never_waits() {
    let mut fx = Fx::new().await;
    let idle = fx.c.add_host("idle").await;
    let busy = fx.c.add_host("busy").await;
    fx.log.drain();
    assert_eq!(
        fx.c.remove(&idle, none()).await.unwrap(),
        ("removed".into(), vec![])
    );
    fx.expect(&["- idle", "RemovalCompleted idle", "manager.ObjectCount = 2"]);

    let fd = fx.c.acquire(&busy).await;
    fx.expect(&["busy.Holders = [testing]", "busy.RefCount = 1"]);
    let reply = fx.c.remove(&busy, none()).await.unwrap();
    assert_eq!(reply, ("pending".into(), paths(&[&busy])));
    fx.expect(&[
        "busy.State = removing",
        "ReleaseRequested busy (busy)",
        "manager.PendingRemovals = 1",
    ]);
    drop(fd);
    fx.expect_later(&[
        "- busy",
        "RemovalCompleted busy",
        "manager.ObjectCount = 1",
        "manager.PendingRemovals = 0",
    ])
    .await;
}

/// Rule 2: stopped and removing objects refuse new references, children and
/// bindings; references already held keep working until released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_2_disabled_objects_refuse_new_users() {
    let mut fx = Fx::new().await;
    let stopped = fx.c.add_host("stopped").await;
    let removing = fx.c.add_host("removing").await;
    let _held = fx.c.acquire(&stopped).await;
    let held = fx.c.acquire(&removing).await;
    fx.c.object(&stopped).await.stop(none()).await.unwrap();
    fx.c.remove(&removing, none()).await.unwrap();
    fx.log.drain();
    for host in [&stopped, &removing] {
        let object = fx.c.object(host).await;
        assert_error(object.acquire("late", none()).await, "InvalidState");
        assert_error(object.bind(&fx.sim.as_ref(), none()).await, "InvalidState");
        let child =
            fx.c.manager
                .add("device", "child", &host.as_ref(), none())
                .await;
        assert_error(child, "InvalidState");
        assert_eq!(
            object.ref_count().await.unwrap(),
            1,
            "the held reference stays"
        );
    }
    // Refusals change nothing and say nothing.
    fx.expect(&[]);
    drop(held);
    fx.expect_later(&[
        "- removing",
        "RemovalCompleted removing",
        "manager.ObjectCount = 2",
        "manager.PendingRemovals = 0",
    ])
    .await;
}

/// Rule 3: a new reference needs the object and every ancestor live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_3_a_reference_needs_a_live_chain() {
    let mut fx = Fx::new().await;
    let (host, luns) = fx.scsi_host(3, 1).await;
    fx.c.object(&host).await.stop(none()).await.unwrap();
    fx.expect(&["host3.State = stopped"]);
    let lun = fx.c.object(&luns[0]).await;
    assert_eq!(lun.state().await.unwrap(), "live");
    assert_error(
        lun.acquire("under a stopped host", none()).await,
        "InvalidState",
    );
    fx.expect(&[]);
    fx.c.object(&host).await.reenable(none()).await.unwrap();
    fx.expect(&["host3.State = live"]);
    let _fd = fx.c.acquire(&luns[0]).await;
    fx.expect(&["3:0:0:0.Holders = [testing]", "3:0:0:0.RefCount = 1"]);
}

/// Rule 4: removal cascades bottom-up; idle descendants go at once, busy
/// ones become removing, the parent completes last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_4_removal_cascades_bottom_up() {
    let mut fx = Fx::new().await;
    let (host, luns) = fx.scsi_host(4, 3).await;
    let part = fx.c.add("device", "part1", Some(&luns[1]), none()).await;
    let fd = fx.c.acquire(&part).await;
    fx.log.drain();
    let (outcome, pending) = fx.c.remove(&host, none()).await.unwrap();
    assert_eq!(outcome, "pending");
    assert_eq!(pending, paths(&[&part, &luns[1], &host]));
    // Siblings go in the engine's (deterministic) order; every child before its parent.
    fx.expect(&[
        "- 4:0:0:2",
        "RemovalCompleted 4:0:0:2",
        "part1.State = removing",
        "ReleaseRequested part1 (host4)",
        "4:0:0:1.State = removing",
        "- 4:0:0:0",
        "RemovalCompleted 4:0:0:0",
        "host4.State = removing",
        "manager.ObjectCount = 4",
        "manager.PendingRemovals = 3",
    ]);
    drop(fd);
    fx.expect_later(&[
        "- part1",
        "RemovalCompleted part1",
        "- 4:0:0:1",
        "RemovalCompleted 4:0:0:1",
        "host4.Driver = /",
        "- host4",
        "RemovalCompleted host4",
        "manager.ObjectCount = 1",
        "manager.PendingRemovals = 0",
    ])
    .await;
}

/// Rule 5: removing a driver unbinds its idle objects at once; a busy bound
/// object refuses new references until it is idle, is then unbound and is
/// usable again; the driver completes last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_5_removing_a_driver_unbinds_when_idle() {
    let mut fx = Fx::new().await;
    let drv = fx.c.add("driver", "drv", None, none()).await;
    let bound = |d: &OwnedObjectPath| options(&[("driver", Variant::from(d.clone()))]);
    let idle = fx.c.add("host", "idle", None, bound(&drv)).await;
    let busy = fx.c.add("host", "busy", None, bound(&drv)).await;
    let fd = fx.c.acquire(&busy).await;
    fx.log.drain();
    let (outcome, pending) = fx.c.remove(&drv, none()).await.unwrap();
    assert_eq!(
        (outcome.as_str(), pending),
        ("pending", paths(&[&busy, &drv]))
    );
    fx.expect(&[
        "idle.Driver = /",
        "busy.State = stopped",
        "ReleaseRequested busy (drv)",
        "drv.State = removing",
        "manager.PendingRemovals = 1",
    ]);
    assert_error(
        fx.c.object(&busy).await.acquire("late", none()).await,
        "InvalidState",
    );
    drop(fd);
    fx.expect_later(&[
        "busy.Holders = []",
        "busy.RefCount = 0",
        "busy.State = live",
        "busy.Driver = /",
        "- drv",
        "RemovalCompleted drv",
        "manager.ObjectCount = 3",
        "manager.PendingRemovals = 0",
    ])
    .await;
    // Unbound, it stays and is usable again.
    let _again = fx.c.acquire(&busy).await;
    assert!(fx.c.exists(&idle).await);
}

/// Rule 6: re-enable cancels the pending removal and everything it caused,
/// but not what another request caused; removed objects stay removed; a
/// child cannot be re-enabled under a disabled parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_6_reenable_cancels_exactly_its_removal() {
    let mut fx = Fx::new().await;
    let (host, luns) = fx.scsi_host(6, 3).await;
    let _a = fx.c.acquire(&luns[0]).await;
    let _b = fx.c.acquire(&luns[1]).await;
    fx.log.drain();
    // LUN 1's own removal: a different request.
    let (outcome, _) = fx.c.remove(&luns[1], none()).await.unwrap();
    assert_eq!(outcome, "pending");
    fx.log.drain();
    fx.c.remove(&host, none()).await.unwrap();
    fx.expect(&[
        "- 6:0:0:2",
        "RemovalCompleted 6:0:0:2",
        "6:0:0:0.State = removing",
        "ReleaseRequested 6:0:0:0 (host6)",
        "host6.State = removing",
        "manager.ObjectCount = 4",
        "manager.PendingRemovals = 3",
    ]);
    // A child cannot come back under a disabled parent.
    assert_error(
        fx.c.object(&luns[0]).await.reenable(none()).await,
        "InvalidState",
    );
    fx.c.object(&host).await.reenable(none()).await.unwrap();
    fx.expect(&[
        "host6.State = live",
        "6:0:0:0.State = live",
        "manager.PendingRemovals = 1",
    ]);
    // LUN 1's own removal still waits on its holder.
    assert_eq!(fx.c.state(&luns[1]).await.as_deref(), Some("removing"));
    assert!(!fx.c.exists(&luns[2]).await, "a removed LUN stays removed");
    assert_error(
        fx.c.manager.find_object("device", "6:0:0:2").await,
        "NotFound",
    );
}

/// Rule 7: Stop on a removing object cancels the removal and leaves it
/// stopped; releasing its last reference then removes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_7_stop_cancels_a_pending_removal() {
    let mut fx = Fx::new().await;
    let host = fx.c.add_host("h").await;
    let fd = fx.c.acquire(&host).await;
    fx.c.remove(&host, none()).await.unwrap();
    fx.log.drain();
    fx.c.object(&host).await.stop(none()).await.unwrap();
    fx.expect(&["h.State = stopped", "manager.PendingRemovals = 0"]);
    drop(fd);
    fx.expect_later(&["h.Holders = []", "h.RefCount = 0"]).await;
    assert_eq!(fx.c.state(&host).await.as_deref(), Some("stopped"));
}

/// Rule 9: force revokes every reference in the affected set, closes the
/// holders' handles, and completes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_9_force_revokes_and_completes() {
    let mut fx = Fx::new().await;
    let (host, luns) = fx.scsi_host(9, 2).await;
    let first = fx.c.acquire(&luns[0]).await;
    let second = fx.c.acquire(&luns[0]).await;
    let on_host = fx.c.acquire(&host).await;
    fx.log.drain();
    let reply =
        fx.c.remove(&host, options(&[("force", Variant::from(true))]))
            .await
            .unwrap();
    assert_eq!(reply, ("removed".into(), vec![]));
    fx.expect(&[
        "- 9:0:0:1",
        "RemovalCompleted 9:0:0:1",
        "- 9:0:0:0",
        "RemovalCompleted 9:0:0:0",
        "host9.Driver = /",
        "- host9",
        "RemovalCompleted host9",
        "manager.ObjectCount = 1",
    ]);
    for fd in [first, second, on_host] {
        assert!(handle_closed_by_daemon(fd), "handle not closed");
    }
}

/// Rule 10: a pending removal with a deadline is revoked, or cancelled, by
/// the daemon when the deadline passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_10_deadlines_revoke_or_cancel() {
    let mut fx = Fx::new().await;
    let revoked = fx.c.add_host("revoked").await;
    let cancelled = fx.c.add_host("cancelled").await;
    let _r = fx.c.acquire(&revoked).await;
    let _c = fx.c.acquire(&cancelled).await;
    fx.log.drain();
    let deadline = |seconds: u32, on: &'static str| {
        options(&[
            ("timeout-sec", Variant::from(seconds)),
            ("on-timeout", Variant::from(on)),
        ])
    };
    // A second apart: two deadlines a few ms apart may or may not expire
    // in the same tick, which would make the signal sequence a race.
    fx.c.remove(&revoked, deadline(1, "revoke")).await.unwrap();
    fx.c.remove(&cancelled, deadline(2, "cancel"))
        .await
        .unwrap();
    fx.expect(&[
        "revoked.State = removing",
        "ReleaseRequested revoked (revoked)",
        "manager.PendingRemovals = 1",
        "cancelled.State = removing",
        "ReleaseRequested cancelled (cancelled)",
        "manager.PendingRemovals = 2",
    ]);
    fx.expect_later(&[
        "- revoked",
        "RemovalCompleted revoked",
        "manager.ObjectCount = 2",
        "manager.PendingRemovals = 1",
    ])
    .await;
    fx.expect_later(&["cancelled.State = live", "manager.PendingRemovals = 0"])
        .await;
    assert_eq!(fx.c.ref_count(&cancelled).await, Some(1));
}

/// Rule 11: holders are told when something they hold starts a pending
/// removal — here a second client, holding a LUN, watching its own object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_11_holders_are_asked_to_release() {
    let mut fx = Fx::new().await;
    let (host, luns) = fx.scsi_host(11, 1).await;
    let holder = Client::connect(&fx._bus.address).await;
    let lun = holder.object(&luns[0]).await;
    let mut asked = lun.receive_release_requested().await.unwrap();
    let fd = lun.acquire("holder", none()).await.unwrap();
    fx.c.remove(&host, none()).await.unwrap();
    let signal = tokio::time::timeout(std::time::Duration::from_secs(10), asked.next())
        .await
        .expect("ReleaseRequested within 10 s")
        .expect("signal");
    let why = signal.args().unwrap().why().to_string();
    assert_eq!(why, format!("removal of {host} is waiting"));
    // The cooperative holder lets go; the removal completes.
    fx.log.drain();
    drop(fd);
    fx.expect_later(&[
        "- 11:0:0:0",
        "RemovalCompleted 11:0:0:0",
        "host11.Driver = /",
        "- host11",
        "RemovalCompleted host11",
    ])
    .await;
}

/// Rule 12: nothing waits on another object. A driver action in flight and
/// a thousand pending removals leave unrelated commands alone: they touch
/// (and signal) only their own objects, and the slow action still
/// completes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_12_no_operation_waits_on_another() {
    let mut fx = Fx::new().await;
    let (big, luns) = fx.scsi_host(12, 1000).await;
    let mut fds = Vec::new();
    for lun in &luns {
        fds.push(fx.c.acquire(lun).await);
    }
    fx.c.remove(&big, none()).await.unwrap();
    let slow_attrs: HashMap<&str, &str> = [("sim.exit", "async")].into();
    let slow =
        fx.c.add(
            "host",
            "slow",
            None,
            options(&[
                ("driver", Variant::from(fx.sim.as_ref())),
                ("attributes", Variant::from(slow_attrs)),
            ]),
        )
        .await;
    fx.log.drain();
    let reply = fx.c.remove(&slow, none()).await.unwrap();
    assert_eq!(reply, ("pending".into(), paths(&[&slow])));
    // PendingRemovals counts objects: 1,000 LUNs, their host, and `slow`.
    fx.expect(&["slow.State = removing", "manager.PendingRemovals = 1002"]);

    let other = fx.c.add_host("other").await;
    fx.c.remove(&other, none()).await.unwrap();
    // The slow action may finish before or after `other` comes and goes
    // (the machine is shared): check each object's own signals, in order.
    let lines = fx.log.until("RemovalCompleted slow").await;
    let about = |name: &str| -> Vec<&str> {
        lines
            .iter()
            .map(String::as_str)
            .filter(|l| l.split([' ', '.']).any(|w| w == name))
            .collect()
    };
    assert_eq!(
        about("other"),
        ["+ other", "- other", "RemovalCompleted other"]
    );
    assert_eq!(
        about("slow"),
        ["slow.Driver = /", "- slow", "RemovalCompleted slow"]
    );
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("manager.") || l.contains("other") || l.contains("slow")),
        "unrelated objects were touched: {lines:#?}"
    );
    assert_eq!(fx.c.manager.pending_removals().await.unwrap(), 1001);
    drop(fds);
}

/// Rule 13: identity is never reused; a stale path never names a new object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_13_identity_is_never_reused() {
    let mut fx = Fx::new().await;
    let first = fx.c.add_host("same").await;
    let first_id = fx.c.object(&first).await.id().await.unwrap();
    fx.c.remove(&first, none()).await.unwrap();
    let second = fx.c.add_host("same").await;
    assert_ne!(first, second);
    assert!(fx.c.object(&second).await.id().await.unwrap() > first_id);
    assert_eq!(
        fx.c.manager.find_object("host", "same").await.unwrap(),
        second
    );
    assert_eq!(
        second.as_str(),
        proto::object_path(fx.c.object(&second).await.id().await.unwrap())
    );
    // The stale path answers as an unknown object, never as the new one.
    let stale = fx.c.object(&first).await.state().await;
    assert!(
        matches!(&stale, Err(zbus::Error::FDO(e)) if matches!(**e, zbus::fdo::Error::UnknownObject(_))),
        "{stale:?}"
    );
    fx.log.drain();
}

/// Rule 14: every transition emits exactly one event, children before
/// parents: a three-level tree disappears leaf first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_14_one_signal_per_transition_in_causal_order() {
    let mut fx = Fx::new().await;
    let host = fx.c.add_host("top").await;
    let disk = fx.c.add("device", "disk", Some(&host), none()).await;
    let _part = fx.c.add("device", "disk-part1", Some(&disk), none()).await;
    fx.expect(&[
        "+ top",
        "manager.ObjectCount = 2",
        "+ disk",
        "manager.ObjectCount = 3",
        "+ disk-part1",
        "manager.ObjectCount = 4",
    ]);
    fx.c.object(&host).await.stop(none()).await.unwrap();
    fx.c.object(&host).await.reenable(none()).await.unwrap();
    fx.c.remove(&host, none()).await.unwrap();
    fx.expect(&[
        "top.State = stopped",
        "top.State = live",
        "- disk-part1",
        "RemovalCompleted disk-part1",
        "- disk",
        "RemovalCompleted disk",
        "- top",
        "RemovalCompleted top",
        "manager.ObjectCount = 1",
    ]);
}

/// Rule 15: every reference names its holder — bus name, uid and pid from
/// the bus's credentials, the reason given, and since when.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_15_every_reference_names_its_holder() {
    let fx = Fx::new().await;
    let host = fx.c.add_host("named").await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let object = fx.c.object(&host).await;
    let _fd = object.acquire("backup job 42", none()).await.unwrap();
    let holders = object.holders().await.unwrap();
    assert_eq!(holders.len(), 1);
    let (id, bus_name, uid, pid, reason, since) = holders[0].clone();
    assert!(id > 0);
    assert_eq!(bus_name, fx.c.conn.unique_name().unwrap().to_string());
    // Our uid as the kernel reports it (what the bus's credentials carry).
    let my_uid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    assert_eq!(uid, my_uid);
    assert_eq!(pid, std::process::id());
    assert_eq!(reason, "backup job 42");
    assert!(
        since >= before,
        "since {since} is before the call ({before})"
    );
}

/// Rule 16: operations whose target state already holds give the same
/// answer and emit nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_16_repeats_are_idempotent() {
    let mut fx = Fx::new().await;
    let stopped = fx.c.add_host("stopped").await;
    let removing = fx.c.add_host("removing").await;
    let _fd = fx.c.acquire(&removing).await;
    fx.c.object(&stopped).await.stop(none()).await.unwrap();
    let first = fx.c.remove(&removing, none()).await.unwrap();
    fx.log.drain();
    fx.c.object(&stopped).await.stop(none()).await.unwrap();
    assert_eq!(fx.c.remove(&removing, none()).await.unwrap(), first);
    fx.expect(&[]);
    let live = fx.c.add_host("live").await;
    fx.log.drain();
    fx.c.object(&live).await.reenable(none()).await.unwrap();
    fx.expect(&[]);
}
