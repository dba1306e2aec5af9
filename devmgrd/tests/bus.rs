//! End-to-end tests of devmgrd on a private dbus-daemon: the real binary,
//! driven by real clients (busctl, gdbus) and a zbus client that watches the
//! signals. Under CI=true a missing dbus-daemon fails the tests (no skip).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use futures_util::StreamExt;
use zbus::{MatchRule, MessageStream};

const MANAGER: &str = "org.devmgr.DevMgr1.Manager";
const OBJECT: &str = "org.devmgr.DevMgr1.Object";

/// A private session-type dbus-daemon in its own directory.
struct TestBus {
    child: Child,
    address: String,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TestBus {
    fn start() -> TestBus {
        let dir = std::env::temp_dir().join(format!(
            "devmgr-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("bus.sock");
        let config = dir.join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>unix:path={}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>
<allow own="*"/><allow user="*"/></policy></busconfig>"#,
                socket.display()
            ),
        )
        .expect("bus config");
        let child = match Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!("these tests need dbus-daemon (package dbus): {e}"),
        };
        wait_for(|| socket.exists(), "the private bus socket");
        TestBus {
            child,
            address: format!("unix:path={}", socket.display()),
            _dir: TempDir(dir),
        }
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()))
}

fn wait_for(mut ready: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The real devmgrd binary serving on a test bus.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn start(bus: &TestBus) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_devmgrd"))
            .args(["--bus", &bus.address])
            .stderr(Stdio::piped())
            .spawn()
            .expect("start devmgrd");
        let daemon = Daemon { child };
        wait_for(
            || busctl(bus, &["status", proto::BUS_NAME]).status.success(),
            "devmgrd to own its name",
        );
        daemon
    }

    /// Sends SIGTERM and returns the exit status and stderr.
    fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let child = std::mem::replace(&mut self.child, Command::new("true").spawn().expect("true"));
        let out = child.wait_with_output().expect("wait for devmgrd");
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn busctl(bus: &TestBus, args: &[&str]) -> Output {
    Command::new("busctl")
        .arg(format!("--address={}", bus.address))
        .args(args)
        .output()
        .expect("busctl")
}

