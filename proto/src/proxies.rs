//! Typed client proxies for the version-1 contract (`#[zbus::proxy]`): what
//! devctl and the end-to-end tests speak, so a client gets `proto::Error`
//! variants back and never has to parse an error's text.

use std::collections::HashMap;

use zbus::{ObjectPath, OwnedFd, OwnedObjectPath, Variant};

use crate::{Error, HolderTuple};

/// One `ListObjects` entry: an object's path and its properties (those of
/// `org.devmgr.DevMgr1.Object`, and `Scoped`).
pub type PageEntry = (OwnedObjectPath, HashMap<String, zbus::OwnedVariant>);

/// The `a{sv}` options every method takes.
pub type Options<'a> = HashMap<&'a str, Variant<'a>>;

/// `org.devmgr.DevMgr1.Manager` at `/org/devmgr/DevMgr1`.
#[zbus::proxy(
    interface = "org.devmgr.DevMgr1.Manager",
    default_service = "org.devmgr.DevMgr1",
    default_path = "/org/devmgr/DevMgr1"
)]
pub trait Manager {
    /// Adds a driver, host or device; `parent` is `/` for none.
    fn add(
        &self,
        kind: &str,
        name: &str,
        parent: &ObjectPath<'_>,
        options: Options<'_>,
    ) -> Result<OwnedObjectPath, Error>;

    /// The live object of this kind and name.
    fn find_object(&self, kind: &str, name: &str) -> Result<OwnedObjectPath, Error>;

    /// One page of objects in id order, and the cursor of the next ("" at
    /// the end); options in docs/contract.md, "Listing a big model".
    fn list_objects(&self, query: Options<'_>) -> Result<(Vec<PageEntry>, String), Error>;

    /// What the caller may do, verb by verb (`add`, `remove`,
    /// `remove-force`, `stop`, `reenable`, `bind`, `unbind`, `acquire`):
    /// `yes`, `challenge` (after authenticating to polkit) or `no`.
    fn get_permissions(&self) -> Result<HashMap<String, String>, Error>;

    /// The contract version.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;

    /// How many objects the model holds.
    #[zbus(property)]
    fn object_count(&self) -> zbus::Result<u32>;

    /// How many removal requests are pending.
    #[zbus(property)]
    fn pending_removals(&self) -> zbus::Result<u32>;

    /// How many references are held, kernel users included.
    #[zbus(property)]
    fn reference_count(&self) -> zbus::Result<u32>;

    /// Objects per kind.
    #[zbus(property)]
    fn kind_counts(&self) -> zbus::Result<HashMap<String, u32>>;

    /// Objects per state.
    #[zbus(property)]
    fn state_counts(&self) -> zbus::Result<HashMap<String, u32>>;

    /// An object left the model.
    #[zbus(signal)]
    fn removal_completed(&self, object: ObjectPath<'_>, kind: &str, name: &str)
        -> zbus::Result<()>;
}

/// `org.devmgr.DevMgr1.Object` at `/org/devmgr/DevMgr1/objects/<id>`.
#[zbus::proxy(
    interface = "org.devmgr.DevMgr1.Object",
    default_service = "org.devmgr.DevMgr1"
)]
pub trait Object {
    /// A reference, held while any copy of the returned fd is open.
    fn acquire(&self, reason: &str, options: Options<'_>) -> Result<OwnedFd, Error>;

    /// Removes the object: `("removed", [])` or `("pending", what still holds it)`.
    fn remove(&self, options: Options<'_>) -> Result<(String, Vec<OwnedObjectPath>), Error>;

    /// Refuses new users; existing references stay valid.
    fn stop(&self, options: Options<'_>) -> Result<(), Error>;

    /// Back to `live`, cancelling a pending removal and what it caused.
    fn reenable(&self, options: Options<'_>) -> Result<(), Error>;

    /// Binds the object to a driver.
    fn bind(&self, driver: &ObjectPath<'_>, options: Options<'_>) -> Result<(), Error>;

    /// Unbinds the object from its driver.
    fn unbind(&self, options: Options<'_>) -> Result<(), Error>;

    /// The object's id, never reused.
    #[zbus(property)]
    fn id(&self) -> zbus::Result<u64>;
    /// `driver`, `host` or `device`.
    #[zbus(property)]
    fn kind(&self) -> zbus::Result<String>;
    /// Its name, unique per kind among live objects.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// `live`, `stopped`, `removing` or `gone`.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// Its parent, `/` if none.
    #[zbus(property)]
    fn parent(&self) -> zbus::Result<OwnedObjectPath>;
    /// Its driver, `/` if unbound.
    #[zbus(property)]
    fn driver(&self) -> zbus::Result<OwnedObjectPath>;
    /// How many references it has.
    #[zbus(property)]
    fn ref_count(&self) -> zbus::Result<u32>;
    /// Who holds those references.
    #[zbus(property)]
    fn holders(&self) -> zbus::Result<Vec<HolderTuple>>;
    /// Its attributes.
    #[zbus(property)]
    fn attributes(&self) -> zbus::Result<HashMap<String, String>>;
    /// `api` or `udev`.
    #[zbus(property)]
    fn origin(&self) -> zbus::Result<String>;
    /// Its kernel subsystem, empty for API objects.
    #[zbus(property)]
    fn subsystem(&self) -> zbus::Result<String>;
    /// Its sysfs path, empty for API objects.
    #[zbus(property)]
    fn sys_path(&self) -> zbus::Result<String>;
    /// The last driver action's error, empty when it succeeded.
    #[zbus(property)]
    fn last_error(&self) -> zbus::Result<String>;

    /// A removal is waiting on this object's holders.
    #[zbus(signal)]
    fn release_requested(&self, why: &str) -> zbus::Result<()>;
}
