//! Rule 19: a real action never races a new user. Before devmgrd removes a
//! real device (LOOP_CLR_FD, a SCSI `delete`, a driver `unbind`), it opens
//! the device's whole-disk nodes with `O_EXCL`, the kernel's exclusive
//! claim, and holds them across the action: a mount (or swapon, or a dm
//! table) attempted meanwhile fails with EBUSY instead of losing its disk,
//! and a user that got in between the model's "idle" and the claim makes
//! the claim fail, so the action is abandoned. A claim of a whole disk
//! also covers its partitions (the kernel refuses to claim one of them, and
//! refuses this claim while one is claimed). A plain open is not a claim:
//! a process opening the node meanwhile is seen by the watcher, not stopped.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::machine::users::DevNum;

/// Exclusive claims, held until dropped.
pub struct Claim {
    held: Vec<File>,
}

/// Why a claim was not taken.
pub enum Refused {
    /// Another user claims the device (mounted, swap, stacked, another
    /// exclusive opener): the action must not run.
    Busy(String),
    /// It could not be opened at all.
    Failed(String),
}

/// How long a claim is retried while the device is busy: a lazily detached
/// filesystem or a namespace torn down lets go of its disk a moment after
/// its mount is gone from mountinfo.
const PATIENCE: Duration = Duration::from_millis(1_000);

fn open_exclusive(node: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_EXCL.bits() | nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(node)
}

/// Claims every node, each the device it is given with (blocking; run it
/// off the async threads). A node that does not exist, or is not that
/// block device (a stale or replayed name: another device's node), has
/// nothing of this device to claim, and is left alone.
pub fn take(nodes: &[(PathBuf, DevNum)]) -> Result<Claim, Refused> {
    let mut held = Vec::new();
    for (node, dev) in nodes {
        if crate::machine::users::block_device(node) != Some(*dev) {
            tracing::debug!(
                "{}: no node of block device {}:{} to claim",
                node.display(),
                dev.0,
                dev.1
            );
            continue;
        }
        let mut waited = Duration::ZERO;
        let mut pause = Duration::from_millis(5);
        loop {
            match open_exclusive(node) {
                Ok(file) => {
                    held.push(file);
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if waited >= PATIENCE {
                        return Err(Refused::Busy(format!(
                            "{} is in use (the kernel refuses an exclusive claim: {e})",
                            node.display()
                        )));
                    }
                    std::thread::sleep(pause);
                    waited += pause;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(e) => {
                    return Err(Refused::Failed(format!(
                        "cannot claim {} exclusively: {e}",
                        node.display()
                    )))
                }
            }
        }
    }
    Ok(Claim { held })
}

impl Claim {
    /// The first claimed node's file (for an ioctl on the device itself).
    pub fn first(&self) -> Option<&File> {
        self.held.first()
    }
}