fn gdbus_call(bus: &TestBus, path: &str, method: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("gdbus")
        .args([
            "call",
            "--address",
            &bus.address,
            "-d",
            proto::BUS_NAME,
            "-o",
            path,
            "-m",
            method,
        ])
        .args(args)
        .output()
        .expect("gdbus");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Calls a manager or object method with busctl; returns stdout, panics on failure.
fn call(bus: &TestBus, path: &str, interface: &str, method: &str, args: &[&str]) -> String {
    let mut all = vec!["call", proto::BUS_NAME, path, interface, method];
    all.extend_from_slice(args);
    let out = busctl(bus, &all);
    assert!(
        out.status.success(),
        "busctl {method} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The object path in a busctl `o "/path"` reply.
fn path_in(reply: &str) -> String {
    reply.split('"').nth(1).unwrap_or_default().to_owned()
}

fn property(bus: &TestBus, path: &str, interface: &str, name: &str) -> String {
    let out = busctl(
        bus,
        &["get-property", proto::BUS_NAME, path, interface, name],
    );
    assert!(
        out.status.success(),
        "get-property {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn real_clients_drive_the_version_1_contract() {
    let bus = TestBus::start();
    let daemon = Daemon::start(&bus);
    let m = proto::MANAGER_PATH;

    // busctl tree and gdbus introspect see the manager and its interfaces.
    let tree = busctl(&bus, &["tree", proto::BUS_NAME]);
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
    let sim = path_in(&call(
        &bus,
        m,
        MANAGER,
        "FindObject",
        &["ss", "driver", "sim-scsi"],
    ));
    let host = path_in(&call(
        &bus,
        m,
        MANAGER,
        "Add",
        &[
            "ssoa{sv}", "host", "host0", "/", "2", "driver", "o", &sim, "luns", "u", "3",
        ],
    ));
    assert_eq!(property(&bus, m, MANAGER, "ObjectCount"), "u 5");
    let lun = path_in(&call(
        &bus,
        m,
        MANAGER,
        "FindObject",
        &["ss", "device", "0:0:0:1"],
    ));
    assert_eq!(
        property(&bus, &lun, OBJECT, "Parent"),
        format!("o \"{host}\"")
    );
    assert_eq!(
        property(&bus, &host, OBJECT, "Driver"),
        format!("o \"{sim}\"")
    );
    let (ok, managed) = gdbus_call(
        &bus,
        m,
        "org.freedesktop.DBus.ObjectManager.GetManagedObjects",
        &[],
    );
    assert!(
        ok && managed.contains(&lun) && managed.contains("'State': <'live'>"),
        "{managed}"
    );

    // Stop and re-enable change State.
    call(&bus, &host, OBJECT, "Stop", &["a{sv}", "0"]);
    assert_eq!(property(&bus, &host, OBJECT, "State"), "s \"stopped\"");
    call(&bus, &host, OBJECT, "Reenable", &["a{sv}", "0"]);
    assert_eq!(property(&bus, &host, OBJECT, "State"), "s \"live\"");

    // Errors carry their contract names; bad input changes nothing.
    let expect_error = |path: &str, method: &str, args: &[&str], name: &str| {
        let (ok, text) = gdbus_call(&bus, path, method, args);
        assert!(
            !ok && text.contains(name),
            "{method} {args:?}: expected {name}, got {text}"
        );
    };
    expect_error(
        m,
        "org.devmgr.DevMgr1.Manager.FindObject",
        &["host", "nope"],
        "org.devmgr.DevMgr1.Error.NotFound",
    );
    expect_error(
        m,
        "org.devmgr.DevMgr1.Manager.Add",
        &["host", "host0", "/", "{}"],
        "org.devmgr.DevMgr1.Error.NameInUse",
    );
    expect_error(
        m,
        "org.devmgr.DevMgr1.Manager.Add",
        &["gizmo", "g", "/", "{}"],
        "org.devmgr.DevMgr1.Error.InvalidArgument",
    );
    expect_error(
        m,
        "org.devmgr.DevMgr1.Manager.Add",
        &["host", "", "/", "{}"],
        "org.devmgr.DevMgr1.Error.InvalidArgument",
    );
    expect_error(
        m,
        "org.devmgr.DevMgr1.Manager.Add",
        &["host", "h1", "/", "{'luns': <int32 3>}"],
        "org.devmgr.DevMgr1.Error.InvalidArgument",
    );
    expect_error(
        &host,
        "org.devmgr.DevMgr1.Object.Stop",
        &["{'bogus': <true>}"],
        "org.devmgr.DevMgr1.Error.InvalidArgument",
    );
    expect_error(
        m,
        "org.devmgr.DevMgr1.Manager.FindObject",
        &["host"],
        "org.freedesktop.DBus.Error.InvalidArgs",
    );
    assert_eq!(property(&bus, m, MANAGER, "ObjectCount"), "u 5");

    // Removing the host cascades to its LUNs; a stale path is NotFound afterwards.
    let reply = call(&bus, &host, OBJECT, "Remove", &["a{sv}", "0"]);
    assert_eq!(reply, "sao \"removed\" 0");
    assert_eq!(property(&bus, m, MANAGER, "ObjectCount"), "u 1");
    let (ok, text) = gdbus_call(&bus, &host, "org.devmgr.DevMgr1.Object.Remove", &["{}"]);
    assert!(!ok && text.contains("UnknownObject"), "{text}");

    // SIGTERM: the daemon drops its name and exits 0.
    let (status, stderr) = daemon.terminate();
    assert!(status.success(), "devmgrd exited with {status}: {stderr}");
    assert!(!busctl(&bus, &["status", proto::BUS_NAME]).status.success());
}

#[test]
fn a_second_daemon_refuses_to_steal_the_name() {
    let bus = TestBus::start();
    let _first = Daemon::start(&bus);
    let second = Command::new(env!("CARGO_BIN_EXE_devmgrd"))
        .args(["--bus", &bus.address])
        .output()
        .expect("second devmgrd");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already owned"), "{stderr}");
    // The first still serves.
    assert!(busctl(&bus, &["status", proto::BUS_NAME]).status.success());
}

#[test]
fn an_unreachable_bus_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_devmgrd"))
        .args(["--bus", "unix:path=/nonexistent/devmgr-test.sock"])
        .output()
        .expect("devmgrd");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot serve"));
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

/// A zbus client for the fd-reference tests.
struct Client {
    conn: zbus::Connection,
    manager: zbus::Proxy<'static>,
}

type NoOptions = HashMap<&'static str, zbus::Variant<'static>>;

impl Client {
    async fn connect(bus: &TestBus) -> Client {
        let conn = zbus::connection::Builder::address(bus.address.as_str())
            .build()
            .await
            .expect("client connection");
        let manager = zbus::Proxy::new(&conn, proto::BUS_NAME, proto::MANAGER_PATH, MANAGER)
            .await
            .expect("manager proxy");
        Client { conn, manager }
    }

    async fn add_host(&self, name: &str) -> zbus::OwnedObjectPath {
        let root = zbus::ObjectPath::from_static_str_unchecked("/");
        self.manager
            .call("Add", &("host", name, root, NoOptions::new()))
            .await
            .expect("add host")
    }

    async fn object(&self, path: &zbus::OwnedObjectPath) -> zbus::Proxy<'static> {
        zbus::Proxy::new(&self.conn, proto::BUS_NAME, path.to_string(), OBJECT)
            .await
            .expect("object proxy")
    }

    async fn acquire(&self, path: &zbus::OwnedObjectPath) -> std::os::fd::OwnedFd {
        let fd: zbus::OwnedFd = self
            .object(path)
            .await
            .call("Acquire", &("testing", NoOptions::new()))
            .await
            .expect("acquire");
        std::os::fd::OwnedFd::from(fd)
    }

    /// RefCount, read fresh (no proxy cache).
    async fn ref_count(&self, path: &zbus::OwnedObjectPath) -> Option<u32> {
        let props = zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination(proto::BUS_NAME)
            .path(path.clone())
            .build()
            .await
            .expect("properties proxy");
        let iface = zbus::names::InterfaceName::from_static_str_unchecked(OBJECT);
        let value = props.get(iface, "RefCount").await.ok()?;
        u32::try_from(&value).ok()
    }

    async fn exists(&self, path: &zbus::OwnedObjectPath) -> bool {
        self.ref_count(path).await.is_some()
    }
}

/// Polls `cond` every 10 ms for up to `limit`; returns how long it took.
async fn within<F, Fut>(limit: Duration, mut cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fd_reference_lives_while_any_copy_is_open() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let client = Client::connect(&bus).await;
    let host = client.add_host("held").await;
    let fd = client.acquire(&host).await;
    assert_eq!(client.ref_count(&host).await, Some(1));

    // Holders come from the bus's credentials: our unique name, uid and pid.
    let object = client.object(&host).await;
    let holders: Vec<(u64, String, u32, u32, String, u64)> =
        object.get_property("Holders").await.expect("Holders");
    let unique = client.conn.unique_name().expect("unique name").to_string();
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].1, unique);
    assert_eq!(holders[0].3, std::process::id());
    assert_eq!(holders[0].4, "testing");

    // A dup keeps the reference when the original closes.
    let dup = fd.try_clone().expect("dup");
    drop(fd);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        client.ref_count(&host).await,
        Some(1),
        "closing one copy released the reference"
    );

    // Busy: the removal is pending, with the object listed.
    let (outcome, pending): (String, Vec<zbus::OwnedObjectPath>) = object
        .call("Remove", &(NoOptions::new(),))
        .await
        .expect("remove");
    assert_eq!((outcome.as_str(), pending), ("pending", vec![host.clone()]));

    // Closing the last copy releases it and the removal completes.
    drop(dup);
    let took = within(Duration::from_secs(2), || async {
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
    let client = Client::connect(&bus).await;
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
    let object = client.object(&host).await;
    let (outcome, _): (String, Vec<zbus::OwnedObjectPath>) = object
        .call("Remove", &(NoOptions::new(),))
        .await
        .expect("remove");
    assert_eq!(outcome, "pending");

    holder.kill().expect("SIGKILL the holder");
    let _ = holder.wait();
    let took = within(Duration::from_secs(2), || async {
        !client.exists(&host).await
    })
    .await;
    let took = took.expect("the killed holder's reference was not released");
    // How fast is for benchmarks, not tests (shared, noisy machines).
    eprintln!("SIGKILL → removal completed in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_and_a_revoke_deadline_close_the_holders_handle() {
    use std::io::Read;
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let client = Client::connect(&bus).await;

    // Force: the removal completes at once and the holder reads EOF.
    let host = client.add_host("forced").await;
    let fd = client.acquire(&host).await;
    let mut options = HashMap::<&str, zbus::Variant<'_>>::new();
    options.insert("force", zbus::Variant::from(true));
    let (outcome, _): (String, Vec<zbus::OwnedObjectPath>) = client
        .object(&host)
        .await
        .call("Remove", &(options,))
        .await
        .expect("force remove");
    assert_eq!(outcome, "removed");
    let mut stream = std::os::unix::net::UnixStream::from(fd);
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    assert_eq!(
        stream.read(&mut [0u8; 8]).expect("read"),
        0,
        "the revoked handle is not at EOF"
    );

    // A deadline with on-timeout=revoke: pending first, gone after 1 s.
    let host = client.add_host("deadline").await;
    let fd = client.acquire(&host).await;
    let mut options = HashMap::<&str, zbus::Variant<'_>>::new();
    options.insert("timeout-sec", zbus::Variant::from(1u32));
    options.insert("on-timeout", zbus::Variant::from("revoke"));
    let (outcome, _): (String, Vec<zbus::OwnedObjectPath>) = client
        .object(&host)
        .await
        .call("Remove", &(options,))
        .await
        .expect("remove with deadline");
    assert_eq!(outcome, "pending");
    let took = within(Duration::from_secs(5), || async {
        !client.exists(&host).await
    })
    .await;
    let took = took.expect("the deadline never revoked");
    assert!(
        took >= Duration::from_millis(700),
        "revoked early, after {took:?}"
    );
    let mut stream = std::os::unix::net::UnixStream::from(fd);
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    assert_eq!(stream.read(&mut [0u8; 8]).expect("read"), 0);

    // A deadline with on-timeout=cancel: back to live, reference kept.
    let host = client.add_host("cancelled").await;
    let _fd = client.acquire(&host).await;
    let mut options = HashMap::<&str, zbus::Variant<'_>>::new();
    options.insert("timeout-sec", zbus::Variant::from(1u32));
    options.insert("on-timeout", zbus::Variant::from("cancel"));
    let object = client.object(&host).await;
    let _: (String, Vec<zbus::OwnedObjectPath>) =
        object.call("Remove", &(options,)).await.expect("remove");
    let live = within(Duration::from_secs(5), || async {
        let state: Result<String, _> = client.object(&host).await.get_property("State").await;
        state.is_ok_and(|s| s == "live")
    })
    .await;
    assert!(live.is_some(), "the cancel deadline never brought it back");
    assert_eq!(client.ref_count(&host).await, Some(1));

    // Acquire on a stopped object: InvalidState.
    object
        .call::<_, _, ()>("Stop", &(NoOptions::new(),))
        .await
        .expect("stop");
    let refused: Result<zbus::OwnedFd, zbus::Error> =
        object.call("Acquire", &("late", NoOptions::new())).await;
    match refused {
        Err(zbus::Error::MethodError(name, _, _)) => {
            assert_eq!(name.as_str(), "org.devmgr.DevMgr1.Error.InvalidState")
        }
        other => panic!("Acquire on a stopped object gave {other:?}"),
    }
}

/// A fresh runtime directory for an embedded bus.
fn runtime_dir(tag: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "devmgr-rt-{tag}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    TempDir(dir)
}

/// Starts devmgrd on an embedded bus in `dir`; returns once it answers there.
fn start_embedded(dir: &TempDir) -> (Daemon, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_devmgrd"))
        .args(["--bus", "embedded", "--runtime-dir"])
        .arg(&dir.0)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start devmgrd");
    let daemon = Daemon { child };
    let file = dir.0.join("bus");
    let mut address = String::new();
    wait_for(
        || {
            address = std::fs::read_to_string(&file)
                .unwrap_or_default()
                .trim()
                .to_owned();
            !address.is_empty()
                && busctl_at(&address, &["status", proto::BUS_NAME])
                    .status
                    .success()
        },
        "devmgrd on its embedded bus",
    );
    (daemon, address)
}

fn busctl_at(address: &str, args: &[&str]) -> Output {
    Command::new("busctl")
        .arg(format!("--address={address}"))
        .args(args)
        .output()
        .expect("busctl")
}

#[test]
fn the_embedded_bus_serves_real_clients_and_cleans_up() {
    let dir = runtime_dir("clean");
    let (daemon, address) = start_embedded(&dir);
    let tree = busctl_at(&address, &["tree", proto::BUS_NAME]);
    assert!(String::from_utf8_lossy(&tree.stdout).contains(proto::MANAGER_PATH));
    let out = Command::new("gdbus")
        .args([
            "introspect",
            "--address",
            &address,
            "-d",
            proto::BUS_NAME,
            "-o",
            proto::MANAGER_PATH,
        ])
        .output()
        .expect("gdbus");
    assert!(String::from_utf8_lossy(&out.stdout).contains(MANAGER));

    let (status, stderr) = daemon.terminate();
    assert!(status.success(), "devmgrd exited with {status}: {stderr}");
    for name in ["bus", "bus.sock", "bus.conf"] {
        assert!(!dir.0.join(name).exists(), "{name} left behind");
    }
}

#[test]
fn a_killed_daemon_takes_its_bus_along_and_a_new_one_starts_cleanly() {
    let dir = runtime_dir("killed");
    let (mut daemon, _) = start_embedded(&dir);
    // A second daemon on the same runtime directory is refused.
    let second = Command::new(env!("CARGO_BIN_EXE_devmgrd"))
        .args(["--bus", "embedded", "--runtime-dir"])
        .arg(&dir.0)
        .output()
        .expect("second devmgrd");
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already listening"));

    daemon.child.kill().expect("SIGKILL devmgrd");
    let _ = daemon.child.wait();
    // pdeathsig: the bus goes too, leaving only stale files behind.
    wait_for(
        || std::os::unix::net::UnixStream::connect(dir.0.join("bus.sock")).is_err(),
        "the orphaned bus to exit",
    );
    let (_again, address) = start_embedded(&dir);
    assert!(busctl_at(&address, &["tree", proto::BUS_NAME])
        .status
        .success());
}
