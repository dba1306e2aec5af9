//! Real devices from real uevents: loop devices and veth pairs created and
//! deleted in the kernel appear and disappear on the bus, with the udev source (events
//! processed by systemd-udevd) and the kernel source (raw uevents); a held
//! device the kernel deletes is `gone` until released (rule 8); devices that
//! existed before the daemon are there from the start, once each, and
//! already at the first call once its name is on the bus.
//!
//! These need root (to create network devices) and, for the udev source, a
//! running systemd-udevd (`.ci/run` starts one). They fail, never skip,
//! when they cannot have them.

use std::process::Command;

use devmgr_tests::*;
use zbus::OwnedObjectPath;

/// A network device pair the test owns, deleted when dropped.
struct Veth {
    name: String,
    peer: String,
}

impl Veth {
    /// Creates `<tag><pid>a` / `…b` (interface names have at most 15 bytes).
    fn create(tag: &str) -> Veth {
        let base = format!("{tag}{}", std::process::id() % 100_000);
        let veth = Veth {
            name: format!("{base}a"),
            peer: format!("{base}b"),
        };
        let out = Command::new("ip")
            .args([
                "link", "add", &veth.name, "type", "veth", "peer", "name", &veth.peer,
            ])
            .output()
            .expect("ip (package iproute2)");
        assert!(
            out.status.success(),
            "cannot create a veth pair (these tests need root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        veth
    }

    fn sys_path(&self) -> String {
        format!("/sys/devices/virtual/net/{}", self.name)
    }

    fn delete(&self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        self.delete();
    }
}

/// A loop device the test owns (created with LOOP_CTL_ADD through
/// /dev/loop-control, removed with LOOP_CTL_REMOVE when dropped).
struct Loop {
    number: u32,
}

use devmgr_tests::disks::{loop_control, LOOP_CTL_ADD, LOOP_CTL_REMOVE};

impl Loop {
    /// Creates loop device `base + pid % 1000` (numbers far above the usual 0–7).
    fn create(base: u32) -> Loop {
        let number = base + std::process::id() % 1000;
        if let Err(e) = loop_control(LOOP_CTL_ADD, number) {
            panic!("cannot create loop{number} (these tests need root and /dev/loop-control): {e}");
        }
        Loop { number }
    }

    fn name(&self) -> String {
        format!("loop{}", self.number)
    }

