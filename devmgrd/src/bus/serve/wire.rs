//! Objects' descriptions marshalled by hand into D-Bus wire format, for the
//! messages that carry thousands of them: GetManagedObjects' reply and
//! InterfacesAdded. zbus builds these through a `HashMap` of `Variant`s per
//! object, which is most of what a 100,000-object publication costs the
//! daemon (docs/benchmarks.md, "Big models"); here one buffer is written
//! straight from the model's `ObjectInfo`, in the same layout zbus writes
//! (the unit tests compare the bytes).
//!
//! The layout is the D-Bus specification's, little-endian: every value is
//! aligned to its type's boundary counted from the body's start, which a
//! message puts on an 8-byte boundary.

use drivers::{ObjectInfo, ReferenceInfo};
use zbus::message::Builder;
use zbus::wire::Endian;
use zbus::Message;

use super::args::path_of;

/// The signature of GetManagedObjects' reply.
pub const MANAGED_OBJECTS: &str = "a{oa{sa{sv}}}";
/// The signature of InterfacesAdded.
pub const INTERFACES_ADDED: &str = "oa{sa{sv}}";

/// A body being written. Strings with a NUL byte, which D-Bus forbids and
/// the bus would disconnect us for, make the whole body unbuildable.
#[derive(Default)]
pub struct Body {
    bytes: Vec<u8>,
    has_nul: bool,
}

impl Body {
    pub fn with_capacity(n: usize) -> Self {
        Body {
            bytes: Vec::with_capacity(n),
            has_nul: false,
        }
    }

    fn align(&mut self, to: usize) {
        let pad = self.bytes.len().next_multiple_of(to) - self.bytes.len();
        self.bytes.extend(std::iter::repeat_n(0, pad));
    }

    fn u32(&mut self, v: u32) {
        self.align(4);
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.align(8);
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }

    /// A string or an object path (`s`, `o`).
    fn str(&mut self, s: &str) {
        self.has_nul |= s.as_bytes().contains(&0);
        self.u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        self.bytes.extend_from_slice(s.as_bytes());
        self.bytes.push(0);
    }

    /// A signature (`g`), as a variant's type: always one of ours.
    fn signature(&mut self, s: &'static str) {
        self.bytes.push(s.len() as u8);
        self.bytes.extend_from_slice(s.as_bytes());
        self.bytes.push(0);
    }

