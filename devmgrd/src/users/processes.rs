//! Processes with a block device node open: found in `/proc/PID/fd` (what
//! lsof, fuser and lsfd read), followed by fanotify open and close events
//! on the device nodes (no file descriptor is opened for an event: the
//! group reports file ids, FAN_REPORT_FID) and by a pidfd per holder
//! (readable when it exits). A device's last known holder going is
//! confirmed by a full scan, since a child may share its open file (a fork
//! makes no event).
//!
//! Without fanotify (an old kernel, no CAP_SYS_ADMIN), nothing says that a
//! process closed a node without exiting: the known holders of a device are
//! then re-checked with a backoff (1 s doubling to 60 s) for as long as it
//! has any (docs/kernel-users.md).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
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

/// The process's name and uid, if it still exists.
pub fn info(pid: u32) -> Option<ProcInfo> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap_or(0);
    Some(ProcInfo {
        comm: comm.trim_end().to_owned(),
        uid,
    })
}

/// `st_rdev` split into (major, minor), as the kernel encodes it.
pub fn split_rdev(rdev: u64) -> DevNum {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
    (major as u32, minor as u32)
}

/// The block device a path is, if it is one.
pub fn block_device(path: &Path) -> Option<DevNum> {
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type()
        .is_block_device()
        .then(|| split_rdev(meta.rdev()))
}

/// The block devices among `wanted` that `pid` has open.
fn open_by(pid: u32, wanted: &HashSet<DevNum>) -> BTreeSet<DevNum> {
    let mut found = BTreeSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return found;
    };
    for fd in fds.flatten() {
        // stat follows the magic link to the open file without opening it.
        if let Some(dev) = block_device(&fd.path()) {
            if wanted.contains(&dev) {
                found.insert(dev);
            }
        }
    }
    found
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

/// The processes with a tracked device open, and how devmgrd hears of them.
pub struct Processes {
    own: u32,
    fanotify: Option<Fanotify>,
    /// Known holders per device.
    holders: HashMap<DevNum, BTreeMap<u32, ProcInfo>>,
    /// A pidfd per known holder.
    pidfds: HashMap<u32, OwnedFd>,
    /// Without fanotify: when each device's holders are checked next, and
    /// the backoff that got there.
    recheck: HashMap<DevNum, (Instant, Duration)>,
}

const FIRST_RECHECK: Duration = Duration::from_secs(1);
const LAST_RECHECK: Duration = Duration::from_secs(60);

