//! `devmgrd --replay`: a SCSI host with a target, LUNs, disks and
//! partitions, from a fixture in the kernel's uevent format, fed through a
//! FIFO so the test can act between events: the tree as sysfs has it, then
//! a surprise removal of a held LUN (rule 8). The fixtures' block devices
//! have major 60 (local/experimental use, no real device's): devmgrd reads
//! the machine's real /proc for their users, and must find none.

use devmgr_tests::*;

const HOST: &str = include_str!("../fixtures/scsi-host.uevents");
const LUN_REMOVED: &str = include_str!("../fixtures/scsi-lun-removed.uevents");

fn ok(bus: &TestBus, args: &[&str]) -> String {
    let out = devctl(bus, args);
    assert!(
        out.status.success(),
        "devctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

fn state(bus: &TestBus, obj: &str) -> Option<String> {
    let out = devctl(bus, &["--json", "show", obj]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["state"].as_str().map(str::to_owned)
}

#[test]
fn a_replayed_scsi_host_builds_its_tree_and_a_held_lun_survives_surprise_removal() {
    let dir = TempDir::unique("replay");
    let (bus, daemon, mut events) = replaying(&dir, &[]);
    feed(&mut events, HOST);
    wait_for(|| state(&bus, "sdb").is_some(), "the replayed tree");
    assert_eq!(
        ok(&bus, &["tree"]),
        "\
NAME           KIND    STATE  DRIVER  REFS
sim-scsi       driver  live   -       0
sd             driver  live   -       0
host0          host    live   -       0
└─target0:0:0  device  live   -       0
  ├─0:0:0:0    device  live   sd      0
  │ └─sda      device  live   -       0
  │   ├─sda1   device  live   -       0
  │   └─sda2   device  live   -       0
  └─0:0:0:1    device  live   sd      0
    └─sdb      device  live   -       0
"
    );
    let sda1: serde_json::Value =
        serde_json::from_str(&ok(&bus, &["--json", "show", "sda1"])).expect("JSON");
    assert_eq!(sda1["origin"], "udev");
    assert_eq!(sda1["subsystem"], "block");
    assert_eq!(
        sda1["sys_path"],
        "/sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda/sda1"
    );
    assert_eq!(sda1["attributes"]["udev.devtype"], "partition");
    // The `bind` events made the kernel's `sd` driver an object.
    let sd: serde_json::Value =
        serde_json::from_str(&ok(&bus, &["--json", "show", "driver/sd"])).expect("JSON");
    assert_eq!(sd["origin"], "udev");

    // Hold the LUN, then the kernel pulls it: its idle disk goes at once,
    // the LUN is gone (held), and goes when let go of. A gone object's
    // name is free at once, so it is followed by its id from here on.
    let lun: serde_json::Value =
        serde_json::from_str(&ok(&bus, &["--json", "show", "0:0:0:1"])).expect("JSON");
    let lun_id = lun["id"].to_string();
    let mut holder = devctl_command(&bus, &["hold", "0:0:0:1"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("devctl hold");
    wait_for(
        || {
            let out = devctl(&bus, &["--json", "show", "0:0:0:1"]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|v| v["ref_count"] == 1)
        },
        "the hold",
    );
    feed(&mut events, LUN_REMOVED);
    wait_for(
        || state(&bus, &lun_id).as_deref() == Some("gone"),
        "the LUN to be gone",
    );
    assert_eq!(state(&bus, "0:0:0:1"), None, "a gone object's name is free");
    assert_eq!(state(&bus, "sdb"), None, "the idle disk went at once");
    assert_eq!(state(&bus, "0:0:0:0").as_deref(), Some("live"));
    let _ = holder.kill();
    let _ = holder.wait();
    wait_for(
        || state(&bus, &lun_id).is_none(),
        "the released LUN to be removed",
    );

    // End of the replay: the daemon says how much it replayed.
    drop(events);
    daemon.wait_for_log("replayed 14 events");
}

/// Removing a SCSI LUN writes `1` to its sysfs `delete` (here in a fake
/// sysfs tree) and waits, `removing`, for the kernel's remove events.
#[test]
fn removing_a_scsi_lun_deletes_it_through_sysfs_and_waits_for_the_kernel() {
    let dir = TempDir::unique("scsi-delete");
    let lun_dir = dir
        .0
        .join("sys/devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:1");
    std::fs::create_dir_all(&lun_dir).expect("fake sysfs");
    std::fs::write(lun_dir.join("delete"), "").expect("fake delete");
    let root_arg = dir.0.to_string_lossy().into_owned();
    let (bus, _daemon, mut events) = replaying(&dir, &["--sysfs-root", &root_arg]);
    feed(&mut events, HOST);
    wait_for(|| state(&bus, "sdb").is_some(), "the replayed tree");
    let lun: serde_json::Value =
        serde_json::from_str(&ok(&bus, &["--json", "show", "0:0:0:1"])).expect("JSON");
    let lun_id = lun["id"].to_string();

    ok(&bus, &["remove", "0:0:0:1"]);
    wait_for(
        || std::fs::read_to_string(lun_dir.join("delete")).is_ok_and(|s| s == "1"),
        "devmgrd to write 1 to the LUN's delete",
    );
    assert_eq!(state(&bus, &lun_id).as_deref(), Some("removing"));
    // Its disk goes with it, when the kernel removes it (rule 20: never
    // dropped from the model while the kernel has it).
    assert_eq!(state(&bus, "sdb").as_deref(), Some("removing"));

    // The kernel confirms: the disk, then the LUN leave the model.
    feed(&mut events, LUN_REMOVED);
    wait_for(|| state(&bus, &lun_id).is_none(), "the LUN to be removed");
    assert_eq!(state(&bus, "sdb"), None);
    assert_eq!(state(&bus, "0:0:0:0").as_deref(), Some("live"));
}

/// A device bound to a kernel driver is removed by unbinding it: its name
/// goes into the driver's sysfs `unbind` (a fake sysfs here), and the
/// kernel's `unbind` event completes the removal.
#[test]
fn removing_a_driver_bound_device_unbinds_it_and_waits_for_the_kernel() {
    let dir = TempDir::unique("unbind");
    let device = "sys/devices/pci0000:00/0000:00:14.0/usb1/1-1";
    let drivers_dir = dir.0.join("sys/bus/usb/drivers/usb");
    std::fs::create_dir_all(dir.0.join(device)).expect("fake device");
    std::fs::create_dir_all(&drivers_dir).expect("fake driver");
    std::fs::write(drivers_dir.join("unbind"), "").expect("fake unbind");
    std::os::unix::fs::symlink(&drivers_dir, dir.0.join(device).join("driver")).expect("link");
    let root_arg = dir.0.to_string_lossy().into_owned();
    let (bus, _daemon, mut events) =
        replaying(&dir, &["--sysfs-root", &root_arg, "--subsystems", "usb"]);
    let devpath = "/devices/pci0000:00/0000:00:14.0/usb1/1-1";
    let block = |action: &str, seq: u32| {
        format!(
            "KERNEL[{seq}.0] {action} {devpath} (usb)\nACTION={action}\nDEVPATH={devpath}\n\
             SUBSYSTEM=usb\nDEVTYPE=usb_device\nDRIVER=usb\nSEQNUM={seq}\n\n"
        )
    };
    feed(&mut events, &block("add", 1));
    wait_for(|| state(&bus, "1-1").is_some(), "the usb device");
    let dev: serde_json::Value =
        serde_json::from_str(&ok(&bus, &["--json", "show", "1-1"])).expect("JSON");
    let dev_id = dev["id"].to_string();
    assert!(dev["driver"].is_string(), "bound at once: {dev}");

    ok(&bus, &["remove", "1-1"]);
    wait_for(
        || std::fs::read_to_string(drivers_dir.join("unbind")).is_ok_and(|s| s == "1-1"),
        "devmgrd to write 1-1 to the driver's unbind",
    );
    assert_eq!(state(&bus, &dev_id).as_deref(), Some("removing"));
    let mut unbind = block("unbind", 2);
    unbind = unbind.replace("DRIVER=usb\n", "");
    feed(&mut events, &unbind);
    wait_for(
        || state(&bus, &dev_id).is_none(),
        "the unbound device to be removed",
    );
}

/// A `change` uevent updates the attributes people see (the kept udev
/// properties), with one PropertiesChanged.
#[test]
fn a_change_event_updates_the_attributes() {
    let dir = TempDir::unique("change");
    let (bus, _daemon, mut events) = replaying(&dir, &[]);
    let devpath = "/devices/virtual/block/loop77";
    let block = |action: &str, seq: u32, extra: &str| {
        format!(
            "UDEV  [{seq}.0] {action} {devpath} (block)\nACTION={action}\nDEVPATH={devpath}\n\
             SUBSYSTEM=block\nDEVTYPE=disk\nDEVNAME=/dev/loop77\nMAJOR=60\nMINOR=77\n{extra}SEQNUM={seq}\n\n"
        )
    };
    feed(&mut events, &block("add", 1, ""));
    wait_for(|| state(&bus, "loop77").is_some(), "the loop device");
    let attributes = |bus: &TestBus| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&ok(bus, &["--json", "show", "loop77"]))
            .expect("JSON")["attributes"]
            .clone()
    };
    assert_eq!(attributes(&bus)["udev.DEVNAME"], "/dev/loop77");
    assert!(attributes(&bus)["udev.ID_FS_TYPE"].is_null());
    feed(
        &mut events,
        &block("change", 2, "ID_FS_TYPE=ext4\nID_FS_LABEL=data\n"),
    );
    wait_for(
        || attributes(&bus)["udev.ID_FS_TYPE"] == "ext4",
        "the new attributes",
    );
    assert_eq!(attributes(&bus)["udev.ID_FS_LABEL"], "data");
    assert_eq!(attributes(&bus)["udev.MINOR"], "77");
}
