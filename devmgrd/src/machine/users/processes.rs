//! Processes with a block device node open: found in `/proc/PID/fd` (what
//! lsof, fuser and lsfd read), followed by fanotify open and close events
//! on the device nodes (no file descriptor is opened for an event: the
//! group reports file ids, FAN_REPORT_FID), by a pidfd per holder (readable
//! when it exits) and by the process connector's forks and execs. A
//! device's last known holder going is confirmed by a full scan, since
//! another process may share its open file (a fork, a passed fd).
//!
//! Without fanotify (an old kernel, no CAP_SYS_ADMIN), nothing says that a
//! process closed a node without exiting: the known holders of a device are
//! then re-checked with a backoff (1 s doubling to 60 s) for as long as it
//! has any (docs/kernel-users.md).
//!
//! Also found here, when asked (a claim that finds a device busy): the
//! processes with files, or their working or root directory, on a
//! filesystem of a device that is no longer mounted — a lazily detached
//! filesystem they keep alive, and its disk with it. Nothing says when they
//! let go but their exit: they are re-checked with the same backoff for as
//! long as there are any.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

use super::DevNum;

/// What a holder is, for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcInfo {
    /// Its command name (`/proc/PID/comm`).
    pub comm: String,
    /// Its real uid.
    pub uid: u32,
}

/// The process's name and uid, if it still exists. (A name is any bytes a
/// process gave itself with `prctl(PR_SET_NAME)`: read lossily, so that
/// no name hides a holder.)
pub fn info(pid: u32) -> Option<ProcInfo> {
    let comm = std::fs::read(format!("/proc/{pid}/comm")).ok()?;
    let status = super::read_lossy(format!("/proc/{pid}/status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap_or(0);
    Some(ProcInfo {
        comm: String::from_utf8_lossy(&comm).trim_end().to_owned(),
        uid,
    })
}

/// What a path is, as far as the watcher needs to know.
struct Stat {
    block_device: bool,
    /// The device it is, if a device node.
    rdev: DevNum,
    /// The device of the filesystem it is on.
    dev: DevNum,
}

/// What a path is, from what the kernel has cached (`AT_STATX_DONT_SYNC`):
/// a file on a FUSE or NFS filesystem whose server stopped answering —
/// which any user can arrange — must never block the watcher. (The magic
/// links of `/proc/PID/fd` lead to the open file with no lookup on its
/// filesystem.)
fn stat(path: &Path) -> Option<Stat> {
    use rustix::fs::{AtFlags, FileType, StatxFlags, CWD};
    let s = rustix::fs::statx(CWD, path, AtFlags::STATX_DONT_SYNC, StatxFlags::TYPE).ok()?;
    Some(Stat {
        block_device: FileType::from_raw_mode(s.stx_mode.into()) == FileType::BlockDevice,
        rdev: (s.stx_rdev_major, s.stx_rdev_minor),
        dev: (s.stx_dev_major, s.stx_dev_minor),
    })
}

/// The block device a path is, if it is one.
pub fn block_device(path: &Path) -> Option<DevNum> {
    stat(path).filter(|s| s.block_device).map(|s| s.rdev)
}

/// What one process uses: device nodes it has open, and devices on whose
/// filesystem it has files or its directories.
#[derive(Default)]
struct Uses {
    nodes: BTreeSet<DevNum>,
    files: BTreeSet<DevNum>,
}

/// The devices among `nodes` whose node `pid` has open, and those among
/// `files` on whose filesystem it has a file open or its working or root
/// directory.
fn used_by(pid: u32, nodes: &HashSet<DevNum>, files: &HashSet<DevNum>) -> Uses {
    let mut uses = Uses::default();
    let mut look = |path: &Path| {
        // stat follows the magic link to the open file without opening it.
        let Some(s) = stat(path) else {
            return;
        };
        if s.block_device {
            if nodes.contains(&s.rdev) {
                uses.nodes.insert(s.rdev);
            }
        } else if files.contains(&s.dev) {
            uses.files.insert(s.dev);
        }
    };
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            look(&fd.path());
        }
    }
    if !files.is_empty() {
        look(Path::new(&format!("/proc/{pid}/cwd")));
        look(Path::new(&format!("/proc/{pid}/root")));
    }
    uses
}

/// Every process's pid but ours.
fn all_pids(own: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .collect()
}

/// Which processes, per device.
type ByDevice = HashMap<DevNum, BTreeMap<u32, ProcInfo>>;

