//! A machine with real SCSI hosts, replayed (`--replay` of the kernel's
//! uevents, `--sysfs-root` at a fake sysfs tree; there is no SCSI here):
//! - names: the README walk-through's simulated `host0` beside the
//!   machine's own `host0`, and a real device that appears later beside an
//!   API object of its name (rule 20, docs/kernel-users.md, "Names");
//! - a disk or partition of a SCSI device cannot be removed alone;
//! - a device stacked on a disk (dm, from sysfs `holders/`) holds it;
//! - rule 19's race, with a fake SCSI device whose disk is a real loop
//!   device: devmgrd's exclusive claim is held while it acts (the fake
//!   `delete` is a FIFO, so the action waits for the test), and a mount
//!   tried meanwhile fails; a mount that got in first (in a mount
//!   namespace devmgrd had not seen) makes the claim fail, the action is
//!   abandoned and the removal waits for that mount, named.
//!
//! The fake disks are numbered with major 60, "local/experimental use" in
//! the kernel's devices.txt, which no real device has: devmgrd's watcher
//! reads the machine's real /proc, and a fake `sda` numbered 8:0 would
//! show the real sda's mounts (and a fake dm-0 at 254:0, this machine's
//! vda). Only the race test's disks are real (its own loop devices).

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use devmgr_tests::disks::{self, LoopDisk, Reaped};
use devmgr_tests::*;

const HOST: &str = include_str!("../fixtures/scsi-host.uevents");

