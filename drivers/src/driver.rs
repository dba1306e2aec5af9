//! The driver interface: how a driver implementation probes an object bound to
//! it (creating the devices it finds) and how it lets go of an object being
//! removed. "Exit may fail": an exit is done at once, fails (the object stays,
//! `stopped`, with the error shown), or completes later through an effect.

use std::collections::BTreeMap;
use std::fmt;

use proto::{Kind, Origin};

use crate::error::Result;

/// What a driver sees of an object it acts on.
#[derive(Clone, Copy, Debug)]
pub struct ObjectView<'a> {
    /// The object's id.
    pub id: crate::ObjectId,
    /// Its kind.
    pub kind: Kind,
    /// Its name.
    pub name: &'a str,
    /// Its attributes.
    pub attributes: &'a crate::Attributes,
    /// Where it came from.
    pub origin: Origin,
    /// Its kernel subsystem, empty for API objects.
    pub subsystem: &'a str,
    /// Its sysfs path, empty for API objects.
    pub sys_path: &'a str,
}

/// Options given when an object is bound to a driver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeOptions {
    /// For a SCSI host adapter: how many LUNs to scan.
    pub luns: Option<u32>,
}

/// A device a probe found, to be created under the probed object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewChild {
    /// Its kind (host or device).
    pub kind: Kind,
    /// Its name (validated like any other name).
    pub name: String,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
}

/// A driver action that runs outside the engine, described in the driver's own
/// terms (the daemon's executor knows how to carry out each driver's actions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitAction {
    /// What the driver will do, e.g. `delete` or `loop-remove`.
    pub verb: &'static str,
    /// What it acts on: a sysfs path, a device node, a simulated delay…
    pub target: String,
}

/// How a driver lets go of an object that is being removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Nothing real to tear down, or it was torn down synchronously.
    Done,
    /// The driver refused or failed; the object stays `stopped` with this error.
    Failed(String),
    /// The caller must carry out this action; the object stays `removing`
    /// until [`crate::Model::exit_finished`] reports the outcome.
    Later(ExitAction),
    /// There is no way to remove this object; `Remove` refuses with
    /// `NotSupported` before changing anything.
    NotSupported(String),
    /// Nothing of its own to do: the kernel takes it away with its parent
    /// (a disk's partitions, a SCSI device's disk). It rides on the
    /// parent's removal, so it does not keep the parent busy; a removal of
    /// it alone is refused with `NotSupported`, naming the parent (rule 20).
    WithParent,
}

/// A driver implementation. Implementations are pure: any real work is
/// returned as an [`Exit::Later`] action for the caller to carry out.
pub trait Driver: fmt::Debug + Send + Sync {
    /// The driver's name; a driver object with this name uses this implementation.
    fn name(&self) -> &'static str;

    /// Called when `target` is bound to this driver: the devices found under it.
    /// An error refuses the bind and changes nothing.
    fn probe(&self, target: &ObjectView<'_>, options: &ProbeOptions) -> Result<Vec<NewChild>>;

    /// How this driver lets go of `target` (an object bound to it, or one it
    /// created by probing) when `target` is removed.
    fn exit(&self, target: &ObjectView<'_>) -> Exit;
}

/// Index of a driver implementation in a [`Registry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ImplId(pub(crate) u16);

/// The driver implementations a model knows, looked up by driver name.
#[derive(Debug)]
pub struct Registry {
    impls: Vec<Box<dyn Driver>>,
}

impl Registry {
    /// An empty registry: every driver object is a plain, behaviourless driver.
    pub fn empty() -> Self {
        Registry { impls: Vec::new() }
    }

    /// The implementations shipped with devmgr: `sim-scsi`, and the removals
    /// of real devices (`crate::kernel`).
    pub fn builtin() -> Self {
        let mut registry = Self::empty();
        registry.register(Box::new(crate::sim_scsi::SimScsi));
        for removal in crate::kernel::KernelRemoval::all() {
            registry.register(Box::new(removal));
        }
        registry
    }

    /// Adds an implementation; a later one with the same name replaces nothing
    /// (the first registered wins), so registration order is deterministic.
    pub fn register(&mut self, driver: Box<dyn Driver>) {
        if self.find(driver.name()).is_none() && self.impls.len() < usize::from(u16::MAX) {
            self.impls.push(driver);
        }
    }

    pub(crate) fn find(&self, name: &str) -> Option<ImplId> {
        self.impls
            .iter()
            .position(|d| d.name() == name)
            .and_then(|i| u16::try_from(i).ok())
            .map(ImplId)
    }

    pub(crate) fn get(&self, id: ImplId) -> &dyn Driver {
        self.impls[usize::from(id.0)].as_ref()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin()
    }
}
