//! The D-Bus adapters: `org.devmgr.DevMgr1.Manager` and one
//! `org.devmgr.DevMgr1.Object` per modelled object. Thin by design: decode
//! arguments and options, send one command to the model's owner, map the
//! typed error. Properties are a cache that the event pump keeps current.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use drivers::{
    AddRequest, Kind, ObjectId, ObjectInfo, OnTimeout, ProbeOptions, RemoveOptions, State,
};
use proto::{HolderTuple, NO_OBJECT_PATH};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, ObjectPath, OwnedFd, OwnedObjectPath, OwnedVariant};

use crate::authz::Verb;
use crate::errors::{bad_option, from_engine, from_owner};
use crate::owner::{now_micros, ModelHandle};

type Options = HashMap<String, OwnedVariant>;

/// The D-Bus path of an object, or `/` for none.
pub fn path_of(id: Option<ObjectId>) -> OwnedObjectPath {
    let path = id.map_or_else(|| NO_OBJECT_PATH.to_owned(), |id| proto::object_path(id.0));
    // Our own paths are always valid object paths.
    OwnedObjectPath::try_from(path).unwrap_or_else(|_| OwnedObjectPath::default())
}

/// The object a path names: `/` is none; a path that is not one of ours is `NotFound`.
fn id_of(path: &ObjectPath<'_>, what: &str) -> Result<Option<ObjectId>, proto::Error> {
    if path.as_str() == NO_OBJECT_PATH {
        return Ok(None);
    }
    proto::parse_object_path(path.as_str())
        .map(|id| Some(ObjectId(id)))
        .ok_or_else(|| proto::Error::NotFound(format!("{what}: no devmgr object at {path}")))
}

fn required(path: &ObjectPath<'_>, what: &str) -> Result<ObjectId, proto::Error> {
    id_of(path, what)?.ok_or_else(|| proto::Error::InvalidArgument(format!("{what} is required")))
}

fn no_options(options: &Options) -> Result<(), proto::Error> {
    match options.keys().next() {
        None => Ok(()),
        Some(key) => Err(proto::Error::InvalidArgument(format!(
            "unknown option {key:?}"
        ))),
    }
}

fn optional_u32(options: &mut Options, key: &str) -> Result<Option<u32>, proto::Error> {
    options
        .remove(key)
        .map(|v| u32::try_from(&v).map_err(|e| bad_option(key, e)))
        .transpose()
}

fn flag(options: &mut Options, key: &str) -> Result<bool, proto::Error> {
    options.remove(key).map_or(Ok(false), |v| {
        bool::try_from(&v).map_err(|e| bad_option(key, e))
    })
}

/// `org.devmgr.DevMgr1.Manager` at `/org/devmgr/DevMgr1`.
///
/// The cached counts are atomics: a method holds its interface's lock while
/// it waits for its reply, and the pump must update them meanwhile.
pub struct Manager {
    pub(crate) handle: ModelHandle,
    pub(crate) authz: crate::authz::Authorizer,
    pub(crate) object_count: AtomicU32,
    pub(crate) pending_removals: AtomicU32,
}

