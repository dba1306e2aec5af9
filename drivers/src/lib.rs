//! The devmgr device model and lifecycle engine, and its driver implementations.
//!
//! [`Model`] keeps drivers and host → device trees, the references clients
//! hold on them, and the lifecycle rules of `shared/DESIGN.md` §2. It is pure
//! and synchronous: operations take "now" as an argument, never block, never
//! do I/O, and report what happened as [`Event`]s and what real hardware must
//! do as [`Effect`]s. The daemon owns one `Model` and feeds it commands.

mod attributes;
mod driver;
mod error;
mod event;
mod ids;
pub mod kernel;
mod kernel_users;
mod lifecycle;
pub mod listing;
mod model;
pub mod sim_scsi;
pub mod uevent;
pub mod validate;

pub use attributes::Attributes;
pub use driver::{Driver, Exit, ExitAction, NewChild, ObjectView, ProbeOptions, Registry};
pub use error::{Error, ErrorKind, Result};
pub use event::{Effect, Event};
pub use ids::{Micros, ObjectId, RefId, RequestId};
pub use kernel_users::{KernelUse, KernelUser, KERNEL_HOLDER_KEY};
pub use lifecycle::{AddRequest, ExitResult, PendingObject, RemoveOptions, RemoveReport};
pub use model::{Holder, Model, ObjectInfo, ReferenceInfo};
pub use proto::{Kind, OnTimeout, Origin, RemoveOutcome, State};
