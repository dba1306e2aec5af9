//! `org.devmgr.DevMgr1.Manager` and `org.freedesktop.DBus.ObjectManager`
//! at `/org/devmgr/DevMgr1`: Add, FindObject, the paged `ListObjects`, the
//! counts, the caller's `GetPermissions`, and GetManagedObjects, which
//! answers LimitsExceeded rather than send more than the bus accepts.

use std::collections::{BTreeMap, HashMap};

use drivers::listing::{cursor_of, Query};
use drivers::{AddRequest, Kind, ObjectInfo, Origin, State};
use zbus::{Message, OwnedObjectPath, Variant};

use super::args::{id_of, optional_str, optional_u32, path_of, required, wire_name, Options};
use super::{
    introspect, is, properties, too_big, unknown_interface, unknown_method, wire, Answer, Call,
};
use crate::bus::authz::Verb;
use crate::bus::errors::{bad_option, from_engine, from_owner};

/// Objects in a page when the query does not say.
pub const DEFAULT_PAGE: u32 = 1000;
/// Most objects a page may ask for.
pub const MAX_PAGE: u32 = 10_000;

/// The options ListObjects takes.
pub mod list_options {
    /// `s`: resume after this cursor ("" or absent: from the start).
    pub const CURSOR: &str = "cursor";
    /// `u`: most objects in the page (1 to 10,000; 1,000 if absent).
    pub const LIMIT: &str = "limit";
    /// `s`: only objects of this kind.
    pub const KIND: &str = "kind";
    /// `s`: only objects in this state.
    pub const STATE: &str = "state";
    /// `s`: only objects of this origin.
    pub const ORIGIN: &str = "origin";
    /// `o`: only this object and those below it.
    pub const SUBTREE: &str = "subtree";
    /// `as`: only these properties of each object (absent: all).
    pub const PROPERTIES: &str = "properties";
}

/// Answers a call on the manager's path.
pub async fn call(call: &Call, interface: Option<&str>, member: &str) -> Answer {
    match (interface, member) {
        (Some(super::PROPERTIES), _) | (None, "Get" | "GetAll" | "Set") => {
            super::properties(call, member, |wanted| manager_properties(call, wanted)).await
        }
        (Some(super::INTROSPECTABLE) | None, "Introspect") => {
            call.reply(&(introspect::manager(),)).await
        }
        (Some(super::OBJECT_MANAGER) | None, "GetManagedObjects") => managed_objects(call).await,
        (Some(i), _) if i != proto::MANAGER_INTERFACE && i != super::OBJECT_MANAGER => {
            Err(unknown_interface(i))
        }
        (_, "Add") if is(interface, proto::MANAGER_INTERFACE) => add(call).await,
        (_, "FindObject") if is(interface, proto::MANAGER_INTERFACE) => find(call).await,
        (_, "ListObjects") if is(interface, proto::MANAGER_INTERFACE) => list(call).await,
        (_, "GetPermissions") if is(interface, proto::MANAGER_INTERFACE) => permissions(call).await,
        _ => Err(unknown_method(member)),
    }
}

async fn manager_properties(
    call: &Call,
    wanted: String,
) -> Result<Option<HashMap<&'static str, Variant<'static>>>, super::Failure> {
    if wanted == super::OBJECT_MANAGER
        || super::properties::STANDARD_INTERFACES.contains(&wanted.as_str())
    {
        return Ok(Some(HashMap::new()));
    }
    if wanted != proto::MANAGER_INTERFACE {
        return Ok(None);
    }
    let (objects, pending, references, (kinds, states)) = call
        .shared
        .handle
        .read(|m| {
            (
                m.object_count(),
                m.pending_removals(),
                m.reference_count(),
                m.counts(),
            )
        })
        .await
        .map_err(from_owner)?;
    let by_name = |counts: Vec<(&'static str, u32)>| {
        Variant::from(
            counts
                .into_iter()
                .map(|(k, n)| (k.to_owned(), n))
                .collect::<HashMap<String, u32>>(),
        )
    };
    Ok(Some(HashMap::from([
        (
            "Version",
            Variant::from(env!("CARGO_PKG_VERSION").to_owned()),
        ),
        (
            "ObjectCount",
            Variant::from(u32::try_from(objects).unwrap_or(u32::MAX)),
        ),
        ("PendingRemovals", Variant::from(pending)),
        (
            "ReferenceCount",
            Variant::from(u32::try_from(references).unwrap_or(u32::MAX)),
        ),
        (
            "KindCounts",
            by_name(kinds.into_iter().map(|(k, n)| (k.as_str(), n)).collect()),
        ),
        (
            "StateCounts",
            by_name(states.into_iter().map(|(s, n)| (s.as_str(), n)).collect()),
        ),
    ])))
}

