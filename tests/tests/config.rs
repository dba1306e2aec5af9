//! The configuration file and the service environment (issue 7): every key
//! takes effect in the real daemon (the quotas and `actuate` are checked
//! with their own tests: quotas.rs, references.rs, udev.rs), a flag wins
//! over the file, a bad file stops devmgrd naming the line, systemd's
//! $STATE_DIRECTORY is the default state directory, and the log goes to
//! the journal when stderr is a journal stream.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use devmgr_tests::system_bus::{run_every_call, SystemBus};
use devmgr_tests::*;

/// `authorized-group` and `restrict-acquire`, on a system-type bus: `nobody`
/// may do nothing, Acquire included; in the group, everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_keys_take_effect() {
    let bus = SystemBus::start();
    let (_dir, file) = config_file(
        "access-config",
        "udev = false\nauthorized-group = \"disk\"\nrestrict-acquire = true\n",
    );
    let daemon = Daemon::start_at(&bus.address, &["--config", &file]);
    let root = Client::connect(&bus.address).await;
    root.add_host("h").await;
    let denied = "org.devmgr.DevMgr1.Error.AccessDenied";
    assert_eq!(
        run_every_call(&bus.address, None),
        format!(
            "Add {denied}\nStop {denied}\nReenable {denied}\nBind {denied}\nUnbind {denied}\n\
             Remove {denied}\nAcquire {denied}\n"
        ),
        "restrict-acquire = true also refuses Acquire"
    );
    let disk = group_id("disk");
    assert_eq!(
        run_every_call(&bus.address, Some(&disk)),
        "Add ok\nStop ok\nReenable ok\nBind ok\nUnbind ok\nRemove ok\n\
         Acquire org.freedesktop.DBus.Error.UnknownObject\n",
        "authorized-group = \"disk\" lets its members in"
    );
    assert!(daemon.log().contains(&format!("configuration from {file}")));
}

fn group_id(name: &str) -> String {
    std::fs::read_to_string("/etc/group")
        .expect("/etc/group")
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:x:"))
                .and_then(|r| r.split(':').next().map(str::to_owned))
        })
        .unwrap_or_else(|| panic!("no group {name}"))
}

/// The subsystems of the real devices (not drivers) devmgrd models.
fn real_subsystems(bus: &TestBus) -> Vec<(String, String)> {
    let listed = devctl(bus, &["--json", "list"]);
    assert!(listed.status.success());
    let objects: serde_json::Value = serde_json::from_str(&stdout(&listed)).expect("JSON");
    objects
        .as_array()
        .expect("a list")
        .iter()
        .filter(|o| o["origin"] == "udev" && o["kind"] != "driver")
        .map(|o| {
            let field = |k: &str| o[k].as_str().unwrap_or_default().to_owned();
            (field("name"), field("subsystem"))
        })
        .collect()
}

/// `subsystems`, `udev-source` and `udev`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_keys_take_effect() {
    let bus = TestBus::start();
    let (_dir, file) = config_file(
        "device-config",
        "subsystems = [\"net\"]\nudev-source = \"kernel\"\n",
    );
    let daemon = Daemon::start_with_args(&bus, &["--config", &file]);
    daemon.wait_for_log("modelling net from kernel events");
    wait_for(
        || real_subsystems(&bus).iter().any(|(name, _)| name == "lo"),
        "the loopback interface modelled",
    );
    let real = real_subsystems(&bus);
    assert!(
        real.iter().all(|(_, subsystem)| subsystem == "net"),
        "only the subsystems the file names: {real:?}"
    );
    assert!(daemon.terminate().0.success());

    let (_off, off) = config_file("udev-off-config", "udev = false\nsubsystems = [\"net\"]\n");
    let daemon = Daemon::start_with_args(&bus, &["--config", &off]);
    assert_eq!(real_subsystems(&bus), [], "udev = false models no device");
    assert!(!daemon.log().contains("modelling"), "{}", daemon.log());
    // The flag wins over the file.
    assert!(daemon.terminate().0.success());
    let daemon = Daemon::start_with_args(
        &bus,
        &["--config", &off, "--udev", "--udev-source", "kernel"],
    );
    daemon.wait_for_log("modelling net from kernel events");
}

/// `state-dir`: what a client changes survives a restart; `--state-dir`
/// wins over it; without either, systemd's $STATE_DIRECTORY is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_directory_comes_from_the_file_the_flag_or_systemd() {
    let bus = TestBus::start();
    let base = TempDir::unique("state-config");
    std::fs::create_dir_all(&base.0).expect("temp dir");
    let (kept, flag, systemd) = (
        base.0.join("kept"),
        base.0.join("flag"),
        base.0.join("systemd"),
    );
    let (_dir, file) = config_file(
        "state-config-file",
        &format!(
            "udev = false\nstate-dir = {:?}\n",
            kept.display().to_string()
        ),
    );

    let daemon = Daemon::start_with_args(&bus, &["--config", &file]);
    assert!(devctl(&bus, &["add", "driver", "remembered"])
        .status
        .success());
    assert!(daemon.terminate().0.success());
    assert!(
        kept.join("state.json").exists(),
        "state-dir is where it keeps"
    );
    let daemon = Daemon::start_with_args(&bus, &["--config", &file]);
    assert!(
        devctl(&bus, &["show", "driver/remembered"])
            .status
            .success(),
        "restored from the file's state-dir"
    );
    assert!(daemon.terminate().0.success());

    let flag_arg = flag.to_string_lossy().into_owned();
    let daemon = Daemon::start_with_args(&bus, &["--config", &file, "--state-dir", &flag_arg]);
    assert!(
        !devctl(&bus, &["show", "driver/remembered"])
            .status
            .success(),
        "--state-dir wins over the file"
    );
    assert!(daemon.terminate().0.success());
    assert!(flag.join("state.json").exists());

    std::fs::create_dir_all(&systemd).expect("the service's state directory");
    let env = systemd.to_string_lossy().into_owned();
    let daemon = Daemon::start_with_env(&bus, &["--no-udev"], &[("STATE_DIRECTORY", &env)]);
    assert!(devctl(&bus, &["add", "driver", "by-systemd"])
        .status
        .success());
    assert!(daemon.terminate().0.success());
    assert!(
        systemd.join("state.json").exists(),
        "$STATE_DIRECTORY is used"
    );
}