/// The processes using tracked devices, and how devmgrd hears of them.
pub struct Processes {
    own: u32,
    fanotify: Option<Fanotify>,
    /// Known holders of each device's node.
    holders: ByDevice,
    /// Processes using a detached filesystem of the device (when asked).
    files: ByDevice,
    /// A pidfd per process in either.
    pidfds: HashMap<u32, OwnedFd>,
    /// For devices with users nothing reports the end of: when they are
    /// checked next, and the backoff that got there.
    recheck: HashMap<DevNum, (Instant, Duration)>,
}

/// Most pidfds held: a user who can open a followed node and forks
/// thousands of children must not spend devmgrd's file descriptors (its
/// clients' handles). Holders beyond it are re-checked with the backoff.
const MAX_PIDFDS: usize = 4096;

/// A pidfd on `pid` (readable when it exits), if it still exists.
pub fn pidfd(pid: u32) -> Option<OwnedFd> {
    let raw = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).ok()
}

const FIRST_RECHECK: Duration = Duration::from_secs(1);
const LAST_RECHECK: Duration = Duration::from_secs(60);
const NODE_EVENTS: MaskFlags = MaskFlags::FAN_OPEN
    .union(MaskFlags::FAN_CLOSE_WRITE)
    .union(MaskFlags::FAN_CLOSE_NOWRITE);

/// `FAN_REPORT_FID`: events name the file by its handle and carry no open
/// descriptor, so reading an event never opens the device node.
const FAN_REPORT_FID: u32 = 0x0000_0200;