    fn delete(&self) {
        let _ = loop_control(LOOP_CTL_REMOVE, self.number);
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.delete();
    }
}

async fn find(client: &Client, name: &str) -> Option<OwnedObjectPath> {
    client.device(name).await
}

/// A private bus, devmgrd modelling `subsystem` from `source` (with `extra`
/// arguments), and a client on that bus.
async fn watching(source: &str, subsystem: &str, extra: &[&str]) -> (TestBus, Daemon, Client) {
    let bus = TestBus::start();
    let mut args = vec!["--udev-source", source, "--subsystems", subsystem];
    args.extend_from_slice(extra);
    let daemon = Daemon::start_with_args(&bus, &args);
    let client = Client::connect(&bus.address).await;
    (bus, daemon, client)
}

/// Waits (up to 10 s) for device `name` on the bus; its object path.
async fn appears(client: &Client, name: &str) -> OwnedObjectPath {
    client.appears(name).await
}

/// Rule 8 with a real device: held while `delete` removes it in the kernel,
/// it is `gone` and its name is free at once; released, it is removed.
async fn held_through_kernel_removal(
    client: &Client,
    path: &OwnedObjectPath,
    name: &str,
    delete: impl FnOnce(),
) {
    let fd = client.acquire(path).await;
    delete();
    eventually(&format!("the held {name} to be gone"), || async {
        client.state(path).await.as_deref() == Some("gone")
    })
    .await;
    assert!(
        find(client, name).await.is_none(),
        "a gone device's name is free"
    );
    drop(fd);
    eventually(&format!("the released {name} to be removed"), || async {
        !client.exists(path).await
    })
    .await;
}

async fn veth_comes_and_goes(source: &str, tag: &str) {
    let (_bus, _daemon, client) = watching(source, "net", &[]).await;
    let veth = Veth::create(tag);
    eventually("the veth pair on the bus", || async {
        find(&client, &veth.name).await.is_some() && find(&client, &veth.peer).await.is_some()
    })
    .await;
    let path = find(&client, &veth.name).await.expect("the veth");
    let object = client.object(&path).await;
    assert_eq!(object.origin().await.expect("Origin"), "udev");
    assert_eq!(object.subsystem().await.expect("Subsystem"), "net");
    assert_eq!(object.sys_path().await.expect("SysPath"), veth.sys_path());
    assert_eq!(object.state().await.expect("State"), "live");

    veth.delete();
    eventually("the veth pair to leave the bus", || async {
        find(&client, &veth.name).await.is_none() && find(&client, &veth.peer).await.is_none()
    })
    .await;
}

async fn loop_comes_and_goes(source: &str, base: u32) {
    let (_bus, _daemon, client) = watching(source, "block", &[]).await;
    let device = Loop::create(base);
    let path = appears(&client, &device.name()).await;
    let object = client.object(&path).await;
    assert_eq!(object.subsystem().await.expect("Subsystem"), "block");
    assert_eq!(
        object.sys_path().await.expect("SysPath"),
        format!("/sys/devices/virtual/block/{}", device.name())
    );
    // Held when the kernel deletes it: gone, then removed on release.
    held_through_kernel_removal(&client, &path, &device.name(), || device.delete()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_source_sees_a_loop_device_come_and_go() {
    loop_comes_and_goes("kernel", 3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udev_source_sees_a_loop_device_come_and_go() {
    require_udevd();
    loop_comes_and_goes("udev", 4000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_source_sees_a_veth_pair_come_and_go() {
    veth_comes_and_goes("kernel", "dmk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udev_source_sees_a_veth_pair_come_and_go() {
    require_udevd();
    veth_comes_and_goes("udev", "dmu").await;
}

/// Rule 8 with a real device: the kernel deletes it while it is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_device_the_kernel_deletes_is_gone_until_released() {
    let (_bus, _daemon, client) = watching("kernel", "net", &[]).await;
    let veth = Veth::create("dmg");
    let path = appears(&client, &veth.name).await;
    held_through_kernel_removal(&client, &path, &veth.name, || veth.delete()).await;
}

/// Coldplug: devices created before the daemon starts are there, once each
/// (the monitor opens before the enumeration, so the overlap is deduplicated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_that_existed_before_the_daemon_are_there_once() {
    let veth = Veth::create("dmc");
    let (bus, _daemon, client) = watching("kernel", "net", &[]).await;
    eventually("the pre-existing veth on the bus", || async {
        find(&client, &veth.name).await.is_some()
    })
    .await;
    let listed = devctl(&bus, &["--json", "list"]);
    assert!(listed.status.success());
    let objects: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    let same: Vec<_> = objects
        .as_array()
        .expect("a list")
        .iter()
        .filter(|o| o["sys_path"] == veth.sys_path())
        .collect();
    assert_eq!(same.len(), 1, "{same:?}");
    // The machine's own loopback interface is modelled too.
    assert!(find(&client, "lo").await.is_some());
}

/// The name is claimed only once the coldplug is modelled and published
/// (Type=dbus's "ready"): the very first call, with no waiting, already
/// sees the devices that existed before the daemon started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_after_the_name_appears_sees_the_coldplug() {
    use futures_util::StreamExt;
    for source in ["udev", "kernel"] {
        let veth = Veth::create(if source == "udev" { "dmf" } else { "dmk" });
        let bus = TestBus::start();
        // A client on the bus before devmgrd, calling the moment the bus
        // says the name has an owner (the harness's own wait polls, which
        // would leave the coldplug time to finish).
        let client = Client::connect(&bus.address).await;
        let dbus = zbus::fdo::DBusProxy::new(&client.conn)
            .await
            .expect("bus proxy");
        let mut owners = dbus
            .receive_name_owner_changed_with_args(&[(0, proto::BUS_NAME)])
            .await
            .expect("NameOwnerChanged");
        let address = bus.address.clone();
        let starting = tokio::task::spawn_blocking(move || {
            Daemon::start_at(&address, &["--udev-source", source, "--subsystems", "net"])
        });
        let owned = tokio::time::timeout(std::time::Duration::from_secs(30), owners.next())
            .await
            .expect("devmgrd owned its name within 30 s")
            .expect("a NameOwnerChanged");
        assert!(!owned.args().expect("args").new_owner().is_none());
        let first = find(&client, &veth.name).await;
        let lo = find(&client, "lo").await;
        let _daemon = starting.await.expect("devmgrd started");
        assert!(
            first.is_some(),
            "{source} source: {} not there at the first call",
            veth.name
        );
        assert!(
            lo.is_some(),
            "{source} source: lo not there at the first call"
        );
    }
}

/// udevd's broadcasts stop at the network namespace, the kernel's uevents
/// do not: a devmgrd on the udev source in a network namespace of its own
/// (a container with a private network) hears nothing from udevd. It must
/// say so, rather than model a machine that never changes; a devmgrd that
/// does hear udevd must not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_udev_source_that_hears_nothing_from_udevd_says_so() {
    require_udevd();
    const WARNING: &str = "relayed none of them";
    let args = ["--udev-source", "udev", "--subsystems", "block"];
    let isolated_bus = TestBus::start();
    let isolated =
        Daemon::start_at_wrapped(&isolated_bus.address, &["unshare", "--net", "--"], &args);
    let (_bus, heard, client) = watching("udev", "block", &[]).await;
    let device = Loop::create(6000);
    appears(&client, &device.name()).await;
    let start = std::time::Instant::now();
    while !isolated.log().contains(WARNING) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "no warning within 30 s of the kernel's events; the log:\n{}",
            isolated.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let isolated_client = Client::connect(&isolated_bus.address).await;
    assert!(
        find(&isolated_client, &device.name()).await.is_none(),
        "the isolated daemon was not isolated"
    );
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(!heard.log().contains(WARNING), "{}", heard.log());
    assert_eq!(isolated.log().matches(WARNING).count(), 1, "warned once");
}

fn sys_block(name: &str) -> std::path::PathBuf {
    std::path::Path::new("/sys/devices/virtual/block").join(name)
}

/// Removing a real loop device: pending while held, then devmgrd removes
/// the real device (LOOP_CTL_REMOVE) and the kernel's event completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_held_loop_device_removes_the_real_one_once_released() {
    let (bus, _daemon, client) = watching("kernel", "block", &[]).await;
    let device = Loop::create(5000);
    let path = appears(&client, &device.name()).await;
    let fd = client.acquire(&path).await;
    let out = devctl(&bus, &["remove", &device.name()]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("removal pending"), "{text}");
    assert!(text.contains("held by"), "{text}");
    assert!(
        sys_block(&device.name()).exists(),
        "nothing real happens while held"
    );
    drop(fd);
    eventually("the object to be removed", || async {
        !client.exists(&path).await
    })
    .await;
    assert!(
        !sys_block(&device.name()).exists(),
        "the real loop device is still there"
    );
}

/// A loop device with a backing file (what `losetup` makes) that nothing
/// uses is removed for real: its file detached (LOOP_CLR_FD), then the
/// device removed — where LOOP_CTL_REMOVE alone is refused while bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_loop_device_with_a_backing_file_is_detached_and_removed() {
    let _disks = disks::exclusive();
    let (bus, _daemon, client) = watching("kernel", "block", &[]).await;
    let disk = disks::LoopDisk::create("backed", 1);
    let path = appears(&client, &disk.name()).await;
    let out = devctl(&bus, &["remove", &disk.name(), "--wait=10"]);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(!client.exists(&path).await);
    eventually("the real loop device to be gone", || async {
        !disk.sys_block().exists()
    })
    .await;
}

/// `devctl remove NAME`, accepted, whose real removal then fails: the
/// object ends `stopped`; its LastError.
async fn removal_fails(
    bus: &TestBus,
    client: &Client,
    name: &str,
    path: &OwnedObjectPath,
) -> String {
    assert!(devctl(bus, &["remove", name]).status.success());
    eventually("the object to be stopped", || async {
        client.state(path).await.as_deref() == Some("stopped")
    })
    .await;
    client
        .object(path)
        .await
        .last_error()
        .await
        .expect("LastError")
}

/// `--no-actuate`, or `actuate = false` in the configuration file: nothing
/// real is done; the object says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_actuate_leaves_real_devices_alone() {
    let (_dir, config) = config_file("actuate-config", "# real removals off\nactuate = false\n");
    for (number, how) in [
        (7000, vec!["--no-actuate"]),
        (7001, vec!["--config", &config]),
    ] {
        let (bus, _daemon, client) = watching("kernel", "block", &how).await;
        let device = Loop::create(number);
        let path = appears(&client, &device.name()).await;
        let error = removal_fails(&bus, &client, &device.name(), &path).await;
        assert!(error.contains("real actions are off"), "{how:?}: {error}");
        assert!(sys_block(&device.name()).exists(), "{how:?}");
    }
}

/// A device with no way to remove it (the loopback interface) is refused
/// with NotSupported, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_no_real_removal_is_refused() {
    let (bus, _daemon, client) = watching("kernel", "net", &[]).await;
    let path = appears(&client, "lo").await;
    let out = devctl(&bus, &["remove", "lo"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("org.devmgr.DevMgr1.Error.NotSupported"));
    assert_eq!(client.state(&path).await.as_deref(), Some("live"));
}

fn signal(daemon: &Daemon, sig: &str) {
    let pid = daemon.child.id().to_string();
    assert!(Command::new("kill")
        .args([sig, &pid])
        .status()
        .expect("kill")
        .success());
}

/// Loop devices `first..first+n`, made and removed by one python process
/// each way (the overflow test needs them fast); removed when dropped.
struct LoopRange {
    first: u32,
    n: u32,
}

impl LoopRange {
    fn control(request: u32, first: u32, n: u32) {
        let out = Command::new("/usr/bin/python3")
            .args([
                "-c",
                // EBUSY (udevd probing) is retried, as in `loop_control`.
                "import errno,fcntl,os,sys,time\n\
                 fd=os.open('/dev/loop-control', os.O_RDWR)\n\
                 r,f,n=map(int, sys.argv[1:4])\n\
                 for i in range(f, f+n):\n\
                 \x20   for attempt in range(100):\n\
                 \x20       try: fcntl.ioctl(fd, r, i); break\n\
                 \x20       except OSError as e:\n\
                 \x20           if e.errno != errno.EBUSY or attempt == 99: raise\n\
                 \x20           time.sleep(0.05)",
                &request.to_string(),
                &first.to_string(),
                &n.to_string(),
            ])
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn create(first: u32, n: u32) -> LoopRange {
        LoopRange::control(LOOP_CTL_ADD, first, n);
        LoopRange { first, n }
    }
}

impl Drop for LoopRange {
    fn drop(&mut self) {
        LoopRange::control(LOOP_CTL_REMOVE, self.first, self.n);
    }
}

async fn loops_present(client: &Client, first: u32, n: u32) -> u32 {
    let mut present = 0;
    for i in first..first + n {
        if find(client, &format!("loop{i}")).await.is_some() {
            present += 1;
        }
    }
    present
}

/// The event socket overflows (a tiny buffer, the daemon stopped while 50
/// loop devices come and later go): devmgrd notices (ENOBUFS), enumerates
/// again and reconciles, so nothing is lost track of either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_event_socket_is_resynchronised() {
    const FIRST: u32 = 8000;
    // Far more than a 4 KiB socket holds; few, because the kernel takes
    // ~50 ms to remove each loop device.
    const N: u32 = 50;
    let (_bus, daemon, client) =
        watching("kernel", "block", &["--udev-receive-buffer", "4096"]).await;
    signal(&daemon, "-STOP");
    let created = LoopRange::create(FIRST, N);
    signal(&daemon, "-CONT");
    eventually("all the loop devices on the bus", || async {
        loops_present(&client, FIRST, N).await == N
    })
    .await;
    daemon.wait_for_log("event socket overflowed");
    daemon.wait_for_log("resynchronised after an overflow");

