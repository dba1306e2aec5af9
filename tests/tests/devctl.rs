//! devctl end to end against the real daemon on a private bus: the human
//! output (exact, colour-free as it is off a terminal) and the JSON, holding
//! while a command runs, waiting for removals, monitoring, and exit codes.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use devmgr_tests::*;

fn ok(bus: &TestBus, args: &[&str]) -> String {
    let out = devctl(bus, args);
    assert!(
        out.status.success(),
        "devctl {args:?}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

fn json(bus: &TestBus, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&ok(bus, &all)).expect("JSON output")
}

/// Waits until `obj`'s RefCount is `n` (as devctl shows it).
fn wait_refs(bus: &TestBus, obj: &str, n: u64) {
    wait_for(
        || json(bus, &["show", obj])["ref_count"] == n,
        &format!("{obj} to have {n} references"),
    );
}

/// `devctl hold ARGS…` in the background, once its reference is taken
/// (`args[0]` is the object, as devctl's argument and for the count).
fn holding(bus: &TestBus, args: &[&str]) -> std::process::Child {
    let mut all = vec!["hold"];
    all.extend_from_slice(args);
    let holder = devctl_command(bus, &all)
        .stderr(Stdio::null())
        .spawn()
        .expect("devctl hold");
    wait_refs(bus, args[0], 1);
    holder
}

#[test]
fn list_tree_show_and_status_print_what_the_daemon_holds() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let added = ok(
        &bus,
        &[
            "add",
            "host",
            "host0",
            "--driver",
            "sim-scsi",
            "--luns",
            "2",
            "--attr",
            "vendor=ACME",
        ],
    );
    assert_eq!(
        added,
        "added host/host0 (id 33554433, /org/devmgr/DevMgr1/objects/33554433)\n"
    );
    ok(
        &bus,
        &[
            "add",
            "device",
            "extra",
            "--parent",
            "host/host0",
            "--attr",
            "size=1G",
        ],
    );
    ok(&bus, &["stop", "extra"]);

    assert_eq!(
        ok(&bus, &["list"]),
        "\
ID        KIND    NAME      STATE    DRIVER    PARENT      REFS  ORIGIN
16777216  driver  sim-scsi  live     -         -           0     api
33554433  host    host0     live     sim-scsi  -           0     api
50331650  device  0:0:0:0   live     -         host/host0  0     api
67108867  device  0:0:0:1   live     -         host/host0  0     api
83886084  device  extra     stopped  -         host/host0  0     api
"
    );
    assert_eq!(
        ok(&bus, &["tree"]),
        "\
NAME       KIND    STATE    DRIVER    REFS
sim-scsi   driver  live     -         0
host0      host    live     sim-scsi  0
├─0:0:0:0  device  live     -         0
├─0:0:0:1  device  live     -         0
└─extra    device  stopped  -         0     [disabled]
"
    );
    let list = json(&bus, &["list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(5));
    assert_eq!(list[4]["name"], "extra");
    assert_eq!(list[4]["state"], "stopped");
    assert_eq!(list[4]["attributes"]["size"], "1G");
    let tree = json(&bus, &["tree"]);
    assert_eq!(tree[1]["name"], "host0");
    assert_eq!(tree[1]["children"].as_array().map(Vec::len), Some(3));

    // Every OBJ form names the same object.
    for obj in [
        "host0",
        "host/host0",
        "33554433",
        "/org/devmgr/DevMgr1/objects/33554433",
    ] {
        assert_eq!(json(&bus, &["show", obj])["id"], 33554433u64, "{obj}");
    }
    let show = ok(&bus, &["show", "host0"]);
    assert!(
        show.contains("Driver      driver/sim-scsi (/org/devmgr/DevMgr1/objects/16777216)"),
        "{show}"
    );
    assert!(show.contains("  vendor=ACME"), "{show}");

    let status = json(&bus, &["status"]);
    assert_eq!(status["objects"], 5);
    assert_eq!(status["by_kind"]["device"], 3);
    assert_eq!(status["by_state"]["stopped"], 1);
    assert_eq!(status["bus"]["source"], "$DEVMGR_BUS_ADDRESS");
    assert!(ok(&bus, &["status"]).contains("objects      5 (3 device, 1 driver, 1 host)"));
}

#[test]
fn hold_while_a_command_runs_and_remove_waits_for_it() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    ok(
        &bus,
        &["add", "host", "held", "--driver", "sim-scsi", "--luns", "1"],
    );
    let lun = json(&bus, &["list"])
        .as_array()
        .and_then(|l| l.iter().find(|o| o["kind"] == "device").cloned())
        .expect("a LUN");
    let lun_name = lun["name"].as_str().expect("name").to_owned();
    let mut holder = holding(
        &bus,
        &[&lun_name, "--reason", "mounted", "--", "sleep", "5"],
    );

    // A pending result says exactly who holds what; --wait returns when
    // the command ends and the removal completes.
    let out = devctl(&bus, &["remove", "held", "--wait=60"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.starts_with("host/held: disabled, removal pending; it waits for:\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("device/{lun_name} (removing, 1 reference)")),
        "{text}"
    );
    assert!(
        text.contains(&format!("(pid {} devctl, uid 0)", holder.id())),
        "{text}"
    );
    assert!(text.contains("\"mounted\""), "{text}");
    assert!(text.ends_with("removed host/held\n"), "{text}");
    assert!(holder.wait().expect("hold").success());
    let left = json(&bus, &["list"]);
    assert_eq!(left.as_array().map(Vec::len), Some(1), "{left}");
}

#[test]
fn remove_wait_on_an_object_held_forever_exits_3_and_leaves_it_removing() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    ok(&bus, &["add", "host", "stuck"]);
    let mut holder = holding(&bus, &["stuck"]);
    let out = devctl(&bus, &["remove", "stuck", "--wait=1"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("still pending"), "{err}");
    assert_eq!(json(&bus, &["show", "stuck"])["state"], "removing");
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn hold_release_on_request_lets_go_and_the_removal_completes() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    ok(&bus, &["add", "host", "polite"]);
    let mut holder = holding(
        &bus,
        &["polite", "--release-on-request", "--", "sleep", "600"],
    );
    let out = devctl(&bus, &["remove", "polite", "--wait=60"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    // The command was stopped with SIGTERM: hold exits 128 + 15.
    assert_eq!(holder.wait().expect("hold").code(), Some(143));
}

#[test]
fn monitor_json_sees_add_removing_removed_in_order() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    ok(&bus, &["add", "host", "before"]);
    let mut monitor = devctl_command(&bus, &["--json", "monitor", "--kind", "host"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("devctl monitor");
    let (tx, rx) = std::sync::mpsc::channel();
    let lines = std::io::BufReader::new(monitor.stdout.take().expect("stdout"));
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next = || -> serde_json::Value {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a monitor line");
        serde_json::from_str(&line).expect("a JSON line")
    };
    let first = next();
    assert_eq!(
        (first["event"].as_str(), first["name"].as_str()),
        (Some("present"), Some("before"))
    );

    ok(&bus, &["add", "host", "watched"]);
    let mut holder = holding(&bus, &["watched"]);
    ok(&bus, &["remove", "watched"]);
    let _ = holder.kill();
    let _ = holder.wait();

    let mut seen = Vec::new();
    loop {
        let e = next();
        assert_eq!(e["name"], "watched", "{e}");
        let what = match e["event"].as_str() {
            Some("changed") if e["changed"]["State"].is_string() => {
                format!("state {}", e["changed"]["State"].as_str().unwrap_or(""))
            }
            Some("changed") => continue,
            Some(other) => other.to_owned(),
            None => panic!("no event in {e}"),
        };
        seen.push(what);
        if seen.last().map(String::as_str) == Some("removed") {
            break;
        }
    }
    assert_eq!(
        seen,
        ["added", "state removing", "release-requested", "removed"]
    );
    let _ = monitor.kill();
    let _ = monitor.wait();
}

#[test]
fn refusals_and_bad_names_get_their_exit_codes() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    ok(&bus, &["add", "host", "twin"]);
    ok(&bus, &["add", "device", "twin", "--parent", "host/twin"]);

    let out = devctl(&bus, &["show", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("org.devmgr.DevMgr1.Error.NotFound"));

    let out = devctl(&bus, &["show", "twin"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an ambiguous name is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("host/twin and device/twin"));

    let out = devctl(&bus, &["add", "host", "twin"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("org.devmgr.DevMgr1.Error.NameInUse"));

    ok(&bus, &["stop", "host/twin"]);
    let out = devctl(&bus, &["hold", "host/twin"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("org.devmgr.DevMgr1.Error.InvalidState"));

    let out = devctl(&bus, &["show", "/org/devmgr/DevMgr1/objects/999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));
}

/// Human output with what varies from run to run masked: ages, pids,
/// unique bus names and addresses.
fn masked(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let words: Vec<String> = line
            .split(' ')
            .map(|w| {
                if w.starts_with(":1.") {
                    ":1.N".to_owned()
                } else if w.starts_with("(unix:path=") {
                    "(ADDRESS)".to_owned()
                } else {
                    w.to_owned()
                }
            })
            .collect();
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    out
}

#[test]
fn show_status_and_actions_print_exactly_this() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    ok(
        &bus,
        &[
            "add",
            "host",
            "h",
            "--attr",
            "vendor=ACME",
            "--attr",
            "model=X1",
        ],
    );
    assert_eq!(ok(&bus, &["stop", "h"]), "host/h: stopped (now stopped)\n");
    assert_eq!(
        ok(&bus, &["reenable", "h"]),
        "host/h: re-enabled (now live)\n"
    );
    assert_eq!(
        ok(&bus, &["bind", "h", "sim-scsi"]),
        "host/h: bound to driver/sim-scsi (now live)\n"
    );
    assert_eq!(ok(&bus, &["unbind", "h"]), "host/h: unbound (now live)\n");
    assert_eq!(
        ok(&bus, &["show", "h"]),
        "\
Path        /org/devmgr/DevMgr1/objects/33554433
Id          33554433
Kind        host
Name        h
State       live
Parent      -
Driver      -
RefCount    0
Origin      api
Subsystem   -
SysPath     -
LastError   -
Attributes
  model=X1
  vendor=ACME
Holders     -
"
    );
    assert_eq!(
        masked(&ok(&bus, &["status"])),
        format!(
            "\
daemon       devmgrd {}
bus          $DEVMGR_BUS_ADDRESS (ADDRESS)
objects      2 (1 driver, 1 host)
states       2 live
references   0
pending      0 object(s) removing
",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(
        ok(&bus, &["remove", "h", "--dry-run"]),
        "host/h: would be removed\n"
    );
    assert_eq!(ok(&bus, &["remove", "h"]), "host/h: removed\n");
}

#[test]
fn remove_deadlines_cancel_or_revoke_and_wait_says_which() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    ok(&bus, &["add", "host", "late"]);
    let mut holder = holding(&bus, &["late"]);
    // Cancel: the object comes back, and --wait says so (exit 1).
    let out = devctl(
        &bus,
        &[
            "remove",
            "late",
            "--timeout",
            "1",
            "--on-timeout",
            "cancel",
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("was cancelled"));
    assert_eq!(json(&bus, &["show", "late"])["state"], "live");
    // Revoke: the removal completes, and the holder is told (it exits 1).
    let out = devctl(
        &bus,
        &[
            "remove",
            "late",
            "--timeout",
            "1",
            "--on-timeout",
            "revoke",
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).ends_with("removed host/late\n"));
    assert_eq!(holder.wait().expect("hold").code(), Some(1));
}

#[test]
fn ctrl_c_while_waiting_leaves_the_removal_pending_and_exits_3() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    ok(&bus, &["add", "host", "patient"]);
    let mut holder = holding(&bus, &["patient"]);
    let mut waiter = devctl_command(&bus, &["remove", "patient", "--wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("devctl remove --wait");
    // The pending report is printed before the wait begins.
    // (The reader stays open until devctl exits: closing it would end
    // devctl with 141 at its next line, as a closed pipe should.)
    let mut report = std::io::BufReader::new(waiter.stdout.take().expect("stdout"));
    let mut first = String::new();
    report.read_line(&mut first).expect("a line");
    assert!(first.contains("removal pending"), "{first}");
    let status = Command::new("kill")
        .args(["-INT", &waiter.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = waiter.wait_with_output().expect("devctl");
    drop(report);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("still pending"));
    assert_eq!(json(&bus, &["show", "patient"])["state"], "removing");
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn a_call_the_bus_refuses_exits_77() {
    // The bus's policy forbids Remove: dbus-daemon answers AccessDenied.
    let bus = TestBus::start_with_policy(
        r#"<deny send_destination="org.devmgr.DevMgr1" send_interface="org.devmgr.DevMgr1.Object" send_member="Remove"/>"#,
    );
    let _daemon = Daemon::start(&bus);
    ok(&bus, &["add", "host", "guarded"]);
    let out = devctl(&bus, &["remove", "guarded"]);
    assert_eq!(out.status.code(), Some(77));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("org.freedesktop.DBus.Error.AccessDenied")
    );
    assert_eq!(json(&bus, &["show", "guarded"])["state"], "live");
}

#[test]
fn a_reader_that_goes_away_ends_devctl_quietly_with_141() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let mut monitor = devctl_command(&bus, &["monitor"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("devctl monitor");
    let mut first = String::new();
    std::io::BufReader::new(monitor.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("a line");
    assert!(first.contains("driver/sim-scsi"), "{first}");
    // The reader is gone (like `devctl monitor | head -1`); the next event
    // ends devctl: no panic, no message, status 141 as after SIGPIPE.
    ok(&bus, &["add", "host", "unseen"]);
    let out = monitor.wait_with_output().expect("devctl");
    assert_eq!(out.status.code(), Some(141));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[test]
fn actions_answer_in_json_too() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    let added = json(
        &bus,
        &["add", "host", "j", "--driver", "sim-scsi", "--luns", "1"],
    );
    assert_eq!(
        (added["kind"].as_str(), added["name"].as_str()),
        (Some("host"), Some("j"))
    );
    assert_eq!(added["driver"], "/org/devmgr/DevMgr1/objects/16777216");
    let stopped = json(&bus, &["stop", "j"]);
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(json(&bus, &["reenable", "j"])["state"], "live");
    ok(&bus, &["add", "host", "k"]);
    let bound = json(&bus, &["bind", "k", "sim-scsi"]);
    assert_eq!(bound["driver"], "/org/devmgr/DevMgr1/objects/16777216");
    assert_eq!(
        json(&bus, &["unbind", "k"])["driver"],
        serde_json::Value::Null
    );
    let mut holder = holding(&bus, &["j", "--reason", "busy"]);
    let dry = json(&bus, &["remove", "j", "--dry-run"]);
    assert_eq!(
        (dry["outcome"].as_str(), dry["dry_run"].as_bool()),
        (Some("pending"), Some(true))
    );
    assert_eq!(
        json(&bus, &["show", "j"])["state"],
        "live",
        "a dry run changes nothing"
    );
    let report = json(&bus, &["remove", "j"]);
    assert_eq!(report["outcome"], "pending");
    assert_eq!(report["label"], "host/j");
    let held = report["pending"]
        .as_array()
        .and_then(|p| p.iter().find(|o| o["name"] == "j").cloned())
        .expect("the host among the pending");
    assert_eq!(held["holders"][0]["reason"], "busy");
    assert_eq!(held["holders"][0]["pid"], holder.id());
    assert_eq!(held["holders"][0]["process"], "devctl");
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn monitor_prints_one_line_per_event_for_people() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    ok(&bus, &["add", "host", "before"]);
    let mut monitor = devctl_command(&bus, &["monitor", "--kind", "host"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("devctl monitor");
    let mut lines = std::io::BufReader::new(monitor.stdout.take().expect("stdout")).lines();
    // The current state comes first; events follow once it is printed.
    let present = lines.next().expect("a line").expect("text");
    assert!(
        present.ends_with("present   host/before              live refs=0"),
        "{present:?}"
    );
    ok(&bus, &["add", "host", "seen"]);
    ok(&bus, &["stop", "seen"]);
    ok(&bus, &["remove", "seen"]);
    let mut got = Vec::new();
    while got.len() < 3 {
        let line = lines.next().expect("a line").expect("text");
        // "HH:MM:SS.mmm event object details": drop the time.
        let (time, rest) = line.split_once(' ').expect("a timestamp");
        assert_eq!(time.len(), 12, "{line}");
        got.push(rest.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    assert_eq!(
        got,
        [
            "added host/seen live refs=0",
            "changed host/seen State=stopped",
            "removed host/seen",
        ]
    );
    let _ = monitor.kill();
    let _ = monitor.wait();
}

#[test]
fn colour_only_on_a_terminal_and_never_under_no_color() {
    let bus = TestBus::start();
    let _daemon = Daemon::start(&bus);
    // `script` gives devctl a pseudo-terminal for its stdout.
    let on_a_tty = |no_color: bool| {
        let mut c = Command::new("script");
        c.args([
            "-qec",
            &format!("{} list", binary("devctl").display()),
            "/dev/null",
        ])
        .env("DEVMGR_BUS_ADDRESS", &bus.address)
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR");
        if no_color {
            c.env("NO_COLOR", "1");
        }
        let out = c.output().expect("script (package bsdutils)");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        on_a_tty(false).contains("\u{1b}["),
        "no colour on a terminal"
    );
    assert!(
        !on_a_tty(true).contains("\u{1b}["),
        "colour despite NO_COLOR"
    );
    assert!(
        !ok(&bus, &["list"]).contains('\u{1b}'),
        "colour off a terminal"
    );
}
