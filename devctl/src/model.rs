//! What devctl knows of the daemon's objects: typed snapshots read over the
//! bus (all objects from the ObjectManager, one object from its
//! properties), and turning what a user types for OBJ into an object path.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use zbus::names::InterfaceName;
use zbus::{Connection, OwnedObjectPath, OwnedVariant};

use crate::failure::{Failure, Outcome};

/// One object, as its properties say.
#[derive(Serialize, Clone, Debug)]
pub struct ObjectInfo {
    pub path: String,
    pub id: u64,
    pub kind: String,
    pub name: String,
    pub state: String,
    /// Parent object path, if any.
    pub parent: Option<String>,
    /// Driver object path, if bound.
    pub driver: Option<String>,
    pub ref_count: u32,
    pub holders: Vec<HolderInfo>,
    pub attributes: BTreeMap<String, String>,
    pub origin: String,
    pub subsystem: String,
    pub sys_path: String,
    pub last_error: String,
    /// Another object of the other origin has this kind and name: people
    /// must be shown (and must type) `udev:NAME` or `api:NAME`.
    #[serde(skip)]
    pub scoped: bool,
}

/// One reference on an object.
#[derive(Serialize, Clone, Debug)]
pub struct HolderInfo {
    pub reference: u64,
    pub bus_name: String,
    pub uid: u32,
    pub pid: u32,
    /// The holder's process name, from /proc when readable.
    pub process: Option<String>,
    pub reason: String,
    /// When it was taken, µs since the Unix epoch.
    pub since_us: u64,
    /// How long it has been held, in seconds.
    pub age_sec: u64,
}

type Properties = HashMap<String, OwnedVariant>;

fn prop<T: TryFrom<OwnedVariant>>(props: &Properties, name: &str) -> Option<T> {
    props
        .get(name)
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| T::try_from(v).ok())
}

/// `/` means none.
fn optional_path(props: &Properties, name: &str) -> Option<String> {
    prop::<OwnedObjectPath>(props, name)
        .map(|p| p.to_string())
        .filter(|p| p != proto::NO_OBJECT_PATH)
}

/// Now, in µs since the Unix epoch (the daemon's clock for `since`).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The holder's process name, if /proc lets us read it.
fn process_name(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end().to_owned()).filter(|c| !c.is_empty())
}

impl ObjectInfo {
    /// Builds the object at `path` from its `org.devmgr.DevMgr1.Object` properties.
    pub fn from_properties(path: &str, props: &Properties) -> ObjectInfo {
        let now = now_micros();
        let holders: Vec<proto::HolderTuple> = prop(props, "Holders").unwrap_or_default();
        ObjectInfo {
            path: path.to_owned(),
            id: prop(props, "Id").unwrap_or_default(),
            kind: prop(props, "Kind").unwrap_or_default(),
            name: prop(props, "Name").unwrap_or_default(),
            state: prop(props, "State").unwrap_or_default(),
            parent: optional_path(props, "Parent"),
            driver: optional_path(props, "Driver"),
            ref_count: prop(props, "RefCount").unwrap_or_default(),
            holders: holders
                .into_iter()
                .map(
                    |(reference, bus_name, uid, pid, reason, since_us)| HolderInfo {
                        reference,
                        bus_name,
                        uid,
                        pid,
                        process: process_name(pid),
                        reason,
                        since_us,
                        age_sec: now.saturating_sub(since_us) / 1_000_000,
                    },
                )
                .collect(),
            attributes: prop::<HashMap<String, String>>(props, "Attributes")
                .unwrap_or_default()
                .into_iter()
                .collect(),
            origin: prop(props, "Origin").unwrap_or_default(),
            subsystem: prop(props, "Subsystem").unwrap_or_default(),
            sys_path: prop(props, "SysPath").unwrap_or_default(),
            last_error: prop(props, "LastError").unwrap_or_default(),
            scoped: prop(props, "Scoped").unwrap_or_default(),
        }
    }

    /// How its name reads to people: with its scope when it has a namesake
    /// of the other origin (what devctl accepts back).
    pub fn display_name(&self) -> String {
        if self.scoped {
            format!("{}:{}", self.origin, self.name)
        } else {
            self.name.clone()
        }
    }

