//! The kernel's own users of real devices, as holders (DESIGN.md §2 rules
//! 17–19): a filesystem mounted from a device, swap on it, a device stacked
//! on it, a process with its node open. The daemon's watcher finds them;
//! here they become references of their own — counted in `RefCount`, named
//! in `Holders`, keeping the object from being idle — that `force` never
//! revokes (rule 18): only the kernel can end them, when the user goes.
//!
//! Also here: what happens when a real action finds the device busy after
//! all (rule 19: devmgrd claims a device exclusively before it acts, and a
//! user that raced in makes the claim fail): the action is abandoned and
//! the removal waits again, or fails if nobody can be named.

use std::sync::Arc;

use proto::Origin;

use crate::error::{Error, Result};
use crate::ids::{Micros, ObjectId, RefId};
use crate::model::{Holder, Model};
use crate::validate;

/// What kind of user the kernel says a real device has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelUse {
    /// A filesystem mounted from it, in any mount namespace.
    Mount,
    /// Swap on it.
    Swap,
    /// Another block device stacked on it (sysfs `holders/`: dm, md,
    /// bcache; or a loop device backed by it).
    Stacked,
    /// A process with its device node open.
    Process,
}

impl KernelUse {
    /// Every kind, in a stable order.
    pub const ALL: [KernelUse; 4] = [
        KernelUse::Mount,
        KernelUse::Swap,
        KernelUse::Stacked,
        KernelUse::Process,
    ];

    /// The holder's name in `Holders` (DESIGN.md §3), e.g. `kernel:mount`.
    pub fn holder_name(self) -> &'static str {
        match self {
            KernelUse::Mount => proto::kernel_holders::MOUNT,
            KernelUse::Swap => proto::kernel_holders::SWAP,
            KernelUse::Stacked => proto::kernel_holders::STACKED,
            KernelUse::Process => proto::kernel_holders::PROCESS,
        }
    }

    /// Whether the `detach-mounts` option takes it away (rule 18: mounts
    /// are lazily detached, swap turned off; processes are never killed,
    /// stacked devices never torn down).
    pub fn detachable(self) -> bool {
        matches!(self, KernelUse::Mount | KernelUse::Swap)
    }
}

/// One user of a real device, as the daemon's watcher names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelUser {
    /// What kind of user.
    pub kind: KernelUse,
    /// The uid of the process behind it (0 where there is none).
    pub uid: u32,
    /// The pid of the process behind it (0 where there is none).
    pub pid: u32,
    /// What it is, for people: `mounted at /srv (ext4)`, `swap`,
    /// `held by dm-0`, `open by sleep (pid 4242)`.
    pub reason: String,
}

/// The holder key of every kernel user. Clients' keys count up from 1, so
/// no client shares it; the per-client reference quota never counts it.
pub const KERNEL_HOLDER_KEY: u64 = u64::MAX;

impl Model {
    /// Rule 17: the kernel says `id` has a new user. It is a reference like
    /// any other — it keeps the object from being idle and shows in its
    /// holders — except that no state refuses it (the kernel did not ask)
    /// and `force` never revokes it. Only real devices have kernel users.
    pub fn kernel_use_began(
        &mut self,
        id: ObjectId,
        user: KernelUser,
        now: Micros,
    ) -> Result<RefId> {
        let key = self.key(id)?;
        let o = self.obj(key);
        if o.origin != Origin::Udev || o.scanned {
            return Err(Error::invalid_argument(format!(
                "{} is not a real device: only the kernel's devices have kernel users",
                self.describe(key)
            )));
        }
        validate::reason(&user.reason)?;
        self.require_reference_room()?;
        let holder = Arc::new(Holder {
            key: KERNEL_HOLDER_KEY,
            bus_name: user.kind.holder_name().to_owned(),
            uid: user.uid,
            pid: user.pid,
        });
        let reference =
            self.insert_reference(key, holder, Arc::from(user.reason), now, Some(user.kind));
        // A partition that was to go with its disk has a user of its own
        // now: it waits for it, and so its disk waits too.
        self.busy_again(key);
        self.settle_deferred();
        Ok(reference)
    }

    /// The kernel says a user of a real device went (an unmount, a
    /// swapoff, the stacked device removed, the process closed the node or
    /// exited). A removal waiting on it completes now if the object became
    /// idle, exactly as when a client releases a reference.
    pub fn kernel_use_ended(&mut self, reference: RefId) -> Result<()> {
        let rkey = self.ref_key(reference)?;
        if self.refs[rkey as usize].kernel.is_none() {
            return Err(Error::invalid_argument(format!(
                "reference {reference} is a client's, not a kernel user"
            )));
        }
        self.drop_reference(rkey);
        Ok(())
    }

    /// Rule 19: the driver action of `id` found the device claimed when it
    /// tried to take it exclusively (a user raced in after the removal saw
    /// it idle). The caller has recorded the users it found first: if there
    /// are any, the action is abandoned and the removal waits for them
    /// again; if nobody can be named, the removal fails with `why` (the
    /// object is `stopped`, showing it).
    pub fn exit_busy(&mut self, id: ObjectId, why: String) -> Result<()> {
        let key = self.key(id)?;
        let o = self.obj(key);
        if !o.exiting || o.riding() {
            return Err(Error::invalid_state(format!(
                "{} has no driver action in flight",
                self.describe(key)
            )));
        }
        if o.is_idle() {
            self.fail_exit(key, why);
        } else {
            // Still `removing`: it completes when the users it has now go.
            // A driver removal holding it back may let it go now.
            self.obj_mut(key).exiting = false;
            self.requalify_removal(key);
            if self.obj(key).unbind_hold.is_some() {
                self.deferred.push((key, id));
            }
        }
        self.settle_deferred();
        Ok(())
    }
}
