//! The end-to-end harness: a private dbus-daemon per test, the real
//! `devmgrd` binary on it, real clients (busctl, gdbus, python-dbus) and
//! typed zbus proxies, and a signal log that renders what a client sees in
//! order. Nothing here skips: a missing dbus-daemon, busctl or binary fails
//! the test with the reason (a silent skip would hide breakage in CI).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use proto::proxies::{ManagerProxy, ObjectProxy, Options};
use zbus::{MatchRule, MessageStream, ObjectPath, OwnedObjectPath, OwnedVariant, Variant};

pub use proto::{MANAGER_INTERFACE as MANAGER, OBJECT_INTERFACE as OBJECT};

pub mod container;
pub mod disks;
pub mod system_bus;

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh, unique, not yet created directory path under the system temp dir.
    pub fn unique(tag: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        TempDir(std::env::temp_dir().join(format!(
            "devmgr-{tag}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The runtime the benchmark binaries run on: two workers, as the
/// machines have two cores.
pub fn bench_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Which sections a benchmark binary was asked for: the command line's
/// words that are not flags (cargo bench passes `--bench`); none means all.
pub fn bench_sections() -> impl Fn(&str) -> bool {
    let asked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    move |section| asked.is_empty() || asked.iter().any(|a| a == section)
}

/// Polls `ready` every 20 ms; panics after 10 s.
pub fn wait_for(mut ready: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` every 10 ms for up to `limit`; returns how long it took.
pub async fn within<F, Fut>(limit: Duration, mut cond: F) -> Option<Duration>
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

/// Waits (up to 10 s) for `cond`; panics with `what` otherwise.
pub async fn eventually<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        within(Duration::from_secs(10), cond).await.is_some(),
        "timed out waiting for {what}"
    );
}

/// Checks `cond` for the whole of `limit` (what must *not* happen, given
/// the time to happen if it were going to); panics with `what` the moment
/// it fails.
pub async fn holds_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        assert!(
            cond().await,
            "{what} stopped holding after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asks udevd for a reply: its control socket outlives a killed udevd, so
/// the file alone says nothing. Panics (never skips) without one.
pub fn require_udevd() {
    let answered = Command::new("udevadm")
        .args(["control", "--ping", "--timeout=5"])
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        answered,
        "the udev source needs a running systemd-udevd, and none answers \
         `udevadm control --ping` (package udev; .ci/deps starts it)"
    );
}

/// devmgrd replaying the FIFO `events` made in `dir` (with `extra`
/// arguments), and the FIFO's write end: opening it waits for the daemon
/// to open its end.
pub fn replaying(dir: &TempDir, extra: &[&str]) -> (TestBus, Daemon, std::fs::File) {
    let fifo = events_fifo(dir);
    let bus = TestBus::start();
    let fifo_arg = fifo.to_string_lossy().into_owned();
    let mut args = vec!["--replay", fifo_arg.as_str()];
    args.extend_from_slice(extra);
    let daemon = Daemon::start_with_args(&bus, &args);
    let events = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("open the FIFO");
    (bus, daemon, events)
}

/// Writes `text` into a replay FIFO.
pub fn feed(events: &mut std::fs::File, text: &str) {
    use std::io::Write;
    events.write_all(text.as_bytes()).expect("write events");
    events.flush().expect("flush");
}

/// Latency samples of one benchmark measurement.
pub struct Samples(pub Vec<Duration>);

impl Samples {
    /// The `p`-quantile (0 to 1) of the samples.
    pub fn percentile(&mut self, p: f64) -> Duration {
        self.0.sort_unstable();
        let at = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[at]
    }

    /// Their mean.
    pub fn mean(&self) -> Duration {
        self.0.iter().sum::<Duration>() / u32::try_from(self.0.len()).unwrap_or(u32::MAX)
    }

    /// Prints a row (n, mean, p50, p99); returns (p50, p99).
    pub fn row(&mut self, what: &str) -> (Duration, Duration) {
        let (p50, p99) = (self.percentile(0.50), self.percentile(0.99));
        println!(
            "{what:<52} n={:<6} mean {:>9.1?}  p50 {:>9.1?}  p99 {:>9.1?}",
            self.0.len(),
            self.mean(),
            p50,
            p99
        );
        (p50, p99)
    }
}

/// A Peer.Ping round trip to devmgrd (the benchmarks' baseline: a call the
/// daemon does nothing for).
pub async fn ping(c: &Client) {
    c.conn
        .call_method(
            Some(proto::BUS_NAME),
            proto::MANAGER_PATH,
            Some("org.freedesktop.DBus.Peer"),
            "Ping",
            &(),
        )
        .await
        .expect("Ping");
}

/// GetManagedObjects of devmgrd's manager, the reply undecoded (for the
/// benchmarks: what the daemon and the bus cost, apart from decoding).
pub async fn managed_objects_raw(c: &Client) -> zbus::Result<zbus::Message> {
    c.conn
        .call_method(
            Some(proto::BUS_NAME),
            proto::MANAGER_PATH,
            Some("org.freedesktop.DBus.ObjectManager"),
            "GetManagedObjects",
            &(),
        )
        .await
}

/// A workspace binary (`devmgrd`, `devctl`): `$DEVMGR_BIN_DIR/<name>`, else
/// beside this test executable's profile directory. `cargo test --workspace`
/// builds both before running any test; a binary older than its sources is
/// refused, so a partial `cargo test -p devmgr-tests` cannot test stale code.
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("DEVMGR_BIN_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            // target/<profile>/deps/<test> -> target/<profile>
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.to_path_buf())
        })
        .unwrap_or_default();
    let path = dir.join(name);
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "{} is missing ({e}): run the tests with `cargo test --workspace` \
                 (which builds it), or build it and set DEVMGR_BIN_DIR",
                path.display()
            )
        });
    let crates: &[&str] = match name {
        "devmgrd" => &["devmgrd", "drivers", "proto"],
        "devctl" => &["devctl", "proto"],
        _ => &[],
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for krate in crates {
        if let Some(newer) = newest_source(&workspace.join(krate).join("src")) {
            assert!(
                newer.1 <= built,
                "{} is older than {}: rebuild it (`cargo test --workspace` does)",
                path.display(),
                newer.0.display()
            );
        }
    }
    path
}

/// The most recently modified file under `dir`, if any.
fn newest_source(dir: &Path) -> Option<(PathBuf, std::time::SystemTime)> {
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()?.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else if let Ok(modified) = meta.modified() {
                if newest.as_ref().is_none_or(|(_, t)| modified > *t) {
                    newest = Some((path, modified));
                }
            }
        }
    }
    newest
}

/// `cargo xtask ARGS` (release) from the workspace, which must succeed.
pub fn cargo_xtask(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .args(["run", "--quiet", "--release", "-p", "xtask", "--"])
        .args(args)
        .output()
        .expect("cargo xtask");
    assert!(
        out.status.success(),
        "cargo xtask {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A private session-type dbus-daemon in its own directory.
pub struct TestBus {
    /// The dbus-daemon process.
    pub child: Child,
    /// Its address, `unix:path=…`.
    pub address: String,
    _dir: TempDir,
}

/// A bus configuration that lets every local user connect, own any name and
/// eavesdrop (the tests watch everything), with session.conf's generous
/// limits (GetManagedObjects at 100,000 objects is a ~60 MB reply).
fn bus_config(socket: &Path, extra_policy: &str) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>unix:path={}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>
<allow own="*"/><allow user="*"/>{}</policy>
<limit name="max_incoming_bytes">1000000000</limit><limit name="max_outgoing_bytes">1000000000</limit>
<limit name="max_message_size">1000000000</limit><limit name="max_replies_per_connection">50000</limit>
</busconfig>"#,
        socket.display(),
        extra_policy
    )
}

impl TestBus {
    /// Starts the bus; panics (never skips) if dbus-daemon is missing.
    pub fn start() -> TestBus {
        TestBus::start_with_policy("")
    }

    /// Same, with extra `<policy context="default">` rules (e.g. a `<deny>`
    /// that makes the bus itself refuse some calls with AccessDenied).
    pub fn start_with_policy(extra_policy: &str) -> TestBus {
        let dir = TempDir::unique("bus");
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        let socket = dir.0.join("bus.sock");
        let config = dir.0.join("bus.conf");
        std::fs::write(&config, bus_config(&socket, extra_policy)).expect("bus config");
        let child = match Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!("these tests need dbus-daemon (package dbus): {e}"),
        };
        wait_for_listener(&socket, "the private bus");
        TestBus {
            child,
            address: format!("unix:path={}", socket.display()),
            _dir: dir,
        }
    }

    /// Runs busctl against this bus.
    pub fn busctl(&self, args: &[&str]) -> Output {
        busctl_at(&self.address, args)
    }

    /// Runs `gdbus call` on the daemon; returns success and stdout+stderr.
    pub fn gdbus_call(&self, path: &str, method: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new("gdbus")
            .args(["call", "--address", &self.address, "-d", proto::BUS_NAME])
            .args(["-o", path, "-m", method])
            .args(args)
            .output()
            .expect("gdbus (package libglib2.0-bin)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Calls a method with busctl; returns stdout, panics on failure.
    pub fn call(&self, path: &str, interface: &str, method: &str, args: &[&str]) -> String {
        let mut all = vec!["call", proto::BUS_NAME, path, interface, method];
        all.extend_from_slice(args);
        let out = self.busctl(&all);
        assert!(
            out.status.success(),
            "busctl {method} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A property as busctl prints it, e.g. `s "live"`.
    pub fn property(&self, path: &str, interface: &str, name: &str) -> String {
        let out = self.busctl(&["get-property", proto::BUS_NAME, path, interface, name]);
        assert!(
            out.status.success(),
            "get-property {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs busctl against an address; panics if busctl is missing.
pub fn busctl_at(address: &str, args: &[&str]) -> Output {
    Command::new("busctl")
        .arg(format!("--address={address}"))
        .args(args)
        .output()
        .expect("busctl (package systemd)")
}

/// The object path in a busctl `o "/path"` reply.
pub fn path_in(reply: &str) -> String {
    reply.split('"').nth(1).unwrap_or_default().to_owned()
}

/// The real devmgrd binary serving on a bus.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its stderr (the log) so far, read as it comes by a thread.
    log: Arc<Mutex<String>>,
    log_reader: Option<std::thread::JoinHandle<()>>,
}

/// Waits until something accepts connections on `socket`. Its file alone
/// is not enough: dbus-daemon binds before it listens, and a client in
/// between is refused (a CI run failed that way).
pub fn wait_for_listener(socket: &Path, what: &str) {
    wait_for(
        || std::os::unix::net::UnixStream::connect(socket).is_ok(),
        &format!("{what} to listen on {}", socket.display()),
    );
}

/// A FIFO named `events` in `dir` (created), for `devmgrd --replay`.
pub fn events_fifo(dir: &TempDir) -> PathBuf {
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let fifo = dir.0.join("events");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success(), "mkfifo {}", fifo.display());
    fifo
}

/// A configuration file holding `text`, in a directory of its own: the
/// directory (removed when dropped) and the file's path, for `--config`.
pub fn config_file(tag: &str, text: &str) -> (TempDir, String) {
    let dir = TempDir::unique(tag);
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let path = dir.0.join("devmgrd.toml");
    std::fs::write(&path, text).expect("config");
    let path = path.to_string_lossy().into_owned();
    (dir, path)
}

/// devmgrd, reading no configuration file, and blind to the environment a
/// systemd service would give it: what the machine's /etc/devmgr or the
/// test runner's service says must not change what a test sees.
pub fn devmgrd_command() -> Command {
    let mut command = Command::new(binary("devmgrd"));
    isolate(&mut command);
    command.arg("--no-config");
    command
}

/// Clears what a systemd service would set for devmgrd (logging to the
/// journal, a default state directory).
fn isolate(command: &mut Command) {
    command.env_remove("JOURNAL_STREAM");
    command.env_remove("STATE_DIRECTORY");
}

impl Daemon {
    /// Starts devmgrd on `bus` and waits until it owns its name. It models
    /// no real devices (`--no-udev`): tests see only what they add.
    pub fn start(bus: &TestBus) -> Daemon {
        Daemon::start_wrapped(bus, &[])
    }

    /// Same, run through a wrapper command (e.g. `prlimit … --`) if any.
    pub fn start_wrapped(bus: &TestBus, wrapper: &[&str]) -> Daemon {
        Daemon::launch(&bus.address, wrapper, &["--no-udev"])
    }

    /// Starts devmgrd on `bus` with these arguments (udev ingestion on
    /// unless they say `--no-udev`).
    pub fn start_with_args(bus: &TestBus, args: &[&str]) -> Daemon {
        Daemon::launch(&bus.address, &[], args)
    }

    /// Starts devmgrd on the bus at `address` (one the harness did not
    /// start, such as a system-type bus) with these arguments.
    pub fn start_at(address: &str, args: &[&str]) -> Daemon {
        Daemon::launch(address, &[], args)
    }

    /// Starts devmgrd on `bus` with these arguments and environment
    /// variables (such as systemd's STATE_DIRECTORY).
    pub fn start_with_env(bus: &TestBus, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::launch_with(&bus.address, &[], args, env)
    }

    /// Starts devmgrd on the bus at `address`, through `wrapper` (e.g.
    /// `prlimit … --`), with these arguments.
    pub fn start_at_wrapped(address: &str, wrapper: &[&str], args: &[&str]) -> Daemon {
        Daemon::launch(address, wrapper, args)
    }

    fn launch(address: &str, wrapper: &[&str], args: &[&str]) -> Daemon {
        Daemon::launch_with(address, wrapper, args, &[])
    }

    fn launch_with(address: &str, wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let devmgrd = binary("devmgrd");
        let mut command = match wrapper.split_first() {
            None => Command::new(&devmgrd),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&devmgrd);
                c
            }
        };
        isolate(&mut command);
        command.envs(env.iter().copied());
        if !args.contains(&"--config") {
            command.arg("--no-config");
        }
        let child = command
            .args(["--bus", address])
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start devmgrd");
        let mut daemon = Daemon::watch(child);
        let start = Instant::now();
        while !busctl_at(address, &["status", proto::BUS_NAME])
            .status
            .success()
        {
            // Say why, rather than time out on a daemon that already died.
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!(
                    "devmgrd exited ({status}) before owning its name:\n{}",
                    daemon.log()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "devmgrd did not own its name within 30 s; its log:\n{}",
                daemon.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// Starts devmgrd on an embedded bus in `dir`; returns it and the bus
    /// address once it answers there.
    pub fn start_embedded(dir: &TempDir) -> (Daemon, String) {
        let child = devmgrd_command()
            .args(["--no-udev", "--bus", "embedded", "--runtime-dir"])
            .arg(&dir.0)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start devmgrd");
        let daemon = Daemon::watch(child);
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

    /// Starts collecting `child`'s stderr.
    fn watch(mut child: Child) -> Daemon {
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        let log_reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        Daemon {
            child,
            log,
            log_reader: Some(log_reader),
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until its log contains `text`.
    pub fn wait_for_log(&self, text: &str) {
        wait_for(
            || self.log().contains(text),
            &format!("{text:?} in the log"),
        );
    }

    /// SIGKILLs it and waits until it is gone (a crash, for tests of what
    /// survives one).
    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL devmgrd");
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns the exit status and the whole log.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = self.child.wait().expect("wait for devmgrd");
        if let Some(reader) = self.log_reader.take() {
            let _ = reader.join();
        }
        (status, self.log())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds `a{sv}` options from pairs.
pub fn options<'a>(pairs: &[(&'a str, Variant<'a>)]) -> Options<'a> {
    pairs.iter().cloned().collect()
}

/// No options.
pub fn none() -> Options<'static> {
    Options::new()
}

/// The `/` path that stands for "no object".
pub fn root() -> ObjectPath<'static> {
    ObjectPath::from_static_str_unchecked(proto::NO_OBJECT_PATH)
}

/// A zbus client with typed proxies (property caching off, so every read
/// is fresh).
pub struct Client {
    /// The connection.
    pub conn: zbus::Connection,
    /// The manager.
    pub manager: ManagerProxy<'static>,
}

impl Client {
    /// Connects to `address`.
    pub async fn connect(address: &str) -> Client {
        let conn = zbus::connection::Builder::address(address)
            .build()
            .await
            .expect("client connection");
        let manager = ManagerProxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .expect("manager proxy");
        Client { conn, manager }
    }

    /// The typed proxy of one object.
    pub async fn object(&self, path: &OwnedObjectPath) -> ObjectProxy<'static> {
        ObjectProxy::builder(&self.conn)
            .path(path.clone())
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .expect("object proxy")
    }

    /// Adds an object; panics on failure.
    pub async fn add(
        &self,
        kind: &str,
        name: &str,
        parent: Option<&OwnedObjectPath>,
        opts: Options<'_>,
    ) -> OwnedObjectPath {
        let parent = match parent {
            Some(p) => p.as_ref(),
            None => root(),
        };
        self.manager
            .add(kind, name, &parent, opts)
            .await
            .unwrap_or_else(|e| panic!("add {kind} {name}: {e}"))
    }

    /// Adds a host with no options.
    pub async fn add_host(&self, name: &str) -> OwnedObjectPath {
        self.add("host", name, None, none()).await
    }

    /// Adds `host` bound to sim-scsi with `luns` LUNs (named `N:0:0:LUN`
    /// for `hostN`), in one call.
    pub async fn add_sim_host(&self, host: &str, luns: u32) -> OwnedObjectPath {
        let sim = self.sim_scsi().await;
        self.add(
            "host",
            host,
            None,
            options(&[
                ("driver", Variant::from(sim.as_ref())),
                ("luns", Variant::from(luns)),
            ]),
        )
        .await
    }

    /// The path of the sim-scsi driver.
    pub async fn sim_scsi(&self) -> OwnedObjectPath {
        self.manager
            .find_object("driver", proto::SIM_SCSI_DRIVER)
            .await
            .expect("the sim-scsi driver")
    }

    /// Acquires a reference; panics on failure.
    pub async fn acquire(&self, path: &OwnedObjectPath) -> std::os::fd::OwnedFd {
        let fd = self
            .object(path)
            .await
            .acquire("testing", none())
            .await
            .unwrap_or_else(|e| panic!("acquire {path}: {e}"));
        std::os::fd::OwnedFd::from(fd)
    }

    /// Removes with options; returns the outcome and the pending paths.
    pub async fn remove(
        &self,
        path: &OwnedObjectPath,
        opts: Options<'_>,
    ) -> Result<(String, Vec<OwnedObjectPath>), proto::Error> {
        self.object(path).await.remove(opts).await
    }

    /// RefCount, or `None` if the object is gone.
    pub async fn ref_count(&self, path: &OwnedObjectPath) -> Option<u32> {
        self.object(path).await.ref_count().await.ok()
    }

    /// State, or `None` if the object is gone.
    pub async fn state(&self, path: &OwnedObjectPath) -> Option<String> {
        self.object(path).await.state().await.ok()
    }

    /// LastError, or `None` if the object is gone.
    pub async fn last_error(&self, path: &OwnedObjectPath) -> Option<String> {
        self.object(path).await.last_error().await.ok()
    }

    /// Whether the object still exists.
    pub async fn exists(&self, path: &OwnedObjectPath) -> bool {
        self.state(path).await.is_some()
    }

    /// The device named `name`, if there is one.
    pub async fn device(&self, name: &str) -> Option<OwnedObjectPath> {
        self.manager.find_object("device", name).await.ok()
    }

    /// Waits (up to 10 s) for device `name` on the bus; its object path.
    pub async fn appears(&self, name: &str) -> OwnedObjectPath {
        eventually(&format!("{name} on the bus"), || async {
            self.device(name).await.is_some()
        })
        .await;
        self.device(name).await.expect("a device that appeared")
    }

    /// The object's `Holders` (empty if it is gone).
    pub async fn holders(&self, path: &OwnedObjectPath) -> Vec<proto::HolderTuple> {
        self.object(path).await.holders().await.unwrap_or_default()
    }
}

/// The D-Bus error name of a failed typed call.
pub fn error_name(e: &proto::Error) -> String {
    use zbus::DBusError;
    match e {
        proto::Error::ZBus(zbus::Error::MethodError(name, _, _)) => name.to_string(),
        e => e.name().to_string(),
    }
}

/// Records every signal devmgrd sends and renders each as one line a test
/// can compare, naming objects by their `Name` (taken from InterfacesAdded,
/// or registered with [`SignalLog::label`]) instead of their paths:
///
/// - `+ host0` / `- host0`: InterfacesAdded / InterfacesRemoved
/// - `host0.State = removing`, `manager.ObjectCount = 3`: PropertiesChanged
///   (`Holders` renders as the holders' reasons)
/// - `RemovalCompleted host0`, `ReleaseRequested 0:0:0:1 (host0)`: the
///   contract's signals (the latter with what the removal waits for)
pub struct SignalLog {
    stream: MessageStream,
    labels: HashMap<String, String>,
}

type Interfaces = HashMap<String, HashMap<String, OwnedVariant>>;

impl SignalLog {
    /// Starts recording on `conn`.
    pub async fn new(conn: &zbus::Connection) -> SignalLog {
        let rule = MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(proto::BUS_NAME)
            .build()
            .expect("match rule");
        // Deep queue: the bus reader must never block behind this stream
        // while a test awaits a reply that sits after the signals.
        let stream =
            MessageStream::for_match_rule(rule, conn, std::num::NonZeroUsize::new(1 << 20))
                .await
                .expect("signal match rule");
        let mut labels = HashMap::new();
        labels.insert(proto::MANAGER_PATH.to_owned(), "manager".to_owned());
        labels.insert(proto::NO_OBJECT_PATH.to_owned(), "/".to_owned());
        SignalLog { stream, labels }
    }

    /// Names an object that existed before the log started.
    pub fn label(&mut self, path: &OwnedObjectPath, name: &str) {
        self.labels.insert(path.to_string(), name.to_owned());
    }

    fn name_of(&self, path: &str) -> String {
        self.labels
            .get(path)
            .cloned()
            .unwrap_or_else(|| path.to_owned())
    }

    /// The signals already received, rendered. Call it right after a method
    /// returns: devmgrd sends every signal a call caused before its reply,
    /// and one connection delivers them in order, so they are all here.
    pub fn drain(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(Some(Ok(msg))) = self.stream.next().now_or_never() {
            self.render(&msg, &mut lines);
        }
        lines
    }

    /// Waits (up to 10 s) until a line equal to `last` arrives; returns
    /// every line up to and including it. For what happens after a reply
    /// (a released fd, a deadline, a driver action completing).
    pub async fn until(&mut self, last: &str) -> Vec<String> {
        let mut lines = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(Ok(msg))) => self.render(&msg, &mut lines),
                _ => panic!("no {last:?} within 10 s; got {lines:#?}"),
            }
            if lines.iter().any(|l| l == last) {
                let at = lines.iter().position(|l| l == last).unwrap_or(0);
                let rest = lines.split_off(at + 1);
                assert!(
                    rest.is_empty(),
                    "lines after {last:?} in one signal: {rest:?}"
                );
                return lines;
            }
        }
    }

    fn render(&mut self, msg: &zbus::Message, lines: &mut Vec<String>) {
        let header = msg.header();
        let member = header.member().map(|m| m.to_string()).unwrap_or_default();
        let path = header.path().map(|p| p.to_string()).unwrap_or_default();
        let body = msg.body();
        match member.as_str() {
            "InterfacesAdded" => {
                let (added, ifaces): (OwnedObjectPath, Interfaces) =
                    body.deserialize().expect("InterfacesAdded body");
                let name = ifaces
                    .get(OBJECT)
                    .and_then(|props| props.get("Name"))
                    .and_then(|v| String::try_from(v.clone()).ok())
                    .unwrap_or_else(|| added.to_string());
                self.labels.insert(added.to_string(), name.clone());
                lines.push(format!("+ {name}"));
            }
            "InterfacesRemoved" => {
                let (removed, _): (OwnedObjectPath, Vec<String>) =
                    body.deserialize().expect("InterfacesRemoved body");
                lines.push(format!("- {}", self.name_of(removed.as_str())));
            }
            "PropertiesChanged" => {
                let (_, changed, invalidated): (
                    String,
                    HashMap<String, OwnedVariant>,
                    Vec<String>,
                ) = body.deserialize().expect("PropertiesChanged body");
                let mut changed: Vec<_> = changed.into_iter().collect();
                changed.sort_by(|a, b| a.0.cmp(&b.0));
                for (prop, value) in changed {
                    let value = self.render_value(&prop, &value);
                    lines.push(format!("{}.{prop} = {value}", self.name_of(&path)));
                }
                for prop in invalidated {
                    lines.push(format!("{}.{prop} invalidated", self.name_of(&path)));
                }
            }
            "RemovalCompleted" => {
                let (object, _, _): (OwnedObjectPath, String, String) =
                    body.deserialize().expect("RemovalCompleted body");
                lines.push(format!(
                    "RemovalCompleted {}",
                    self.name_of(object.as_str())
                ));
            }
            "ReleaseRequested" => {
                let (why,): (String,) = body.deserialize().expect("ReleaseRequested body");
                // "removal of <path> is waiting": show what the removal is of.
                let of = why
                    .split_whitespace()
                    .find(|w| w.starts_with('/'))
                    .map(|p| self.name_of(p))
                    .unwrap_or(why);
                lines.push(format!("ReleaseRequested {} ({of})", self.name_of(&path)));
            }
            // NameAcquired and the like come from the bus, not from devmgrd.
            _ => {}
        }
    }

    fn render_value(&self, prop: &str, value: &OwnedVariant) -> String {
        let v: &Variant<'_> = value;
        match (prop, v) {
            ("Holders", _) => {
                let holders: Vec<proto::HolderTuple> =
                    Vec::try_from(value.clone()).unwrap_or_default();
                let reasons: Vec<String> = holders.into_iter().map(|h| h.4).collect();
                format!("[{}]", reasons.join(", "))
            }
            (_, Variant::Str(s)) => s.to_string(),
            (_, Variant::ObjectPath(p)) => self.name_of(p.as_str()),
            (_, Variant::U32(n)) => n.to_string(),
            (_, Variant::U64(n)) => n.to_string(),
            (_, other) => format!("{other:?}"),
        }
    }
}

/// Reads from a handle until EOF or 5 s; true if the daemon closed its end.
pub fn handle_closed_by_daemon(fd: std::os::fd::OwnedFd) -> bool {
    // A handle is a pipe's read end: a blocking read on a thread, waited on
    // with a deadline (a thread left blocked only outlives a failing test).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut handle = std::fs::File::from(fd);
        let _ = tx.send(matches!(
            std::io::Read::read(&mut handle, &mut [0u8; 8]),
            Ok(0)
        ));
    });
    rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false)
}

/// Runs devctl against `bus` (through `$DEVMGR_BUS_ADDRESS`, as a user would).
pub fn devctl(bus: &TestBus, args: &[&str]) -> Output {
    devctl_command(bus, args).output().expect("run devctl")
}

/// A devctl command for `bus`, to spawn in the background.
pub fn devctl_command(bus: &TestBus, args: &[&str]) -> Command {
    let mut c = Command::new(binary("devctl"));
    c.args(args)
        .env("DEVMGR_BUS_ADDRESS", &bus.address)
        .env_remove("NO_COLOR");
    c
}

/// stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A message with `builder`'s header and `body_of`'s body, byte for byte:
/// what benchmark controls send to compare a minimal sender with devmgrd
/// on the very same payloads.
pub fn with_body_of(builder: zbus::message::Builder<'_>, body_of: &zbus::Message) -> zbus::Message {
    let body = body_of.body();
    // SAFETY: the bytes and signature are a body that was received from
    // the bus, which checked it: a well-formed body of that signature, in
    // the received message's byte order, which the copy keeps.
    #[allow(unsafe_code)]
    let built = unsafe {
        builder
            .endian(body_of.primary_header().endian_sig().into())
            .build_raw_body(body.data().bytes(), body.signature().clone(), Vec::new())
    };
    built.expect("a copy of a received body")
}
