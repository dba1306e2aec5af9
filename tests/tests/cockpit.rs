//! The Cockpit page (issue 15) in a real browser: the package built from
//! the source tree (`cargo xtask cockpit`), served by a real `cockpit-ws
//! --local-session=cockpit-bridge`, talking to the real devmgrd on a private
//! system-type bus with the shipped policy; headless Chromium driven by
//! selenium and chromedriver (tests/cockpit/page_test.py). Scenarios: root
//! (the page in Cockpit's menu, the tree, holders, a pending removal
//! completing by itself, the dry run, force, stop, re-enable, add, errors),
//! a real mounted disk removed from the page once unmounted, a user devmgrd
//! does not authorize
//! (read-only), a user polkit would challenge (refused, readably, nothing
//! changed), and 10,000 objects with bursts of 1,000 changes (timings are
//! printed with `--nocapture`). It needs root, cockpit-ws, chromium,
//! chromedriver and python3-selenium, and fails, never skips, without
//! them. One browser at a time: the scenarios take the same lock.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use devmgr_tests::disks::{self, LoopDisk};
use devmgr_tests::system_bus::{self, SystemBus};
use devmgr_tests::*;

const COCKPIT_WS: &str = "/usr/lib/cockpit/cockpit-ws";
const PYTHON: &str = "/usr/bin/python3";

/// Chromium takes 300–460 MiB and most of a core: one at a time.
static ONE_BROWSER: Mutex<()> = Mutex::new(());

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What the browser tests need, each named with its package.
fn require_tools() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the Cockpit test runs cockpit-ws as another user: run it as root"
    );
    for (path, package) in [
        (COCKPIT_WS, "cockpit-ws"),
        ("/usr/bin/cockpit-bridge", "cockpit-bridge"),
        ("/usr/bin/chromium", "chromium"),
        ("/usr/bin/chromedriver", "chromium-driver"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing (package {package}; .ci/deps installs it)"
        );
    }
    let selenium = Command::new(PYTHON)
        .args(["-c", "import selenium"])
        .output()
        .expect("python3");
    assert!(
        selenium.status.success(),
        "python3-selenium is missing (.ci/deps installs it): {}",
        String::from_utf8_lossy(&selenium.stderr)
    );
}

/// The page, built from the source tree and copied where a user other
/// than root can read it: XDG_DATA_HOME/cockpit/devmgr.
fn page_data_home() -> TempDir {
    let out = Command::new(env!("CARGO"))
        .current_dir(workspace())
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "xtask",
            "--",
            "cockpit",
        ])
        .output()
        .expect("cargo xtask cockpit");
    assert!(
        out.status.success(),
        "cargo xtask cockpit: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let home = TempDir::unique("cockpit-data");
    let target = home.0.join("cockpit/devmgr");
    copy_tree(&workspace().join("data/cockpit/devmgr"), &target);
    let status = Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(&home.0)
        .status()
        .expect("chmod");
    assert!(status.success());
    home
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the page's directory");
    for entry in std::fs::read_dir(from).expect("read the page") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("a name");
        if path.is_dir() {
            copy_tree(&path, &to.join(name));
        } else {
            std::fs::copy(&path, to.join(name)).expect("copy a page file");
        }
    }
}

/// A cockpit-ws serving one local session, as `user`, whose bridge talks to
/// the system-type bus at `bus`. Killed when dropped.
struct CockpitWs {
    child: Child,
    url: String,
    _home: TempDir,
}

impl CockpitWs {
    fn start(user: Option<&str>, bus: &str, data_home: &Path) -> CockpitWs {
        // A free port: bound, read and let go (cockpit-ws binds it next).
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let home = TempDir::unique("cockpit-home");
        std::fs::create_dir_all(&home.0).expect("home");
        let mut command = match user {
            None => Command::new(COCKPIT_WS),
            Some(user) => {
                let status = Command::new("chown")
                    .arg(user)
                    .arg(&home.0)
                    .status()
                    .expect("chown");
                assert!(status.success());
                let mut c = Command::new("setpriv");
                c.args([
                    "--reuid",
                    user,
                    "--regid",
                    "nogroup",
                    "--clear-groups",
                    COCKPIT_WS,
                ]);
                c
            }
        };
        let child = command
            .args(["--port", &port.to_string(), "-a", "127.0.0.1"])
            .arg("--local-session=cockpit-bridge")
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &home.0)
            .env("XDG_CACHE_HOME", home.0.join(".cache"))
            .env("XDG_DATA_HOME", data_home)
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cockpit-ws");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "cockpit-ws did not listen on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        CockpitWs {
            child,
            url: format!("http://127.0.0.1:{port}/cockpit/@localhost/devmgr/index.html"),
            _home: home,
        }
    }
}

