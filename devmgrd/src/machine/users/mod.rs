//! The kernel's own users of the machine's block devices (DESIGN.md §2
//! rule 17): mounts in every mount namespace, swap, stacked devices and
//! processes with a device node open, found and followed live by a watcher
//! thread, and reported to the model's owner as each device's current set
//! of users, which the owner turns into kernel-user references.
//!
//! How each kind is found and how devmgrd is told it changed (no timer
//! rescans anything; docs/kernel-users.md has the whole story):
//! - mounts: `/proc/PID/mountinfo` of one process per mount namespace,
//!   polled for POLLPRI; namespaces are discovered at start and from the
//!   process connector's exec events (a new namespace runs a program), and
//!   dropped when their last process exits (a pidfd per namespace), so the
//!   watcher never keeps a namespace — and its mounts — alive;
//! - swap: `/proc/swaps`, polled for POLLPRI;
//! - stacked devices: sysfs `holders/` and `slaves/`, and loop devices'
//!   `loop/backing_file`, re-read on the uevents of the block device that
//!   changed;
//! - processes: `/proc/PID/fd`, re-read when fanotify reports an open or a
//!   close of a device node (no fd is opened for the event) or when a known
//!   holder exits (its pidfd); a full scan confirms that a device's last
//!   holder is gone (a fork may share its open file).
//!
//! The watcher opens no device node (only the brief exclusive claim of a
//! real action does, `machine/claim.rs`).

mod cnproc;
pub mod detach;
mod mountinfo;
mod namespaces;
mod processes;
pub mod registry;
mod stacked;
mod swaps;
mod watcher;

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use drivers::{KernelUse, KernelUser, ObjectId};

pub use mountinfo::DevNum;
pub use processes::block_device;
pub use registry::Registry;
pub use watcher::{spawn, Command, Handle, Then, Update};

/// A file's text from its start, read lossily: /proc holds whatever bytes
/// users chose (mount points, FUSE sources, process names), and no such
/// name may make a file unreadable to the watcher.
fn reread_lossy(file: &mut File) -> std::io::Result<String> {
    file.rewind()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A file's text, read lossily (`reread_lossy`).
fn read_lossy(path: impl AsRef<Path>) -> std::io::Result<String> {
    reread_lossy(&mut File::open(path)?)
}

/// A path that /proc or sysfs gives (a mount's source, a swap area, a
/// loop device's backing file) as a device node to look at: under `/dev/`
/// and nowhere else. Such a path is whatever its mounter wrote, and looking
/// up `/dev/../home/u/fuse/x` would go through a user's FUSE mount, whose
/// lookups can block the watcher for good.
fn device_node(path: &str) -> Option<&Path> {
    let node = Path::new(path);
    let plain = node.components().all(|c| {
        matches!(
            c,
            std::path::Component::RootDir | std::path::Component::Normal(_)
        )
    });
    (path.starts_with("/dev/") && plain).then_some(node)
}

/// A block device of the model that the watcher follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Its object.
    pub id: ObjectId,
    /// Its device number.
    pub dev: DevNum,
    /// Its kernel name (`loop5`, `sda1`).
    pub name: String,
    /// Its device node (`/dev/loop5`).
    pub node: PathBuf,
}

impl Device {
    /// The device an object describes, if it is a block device with a
    /// device number (from its `udev.MAJOR`, `udev.MINOR`, `udev.DEVNAME`).
    pub fn of(info: &drivers::ObjectInfo) -> Option<Device> {
        if info.origin != drivers::Origin::Udev || info.subsystem != "block" {
            return None;
        }
        let number = |key: &str| info.attributes.get(key)?.parse::<u32>().ok();
        let dev = (number("udev.MAJOR")?, number("udev.MINOR")?);
        let devname = info
            .attributes
            .get("udev.DEVNAME")
            .map_or(info.name.as_ref(), String::as_str);
        // The kernel's DEVNAME is relative to /dev; udev's is absolute.
        let node = if devname.starts_with('/') {
            PathBuf::from(devname)
        } else {
            PathBuf::from("/dev").join(devname)
        };
        Some(Device {
            id: info.id,
            dev,
            name: info.name.to_string(),
            node,
        })
    }
}

