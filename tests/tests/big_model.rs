//! Big models (issue 13): on a private system-type bus with the shipped
//! policy, an unprivileged client cannot make devmgrd send a message the
//! bus refuses (which would disconnect it and drop every reference) —
//! GetManagedObjects, Introspect, Holders in Get/GetAll/PropertiesChanged,
//! ListObjects — and devctl's status, list and tree stay usable at 160k
//! objects; the paged listing returns every object once while the model
//! changes, and refuses bad queries without changing anything.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use devmgr_tests::system_bus::{as_nobody, data_policy, SystemBus};
use devmgr_tests::*;
use zbus::{OwnedObjectPath, Variant};

/// Calls GetManagedObjects, Introspect of the objects node, Acquire of N
/// references with 1 KiB reasons on one device, GetAll and Get of its
/// Holders, and ListObjects to the end, as whoever runs it; prints one
/// line per result.
const UNPRIVILEGED: &str = r#"import dbus, sys
bus = dbus.bus.BusConnection(sys.argv[1])
D = "org.devmgr.DevMgr1"
M = "/org/devmgr/DevMgr1"
OBJ = "org.devmgr.DevMgr1.Object"
PROPS = "org.freedesktop.DBus.Properties"
mgr = bus.get_object(D, M, introspect=False)
manager = dbus.Interface(mgr, "org.devmgr.DevMgr1.Manager")
try:
    mgr.GetManagedObjects(dbus_interface="org.freedesktop.DBus.ObjectManager")
    print("GetManagedObjects ok")
except dbus.exceptions.DBusException as e:
    print("GetManagedObjects", e.get_dbus_name())
xml = bus.get_object(D, M + "/objects", introspect=False).Introspect(
    dbus_interface="org.freedesktop.DBus.Introspectable")
print("objects-node", "unlisted" if "use org.devmgr.DevMgr1.Manager.ListObjects" in xml else "listed")
lun = bus.get_object(D, manager.FindObject("device", sys.argv[2]), introspect=False)
held = []
for i in range(int(sys.argv[3])):
    held.append(lun.Acquire("r%05d " % i + "x" * 1000, dbus.Dictionary({}, signature="sv"),
                            dbus_interface=OBJ))
props = lun.GetAll(OBJ, dbus_interface=PROPS)
print("GetAll", int(props["RefCount"]), len(props["Holders"]))
print("Get", len(lun.Get(OBJ, "Holders", dbus_interface=PROPS)))
cursor, listed = "", 0
while True:
    query = dbus.Dictionary({"cursor": cursor, "limit": dbus.UInt32(10000)}, signature="sv")
    page, cursor = manager.ListObjects(query)
    listed += len(page)
    if cursor == "":
        break
print("ListObjects", listed)
"#;

/// A bus whose largest message is `bytes` (and devmgrd told so).
fn limits_file(dir: &TempDir, bytes: usize) -> std::path::PathBuf {
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let path = dir.0.join("limits.conf");
    std::fs::write(
        &path,
        format!(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\"\n \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n\
             <busconfig><limit name=\"max_message_size\">{bytes}</limit></busconfig>\n"
        ),
    )
    .expect("limits file");
    path
}

fn add_luns(address: &str, luns: u32) {
    bench_runtime().block_on(async {
        Client::connect(address)
            .await
            .add_sim_host("host0", luns)
            .await;
    });
}

/// Runs [`UNPRIVILEGED`] as nobody on device `lun` with `references`;
/// checks what every size of model must say, returns every line.
fn unprivileged(address: &str, lun: &str, references: &str) -> Vec<String> {
    let out = as_nobody(
        "/usr/bin/python3",
        &["-c", UNPRIVILEGED, address, lun, references],
    );
    let said = lines(&out);
    assert!(
        out.status.success(),
        "{said:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        said[0],
        "GetManagedObjects org.freedesktop.DBus.Error.LimitsExceeded"
    );
    assert_eq!(said[1], "objects-node unlisted");
    said
}