impl Processes {
    /// Starts following; without fanotify, says why and falls back.
    pub fn new(own: u32) -> Processes {
        let flags = InitFlags::FAN_CLASS_NOTIF
            | InitFlags::FAN_CLOEXEC
            | InitFlags::FAN_NONBLOCK
            | InitFlags::from_bits_retain(libc_report_fid());
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
            pidfds: HashMap::new(),
            recheck: HashMap::new(),
        }
    }

    /// Opens and closes of this node are reported from now on.
    pub fn watch_node(&self, node: &Path) {
        let Some(f) = &self.fanotify else { return };
        let mask = MaskFlags::FAN_OPEN | MaskFlags::FAN_CLOSE_WRITE | MaskFlags::FAN_CLOSE_NOWRITE;
        if let Err(e) = f.mark(
            MarkFlags::FAN_MARK_ADD,
            mask,
            nix::fcntl::AT_FDCWD,
            Some(node),
        ) {
            tracing::debug!("cannot watch opens of {}: {e}", node.display());
        }
    }

    /// Opens and closes of this node no longer matter (its device left the
    /// model; a deleted node's mark went with it).
    pub fn unwatch_node(&self, node: &Path) {
        let Some(f) = &self.fanotify else { return };
        let mask = MaskFlags::FAN_OPEN | MaskFlags::FAN_CLOSE_WRITE | MaskFlags::FAN_CLOSE_NOWRITE;
        let _ = f.mark(
            MarkFlags::FAN_MARK_REMOVE,
            mask,
            nix::fcntl::AT_FDCWD,
            Some(node),
        );
    }

    /// What to poll: fanotify, and every holder's pidfd (with its pid).
    pub fn poll_fds(&self) -> (Option<BorrowedFd<'_>>, Vec<(u32, BorrowedFd<'_>)>) {
        (
            self.fanotify.as_ref().map(AsFd::as_fd),
            self.pidfds.iter().map(|(&p, fd)| (p, fd.as_fd())).collect(),
        )
    }

    /// The known holders of `dev`.
    pub fn holders(&self, dev: DevNum) -> impl Iterator<Item = (u32, &ProcInfo)> {
        self.holders
            .get(&dev)
            .into_iter()
            .flat_map(|h| h.iter().map(|(p, i)| (*p, i)))
    }

    /// Scans every process for the devices in `devs`: their holders are
    /// exactly what it finds. Returns the devices whose holders changed.
    pub fn full_scan(&mut self, devs: &HashSet<DevNum>) -> Vec<DevNum> {
        if devs.is_empty() {
            return Vec::new();
        }
        let mut found: HashMap<DevNum, BTreeMap<u32, ProcInfo>> = HashMap::new();
        for pid in all_pids(self.own) {
            for dev in open_by(pid, devs) {
                if let Some(info) = info(pid) {
                    found.entry(dev).or_default().insert(pid, info);
                }
            }
        }
        let mut changed = Vec::new();
        for &dev in devs {
            let now = found.remove(&dev).unwrap_or_default();
            if self
                .holders
                .get(&dev)
                .map_or(!now.is_empty(), |old| *old != now)
            {
                changed.push(dev);
            }
            self.set(dev, now);
        }
        self.forget_pidfds();
        changed
    }

    /// A device left the model.
    pub fn forget(&mut self, dev: DevNum) {
        self.holders.remove(&dev);
        self.recheck.remove(&dev);
        self.forget_pidfds();
    }

    fn set(&mut self, dev: DevNum, holders: BTreeMap<u32, ProcInfo>) {
        for &pid in holders.keys() {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.pidfds.entry(pid) {
                let raw = rustix::process::Pid::from_raw(pid as i32);
                if let Some(fd) = raw.and_then(|p| {
                    rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
                }) {
                    slot.insert(fd);
                }
            }
        }
        if holders.is_empty() {
            self.holders.remove(&dev);
            self.recheck.remove(&dev);
        } else {
            if self.fanotify.is_none() {
                self.recheck
                    .entry(dev)
                    .or_insert((Instant::now() + FIRST_RECHECK, FIRST_RECHECK));
            }
            self.holders.insert(dev, holders);
        }
    }

    /// Drops the pidfds of processes that hold nothing any more.
    fn forget_pidfds(&mut self) {
        let holding: HashSet<u32> = self
            .holders
            .values()
            .flat_map(|h| h.keys().copied())
            .collect();
        self.pidfds.retain(|pid, _| holding.contains(pid));
    }

    /// Re-checks the known holders of `devs`: those that no longer have
    /// the device open go; a device left without any is scanned in full.
    fn recheck_holders(&mut self, devs: Vec<DevNum>) -> Vec<DevNum> {
        let mut changed = Vec::new();
        let mut emptied = HashSet::new();
        for dev in devs {
            let Some(known) = self.holders.get(&dev).cloned() else {
                continue;
            };
            let wanted = HashSet::from([dev]);
            let still: BTreeMap<u32, ProcInfo> = known
                .iter()
                .filter(|(pid, _)| open_by(**pid, &wanted).contains(&dev))
                .map(|(p, i)| (*p, i.clone()))
                .collect();
            if still.is_empty() {
                emptied.insert(dev);
            } else if still != known {
                changed.push(dev);
                self.set(dev, still);
            }
        }
        changed.extend(self.full_scan(&emptied));
        self.forget_pidfds();
        changed
    }

    /// fanotify said something happened: opens are looked up in the
    /// opener's fds, closes and exits re-check the devices it held.
    /// `tracked` is every device followed. Returns the devices whose
    /// holders changed.
    pub fn on_events(&mut self, tracked: &HashSet<DevNum>) -> Vec<DevNum> {
        let Some(f) = &self.fanotify else {
            return Vec::new();
        };
        let mut opened = BTreeSet::new();
        let mut closed = false;
        let mut overflow = false;
        loop {
            match f.read_events() {
                Ok(events) if events.is_empty() => break,
                Ok(events) => {
                    for event in events {
                        let mask = event.mask();
                        if mask.contains(MaskFlags::FAN_Q_OVERFLOW) {
                            overflow = true;
                        }
                        let Ok(pid) = u32::try_from(event.pid()) else {
                            continue;
                        };
                        if pid == self.own {
                            continue; // our own claim, during a real action
                        }
                        if mask.contains(MaskFlags::FAN_OPEN) {
                            opened.insert(pid);
                        }
                        // A close is reported by whoever dropped the last
                        // copy of the open file, which may be a process that
                        // got it from a known holder (a fork, a passed fd).
                        if mask
                            .intersects(MaskFlags::FAN_CLOSE_WRITE | MaskFlags::FAN_CLOSE_NOWRITE)
                        {
                            closed = true;
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
        for pid in opened {
            for dev in open_by(pid, tracked) {
                let Some(info) = info(pid) else { continue };
                let mut holders = self.holders.get(&dev).cloned().unwrap_or_default();
                if holders.insert(pid, info.clone()) != Some(info) {
                    changed.push(dev);
                    self.set(dev, holders);
                }
            }
        }
        if closed {
            let devs: Vec<DevNum> = self.holders.keys().copied().collect();
            changed.extend(self.recheck_holders(devs));
        }
        changed
    }

    /// A known holder forked: the child shares its open files.
    pub fn forked(&mut self, parent: u32, child: u32) -> Vec<DevNum> {
        let held: HashSet<DevNum> = self
            .holders
            .iter()
            .filter(|(_, h)| h.contains_key(&parent))
            .map(|(d, _)| *d)
            .collect();
        if held.is_empty() {
            return Vec::new();
        }
        let mut changed = Vec::new();
        for dev in open_by(child, &held) {
            let Some(info) = info(child) else { continue };
            let mut holders = self.holders.get(&dev).cloned().unwrap_or_default();
            holders.insert(child, info);
            changed.push(dev);
            self.set(dev, holders);
        }
        changed
    }

    fn devices_held_by(&self, pids: &BTreeSet<u32>) -> Vec<DevNum> {
        self.holders
            .iter()
            .filter(|(_, h)| h.keys().any(|p| pids.contains(p)))
            .map(|(d, _)| *d)
            .collect()
    }

    /// A process started a program: if it holds a device, its name changed.
    pub fn exec(&mut self, pid: u32) -> Vec<DevNum> {
        let Some(now) = info(pid) else {
            return Vec::new();
        };
        let mut changed = Vec::new();
        for (dev, holders) in &mut self.holders {
            if let Some(known) = holders.get_mut(&pid) {
                if *known != now {
                    *known = now.clone();
                    changed.push(*dev);
                }
            }
        }
        changed
    }

    /// A holder exited (its pidfd is readable).
    pub fn exited(&mut self, pid: u32) -> Vec<DevNum> {
        self.pidfds.remove(&pid);
        let devs = self.devices_held_by(&BTreeSet::from([pid]));
        self.recheck_holders(devs)
    }

    /// When the next backoff re-check is due (only without fanotify).
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
        self.recheck_holders(due)
    }
}

/// `FAN_REPORT_FID`: events name the file by its handle and carry no open
/// descriptor, so reading an event never opens the device node.
fn libc_report_fid() -> u32 {
    0x0000_0200
}

#[cfg(test)]
mod tests {
    use super::split_rdev;

    #[test]
    fn device_numbers_split_as_the_kernel_encodes_them() {
        // makedev(7, 5), makedev(259, 1), makedev(8, 300)
        assert_eq!(split_rdev(0x0705), (7, 5));
        assert_eq!(split_rdev((259 << 8) | 1), (259, 1));
        assert_eq!(
            split_rdev((8 << 8) | (300 & 0xff) | ((300 & !0xff) << 12)),
            (8, 300)
        );
    }
}
