//! A private *system-type* dbus-daemon built from the machine's own
//! system.conf, with devmgr's bus policy (or an installed copy) in force,
//! and callers that run as `nobody`: what the policy, authorization and
//! install tests share.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{busctl_at, wait_for, wait_for_listener, TempDir};

/// The stock system bus configuration, listening on `socket`, with these
/// policy files included and what a private test bus must not do (fork,
/// switch user, write a pid file, activate the machine's services) taken
/// out; services in `service_dir`, if any, are activated (by dbus-daemon
/// itself: there is no launch helper).
fn system_config(socket: &Path, policies: &[&Path], service_dir: Option<&Path>) -> String {
    let stock = std::fs::read_to_string("/usr/share/dbus-1/system.conf")
        .expect("/usr/share/dbus-1/system.conf (package dbus)");
    let mut out = String::new();
    for line in stock.lines() {
        let t = line.trim();
        let drop = [
            "<user>",
            "<fork/>",
            "<pidfile>",
            "<syslog/>",
            "<servicehelper>",
            "<standard_system_servicedirs/>",
            "<include",
            "<includedir>",
        ]
        .iter()
        .any(|p| t.starts_with(p));
        if drop {
            continue;
        }
        if t.starts_with("<listen>") {
            out.push_str(&format!(
                "  <listen>unix:path={}</listen>\n",
                socket.display()
            ));
            continue;
        }
        if t == "</busconfig>" {
            for policy in policies {
                out.push_str(&format!("  <include>{}</include>\n", policy.display()));
            }
            if let Some(dir) = service_dir {
                out.push_str(&format!("  <servicedir>{}</servicedir>\n", dir.display()));
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A running system-type bus, stopped when dropped.
pub struct SystemBus {
    child: Child,
    pub address: String,
    _dir: TempDir,
}

impl Drop for SystemBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// devmgr's bus policy, as checked in.
pub fn data_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/org.devmgr.DevMgr1.conf")
}

impl SystemBus {
    /// A system-type bus with data/'s policy.
    pub fn start() -> SystemBus {
        SystemBus::start_with(&[&data_policy()], None)
    }

    /// A system-type bus with these policies, activating the services of
    /// `service_dir` if given. The bus's own address is its children's
    /// DBUS_SYSTEM_BUS_ADDRESS, so an activated `--bus system` daemon
    /// connects back to it.
    pub fn start_with(policies: &[&Path], service_dir: Option<&Path>) -> SystemBus {
        let dir = TempDir::unique("system-bus");
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        let socket = dir.0.join("system_bus_socket");
        let address = format!("unix:path={}", socket.display());
        let config = dir.0.join("system.conf");
        std::fs::write(&config, system_config(&socket, policies, service_dir)).expect("config");
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .arg("--nofork")
            .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dbus-daemon");
        wait_for_listener(&socket, "the system-type bus");
        SystemBus {
            child,
            address,
            _dir: dir,
        }
    }
}

/// `busctl --address ADDRESS args…` as `nobody`.
pub fn busctl_as_nobody(address: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--address", address];
    all.extend_from_slice(args);
    as_nobody("busctl", &all)
}

/// `nobody` calls devmgrd (FindObject of the sim-scsi driver): what a
/// policy that lets anyone call must allow.
pub fn nobody_calls(address: &str) -> std::process::Output {
    busctl_as_nobody(
        address,
        &[
            "call",
            proto::BUS_NAME,
            proto::MANAGER_PATH,
            proto::MANAGER_INTERFACE,
            "FindObject",
            "ss",
            "driver",
            proto::SIM_SCSI_DRIVER,
        ],
    )
}

/// Runs `program args` as `nobody`.
pub fn as_nobody(program: &str, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(program)
        .args(args)
        .output()
        .expect("setpriv (package util-linux)")
}

/// A python-dbus script that calls every mutation, then Acquire, as the current user of the python
/// process, on host `h` (driver sim-scsi); prints one line per call: the
/// D-Bus error name, or `ok`.
const EVERY_CALL: &str = r#"import dbus, sys
bus = dbus.bus.BusConnection(sys.argv[1])
m = dbus.Interface(bus.get_object("org.devmgr.DevMgr1", "/org/devmgr/DevMgr1"), "org.devmgr.DevMgr1.Manager")
host = m.FindObject("host", "h")
drv = m.FindObject("driver", "sim-scsi")
o = dbus.Interface(bus.get_object("org.devmgr.DevMgr1", host), "org.devmgr.DevMgr1.Object")
none = dbus.Dictionary({}, signature="sv")
calls = [
    ("Add", lambda: m.Add("host", "intruder", dbus.ObjectPath("/"), none)),
    ("Stop", lambda: o.Stop(none)),
    ("Reenable", lambda: o.Reenable(none)),
    ("Bind", lambda: o.Bind(drv, none)),
    ("Unbind", lambda: o.Unbind(none)),
    ("Remove", lambda: o.Remove(none)),
    ("Acquire", lambda: o.Acquire("look", none)),
]
for name, call in calls:
    try:
        call()
        print(name, "ok")
    except dbus.exceptions.DBusException as e:
        print(name, e.get_dbus_name())
"#;

/// Runs [`EVERY_CALL`] as `nobody`, in `groups` if given; what it printed.
pub fn run_every_call(address: &str, groups: Option<&str>) -> String {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup"]);
    match groups {
        Some(g) => c.arg(format!("--groups={g}")),
        None => c.arg("--clear-groups"),
    };
    let out = c
        .args(["--", "/usr/bin/python3", "-c", EVERY_CALL, address])
        .output()
        .expect("setpriv + python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file put in place for one test and removed after it.
pub struct Installed(std::path::PathBuf);

impl Installed {
    pub fn new(path: impl Into<std::path::PathBuf>, contents: &str) -> Installed {
        let path = path.into();
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {} (root needed): {e}", path.display()));
        Installed(path)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// polkitd on a system-type bus (one with the polkit bus policy:
/// [`polkit_bus`]), stopped when dropped.
pub struct Polkitd(Child);

impl Drop for Polkitd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts polkitd on the bus at `address` and waits for its name.
pub fn start_polkitd(address: &str) -> Polkitd {
    let polkitd = "/usr/lib/polkit-1/polkitd";
    assert!(
        Path::new(polkitd).exists(),
        "{polkitd} is missing (package polkitd; .ci/deps installs it)"
    );
    // It starts as root and switches to its own user by itself.
    let child = Command::new(polkitd)
        .env("DBUS_SYSTEM_BUS_ADDRESS", address)
        .arg("--no-debug")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("polkitd");
    let polkitd = Polkitd(child);
    wait_for(
        || {
            busctl_at(address, &["status", "org.freedesktop.PolicyKit1"])
                .status
                .success()
        },
        "polkitd on the system-type bus",
    );
    polkitd
}

/// A system-type bus with devmgr's policy and polkitd's, for tests that
/// run polkitd on it.
pub fn polkit_bus() -> SystemBus {
    let polkit_policy = Path::new("/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf");
    SystemBus::start_with(&[&data_policy(), polkit_policy], None)
}
