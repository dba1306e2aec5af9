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
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use devmgr_tests::disks::{self, LoopDisk};
use devmgr_tests::system_bus::{self, start_polkitd, Installed, SystemBus};
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
    cargo_xtask(&["cockpit"]);
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
        // A process group of its own: cockpit-bridge starts a session bus
        // (dbus-daemon --session) that outlives a killed bridge unless the
        // whole group goes (Drop).
        let child = command
            .process_group(0)
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
        // cockpit-ws, its bridge and the bridge's session bus.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let group = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
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

/// Holds the browser lock (one Chromium at a time) once the tools are
/// known to be there.
fn one_browser() -> std::sync::MutexGuard<'static, ()> {
    let guard = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    require_tools();
    guard
}

/// Runs `scenario` against devmgrd (started with `daemon_args` on `bus`)
/// through a cockpit-ws run as `user` (root if none).
fn run_scenario(
    scenario: &str,
    bus: &SystemBus,
    user: Option<&str>,
    daemon_args: &[&str],
    env: &[(&str, &str)],
) {
    let data = page_data_home();
    let _daemon = Daemon::start_at(&bus.address, daemon_args);
    let ws = CockpitWs::start(user, &bus.address, &data.0);
    browse(scenario, &ws, &bus.address, env);
}

/// As root: the page in Cockpit's menu; the tree with the machine's
/// devices and simulated ones told apart, a host whose LUN is held removed
/// and shown pending with the holder's reason, then gone from the page when
/// the holder lets go (no reload); the dry run then a confirmed removal;
/// force and detach-mounts with their warnings; stop, re-enable, cancel;
/// add from the page; an error by its D-Bus name.
#[test]
fn an_administrator_sees_who_holds_what_and_removes_a_busy_host() {
    let _one = one_browser();
    // The machine's real devices (kernel uevents), never acted on.
    let args = ["--udev-source", "kernel", "--no-actuate"];
    run_scenario("admin", &SystemBus::start(), None, &args, &[]);
}

/// A real disk: a loop device of the test's with a mounted ext4. The page
/// shows the kernel's mount as its holder; the removal made from the page
/// waits for it (the filesystem stays mounted), and the loop device goes,
/// for real, once unmounted.
#[test]
fn a_mounted_disk_removed_from_the_page_goes_once_unmounted() {
    let _one = one_browser();
    let _real_disks = disks::exclusive();
    let mut disk = LoopDisk::create("cockpit", 16);
    disk.mkfs(&disk.node());
    let at = disk.mount_point("srv");
    disk.mount(&disk.node(), &at);
    let env = [
        ("DISK", disk.name()),
        ("MOUNT_POINT", at.to_string_lossy().into_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = ["--udev-source", "kernel"];
    run_scenario("disk", &SystemBus::start(), None, &args, &env);
    assert!(!LoopDisk::is_mounted(&at));
    assert!(!disk.sys_block().exists(), "the loop device is gone");
}

/// As `nobody`, whom devmgrd does not authorize and no polkit runs for:
/// everything is shown, the actions are disabled and say why, the page
/// says it is read-only, and nothing changes.
#[test]
fn a_user_without_rights_sees_everything_read_only() {
    let _one = one_browser();
    run_scenario(
        "readonly",
        &SystemBus::start(),
        Some("nobody"),
        &["--no-udev"],
        &[],
    );
}

/// As `nobody`, whom a polkit rule would let act after authenticating
/// (GetPermissions says "challenge", so the page offers the actions):
/// devmgrd refuses each, the page shows AccessDenied by name with how to
/// get authorized, and nothing changes.
#[test]
fn a_refused_action_is_shown_by_its_error_name_and_changes_nothing() {
    let _one = one_browser();
    let actions = std::fs::read_to_string(workspace().join("data/org.devmgr.DevMgr1.policy"))
        .expect("the polkit actions");
    let id = std::process::id();
    let _actions = Installed::new(
        format!("/usr/share/polkit-1/actions/org.devmgr.DevMgr1.cockpit-test-{id}.policy"),
        &actions,
    );
    let _rule = Installed::new(
        format!("/etc/polkit-1/rules.d/10-devmgr-cockpit-test-{id}.rules"),
        "polkit.addRule(function(action, subject) {\n\
         \x20   if (subject.user == \"nobody\" && action.id.indexOf(\"org.devmgr.DevMgr1.\") == 0)\n\
         \x20       return polkit.Result.AUTH_ADMIN;\n\
         });\n",
    );
    let bus = system_bus::polkit_bus();
    let _polkitd = start_polkitd(&bus.address);
    run_scenario("refused", &bus, Some("nobody"), &["--no-udev"], &[]);
}

/// 10,000 objects (one Add) render, then an Add and a Remove of 1,000 LUNs
/// each reach the open page without freezing it; the timings are printed
/// (docs/cockpit.md has them), not asserted.
#[test]
fn ten_thousand_objects_render_and_bursts_keep_the_page_responsive() {
    let _one = one_browser();
    run_scenario("scale", &SystemBus::start(), None, &["--no-udev"], &[]);
}

/// The page's mirror of the model (store.js) on its own, under `node
/// --test` (tests/cockpit/store_test.mjs): pages and signals in bus order,
/// moves, removals, and what a pending removal waits for. Needs no browser.
#[test]
fn the_pages_mirror_follows_pages_and_signals_in_bus_order() {
    let out = Command::new("node")
        .arg("--test")
        .arg(workspace().join("tests/cockpit/store_test.mjs"))
        .output()
        .expect("node (Node.js; .ci/deps installs it)");
    assert!(
        out.status.success(),
        "node --test store_test.mjs:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