/// A file devmgrd does not understand stops it before it claims its name,
/// and the error names the file and the line.
#[test]
fn a_bad_file_stops_the_daemon_and_names_the_line() {
    let bus = TestBus::start();
    let cases: &[(&str, &str, &str)] = &[
        (
            "udev = false\n\nmax-refs = 3\n",
            ":3:",
            "unknown field `max-refs`",
        ),
        ("udev = false\nmax-objects = -1\n", ":2:", "-1"),
        ("actuate = \"no\"\n", ":1:", "actuate"),
        (
            "udev = false\nudev-source = \"pigeon\"\n",
            ":2:",
            "not a udev source",
        ),
        (
            "subsystems = [\"block,net\"]\n",
            ":1:",
            "not a subsystem name",
        ),
        ("subsystems = []\n", ":1:", "subsystems is empty"),
        (
            "udev = false\nauthorized-group = \"no-such-group-here\"\n",
            ":2:",
            "no group",
        ),
        (
            "state-dir = \"relative/dir\"\n",
            ":1:",
            "not an absolute path",
        ),
        ("udev = false\nsubsystems = [\"net\"\n", ":2:", ""),
        ("udev = true\nudev = false\n", ":2:", ""),
    ];
    for (n, (text, line, why)) in cases.iter().enumerate() {
        let (_dir, file) = config_file(&format!("bad-config-{n}"), text);
        let out = Command::new(binary("devmgrd"))
            .args(["--config", &file, "--bus", &bus.address])
            .env_remove("JOURNAL_STREAM")
            .output()
            .expect("devmgrd");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text:?} was accepted: {log}");
        assert!(
            log.contains(&format!("{file}{line}")) && log.contains(why),
            "{text:?}: the error must name {file}{line} and say {why:?}:\n{log}"
        );
        assert!(!log.contains("serving"), "{log}");
    }
    // A file named with --config must exist; the default one may not.
    let out = Command::new(binary("devmgrd"))
        .args([
            "--config",
            "/nonexistent/devmgrd.toml",
            "--bus",
            &bus.address,
        ])
        .output()
        .expect("devmgrd");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/devmgrd.toml"));
    assert!(!bus.busctl(&["status", proto::BUS_NAME]).status.success());
}

/// Under systemd (JOURNAL_STREAM names its stderr) devmgrd logs to the
/// journal with native fields, and nothing to stderr.
#[test]
fn the_log_goes_to_the_journal_when_stderr_is_a_journal_stream() {
    journald_or_fail();
    let bus = TestBus::start();
    let dir = TempDir::unique("journal");
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let stderr_path: PathBuf = dir.0.join("stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let meta = stderr.metadata().expect("stat");
    let mut child = Command::new(binary("devmgrd"))
        .args(["--no-config", "--no-udev", "--bus", &bus.address])
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("devmgrd");
    wait_for(
        || bus.busctl(&["status", proto::BUS_NAME]).status.success(),
        "devmgrd on the bus",
    );
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(child.wait().expect("wait").success());

    let mut entries = String::new();
    wait_for(
        || {
            let out = Command::new("journalctl")
                .args(["--no-pager", "-o", "json", "-t", "devmgrd"])
                .arg(format!("_PID={pid}"))
                .output()
                .expect("journalctl");
            entries = String::from_utf8_lossy(&out.stdout).into_owned();
            entries.contains("shutting down")
        },
        "devmgrd's messages in the journal",
    );
    let serving = entries
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| {
            e["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.starts_with("serving org.devmgr.DevMgr1"))
        })
        .unwrap_or_else(|| panic!("no 'serving' entry in:\n{entries}"));
    assert_eq!(serving["PRIORITY"], "6", "info is priority 6: {serving}");
    assert_eq!(serving["SYSLOG_IDENTIFIER"], "devmgrd");
    assert_eq!(
        std::fs::read_to_string(&stderr_path).expect("stderr"),
        "",
        "nothing goes to stderr then"
    );
}

/// systemd-journald must answer (`.ci/deps` starts it where no systemd
/// runs); failing, not skipping, says so.
fn journald_or_fail() {
    let alive = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.send_to(&[], "/run/systemd/journal/socket"))
        .is_ok();
    assert!(
        alive,
        "no systemd-journald answers on /run/systemd/journal/socket: run `bash .ci/deps` (as root)"
    );
}