/// A block device node of an object, for a real action's claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The object.
    pub id: ObjectId,
    /// Its device node.
    pub node: PathBuf,
    /// Its device number: a node that is another device is not claimed.
    pub dev: DevNum,
    /// A whole disk (what is claimed), not a partition.
    pub whole_disk: bool,
}

/// The block devices of `id` and of everything below it, whole disks
/// first: what a real removal of `id` claims (the disks; a claim of a disk
/// covers its partitions) and what a busy claim has looked at again.
pub fn nodes_under(model: &drivers::Model, id: ObjectId) -> Vec<Node> {
    let mut nodes = Vec::new();
    let mut stack = vec![id];
    while let Some(next) = stack.pop() {
        let Ok(info) = model.get(next) else { continue };
        if let Some(device) = Device::of(&info) {
            let whole_disk =
                info.attributes.get("udev.devtype").map(String::as_str) == Some("disk");
            nodes.push(Node {
                id: next,
                node: device.node,
                dev: device.dev,
                whole_disk,
            });
        }
        stack.extend(model.children(next).unwrap_or_default());
    }
    nodes.sort_by_key(|n| !n.whole_disk);
    nodes
}

/// What identifies one user over time (its reference stays while its key
/// does, whatever its description says meanwhile).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UserKey {
    /// A mount: its namespace (nsfs inode) and its mount id there.
    Mount { ns: u64, mount: u64 },
    /// Swap on the device, by the path `/proc/swaps` shows.
    Swap { path: String },
    /// A device stacked on it, by its kernel name.
    Stacked { holder: String },
    /// A process with its node open, while it runs the same program (one
    /// that execs another — a shell's child becoming `sleep` — is a new
    /// user, so that the reason names the program it runs now).
    Process { pid: u32, program: String },
    /// A process with files (or its working directory) on a lazily
    /// detached filesystem of the device.
    Files { pid: u32, program: String },
}

/// How to take a user away (`detach-mounts`, rule 18).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detail {
    /// Lazily detach the mount at `mount_point` in mount namespace `ns`,
    /// entered through `pid` (0: devmgrd's own), if `pid` is still in it.
    Mount {
        pid: u32,
        ns: u64,
        mount_point: String,
    },
    /// Turn off the swap at `path`.
    Swap { path: String },
    /// Not something devmgrd takes away.
    Other,
}

/// One user of a device, as the watcher found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// What identifies it.
    pub key: UserKey,
    /// What the model records (kind, uid, pid, reason).
    pub user: KernelUser,
    /// How `detach-mounts` would take it away.
    pub detail: Detail,
}

impl Found {
    fn new(
        key: UserKey,
        kind: KernelUse,
        uid: u32,
        pid: u32,
        reason: String,
        detail: Detail,
    ) -> Found {
        Found {
            key,
            user: KernelUser {
                kind,
                uid,
                pid,
                reason,
            },
            detail,
        }
    }
}

/// A device's users now, as the watcher reports them to the owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The device's object.
    pub id: ObjectId,
    /// Every user it has now.
    pub users: Vec<Found>,
}

#[cfg(test)]
mod tests {
    use super::device_node;

    #[test]
    fn only_plain_paths_under_dev_are_looked_at() {
        assert!(device_node("/dev/loop5").is_some());
        assert!(device_node("/dev/mapper/vg0-data").is_some());
        for elsewhere in ["/dev/../home/u/fuse/x", "/home/u/x", "dev/sda", "none"] {
            assert!(device_node(elsewhere).is_none(), "{elsewhere}");
        }
    }
}
