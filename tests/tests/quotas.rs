//! Object quotas (issue 6): how many objects one client may have added, and
//! how many the model holds when a client adds more. Excess gets
//! QuotaExceeded, changes nothing, is logged once per client, and there is
//! room again once objects go. (The per-client reference quota is tested
//! with the other reference tests.)

use devmgr_tests::*;
use zbus::Variant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_quotas_are_reached_and_recovered_from() {
    object_quotas(&[
        "--no-udev",
        "--max-objects-per-client",
        "2",
        "--max-objects",
        "10",
    ])
    .await;
}

/// The same quotas from the configuration file (issue 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_quotas_from_the_configuration_file() {
    let (_dir, config) = config_file(
        "quota-config",
        "udev = false\nmax-objects-per-client = 2\nmax-objects = 10\n",
    );
    object_quotas(&["--config", &config]).await;
}

/// Each client may have added 2 objects that still exist, and the model
/// may hold 10 when a client adds more (as `args` say).
async fn object_quotas(args: &[&str]) {
    let bus = TestBus::start();
    let daemon = Daemon::start_with_args(&bus, args);
    let a = Client::connect(&bus.address).await;
    let b = Client::connect(&bus.address).await;
    let first = a.add_host("a1").await;
    a.add_host("a2").await;
    let quota = "org.devmgr.DevMgr1.Error.QuotaExceeded";
    for _ in 0..3 {
        let refused = a
            .manager
            .add("host", "a3", &root(), none())
            .await
            .expect_err("past the per-client quota");
        assert_eq!(error_name(&refused), quota);
    }
    assert!(
        a.manager.find_object("host", "a3").await.is_err(),
        "nothing added"
    );
    b.add_host("b1").await;

    // Room again once one of a's objects goes (whoever removes it).
    let (outcome, _) = b.remove(&first, none()).await.expect("remove");
    assert_eq!(outcome, "removed");
    a.add_host("a3").await;

    // The global cap counts what a driver's scan would add: the sim-scsi
    // driver and 3 hosts are 4 objects; a host with 6 LUNs would make 11.
    let sim = b.sim_scsi().await;
    let refused = b
        .manager
        .add(
            "host",
            "big",
            &root(),
            options(&[
                ("driver", Variant::from(sim.as_ref())),
                ("luns", Variant::from(6u32)),
            ]),
        )
        .await
        .expect_err("past the global cap");
    assert_eq!(error_name(&refused), quota);
    assert!(b.manager.find_object("host", "big").await.is_err());

    let (_, log) = daemon.terminate();
    let a_name = a.conn.unique_name().expect("unique name").to_string();
    assert_eq!(
        log.matches(&format!("{a_name}: this client has added"))
            .count(),
        1,
        "logged once per client:\n{log}"
    );
}

/// Acquires on device `argv[2]` until refused, as whoever runs it, over
/// `argv[3]` connections in turn; prints how many it got, then the error.
const ACQUIRE_UNTIL_REFUSED: &str = r#"import dbus, sys
conns = [dbus.bus.BusConnection(sys.argv[1]) for _ in range(int(sys.argv[3]))]
held, n = [], 0
while True:
    bus = conns[n % len(conns)]
    m = dbus.Interface(bus.get_object("org.devmgr.DevMgr1", "/org/devmgr/DevMgr1", introspect=False),
                       "org.devmgr.DevMgr1.Manager")
    o = bus.get_object("org.devmgr.DevMgr1", m.FindObject("device", sys.argv[2]), introspect=False)
    try:
        held.append(o.Acquire("take", dbus.Dictionary({}, signature="sv"),
                              dbus_interface="org.devmgr.DevMgr1.Object"))
        n += 1
    except dbus.exceptions.DBusException as e:
        print(n)
        print(e.get_dbus_name())
        print(e.get_dbus_message())
        sys.stdout.flush()
        break
sys.stdin.read()
"#;

