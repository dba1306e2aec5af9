//! Real disks for the tests of the kernel's users (rules 17–20): loop
//! devices the test creates itself (LOOP_CTL_ADD, at numbers far above the
//! machine's own), backed by files in a directory of its own, with ext4,
//! swap, partitions and mounts — all undone when dropped, whatever the test
//! did. Nothing here touches a device the test did not create.
//!
//! A mount made on the machine is copied into every mount namespace made
//! after it, so a test that makes one would hold the others' disks: tests
//! that use real disks run one at a time, in this process and any other
//! ([`exclusive`]: a lock on a file, which a test runner that runs test
//! binaries side by side respects too).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::TempDir;

/// A process a test started, killed and reaped when dropped: a test that
/// fails midway must not leave behind a process that keeps its disk busy
/// (declare it after the disk, so that it goes first).
pub struct Reaped(pub std::process::Child);

impl Reaped {
    /// Starts `command`; panics with `what` if it cannot.
    pub fn spawn(command: &mut Command, what: &str) -> Reaped {
        Reaped(command.spawn().unwrap_or_else(|e| panic!("{what}: {e}")))
    }

    /// Kills it and waits until it is gone.
    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Held for the whole of a test that uses real disks (it may be held
/// across awaits: it is a file lock, not a mutex of this process).
pub struct Exclusive {
    _lock: std::fs::File,
}

/// Waits until no other test uses real disks; holds that until dropped.
pub fn exclusive() -> Exclusive {
    let path = std::env::temp_dir().join("devmgr-tests-real-disks.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("lock {}: {e}", path.display()));
    Exclusive { _lock: file }
}

/// The loop-control requests.
pub const LOOP_CTL_ADD: u32 = 0x4C80;
pub const LOOP_CTL_REMOVE: u32 = 0x4C81;

/// LOOP_CTL_ADD / LOOP_CTL_REMOVE through python3 (the tests have no
/// unsafe code); EBUSY (udevd probing) is retried for 5 s.
pub fn loop_control(request: u32, number: u32) -> Result<(), String> {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import errno,fcntl,os,sys,time\n\
             fd=os.open('/dev/loop-control', os.O_RDWR)\n\
             for attempt in range(100):\n\
             \x20   try: fcntl.ioctl(fd, int(sys.argv[1]), int(sys.argv[2])); break\n\
             \x20   except OSError as e:\n\
             \x20       if e.errno != errno.EBUSY or attempt == 99: raise\n\
             \x20       time.sleep(0.05)",
            &request.to_string(),
            &number.to_string(),
        ])
        .output()
        .expect("python3");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Runs a command once: its stdout if it succeeded, else its stdout and
/// stderr.
fn attempt(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(stdout + &String::from_utf8_lossy(&out.stderr))
    }
}

/// Runs a command that must succeed; panics with its output otherwise.
pub fn run(program: &str, args: &[&str]) -> String {
    attempt(program, args).unwrap_or_else(|output| panic!("{program} {args:?}: {output}"))
}

/// Runs a tool that opens `device` with `O_EXCL` (mkfs.ext4, mkswap) and
/// must succeed. The kernel refuses that claim with EBUSY while anyone
/// else claims the device or its whole disk, and on a loaded machine
/// something briefly did (CI saw mkswap refused once, right after a
/// partition of the same disk was mounted); whoever it was let go at
/// once, so EBUSY is retried for 5 s. If it lasts, the panic says who
/// holds the device and who has its nodes open.
pub fn run_claiming(program: &str, args: &[&str], device: &Path) -> String {
    let start = std::time::Instant::now();
    loop {
        let output = match attempt(program, args) {
            Ok(stdout) => return stdout,
            Err(output) => output,
        };
        // (mkswap says EBUSY's text; mke2fs its own words for it.)
        let busy = ["Device or resource busy", "apparently in use by the system"];
        if !busy.iter().any(|b| output.contains(b))
            || start.elapsed() > std::time::Duration::from_secs(5)
        {
            panic!("{program} {args:?}: {output}\n{}", who_uses(device));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// What the kernel says holds `device` and its whole disk (sysfs
/// `holders`, mounts, swap) and which processes have either node open:
/// for the message of a test that found it busy.
fn who_uses(device: &Path) -> String {
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let class = PathBuf::from("/sys/class/block").join(&name);
    let whole = std::fs::canonicalize(&class)
        .ok()
        .filter(|p| p.join("partition").exists())
        .and_then(|p| p.parent().and_then(|w| w.file_name()).map(|w| w.to_owned()))
        .map(|w| w.to_string_lossy().into_owned());
    let mut report = String::new();
    for dev in std::iter::once(name.clone()).chain(whole) {
        let holders: Vec<String> = std::fs::read_dir(format!("/sys/class/block/{dev}/holders"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        report += &format!("{dev}: holders {holders:?}\n");
        let node = format!("/dev/{dev}");
        for line in std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .chain(
                std::fs::read_to_string("/proc/swaps")
                    .unwrap_or_default()
                    .lines(),
            )
            .filter(|l| l.split(' ').any(|w| w == node))
        {
            report += &format!("  {line}\n");
        }
        for pid in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let fds = pid.path().join("fd");
            let open = std::fs::read_dir(&fds)
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new(&node)));
            if open {
                let comm = std::fs::read_to_string(pid.path().join("comm")).unwrap_or_default();
                report += &format!(
                    "  open by pid {} ({})\n",
                    pid.file_name().to_string_lossy(),
                    comm.trim()
                );
            }
        }
    }
    report
}

/// A loop device of the test's own, with a backing file.
pub struct LoopDisk {
    /// Its number: `/dev/loop<number>`.
    pub number: u32,
    /// Where its backing file and mount points live.
    pub dir: TempDir,
    mounts: Vec<PathBuf>,
    swap: Vec<PathBuf>,
}

impl LoopDisk {
    /// A new loop device with a backing file of `megabytes` MiB, attached.
    /// Numbers start at 40,000 + 64 × (pid mod 400), one per disk.
    pub fn create(tag: &str, megabytes: u64) -> LoopDisk {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let number =
            40_000 + 64 * (std::process::id() % 400) + NEXT.fetch_add(1, Ordering::Relaxed) % 64;
        let dir = TempDir::unique(tag);
        std::fs::create_dir_all(&dir.0).expect("temp dir");
        let image = dir.0.join("disk.img");
        let file = std::fs::File::create(&image).expect("backing file");
        file.set_len(megabytes << 20).expect("backing file size");
        drop(file);
        if let Err(e) = loop_control(LOOP_CTL_ADD, number) {
            panic!("cannot create loop{number} (these tests need root and /dev/loop-control): {e}");
        }
        let disk = LoopDisk {
            number,
            dir,
            mounts: Vec::new(),
            swap: Vec::new(),
        };
        crate::wait_for(|| disk.node().exists(), "the loop device's node");
        run(
            "losetup",
            &[&disk.node().to_string_lossy(), &image.to_string_lossy()],
        );
        disk
    }

    /// `loop<number>`.
    pub fn name(&self) -> String {
        format!("loop{}", self.number)
    }

    /// `/dev/loop<number>`.
    pub fn node(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.number))
    }

    /// `/dev/loop<number>p<n>`.
    pub fn partition(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}p{n}", self.number))
    }

