//! The kernel's own users of real disks (DESIGN.md §2 rules 17–19), with
//! real loop devices, ext4, swap, partitions, mounts in this and another
//! mount namespace, and processes holding a node open: each is a holder
//! named in `Holders` and by devctl, a removal waits for it and completes
//! by itself when it goes, force never unmounts and detach-mounts does,
//! and devmgrd itself never keeps a disk busy.
//!
//! These need root, /dev/loop-control, mkfs.ext4, mkswap, partx and
//! unshare; they fail, never skip, without them. They run one at a time
//! (`disks::exclusive`): a mount namespace made by one would copy another's
//! mounts and hold its disk.

use std::process::Command;
use std::time::{Duration, Instant};

use devmgr_tests::disks::{self, LoopDisk, Reaped};
use devmgr_tests::*;
use zbus::OwnedObjectPath;

/// A private bus, devmgrd modelling block devices from kernel events (and
/// logging at debug level: `REAL_REMOVAL` says when it acts), and a client.
async fn watching(extra: &[&str]) -> (TestBus, Daemon, Client) {
    watching_from("kernel", extra).await
}

/// The same, with events from `source` (`udev`: after systemd-udevd, whose
/// workers open the devices they probe, as on a real machine).
async fn watching_from(source: &str, extra: &[&str]) -> (TestBus, Daemon, Client) {
    let bus = TestBus::start();
    let mut args = vec!["--udev-source", source, "--subsystems", "block"];
    args.extend_from_slice(extra);
    let daemon = Daemon::start_with_env(&bus, &args, &[("RUST_LOG", "devmgrd=debug")]);
    let client = Client::connect(&bus.address).await;
    (bus, daemon, client)
}

/// What devmgrd's log says when it begins a real removal (devmgrd/src/machine/effects.rs).
const REAL_REMOVAL: &str = "the real removal starts";

/// For two seconds — time enough for a real action — the device stays
/// `removing`, with no error, and devmgrd never begins its real removal.
async fn nothing_real_happens(
    daemon: &Daemon,
    client: &Client,
    path: &OwnedObjectPath,
    disk: &LoopDisk,
) {
    holds_for(
        "a pending removal with nothing real done",
        Duration::from_secs(2),
        || async {
            client.state(path).await.as_deref() == Some("removing")
                && client.last_error(path).await.as_deref() == Some("")
                && disk.sys_block().exists()
                && !daemon.log().contains(REAL_REMOVAL)
        },
    )
    .await;
}

/// Waits until `path`'s holders include one by `holder` whose reason
/// contains `text`; returns that holder.
async fn held_by(
    client: &Client,
    path: &OwnedObjectPath,
    holder: &str,
    text: &str,
) -> proto::HolderTuple {
    eventually(&format!("a {holder} holder saying {text:?}"), || async {
        client
            .holders(path)
            .await
            .iter()
            .any(|h| h.1 == holder && h.4.contains(text))
    })
    .await;
    client
        .holders(path)
        .await
        .into_iter()
        .find(|h| h.1 == holder && h.4.contains(text))
        .expect("the holder")
}

/// `devctl remove OBJ [args]`: its stdout, which must say pending.
fn remove_pending(bus: &TestBus, obj: &str, args: &[&str]) -> String {
    let mut all = vec!["remove", obj];
    all.extend_from_slice(args);
    let out = devctl(bus, &all);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("removal pending"), "{text}");
    text
}