fn ok(bus: &TestBus, args: &[&str]) -> String {
    let out = devctl(bus, args);
    assert!(
        out.status.success(),
        "devctl {args:?}: {}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

fn show(bus: &TestBus, obj: &str) -> Option<serde_json::Value> {
    let out = devctl(bus, &["--json", "show", obj]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("JSON"))
}

/// devmgrd replaying a FIFO in `dir`, with a fake sysfs at `dir`.
fn replaying_at(dir: &TempDir) -> (TestBus, Daemon, std::fs::File) {
    let root = dir.0.to_string_lossy().into_owned();
    replaying(dir, &["--sysfs-root", &root])
}

/// One event in the kernel's uevent format.
fn uevent(action: &str, devpath: &str, subsystem: &str, properties: &[(&str, &str)]) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(5000);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut text = format!(
        "KERNEL[{seq}.0] {action} {devpath} ({subsystem})\nACTION={action}\nDEVPATH={devpath}\nSUBSYSTEM={subsystem}\n"
    );
    for (k, v) in properties {
        text.push_str(&format!("{k}={v}\n"));
    }
    text.push_str(&format!("SEQNUM={seq}\n\n"));
    text
}

/// A SCSI host `hostN` with one LUN `N:0:0:L` per (disk name, device
/// number, DEVNAME) given, in a fake sysfs under `root` (each LUN with a
/// `delete`, a FIFO if `fifo_delete`); returns its add events and the
/// LUNs' sysfs directories.
fn scsi_host(
    root: &Path,
    host: u32,
    disks: &[(&str, (u32, u32), &str)],
    fifo_delete: bool,
) -> (String, Vec<PathBuf>) {
    let hostpath = format!("/devices/platform/fake-hba/host{host}");
    let target = format!("{hostpath}/target{host}:0:0");
    let mut events = uevent("add", &hostpath, "scsi", &[("DEVTYPE", "scsi_host")]);
    events += &uevent("add", &target, "scsi", &[("DEVTYPE", "scsi_target")]);
    let mut luns = Vec::new();
    for (lun, (disk, (major, minor), devname)) in disks.iter().enumerate() {
        let lunpath = format!("{target}/{host}:0:0:{lun}");
        let dir = root.join(format!("sys{lunpath}"));
        std::fs::create_dir_all(&dir).expect("fake sysfs");
        if fifo_delete {
            disks::run("mkfifo", &[&dir.join("delete").to_string_lossy()]);
        } else {
            std::fs::write(dir.join("delete"), "").expect("fake delete");
        }
        events += &uevent("add", &lunpath, "scsi", &[("DEVTYPE", "scsi_device")]);
        let (major, minor) = (major.to_string(), minor.to_string());
        events += &uevent(
            "add",
            &format!("{lunpath}/block/{disk}"),
            "block",
            &[
                ("DEVTYPE", "disk"),
                ("MAJOR", &major),
                ("MINOR", &minor),
                ("DEVNAME", devname),
            ],
        );
        luns.push(dir);
    }
    (events, luns)
}

/// The events the kernel sends when it deletes a LUN (its disk first).
fn lun_removed(lun_dir: &Path, root: &Path, disk: &str) -> String {
    let lunpath = lun_dir
        .strip_prefix(root.join("sys"))
        .map(|p| format!("/{}", p.display()))
        .expect("a LUN under the fake sysfs");
    uevent(
        "remove",
        &format!("{lunpath}/block/{disk}"),
        "block",
        &[("DEVTYPE", "disk")],
    ) + &uevent("remove", &lunpath, "scsi", &[("DEVTYPE", "scsi_device")])
}

/// The README walk-through on a machine whose own SCSI host is `host0`
/// with LUNs `0:0:0:0` and `0:0:0:1`: the simulated `host0` is another
/// object; plain names are the client's, `udev:` names the machine's; a
/// real device that appears later beside an API object of its name is
/// modelled; disks and partitions of a SCSI device are refused alone.
#[test]
fn the_walk_through_on_a_machine_with_real_scsi_hosts() {
    let dir = TempDir::unique("scsi-names");
    let (bus, _daemon, mut events) = replaying_at(&dir);
    feed(&mut events, HOST);
    wait_for(|| show(&bus, "sdb").is_some(), "the machine's tree");

    ok(
        &bus,
        &[
            "add", "host", "host0", "--driver", "sim-scsi", "--luns", "4",
        ],
    );
    // A streamed list shows the scopes too (ListObjects' Scoped).
    let list = ok(&bus, &["list"]);
    assert!(
        list.contains("udev:host0") && list.contains("api:host0"),
        "{list}"
    );
    let tree = ok(&bus, &["tree"]);
    for line in [
        "udev:host0",
        "api:host0",
        "udev:0:0:0:0",
        "api:0:0:0:0",
        "api:0:0:0:1",
    ] {
        assert!(tree.contains(line), "{line} in\n{tree}");
    }
    assert!(tree.contains("─0:0:0:2"), "{tree}");
    assert_eq!(show(&bus, "host0").expect("host0")["origin"], "api");
    assert_eq!(show(&bus, "udev:host0").expect("host0")["origin"], "udev");
    assert_eq!(show(&bus, "0:0:0:0").expect("LUN")["origin"], "api");

    // Hold the simulated LUN, remove the simulated host: it is pending; the
    // machine's host0 is untouched.
    let mut holder = devctl_command(&bus, &["hold", "0:0:0:2", "--reason", "backup"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("devctl hold");
    wait_for(
        || show(&bus, "0:0:0:2").is_some_and(|l| l["ref_count"] == 1),
        "the hold",
    );
    let text = ok(&bus, &["remove", "host0"]);
    assert!(
        text.starts_with("host/host0: disabled, removal pending"),
        "{text}"
    );
    assert_eq!(show(&bus, "api:host0").expect("host0")["state"], "removing");
    assert_eq!(show(&bus, "udev:host0").expect("host0")["state"], "live");
    assert_eq!(show(&bus, "udev:0:0:0:0").expect("LUN")["state"], "live");
    let _ = holder.kill();
    let _ = holder.wait();
    wait_for(
        || show(&bus, "api:host0").is_none(),
        "the simulated host to go",
    );
    assert_eq!(show(&bus, "host0").expect("host0")["origin"], "udev");

    // An API host1 first, then the machine's own host1 appears.
    ok(&bus, &["add", "host", "host1"]);
    let (host1, _) = scsi_host(&dir.0, 1, &[], false);
    feed(&mut events, &host1);
    wait_for(|| show(&bus, "udev:host1").is_some(), "the machine's host1");
    assert_eq!(show(&bus, "host1").expect("host1")["origin"], "api");

    // A SCSI device's disk and partitions go only with it.
    for (obj, parent) in [("sda", "0:0:0:0"), ("sda1", "sda")] {
        let out = devctl(&bus, &["remove", obj]);
        assert_eq!(out.status.code(), Some(1), "{obj}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("org.devmgr.DevMgr1.Error.NotSupported"),
            "{err}"
        );
        assert!(err.contains(&format!("device {parent} (id")), "{err}");
        assert_eq!(show(&bus, obj).expect(obj)["state"], "live");
    }
}

/// A dm device stacked on a SCSI disk (sysfs `holders/`) holds it: the
/// LUN's removal waits, named "held by dm-0 (vg0-data)", and completes
/// when the kernel takes dm-0 down.
#[test]
fn a_stacked_device_holds_its_disk_until_it_goes() {
    let dir = TempDir::unique("stacked");
    let root = dir.0.clone();
    let class = root.join("sys/class/block");
    std::fs::create_dir_all(class.join("sdc/holders/dm-0")).expect("fake holders");
    std::fs::create_dir_all(class.join("dm-0/slaves/sdc")).expect("fake slaves");
    std::fs::create_dir_all(class.join("dm-0/dm")).expect("fake dm");
    std::fs::write(class.join("dm-0/dm/name"), "vg0-data\n").expect("dm name");
    let (bus, _daemon, mut events) = replaying_at(&dir);
    let (host, luns) = scsi_host(&root, 5, &[("sdc", (60, 32), "sdc")], false);
    feed(&mut events, &host);
    feed(
        &mut events,
        &uevent(
            "add",
            "/devices/virtual/block/dm-0",
            "block",
            &[
                ("DEVTYPE", "disk"),
                ("MAJOR", "60"),
                ("MINOR", "200"),
                ("DEVNAME", "dm-0"),
            ],
        ),
    );
    wait_for(
        || {
            show(&bus, "sdc").is_some_and(|d| {
                d["holders"]
                    .as_array()
                    .is_some_and(|h| h.iter().any(|h| h["reason"] == "held by dm-0 (vg0-data)"))
            })
        },
        "dm-0 among sdc's holders",
    );
    let text = ok(&bus, &["remove", "5:0:0:0"]);
    assert!(text.contains("held by dm-0 (vg0-data)"), "{text}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        std::fs::read_to_string(luns[0].join("delete")).expect("delete"),
        ""
    );

    // The kernel takes dm-0 down: its holder link goes, then its uevent.
    std::fs::remove_dir_all(class.join("sdc/holders/dm-0")).expect("unlink");
    feed(
        &mut events,
        &uevent(
            "remove",
            "/devices/virtual/block/dm-0",
            "block",
            &[("DEVTYPE", "disk")],
        ),
    );
    wait_for(
        || std::fs::read_to_string(luns[0].join("delete")).is_ok_and(|s| s == "1"),
        "devmgrd to delete the LUN",
    );
    feed(&mut events, &lun_removed(&luns[0], &root, "sdc"));
    wait_for(|| show(&bus, "5:0:0:0").is_none(), "the LUN to go");
    assert!(show(&bus, "sdc").is_none());
}

/// The reader of a LUN's `delete` FIFO: what devmgrd wrote (within 10 s).
fn read_delete(fifo: &Path) -> String {
    let fifo = fifo.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::fs::File::open(&fifo).and_then(|mut f| f.read_to_string(&mut text));
        let _ = tx.send(text);
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("devmgrd to write the LUN's delete")
}

/// Whether anything holds an exclusive claim of `node`.
fn claimed(node: &Path) -> bool {
    Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import os,sys\ntry: os.close(os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL))\n\
             except OSError as e: sys.exit(3 if e.errno == 16 else 1)",
        ])
        .arg(node)
        .status()
        .is_ok_and(|s| s.code() == Some(3))
}

