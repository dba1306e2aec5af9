//! devmgr as a system service under a real systemd (PID 1 of a Debian 12
//! container booted with systemd-nspawn), installed by `cargo xtask
//! install` into the container's root, once with dbus-daemon and once with
//! dbus-broker as the system bus: start and status, the journal, D-Bus
//! activation by busctl and devctl with the first call already seeing the
//! machine's devices, the sandbox enforced (devices, exposure) with a real
//! loop device removed under it (pending while mounted, completed by
//! umount), restart and crash keeping the administrative state, and polkit
//! with the real polkitd. It needs root, mmdebstrap and systemd-nspawn, and
//! fails, never skips, without them. Timings are printed (`--nocapture`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devmgr_tests::container::{self, Container, SystemBus};
use devmgr_tests::disks::{exclusive, LoopDisk};
use devmgr_tests::*;

/// The project's staged install, as a package build makes it: `cargo
/// xtask install` with the release binaries the suite already built.
fn install_into(root: &Path) {
    let bin_dir = binary("devmgrd")
        .parent()
        .expect("binary dir")
        .to_path_buf();
    let (root, bin_dir) = (root.to_string_lossy(), bin_dir.to_string_lossy());
    cargo_xtask(&[
        "install",
        "--destdir",
        &root,
        "--prefix",
        "/usr",
        "--bin-dir",
        &bin_dir,
    ]);
}

/// The users of the polkit checks, and a rules.d file that lets the
/// `devmgr-admins` group act without a password.
fn add_users(c: &Container) {
    c.ok("useradd --create-home alice && groupadd devmgr-admins && \
          useradd --create-home --groups devmgr-admins bob");
    std::fs::create_dir_all(c.root.join("etc/polkit-1/rules.d")).expect("rules.d");
    std::fs::write(
        c.root.join("etc/polkit-1/rules.d/50-devmgr-admins.rules"),
        "polkit.addRule(function(action, subject) {\n\
         \x20   if (action.id.indexOf(\"org.devmgr.DevMgr1.\") == 0 &&\n\
         \x20       subject.isInGroup(\"devmgr-admins\")) {\n\
         \x20       return polkit.Result.YES;\n\
         \x20   }\n\
         });\n",
    )
    .expect("rules file");
}