/// Waits for the object to leave the model, then for the real device to
/// go; returns how long each wait took.
/// `devctl remove DISK --detach-mounts --wait=10`, which must succeed.
fn detach_mounts_and_wait(bus: &TestBus, disk: &LoopDisk) {
    let out = devctl(
        bus,
        &["remove", &disk.name(), "--detach-mounts", "--wait=10"],
    );
    assert!(
        out.status.success(),
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn removed_for_real(
    client: &Client,
    path: &OwnedObjectPath,
    disk: &LoopDisk,
) -> (Duration, Duration) {
    let limit = Duration::from_secs(10);
    let object = within(limit, || async { !client.exists(path).await })
        .await
        .unwrap_or_else(|| panic!("{} is still in the model", disk.name()));
    let real = within(limit, || async { !disk.sys_block().exists() })
        .await
        .unwrap_or_else(|| panic!("{} is still in sysfs", disk.sys_block().display()));
    (object, real)
}

/// The files devmgrd has open, as their links read.
fn open_by_devmgrd(daemon: &Daemon) -> Vec<String> {
    let dir = format!("/proc/{}/fd", daemon.child.id());
    let open: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .collect();
    assert!(
        open.iter().any(|l| l.starts_with("socket:")),
        "devmgrd's fds unreadable: {open:?}"
    );
    open
}

/// Rule 17 with a mounted ext4: the removal waits for the mount, which is
/// named in Holders, by devctl and its dry run; the filesystem is untouched;
/// the unmount completes the removal, for real.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_loop_device_waits_for_its_unmount_then_goes() {
    mounted_until_unmounted("kernel").await;
}

/// The same with the udev source (CI runs systemd-udevd).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udev_a_mounted_loop_device_waits_for_its_unmount_then_goes() {
    require_udevd();
    mounted_until_unmounted("udev").await;
}

async fn mounted_until_unmounted(source: &str) {
    let _one = disks::exclusive();
    let (bus, daemon, client) = watching_from(source, &[]).await;
    let mut disk = LoopDisk::create("mounted", 64);
    disk.mkfs(&disk.node());
    let at = disk.mount_point("srv");
    disk.mount(&disk.node(), &at);
    std::fs::write(at.join("data"), "kept").expect("a file on the filesystem");
    let path = client.appears(&disk.name()).await;
    let reason = format!("mounted at {} (ext4)", at.display());
    let holder = held_by(&client, &path, "kernel:mount", &reason).await;
    assert_eq!((holder.2, holder.3), (0, 0), "a mount has no process");
    // Only the mount, once udevd's workers have let go: probing the new
    // filesystem, one may hold the node open for a moment, a holder too
    // (CI once saw 2 here).
    eventually("the mount to be the only holder", || async {
        client.ref_count(&path).await == Some(1)
    })
    .await;

    let dry = stdout(&devctl(&bus, &["remove", &disk.name(), "--dry-run"]));
    assert!(dry.contains("would be disabled, removal pending"), "{dry}");
    assert!(dry.contains(&reason), "{dry}");
    let text = remove_pending(&bus, &disk.name(), &[]);
    assert!(text.contains(&reason), "{text}");
    assert_eq!(client.state(&path).await.as_deref(), Some("removing"));
    let show = stdout(&devctl(&bus, &["show", &disk.name()]));
    assert!(
        show.contains("kernel:mount") && show.contains(&reason),
        "{show}"
    );
    let tree = stdout(&devctl(&bus, &["tree"]));
    assert!(tree.contains(&reason), "{tree}");

    // Nothing real happens meanwhile: the filesystem is there and usable.
    nothing_real_happens(&daemon, &client, &path, &disk).await;
    assert!(LoopDisk::is_mounted(&at));
    assert_eq!(
        std::fs::read_to_string(at.join("data")).expect("read"),
        "kept"
    );
    // The watcher holds no node of the disk open.
    let node = disk.node().to_string_lossy().into_owned();
    assert!(!open_by_devmgrd(&daemon).contains(&node));

    disk.umount(&at);
    let (object, real) = removed_for_real(&client, &path, &disk).await;
    eprintln!(
        "{source}: umount -> object removed in {object:?}, /sys/block entry gone in {real:?}"
    );
    assert!(real < Duration::from_secs(2), "{real:?}");
}