/// A process that mounts `device` at `at` in a mount namespace of its own,
/// made without starting a program (so devmgrd is not told of it), and
/// stays until killed.
fn hidden_mount(device: &Path, at: &Path) -> Reaped {
    let mut child = Reaped::spawn(Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import ctypes,signal,sys\n\
             libc=ctypes.CDLL(None, use_errno=True)\n\
             def ok(rc, what):\n\
             \x20   if rc != 0: raise OSError(ctypes.get_errno(), what)\n\
             ok(libc.unshare(0x00020000), 'unshare')\n\
             ok(libc.mount(None, b'/', None, 16384 | (1 << 18), None), 'make private')\n\
             ok(libc.mount(sys.argv[1].encode(), sys.argv[2].encode(), b'ext4', 0, None), 'mount')\n\
             print('mounted', flush=True)\n\
             signal.pause()",
        ])
        .arg(device)
        .arg(at)
        .stdout(Stdio::piped()), "python3");
    let mut line = [0u8; 8];
    let read = child.stdout.as_mut().map(|o| o.read_exact(&mut line));
    assert!(
        matches!(read, Some(Ok(()))) && &line[..7] == b"mounted",
        "the hidden mount failed"
    );
    child
}

/// Rule 19, both ways, with a fake SCSI device whose disk is a real loop
/// device (the fake disk has the loop device's number and node).
#[test]
fn a_real_action_never_races_a_new_user() {
    let _one = disks::exclusive();
    let dir = TempDir::unique("race");
    let root = dir.0.clone();
    let mut first = LoopDisk::create("race-a", 32);
    let second = LoopDisk::create("race-b", 32);
    for disk in [&first, &second] {
        disk.mkfs(&disk.node());
    }
    let (bus, daemon, mut events) = replaying_at(&dir);
    let (a, b) = (first.name(), second.name());
    let (host, luns) = scsi_host(
        &root,
        7,
        &[
            ("sdy", (7, first.number), &a),
            ("sdz", (7, second.number), &b),
        ],
        true,
    );
    feed(&mut events, &host);
    wait_for(|| show(&bus, "sdz").is_some(), "the fake SCSI disks");

    // 1. The action holds the claim: a mount tried meanwhile fails.
    ok(&bus, &["remove", "7:0:0:0"]);
    wait_for(|| claimed(&first.node()), "devmgrd's exclusive claim");
    let at = first.mount_point("racing");
    let mounted = Command::new("mount")
        .arg(first.node())
        .arg(&at)
        .output()
        .expect("mount");
    if mounted.status.success() {
        let _ = Command::new("umount").arg(&at).status();
        panic!("a mount made while devmgrd acts must fail");
    }
    let why = String::from_utf8_lossy(&mounted.stderr);
    assert!(why.contains("busy"), "refused by the claim (EBUSY): {why}");
    assert_eq!(read_delete(&luns[0].join("delete")), "1");
    feed(&mut events, &lun_removed(&luns[0], &root, "sdy"));
    wait_for(|| show(&bus, "7:0:0:0").is_none(), "the first LUN to go");
    assert!(!LoopDisk::is_mounted(&at));
    // The control: with devmgrd's claim let go, the same mount works (the
    // fake LUN's deletion left the real loop device in place).
    wait_for(|| !claimed(&first.node()), "devmgrd to let go of its claim");
    first.mount(&first.node(), &at);
    first.umount(&at);

    // 2. A mount that got in first, where devmgrd did not look: the claim
    //    fails, the action is abandoned, and the removal waits for it.
    let at = second.mount_point("hidden");
    let mut hidden = hidden_mount(&second.node(), &at);
    std::thread::sleep(Duration::from_millis(300));
    let unseen = show(&bus, "sdz").expect("sdz");
    assert_eq!(
        unseen["ref_count"], 0,
        "devmgrd saw the hidden mount: {unseen}"
    );
    let text = ok(&bus, &["remove", "7:0:0:1"]);
    assert!(text.contains("nothing holds it"), "{text}");
    wait_for(
        || {
            show(&bus, "sdz").is_some_and(|d| {
                d["holders"].as_array().is_some_and(|h| {
                    h.iter().any(|h| {
                        h["bus_name"] == "kernel:mount"
                            && h["reason"]
                                .as_str()
                                .is_some_and(|r| r.contains("in the mount namespace of python3"))
                    })
                })
            })
        },
        "the hidden mount among sdz's holders",
    );
    assert_eq!(show(&bus, "7:0:0:1").expect("LUN")["state"], "removing");
    daemon.wait_for_log("the removal of object");
    // The action was abandoned before it wrote anything.
    let fifo = luns[1].join("delete");
    let mut peek = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(0o4000) // O_NONBLOCK: only to look
        .open(&fifo)
        .expect("open the FIFO");
    std::thread::sleep(Duration::from_millis(200));
    let mut buf = [0u8; 4];
    assert!(
        !matches!(peek.read(&mut buf), Ok(n) if n > 0),
        "devmgrd deleted a LUN whose disk was mounted"
    );
    drop(peek);

    // The namespace's last process goes: its mount, then the LUN.
    hidden.stop();
    assert_eq!(read_delete(&fifo), "1");
    feed(&mut events, &lun_removed(&luns[1], &root, "sdz"));
    wait_for(|| show(&bus, "7:0:0:1").is_none(), "the second LUN to go");
}