impl Drop for CockpitWs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one scenario of page_test.py against `ws`; returns its timings.
fn browse(scenario: &str, ws: &CockpitWs, bus: &str, env: &[(&str, &str)]) -> String {
    let shots = workspace().join("target/cockpit-screenshots");
    let out = Command::new(PYTHON)
        .arg(workspace().join("tests/cockpit/page_test.py"))
        .arg(scenario)
        .env("PAGE_URL", &ws.url)
        .env("DEVCTL", binary("devctl"))
        .env("DEVMGR_BUS_ADDRESS", bus)
        .env("SCREENSHOTS", &shots)
        .envs(env.iter().copied())
        .output()
        .expect("python3 page_test.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let timings = stdout
        .lines()
        .find_map(|l| l.strip_prefix("TIMINGS "))
        .unwrap_or("{}")
        .to_owned();
    assert!(
        out.status.success(),
        "the {scenario} scenario failed (screenshot in {}):\n{}\n{stdout}",
        shots.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{scenario}: {timings}");
    timings
}

/// polkitd on `bus` (it starts as root and drops to its own user).
struct Polkitd(Child);

impl Polkitd {
    fn start(bus: &str) -> Polkitd {
        let child = Command::new("/usr/lib/polkit-1/polkitd")
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
            .arg("--no-debug")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("polkitd (package polkitd)");
        let polkitd = Polkitd(child);
        wait_for(
            || {
                busctl_at(bus, &["status", "org.freedesktop.PolicyKit1"])
                    .status
                    .success()
            },
            "polkitd on the system-type bus",
        );
        polkitd
    }
}

impl Drop for Polkitd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A file put in place for the test and taken away after.
struct Placed(PathBuf);

impl Placed {
    fn new(path: String, text: &str) -> Placed {
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{path}: {e}"));
        Placed(PathBuf::from(path))
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// As root: the tree with the machine's devices and simulated ones told
/// apart, a host whose LUN is held removed and shown pending with the
/// holder's reason, then gone from the page when the holder lets go (no
/// reload); the dry run then a confirmed removal; force and detach-mounts
/// with their warnings; stop, re-enable, cancel; add from the page; an
/// error by its D-Bus name.
#[test]
fn an_administrator_sees_who_holds_what_and_removes_a_busy_host() {
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    require_tools();
    let data = page_data_home();
    let bus = SystemBus::start();
    // The machine's real devices (kernel uevents), never acted on.
    let _daemon = Daemon::start_at(&bus.address, &["--udev-source", "kernel", "--no-actuate"]);
    let ws = CockpitWs::start(None, &bus.address, &data.0);
    browse("admin", &ws, &bus.address, &[]);
}

/// A real disk: a loop device of the test's with a mounted ext4. The page
/// shows the kernel's mount as its holder; the removal made from the page
/// waits for it (the filesystem stays mounted), and the loop device goes,
/// for real, once unmounted.
#[test]
fn a_mounted_disk_removed_from_the_page_goes_once_unmounted() {
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    require_tools();
    let _real_disks = disks::exclusive();
    let data = page_data_home();
    let bus = SystemBus::start();
    let _daemon = Daemon::start_at(&bus.address, &["--udev-source", "kernel"]);
    let mut disk = LoopDisk::create("cockpit", 16);
    disk.mkfs(&disk.node());
    let at = disk.mount_point("srv");
    disk.mount(&disk.node(), &at);
    let ws = CockpitWs::start(None, &bus.address, &data.0);
    browse(
        "disk",
        &ws,
        &bus.address,
        &[
            ("DISK", &disk.name()),
            ("MOUNT_POINT", &at.to_string_lossy()),
        ],
    );
    assert!(!LoopDisk::is_mounted(&at));
    assert!(!disk.sys_block().exists(), "the loop device is gone");
}

/// As `nobody`, whom devmgrd does not authorize and no polkit runs for:
/// everything is shown, the actions are disabled and say why, the page
/// says it is read-only, and nothing changes.
#[test]
fn a_user_without_rights_sees_everything_read_only() {
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    require_tools();
    let data = page_data_home();
    let bus = SystemBus::start();
    let _daemon = Daemon::start_at(&bus.address, &["--no-udev"]);
    let ws = CockpitWs::start(Some("nobody"), &bus.address, &data.0);
    browse("readonly", &ws, &bus.address, &[]);
}

/// As `nobody`, whom a polkit rule would let act after authenticating
/// (GetPermissions says "challenge", so the page offers the actions):
/// devmgrd refuses each, the page shows AccessDenied by name with how to
/// get authorized, and nothing changes.
#[test]
fn a_refused_action_is_shown_by_its_error_name_and_changes_nothing() {
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    require_tools();
    let data = page_data_home();
    let actions = std::fs::read_to_string(workspace().join("data/org.devmgr.DevMgr1.policy"))
        .expect("the polkit actions");
    let id = std::process::id();
    let _actions = Placed::new(
        format!("/usr/share/polkit-1/actions/org.devmgr.DevMgr1.cockpit-test-{id}.policy"),
        &actions,
    );
    let _rule = Placed::new(
        format!("/etc/polkit-1/rules.d/10-devmgr-cockpit-test-{id}.rules"),
        "polkit.addRule(function(action, subject) {\n\
         \x20   if (subject.user == \"nobody\" && action.id.indexOf(\"org.devmgr.DevMgr1.\") == 0)\n\
         \x20       return polkit.Result.AUTH_ADMIN;\n\
         });\n",
    );
    let polkit_policy = Path::new("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf");
    let bus = SystemBus::start_with(&[&system_bus::data_policy(), polkit_policy], None);
    let _polkitd = Polkitd::start(&bus.address);
    let _daemon = Daemon::start_at(&bus.address, &["--no-udev"]);
    let ws = CockpitWs::start(Some("nobody"), &bus.address, &data.0);
    browse("refused", &ws, &bus.address, &[]);
}

/// 10,000 objects (one Add) render, then an Add and a Remove of 1,000 LUNs
/// each reach the open page without freezing it; the timings are printed
/// (docs/cockpit.md has them), not asserted.
#[test]
fn ten_thousand_objects_render_and_bursts_keep_the_page_responsive() {
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    require_tools();
    let data = page_data_home();
    let bus = SystemBus::start();
    let _daemon = Daemon::start_at(&bus.address, &["--no-udev"]);
    let ws = CockpitWs::start(None, &bus.address, &data.0);
    browse("scale", &ws, &bus.address, &[]);
}
