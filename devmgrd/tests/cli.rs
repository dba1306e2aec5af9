//! devmgrd's command line, without a bus: it reports an unreachable bus
//! clearly and exits non-zero. (Everything that needs a bus is in the
//! workspace's tests/ crate.)

use std::process::Command;

#[test]
fn an_unreachable_bus_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_devmgrd"))
        .args(["--bus", "unix:path=/nonexistent/devmgr-test.sock"])
        .output()
        .expect("devmgrd");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot serve"));
}
