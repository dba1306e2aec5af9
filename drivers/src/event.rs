//! What the engine tells the outside world: events (what happened, in causal
//! order) and effects (work on real hardware the caller must carry out).

use std::sync::Arc;

use proto::{Kind, State};

use crate::ids::{ObjectId, RefId};
use crate::model::ObjectInfo;

/// Something that happened to the model. Every visible transition produces
/// exactly one event; within one operation, removals are reported children
/// before parents and additions parents before children.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A new object exists (its full description at creation).
    Added(Box<ObjectInfo>),
    /// An object's visible state changed.
    StateChanged {
        /// The object.
        id: ObjectId,
        /// Its state before.
        from: State,
        /// Its state now.
        to: State,
    },
    /// An object was bound to a driver.
    Bound {
        /// The host or device.
        id: ObjectId,
        /// The driver.
        driver: ObjectId,
    },
    /// An object was unbound from a driver.
    Unbound {
        /// The host or device.
        id: ObjectId,
        /// The driver it was bound to.
        driver: ObjectId,
    },
    /// A reference was taken.
    Acquired {
        /// The object referenced.
        id: ObjectId,
        /// The new reference.
        reference: RefId,
        /// The object's reference count after the change.
        ref_count: u32,
    },
    /// A reference was dropped by its holder.
    Released {
        /// The object that was referenced.
        id: ObjectId,
        /// The reference.
        reference: RefId,
        /// The object's reference count after the change.
        ref_count: u32,
    },
    /// A reference was taken away by force (its holder must be told).
    Revoked {
        /// The object that was referenced.
        id: ObjectId,
        /// The reference.
        reference: RefId,
        /// The object's reference count after the change.
        ref_count: u32,
    },
    /// A removal is waiting on these references: their holders should let go.
    ReleaseRequested {
        /// The object whose holders are asked.
        id: ObjectId,
        /// The object whose removal is waiting (the request's root).
        waiting_for: ObjectId,
        /// The references being waited on.
        references: Vec<RefId>,
    },
    /// The outcome of the last driver action on an object changed.
    ErrorChanged {
        /// The object.
        id: ObjectId,
        /// The error text; empty when the last action succeeded.
        error: Arc<str>,
    },
    /// The kernel changed what it says of a real device (a `change` uevent).
    AttributesChanged {
        /// The object.
        id: ObjectId,
        /// All its attributes now.
        attributes: std::collections::BTreeMap<String, String>,
    },
    /// The kernel renamed a real device (a `move` uevent).
    Renamed {
        /// The object.
        id: ObjectId,
        /// Its new name.
        name: Arc<str>,
        /// Its new sysfs path.
        sys_path: String,
    },
    /// An object left the model for good.
    Removed {
        /// Its id (never to be used again).
        id: ObjectId,
        /// Its kind.
        kind: Kind,
        /// Its name.
        name: Arc<str>,
        /// Whether it had been visibly pending (removing or gone) before.
        was_pending: bool,
    },
}

impl Event {
    /// The object this event is about.
    pub fn object(&self) -> ObjectId {
        match self {
            Event::Added(info) => info.id,
            Event::StateChanged { id, .. }
            | Event::Bound { id, .. }
            | Event::Unbound { id, .. }
            | Event::Acquired { id, .. }
            | Event::Released { id, .. }
            | Event::Revoked { id, .. }
            | Event::ReleaseRequested { id, .. }
            | Event::ErrorChanged { id, .. }
            | Event::AttributesChanged { id, .. }
            | Event::Renamed { id, .. }
            | Event::Removed { id, .. } => *id,
        }
    }
}

/// Work on real hardware that the caller carries out off the model's path.
/// An exit's completion comes back as [`crate::Model::exit_finished`] (or,
/// for a kernel device, as the kernel's own `remove` event, or
/// [`crate::Model::exit_busy`] when the device turned out to be claimed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Ask a driver to let go of (remove) the real thing behind an object.
    Exit {
        /// The object waiting on it (it stays `removing` meanwhile).
        id: ObjectId,
        /// Name of the driver implementation that must act.
        driver: &'static str,
        /// What to do, in the driver's own terms.
        action: crate::driver::ExitAction,
    },
    /// Take away the kernel's users of a real device that can be taken
    /// away: lazily detach its mounts, turn its swap off (the `detach-mounts`
    /// option, rule 18). Their ends come back as the kernel reports them.
    Detach {
        /// The device.
        id: ObjectId,
        /// Its kernel users to detach (mounts and swap).
        references: Vec<RefId>,
    },
}
