//! The bus policy file (data/org.devmgr.DevMgr1.conf, issue 6) loaded into
//! a private *system-type* dbus-daemon built from the machine's own
//! system.conf: only root may own the name, and anyone may call it — an
//! unprivileged caller (`nobody`, through setpriv) reaches the daemon, and
//! cannot take its name. Whether a call may change anything is the
//! daemon's decision, not the bus's.

use std::path::Path;
use std::process::{Command, Stdio};

use devmgr_tests::system_bus::{
    self, as_nobody, busctl_as_nobody, nobody_calls, run_every_call, start_polkitd, Installed,
    SystemBus,
};
use devmgr_tests::*;

#[test]
fn only_root_owns_the_name_and_anyone_may_call() {
    let bus = SystemBus::start();
    let _daemon = Daemon::start_at(&bus.address, &["--no-udev"]);

    // nobody may call: a property read and a method call both reach devmgrd.
    let out = busctl_as_nobody(
        &bus.address,
        &[
            "get-property",
            proto::BUS_NAME,
            proto::MANAGER_PATH,
            proto::MANAGER_INTERFACE,
            "Version",
        ],
    );
    assert!(
        out.status.success(),
        "nobody cannot read a property: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = nobody_calls(&bus.address);
    assert!(
        out.status.success(),
        "nobody cannot call: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // nobody may ask what it may do: nothing but take references (no
    // polkit runs on this bus to grant more).
    let out = busctl_as_nobody(
        &bus.address,
        &[
            "call",
            proto::BUS_NAME,
            proto::MANAGER_PATH,
            proto::MANAGER_INTERFACE,
            "GetPermissions",
        ],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(said.matches("\"no\"").count(), 7, "{said}");
    assert!(said.contains("\"acquire\" \"yes\""), "{said}");

    // nobody may not own the name.
    let own = "import dbus,sys\n\
               b = dbus.bus.BusConnection(sys.argv[1])\n\
               try:\n    b.request_name('org.devmgr.DevMgr1', dbus.bus.NAME_FLAG_DO_NOT_QUEUE)\n    print('owned')\n\
               except dbus.exceptions.DBusException as e:\n    print(e.get_dbus_name())";
    let out = as_nobody("/usr/bin/python3", &["-c", own, &bus.address]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        "org.freedesktop.DBus.Error.AccessDenied",
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without our policy file nobody could not even call (the stock default
    // denies method calls): the file is what opens the door.
    let out = busctl_as_nobody(
        &bus.address,
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus.Debug.Stats",
            "GetStats",
        ],
    );
    assert!(!out.status.success(), "the stock policy is not in force");
}

/// Authorization (issue 6): on the system-type bus, an unprivileged caller
/// may take references but change nothing; members of --authorized-group may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_caller_may_acquire_but_not_change_anything() {
    let bus = SystemBus::start();
    let gid = std::fs::read_to_string("/etc/group")
        .expect("/etc/group")
        .lines()
        .find_map(|l| {
            l.strip_prefix("disk:x:")
                .and_then(|r| r.split(':').next().map(str::to_owned))
        })
        .expect("a disk group");
    let _daemon = Daemon::start_at(&bus.address, &["--no-udev", "--authorized-group", "disk"]);
    let root = Client::connect(&bus.address).await;
    let host = root.add_host("h").await;

    let denied = "org.devmgr.DevMgr1.Error.AccessDenied";
    assert_eq!(
        run_every_call(&bus.address, None),
        format!(
            "Add {denied}\nStop {denied}\nReenable {denied}\nBind {denied}\nUnbind {denied}\n\
             Remove {denied}\nAcquire ok\n"
        )
    );
    // The denials changed nothing.
    assert_eq!(root.state(&host).await.as_deref(), Some("live"));
    assert!(root.manager.find_object("host", "intruder").await.is_err());

    // A member of the authorized group may.
    let allowed = run_every_call(&bus.address, Some(&gid));
    assert_eq!(
        allowed,
        "Add ok\nStop ok\nReenable ok\nBind ok\nUnbind ok\nRemove ok\nAcquire org.freedesktop.DBus.Error.UnknownObject\n"
    );
}

/// polkit (issue 6): a caller who is neither root nor in the authorized
/// group is allowed what polkit authorizes, action by action — a forced
/// removal is an action of its own — and denied the rest, which changes
/// nothing. A rule grants `nobody` stop and remove, not add or force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polkit_authorizes_each_verb_on_its_own() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    let actions = std::fs::read_to_string(data.join("org.devmgr.DevMgr1.policy")).expect("policy");
    let _actions = Installed::new(
        format!(
            "/usr/share/polkit-1/actions/org.devmgr.DevMgr1.test-{}.policy",
            std::process::id()
        ),
        &actions,
    );
    let _rule = Installed::new(
        format!(
            "/etc/polkit-1/rules.d/10-devmgr-test-{}.rules",
            std::process::id()
        ),
        r#"polkit.addRule(function(action, subject) {
    if (subject.user == "nobody" &&
        (action.id == "org.devmgr.DevMgr1.stop" || action.id == "org.devmgr.DevMgr1.remove"))
        return polkit.Result.YES;
});
"#,
    );
    let bus = system_bus::polkit_bus();
    let _polkitd = start_polkitd(&bus.address);
    let _daemon = Daemon::start_at(&bus.address, &["--no-udev"]);
    let root = Client::connect(&bus.address).await;
    let target = root.add("device", "pk-target", None, none()).await;
    let _fd = root.acquire(&target).await;

    // What devmgrd asks polkit, as the bus carries it.
    let monitor_out = TempDir::unique("polkit-monitor");
    std::fs::create_dir_all(&monitor_out.0).expect("temp dir");
    let seen = monitor_out.0.join("messages.json");
    let mut monitor = Command::new("busctl")
        .args(["--address", &bus.address, "monitor", "--json=short"])
        .stdout(std::fs::File::create(&seen).expect("monitor output"))
        .stderr(Stdio::null())
        .spawn()
        .expect("busctl monitor");
    wait_for(
        || {
            busctl_at(
                &bus.address,
                &[
                    "call",
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus",
                    "GetId",
                ],
            );
            std::fs::read_to_string(&seen).is_ok_and(|s| s.contains("GetId"))
        },
        "the bus monitor",
    );

    // busctl allows interactive authorization unless told not to.
    let call = |interactive: bool, args: &[&str]| {
        let flag = format!("--allow-interactive-authorization={interactive}");
        let mut all = vec![flag.as_str(), "call", proto::BUS_NAME];
        all.extend_from_slice(args);
        busctl_as_nobody(&bus.address, &all)
    };
    let object = target.as_str();
    let stop = call(
        true,
        &[object, proto::OBJECT_INTERFACE, "Stop", "a{sv}", "0"],
    );
    assert!(
        stop.status.success(),
        "polkit allows nobody to stop: {}",
        String::from_utf8_lossy(&stop.stderr)
    );
    assert_eq!(root.state(&target).await.as_deref(), Some("stopped"));

    let forced = call(
        false,
        &[
            object,
            proto::OBJECT_INTERFACE,
            "Remove",
            "a{sv}",
            "1",
            "force",
            "b",
            "true",
        ],
    );
    let said = String::from_utf8_lossy(&forced.stderr);
    assert!(!forced.status.success(), "a forced removal is not granted");
    assert!(
        said.contains("org.devmgr.DevMgr1.remove-force"),
        "the refusal names the action: {said}"
    );
    assert_eq!(
        root.state(&target).await.as_deref(),
        Some("stopped"),
        "nothing changed"
    );
    assert_eq!(
        root.ref_count(&target).await,
        Some(1),
        "the reference is still held"
    );

    let add = call(
        false,
        &[
            proto::MANAGER_PATH,
            proto::MANAGER_INTERFACE,
            "Add",
            "ssoa{sv}",
            "device",
            "pk-new",
            "/",
            "0",
        ],
    );
    assert!(!add.status.success(), "add is not granted");
    assert!(root.manager.find_object("device", "pk-new").await.is_err());

    let remove = call(
        false,
        &[object, proto::OBJECT_INTERFACE, "Remove", "a{sv}", "0"],
    );
    assert!(
        remove.status.success(),
        "polkit allows nobody a plain removal: {}",
        String::from_utf8_lossy(&remove.stderr)
    );
    assert_eq!(
        root.state(&target).await.as_deref(),
        Some("removing"),
        "pending on the reference"
    );

    // polkit may ask the user only when the caller allowed it: the flag
    // (1, AllowUserInteraction) goes with the Stop, not with the others.
    let _ = monitor.kill();
    let _ = monitor.wait();
    let asked: Vec<(String, u64)> = std::fs::read_to_string(&seen)
        .expect("monitor output")
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["member"] == "CheckAuthorization")
        .map(|m| {
            let args = &m["payload"]["data"];
            (
                args[1].as_str().unwrap_or_default().to_owned(),
                args[3].as_u64().unwrap_or(99),
            )
        })
        .collect();
    let action = |verb: &str| format!("org.devmgr.DevMgr1.{verb}");
    assert_eq!(
        asked,
        [
            (action("stop"), 1),
            (action("remove-force"), 0),
            (action("add"), 0),
            (action("remove"), 0),
        ],
        "devmgrd's questions to polkit"
    );

    // GetPermissions says the same without doing anything: what polkit
    // grants nobody, and everything to root.
    let permissions = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let get = [
        "call",
        proto::BUS_NAME,
        proto::MANAGER_PATH,
        proto::MANAGER_INTERFACE,
        "GetPermissions",
    ];
    let said = permissions(busctl_as_nobody(&bus.address, &get));
    for (verb, answer) in [
        ("add", "no"),
        ("remove", "yes"),
        ("remove-force", "no"),
        ("stop", "yes"),
        ("reenable", "no"),
        ("bind", "no"),
        ("unbind", "no"),
        ("acquire", "yes"),
    ] {
        assert!(
            said.contains(&format!("\"{verb}\" \"{answer}\"")),
            "nobody may {verb}: {answer}? {said}"
        );
    }
    let mut all = vec!["--address", bus.address.as_str()];
    all.extend_from_slice(&get);
    let said = permissions(Command::new("busctl").args(&all).output().expect("busctl"));
    assert!(
        said.starts_with("a{ss} 8 ") && !said.contains("\"no\""),
        "root may do everything: {said}"
    );
    assert_eq!(root.state(&target).await.as_deref(), Some("removing"));
}