/// devmgrd still owns its name and answers, and never logged losing the bus.
fn still_serving(address: &str, daemon: &mut Daemon) {
    assert!(
        daemon.child.try_wait().expect("wait").is_none(),
        "devmgrd exited: {}",
        daemon.log()
    );
    let out = busctl_at(
        address,
        &[
            "get-property",
            proto::BUS_NAME,
            proto::MANAGER_PATH,
            proto::MANAGER_INTERFACE,
            "ObjectCount",
        ],
    );
    assert!(
        out.status.success(),
        "devmgrd does not answer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = daemon.log();
    assert!(!log.contains("lost"), "{log}");
    assert!(!log.contains("not sending"), "{log}");
}

fn lines(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn an_unprivileged_client_cannot_make_devmgrd_send_more_than_the_bus_takes() {
    // A 2 MiB bus: 8,000 LUNs take ~5 MB described in one message, the
    // objects node's child list would take an eighth of it, and 400
    // references with 1 KiB reasons ~430 KB: every kind of message that
    // grows, past its budget, with small numbers.
    let dir = TempDir::unique("big-limits");
    let limits = limits_file(&dir, 2 * 1024 * 1024);
    let bus = SystemBus::start_with(&[&data_policy(), &limits], None);
    let mut daemon = Daemon::start_at(
        &bus.address,
        &["--no-udev", "--max-message-size", "2097152"],
    );
    add_luns(&bus.address, 8000);
    let rt = bench_runtime();
    let (client, lun) = rt.block_on(async {
        let client = Client::connect(&bus.address).await;
        let lun = client
            .manager
            .find_object("device", "0:0:0:77")
            .await
            .expect("a LUN");
        (client, lun)
    });
    // Every PropertiesChanged of the LUN, as a client sees them.
    let changes = rt.block_on(SignalLog::new(&client.conn));

    let said = unprivileged(&bus.address, "0:0:0:77", "400");
    // Holders lists what fits in an eighth of the limit (256 KiB: about
    // 240 references of 1 KiB), RefCount counts all 400.
    let getall: Vec<usize> = said[2]
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().expect("a number"))
        .collect();
    assert_eq!(getall[0], 400, "{said:?}");
    assert!(getall[1] > 100 && getall[1] < 400, "{said:?}");
    assert_eq!(said[3], format!("Get {}", getall[1]));
    assert_eq!(said[4], "ListObjects 8002");
    // The holder exited: its references went; devmgrd is still there.
    rt.block_on(eventually("the references to go", || async {
        client.ref_count(&lun).await == Some(0)
    }));
    still_serving(&bus.address, &mut daemon);
    // Every Holders change was published (each within the budget): the
    // reads above came after them, on the same connection.
    let mut log = changes;
    let seen = log.drain();
    assert!(
        seen.iter().any(|l| l.ends_with(".RefCount = 400")),
        "{:?}",
        &seen[seen.len().saturating_sub(5)..]
    );
    assert!(
        seen.last().is_some_and(|l| l.ends_with(".RefCount = 0")),
        "{:?}",
        seen.last()
    );
}

#[test]
fn at_160k_objects_nobody_gets_limits_exceeded_and_devctl_still_works() {
    // The stock system bus: 32 MiB, about 50,000 objects in one message.
    let bus = SystemBus::start();
    let mut daemon = Daemon::start_at(&bus.address, &["--no-udev"]);
    add_luns(&bus.address, 160_000);
    let said = unprivileged(&bus.address, "0:0:0:159999", "3");
    assert_eq!(said[2], "GetAll 3 3");
    assert_eq!(said[4], "ListObjects 160002");

    let devctl = binary("devctl");
    let devctl = devctl.to_str().expect("a UTF-8 path");
    let run = |args: &[&str]| {
        let mut all = vec!["--address", bus.address.as_str()];
        all.extend_from_slice(args);
        let out = as_nobody(devctl, &all);
        assert!(
            out.status.success(),
            "devctl {args:?} as nobody: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lines(&out)
    };
    let status = run(&["status"]);
    assert!(
        status
            .iter()
            .any(|l| l == "objects      160002 (160000 device, 1 driver, 1 host)"),
        "{status:?}"
    );
    let list = run(&["list"]);
    assert_eq!(list.len(), 160_003, "{:?}", &list[..3]);
    assert!(list[0].starts_with("ID"), "{}", list[0]);
    let listed: HashSet<&str> = list[1..]
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(listed.len(), 160_002, "every object once");
    // A reader that goes away after the first line (`devctl list | head -1`)
    // ends devctl at once, as for a small model: 141, nothing on stderr.
    {
        use std::io::BufRead;
        let mut child = std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .args([devctl, "--address", bus.address.as_str(), "list"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("devctl list");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut first)
            .expect("a line");
        assert!(first.starts_with("ID"), "{first}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while child.try_wait().expect("wait").is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("devctl list went on after its reader left");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().expect("devctl ends");
        assert_eq!(out.status.code(), Some(141));
        assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    }
    let tree = run(&["tree"]);
    assert_eq!(tree.len(), 160_003);
    assert!(
        tree.iter().any(|l| l.contains("└─0:0:0:159999")),
        "{:?}",
        &tree[tree.len() - 2..]
    );
    still_serving(&bus.address, &mut daemon);
}

type Page = (Vec<proto::proxies::PageEntry>, String);

async fn page(client: &Client, query: &[(&str, Variant<'_>)]) -> Result<Page, proto::Error> {
    client.manager.list_objects(options(query)).await
}

fn ids(entries: &[proto::proxies::PageEntry]) -> Vec<u64> {
    entries
        .iter()
        .map(|(path, _)| proto::parse_object_path(path.as_str()).expect("an object path"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_return_every_object_once_while_the_model_changes() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let client = Client::connect(&bus.address).await;
    let host = client.add_sim_host("host0", 2000).await;
    let mut throughout: HashSet<u64> = HashSet::new();
    let (first, _) = page(&client, &[("limit", Variant::from(10000u32))])
        .await
        .expect("everything");
    throughout.extend(ids(&first));
    assert_eq!(throughout.len(), 2002);

    // Between pages: objects added (after every cursor), objects removed
    // (listed already, or not yet).
    let mut seen: Vec<u64> = Vec::new();
    let mut cursor = String::new();
    let mut added = HashSet::new();
    let mut removed = HashSet::new();
    let mut round = 0u32;
    loop {
        let (entries, next) = page(
            &client,
            &[
                ("cursor", Variant::from(cursor.as_str())),
                ("limit", Variant::from(150u32)),
            ],
        )
        .await
        .expect("a page");
        assert!(entries.len() <= 150);
        seen.extend(ids(&entries));
        if next.is_empty() {
            break;
        }
        cursor = next;
        round += 1;
        let new = client
            .add("device", &format!("new{round}"), Some(&host), none())
            .await;
        added.insert(proto::parse_object_path(new.as_str()).expect("path"));
        // One already listed, one not yet (LUN names are 0:0:0:N).
        for lun in [round * 5, 1000 + round * 7] {
            let path = client
                .manager
                .find_object("device", &format!("0:0:0:{lun}"))
                .await
                .expect("a LUN");
            client.remove(&path, none()).await.expect("remove");
            removed.insert(proto::parse_object_path(path.as_str()).expect("path"));
        }
    }
    let unique: HashSet<u64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "an object was listed twice");
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, seen, "pages are in id order");
    for id in throughout.difference(&removed) {
        assert!(
            unique.contains(id),
            "object {id} existed throughout but was not listed"
        );
    }
    for id in &added {
        assert!(
            unique.contains(id),
            "object {id}, added during the listing, was not listed"
        );
    }

    // Filters.
    let lun = client
        .manager
        .find_object("device", "0:0:0:1999")
        .await
        .expect("a LUN");
    client.object(&lun).await.stop(none()).await.expect("stop");
    let (stopped, next) = page(&client, &[("state", Variant::from("stopped"))])
        .await
        .expect("stopped");
    assert!(next.is_empty());
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0].0, lun);
    let (hosts, _) = page(&client, &[("kind", Variant::from("host"))])
        .await
        .expect("hosts");
    assert_eq!(hosts.len(), 1);
    let (udev, next) = page(&client, &[("origin", Variant::from("udev"))])
        .await
        .expect("udev");
    assert!(udev.is_empty() && next.is_empty());
    let (subtree, _) = page(
        &client,
        &[
            ("subtree", Variant::from(lun.as_ref())),
            ("properties", Variant::from(vec!["Name", "State"])),
        ],
    )
    .await
    .expect("subtree");
    assert_eq!(subtree.len(), 1);
    let props: &HashMap<String, zbus::OwnedVariant> = &subtree[0].1;
    let mut keys: Vec<&str> = props.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["Name", "Scoped", "State"]);

    // Bad queries: InvalidArgument (NotFound for a subtree that is not
    // there), and nothing changes.
    let mut log = SignalLog::new(&client.conn).await;
    let count = client.manager.object_count().await.expect("count");
    let gone: OwnedObjectPath = proto::object_path(999_999).try_into().expect("path");
    let bad: Vec<(Vec<(&str, Variant<'_>)>, &str)> = vec![
        (vec![("cursor", Variant::from("abc"))], "InvalidArgument"),
        (vec![("cursor", Variant::from("-1"))], "InvalidArgument"),
        (
            vec![("cursor", Variant::from("99999999999999999999"))],
            "InvalidArgument",
        ),
        (
            vec![("cursor", Variant::from("18446744073709551615"))],
            "InvalidArgument",
        ),
        (vec![("cursor", Variant::from(7u32))], "InvalidArgument"),
        (vec![("limit", Variant::from(0u32))], "InvalidArgument"),
        (vec![("limit", Variant::from(10_001u32))], "InvalidArgument"),
        (vec![("limit", Variant::from("ten"))], "InvalidArgument"),
        (vec![("kind", Variant::from("disk"))], "InvalidArgument"),
        (vec![("state", Variant::from("dead"))], "InvalidArgument"),
        (vec![("origin", Variant::from("mars"))], "InvalidArgument"),
        (
            vec![("properties", Variant::from(vec!["Colour"]))],
            "InvalidArgument",
        ),
        (vec![("sort", Variant::from("name"))], "InvalidArgument"),
        (vec![("subtree", Variant::from(gone.as_ref()))], "NotFound"),
    ];
    for (query, name) in bad {
        let e = page(&client, &query).await.expect_err("a bad query");
        assert_eq!(
            error_name(&e),
            format!("org.devmgr.DevMgr1.Error.{name}"),
            "{query:?}: {e}"
        );
    }
    assert_eq!(client.manager.object_count().await.expect("count"), count);
    assert_eq!(
        log.drain(),
        Vec::<String>::new(),
        "a bad query changed something"
    );
}

/// While one Add of 100,000 LUNs is published (a second or more), a call
/// about another object is answered between two writes of it; a call about
/// the host being filled waits until the Add's reply. Checked by the order
/// in which one connection receives the messages, not by time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_about_other_objects_overtake_a_big_publication_others_wait() {
    use futures_util::StreamExt;
    use std::sync::{Arc, Mutex};
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let client = Client::connect(&bus.address).await;
    let other = client.add_host("other").await;
    let sim = client.sim_scsi().await;
    client
        .conn
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "AddMatch",
            &("type='signal',member='InterfacesAdded'",),
        )
        .await
        .expect("AddMatch");
    // Every message this connection receives, in order, read as it comes
    // (an unread stream would stop the connection): None for an
    // InterfacesAdded (its path kept apart), Some(serial) for a reply.
    let arrivals: Arc<Mutex<Vec<Option<u32>>>> = Arc::default();
    let announced: Arc<Mutex<Vec<OwnedObjectPath>>> = Arc::default();
    let mut stream = zbus::MessageStream::from(&client.conn);
    let reader = {
        let arrivals = arrivals.clone();
        let announced = announced.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let header = msg.header();
                if header.member().is_some_and(|m| m == "InterfacesAdded") {
                    let path = header.path().map(|p| p.to_string()).unwrap_or_default();
                    drop(header);
                    if path == proto::MANAGER_PATH {
                        let (added, _): (
                            OwnedObjectPath,
                            HashMap<String, HashMap<String, zbus::OwnedVariant>>,
                        ) = msg.body().deserialize().expect("InterfacesAdded");
                        announced.lock().expect("lock").push(added);
                    }
                    arrivals.lock().expect("lock").push(None);
                } else if let Some(serial) = header.reply_serial() {
                    arrivals.lock().expect("lock").push(Some(serial.get()));
                }
            }
        })
    };
    let conn = client.conn.clone();
    let add = tokio::spawn(async move {
        conn.call_method(
            Some(proto::BUS_NAME),
            proto::MANAGER_PATH,
            Some(proto::MANAGER_INTERFACE),
            "Add",
            &(
                "host",
                "host1",
                zbus::ObjectPath::from_static_str_unchecked("/"),
                options(&[
                    ("driver", Variant::from(sim.as_ref())),
                    ("luns", Variant::from(100_000u32)),
                ]),
            ),
        )
        .await
        .expect("Add")
        .header()
        .reply_serial()
        .map(|s| s.get())
    });
    // The host comes first; once a LUN is announced, the publication runs.
    let host1 = loop {
        let first_two = {
            let announced = announced.lock().expect("lock");
            (announced.len() > 1).then(|| announced[0].clone())
        };
        if let Some(host1) = first_two {
            break host1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let get = |path: OwnedObjectPath| {
        let conn = client.conn.clone();
        async move {
            conn.call_method(
                Some(proto::BUS_NAME),
                path.as_str(),
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &(proto::OBJECT_INTERFACE, "State"),
            )
            .await
            .expect("Get")
            .header()
            .reply_serial()
            .map(|s| s.get())
        }
    };
    let other_reply = get(other.clone()).await.expect("a serial");
    let host_reply = get(host1.clone()).await.expect("a serial");
    let add_reply = add.await.expect("add task").expect("a serial");
    // The reader sees the replies too; let it catch up.
    for _ in 0..10_000 {
        let got = arrivals
            .lock()
            .expect("lock")
            .iter()
            .filter(|a| a.is_some())
            .count();
        if got >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    reader.abort();
    // How many InterfacesAdded came before each reply.
    let arrivals = arrivals.lock().expect("lock").clone();
    let before = |serial: u32| {
        let at = arrivals
            .iter()
            .position(|a| *a == Some(serial))
            .expect("the reply arrived");
        arrivals[..at].iter().filter(|a| a.is_none()).count()
    };
    let (other_at, add_at, host_at) = (before(other_reply), before(add_reply), before(host_reply));
    // host1 and its 100,000 LUNs are announced.
    assert_eq!(add_at, 100_001, "the Add's reply follows all its signals");
    assert!(
        other_at < 99_000,
        "the Get of another host waited for {other_at} of 100,001 announcements"
    );
    assert_eq!(host_at, add_at, "the Get of host1 waited for the Add");
    let position = |serial: u32| arrivals.iter().position(|a| *a == Some(serial));
    assert!(position(host_reply) > position(add_reply));
}
