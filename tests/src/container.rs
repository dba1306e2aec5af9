//! A real systemd as PID 1: a Debian 12 root made once with mmdebstrap
//! (cached), booted with `systemd-nspawn -b` on a throwaway overlay of it,
//! with commands run inside through nsenter
//! (`../shared/notes/systemd-container.md` has the flags and why). Nothing
//! is left on the host: the overlay, the cgroups nspawn makes without a
//! host systemd, and the container itself go when it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// What the root holds beyond minbase: systemd and both system buses, udev
/// for libudev, polkit, and passwd for the test's users.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "dbus-broker",
    "udev",
    "polkitd",
    "passwd",
    "util-linux",
];

/// Where the root is cached between runs (rebuilt when [`PACKAGES`]
/// changes: the list is in the name).
fn cached_root() -> PathBuf {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in PACKAGES.join(",").bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
    }
    PathBuf::from(format!("/var/cache/devmgr-tests/bookworm-{hash:016x}"))
}

/// Fails (never skips) with what to install when a tool is missing.
fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "the systemd test needs {program} (package {package}; .ci/deps installs it)"
    );
}

/// The cached root, built first if it is not there. How long that took.
pub fn root() -> (PathBuf, Duration) {
    let root = cached_root();
    let start = Instant::now();
    if root.join("usr/lib/systemd/systemd").exists() {
        return (root, start.elapsed());
    }
    require("mmdebstrap", "mmdebstrap");
    let parent = root.parent().expect("cache parent");
    std::fs::create_dir_all(parent).expect("cache dir");
    let building = parent.join(format!(".building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    let out = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .args(["bookworm"])
        .arg(&building)
        .arg("/etc/apt/sources.list.d/debian.sources")
        .output()
        .expect("run mmdebstrap");
    assert!(
        out.status.success(),
        "mmdebstrap failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&building, &root).expect("move the built root in place");
    (root, start.elapsed())
}

/// Which system bus the container runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemBus {
    DbusDaemon,
    DbusBroker,
}

/// A booted container.
pub struct Container {
    /// The machine name (unique per test process).
    pub name: String,
    /// The overlay's merged root, as the host sees it.
    pub root: PathBuf,
    /// How long from nspawn's start to `is-system-running` answering.
    pub boot_time: Duration,
    nspawn: Option<Child>,
    leader: u32,
    overlay: TempDir,
    cgroups_before: Vec<PathBuf>,
}

/// The cgroup directories under /sys/fs/cgroup, to find what nspawn left.
fn cgroup_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry
                .file_type()
                .is_ok_and(|t| t.is_dir() && !t.is_symlink())
            {
                stack.push(entry.path());
                out.push(entry.path());
            }
        }
    }
    out
}