/// Each reference costs devmgrd a file descriptor. With its open-files
/// limit lowered to 5,632, it holds at most 512 (5,120 are kept for its own
/// work) and one user at most a quarter of that, over any number of
/// connections (root aside): one user cannot take what every user needs, and when the
/// capacity is reached the refusal is QuotaExceeded, never Failed, and
/// devmgrd keeps serving.
#[test]
fn references_are_limited_per_user_and_in_all_by_the_descriptors_left() {
    use devmgr_tests::system_bus::SystemBus;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let bus = SystemBus::start();
    let _daemon = Daemon::start_at_wrapped(
        &bus.address,
        &["prlimit", "--nofile=5632:5632", "--"],
        &["--no-udev"],
    );
    bench_runtime().block_on(async {
        Client::connect(&bus.address)
            .await
            .add_sim_host("host0", 2)
            .await;
    });
    // A holder that keeps what it got until its stdin closes.
    let hold = |user: Option<&str>, conns: &str| {
        let mut command = match user {
            Some(user) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={user}"),
                    "--regid=nogroup",
                    "--clear-groups",
                    "--",
                ]);
                c.arg("/usr/bin/python3");
                c
            }
            None => Command::new("/usr/bin/python3"),
        };
        let mut child = command
            .args(["-c", ACQUIRE_UNTIL_REFUSED, &bus.address, "0:0:0:1", conns])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut lines = Vec::new();
        for _ in 0..3 {
            let mut line = String::new();
            out.read_line(&mut line).expect("a line");
            lines.push(line.trim().to_owned());
        }
        (child, lines)
    };
    // nobody, over 8 connections: a quarter of 512.
    let refused = |said: &[String], got: &str, why: &str| {
        assert_eq!(said[0], got, "{said:?}");
        assert_eq!(
            said[1], "org.devmgr.DevMgr1.Error.QuotaExceeded",
            "{said:?}"
        );
        assert!(said[2].contains(why), "{said:?}");
    };
    let (mut nobody, said) = hold(Some("nobody"), "8");
    refused(
        &said,
        "128",
        "uid 65534 holds 128 references; the limit per user is 128",
    );
    // Other users still get their share; root is held only to the limit
    // in all, and takes what is left; then nobody gets any, and the
    // refusal names why.
    let (mut daemon_user, said) = hold(Some("daemon"), "2");
    assert_eq!(said[0], "128", "{said:?}");
    let (mut bin_user, said) = hold(Some("bin"), "2");
    assert_eq!(said[0], "128", "{said:?}");
    let (mut root, said) = hold(None, "8");
    refused(
        &said,
        "128",
        "512 references are held; the daemon takes no more",
    );
    let (mut sys_user, said) = hold(Some("sys"), "2");
    refused(
        &said,
        "0",
        "512 references are held; the daemon takes no more",
    );
    // devmgrd serves on: a read and a change.
    let references = || {
        let out = busctl_at(
            &bus.address,
            &[
                "get-property",
                proto::BUS_NAME,
                proto::MANAGER_PATH,
                proto::MANAGER_INTERFACE,
                "ReferenceCount",
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(references(), "u 512");
    let out = busctl_at(
        &bus.address,
        &[
            "call",
            proto::BUS_NAME,
            proto::MANAGER_PATH,
            proto::MANAGER_INTERFACE,
            "Add",
            "ssoa{sv}",
            "host",
            "after",
            "/",
            "0",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // One holder lets go: there is room again.
    for child in [&mut sys_user, &mut bin_user] {
        drop(child.stdin.take());
        let _ = child.wait();
    }
    wait_for(|| references() == "u 384", "bin's references to go");
    let (mut again, said) = hold(Some("sys"), "1");
    assert_eq!(said[0], "128", "{said:?}");
    for child in [&mut nobody, &mut root, &mut daemon_user, &mut again] {
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"");
        }
        let _ = child.wait();
    }
}
