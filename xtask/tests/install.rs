//! `cargo xtask install` (issue 7) for real: into a staging DESTDIR (the
//! exact file list, modes, paths filled in, the administrator's config
//! kept, uninstall), into a real prefix whose unit `systemd-analyze`
//! verifies and whose D-Bus files a real system-type dbus-daemon uses to
//! activate the installed devmgrd; and the generated man pages and
//! completions cover every subcommand and option.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use devmgr_tests::system_bus::{nobody_calls, SystemBus};
use devmgr_tests::*;

/// Runs `cargo xtask ARGS` (the built xtask) with the tested binaries.
fn xtask(args: &[&str]) -> Output {
    let bin_dir = binary("devmgrd")
        .parent()
        .expect("the binaries' directory")
        .to_path_buf();
    // devctl is checked (and must be current) too.
    let _ = binary("devctl");
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .env_remove("DESTDIR")
        .env_remove("PREFIX")
        .env_remove("SYSCONFDIR")
        .output()
        .expect("xtask");
    assert!(
        out.status.success(),
        "xtask {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every file under `root`, relative, sorted.
fn files(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, root, out);
            } else {
                let relative = path.strip_prefix(root).expect("under root");
                out.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

const STAGED: &[&str] = &[
    "etc/devmgr/devmgrd.toml",
    "usr/bin/devctl",
    "usr/lib/systemd/system/devmgrd.service",
    "usr/sbin/devmgrd",
    "usr/share/bash-completion/completions/devctl",
    "usr/share/bash-completion/completions/devmgrd",
    "usr/share/dbus-1/interfaces/org.devmgr.DevMgr1.xml",
    "usr/share/dbus-1/system-services/org.devmgr.DevMgr1.service",
    "usr/share/dbus-1/system.d/org.devmgr.DevMgr1.conf",
    "usr/share/fish/vendor_completions.d/devctl.fish",
    "usr/share/fish/vendor_completions.d/devmgrd.fish",
    "usr/share/man/man1/devctl.1",
    "usr/share/man/man8/devmgrd.8",
    "usr/share/polkit-1/actions/org.devmgr.DevMgr1.policy",
    "usr/share/zsh/site-functions/_devctl",
    "usr/share/zsh/site-functions/_devmgrd",
];

/// The Cockpit page's own files (issue 15), as data/cockpit/devmgr has them.
const COCKPIT_PAGE: &[&str] = &[
    "devmgr.css",
    "devmgr.js",
    "dialogs.js",
    "dom.js",
    "format.js",
    "index.html",
    "manifest.json",
    "panels.js",
    "store.js",
    "tree.js",
    "vendor/patternfly.css",
];

/// Every file install stages: the list above, the Cockpit page, and the
/// fonts and icons its built styles name (whatever the pinned PatternFly
/// ships: read from the build that install made).
fn staged() -> Vec<String> {
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/cockpit/devmgr");
    let mut all: Vec<String> = STAGED.iter().map(|f| f.to_string()).collect();
    all.extend(
        COCKPIT_PAGE
            .iter()
            .map(|f| f.to_string())
            .chain(
                files(&page.join("vendor/assets"))
                    .into_iter()
                    .map(|f| format!("vendor/assets/{f}")),
            )
            .map(|f| format!("usr/share/cockpit/devmgr/{f}")),
    );
    all.sort();
    all
}

#[test]
fn installs_every_file_where_a_system_looks_for_it() {
    let stage = TempDir::unique("destdir");
    let destdir = stage.0.to_string_lossy().into_owned();
    xtask(&["install", "--destdir", &destdir, "--prefix", "/usr"]);
    let staged = staged();
    assert_eq!(files(&stage.0), staged);
    assert!(
        staged.iter().any(|f| f.ends_with(".woff2")),
        "the page's fonts are installed (it must work offline)"
    );
    // The page is installed as it is in the source tree.
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/cockpit/devmgr");
    for file in COCKPIT_PAGE {
        assert!(
            std::fs::read(stage.0.join("usr/share/cockpit/devmgr").join(file)).expect("installed")
                == std::fs::read(page.join(file)).expect("source"),
            "{file} is installed as built"
        );
    }

    for file in &staged {
        let path = stage.0.join(file);
        let meta = std::fs::metadata(&path).expect("stat");
        assert!(meta.len() > 0, "{file} is empty");
        let executable = file.contains("bin/");
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(mode, if executable { 0o755 } else { 0o644 }, "{file}");
    }
    for (installed, built) in [
        ("usr/sbin/devmgrd", "devmgrd"),
        ("usr/bin/devctl", "devctl"),
    ] {
        assert!(
            std::fs::read(stage.0.join(installed)).expect("installed")
                == std::fs::read(binary(built)).expect("built"),
            "{installed} is the built {built}"
        );
    }
    // The paths inside name the target system, not the staging root.
    let unit = read(&stage.0, "usr/lib/systemd/system/devmgrd.service");
    assert!(
        unit.contains("\nExecStart=/usr/sbin/devmgrd --bus system\n"),
        "{unit}"
    );
    assert!(unit.contains("\nBusName=org.devmgr.DevMgr1\n"), "{unit}");
    let activation = read(
        &stage.0,
        "usr/share/dbus-1/system-services/org.devmgr.DevMgr1.service",
    );
    assert!(activation.contains("\nExec=/usr/sbin/devmgrd --bus system\n"));
    assert!(activation.contains("\nSystemdService=devmgrd.service\n"));
    assert!(!unit.contains(&destdir) && !activation.contains(&destdir));

    // An administrator's configuration is never overwritten, nor removed.
    let config = stage.0.join("etc/devmgr/devmgrd.toml");
    std::fs::write(&config, "udev = false\n").expect("edit the config");
    let again = xtask(&["install", "--destdir", &destdir, "--prefix", "/usr"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("kept"));
    assert_eq!(read(&stage.0, "etc/devmgr/devmgrd.toml"), "udev = false\n");
    xtask(&["uninstall", "--destdir", &destdir, "--prefix", "/usr"]);
    assert_eq!(files(&stage.0), ["etc/devmgr/devmgrd.toml"]);
}

fn read(root: &Path, file: &str) -> String {
    std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// An install into a real prefix under a temporary directory (no DESTDIR),
/// so that the paths inside the files exist.
struct Installed {
    _dir: TempDir,
    prefix: PathBuf,
}

fn install_into_temporary_prefix(tag: &str) -> Installed {
    let dir = TempDir::unique(tag);
    let prefix = dir.0.join("usr");
    let sysconfdir = dir.0.join("etc");
    xtask(&[
        "install",
        "--prefix",
        &prefix.to_string_lossy(),
        "--sysconfdir",
        &sysconfdir.to_string_lossy(),
    ]);
    Installed { _dir: dir, prefix }
}

/// Whether CI requires `tool` (it must then be there) or a developer's
/// machine may lack it (the check is then left out, saying so).
fn tool_or_skip(tool: &str) -> bool {
    let there = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !there {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing (package systemd): CI must verify the unit"
        );
        eprintln!("{tool} is missing: the unit is not verified here");
    }
    there
}

#[test]
fn systemd_analyze_accepts_the_unit() {
    if !tool_or_skip("systemd-analyze") {
        return;
    }
    let installed = install_into_temporary_prefix("analyze");
    let unit = installed.prefix.join("lib/systemd/system/devmgrd.service");
    // MANPATH: Documentation=man:devmgrd(8) must resolve to the installed page.
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .env("MANPATH", installed.prefix.join("share/man"))
        .output()
        .expect("systemd-analyze");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");

    // The sandbox, scored offline: "OK" is below 5 of 10 (more exposed).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze security");
    let report = String::from_utf8_lossy(&out.stdout);
    let score: f64 = report
        .split("Overall exposure level for devmgrd.service:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    eprintln!("systemd-analyze security: exposure {score} of 10");
    assert!(score < 5.0, "the sandbox got weaker: {score}\n{report}");
}

/// The subcommands `devctl --help` lists.
fn devctl_subcommands() -> Vec<String> {
    let help = stdout(
        &Command::new(binary("devctl"))
            .arg("--help")
            .output()
            .expect("devctl --help"),
    );
    let commands = help
        .split("Commands:")
        .nth(1)
        .expect("a Commands section")
        .split("\n\n")
        .next()
        .unwrap_or_default();
    let names: Vec<String> = commands
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();
    assert!(names.len() >= 12, "{names:?}");
    names
}

/// The long options `devmgrd --help` lists.
fn devmgrd_options() -> Vec<String> {
    let help = stdout(
        &Command::new(binary("devmgrd"))
            .arg("--help")
            .output()
            .expect("devmgrd --help"),
    );
    let options: Vec<String> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches([',', '.']).to_owned())
        .filter(|w| {
            w.chars()
                .skip(2)
                .all(|c| c.is_ascii_lowercase() || c == '-')
        })
        .collect();
    assert!(options.len() >= 20, "{options:?}");
    options
}

#[test]
fn man_pages_and_completions_cover_every_subcommand_and_option() {
    let installed = install_into_temporary_prefix("man");
    let share = installed.prefix.join("share");
    let text = |p: &str| read(&share, p);

    let devctl_man = text("man/man1/devctl.1");
    assert!(devctl_man.contains(".TH devctl 1"), "{devctl_man}");
    let completions = [
        "bash-completion/completions/devctl",
        "zsh/site-functions/_devctl",
        "fish/vendor_completions.d/devctl.fish",
    ];
    for name in devctl_subcommands() {
        assert!(devctl_man.contains(&name), "devctl.1 lacks {name}");
        for file in completions {
            assert!(text(file).contains(&name), "{file} lacks {name}");
        }
    }

    let devmgrd_man = text("man/man8/devmgrd.8");
    assert!(devmgrd_man.contains(".TH devmgrd 8"), "{devmgrd_man}");
    // roff escapes '-' as '\-'.
    let roff = devmgrd_man.replace("\\-", "-");
    assert!(
        roff.contains("/etc/devmgr/devmgrd.toml"),
        "the man page names the file"
    );
    for option in devmgrd_options() {
        assert!(roff.contains(&option), "devmgrd.8 lacks {option}");
        for file in [
            "bash-completion/completions/devmgrd",
            "zsh/site-functions/_devmgrd",
            "fish/vendor_completions.d/devmgrd.fish",
        ] {
            let bare = option.trim_start_matches('-');
            assert!(text(file).contains(bare), "{file} lacks {option}");
        }
    }
    for tool in ["devctl", "devmgrd"] {
        let script = share.join(format!("bash-completion/completions/{tool}"));
        let ok = Command::new("bash").arg("-n").arg(&script).status();
        assert!(
            ok.expect("bash").success(),
            "{tool}'s bash completion parses"
        );
    }
}

/// The installed activation file, policy and binary on a real system-type
/// bus: the first call starts devmgrd, which serves it, and `nobody` may
/// call it as the installed policy says.
#[test]
fn the_bus_activates_the_installed_daemon() {
    let installed = install_into_temporary_prefix("activation");
    let dbus = installed.prefix.join("share/dbus-1");
    let bus = SystemBus::start_with(
        &[&dbus.join("system.d/org.devmgr.DevMgr1.conf")],
        Some(&dbus.join("system-services")),
    );
    // No one owns the name yet; this call makes the bus start the daemon.
    assert!(!busctl_at(&bus.address, &["status", proto::BUS_NAME])
        .status
        .success());
    let version = busctl_at(
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
        version.status.success(),
        "activation failed: {}",
        String::from_utf8_lossy(&version.stderr)
    );
    let status = stdout(&busctl_at(&bus.address, &["status", proto::BUS_NAME]));
    let exe = installed.prefix.join("sbin/devmgrd");
    assert!(
        status.contains(&format!("Exe={}", exe.display())),
        "the installed devmgrd serves: {status}"
    );
    let nobody = nobody_calls(&bus.address);
    assert!(
        nobody.status.success(),
        "the installed policy lets anyone call: {}",
        String::from_utf8_lossy(&nobody.stderr)
    );
    // Stop it; otherwise it goes when the bus does (it exits on bus loss).
    let pid = status
        .lines()
        .find_map(|l| l.strip_prefix("PID="))
        .expect("its PID")
        .to_owned();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    wait_for(
        || !Path::new(&format!("/proc/{pid}")).exists(),
        "the activated devmgrd to exit",
    );
}