async fn add(call: &Call) -> Answer {
    let (kind, name, parent, mut options): (String, String, OwnedObjectPath, Options) =
        call.args()?;
    let header = call.header();
    let caller = call
        .shared
        .authz
        .allow(&call.conn, &header, Verb::Add)
        .await?;
    call.shared.writable()?;
    let kind: Kind = wire_name("kind", &kind)?;
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
    super::args::no_options(&options)?;
    request.added_by = Some(caller.holder.key);
    let id = call
        .shared
        .handle
        .call(move |m| m.add(request))
        .await
        .map_err(from_owner)?
        .map_err(from_engine);
    if let (Err(proto::Error::QuotaExceeded(why)), Some(sender)) = (&id, header.sender()) {
        call.shared.authz.peers.warn_once(sender, why);
    }
    call.reply(&(path_of(Some(id?)),)).await
}

async fn find(call: &Call) -> Answer {
    let (kind, name): (String, String) = call.args()?;
    let kind: Kind = wire_name("kind", &kind)?;
    let id = call
        .shared
        .handle
        .read(move |m| m.find(kind, &name))
        .await
        .map_err(from_owner)?
        .map_err(from_engine)?;
    call.reply(&(path_of(Some(id)),)).await
}

/// What the caller may do, verb by verb: `yes`, `challenge` (after
/// authenticating to polkit) or `no`. Changes nothing and asks nobody.
async fn permissions(call: &Call) -> Answer {
    let () = call.args()?;
    let header = call.header();
    let answer: HashMap<&str, &str> = call
        .shared
        .authz
        .permissions(&call.conn, &header)
        .await?
        .into_iter()
        .map(|(verb, permission)| (verb, permission.as_str()))
        .collect();
    call.reply(&(answer,)).await
}

/// One page entry: an object's path and its Object properties.
type Entry = (OwnedObjectPath, HashMap<&'static str, Variant<'static>>);

