//! An object's properties as they go on the wire (Get, GetAll,
//! GetManagedObjects, ListObjects, InterfacesAdded), read from the model
//! when asked, never cached per object. `Holders` is bounded: it lists the
//! newest references up to a byte budget, and `RefCount` always says how
//! many there are (docs/contract.md, "Message sizes").

use std::collections::HashMap;

use drivers::{ObjectInfo, ReferenceInfo};
use proto::HolderTuple;
use zbus::Variant;

use super::args::path_of;

/// The standard interfaces every object has. They have no properties, and
/// InterfacesAdded and GetManagedObjects leave them out (as GDBus does):
/// listing them cost ~140 bytes an object, a fifth of a big reply.
pub const STANDARD_INTERFACES: [&str; 3] = [
    "org.freedesktop.DBus.Peer",
    "org.freedesktop.DBus.Introspectable",
    "org.freedesktop.DBus.Properties",
];

/// Every property of `org.devmgr.DevMgr1.Object`, in introspection order.
pub const OBJECT_PROPERTIES: [&str; 13] = [
    "Attributes",
    "Driver",
    "Holders",
    "Id",
    "Kind",
    "LastError",
    "Name",
    "Origin",
    "Parent",
    "RefCount",
    "State",
    "Subsystem",
    "SysPath",
];

/// One `Holders` entry.
pub fn holder_tuple(r: &ReferenceInfo) -> HolderTuple {
    (
        r.id.0,
        r.holder.bus_name.clone(),
        r.holder.uid,
        r.holder.pid,
        r.reason.to_string(),
        r.since,
    )
}

/// Bytes one `Holders` entry takes at most on the wire (a `(tsuust)`:
/// fixed fields, two strings with their lengths and NULs, alignment).
pub fn holder_size(r: &ReferenceInfo) -> usize {
    64 + r.holder.bus_name.len() + r.reason.len()
}

/// The `Holders` a client is shown: the newest references first, as many
/// as fit in `budget` bytes.
pub fn holders_within(holders: &[ReferenceInfo], budget: usize) -> Vec<HolderTuple> {
    holders_shown(holders, budget)
        .iter()
        .map(holder_tuple)
        .collect()
}

/// The references `Holders` lists within `budget` bytes: the newest. The
/// model lists them oldest first; the newest are the ones a client is
/// likeliest to be looking for, and they keep the model's order.
pub fn holders_shown(holders: &[ReferenceInfo], budget: usize) -> &[ReferenceInfo] {
    let mut used = 0;
    let shown = holders
        .iter()
        .rev()
        .take_while(|r| {
            used += holder_size(r);
            used <= budget
        })
        .count();
    &holders[holders.len() - shown..]
}

/// Bytes an object's properties take on the wire, holders included up to
/// `holders_budget`, estimated low (a plain LUN takes ~580 with its path):
/// it only decides when to stop early, the built message is what is
/// checked against the bus's limit.
pub fn object_size(info: &ObjectInfo, holders_budget: usize) -> usize {
    let holders: usize = info.holders.iter().map(holder_size).sum();
    let attributes: usize = info
        .attributes
        .iter()
        .map(|(k, v)| 24 + k.len() + v.len())
        .sum();
    // Each of the 13 entries: its name, a signature, alignment (~24 bytes),
    // the two object paths (~48 each) and the fixed-size values.
    440 + info.name.len()
        + info.sys_path.len()
        + info.subsystem.len()
        + info.last_error.len()
        + attributes
        + holders.min(holders_budget)
}

/// One property's value, or `None` if there is no such property.
pub fn object_property(
    info: &ObjectInfo,
    name: &str,
    holders_budget: usize,
) -> Option<Variant<'static>> {
    Some(match name {
        "Id" => Variant::from(info.id.0),
        "Kind" => Variant::from(info.kind.as_str().to_owned()),
        "Name" => Variant::from(info.name.to_string()),
        "State" => Variant::from(info.state.as_str().to_owned()),
        "Parent" => Variant::from(path_of(info.parent)),
        "Driver" => Variant::from(path_of(info.driver)),
        "RefCount" => Variant::from(u32::try_from(info.holders.len()).unwrap_or(u32::MAX)),
        "Holders" => Variant::from(holders_within(&info.holders, holders_budget)),
        "Attributes" => Variant::from(
            info.attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<String, String>>(),
        ),
        "Origin" => Variant::from(info.origin.as_str().to_owned()),
        "Subsystem" => Variant::from(info.subsystem.clone()),
        "SysPath" => Variant::from(info.sys_path.clone()),
        "LastError" => Variant::from(info.last_error.to_string()),
        _ => return None,
    })
}

/// Every property of an object (GetAll).
pub fn object_properties(
    info: &ObjectInfo,
    holders_budget: usize,
) -> HashMap<&'static str, Variant<'static>> {
    OBJECT_PROPERTIES
        .iter()
        .filter_map(|name| object_property(info, name, holders_budget).map(|v| (*name, v)))
        .collect()
}

/// An object's interfaces and their properties, as ObjectManager lists them,
/// built by zbus: what `wire` writes by hand, compared in its tests.
#[cfg(test)]
pub fn object_interfaces(
    info: &ObjectInfo,
    holders_budget: usize,
) -> HashMap<&'static str, HashMap<&'static str, Variant<'static>>> {
    HashMap::from([(
        proto::OBJECT_INTERFACE,
        object_properties(info, holders_budget),
    )])
}