/// Runs a host command, failing with its output.
pub fn host(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Container {
    /// Mounts an overlay of `lower`, lets `prepare` change it (install the
    /// project), and boots it with `bus` as the system bus, binding the
    /// host's `devices` (paths under /dev) inside.
    pub fn boot(
        lower: &Path,
        bus: SystemBus,
        devices: &[PathBuf],
        prepare: impl FnOnce(&Path),
    ) -> Container {
        require("systemd-nspawn", "systemd-container");
        let overlay = TempDir::unique("container");
        let (upper, work, merged) = (
            overlay.0.join("upper"),
            overlay.0.join("work"),
            overlay.0.join("root"),
        );
        for dir in [&upper, &work, &merged] {
            std::fs::create_dir_all(dir).expect("overlay dirs");
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        host(
            "mount",
            &[
                "-t",
                "overlay",
                "overlay",
                "-o",
                &options,
                &merged.to_string_lossy(),
            ],
        );
        let name = format!("devmgr-test-{}", std::process::id());
        let mut container = Container {
            name: name.clone(),
            root: merged.clone(),
            boot_time: Duration::ZERO,
            nspawn: None,
            leader: 0,
            overlay,
            cgroups_before: cgroup_dirs(),
        };
        // The bus: dbus-broker's package enables it as dbus.service; the
        // dbus-daemon run disables it again.
        let root_arg = format!("--root={}", merged.display());
        let verb = match bus {
            SystemBus::DbusBroker => "enable",
            SystemBus::DbusDaemon => "disable",
        };
        host(
            "systemctl",
            &[&root_arg, "--quiet", verb, "dbus-broker.service"],
        );
        // The machine's name, so the journal and prompts say where they are.
        std::fs::write(merged.join("etc/hostname"), format!("{name}\n")).expect("hostname");
        prepare(&merged);
        let mut command = Command::new("systemd-nspawn");
        command
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .arg("-D")
            .arg(&merged)
            .args([
                "-M",
                &name,
                "--register=no",
                "--keep-unit",
                "--console=read-only",
            ])
            .args([
                "--system-call-filter=bpf fanotify_init fanotify_mark",
                "--capability=CAP_NET_ADMIN",
            ])
            .args(["--bind=/dev/loop-control", "--bind-ro=/run/udev"]);
        for device in devices {
            command.arg(format!("--bind={}", device.display()));
        }
        let start = Instant::now();
        let child = command
            .arg("-b")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start systemd-nspawn");
        container.nspawn = Some(child);
        container.leader = container.wait_for_leader(start);
        // Booted: systemd has reached its default target (or says why not).
        // (systemctl needs systemd's private socket, which comes a moment
        // after PID 1 does; and before PID 1 has made /run/systemd/system,
        // systemctl says "offline" at once, as on a machine without
        // systemd: CI once met that.)
        let state = loop {
            let state = container.sh("systemctl is-system-running --wait");
            let not_yet = state.stderr.contains("Failed to connect to bus")
                || state.stdout.trim() == "offline";
            if !not_yet {
                break state;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the container's systemd did not answer within 60 s: {} {}",
                state.stdout,
                state.stderr
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        container.boot_time = start.elapsed();
        assert!(
            matches!(state.stdout.trim(), "running" | "degraded"),
            "the container did not boot: {:?} {:?}\n{}",
            state.stdout,
            state.stderr,
            container
                .sh("systemctl --failed --no-pager; journalctl -b -p warning --no-pager | tail -50")
                .stdout
        );
        container
    }

    /// The container's PID 1 as the host sees it: nspawn's child.
    fn wait_for_leader(&mut self, start: Instant) -> u32 {
        loop {
            let nspawn = self.nspawn.as_mut().expect("nspawn");
            if let Ok(Some(status)) = nspawn.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = nspawn.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                panic!("systemd-nspawn exited ({status}) before booting:\n{err}");
            }
            let pid = nspawn.id();
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            for child in children.split_whitespace() {
                let comm =
                    std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    if let Ok(leader) = child.parse() {
                        return leader;
                    }
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the container's systemd did not start within 60 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `script` with sh inside the container, as root.
    pub fn sh(&self, script: &str) -> Outcome {
        self.run(&["sh", "-c", script])
    }

    /// Runs a command inside the container.
    pub fn run(&self, args: &[&str]) -> Outcome {
        let leader = self.leader.to_string();
        let start = Instant::now();
        let out = Command::new("nsenter")
            .args(["-t", &leader, "-a", "--"])
            .args([
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
            ])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter");
        Outcome::from(out, start.elapsed())
    }

    /// Runs `script` inside and fails unless it succeeds; its stdout.
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status == Some(0),
            "in the container: {script}\nexit {:?}\n{}{}",
            out.status,
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// Powers the container off and waits for nspawn to end.
    fn poweroff(&mut self) {
        let Some(mut nspawn) = self.nspawn.take() else {
            return;
        };
        if self.leader != 0 {
            let _ = Command::new("nsenter")
                .args([
                    "-t",
                    &self.leader.to_string(),
                    "-a",
                    "--",
                    "systemctl",
                    "poweroff",
                ])
                .output();
        }
        let start = Instant::now();
        while nspawn.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = nspawn.kill();
                let _ = nspawn.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.poweroff();
        let _ = Command::new("umount").arg(&self.root).status();
        // nspawn, without a host systemd to ask for a scope, makes cgroups
        // of its own (`payload`, `supervisor`): remove what is new, deepest
        // first (only empty cgroups can be removed).
        let mut left: Vec<PathBuf> = cgroup_dirs()
            .into_iter()
            .filter(|d| !self.cgroups_before.contains(d))
            .filter(|d| {
                d.components()
                    .any(|c| c.as_os_str() == "payload" || c.as_os_str() == "supervisor")
            })
            .collect();
        left.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in left {
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = &self.overlay;
    }
}

/// What a command inside printed, its exit code and how long it took.
pub struct Outcome {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Outcome {
    fn from(out: Output, took: Duration) -> Outcome {
        Outcome {
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took,
        }
    }
}