#[interface(name = "org.devmgr.DevMgr1.Manager", introspection_docs = false)]
impl Manager {
    /// Adds a driver, host or device.
    #[zbus(out_args("object"))]
    async fn add(
        &self,
        kind: String,
        name: String,
        parent: OwnedObjectPath,
        mut options: Options,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<OwnedObjectPath, proto::Error> {
        let caller = self.authz.allow(conn, &header, Verb::Add).await?;
        let kind: Kind = kind
            .parse()
            .map_err(|e| proto::Error::InvalidArgument(format!("{e}")))?;
        let mut request = AddRequest::new(kind, name);
        request.parent = id_of(&parent, "parent")?;
        if let Some(v) = options.remove(proto::add_options::DRIVER) {
            let path = OwnedObjectPath::try_from(v).map_err(|e| bad_option("driver", e))?;
            request.driver = Some(required(&path, "driver")?);
        }
        if let Some(v) = options.remove(proto::add_options::ATTRIBUTES) {
            let map =
                HashMap::<String, String>::try_from(v).map_err(|e| bad_option("attributes", e))?;
            request.attributes = map.into_iter().collect::<BTreeMap<_, _>>();
        }
        request.probe.luns = optional_u32(&mut options, proto::add_options::LUNS)?;
        no_options(&options)?;
        request.added_by = Some(caller.holder.key);
        let id = self
            .handle
            .call(move |m| m.add(request))
            .await
            .map_err(from_owner)?
            .map_err(from_engine);
        if let (Err(proto::Error::QuotaExceeded(why)), Some(sender)) = (&id, header.sender()) {
            self.authz.peers.warn_once(sender, why);
        }
        let id = id?;
        Ok(path_of(Some(id)))
    }

    /// The object of this kind with this name.
    #[zbus(out_args("object"))]
    async fn find_object(
        &self,
        kind: String,
        name: String,
    ) -> Result<OwnedObjectPath, proto::Error> {
        let kind: Kind = kind
            .parse()
            .map_err(|e| proto::Error::InvalidArgument(format!("{e}")))?;
        let id = self
            .handle
            .call(move |m| m.find(kind, &name))
            .await
            .map_err(from_owner)?
            .map_err(from_engine)?;
        Ok(path_of(Some(id)))
    }

    /// The daemon's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    /// How many objects exist.
    #[zbus(property)]
    fn object_count(&self) -> u32 {
        self.object_count.load(Ordering::Relaxed)
    }

    /// How many objects are `removing`.
    #[zbus(property)]
    fn pending_removals(&self) -> u32 {
        self.pending_removals.load(Ordering::Relaxed)
    }

    /// An object left the model.
    #[zbus(signal)]
    pub async fn removal_completed(
        emitter: &SignalEmitter<'_>,
        object: ObjectPath<'_>,
        kind: &str,
        name: &str,
    ) -> zbus::Result<()>;
}

/// What every object interface shares: the way to the model's owner, the
/// handles given out, and the callers' credentials.
#[derive(Clone)]
pub struct Shared {
    pub handle: ModelHandle,
    pub handles: crate::handles::Handles,
    pub authz: crate::authz::Authorizer,
}

/// What an object's properties show; the pump keeps it current.
pub struct Cache {
    pub(crate) info: ObjectInfo,
    pub(crate) holders: Vec<HolderTuple>,
}

/// `org.devmgr.DevMgr1.Object` at `/org/devmgr/DevMgr1/objects/<id>`.
///
/// The property cache sits behind a short-held sync mutex (never across an
/// await): a method holds the interface's lock while it waits for its
/// reply, and the pump must update the cache meanwhile.
pub struct ObjectIface {
    shared: Shared,
    id: ObjectId,
    cache: Mutex<Cache>,
}

impl ObjectIface {
    /// The interface for a newly added object.
    pub fn new(shared: Shared, info: ObjectInfo) -> Self {
        let holders = info.holders.iter().map(crate::pump::holder_tuple).collect();
        ObjectIface {
            shared,
            id: info.id,
            cache: Mutex::new(Cache { info, holders }),
        }
    }

    /// The property cache (a poisoned lock still holds valid data).
    pub(crate) fn cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut drivers::Model, ObjectId) -> drivers::Result<R> + Send + 'static,
    ) -> Result<R, proto::Error> {
        let id = self.id;
        self.shared
            .handle
            .call(move |m| f(m, id))
            .await
            .map_err(from_owner)?
            .map_err(from_engine)
    }
}