    /// An array whose elements align to `element_align`, written by `f`.
    /// Its length counts the elements' bytes, not the padding before them.
    fn array(&mut self, element_align: usize, f: impl FnOnce(&mut Self)) {
        self.u32(0);
        let at = self.bytes.len() - 4;
        self.align(element_align);
        let start = self.bytes.len();
        f(self);
        let len = u32::try_from(self.bytes.len() - start).unwrap_or(u32::MAX);
        self.bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// A `{sv}` entry whose value has the variant type `signature`.
    fn property(&mut self, name: &str, signature: &'static str, value: impl FnOnce(&mut Self)) {
        self.align(8);
        self.str(name);
        self.signature(signature);
        value(self);
    }

    fn str_property(&mut self, name: &str, value: &str) {
        self.property(name, "s", |b| b.str(value));
    }

    fn path_property(&mut self, name: &str, id: Option<drivers::ObjectId>) {
        self.property(name, "o", |b| b.str(path_of(id).as_str()));
    }

    /// An object's `a{sa{sv}}`: its one interface and every property, in
    /// the order of `properties::OBJECT_PROPERTIES`, `Holders` bounded as
    /// `properties::holders_within` bounds it.
    pub fn object_interfaces(&mut self, info: &ObjectInfo, holders_budget: usize) {
        self.array(8, |b| {
            b.align(8);
            b.str(proto::OBJECT_INTERFACE);
            b.array(8, |b| b.object_properties(info, holders_budget));
        });
    }

    fn object_properties(&mut self, info: &ObjectInfo, holders_budget: usize) {
        self.property("Attributes", "a{ss}", |b| {
            b.array(8, |b| {
                for (k, v) in &info.attributes {
                    b.align(8);
                    b.str(k);
                    b.str(v);
                }
            })
        });
        self.path_property("Driver", info.driver);
        let shown = super::properties::holders_shown(&info.holders, holders_budget);
        self.property("Holders", "a(tsuust)", |b| {
            b.array(8, |b| shown.iter().for_each(|r| b.holder(r)))
        });
        self.property("Id", "t", |b| b.u64(info.id.0));
        self.str_property("Kind", info.kind.as_str());
        self.str_property("LastError", &info.last_error);
        self.str_property("Name", &info.name);
        self.str_property("Origin", info.origin.as_str());
        self.path_property("Parent", info.parent);
        self.property("RefCount", "u", |b| b.u32(info.ref_count()));
        self.str_property("State", info.state.as_str());
        self.str_property("Subsystem", &info.subsystem);
        self.str_property("SysPath", &info.sys_path);
    }

    fn holder(&mut self, r: &ReferenceInfo) {
        self.u64(r.id.0);
        self.str(&r.holder.bus_name);
        self.u32(r.holder.uid);
        self.u32(r.holder.pid);
        self.str(&r.reason);
        self.u64(r.since);
    }

    /// GetManagedObjects' body: every object in `objects`.
    pub fn managed_objects(objects: &[ObjectInfo], holders_budget: usize) -> Self {
        let estimate: usize = objects
            .iter()
            .map(|o| super::properties::object_size(o, holders_budget) + 160)
            .sum();
        let mut body = Body::with_capacity(estimate + 8);
        body.array(8, |b| {
            for info in objects {
                b.align(8);
                b.str(path_of(Some(info.id)).as_str());
                b.object_interfaces(info, holders_budget);
            }
        });
        body
    }

    /// InterfacesAdded's body for one object.
    pub fn interfaces_added(info: &ObjectInfo, holders_budget: usize) -> Self {
        let mut body =
            Body::with_capacity(super::properties::object_size(info, holders_budget) + 256);
        body.str(path_of(Some(info.id)).as_str());
        body.object_interfaces(info, holders_budget);
        body
    }

    /// The message around this body, of signature `signature`.
    pub fn build(self, builder: Builder<'_>, signature: &'static str) -> zbus::Result<Message> {
        if self.has_nul {
            return Err(zbus::Error::Failure(
                "a string holds a NUL byte, which D-Bus cannot carry".into(),
            ));
        }
        let builder = builder.endian(Endian::Little);
        // SAFETY: the bytes are a well-formed little-endian body of
        // `signature`, as the builder was told: every value is written
        // aligned, arrays carry their lengths, strings their NULs and no
        // other (checked above), and the unit tests compare the bytes with
        // zbus's own serialization of the same values. No fds.
        #[allow(unsafe_code)]
        unsafe {
            builder.build_raw_body(&self.bytes, signature, Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::sync::Arc;

    use drivers::{Holder, Kind, ObjectId, Origin, RefId, State};
    use zbus::{OwnedObjectPath, OwnedVariant};

    use super::*;
    use crate::bus::serve::properties;

    fn object(id: u64, holders: usize, attributes: &[(&str, &str)]) -> ObjectInfo {
        let holder = Arc::new(Holder {
            key: 7,
            bus_name: ":1.42".into(),
            uid: 1000,
            pid: 4242,
        });
        ObjectInfo {
            id: ObjectId(id),
            kind: Kind::Device,
            name: format!("0:0:0:{id} é").into(),
            state: State::Removing,
            parent: Some(ObjectId(3)),
            driver: if id.is_multiple_of(2) {
                Some(ObjectId(1))
            } else {
                None
            },
            holders: (0..holders)
                .map(|i| ReferenceInfo {
                    id: RefId(i as u64 + 1),
                    kernel: None,
                    object: ObjectId(id),
                    holder: holder.clone(),
                    reason: format!("reason {i} {}", "x".repeat(i % 5)).into(),
                    since: 1_700_000_000_000_000 + i as u64,
                })
                .collect(),
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            origin: Origin::Udev,
            subsystem: "block".into(),
            sys_path: format!("/devices/virtual/block/loop{id}"),
            last_error: if id.is_multiple_of(3) {
                ""
            } else {
                "it failed"
            }
            .into(),
            scanned: false,
        }
    }

    fn objects() -> Vec<ObjectInfo> {
        vec![
            object(2, 0, &[]),
            object(3, 1, &[("scsi.lun", "0")]),
            object(4, 5, &[("a", ""), ("b", "ü"), ("scsi.host", "12")]),
            object(5, 2, &[]),
        ]
    }

    type Interfaces = HashMap<String, HashMap<String, OwnedVariant>>;

    /// What zbus writes for the same objects, every map in the order the
    /// hand-written body uses (the model's: sorted), so the bytes compare.
    fn by_zbus(objects: &[ObjectInfo], budget: usize) -> Message {
        // A vector of pairs: an `a(oa{sa{sv}})`, the same bytes as the
        // dictionary (entries and structs both align to 8), in this order.
        let body: Vec<(OwnedObjectPath, _)> = objects
            .iter()
            .map(|o| {
                let props: BTreeMap<&str, zbus::Variant<'_>> = properties::OBJECT_PROPERTIES
                    .iter()
                    .map(|name| {
                        let value = match *name {
                            "Attributes" => zbus::Variant::from(o.attributes.clone()),
                            _ => properties::object_property(o, name, budget).unwrap(),
                        };
                        (*name, value)
                    })
                    .collect();
                (
                    path_of(Some(o.id)),
                    BTreeMap::from([(proto::OBJECT_INTERFACE, props)]),
                )
            })
            .collect();
        Message::signal("/t", "org.t", "T")
            .endian(Endian::Little)
            .build(&(body,))
            .unwrap()
    }

    fn by_hand(objects: &[ObjectInfo], budget: usize) -> Message {
        Body::managed_objects(objects, budget)
            .build(Message::signal("/t", "org.t", "T"), MANAGED_OBJECTS)
            .unwrap()
    }

    fn decoded(m: &Message) -> HashMap<OwnedObjectPath, Interfaces> {
        m.body().deserialize().unwrap()
    }

    #[test]
    fn managed_objects_are_what_zbus_writes() {
        for budget in [usize::MAX, 200, 0] {
            let (hand, zbus) = (by_hand(&objects(), budget), by_zbus(&objects(), budget));
            // The values, against the maps Get and GetAll serve.
            let served: HashMap<OwnedObjectPath, _> = objects()
                .iter()
                .map(|o| {
                    (
                        path_of(Some(o.id)),
                        properties::object_interfaces(o, budget),
                    )
                })
                .collect();
            let served = Message::signal("/t", "org.t", "T")
                .build(&(served,))
                .unwrap();
            assert_eq!(decoded(&hand), decoded(&served));
            assert_eq!(hand.body().data().bytes(), zbus.body().data().bytes());
        }
        let none = by_hand(&[], usize::MAX);
        assert!(decoded(&none).is_empty());
        assert_eq!(
            none.body().data().bytes(),
            by_zbus(&[], usize::MAX).body().data().bytes()
        );
    }

    #[test]
    fn one_object_is_written_as_zbus_writes_it() {
        // One object, one holder and one attribute: no map has two entries
        // to order, so the bytes themselves must be zbus's.
        let o = object(8, 1, &[("k", "v")]);
        let hand = Body::interfaces_added(&o, usize::MAX)
            .build(Message::signal("/t", "org.t", "T"), INTERFACES_ADDED)
            .unwrap();
        let (path, interfaces): (OwnedObjectPath, Interfaces) = hand.body().deserialize().unwrap();
        assert_eq!(path, path_of(Some(o.id)));
        let props = &interfaces[proto::OBJECT_INTERFACE];
        assert_eq!(props.len(), properties::OBJECT_PROPERTIES.len());
        for name in properties::OBJECT_PROPERTIES {
            let want = properties::object_property(&o, name, usize::MAX).unwrap();
            assert_eq!(
                props[name],
                OwnedVariant::try_from(want).unwrap(),
                "{name} differs"
            );
        }
        let mut sorted = BTreeMap::new();
        for name in properties::OBJECT_PROPERTIES {
            sorted.insert(
                name,
                properties::object_property(&o, name, usize::MAX).unwrap(),
            );
        }
        let zbus = Message::signal("/t", "org.t", "T")
            .endian(Endian::Little)
            .build(&(
                path_of(Some(o.id)),
                BTreeMap::from([(proto::OBJECT_INTERFACE, sorted)]),
            ))
            .unwrap();
        assert_eq!(hand.body().data().bytes(), zbus.body().data().bytes());
    }

    #[test]
    fn a_nul_in_a_string_refuses_the_body() {
        let mut o = object(9, 0, &[]);
        o.name = "bad\0name".into();
        let built = Body::interfaces_added(&o, usize::MAX)
            .build(Message::signal("/t", "org.t", "T"), INTERFACES_ADDED);
        assert!(built.is_err());
    }
}