    /// `kind/name`, how devctl names objects to people.
    pub fn label(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// Every object the daemon holds, by id (creation order).
pub struct Snapshot {
    pub objects: BTreeMap<u64, ObjectInfo>,
    by_path: HashMap<String, u64>,
    /// Kind and name shared by one of the machine's devices and an object
    /// a client added: such names are shown with their scope.
    shared_names: std::collections::HashSet<(String, String)>,
}

/// Objects asked for in one ListObjects page.
const PAGE: u32 = 1000;

/// Reads every object, page by page (`Manager.ListObjects`, in id order),
/// handing each page to `each` as it arrives. A daemon older than
/// ListObjects is read with one GetManagedObjects call instead.
pub async fn each_page(conn: &Connection, each: impl FnMut(Vec<ObjectInfo>) -> Outcome) -> Outcome {
    each_page_of(conn, None, each).await
}

/// [`each_page`], with only these properties of each object (the others
/// read as empty).
///
/// The next page is asked for as soon as a page arrives, before `each`
/// runs on it: the daemon and the bus work on one page while devctl
/// prints the one before.
pub async fn each_page_of(
    conn: &Connection,
    properties: Option<&[&str]>,
    mut each: impl FnMut(Vec<ObjectInfo>) -> Outcome,
) -> Outcome {
    let manager = manager(conn).await?;
    let (pages, arrived) = tokio::sync::mpsc::channel::<Vec<proto::proxies::PageEntry>>(2);
    let fetch = async {
        // Owned here, so that the consumer sees the end when this ends.
        let pages = pages;
        let mut cursor = String::new();
        loop {
            let mut query = HashMap::from([
                ("cursor", zbus::Variant::from(cursor.as_str())),
                ("limit", zbus::Variant::from(PAGE)),
            ]);
            if let Some(names) = properties {
                query.insert("properties", zbus::Variant::from(names.to_vec()));
            }
            let (entries, next) = match manager.list_objects(query).await {
                Ok(page) => page,
                Err(proto::Error::ZBus(zbus::Error::MethodError(name, _, _)))
                    if cursor.is_empty()
                        && name.as_str() == "org.freedesktop.DBus.Error.UnknownMethod" =>
                {
                    return Ok(true);
                }
                Err(e) => return Err(Failure::from(e)),
            };
            if pages.send(entries).await.is_err() || next.is_empty() {
                return Ok(false);
            }
            cursor = next;
        }
    };
    let consume = async {
        // Owned here, so that the fetcher stops when this stops early (a
        // failure, or a reader that went away: `devctl list | head`).
        let mut arrived = arrived;
        while let Some(entries) = arrived.recv().await {
            each(
                entries
                    .iter()
                    .map(|(path, props)| ObjectInfo::from_properties(path.as_str(), props))
                    .collect(),
            )?;
        }
        Ok::<_, Failure>(())
    };
    let (fetched, consumed) = tokio::join!(fetch, consume);
    consumed?;
    if fetched? {
        // A daemon older than ListObjects.
        each(managed_objects(conn).await?)?;
    }
    Ok(())
}

/// Every object from one GetManagedObjects call (daemons before 0.2).
async fn managed_objects(conn: &Connection) -> Outcome<Vec<ObjectInfo>> {
    let manager = zbus::fdo::ObjectManagerProxy::builder(conn)
        .destination(proto::BUS_NAME)
        .path(proto::MANAGER_PATH)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let managed = manager.get_managed_objects().await?;
    let mut objects = Vec::new();
    for (path, interfaces) in managed {
        if let Some(props) = interfaces
            .iter()
            .find(|(name, _)| name.as_str() == proto::OBJECT_INTERFACE)
            .map(|(_, props)| props)
        {
            objects.push(ObjectInfo::from_properties(path.as_str(), props));
        }
    }
    Ok(objects)
}

impl Snapshot {
    /// Reads every object (ListObjects, page by page).
    pub async fn read(conn: &Connection) -> Outcome<Snapshot> {
        let mut objects = BTreeMap::new();
        each_page(conn, |page| {
            objects.extend(page.into_iter().map(|o| (o.id, o)));
            Ok(())
        })
        .await?;
        Ok(Snapshot::from_objects(objects))
    }

    pub fn from_objects(objects: BTreeMap<u64, ObjectInfo>) -> Snapshot {
        let by_path = objects.values().map(|o| (o.path.clone(), o.id)).collect();
        let mut scopes: HashMap<(String, String), std::collections::HashSet<&str>> = HashMap::new();
        for o in objects.values().filter(|o| o.state != "gone") {
            scopes
                .entry((o.kind.clone(), o.name.clone()))
                .or_default()
                .insert(&o.origin);
        }
        let shared_names = scopes
            .into_iter()
            .filter(|(_, origins)| origins.len() > 1)
            .map(|(k, _)| k)
            .collect();
        Snapshot {
            objects,
            by_path,
            shared_names,
        }
    }

    /// How an object's name reads: `udev:host0` / `api:host0` when the
    /// machine and a client both have that name (what `devctl` accepts
    /// back), else the plain name.
    pub fn display_name(&self, o: &ObjectInfo) -> String {
        if self
            .shared_names
            .contains(&(o.kind.clone(), o.name.clone()))
        {
            format!("{}:{}", o.origin, o.name)
        } else {
            o.name.clone()
        }
    }

    /// The object at `path`, if the snapshot has it.
    pub fn get(&self, path: &str) -> Option<&ObjectInfo> {
        self.by_path.get(path).and_then(|id| self.objects.get(id))
    }

    /// The name of the object at `path` (or the path), `-` for none.
    pub fn name_of(&self, path: Option<&str>) -> String {
        match path {
            None => "-".to_owned(),
            Some(p) => self.get(p).map_or_else(|| p.to_owned(), |o| o.name.clone()),
        }
    }
}

/// Reads one object's properties.
pub async fn read_object(conn: &Connection, path: &str) -> Outcome<ObjectInfo> {
    let props = zbus::fdo::PropertiesProxy::builder(conn)
        .destination(proto::BUS_NAME)
        .path(path.to_owned())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?
        .get_all(InterfaceName::from_static_str_unchecked(
            proto::OBJECT_INTERFACE,
        ))
        .await
        .map_err(|e| not_found_if_unknown(e.into(), path))?;
    Ok(ObjectInfo::from_properties(path, &props))
}

/// A stale or unknown path reads as the contract's NotFound.
fn not_found_if_unknown(e: Failure, what: &str) -> Failure {
    match e {
        Failure::Refused { name, .. } if name.starts_with("org.freedesktop.DBus.Error.Unknown") => {
            Failure::Refused {
                name: proto::ErrorKind::NotFound.dbus_name(),
                message: format!("no object {what}"),
            }
        }
        other => other,
    }
}

const KINDS: [&str; 3] = ["driver", "host", "device"];

/// The object path of what the user typed: an object path, an id,
/// `kind/name`, or a name unique across kinds. `prefer` is tried first
/// for a bare name (a driver argument means a driver).
pub async fn resolve(conn: &Connection, obj: &str, prefer: Option<&str>) -> Outcome<String> {
    let manager = manager(conn).await?;
    if obj.starts_with('/') {
        if proto::parse_object_path(obj).is_none() {
            return Err(Failure::Usage(format!(
                "{obj} is not a devmgr object path ({}<id>)",
                proto::OBJECT_PATH_PREFIX
            )));
        }
        read_object(conn, obj).await?;
        return Ok(obj.to_owned());
    }
    if !obj.is_empty() && obj.bytes().all(|b| b.is_ascii_digit()) {
        let Ok(id) = obj.parse::<u64>() else {
            return Err(Failure::Usage(format!("{obj} is not an object id")));
        };
        let path = proto::object_path(id);
        read_object(conn, &path)
            .await
            .map_err(|e| not_found_if_unknown(e, &format!("with id {id}")))?;
        return Ok(path);
    }
    if let Some((kind, name)) = obj.split_once('/') {
        if KINDS.contains(&kind) {
            return Ok(manager.find_object(kind, name).await?.to_string());
        }
    }
    if let Some(kind) = prefer {
        if let Ok(path) = manager.find_object(kind, obj).await {
            return Ok(path.to_string());
        }
    }
    let mut found = Vec::new();
    for kind in KINDS {
        match manager.find_object(kind, obj).await {
            Ok(path) => found.push((kind, path)),
            Err(proto::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match found.as_slice() {
        [(_, path)] => Ok(path.to_string()),
        [] => Err(Failure::Refused {
            name: proto::ErrorKind::NotFound.dbus_name(),
            message: format!("no driver, host or device is named {obj:?}"),
        }),
        several => Err(Failure::Usage(format!(
            "{obj:?} is ambiguous: it names {}; say which, e.g. {}/{obj}",
            several
                .iter()
                .map(|(kind, _)| format!("{kind}/{obj}"))
                .collect::<Vec<_>>()
                .join(" and "),
            several[0].0
        ))),
    }
}

/// The manager's typed proxy.
pub async fn manager(conn: &Connection) -> Outcome<proto::proxies::ManagerProxy<'static>> {
    Ok(proto::proxies::ManagerProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?)
}

/// One object's typed proxy.
pub async fn object(
    conn: &Connection,
    path: &str,
) -> Outcome<proto::proxies::ObjectProxy<'static>> {
    Ok(proto::proxies::ObjectProxy::builder(conn)
        .path(path.to_owned())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?)
}