async fn list(call: &Call) -> Answer {
    use list_options as keys;
    let (mut options,): (Options,) = call.args()?;
    let cursor = optional_str(&mut options, keys::CURSOR)?.unwrap_or_default();
    let limit = optional_u32(&mut options, keys::LIMIT)?.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(proto::Error::InvalidArgument(format!(
            "option \"limit\": {limit} is not between 1 and {MAX_PAGE}"
        ))
        .into());
    }
    let kind = optional_str(&mut options, keys::KIND)?
        .map(|k| wire_name::<Kind>("kind", &k))
        .transpose()?;
    let state = optional_str(&mut options, keys::STATE)?
        .map(|s| wire_name::<State>("state", &s))
        .transpose()?;
    let origin = optional_str(&mut options, keys::ORIGIN)?
        .map(|o| wire_name::<Origin>("origin", &o))
        .transpose()?;
    let subtree = match options.remove(keys::SUBTREE) {
        None => None,
        Some(v) => {
            let path = OwnedObjectPath::try_from(v).map_err(|e| bad_option(keys::SUBTREE, e))?;
            Some(required(&path, keys::SUBTREE)?)
        }
    };
    let wanted = match options.remove(keys::PROPERTIES) {
        None => None,
        Some(v) => {
            let names = Vec::<String>::try_from(v).map_err(|e| bad_option(keys::PROPERTIES, e))?;
            if let Some(bad) = names
                .iter()
                .find(|n| !properties::OBJECT_PROPERTIES.contains(&n.as_str()))
            {
                return Err(proto::Error::InvalidArgument(format!(
                    "option \"properties\": no property {bad:?}"
                ))
                .into());
            }
            Some(names)
        }
    };
    super::args::no_options(&options)?;
    let budget = call.shared.holders_budget();
    // Half the bus's limit: a page is never near it.
    let page_bytes = call.shared.max_message / 2;
    let (objects, scoped, next) = call
        .shared
        .handle
        .read(move |m| {
            let query = Query {
                after: m.cursor(&cursor)?,
                max: limit as usize,
                kind,
                state,
                origin,
                subtree,
            };
            let mut used = 0;
            let page = m.page(&query, |info| {
                used += properties::object_size(info, budget);
                used <= page_bytes
            })?;
            let scoped: Vec<bool> = page.objects.iter().map(|o| is_scoped(m, o)).collect();
            Ok::<_, drivers::Error>((page.objects, scoped, cursor_of(page.next)))
        })
        .await
        .map_err(from_owner)?
        .map_err(from_engine)?;
    let entries: Vec<Entry> = objects
        .iter()
        .zip(scoped)
        .map(|(info, scoped)| {
            let mut props = match &wanted {
                None => properties::object_properties(info, budget),
                Some(names) => names
                    .iter()
                    .filter_map(|name| {
                        let name = properties::OBJECT_PROPERTIES
                            .iter()
                            .find(|p| **p == name.as_str())?;
                        properties::object_property(info, name, budget).map(|v| (*name, v))
                    })
                    .collect(),
            };
            props.insert("Scoped", Variant::from(scoped));
            (path_of(Some(info.id)), props)
        })
        .collect();
    call.reply(&(entries, next)).await
}

/// Whether an object of the other origin has the same kind and name (both
/// not `gone`): a client must then name it with its scope (`udev:host0`).
fn is_scoped(m: &drivers::Model, o: &ObjectInfo) -> bool {
    let other = match o.origin {
        Origin::Api => Origin::Udev,
        Origin::Udev => Origin::Api,
    };
    o.state != State::Gone && m.find_in(o.kind, other, &o.name).is_ok()
}

/// GetManagedObjects: every object, if they fit in one message.
async fn managed_objects(call: &Call) -> Answer {
    let budget = call.shared.holders_budget();
    let max = call.shared.max_message;
    let objects = call
        .shared
        .handle
        .read(move |m| everything_within(m, budget, max))
        .await
        .map_err(from_owner)?
        .map_err(|size| too_big(size, max))?;
    // Encoding tens of megabytes takes a while: not on the runtime's thread.
    let msg = call.msg.clone();
    let built = tokio::task::spawn_blocking(move || {
        wire::Body::managed_objects(&objects, budget)
            .build(Message::method_return(&msg.header()), wire::MANAGED_OBJECTS)
    })
    .await
    .map_err(|e| zbus::fdo::Error::Failed(format!("cannot build the reply: {e}")))?;
    call.send_reply(built).await
}

/// Every object's description, or (when they would not fit in `max`
/// bytes) how many bytes they were found to need before giving up. Stops
/// at the limit, so a million objects cost no more than the first 32 MiB.
fn everything_within(
    m: &drivers::Model,
    budget: usize,
    max: usize,
) -> Result<Vec<ObjectInfo>, usize> {
    let mut all = Vec::new();
    let mut used = 0;
    let mut query = Query {
        max: usize::MAX,
        ..Query::default()
    };
    loop {
        let page = m
            .page(&query, |info| {
                used += properties::object_size(info, budget) + 64;
                used <= max
            })
            .map_err(|_| used)?;
        if used > max {
            return Err(used);
        }
        all.extend(page.objects);
        match page.next {
            Some(next) => query.after = Some(next),
            None => return Ok(all),
        }
    }
}