/// A process with the node open (`sleep 600 < /dev/loopN`) is a holder,
/// named with its pid and program; its exit completes the removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_holding_the_node_is_named_and_its_exit_completes_the_removal() {
    let _one = disks::exclusive();
    let (bus, daemon, client) = watching(&[]).await;
    let disk = LoopDisk::create("process", 4);
    let path = client.appears(&disk.name()).await;
    let mut sleeper = Reaped::spawn(
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec sleep 600 < {}", disk.node().display())),
        "sleep",
    );
    let pid = sleeper.id();
    let reason = format!("open by sleep (pid {pid})");
    let holder = held_by(&client, &path, "kernel:process", &reason).await;
    assert_eq!(holder.3, pid);
    assert_eq!(holder.2, 0, "root's uid");

    let text = remove_pending(&bus, &disk.name(), &[]);
    assert!(
        text.contains(&format!("open by sleep (pid {pid}, uid 0)")),
        "{text}"
    );
    nothing_real_happens(&daemon, &client, &path, &disk).await;
    sleeper.stop();
    let (object, real) = removed_for_real(&client, &path, &disk).await;
    eprintln!("holder killed -> object removed in {object:?}, device gone in {real:?}");
}

/// Swap on a loop device holds it until swapoff; `devctl monitor` shows
/// the holder appear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_holds_a_loop_device_until_swapoff() {
    let _one = disks::exclusive();
    let (bus, _daemon, client) = watching(&[]).await;
    let mut disk = LoopDisk::create("swap", 16);
    let path = client.appears(&disk.name()).await;
    let mut monitor = Reaped::spawn(
        devctl_command(&bus, &["monitor", &disk.name()])
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped()),
        "devctl monitor",
    );
    let lines = std::io::BufRead::lines(std::io::BufReader::new(
        monitor.stdout.take().expect("stdout"),
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the snapshot");
    assert!(first.contains("present"), "{first}");
    disk.swapon(&disk.node());
    held_by(&client, &path, "kernel:swap", "swap").await;
    let seen = (0..20)
        .map_while(|_| rx.recv_timeout(Duration::from_secs(5)).ok())
        .find(|l| l.contains("Holders=[swap]"));
    assert!(seen.is_some(), "monitor never showed the swap holder");
    monitor.stop();
    let text = remove_pending(&bus, &disk.name(), &[]);
    assert!(text.contains("swap is on it"), "{text}");
    disk.swapoff(&disk.node());
    removed_for_real(&client, &path, &disk).await;
}

/// A mount that exists only in another mount namespace (`unshare -m`, as a
/// container's) holds the disk, named with that namespace's process; when
/// its last process exits the namespace is gone and so is the disk —
/// devmgrd keeps nothing of the namespace open that would keep it alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_in_another_mount_namespace_holds_the_disk() {
    let _one = disks::exclusive();
    let (bus, daemon, client) = watching(&[]).await;
    let disk = LoopDisk::create("namespace", 64);
    disk.mkfs(&disk.node());
    let at = disk.mount_point("inside");
    let path = client.appears(&disk.name()).await;
    let mut inside = Reaped::spawn(
        Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mount {} {} && exec sleep 600",
                disk.node().display(),
                at.display()
            )),
        "unshare (package util-linux)",
    );
    let pid = inside.id();
    let holder = held_by(
        &client,
        &path,
        "kernel:mount",
        &format!(
            "mounted at {} (ext4) in the mount namespace of",
            at.display()
        ),
    )
    .await;
    assert_eq!(holder.3, pid, "{holder:?}");
    assert!(!LoopDisk::is_mounted(&at), "not mounted in our namespace");
    let text = remove_pending(&bus, &disk.name(), &[]);
    assert!(text.contains("in the mount namespace of"), "{text}");
    inside.stop();
    removed_for_real(&client, &path, &disk).await;
    let mountinfo = format!("/proc/{pid}/mountinfo");
    assert!(
        !open_by_devmgrd(&daemon)
            .iter()
            .any(|l| l.contains(&mountinfo)),
        "devmgrd still has the dead namespace's mountinfo open"
    );
}

