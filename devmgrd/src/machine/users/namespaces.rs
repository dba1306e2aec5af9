//! Every mount namespace's mounts: one `/proc/PID/mountinfo` open per
//! namespace (polled for POLLPRI: the kernel says that its mounts changed,
//! not which), read through a process in it — its representative — and a
//! pidfd on that process. When the representative exits, another process
//! of the namespace takes over; when none is left, the mountinfo is closed
//! at once: an open mountinfo keeps its namespace, and so its mounts and
//! their disks, alive (the trap of docs/kernel-users.md), and the watcher
//! must never be what keeps a disk busy.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::mountinfo::{self, DevNum, Mount};
use super::processes;

/// The mount namespace (nsfs inode) of a process.
pub fn ns_of(pid: u32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?;
    let text = link.to_str()?;
    text.strip_prefix("mnt:[")?.strip_suffix(']')?.parse().ok()
}

/// Every process by mount namespace (the lowest pid first).
fn walk() -> HashMap<u64, Vec<u32>> {
    let mut by_ns: HashMap<u64, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ns) = ns_of(pid) {
                by_ns.entry(ns).or_default().push(pid);
            }
        }
    }
    for pids in by_ns.values_mut() {
        pids.sort_unstable();
    }
    by_ns
}

/// One mount namespace being followed.
pub struct Namespace {
    /// The process it is read through (devmgrd itself for its own).
    pub rep: u32,
    /// The representative's name and uid, to name the namespace by.
    pub comm: String,
    pub uid: u32,
    mountinfo: File,
    pidfd: Option<OwnedFd>,
    /// Its mounts as last read, with the block device each is on.
    pub mounts: Vec<(Mount, DevNum)>,
    /// Devices of anonymous-numbered filesystems (btrfs), by mount.
    resolved: HashMap<(u64, String), Option<DevNum>>,
}

impl Namespace {
    /// Reads the mounts again; returns the devices whose mounts changed.
    fn reread(&mut self) -> HashSet<DevNum> {
        // (Lossily: a mount point or source can be any bytes, and one
        // user's FUSE mount must not make a namespace unreadable.)
        let text = match super::reread_lossy(&mut self.mountinfo) {
            Ok(text) => text,
            Err(e) => {
                tracing::debug!("reading the mounts of pid {}: {e}", self.rep);
                return HashSet::new();
            }
        };
        let mut resolved = HashMap::new();
        let mounts: Vec<(Mount, DevNum)> = mountinfo::parse_block(&text)
            .into_iter()
            .map(|m| {
                let dev = if m.dev.0 != 0 {
                    m.dev
                } else {
                    // btrfs and the like number their filesystems anonymously:
                    // the device is what was mounted, if it is a device.
                    let key = (m.id, m.source.clone());
                    let found = self.resolved.get(&key).copied().unwrap_or_else(|| {
                        super::device_node(&m.source).and_then(processes::block_device)
                    });
                    resolved.insert(key, found);
                    found.unwrap_or(m.dev)
                };
                (m, dev)
            })
            .collect();
        self.resolved = resolved;
        let before: HashSet<(u64, DevNum, &str)> = self
            .mounts
            .iter()
            .map(|(m, d)| (m.id, *d, m.mount_point.as_str()))
            .collect();
        let after: HashSet<(u64, DevNum, &str)> = mounts
            .iter()
            .map(|(m, d)| (m.id, *d, m.mount_point.as_str()))
            .collect();
        let changed = before
            .symmetric_difference(&after)
            .map(|(_, d, _)| *d)
            .collect();
        self.mounts = mounts;
        changed
    }
}

/// Every mount namespace of the machine that devmgrd can see.
pub struct Namespaces {
    own_pid: u32,
    /// devmgrd's own namespace.
    pub own: u64,
    /// The machine's (PID 1's): a mount elsewhere that only copies one of
    /// its mounts (a slave of its peer group) is that mount, not another.
    pub primary: u64,
    pub list: HashMap<u64, Namespace>,
}

impl Namespaces {
    /// Finds every namespace that exists now.
    pub fn start(own_pid: u32) -> Namespaces {
        let own = ns_of(own_pid).unwrap_or(0);
        let mut namespaces = Namespaces {
            own_pid,
            own,
            primary: ns_of(1).unwrap_or(own),
            list: HashMap::new(),
        };
        namespaces.discover_all();
        namespaces
    }

    /// Walks every process for namespaces not followed yet (at start, and
    /// before a claim's failure is explained). Returns the devices whose
    /// mounts that changed.
    pub fn discover_all(&mut self) -> HashSet<DevNum> {
        let mut changed = HashSet::new();
        for (ns, pids) in walk() {
            if self.list.contains_key(&ns) {
                continue;
            }
            for pid in pids {
                if let Some(c) = self.follow(ns, pid) {
                    changed.extend(c);
                    break;
                }
            }
        }
        changed
    }