#[interface(name = "org.devmgr.DevMgr1.Object", introspection_docs = false)]
impl ObjectIface {
    /// Takes a reference, held for as long as any copy of the returned file
    /// descriptor is open. The holder's bus name, uid and pid come from the
    /// bus's credentials for the caller, not from the caller's word.
    #[zbus(out_args("handle"))]
    async fn acquire(
        &self,
        reason: String,
        options: Options,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<OwnedFd, proto::Error> {
        no_options(&options)?;
        let caller = self
            .shared
            .authz
            .allow(conn, &header, Verb::Acquire)
            .await?;
        let holder = caller.holder.clone();
        let (theirs, ours) = std::io::pipe()
            .map_err(|e| proto::Error::QuotaExceeded(format!("cannot make a handle: {e}")))?;
        let reference = self
            .run(move |m, id| m.acquire(id, holder, reason, now_micros()))
            .await;
        if let Err(proto::Error::QuotaExceeded(why)) = &reference {
            // Once per client, not once per refused call.
            if let Some(sender) = header.sender() {
                self.shared.authz.peers.warn_once(sender, why);
            }
        }
        let reference = reference?;
        self.shared
            .handles
            .watch(self.shared.handle.clone(), reference, ours);
        Ok(OwnedFd::from(std::os::fd::OwnedFd::from(theirs)))
    }

    /// Removes the object; never waits. Returns `removed` or `pending` and
    /// what the removal still waits on.
    #[zbus(out_args("outcome", "pending"))]
    async fn remove(
        &self,
        mut options: Options,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(String, Vec<OwnedObjectPath>), proto::Error> {
        use proto::remove_options as keys;
        let force = flag(&mut options, keys::FORCE)?;
        let detach_mounts = flag(&mut options, keys::DETACH_MOUNTS)?;
        // Taking users away (references or the kernel's mounts) is a
        // forced removal's right.
        let verb = if force || detach_mounts {
            Verb::RemoveForce
        } else {
            Verb::Remove
        };
        self.shared.authz.allow(conn, &header, verb).await?;
        let dry_run = flag(&mut options, keys::DRY_RUN)?;
        let timeout = optional_u32(&mut options, keys::TIMEOUT_SEC)?;
        let on_timeout = match options.remove(keys::ON_TIMEOUT) {
            None => OnTimeout::Revoke,
            Some(v) => <&str>::try_from(&v)
                .map_err(|e| bad_option(keys::ON_TIMEOUT, e))?
                .parse()
                .map_err(|e| bad_option(keys::ON_TIMEOUT, e))?,
        };
        no_options(&options)?;
        let options = RemoveOptions {
            force,
            dry_run,
            timeout: timeout.map(|s| (u64::from(s) * 1_000_000, on_timeout)),
            detach_mounts,
        };
        let report = self
            .run(move |m, id| m.remove(id, options, now_micros()))
            .await?;
        let pending = report.pending.iter().map(|p| path_of(Some(p.id))).collect();
        Ok((report.outcome.to_string(), pending))
    }

    /// Refuses new users; keeps the object. Cancels a pending removal.
    async fn stop(
        &self,
        options: Options,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), proto::Error> {
        self.shared.authz.allow(conn, &header, Verb::Stop).await?;
        no_options(&options)?;
        self.run(|m, id| m.stop(id)).await
    }

    /// Back to `live`, cancelling a pending removal and what it caused.
    async fn reenable(
        &self,
        options: Options,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), proto::Error> {
        self.shared
            .authz
            .allow(conn, &header, Verb::Reenable)
            .await?;
        no_options(&options)?;
        self.run(|m, id| m.reenable(id)).await
    }

    /// Binds to a driver (option `luns` (u) for a scanning driver).
    async fn bind(
        &self,
        driver: OwnedObjectPath,
        mut options: Options,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), proto::Error> {
        self.shared.authz.allow(conn, &header, Verb::Bind).await?;
        let driver = required(&driver, "driver")?;
        let luns = optional_u32(&mut options, proto::add_options::LUNS)?;
        no_options(&options)?;
        self.run(move |m, id| m.bind(id, driver, ProbeOptions { luns }))
            .await
    }

    /// Unbinds from its driver (option `force` (b) revokes references).
    async fn unbind(
        &self,
        mut options: Options,
        #[zbus(connection)] conn: &zbus::Connection,
        #[zbus(header)] header: Header<'_>,
    ) -> Result<(), proto::Error> {
        self.shared.authz.allow(conn, &header, Verb::Unbind).await?;
        let force = flag(&mut options, "force")?;
        no_options(&options)?;
        self.run(move |m, id| m.unbind(id, force)).await
    }

    #[zbus(property)]
    fn id(&self) -> u64 {
        self.id.0
    }

    #[zbus(property)]
    fn kind(&self) -> String {
        self.cache().info.kind.to_string()
    }

    #[zbus(property)]
    fn name(&self) -> String {
        self.cache().info.name.to_string()
    }

    #[zbus(property)]
    fn state(&self) -> String {
        self.cache().info.state.to_string()
    }

    #[zbus(property)]
    fn parent(&self) -> OwnedObjectPath {
        path_of(self.cache().info.parent)
    }

    #[zbus(property)]
    fn driver(&self) -> OwnedObjectPath {
        path_of(self.cache().info.driver)
    }

    #[zbus(property)]
    fn ref_count(&self) -> u32 {
        u32::try_from(self.cache().holders.len()).unwrap_or(u32::MAX)
    }

    #[zbus(property)]
    fn holders(&self) -> Vec<HolderTuple> {
        self.cache().holders.clone()
    }

    #[zbus(property)]
    fn attributes(&self) -> HashMap<String, String> {
        self.cache().info.attributes.clone().into_iter().collect()
    }

    #[zbus(property)]
    fn origin(&self) -> String {
        self.cache().info.origin.to_string()
    }

    #[zbus(property)]
    fn subsystem(&self) -> String {
        self.cache().info.subsystem.clone()
    }

    #[zbus(property)]
    fn sys_path(&self) -> String {
        self.cache().info.sys_path.clone()
    }

    #[zbus(property)]
    fn last_error(&self) -> String {
        self.cache().info.last_error.to_string()
    }

    /// A removal is waiting on this object's holders: release promptly.
    #[zbus(signal)]
    pub async fn release_requested(emitter: &SignalEmitter<'_>, why: &str) -> zbus::Result<()>;
}

/// Keeps `State` in the cache and says whether it changed.
pub(crate) fn set_state(iface: &ObjectIface, state: State) -> bool {
    std::mem::replace(&mut iface.cache().info.state, state) != state
}
