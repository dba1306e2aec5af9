//! The version-1 contract from outside: real clients (busctl, gdbus, a zbus
//! client) against the real devmgrd on a private dbus-daemon — introspection,
//! calls, properties, GetManagedObjects, error names for bad input, and the
//! checked-in introspection XML.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use devmgr_tests::*;
use futures_util::StreamExt;
use zbus::{MatchRule, MessageStream};

#[test]
fn real_clients_drive_the_version_1_contract() {
    let bus = TestBus::start();
    let daemon = Daemon::start(&bus);
    let m = proto::MANAGER_PATH;

    // busctl tree and gdbus introspect see the manager and its interfaces.
    let tree = bus.busctl(&["tree", proto::BUS_NAME]);
    assert!(String::from_utf8_lossy(&tree.stdout).contains(m));
    let out = Command::new("gdbus")
        .args([
            "introspect",
            "--address",
            &bus.address,
            "-d",
            proto::BUS_NAME,
            "-o",
            m,
        ])
        .output()
        .expect("gdbus introspect");
    let xml = String::from_utf8_lossy(&out.stdout);
    assert!(
        xml.contains(MANAGER) && xml.contains("org.freedesktop.DBus.ObjectManager"),
        "{xml}"
    );

    // The sim-scsi driver exists from the start; a host bound to it scans LUNs.
    let sim = path_in(&bus.call(m, MANAGER, "FindObject", &["ss", "driver", "sim-scsi"]));
    let host = path_in(&bus.call(
        m,
        MANAGER,
        "Add",
        &[
            "ssoa{sv}", "host", "host0", "/", "2", "driver", "o", &sim, "luns", "u", "3",
        ],
    ));
    assert_eq!(bus.property(m, MANAGER, "ObjectCount"), "u 5");
    let lun = path_in(&bus.call(m, MANAGER, "FindObject", &["ss", "device", "0:0:0:1"]));
    assert_eq!(
        bus.property(&lun, OBJECT, "Parent"),
        format!("o \"{host}\"")
    );
    assert_eq!(
        bus.property(&host, OBJECT, "Driver"),
        format!("o \"{sim}\"")
    );
    let (ok, managed) = bus.gdbus_call(
        m,
        "org.freedesktop.DBus.ObjectManager.GetManagedObjects",
        &[],
    );
    assert!(
        ok && managed.contains(&lun) && managed.contains("'State': <'live'>"),
        "{managed}"
    );

    // Stop and re-enable change State.
    bus.call(&host, OBJECT, "Stop", &["a{sv}", "0"]);
    assert_eq!(bus.property(&host, OBJECT, "State"), "s \"stopped\"");
    bus.call(&host, OBJECT, "Reenable", &["a{sv}", "0"]);
    assert_eq!(bus.property(&host, OBJECT, "State"), "s \"live\"");

    // Errors and bad input: bad_input_gets_its_error_name_and_changes_nothing.
    assert_eq!(bus.property(m, MANAGER, "ObjectCount"), "u 5");

    // Removing the host cascades to its LUNs; a stale path is NotFound afterwards.
    let reply = bus.call(&host, OBJECT, "Remove", &["a{sv}", "0"]);
    assert_eq!(reply, "sao \"removed\" 0");
    assert_eq!(bus.property(m, MANAGER, "ObjectCount"), "u 1");
    let (ok, text) = bus.gdbus_call(&host, "org.devmgr.DevMgr1.Object.Remove", &["{}"]);
    assert!(!ok && text.contains("UnknownObject"), "{text}");

    // SIGTERM: the daemon drops its name and exits 0.
    let (status, stderr) = daemon.terminate();
    assert!(status.success(), "devmgrd exited with {status}: {stderr}");
    assert!(!bus.busctl(&["status", proto::BUS_NAME]).status.success());
}