    /// A program started (the process connector's exec event): if it runs
    /// in a namespace not followed yet, follow it. A representative that
    /// left its namespace first (`unshare -m CMD` unshares, then execs)
    /// stands for it no more.
    pub fn exec(&mut self, pid: u32) -> HashSet<DevNum> {
        let mut changed = self.representatives_moved(Some(pid));
        // A representative that runs another program (a shell that execs
        // the container's process): its namespace is named by that one.
        if let Some(n) = self.list.values_mut().find(|n| n.rep == pid) {
            if let Some(info) = processes::info(pid) {
                if (n.comm.as_str(), n.uid) != (info.comm.as_str(), info.uid) {
                    (n.comm, n.uid) = (info.comm, info.uid);
                    changed.extend(n.mounts.iter().map(|(_, d)| *d));
                }
            }
        }
        changed.extend(match ns_of(pid) {
            Some(ns) if !self.list.contains_key(&ns) => self.follow(ns, pid).unwrap_or_default(),
            _ => HashSet::new(),
        });
        changed
    }

    /// Namespaces whose representative (`pid`'s, or any) is in another
    /// namespace now (unshare, setns): another process takes over, or the
    /// namespace is let go of, as when it exits.
    pub fn representatives_moved(&mut self, pid: Option<u32>) -> HashSet<DevNum> {
        let moved: Vec<u64> = self
            .list
            .iter()
            .filter(|(_, n)| n.rep != self.own_pid && pid.is_none_or(|p| p == n.rep))
            .filter(|(ns, n)| ns_of(n.rep) != Some(**ns))
            .map(|(ns, _)| *ns)
            .collect();
        moved
            .into_iter()
            .flat_map(|ns| self.representative_exited(ns))
            .collect()
    }

    /// Follows namespace `ns` through `pid`, if `pid` is (still) in it.
    fn follow(&mut self, ns: u64, pid: u32) -> Option<HashSet<DevNum>> {
        let mine = pid == self.own_pid;
        let pidfd = if mine {
            None
        } else {
            Some(processes::pidfd(pid)?)
        };
        let mountinfo = File::open(format!("/proc/{pid}/mountinfo")).ok()?;
        // The pid may have exited and been reused in between: it is the
        // same process only if it is still in the same namespace.
        if ns_of(pid) != Some(ns) {
            return None;
        }
        let info = processes::info(pid)?;
        let mut namespace = Namespace {
            rep: pid,
            comm: info.comm,
            uid: info.uid,
            mountinfo,
            pidfd,
            mounts: Vec::new(),
            resolved: HashMap::new(),
        };
        let changed = namespace.reread();
        if ns != self.own {
            tracing::debug!(
                "following mount namespace {ns} through {} (pid {pid})",
                namespace.comm
            );
        }
        self.list.insert(ns, namespace);
        Some(changed)
    }

    /// The namespace's mounts changed (POLLPRI).
    pub fn reread(&mut self, ns: u64) -> HashSet<DevNum> {
        self.list
            .get_mut(&ns)
            .map(Namespace::reread)
            .unwrap_or_default()
    }

    /// Reads every namespace again (before a claim's failure is explained).
    pub fn reread_all(&mut self) -> HashSet<DevNum> {
        self.list.values_mut().flat_map(Namespace::reread).collect()
    }

    /// The representative of `ns` exited: another process of it takes over,
    /// or, if none is left, the namespace is let go of (its mountinfo
    /// closed, so the kernel can free it) and its mounts count no more.
    pub fn representative_exited(&mut self, ns: u64) -> HashSet<DevNum> {
        let Some(old) = self.list.remove(&ns) else {
            return HashSet::new();
        };
        let gone: HashSet<DevNum> = old.mounts.iter().map(|(_, d)| *d).collect();
        drop(old); // closes the mountinfo before anything else runs
        let others = walk().remove(&ns).unwrap_or_default();
        for pid in others {
            if let Some(mut changed) = self.follow(ns, pid) {
                // Its mounts may have changed meanwhile; compare with before.
                if let Some(followed) = self.list.get(&ns) {
                    let now: HashSet<DevNum> = followed.mounts.iter().map(|(_, d)| *d).collect();
                    changed.extend(gone.symmetric_difference(&now));
                }
                return changed;
            }
        }
        tracing::debug!("mount namespace {ns} has no process left: let go of");
        gone
    }

    /// What to poll: each namespace's mountinfo and its representative's pidfd.
    pub fn poll_fds(&self) -> Vec<(u64, BorrowedFd<'_>, Option<BorrowedFd<'_>>)> {
        self.list
            .iter()
            .map(|(ns, n)| (*ns, n.mountinfo.as_fd(), n.pidfd.as_ref().map(AsFd::as_fd)))
            .collect()
    }

    /// The peer groups the machine's namespace shares for `dev`.
    pub fn primary_groups(&self, dev: DevNum) -> HashSet<u64> {
        self.list.get(&self.primary).map_or_else(HashSet::new, |n| {
            n.mounts
                .iter()
                .filter(|(_, d)| *d == dev)
                .filter_map(|(m, _)| m.shared)
                .collect()
        })
    }
}