/// A partitioned loop device (partx -a) with a mounted partition: the
/// partition's mount holds the disk; the partition alone cannot be removed
/// (NotSupported, naming the disk); the unmount takes the disk and its
/// partitions away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_partition_holds_its_disk() {
    let _one = disks::exclusive();
    let (bus, _daemon, client) = watching(&[]).await;
    let mut disk = LoopDisk::create("partitions", 32);
    disk.partitions(2);
    disk.mkfs(&disk.partition(1));
    let at = disk.mount_point("p1");
    disk.mount(&disk.partition(1), &at);
    let path = client.appears(&disk.name()).await;
    let p1 = client.appears(&format!("{}p1", disk.name())).await;
    let p2 = client.appears(&format!("{}p2", disk.name())).await;
    let reason = format!("mounted at {} (ext4)", at.display());
    held_by(&client, &p1, "kernel:mount", &reason).await;

    let out = devctl(&bus, &["remove", &format!("{}p2", disk.name())]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("org.devmgr.DevMgr1.Error.NotSupported")
            && err.contains(&format!("only with device {} (id", disk.name())),
        "{err}"
    );
    assert_eq!(client.state(&p2).await.as_deref(), Some("live"));

    let text = remove_pending(&bus, &disk.name(), &[]);
    assert!(
        text.contains(&format!("device/{}p1 (removing, 1 reference)", disk.name())),
        "{text}"
    );
    assert!(text.contains(&reason), "{text}");
    disk.umount(&at);
    removed_for_real(&client, &path, &disk).await;
    assert!(!client.exists(&p1).await && !client.exists(&p2).await);
    assert!(!disk.partition(1).exists());
}

/// Re-enabling a removal that waits on a mount leaves the mount alone, and
/// a later unmount removes nothing. Force revokes references and never
/// unmounts; detach-mounts does, and the device goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reenable_keeps_the_mount_force_never_unmounts_detach_mounts_does() {
    let _one = disks::exclusive();
    let (bus, daemon, client) = watching(&[]).await;
    let mut disk = LoopDisk::create("force", 64);
    disk.mkfs(&disk.node());
    let at = disk.mount_point("mnt");
    disk.mount(&disk.node(), &at);
    let path = client.appears(&disk.name()).await;
    let reason = format!("mounted at {} (ext4)", at.display());
    held_by(&client, &path, "kernel:mount", &reason).await;

    remove_pending(&bus, &disk.name(), &[]);
    let out = devctl(&bus, &["reenable", &disk.name()]);
    assert!(out.status.success());
    assert_eq!(client.state(&path).await.as_deref(), Some("live"));
    assert!(LoopDisk::is_mounted(&at));
    disk.umount(&at);
    eventually("the mount to leave Holders", || async {
        client.holders(&path).await.is_empty()
    })
    .await;
    holds_for(
        "a cancelled removal removes nothing",
        Duration::from_secs(2),
        || async {
            client.state(&path).await.as_deref() == Some("live")
                && disk.sys_block().exists()
                && !daemon.log().contains(REAL_REMOVAL)
        },
    )
    .await;

    // A client's reference and a mount: force revokes the one, not the other.
    disk.mount(&disk.node(), &at);
    held_by(&client, &path, "kernel:mount", &reason).await;
    let fd = client.acquire(&path).await;
    let text = remove_pending(&bus, &disk.name(), &["--force"]);
    assert!(text.contains(&reason), "{text}");
    assert!(handle_closed_by_daemon(fd), "force revokes the reference");
    holds_for("force never unmounts", Duration::from_secs(2), || async {
        LoopDisk::is_mounted(&at) && client.ref_count(&path).await == Some(1)
    })
    .await;
    nothing_real_happens(&daemon, &client, &path, &disk).await;

    detach_mounts_and_wait(&bus, &disk);
    assert!(!LoopDisk::is_mounted(&at), "detach-mounts unmounts");
    removed_for_real(&client, &path, &disk).await;
}

/// `remove --wait` ends as soon as the removal fails (here: real actions
/// are off), with exit 1 and the error, instead of waiting on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_wait_ends_at_once_when_the_removal_fails() {
    let _one = disks::exclusive();
    let (bus, _daemon, client) = watching(&["--no-actuate"]).await;
    let disk = LoopDisk::create("fails", 1);
    let path = client.appears(&disk.name()).await;
    let start = Instant::now();
    let out = devctl(&bus, &["remove", &disk.name(), "--wait=30"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(start.elapsed() < Duration::from_secs(20));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failed") && err.contains("real actions are off"),
        "{err}"
    );
    assert_eq!(client.state(&path).await.as_deref(), Some("stopped"));
}