/// The signals a client sees for one cascade, in order: objects appear
/// parents first and disappear children first, each removal completing once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_arrive_in_causal_order() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let conn = zbus::connection::Builder::address(bus.address.as_str())
        .build()
        .await
        .expect("client connection");
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(proto::BUS_NAME)
        .build()
        .expect("match rule");
    let mut signals = MessageStream::for_match_rule(rule, &conn, None)
        .await
        .expect("match rule");

    let manager = zbus::Proxy::new(&conn, proto::BUS_NAME, proto::MANAGER_PATH, MANAGER)
        .await
        .expect("manager proxy");
    let sim: zbus::OwnedObjectPath = manager
        .call("FindObject", &("driver", "sim-scsi"))
        .await
        .expect("find");
    let mut options = HashMap::<&str, zbus::Variant<'_>>::new();
    options.insert("driver", zbus::Variant::from(sim.as_ref()));
    options.insert("luns", zbus::Variant::from(2u32));
    let host: zbus::OwnedObjectPath = manager
        .call(
            "Add",
            &(
                "host",
                "host7",
                zbus::ObjectPath::from_static_str_unchecked("/"),
                options,
            ),
        )
        .await
        .expect("add");
    let object = zbus::Proxy::new(&conn, proto::BUS_NAME, host.as_str(), OBJECT)
        .await
        .expect("proxy");
    let (outcome, _): (String, Vec<zbus::OwnedObjectPath>) = object
        .call("Remove", &(HashMap::<&str, zbus::Variant<'_>>::new(),))
        .await
        .expect("remove");
    assert_eq!(outcome, "removed");

    // Collect until the host's RemovalCompleted.
    let mut seen: Vec<(String, String)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, signals.next()).await {
        let header = msg.header();
        let member = header.member().map(|m| m.to_string()).unwrap_or_default();
        let subject = match member.as_str() {
            "InterfacesAdded" => {
                type Interfaces = HashMap<String, HashMap<String, zbus::OwnedVariant>>;
                let (path, _): (zbus::OwnedObjectPath, Interfaces) =
                    msg.body().deserialize().expect("InterfacesAdded body");
                path.to_string()
            }
            "InterfacesRemoved" => {
                let (path, _): (zbus::OwnedObjectPath, Vec<String>) =
                    msg.body().deserialize().expect("InterfacesRemoved body");
                path.to_string()
            }
            "RemovalCompleted" => {
                let (path, _, _): (zbus::OwnedObjectPath, String, String) =
                    msg.body().deserialize().expect("body");
                path.to_string()
            }
            _ => continue,
        };
        let done = member == "RemovalCompleted" && subject == host.as_str();
        seen.push((member, subject));
        if done {
            break;
        }
    }
    let names: Vec<&str> = seen.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(
        names,
        [
            "InterfacesAdded",
            "InterfacesAdded",
            "InterfacesAdded",
            "InterfacesRemoved",
            "RemovalCompleted",
            "InterfacesRemoved",
            "RemovalCompleted",
            "InterfacesRemoved",
            "RemovalCompleted",
        ],
        "{seen:#?}"
    );
    assert_eq!(seen[0].1, host.as_str(), "the host appears before its LUNs");
    assert_eq!(
        seen[7].1,
        host.as_str(),
        "the host disappears after its LUNs"
    );
}

/// A 10 MB name travels through the bus and is refused by name, and the
/// daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_mb_name_is_refused_and_the_daemon_keeps_serving() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let conn = zbus::connection::Builder::address(bus.address.as_str())
        .build()
        .await
        .expect("client connection");
    let manager = zbus::Proxy::new(&conn, proto::BUS_NAME, proto::MANAGER_PATH, MANAGER)
        .await
        .expect("manager proxy");
    let huge = "x".repeat(10 << 20);
    let root = zbus::ObjectPath::from_static_str_unchecked("/");
    let result: Result<zbus::OwnedObjectPath, zbus::Error> = manager
        .call(
            "Add",
            &(
                "host",
                huge.as_str(),
                root.clone(),
                HashMap::<&str, zbus::Variant<'_>>::new(),
            ),
        )
        .await;
    match result {
        Err(zbus::Error::MethodError(name, _, _)) => {
            assert_eq!(name.as_str(), "org.devmgr.DevMgr1.Error.InvalidArgument")
        }
        other => panic!("a 10 MB name gave {other:?}"),
    }
    let count: u32 = manager
        .get_property("ObjectCount")
        .await
        .expect("ObjectCount");
    assert_eq!(count, 1, "only the sim-scsi driver");
    let ok: Result<zbus::OwnedObjectPath, zbus::Error> = manager
        .call(
            "Add",
            &(
                "host",
                "after",
                root,
                HashMap::<&str, zbus::Variant<'_>>::new(),
            ),
        )
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

