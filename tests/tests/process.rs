//! Process hygiene and bus choice: one daemon per name, SIGTERM exits 0 and
//! drops the name, the embedded private bus serves real clients, cleans up,
//! and dies with a killed daemon.

use std::process::Command;

use devmgr_tests::*;

#[test]
fn a_second_daemon_refuses_to_steal_the_name() {
    let bus = TestBus::start();
    let _first = Daemon::start(&bus);
    let second = devmgrd_command()
        .args(["--no-udev", "--bus", &bus.address])
        .output()
        .expect("second devmgrd");
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already owned"), "{stderr}");
    // The first still serves.
    assert!(bus.busctl(&["status", proto::BUS_NAME]).status.success());
}

#[test]
fn the_embedded_bus_serves_real_clients_and_cleans_up() {
    let dir = TempDir::unique("rt");
    let (daemon, address) = Daemon::start_embedded(&dir);
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
    let dir = TempDir::unique("rt");
    let (mut daemon, _) = Daemon::start_embedded(&dir);
    // A second daemon on the same runtime directory is refused.
    let second = devmgrd_command()
        .args(["--no-udev", "--bus", "embedded", "--runtime-dir"])
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
    let (_again, address) = Daemon::start_embedded(&dir);
    assert!(busctl_at(&address, &["tree", proto::BUS_NAME])
        .status
        .success());
}

/// Bus loss (issue 6): when the bus goes away, devmgrd has nothing to serve
/// and exits non-zero with a clear line, so a service manager restarts it.
#[test]
fn losing_the_bus_ends_the_daemon_with_an_error() {
    let mut bus = TestBus::start();
    let mut daemon = Daemon::start(&bus);
    bus.child.kill().expect("SIGKILL the bus");
    let _ = bus.child.wait();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = daemon.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "devmgrd still runs without its bus"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!status.success(), "{status}");
    daemon.wait_for_log("lost the connection to the");
}
