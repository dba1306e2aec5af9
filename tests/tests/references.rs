//! fd-held references end to end: a reference lives while any copy of its
//! handle is open, dies with its holder (even SIGKILLed), and force or a
//! revoke deadline closes the holder's handle. How fast a release lands is
//! printed here and measured by the benchmarks, never asserted (the machines
//! are shared and noisy).

use std::process::Stdio;
use std::time::Duration;

use devmgr_tests::*;
use zbus::Variant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fd_reference_lives_while_any_copy_is_open() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let client = Client::connect(&bus.address).await;
    let host = client.add_host("held").await;
    let fd = client.acquire(&host).await;
    assert_eq!(client.ref_count(&host).await, Some(1));

    // Holders come from the bus's credentials: our unique name, uid and pid.
    let object = client.object(&host).await;
    let holders = object.holders().await.expect("Holders");
    let unique = client.conn.unique_name().expect("unique name").to_string();
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].1, unique);
    assert_eq!(holders[0].3, std::process::id());
    assert_eq!(holders[0].4, "testing");

    // A dup keeps the reference when the original closes. Nothing can show
    // that a release will never come; 200 ms is ample for a wrong one.
    let dup = fd.try_clone().expect("dup");
    drop(fd);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        client.ref_count(&host).await,
        Some(1),
        "closing one copy released the reference"
    );

    // Busy: the removal is pending, with the object listed.
    let (outcome, pending) = client.remove(&host, none()).await.expect("remove");
    assert_eq!((outcome.as_str(), pending), ("pending", vec![host.clone()]));

    // Closing the last copy releases it and the removal completes.
    drop(dup);
    let took = within(Duration::from_secs(5), || async {
        !client.exists(&host).await
    })
    .await;
    let took = took.expect("the removal did not complete after the last copy closed");
    eprintln!("release → removal completed in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_releases_its_reference() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let client = Client::connect(&bus.address).await;
    let host = client.add_host("victim").await;
    // A separate process (python-dbus) holds the reference and then waits.
    let script = format!(
        r#"import dbus, sys, time
bus = dbus.bus.BusConnection("{}")
obj = bus.get_object("{}", "{}")
fd = obj.Acquire("python holder", dbus.Dictionary({{}}, signature="sv"), dbus_interface="{}")
print("held", flush=True)
time.sleep(60)
"#,
        bus.address,
        proto::BUS_NAME,
        host.as_str(),
        OBJECT
    );
    let mut holder = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with dbus-python (package python3-dbus)");
    let acquired = within(Duration::from_secs(10), || async {
        client.ref_count(&host).await == Some(1)
    })
    .await;
    assert!(acquired.is_some(), "the python holder never acquired");
    let holders = client.object(&host).await.holders().await.expect("Holders");
    assert_eq!(holders[0].3, holder.id(), "the holder's pid, from the bus");
    assert_eq!(holders[0].4, "python holder");
    let (outcome, _) = client.remove(&host, none()).await.expect("remove");
    assert_eq!(outcome, "pending");

    holder.kill().expect("SIGKILL the holder");
    let _ = holder.wait();
    let took = within(Duration::from_secs(5), || async {
        !client.exists(&host).await
    })
    .await;
    let took = took.expect("the killed holder's reference was not released");
    eprintln!("SIGKILL → removal completed in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_and_a_revoke_deadline_close_the_holders_handle() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let client = Client::connect(&bus.address).await;

    // Force: the removal completes at once and the holder reads EOF.
    let host = client.add_host("forced").await;
    let fd = client.acquire(&host).await;
    let force = options(&[("force", Variant::from(true))]);
    let (outcome, _) = client.remove(&host, force).await.expect("force remove");
    assert_eq!(outcome, "removed");
    assert!(
        handle_closed_by_daemon(fd),
        "the revoked handle is not at EOF"
    );

    // A deadline with on-timeout=revoke: pending first, gone after 1 s.
    let host = client.add_host("deadline").await;
    let fd = client.acquire(&host).await;
    let revoke = options(&[
        ("timeout-sec", Variant::from(1u32)),
        ("on-timeout", Variant::from("revoke")),
    ]);
    let (outcome, _) = client.remove(&host, revoke).await.expect("remove");
    assert_eq!(outcome, "pending");
    assert!(
        handle_closed_by_daemon(fd),
        "the deadline never revoked the handle"
    );
    let gone = within(Duration::from_secs(5), || async {
        !client.exists(&host).await
    })
    .await;
    assert!(gone.is_some(), "the deadline never completed the removal");

    // A deadline with on-timeout=cancel: back to live, reference kept.
    let host = client.add_host("cancelled").await;
    let _fd = client.acquire(&host).await;
    let cancel = options(&[
        ("timeout-sec", Variant::from(1u32)),
        ("on-timeout", Variant::from("cancel")),
    ]);
    client.remove(&host, cancel).await.expect("remove");
    let live = within(Duration::from_secs(5), || async {
        client.state(&host).await.as_deref() == Some("live")
    })
    .await;
    assert!(live.is_some(), "the cancel deadline never brought it back");
    assert_eq!(client.ref_count(&host).await, Some(1));
}

/// Every reference is an open pipe in the daemon: started with a soft
/// open-files limit of 1,024 (the usual default under systemd), it raises
/// it to the hard limit instead of refusing references past a thousand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_references_than_the_default_soft_fd_limit() {
    let bus = TestBus::start();
    let daemon = Daemon::start_wrapped(&bus, &["prlimit", "--nofile=1024:16384", "--"]);
    let client = Client::connect(&bus.address).await;
    let host = client.add_host("popular").await;
    let object = client.object(&host).await;
    let mut fds = Vec::new();
    for _ in 0..1_500 {
        fds.push(object.acquire("many", none()).await.expect("acquire"));
    }
    assert_eq!(client.ref_count(&host).await, Some(1_500));
    drop(fds);
    drop(daemon);
}