/// The lines of one `<interface>` block, trimmed (indentation differs
/// between a nested introspection and the checked-in file).
fn interface_block(xml: &str, name: &str) -> Vec<String> {
    let start = xml
        .find(&format!("<interface name=\"{name}\">"))
        .unwrap_or_else(|| panic!("no interface {name} in:\n{xml}"));
    let end =
        start + xml[start..].find("</interface>").expect("closing tag") + "</interface>".len();
    xml[start..end]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_interfaces_match_the_checked_in_xml() {
    let checked_in = include_str!("../../data/org.devmgr.DevMgr1.xml");
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let client = Client::connect(&bus.address).await;
    let host = client.add_host("xml").await;
    let introspect = |path: String| {
        let conn = client.conn.clone();
        async move {
            let proxy = zbus::fdo::IntrospectableProxy::builder(&conn)
                .destination(proto::BUS_NAME)
                .path(path)
                .build()
                .await
                .expect("introspectable proxy");
            proxy.introspect().await.expect("Introspect")
        }
    };
    let manager_xml = introspect(proto::MANAGER_PATH.to_owned()).await;
    let object_xml = introspect(host.to_string()).await;
    for (served, name) in [(&manager_xml, MANAGER), (&object_xml, OBJECT)] {
        assert_eq!(
            interface_block(served, name),
            interface_block(checked_in, name),
            "the daemon's {name} differs from data/org.devmgr.DevMgr1.xml"
        );
    }
}

/// Bad input of every kind gets its exact error name, changes nothing
/// (no object, no signal), and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_error_name_and_changes_nothing() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let client = Client::connect(&bus.address).await;
    let mut log = SignalLog::new(&client.conn).await;
    let host = client.add_host("target").await;
    let gone = client.add_host("gone").await;
    client.remove(&gone, none()).await.expect("remove");
    let stopped = client.add_host("stopped").await;
    client
        .object(&stopped)
        .await
        .stop(none())
        .await
        .expect("stop");
    log.drain();
    let m = proto::MANAGER_PATH;
    let add = "org.devmgr.DevMgr1.Manager.Add";
    let remove = "org.devmgr.DevMgr1.Object.Remove";
    let find = "org.devmgr.DevMgr1.Manager.FindObject";
    let ours = |name: &str| format!("org.devmgr.DevMgr1.Error.{name}");
    let cases: Vec<(&str, &str, Vec<&str>, String)> = vec![
        // Unknown and stale object paths.
        (
            "/org/devmgr/DevMgr1/objects/999999",
            remove,
            vec!["{}"],
            "org.freedesktop.DBus.Error.UnknownObject".into(),
        ),
        (
            gone.as_str(),
            remove,
            vec!["{}"],
            "org.freedesktop.DBus.Error.UnknownObject".into(),
        ),
        (
            m,
            add,
            vec!["device", "d", gone.as_str(), "{}"],
            ours("NotFound"),
        ),
        (
            m,
            add,
            vec!["device", "d", "/not/ours", "{}"],
            ours("NotFound"),
        ),
        // Wrong signatures.
        (
            m,
            add,
            vec!["host", "h", "/"],
            "org.freedesktop.DBus.Error.InvalidArgs".into(),
        ),
        (
            host.as_str(),
            remove,
            vec!["{'force': <true>}", "extra"],
            "org.freedesktop.DBus.Error.InvalidArgs".into(),
        ),
        // Names.
        (m, add, vec!["host", "target", "/", "{}"], ours("NameInUse")),
        (m, find, vec!["host", "nope"], ours("NotFound")),
        (
            m,
            find,
            vec!["host"],
            "org.freedesktop.DBus.Error.InvalidArgs".into(),
        ),
        (m, add, vec!["host", "", "/", "{}"], ours("InvalidArgument")),
        (
            m,
            add,
            vec!["host", "a/b", "/", "{}"],
            ours("InvalidArgument"),
        ),
        (
            m,
            add,
            vec!["gizmo", "g", "/", "{}"],
            ours("InvalidArgument"),
        ),
        // Options: unknown keys, wrong types, bad values.
        (
            m,
            add,
            vec!["host", "h", "/", "{'colour': <'red'>}"],
            ours("InvalidArgument"),
        ),
        (
            m,
            add,
            vec!["host", "h", "/", "{'luns': <'many'>}"],
            ours("InvalidArgument"),
        ),
        (
            host.as_str(),
            remove,
            vec!["{'forse': <true>}"],
            ours("InvalidArgument"),
        ),
        (
            host.as_str(),
            remove,
            vec!["{'timeout-sec': <int32 -1>}"],
            ours("InvalidArgument"),
        ),
        (
            host.as_str(),
            remove,
            vec!["{'timeout-sec': <uint32 5>, 'on-timeout': <'explode'>}"],
            ours("InvalidArgument"),
        ),
        (
            host.as_str(),
            "org.devmgr.DevMgr1.Object.Acquire",
            vec!["why", "{'exclusive': <true>}"],
            ours("InvalidArgument"),
        ),
        // State.
        (
            stopped.as_str(),
            "org.devmgr.DevMgr1.Object.Acquire",
            vec!["late", "{}"],
            ours("InvalidState"),
        ),
        (
            host.as_str(),
            "org.devmgr.DevMgr1.Object.Bind",
            vec![host.as_str(), "{}"],
            ours("InvalidArgument"),
        ),
        (
            host.as_str(),
            "org.devmgr.DevMgr1.Object.Bind",
            vec![gone.as_str(), "{}"],
            ours("NotFound"),
        ),
    ];
    let mut wrong = Vec::new();
    for (path, method, args, name) in &cases {
        let (ok, text) = bus.gdbus_call(path, method, args);
        if ok || !text.contains(name.as_str()) {
            wrong.push(format!(
                "{method} {args:?} on {path}: expected {name}, got {text}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(
        log.drain(),
        Vec::<String>::new(),
        "bad input changed something"
    );
    assert_eq!(client.manager.object_count().await.expect("ObjectCount"), 3);
    // Still serving.
    client.add_host("after").await;
}