/// detach-mounts with a process working in the filesystem: the lazily
/// detached filesystem stays alive while it does, so the removal waits for
/// that process, named, and completes when it exits (as the kernel lets
/// go). Processes are never killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_detach_mounts_the_removal_waits_for_processes_on_the_filesystem() {
    let _one = disks::exclusive();
    let (bus, _daemon, client) = watching(&[]).await;
    let mut disk = LoopDisk::create("detached", 64);
    disk.mkfs(&disk.node());
    let at = disk.mount_point("busy");
    disk.mount(&disk.node(), &at);
    let path = client.appears(&disk.name()).await;
    held_by(&client, &path, "kernel:mount", "mounted at").await;
    let mut worker = Reaped::spawn(Command::new("sleep").arg("600").current_dir(&at), "sleep");
    let pid = worker.id();
    let out = devctl(&bus, &["remove", &disk.name(), "--detach-mounts"]);
    assert!(out.status.success(), "{}", stdout(&out));
    let reason = format!("open on its detached filesystem by sleep (pid {pid})");
    held_by(&client, &path, "kernel:process", &reason).await;
    assert!(!LoopDisk::is_mounted(&at), "detached from the tree");
    assert_eq!(client.state(&path).await.as_deref(), Some("removing"));
    assert!(disk.sys_block().exists());
    assert!(
        matches!(worker.try_wait(), Ok(None)),
        "processes are never killed"
    );
    worker.stop();
    removed_for_real(&client, &path, &disk).await;
}

/// detach-mounts over a whole partitioned disk: a partition mounted only in
/// another mount namespace (detached there, through its process) and swap
/// on the other partition (turned off). The namespace's process is left
/// running, and the disk goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_mounts_detaches_in_other_namespaces_and_turns_swap_off() {
    let _one = disks::exclusive();
    let (bus, _daemon, client) = watching(&[]).await;
    let mut disk = LoopDisk::create("detach-all", 64);
    disk.partitions(2);
    disk.mkfs(&disk.partition(1));
    let at = disk.mount_point("elsewhere");
    let path = client.appears(&disk.name()).await;
    let p1 = client.appears(&format!("{}p1", disk.name())).await;
    let p2 = client.appears(&format!("{}p2", disk.name())).await;
    let mut inside = Reaped::spawn(
        Command::new("unshare")
            .args(["-m", "sh", "-c"])
            .arg(format!(
                "mount {} {} && exec sleep 600",
                disk.partition(1).display(),
                at.display()
            )),
        "unshare (package util-linux)",
    );
    let reason = format!(
        "mounted at {} (ext4) in the mount namespace of sleep (pid {})",
        at.display(),
        inside.id()
    );
    held_by(&client, &p1, "kernel:mount", &reason).await;
    disk.swapon(&disk.partition(2));
    held_by(&client, &p2, "kernel:swap", "swap").await;

    // The dry run counts the mounts and swap as gone.
    let dry = stdout(&devctl(
        &bus,
        &["remove", &disk.name(), "--dry-run", "--detach-mounts"],
    ));
    assert!(dry.contains("would be removed"), "{dry}");
    assert_eq!(client.state(&path).await.as_deref(), Some("live"));
    detach_mounts_and_wait(&bus, &disk);
    removed_for_real(&client, &path, &disk).await;
    let swaps = std::fs::read_to_string("/proc/swaps").expect("/proc/swaps");
    assert!(
        !swaps.contains(&disk.partition(2).to_string_lossy().into_owned()),
        "{swaps}"
    );
    assert!(
        matches!(inside.try_wait(), Ok(None)),
        "processes are never killed"
    );
    let theirs = std::fs::read_to_string(format!("/proc/{}/mountinfo", inside.id()))
        .expect("the namespace's mounts");
    assert!(
        !theirs.contains(&format!(" {} ", at.display())),
        "still mounted in the other namespace: {theirs}"
    );
}