/// The daemon asks the bus for a caller's credentials once per connection
/// and must forget them when the connection leaves, or every client that
/// ever held a reference would stay in memory. Nothing on the bus shows the
/// cache, so the test reads the daemon's debug log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_callers_credentials_are_forgotten() {
    let bus = TestBus::start();
    let daemon = Daemon::start_wrapped(&bus, &["env", "RUST_LOG=devmgrd=debug"]);
    let setup = Client::connect(&bus.address).await;
    let host = setup.add_host("visited").await;
    let mut names = Vec::new();
    for _ in 0..3 {
        let visitor = Client::connect(&bus.address).await;
        drop(visitor.acquire(&host).await);
        names.push(visitor.conn.unique_name().expect("unique name").to_string());
        // Dropping the last handle on the connection closes it.
    }
    for name in &names {
        daemon.wait_for_log(&format!("forgot the credentials of {name},"));
    }
    // The setup client was looked up too (Add is authorized by who calls);
    // once it leaves, nobody is left in the cache.
    let setup_name = setup.conn.unique_name().expect("unique name").to_string();
    drop(setup);
    daemon.wait_for_log(&format!(
        "forgot the credentials of {setup_name}, which left the bus (0 callers known)"
    ));
}

/// The pump groups concurrent calls and sends each object's Holders and
/// RefCount once per group: whatever it skips, the last value a watcher
/// sees must be the real one, and every reply must follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_churn_ends_on_the_true_ref_count() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let watcher = Client::connect(&bus.address).await;
    let mut log = SignalLog::new(&watcher.conn).await;
    let host = watcher.add_host("churn").await;
    let last_ref_count = |lines: &[String]| {
        lines
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("churn.RefCount = "))
            .map(str::to_owned)
    };
    // 8 clients, each taking 100 references as fast as it can.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let address = bus.address.clone();
        let host = host.clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(&address).await;
            let mut fds = Vec::new();
            for _ in 0..100 {
                fds.push(client.acquire(&host).await);
            }
            (client, fds)
        }));
    }
    let mut held = Vec::new();
    for task in tasks {
        held.push(task.await.expect("client task"));
    }
    // Every Acquire has been answered, so its signal came first; the
    // watcher's own Get below orders after them on its connection.
    assert_eq!(watcher.ref_count(&host).await, Some(800));
    assert_eq!(last_ref_count(&log.drain()).as_deref(), Some("800"));

    drop(held);
    let released = within(Duration::from_secs(10), || async {
        watcher.ref_count(&host).await == Some(0)
    })
    .await;
    assert!(released.is_some(), "not every reference was released");
    assert_eq!(last_ref_count(&log.drain()).as_deref(), Some("0"));
}

/// Quotas (issue 6): one client may hold at most N references (here 3);
/// the next Acquire gets QuotaExceeded, changes nothing, and is logged once
/// however often it repeats; other clients are not affected; letting go of
/// one makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_reference_quota_is_reached_and_recovered_from() {
    reference_quota_of_3(&["--no-udev", "--max-references-per-client", "3"]).await;
}

/// The same quota from the configuration file, and a flag that overrides
/// the file's (issue 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_quota_from_the_configuration_file_and_over_it() {
    let quota = |n: u32| format!("udev = false\nmax-references-per-client = {n}\n");
    let (_three_dir, three) = config_file("reference-quota-3", &quota(3));
    reference_quota_of_3(&["--config", &three]).await;
    let (_one_dir, one) = config_file("reference-quota-1", &quota(1));
    reference_quota_of_3(&["--config", &one, "--max-references-per-client", "3"]).await;
}

async fn reference_quota_of_3(args: &[&str]) {
    let bus = TestBus::start();
    let daemon = Daemon::start_with_args(&bus, args);
    let greedy = Client::connect(&bus.address).await;
    let other = Client::connect(&bus.address).await;
    let host = greedy.add_host("scarce").await;
    let object = greedy.object(&host).await;
    let mut fds = Vec::new();
    for _ in 0..3 {
        fds.push(
            object
                .acquire("mine", none())
                .await
                .expect("within the quota"),
        );
    }
    for _ in 0..5 {
        let refused = object
            .acquire("one more", none())
            .await
            .expect_err("refused");
        assert_eq!(
            error_name(&refused),
            "org.devmgr.DevMgr1.Error.QuotaExceeded"
        );
    }
    assert_eq!(
        greedy.ref_count(&host).await,
        Some(3),
        "a refusal changes nothing"
    );
    let _theirs = other.acquire(&host).await;
    assert_eq!(
        greedy.ref_count(&host).await,
        Some(4),
        "another client is not limited"
    );

    drop(fds.pop());
    let room = within(std::time::Duration::from_secs(10), || async {
        greedy.ref_count(&host).await == Some(3)
    })
    .await;
    assert!(room.is_some(), "the released reference never went");
    fds.push(object.acquire("again", none()).await.expect("room again"));

    let (_, log) = daemon.terminate();
    assert_eq!(
        log.matches("further refusals for it are not logged")
            .count(),
        1,
        "logged once, not per call:\n{log}"
    );
}
