//! devctl without a daemon: help and exit codes, the daemon search's
//! report, and the generated completions and man page.

use std::process::{Command, Output};

fn devctl(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_devctl"));
    c.args(args).env_remove("DEVMGR_BUS_ADDRESS");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run devctl")
}

const SUBCOMMANDS: &[&str] = &[
    "status",
    "list",
    "tree",
    "show",
    "add",
    "remove",
    "stop",
    "reenable",
    "bind",
    "unbind",
    "hold",
    "monitor",
    "completions",
];

#[test]
fn help_documents_the_exit_codes() {
    let out = devctl(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for code in ["0 ", "1 ", "2 ", "3 ", "69 ", "77 "] {
        assert!(
            help.contains(&format!("  {code}")),
            "exit code {code} not in --help"
        );
    }
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(devctl(&["frobnicate"], &[]).status.code(), Some(2));
    assert_eq!(devctl(&["add", "host"], &[]).status.code(), Some(2));
    assert_eq!(
        devctl(&["add", "host", "h", "--attr", "novalue"], &[])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn an_unreachable_daemon_exits_69_and_says_what_was_tried() {
    let out = devctl(
        &["status", "--address", "unix:path=/nonexistent/devmgr-bus"],
        &[],
    );
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--address"), "{err}");

    // No address anywhere: every place in the search order is listed.
    let out = devctl(
        &["list"],
        &[
            ("XDG_RUNTIME_DIR", "/nonexistent"),
            ("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/system"),
            ("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/session"),
        ],
    );
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    for place in ["embedded bus", "system bus", "session bus"] {
        assert!(err.contains(place), "{place} missing from: {err}");
    }
}

#[test]
fn completions_and_man_page_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = devctl(&["completions", shell], &[]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        for sub in SUBCOMMANDS {
            assert!(text.contains(sub), "{shell} completions lack {sub}");
        }
    }
    let out = devctl(&["manpage"], &[]);
    assert!(out.status.success());
    let man = String::from_utf8_lossy(&out.stdout);
    assert!(man.contains(".TH devctl"));
    for sub in SUBCOMMANDS {
        assert!(man.contains(sub), "the man page lacks {sub}");
    }
    assert!(
        man.contains("Exit status"),
        "the man page lacks the exit codes"
    );
}