    signal(&daemon, "-STOP");
    drop(created);
    signal(&daemon, "-CONT");
    eventually("all the loop devices gone from the bus", || async {
        loops_present(&client, FIRST, N).await == 0
    })
    .await;
}

/// A real rename (`ip link set … name …` sends a `move` uevent): the same
/// object takes the new name and sys path; the old name is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_interface_keeps_its_object() {
    let (_bus, _daemon, client) = watching("kernel", "net", &[]).await;
    let mut veth = Veth::create("dmr");
    let path = appears(&client, &veth.name).await;
    let renamed = format!("{}z", &veth.name[..veth.name.len() - 1]);
    let out = Command::new("ip")
        .args(["link", "set", "dev", &veth.name, "name", &renamed])
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let old = std::mem::replace(&mut veth.name, renamed.clone());
    eventually("the new name on the bus", || async {
        find(&client, &renamed).await.as_ref() == Some(&path)
    })
    .await;
    assert!(find(&client, &old).await.is_none(), "the old name is free");
    let object = client.object(&path).await;
    assert_eq!(
        object.sys_path().await.expect("SysPath"),
        format!("/sys/devices/virtual/net/{renamed}")
    );
    assert_eq!(object.name().await.expect("Name"), renamed);
}

/// `--state-dir` with a real device: its admin state comes back by sys
/// path after a SIGKILL; if the device went while the daemon was down, the
/// state is forgotten, and the device that later takes its place is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_devices_admin_state_survives_a_restart_by_sys_path() {
    let dir = TempDir::unique("state-udev");
    let state_dir = dir.0.to_str().expect("utf-8 path").to_owned();
    let args = ["--udev-source", "kernel", "--subsystems", "block"];
    let with_state = [&args[..], &["--state-dir", &state_dir]].concat();
    let (bus, mut daemon, client) = watching("kernel", "block", &["--state-dir", &state_dir]).await;
    let device = Loop::create(9000);
    appears(&client, &device.name()).await;
    assert!(devctl(&bus, &["stop", &device.name()]).status.success());
    daemon.sigkill();

    let mut daemon = Daemon::start_with_args(&bus, &with_state);
    let client = Client::connect(&bus.address).await;
    let path = appears(&client, &device.name()).await;
    eventually("the device stopped again", || async {
        client.state(&path).await.as_deref() == Some("stopped")
    })
    .await;
    daemon.sigkill();

    // Gone while nobody watched: the next start forgets its state...
    device.delete();
    let daemon = Daemon::start_with_args(&bus, &with_state);
    daemon.wait_for_log("coldplug");
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{status}: {log}");
    // ...so the same sys path, a new device, is live.
    let device = Loop::create(9000);
    let _daemon = Daemon::start_with_args(&bus, &with_state);
    let client = Client::connect(&bus.address).await;
    let path = appears(&client, &device.name()).await;
    assert_eq!(client.state(&path).await.as_deref(), Some("live"));
}