/// The field `name` of every JSON journal entry of the unit.
fn journal(c: &Container) -> Vec<serde_json::Value> {
    c.ok("journalctl -u devmgrd.service -o json --no-pager")
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn main_pid(c: &Container) -> u32 {
    c.ok("systemctl show -p MainPID --value devmgrd.service")
        .trim()
        .parse()
        .expect("MainPID")
}

/// Waits (up to 20 s) until `script` succeeds inside.
fn until(c: &Container, script: &str, what: &str) {
    let start = Instant::now();
    while c.sh(script).status != Some(0) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}; devmgrd's journal:\n{}",
            c.sh("journalctl -u devmgrd --no-pager | tail -30").stdout
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What one run measured.
struct Timings {
    boot: Duration,
    start: Duration,
    activation_busctl: Duration,
    activation_devctl: Duration,
    run: Duration,
}

fn run_under(root: &Path, bus: SystemBus) -> Timings {
    let began = Instant::now();
    let _disks = exclusive();
    // A disk of our own, made on the host (mkfs here, mounted inside).
    let disk = LoopDisk::create("systemd-disk", 16);
    disk.mkfs(&disk.node());
    let name = disk.name();
    let c = Container::boot(root, bus, &[disk.node()], install_into);
    add_users(&c);
    let bus_unit = c.ok("systemctl show -p Id --value dbus.service");
    let expected = match bus {
        SystemBus::DbusDaemon => "dbus.service",
        SystemBus::DbusBroker => "dbus-broker.service",
    };
    assert_eq!(bus_unit.trim(), expected, "the system bus in use");

    // start, status
    let start = c.sh("systemctl start devmgrd.service");
    assert_eq!(start.status, Some(0), "systemctl start: {}", start.stderr);
    c.ok("systemctl is-active devmgrd.service");
    let status = c.sh("systemctl status --no-pager devmgrd.service");
    assert!(
        status.stdout.contains("active (running)"),
        "{}",
        status.stdout
    );
    assert!(
        status.stdout.contains("/usr/sbin/devmgrd --bus system"),
        "{}",
        status.stdout
    );

    // The journal: devmgrd's own fields and syslog's priorities.
    let entries = journal(&c);
    let serving = entries
        .iter()
        .find(|e| {
            e["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.starts_with("serving org.devmgr.DevMgr1"))
        })
        .unwrap_or_else(|| panic!("no 'serving' entry in {entries:#?}"));
    assert_eq!(
        serving["PRIORITY"], "6",
        "info is informational: {serving:#}"
    );
    assert_eq!(serving["_SYSTEMD_UNIT"], "devmgrd.service");
    assert!(
        serving["CODE_FILE"].is_string() && serving["TARGET"].is_string(),
        "{serving:#}"
    );
    let warning = c.sh("journalctl -u devmgrd -p warning --no-pager -q");
    assert!(
        warning.stdout.trim().is_empty(),
        "devmgrd warned on a clean start:\n{}",
        warning.stdout
    );

    // Introspection of the whole tree is clean (no warnings from busctl).
    let tree = c.sh("busctl tree org.devmgr.DevMgr1");
    assert_eq!(tree.status, Some(0), "{}", tree.stderr);
    assert!(
        tree.stderr.is_empty(),
        "busctl tree warned:\n{}",
        tree.stderr
    );
    assert!(
        tree.stdout.contains("/org/devmgr/DevMgr1/objects"),
        "{}",
        tree.stdout
    );

    // The model has the machine's devices, ours among them.
    let shown = c.ok(&format!("devctl --json show udev:{name}"));
    let shown: serde_json::Value = serde_json::from_str(&shown).expect("show JSON");
    assert_eq!(shown["state"], "live", "{shown:#}");

    // Activation by busctl: the first call sees the coldplug.
    c.ok("systemctl stop devmgrd.service");
    let first = c.sh(&format!(
        "busctl call org.devmgr.DevMgr1 /org/devmgr/DevMgr1 org.devmgr.DevMgr1.Manager \
         FindObject ss device {name}"
    ));
    assert_eq!(
        first.status,
        Some(0),
        "activation by busctl: {}",
        first.stderr
    );
    assert!(first.stdout.starts_with("o "), "{}", first.stdout);
    let activation_busctl = first.took;
    c.ok("systemctl is-active devmgrd.service");
    // … and by devctl.
    c.ok("systemctl stop devmgrd.service");
    let first = c.sh(&format!("devctl --json show udev:{name}"));
    assert_eq!(
        first.status,
        Some(0),
        "activation by devctl: {}",
        first.stderr
    );
    let activation_devctl = first.took;
    c.ok("systemctl is-active devmgrd.service");

    // The sandbox: exposure, and DevicePolicy enforced on the service's
    // cgroup: a process moved into it may open /dev/loop-control for
    // writing and the disk for reading, as DeviceAllow says, and not the
    // disk for writing.
    let security = c.ok("systemd-analyze security --no-pager devmgrd.service | tail -1");
    let exposure: f64 = security
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no exposure in {security:?}"));
    assert!(exposure < 3.0, "exposure {exposure}: {security}");
    eprintln!("{bus:?}: systemd-analyze security: {}", security.trim());
    let cgroup = c.ok("systemctl show -p ControlGroup --value devmgrd.service");
    let inside = |open: &str| {
        c.sh(&format!(
            "echo $$ > /sys/fs/cgroup{}/cgroup.procs && exec {open}",
            cgroup.trim()
        ))
    };
    let node = disk.node().display().to_string();
    for allowed in ["3<> /dev/loop-control", &format!("3< {node}")] {
        let out = inside(&format!("true {allowed}"));
        assert_eq!(
            out.status,
            Some(0),
            "DeviceAllow'd ({allowed}): {}",
            out.stderr
        );
    }
    let refused = inside(&format!("true 3<> {node}"));
    assert_ne!(
        refused.status,
        Some(0),
        "the disk was opened for writing in the service's cgroup"
    );
    assert!(
        refused.stderr.contains("Operation not permitted"),
        "{}",
        refused.stderr
    );
    // (Outside the service's cgroup the same open works.)
    c.ok(&format!("true 3<> {node}"));

    // A real removal under the sandbox: pending while mounted, completed by
    // umount, the kernel's device gone.
    c.ok(&format!(
        "mkdir -p /mnt/disk && mount {} /mnt/disk",
        disk.node().display()
    ));
    until(
        &c,
        &format!("devctl --json show udev:{name} | grep -q kernel:mount"),
        "the mount as a holder",
    );
    let removal = c.sh(&format!("devctl remove udev:{name}"));
    assert_eq!(
        removal.status,
        Some(0),
        "{}{}",
        removal.stdout,
        removal.stderr
    );
    assert!(removal.stdout.contains("pending"), "{}", removal.stdout);
    c.ok("umount /mnt/disk");
    until(
        &c,
        &format!("! devctl show udev:{name} >/dev/null 2>&1"),
        "the removal to complete",
    );
    let gone = Instant::now();
    while disk.sys_block().exists() {
        assert!(
            gone.elapsed() < Duration::from_secs(10),
            "{name} is still in the kernel; journal:\n{}",
            c.sh("journalctl -u devmgrd --no-pager | tail -20").stdout
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Restart and crash keep the administrative state; references hang up.
    c.ok("devctl add host sdhost --driver sim-scsi --luns 2 >/dev/null");
    c.ok("devctl hold host/sdhost >/tmp/hold.log 2>&1 & echo $! > /tmp/hold.pid");
    until(&c, "grep -q holding /tmp/hold.log", "devctl hold to hold");
    c.ok("devctl stop host/sdhost");
    c.ok("systemctl restart devmgrd.service");
    until(
        &c,
        "! kill -0 $(cat /tmp/hold.pid)",
        "the holder to see its handle hang up",
    );
    let hold_log = c.ok("cat /tmp/hold.log");
    assert!(hold_log.contains("revoked"), "{hold_log}");
    let state = |c: &Container| {
        let out = c.ok("devctl --json show host/sdhost");
        serde_json::from_str::<serde_json::Value>(&out).expect("JSON")["state"].clone()
    };
    assert_eq!(state(&c), "stopped", "after systemctl restart");
    c.ok(
        "devctl reenable host/sdhost && devctl hold host/sdhost >/tmp/hold.log 2>&1 & \
          echo $! > /tmp/hold.pid",
    );
    until(
        &c,
        "grep -q holding /tmp/hold.log",
        "devctl hold to hold again",
    );
    c.ok("devctl stop host/sdhost");
    let before = main_pid(&c);
    c.ok(&format!("kill -9 {before}"));
    until(
        &c,
        "! kill -0 $(cat /tmp/hold.pid)",
        "the holder to see its handle hang up",
    );
    until(
        &c,
        &format!(
            "test \"$(systemctl show -p MainPID --value devmgrd)\" -ne 0 && \
                  test \"$(systemctl show -p MainPID --value devmgrd)\" -ne {before} && \
                  systemctl is-active devmgrd"
        ),
        "Restart=on-failure after kill -9",
    );
    assert_eq!(state(&c), "stopped", "after kill -9");
    let restarts = c.ok("systemctl show -p NRestarts --value devmgrd.service");
    assert_eq!(restarts.trim(), "1", "one restart by systemd");

    // polkit, with the real polkitd on the real system bus.
    let alice = c.sh("setpriv --reuid=alice --regid=alice --init-groups -- \
                      devctl add host alicehost --driver sim-scsi");
    assert_eq!(
        alice.status,
        Some(77),
        "alice: {}{}",
        alice.stdout,
        alice.stderr
    );
    assert!(
        alice.stderr.contains("AccessDenied") || alice.stderr.contains("not authorized"),
        "{}",
        alice.stderr
    );
    c.ok("! devctl show host/alicehost >/dev/null 2>&1");
    let bob = c.sh("setpriv --reuid=bob --regid=bob --init-groups -- \
                    devctl add host bobhost --driver sim-scsi");
    assert_eq!(
        bob.status,
        Some(0),
        "bob (devmgr-admins): {}{}",
        bob.stdout,
        bob.stderr
    );
    c.ok("devctl show host/bobhost >/dev/null");
    let actions = c.ok("pkaction --verbose");
    let policy = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/org.devmgr.DevMgr1.policy"),
    )
    .expect("policy");
    for action in policy.split("<action id=\"").skip(1) {
        let id = action.split('"').next().unwrap_or_default();
        let description = action
            .split("<description>")
            .nth(1)
            .and_then(|d| d.split('<').next())
            .unwrap_or_default();
        assert!(
            actions.contains(&format!("{id}:\n  description:       {description}")),
            "pkaction does not list {id} ({description}):\n{actions}"
        );
    }

    let timings = Timings {
        boot: c.boot_time,
        start: start.took,
        activation_busctl,
        activation_devctl,
        run: Duration::ZERO,
    };
    drop(c);
    Timings {
        run: began.elapsed(),
        ..timings
    }
}

#[test]
fn devmgr_under_systemd_with_dbus_daemon_and_dbus_broker() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the systemd test needs root (it boots a container)"
    );
    let began = Instant::now();
    // What the run must leave as it found it.
    let sysctls = [
        "fs/file-max",
        "fs/nr_open",
        "net/unix/max_dgram_qlen",
        "kernel/pid_max",
    ];
    let read_sysctls = || {
        sysctls
            .iter()
            .map(|k| std::fs::read_to_string(format!("/proc/sys/{k}")).unwrap_or_default())
            .collect::<Vec<_>>()
    };
    let sysctls_before = read_sysctls();
    let loops_before = container::host("losetup", &["--list", "--noheadings", "-O", "NAME"]);
    let (root, built): (PathBuf, Duration) = container::root();
    eprintln!("container root {}: ready in {built:.1?}", root.display());
    for bus in [SystemBus::DbusDaemon, SystemBus::DbusBroker] {
        let t = run_under(&root, bus);
        eprintln!(
            "{bus:?}: boot {:.2?}, systemctl start {:.0?}, first call → reply by busctl {:.0?}, \
             by devctl {:.0?}; this run {:.1?}",
            t.boot, t.start, t.activation_busctl, t.activation_devctl, t.run
        );
    }
    assert_eq!(
        read_sysctls(),
        sysctls_before,
        "sysctls {sysctls:?} changed"
    );
    assert_eq!(
        container::host("losetup", &["--list", "--noheadings", "-O", "NAME"]),
        loops_before,
        "loop devices left behind"
    );
    let cgroups = container::host(
        "find",
        &[
            "/sys/fs/cgroup",
            "-name",
            "payload",
            "-o",
            "-name",
            "supervisor",
        ],
    );
    assert!(cgroups.trim().is_empty(), "cgroups left behind:\n{cgroups}");
    eprintln!("the systemd test took {:.1?}", began.elapsed());
}