impl Processes {
    /// Starts following; without fanotify, says why and falls back.
    pub fn new(own: u32) -> Processes {
        let flags = InitFlags::FAN_CLASS_NOTIF
            | InitFlags::FAN_CLOEXEC
            | InitFlags::FAN_NONBLOCK
            | InitFlags::from_bits_retain(FAN_REPORT_FID);
        let fanotify = match Fanotify::init(flags, EventFFlags::O_RDONLY) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(
                    "no fanotify ({e}): a process that closes a device node without exiting \
                     is noticed by a re-check (1 s, doubling to 60 s)"
                );
                None
            }
        };
        Processes {
            own,
            fanotify,
            holders: HashMap::new(),
            files: HashMap::new(),
            pidfds: HashMap::new(),
            recheck: HashMap::new(),
        }
    }

    /// Opens and closes of this node are reported from now on.
    pub fn watch_node(&self, node: &Path) {
        let Some(f) = &self.fanotify else { return };
        let added = f.mark(
            MarkFlags::FAN_MARK_ADD,
            NODE_EVENTS,
            nix::fcntl::AT_FDCWD,
            Some(node),
        );
        if let Err(e) = added {
            tracing::debug!("cannot watch opens of {}: {e}", node.display());
        }
    }

    /// Opens and closes of this node no longer matter (its device left the
    /// model; a deleted node's mark went with it).
    pub fn unwatch_node(&self, node: &Path) {
        let Some(f) = &self.fanotify else { return };
        let _ = f.mark(
            MarkFlags::FAN_MARK_REMOVE,
            NODE_EVENTS,
            nix::fcntl::AT_FDCWD,
            Some(node),
        );
    }

    /// What to poll: fanotify, and every known user's pidfd (with its pid).
    pub fn poll_fds(&self) -> (Option<BorrowedFd<'_>>, Vec<(u32, BorrowedFd<'_>)>) {
        (
            self.fanotify.as_ref().map(AsFd::as_fd),
            self.pidfds.iter().map(|(&p, fd)| (p, fd.as_fd())).collect(),
        )
    }

    /// The known holders of `dev`'s node.
    pub fn holders(&self, dev: DevNum) -> impl Iterator<Item = (u32, &ProcInfo)> {
        listed(&self.holders, dev)
    }

    /// The processes using a detached filesystem of `dev`, as last scanned.
    pub fn files_of(&self, dev: DevNum) -> impl Iterator<Item = (u32, &ProcInfo)> {
        listed(&self.files, dev)
    }

    /// Scans every process for the devices in `devs`: their holders are
    /// exactly what it finds. Returns the devices whose holders changed.
    pub fn full_scan(&mut self, devs: &HashSet<DevNum>) -> Vec<DevNum> {
        self.full_scan_with_files(devs, &HashSet::new())
    }

    /// Same, and for the devices in `files` (mounted nowhere any more), the
    /// processes using a filesystem of theirs.
    pub fn full_scan_with_files(
        &mut self,
        devs: &HashSet<DevNum>,
        files: &HashSet<DevNum>,
    ) -> Vec<DevNum> {
        if devs.is_empty() && files.is_empty() {
            return Vec::new();
        }
        let (mut open, mut on) = (ByDevice::new(), ByDevice::new());
        for pid in all_pids(self.own) {
            let uses = used_by(pid, devs, files);
            if uses.nodes.is_empty() && uses.files.is_empty() {
                continue;
            }
            let Some(info) = info(pid) else { continue };
            for dev in uses.nodes {
                open.entry(dev).or_default().insert(pid, info.clone());
            }
            for dev in uses.files {
                on.entry(dev).or_default().insert(pid, info.clone());
            }
        }
        let mut changed = Vec::new();
        for &dev in devs {
            let now = open.remove(&dev).unwrap_or_default();
            if self
                .holders
                .get(&dev)
                .map_or(!now.is_empty(), |old| *old != now)
            {
                changed.push(dev);
            }
            self.set(dev, now, false);
        }
        for &dev in files {
            let now = on.remove(&dev).unwrap_or_default();
            if self
                .files
                .get(&dev)
                .map_or(!now.is_empty(), |old| *old != now)
            {
                changed.push(dev);
            }
            self.set(dev, now, true);
        }
        self.forget_pidfds();
        changed
    }

    /// A device left the model.
    pub fn forget(&mut self, dev: DevNum) {
        self.holders.remove(&dev);
        self.files.remove(&dev);
        self.recheck.remove(&dev);
        self.forget_pidfds();
    }

    /// Records the node holders (or, with `files`, the users of the detached
    /// filesystem) of `dev`, with a pidfd on each.
    fn set(&mut self, dev: DevNum, users: BTreeMap<u32, ProcInfo>, files: bool) {
        for &pid in users.keys() {
            if self.pidfds.len() >= MAX_PIDFDS {
                break;
            }
            if let std::collections::hash_map::Entry::Vacant(slot) = self.pidfds.entry(pid) {
                if let Some(fd) = pidfd(pid) {
                    slot.insert(fd);
                }
            }
        }
        let map = if files {
            &mut self.files
        } else {
            &mut self.holders
        };
        if users.is_empty() {
            map.remove(&dev);
        } else {
            map.insert(dev, users);
        }
        // Re-checked with the backoff while it has users whose end nothing
        // reports: node holders without fanotify, detached-filesystem users.
        let unreported = self.files.contains_key(&dev)
            || (self.fanotify.is_none() && self.holders.contains_key(&dev))
            || [&self.holders, &self.files]
                .iter()
                .filter_map(|m| m.get(&dev))
                .any(|users| users.keys().any(|p| !self.pidfds.contains_key(p)));
        if !unreported {
            self.recheck.remove(&dev);
        } else {
            self.recheck
                .entry(dev)
                .or_insert_with(|| (Instant::now() + FIRST_RECHECK, FIRST_RECHECK));
        }
    }

    /// Drops the pidfds of processes that use nothing any more.
    fn forget_pidfds(&mut self) {
        let using: HashSet<u32> = self
            .holders
            .values()
            .chain(self.files.values())
            .flat_map(|h| h.keys().copied())
            .collect();
        self.pidfds.retain(|pid, _| using.contains(pid));
    }

    /// Re-checks the known users of `devs`: those that no longer use the
    /// device go; a device left without any is scanned in full.
    fn recheck_users(&mut self, devs: Vec<DevNum>) -> Vec<DevNum> {
        let mut changed = Vec::new();
        let (mut emptied, mut emptied_files) = (HashSet::new(), HashSet::new());
        for dev in devs {
            let wanted = HashSet::from([dev]);
            let none = HashSet::new();
            for files in [false, true] {
                let map = if files { &self.files } else { &self.holders };
                let Some(known) = map.get(&dev).cloned() else {
                    continue;
                };
                let still: BTreeMap<u32, ProcInfo> = known
                    .iter()
                    .filter(|(pid, _)| {
                        let uses = if files {
                            used_by(**pid, &none, &wanted).files
                        } else {
                            used_by(**pid, &wanted, &none).nodes
                        };
                        uses.contains(&dev)
                    })
                    .map(|(p, i)| (*p, i.clone()))
                    .collect();
                if still.is_empty() {
                    if files {
                        emptied_files.insert(dev);
                    } else {
                        emptied.insert(dev);
                    }
                } else if still != known {
                    changed.push(dev);
                    self.set(dev, still, files);
                }
            }
        }
        changed.extend(self.full_scan_with_files(&emptied, &emptied_files));
        self.forget_pidfds();
        changed
    }

    /// fanotify said something happened: opens are looked up in the
    /// opener's fds, and any close re-checks every device's known holders
    /// (the close is reported by whoever dropped the last copy of the open
    /// file, which may have come from a known holder). `tracked` is every
    /// device followed. Returns the devices whose holders changed.
    pub fn on_events(&mut self, tracked: &HashSet<DevNum>) -> Vec<DevNum> {
        let Some(f) = &self.fanotify else {
            return Vec::new();
        };
        let mut opened = BTreeSet::new();
        let (mut closed, mut overflow) = (false, false);
        loop {
            match f.read_events() {
                Ok(events) if events.is_empty() => break,
                Ok(events) => {
                    for event in events {
                        let mask = event.mask();
                        overflow |= mask.contains(MaskFlags::FAN_Q_OVERFLOW);
                        closed |= mask
                            .intersects(MaskFlags::FAN_CLOSE_WRITE | MaskFlags::FAN_CLOSE_NOWRITE);
                        match u32::try_from(event.pid()) {
                            // Our own opens are a real action's claim.
                            Ok(pid) if pid != self.own && mask.contains(MaskFlags::FAN_OPEN) => {
                                opened.insert(pid);
                            }
                            _ => {}
                        }
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => {
                    tracing::warn!("reading fanotify events: {e}");
                    break;
                }
            }
        }
        if overflow {
            tracing::warn!("fanotify's queue overflowed: scanning every process");
            return self.full_scan(tracked);
        }
        let mut changed = Vec::new();
        let none = HashSet::new();
        for pid in opened {
            let Some(info) = info(pid) else { continue };
            for dev in used_by(pid, tracked, &none).nodes {
                let mut holders = self.holders.get(&dev).cloned().unwrap_or_default();
                if holders.insert(pid, info.clone()) != Some(info.clone()) {
                    changed.push(dev);
                    self.set(dev, holders, false);
                }
            }
        }
        if closed {
            let devs: Vec<DevNum> = self.holders.keys().copied().collect();
            changed.extend(self.recheck_users(devs));
        }
        changed
    }

    /// A known user forked: the child shares its open files and its
    /// directories.
    pub fn forked(&mut self, parent: u32, child: u32) -> Vec<DevNum> {
        let by_parent = |m: &ByDevice| -> HashSet<DevNum> {
            m.iter()
                .filter(|(_, h)| h.contains_key(&parent))
                .map(|(d, _)| *d)
                .collect()
        };
        let (nodes, files) = (by_parent(&self.holders), by_parent(&self.files));
        if nodes.is_empty() && files.is_empty() {
            return Vec::new();
        }
        let Some(info) = info(child) else {
            return Vec::new();
        };
        let uses = used_by(child, &nodes, &files);
        let mut changed = Vec::new();
        for (devs, is_files) in [(uses.nodes, false), (uses.files, true)] {
            for dev in devs {
                let map = if is_files { &self.files } else { &self.holders };
                let mut users = map.get(&dev).cloned().unwrap_or_default();
                users.insert(child, info.clone());
                changed.push(dev);
                self.set(dev, users, is_files);
            }
        }
        changed
    }

    /// A process started a program: if it uses a device, its name changed.
    pub fn exec(&mut self, pid: u32) -> Vec<DevNum> {
        let Some(now) = info(pid) else {
            return Vec::new();
        };
        let mut changed = Vec::new();
        for (dev, users) in self.holders.iter_mut().chain(self.files.iter_mut()) {
            if let Some(known) = users.get_mut(&pid) {
                if *known != now {
                    *known = now.clone();
                    changed.push(*dev);
                }
            }
        }
        changed
    }

    /// A known user exited (its pidfd is readable).
    pub fn exited(&mut self, pid: u32) -> Vec<DevNum> {
        self.pidfds.remove(&pid);
        let mut devs: Vec<DevNum> = self
            .holders
            .iter()
            .chain(self.files.iter())
            .filter(|(_, h)| h.contains_key(&pid))
            .map(|(d, _)| *d)
            .collect();
        devs.sort_unstable();
        devs.dedup();
        self.recheck_users(devs)
    }

    /// When the next backoff re-check is due.
    pub fn next_recheck(&self) -> Option<Instant> {
        self.recheck.values().map(|(at, _)| *at).min()
    }

    /// Runs the re-checks that are due.
    pub fn due_rechecks(&mut self, now: Instant) -> Vec<DevNum> {
        let due: Vec<DevNum> = self
            .recheck
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(d, _)| *d)
            .collect();
        for dev in &due {
            if let Some((at, after)) = self.recheck.get_mut(dev) {
                *after = (*after * 2).min(LAST_RECHECK);
                *at = now + *after;
            }
        }
        self.recheck_users(due)
    }
}

fn listed(map: &ByDevice, dev: DevNum) -> impl Iterator<Item = (u32, &ProcInfo)> {
    map.get(&dev)
        .into_iter()
        .flat_map(|h| h.iter().map(|(p, i)| (*p, i)))
}