    /// Its sysfs directory (gone once the kernel removed it).
    pub fn sys_block(&self) -> PathBuf {
        PathBuf::from(format!("/sys/block/loop{}", self.number))
    }

    /// An ext4 filesystem on `device` (the disk or one of its partitions).
    pub fn mkfs(&self, device: &Path) {
        run_claiming(
            "mkfs.ext4",
            &["-q", "-F", &device.to_string_lossy()],
            device,
        );
    }

    /// Writes a DOS partition table with `count` partitions of 8 MiB each
    /// (from 1 MiB on) and has the kernel add them (`partx -a`: this
    /// kernel has no partition parsers of its own).
    pub fn partitions(&self, count: u32) {
        let mut table = vec![0u8; 512];
        for i in 0..count.min(4) {
            let entry = 446 + 16 * i as usize;
            let start: u32 = 2048 + i * 16_384;
            let sectors: u32 = 16_384;
            table[entry + 4] = 0x83; // Linux
            table[entry + 8..entry + 12].copy_from_slice(&start.to_le_bytes());
            table[entry + 12..entry + 16].copy_from_slice(&sectors.to_le_bytes());
        }
        table[510] = 0x55;
        table[511] = 0xAA;
        std::fs::write(self.node(), &table).expect("write the partition table");
        run("partx", &["-a", &self.node().to_string_lossy()]);
        crate::wait_for(|| self.partition(count).exists(), "the partitions' nodes");
    }

    /// A directory to mount on.
    pub fn mount_point(&self, name: &str) -> PathBuf {
        let at = self.dir.0.join(name);
        std::fs::create_dir_all(&at).expect("mount point");
        at
    }

    /// Mounts `device` at `at` (unmounted when dropped, if still there).
    pub fn mount(&mut self, device: &Path, at: &Path) {
        run("mount", &[&device.to_string_lossy(), &at.to_string_lossy()]);
        self.mounts.push(at.to_owned());
    }

    /// Unmounts `at` (umount(2), in this process).
    pub fn umount(&mut self, at: &Path) {
        nix::mount::umount(at).unwrap_or_else(|e| panic!("umount {}: {e}", at.display()));
        self.mounts.retain(|m| m != at);
    }

    /// Swap on `device` (turned off when dropped, if still on).
    pub fn swapon(&mut self, device: &Path) {
        run_claiming("mkswap", &["-q", &device.to_string_lossy()], device);
        run("swapon", &[&device.to_string_lossy()]);
        self.swap.push(device.to_owned());
    }

    /// Turns swap on `device` off.
    pub fn swapoff(&mut self, device: &Path) {
        run("swapoff", &[&device.to_string_lossy()]);
        self.swap.retain(|s| s != device);
    }

    /// Whether `at` is a mount point in the test's mount namespace.
    pub fn is_mounted(at: &Path) -> bool {
        std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(4) == Some(at.to_string_lossy().as_ref()))
        })
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        // (devmgrd may have detached them already: detach-mounts.)
        let quiet = || std::process::Stdio::null();
        for at in self.mounts.drain(..) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&at)
                .stderr(quiet())
                .status();
        }
        for device in self.swap.drain(..) {
            let _ = Command::new("swapoff")
                .arg(&device)
                .stderr(quiet())
                .status();
        }
        if self.node().exists() {
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(self.node())
                .stderr(std::process::Stdio::null())
                .status();
            let _ = loop_control(LOOP_CTL_REMOVE, self.number);
        }
    }
}
