//! D-Bus activation, on a private system-type bus that runs devmgrd itself
//! from a service file (as the system bus does without systemd): devctl
//! starts the daemon when it is not running, and says why when the bus
//! cannot; an activated devmgrd with `--bus auto` serves on the bus that
//! started it (`$DBUS_STARTER_ADDRESS`), whatever other bus its
//! environment names.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use devmgr_tests::system_bus::{data_policy, SystemBus};
use devmgr_tests::*;

/// A directory holding devmgr's D-Bus service file, running `exec`.
fn services(exec: &str) -> TempDir {
    let dir = TempDir::unique("services");
    std::fs::create_dir_all(&dir.0).expect("service dir");
    std::fs::write(
        dir.0.join(format!("{}.service", proto::BUS_NAME)),
        format!("[D-BUS Service]\nName={}\nExec={exec}\n", proto::BUS_NAME),
    )
    .expect("service file");
    dir
}

/// The pid of whoever owns devmgr's name on the bus at `address`.
fn owner_pid(address: &str) -> Option<u32> {
    let out = busctl_at(
        address,
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetConnectionUnixProcessID",
            "s",
            proto::BUS_NAME,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().strip_prefix("u ")?.parse().ok()
}

/// An activated devmgrd, which no harness started: stopped when dropped.
struct Activated(u32);

impl Drop for Activated {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0 as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while std::path::Path::new(&format!("/proc/{}", self.0)).exists()
            && start.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn devctl_at(address: &str, args: &[&str]) -> Output {
    Command::new(binary("devctl"))
        .args(["--address", address])
        .args(args)
        .output()
        .expect("run devctl")
}

/// devmgrd as the service file starts it: `--bus auto`, and a session bus
/// address that leads nowhere, which `auto` alone would try first (and
/// then fall back to an embedded bus, leaving the activation waiting).
fn activated_devmgrd(runtime: &TempDir) -> String {
    format!(
        "/usr/bin/env DBUS_SESSION_BUS_ADDRESS=unix:path=/nonexistent/bus {} \
         --no-config --no-udev --bus auto --runtime-dir {}",
        binary("devmgrd").display(),
        runtime.0.display()
    )
}

#[test]
fn devctl_starts_devmgrd_by_activation_on_the_bus_that_asked() {
    let runtime = TempDir::unique("activated");
    let dir = services(&activated_devmgrd(&runtime));
    let bus = SystemBus::start_with(&[&data_policy()], Some(&dir.0));
    assert_eq!(owner_pid(&bus.address), None, "nothing runs yet");
    let out = devctl_at(&bus.address, &["--json", "status"]);
    let pid = owner_pid(&bus.address);
    let _stop = pid.map(Activated);
    assert!(
        out.status.success(),
        "devctl status did not start devmgrd: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON status");
    assert!(status.is_object(), "{status}");
    assert!(
        pid.is_some(),
        "devmgrd owns its name on the bus that started it"
    );
    // The next call finds it running: the same daemon answers.
    assert!(devctl_at(&bus.address, &["status"]).status.success());
    assert_eq!(owner_pid(&bus.address), pid);
}

#[test]
fn busctl_starts_devmgrd_by_activation() {
    let runtime = TempDir::unique("activated");
    let dir = services(&activated_devmgrd(&runtime));
    let bus = SystemBus::start_with(&[&data_policy()], Some(&dir.0));
    let out = busctl_at(
        &bus.address,
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
    );
    let _stop = owner_pid(&bus.address).map(Activated);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("o "));
}

#[test]
fn a_bus_that_cannot_start_devmgrd_is_reported_as_such() {
    let bus = SystemBus::start();
    let out = devctl_at(&bus.address, &["status"]);
    assert_eq!(out.status.code(), Some(69), "EX_UNAVAILABLE");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the bus cannot start it"), "{err}");
}

#[test]
fn a_start_that_fails_is_reported_with_the_bus_error() {
    let dir = services("/bin/false");
    let bus = SystemBus::start_with(&[&data_policy()], Some(&dir.0));
    let out = devctl_at(&bus.address, &["status"]);
    assert_eq!(out.status.code(), Some(69), "EX_UNAVAILABLE");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("starting org.devmgr.DevMgr1 failed")
            && err.contains("org.freedesktop.DBus.Error.Spawn.ChildExited"),
        "{err}"
    );
}
