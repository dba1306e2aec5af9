//! The device model: objects in a slab arena addressed by never-reused ids,
//! their tree links, driver bindings and references; read-only queries; and
//! a from-scratch recount of every derived count (`check_invariants`).
//!
//! Lifecycle operations live in `lifecycle/`, one family to a file; this
//! file owns the storage and the bookkeeping that keeps links and counts
//! consistent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proto::{Kind, OnTimeout, Origin, State};
use rustc_hash::FxHashMap;
use slab::Slab;

use crate::driver::{ImplId, ObjectView, Registry};
use crate::error::{Error, Result};
use crate::event::{Effect, Event};
use crate::ids::{slot_of, Counter, Micros, ObjectId, RefId, RequestId};
use crate::kernel_users::KernelUse;

/// Slab key of an object or reference. `u32` keeps per-object links small.
pub(crate) type Key = u32;
/// "No key" in a `Key` field.
pub(crate) const NONE: Key = Key::MAX;

/// Index of a name scope in [`Model::names`]: names are unique per kind
/// within each origin, so an API-added `host0` and the machine's own `host0`
/// are two objects (rule 20: a client never takes a name from the machine,
/// and a real device is modelled whatever clients added; docs/kernel-users.md, "Names").
pub(crate) fn name_slot(kind: Kind, origin: Origin) -> usize {
    let kind = match kind {
        Kind::Driver => 0,
        Kind::Host => 1,
        Kind::Device => 2,
    };
    match origin {
        Origin::Api => kind,
        Origin::Udev => 3 + kind,
    }
}

/// What qualifies a name with its scope: `api:host0`, `udev:host0`.
pub(crate) fn scope_prefix(origin: Origin) -> &'static str {
    match origin {
        Origin::Api => "api:",
        Origin::Udev => "udev:",
    }
}

/// Administrative state set by add, stop and re-enable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admin {
    Live,
    Stopped,
}

/// Who holds a reference. The daemon shares one `Holder` among all the
/// references of one client connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Holder {
    /// Opaque key the caller chooses (the daemon: its connection id).
    pub key: u64,
    /// The holder's bus name (or another label a person can read).
    pub bus_name: String,
    /// The holder's uid.
    pub uid: u32,
    /// The holder's pid.
    pub pid: u32,
}

/// A reference as the outside world sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferenceInfo {
    /// The reference's id.
    pub id: RefId,
    /// For a user the kernel knows (rule 17), what kind it is; `None` for
    /// a client's reference.
    pub kernel: Option<KernelUse>,
    /// The object it is on.
    pub object: ObjectId,
    /// Who holds it.
    pub holder: Arc<Holder>,
    /// Why (the holder's own words).
    pub reason: Arc<str>,
    /// When it was taken.
    pub since: Micros,
}

/// A consistent description of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Its identity.
    pub id: ObjectId,
    /// What it is.
    pub kind: Kind,
    /// Its name (unique per kind among objects that are not `gone`).
    pub name: Arc<str>,
    /// Its visible state.
    pub state: State,
    /// Its parent, if any.
    pub parent: Option<ObjectId>,
    /// The driver it is bound to, if any.
    pub driver: Option<ObjectId>,
    /// The references held on it.
    pub holders: Vec<ReferenceInfo>,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
    /// Where it came from.
    pub origin: Origin,
    /// Its kernel subsystem ("" for API objects).
    pub subsystem: String,
    /// Its sysfs path ("" for API objects).
    pub sys_path: String,
    /// The last driver action's error ("" when it succeeded).
    pub last_error: Arc<str>,
    /// Made by its parent's driver (a probe's scan).
    pub scanned: bool,
}

impl ObjectInfo {
    /// How many references are held on it.
    pub fn ref_count(&self) -> u32 {
        u32::try_from(self.holders.len()).unwrap_or(u32::MAX)
    }
}

/// Rarely-set fields, boxed so that a plain device stays small.
#[derive(Debug, Default)]
pub(crate) struct Extra {
    pub(crate) subsystem: String,
    pub(crate) sys_path: String,
    pub(crate) last_error: Arc<str>,
    /// For a driver: the objects bound to it.
    pub(crate) bound: Vec<Key>,
    /// For a driver: the implementation behind it.
    pub(crate) implementation: Option<ImplId>,
    /// The client that added it, while a per-client quota is counted.
    pub(crate) added_by: Option<u64>,
    /// How many children ride on this object's removal: the kernel takes
    /// them away with it (a disk's partitions), so they do not keep it busy.
    pub(crate) riders: u32,
    /// It rides on its parent's removal (its own exit is "with its parent").
    pub(crate) riding: bool,
}

#[derive(Debug)]
// `repr(C)` keeps the fields that acquire and release touch (id, the
// pending markers, parent, the reference list, the state flags) together at
// the front, in one cache line: at a million objects that line is a miss to
// DRAM on every call, and the compiler's own order spread them over three.
#[repr(C)]
pub(crate) struct Object {
    pub(crate) id: ObjectId,
    /// The pending removal this object is part of.
    pub(crate) removal: Option<RequestId>,
    /// The pending driver removal that holds this bound object back.
    pub(crate) unbind_hold: Option<RequestId>,
    pub(crate) parent: Key,
    /// Head of the intrusive list of references on this object (through
    /// `Reference::next`), so taking one allocates nothing per object.
    pub(crate) ref_head: Key,
    pub(crate) ref_count: u32,
    pub(crate) admin: Admin,
    /// The kernel removed the real thing while it was referenced.
    pub(crate) gone: bool,
    /// A driver exit is in flight; the object goes when it completes.
    pub(crate) exiting: bool,
    /// Created by its parent's driver probe (torn down when that driver lets go).
    pub(crate) scanned: bool,
    pub(crate) kind: Kind,
    pub(crate) origin: Origin,
    /// The driver implementation that tears this object down, if any.
    pub(crate) handler: Option<ImplId>,
    pub(crate) pos_in_parent: u32,
    /// How many children are `scanned` and not yet let go of.
    pub(crate) scanned_children: u32,
    pub(crate) driver: Key,
    pub(crate) pos_in_driver: u32,
    pub(crate) name: Arc<str>,
    pub(crate) children: Vec<Key>,
    pub(crate) attributes: crate::Attributes,
    pub(crate) extra: Option<Box<Extra>>,
}

impl Object {
    /// The visible state, derived from the administrative state and what is pending.
    pub(crate) fn state(&self) -> State {
        if self.gone {
            State::Gone
        } else if self.removal.is_some() {
            State::Removing
        } else if self.admin == Admin::Stopped || self.unbind_hold.is_some() {
            State::Stopped
        } else {
            State::Live
        }
    }

    pub(crate) fn bound(&self) -> &[Key] {
        self.extra.as_deref().map_or(&[], |e| &e.bound)
    }

    /// Idle: no references (the kernel's users included), no children but
    /// those riding on its removal, nothing bound (DESIGN.md §2).
    pub(crate) fn is_idle(&self) -> bool {
        self.ref_count == 0
            && self.bound().is_empty()
            && (self.children.is_empty() || self.children.len() == self.riders() as usize)
    }

    /// How many children ride on its removal.
    pub(crate) fn riders(&self) -> u32 {
        self.extra.as_deref().map_or(0, |e| e.riders)
    }

    /// Whether it rides on its parent's removal.
    pub(crate) fn riding(&self) -> bool {
        self.extra.as_deref().is_some_and(|e| e.riding)
    }

    pub(crate) fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    pub(crate) fn view(&self) -> ObjectView<'_> {
        let extra = self.extra.as_deref();
        ObjectView {
            id: self.id,
            kind: self.kind,
            name: &self.name,
            attributes: &self.attributes,
            origin: self.origin,
            subsystem: extra.map_or("", |e| &e.subsystem),
            sys_path: extra.map_or("", |e| &e.sys_path),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Reference {
    pub(crate) id: RefId,
    pub(crate) object: Key,
    pub(crate) prev: Key,
    pub(crate) next: Key,
    pub(crate) holder: Arc<Holder>,
    pub(crate) reason: Arc<str>,
    pub(crate) since: Micros,
    /// A user the kernel knows (rule 17): never revoked by force.
    pub(crate) kernel: Option<KernelUse>,
}

/// A pending removal request.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub(crate) root: Key,
    pub(crate) deadline: Option<(Micros, OnTimeout)>,
}

/// The device model and lifecycle engine. Pure and synchronous: it performs
/// no I/O, owns no clock and never sleeps. Every operation appends events
/// (and, for real hardware, effects) that the caller drains.
#[derive(Debug)]
pub struct Model {
    /// Objects; an object id's low bits are its slot here.
    pub(crate) objects: Slab<Object>,
    /// Name index per kind and scope (see [`name_slot`]) over objects
    /// that are not `gone`.
    pub(crate) names: [FxHashMap<Arc<str>, Key>; 6],
    /// References; a reference id's low bits are its slot here.
    pub(crate) refs: Slab<Reference>,
    pub(crate) requests: FxHashMap<RequestId, Request>,
    pub(crate) deadlines: BTreeSet<(Micros, RequestId)>,
    pub(crate) next_object: Counter,
    pub(crate) next_ref: Counter,
    pub(crate) next_request: Counter,
    /// Objects whose visible state is `removing`.
    pub(crate) pending: u32,
    pub(crate) registry: Registry,
    pub(crate) events: Vec<Event>,
    pub(crate) effects: Vec<Effect>,
    /// Objects that may have become idle or free during the current
    /// operation (drivers that lost a binding, hosts whose scanned devices
    /// went); settled at its end, since settling mid-walk could change an
    /// object the walk has yet to visit.
    pub(crate) deferred: Vec<(Key, ObjectId)>,
    /// The removal whose cascade is walking the tree right now, if any: a
    /// partition met there rides on its parent, which the walk marks next.
    pub(crate) walking: Option<RequestId>,
    /// Most references one holder (by [`Holder::key`]) may have, if limited.
    pub(crate) reference_quota: Option<u32>,
    /// References per holder key; kept only while a quota is set, so the
    /// unlimited engine pays nothing for it.
    pub(crate) held_by: FxHashMap<u64, u32>,
    /// Most references one user (by uid) may have, if limited.
    pub(crate) user_reference_quota: Option<u32>,
    /// Users the per-user quota does not apply to.
    pub(crate) quota_exempt: Vec<u32>,
    /// References per uid; kept only while that quota is set.
    pub(crate) held_by_user: FxHashMap<u32, u32>,
    /// Most references (the kernel's users aside) all holders together may
    /// have, if limited: the daemon's file descriptors less a reserve.
    pub(crate) reference_limit: Option<usize>,
    /// References held, the kernel's users aside.
    pub(crate) api_references: usize,
    /// Most objects the model may hold when a client adds more, if limited.
    pub(crate) object_limit: Option<usize>,
    /// Most objects one client may have added (still present), if limited.
    pub(crate) added_quota: Option<u32>,
    /// Objects still present per client that added them (with a quota only).
    pub(crate) added_count: FxHashMap<u64, u32>,
    /// Every object's id in the order added, which is id order; removed
    /// ones are dropped in bulk (`listing.rs`).
    pub(crate) in_order: Vec<ObjectId>,
    /// How many ids in `in_order` name removed objects.
    pub(crate) gone_from_order: usize,
}

impl Default for Model {
    fn default() -> Self {
        Self::new(Registry::builtin())
    }
}

impl Model {
    /// An empty model using these driver implementations.
    pub fn new(registry: Registry) -> Self {
        Self::with_sequence_after(registry, 0)
    }

    /// An empty model whose object ids are built from sequence numbers after
    /// `last_sequence` (for a daemon restoring state, so that ids stay unique
    /// across restarts: persist [`Model::object_sequence`]).
    pub fn with_sequence_after(registry: Registry, last_sequence: u64) -> Self {
        Model {
            objects: Slab::new(),
            names: Default::default(),
            refs: Slab::new(),
            requests: FxHashMap::default(),
            deadlines: BTreeSet::new(),
            next_object: Counter::starting_after(last_sequence),
            next_ref: Counter::starting_after(0),
            next_request: Counter::starting_after(0),
            pending: 0,
            registry,
            events: Vec::new(),
            effects: Vec::new(),
            deferred: Vec::new(),
            walking: None,
            reference_quota: None,
            held_by: FxHashMap::default(),
            user_reference_quota: None,
            quota_exempt: Vec::new(),
            held_by_user: FxHashMap::default(),
            reference_limit: None,
            api_references: 0,
            object_limit: None,
            added_quota: None,
            added_count: FxHashMap::default(),
            in_order: Vec::new(),
            gone_from_order: 0,
        }
    }

    /// Limits how many objects the model may hold when a client adds one
    /// (with what its driver scans); real devices are modelled regardless.
    pub fn set_object_limit(&mut self, limit: Option<usize>) {
        self.object_limit = limit;
    }

    /// Limits how many objects one client (`AddRequest::added_by`) may have
    /// added and still present; set it before any are added.
    pub fn set_added_quota(&mut self, quota: Option<u32>) {
        self.added_quota = quota;
    }

    /// Limits how many references one holder (one client connection, for
    /// the daemon) may have at once; `None` lifts the limit. Past it,
    /// `acquire` is refused with `QuotaExceeded` and changes nothing.
    pub fn set_reference_quota(&mut self, quota: Option<u32>) {
        self.reference_quota = quota;
        self.held_by.clear();
        if quota.is_some() {
            // The kernel's users are nobody's quota (found by the fuzzer).
            for (_, r) in self.refs.iter().filter(|(_, r)| r.kernel.is_none()) {
                *self.held_by.entry(r.holder.key).or_insert(0) += 1;
            }
        }
    }

    /// Limits how many references one user (one uid, over all its
    /// connections) may have at once; `None` lifts the limit. Past it,
    /// `acquire` is refused with `QuotaExceeded` and changes nothing. The
    /// users in `exempt` (the daemon: root and itself) are held only to
    /// the limit in all.
    pub fn set_user_reference_quota(&mut self, quota: Option<u32>, exempt: &[u32]) {
        self.user_reference_quota = quota;
        self.quota_exempt = exempt.to_vec();
        self.held_by_user.clear();
        if quota.is_some() {
            for (_, r) in self.refs.iter().filter(|(_, r)| r.kernel.is_none()) {
                *self.held_by_user.entry(r.holder.uid).or_insert(0) += 1;
            }
        }
    }

    /// Limits how many references all holders together may have (the
    /// kernel's users are never refused and never counted); `None` lifts
    /// the limit. Past it, `acquire` is refused with `QuotaExceeded`.
    pub fn set_reference_limit(&mut self, limit: Option<usize>) {
        self.reference_limit = limit;
    }

    /// Takes the events produced since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Takes the effects produced since the last call, oldest first.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Discards pending events and effects, keeping their buffers (benchmarks).
    pub fn clear_outputs(&mut self) {
        self.events.clear();
        self.effects.clear();
    }

    /// How many objects exist (in any state).
    pub fn object_count(&self) -> usize {
        self.objects.len()
    }

    /// How many objects are visibly `removing`.
    pub fn pending_removals(&self) -> u32 {
        self.pending
    }

    /// How many references are held in all.
    pub fn reference_count(&self) -> usize {
        self.refs.len()
    }

    /// The sequence number of the last object id handed out (persist it so
    /// that ids are never reused across restarts).
    pub fn object_sequence(&self) -> u64 {
        self.next_object.last()
    }

    /// The earliest pending deadline, for the caller's timer.
    pub fn next_deadline(&self) -> Option<Micros> {
        self.deadlines.first().map(|(t, _)| *t)
    }

    pub(crate) fn key(&self, id: ObjectId) -> Result<Key> {
        let slot = slot_of(id.0);
        match self.objects.get(slot as usize) {
            Some(o) if o.id == id => Ok(slot),
            _ => Err(Error::not_found(format!("no object with id {id}"))),
        }
    }

    pub(crate) fn ref_key(&self, id: RefId) -> Result<Key> {
        let slot = slot_of(id.0);
        match self.refs.get(slot as usize) {
            Some(r) if r.id == id => Ok(slot),
            _ => Err(Error::not_found(format!("no reference with id {id}"))),
        }
    }

    /// The slots of the references on `key`, newest first.
    pub(crate) fn ref_keys(&self, key: Key) -> Vec<Key> {
        let mut out = Vec::with_capacity(self.obj(key).ref_count as usize);
        let mut r = self.obj(key).ref_head;
        while r != NONE {
            out.push(r);
            r = self.refs[r as usize].next;
        }
        out
    }

    pub(crate) fn obj(&self, key: Key) -> &Object {
        &self.objects[key as usize]
    }

    pub(crate) fn obj_mut(&mut self, key: Key) -> &mut Object {
        &mut self.objects[key as usize]
    }

    pub(crate) fn id_of(&self, key: Key) -> Option<ObjectId> {
        (key != NONE).then(|| self.obj(key).id)
    }

    /// The visible state of an object.
    pub fn state(&self, id: ObjectId) -> Result<State> {
        Ok(self.obj(self.key(id)?).state())
    }

    /// Whether an object with this id exists now.
    pub fn contains(&self, id: ObjectId) -> bool {
        self.key(id).is_ok()
    }

    /// The removal request an object is part of (for tests and diagnostics).
    pub fn removal_request(&self, id: ObjectId) -> Result<Option<RequestId>> {
        Ok(self.obj(self.key(id)?).removal)
    }

    /// The object of this kind with this name (among objects not `gone`).
    /// A name qualified with its scope (`api:host0`, `udev:host0`) names the
    /// object of that origin; a plain name names the API-added object if
    /// there is one, else the machine's: a client that added `host0` on a
    /// machine with a real `host0` acts on its own (docs/kernel-users.md, "Names").
    pub fn find(&self, kind: Kind, name: &str) -> Result<ObjectId> {
        for origin in [Origin::Api, Origin::Udev] {
            if let Some(plain) = name.strip_prefix(scope_prefix(origin)) {
                return self.find_in(kind, origin, plain);
            }
        }
        self.find_in(kind, Origin::Api, name)
            .or_else(|_| self.find_in(kind, Origin::Udev, name))
            .map_err(|_| Error::not_found(format!("no {kind} named {name:?}")))
    }

    /// The object of this kind and origin with this name.
    pub fn find_in(&self, kind: Kind, origin: Origin, name: &str) -> Result<ObjectId> {
        self.names[name_slot(kind, origin)]
            .get(name)
            .map(|&k| self.obj(k).id)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no {kind} named {name:?} among the {} objects",
                    origin.as_str()
                ))
            })
    }

    /// A description of one object.
    pub fn get(&self, id: ObjectId) -> Result<ObjectInfo> {
        Ok(self.info(self.key(id)?))
    }

    /// The references held on one object, oldest first.
    pub fn holders(&self, id: ObjectId) -> Result<Vec<ReferenceInfo>> {
        Ok(self.reference_infos(self.key(id)?))
    }

    /// A reference's description.
    pub fn reference(&self, id: RefId) -> Result<ReferenceInfo> {
        Ok(self.ref_info(self.ref_key(id)?))
    }

    /// The ids of an object's children.
    pub fn children(&self, id: ObjectId) -> Result<Vec<ObjectId>> {
        let o = self.obj(self.key(id)?);
        Ok(o.children.iter().map(|&c| self.obj(c).id).collect())
    }

    /// Every object, in id order: a consistent snapshot.
    pub fn list(&self) -> Vec<ObjectInfo> {
        let mut all: Vec<ObjectInfo> = self
            .objects
            .iter()
            .map(|(k, _)| self.info(k as Key))
            .collect();
        all.sort_by_key(|o| o.id);
        all
    }

    pub(crate) fn ref_info(&self, key: Key) -> ReferenceInfo {
        let r = &self.refs[key as usize];
        ReferenceInfo {
            id: r.id,
            kernel: r.kernel,
            object: self.obj(r.object).id,
            holder: Arc::clone(&r.holder),
            reason: Arc::clone(&r.reason),
            since: r.since,
        }
    }

    pub(crate) fn reference_infos(&self, key: Key) -> Vec<ReferenceInfo> {
        let mut v: Vec<ReferenceInfo> = self
            .ref_keys(key)
            .into_iter()
            .map(|r| self.ref_info(r))
            .collect();
        v.sort_by_key(|r| r.id);
        v
    }

    pub(crate) fn info(&self, key: Key) -> ObjectInfo {
        let o = self.obj(key);
        let extra = o.extra.as_deref();
        ObjectInfo {
            id: o.id,
            kind: o.kind,
            name: Arc::clone(&o.name),
            state: o.state(),
            parent: self.id_of(o.parent),
            driver: self.id_of(o.driver),
            holders: self.reference_infos(key),
            attributes: o.attributes.to_map(),
            origin: o.origin,
            subsystem: extra.map_or_else(String::new, |e| e.subsystem.clone()),
            sys_path: extra.map_or_else(String::new, |e| e.sys_path.clone()),
            last_error: extra.map_or_else(|| Arc::from(""), |e| Arc::clone(&e.last_error)),
            scanned: o.scanned,
        }
    }

    /// Checks every link and derived count against a recount from scratch.
    /// Cost is linear in the model; meant for tests and debug assertions.
    pub fn check_invariants(&self) -> std::result::Result<(), String> {
        if self.added_quota.is_some() {
            let mut added: FxHashMap<u64, u32> = FxHashMap::default();
            for (_, o) in self.objects.iter() {
                if let Some(by) = o.extra.as_deref().and_then(|e| e.added_by) {
                    *added.entry(by).or_insert(0) += 1;
                }
            }
            if added != self.added_count {
                return Err("objects per adding client do not match a recount".into());
            }
        }
        let api = self.refs.iter().filter(|(_, r)| r.kernel.is_none()).count();
        if api != self.api_references {
            return Err("references held do not match a recount".into());
        }
        if self.user_reference_quota.is_some() {
            let mut held: FxHashMap<u32, u32> = FxHashMap::default();
            for (_, r) in self.refs.iter().filter(|(_, r)| r.kernel.is_none()) {
                *held.entry(r.holder.uid).or_insert(0) += 1;
            }
            if held != self.held_by_user {
                return Err("references per user do not match a recount".into());
            }
        }
        if self.reference_quota.is_some() {
            let mut held: FxHashMap<u64, u32> = FxHashMap::default();
            for (_, r) in self.refs.iter().filter(|(_, r)| r.kernel.is_none()) {
                *held.entry(r.holder.key).or_insert(0) += 1;
            }
            if held != self.held_by {
                return Err("references per holder do not match a recount".into());
            }
        }
        if self.in_order.windows(2).any(|w| w[0] >= w[1]) {
            return Err("the listing order is not id order".into());
        }
        let listed = self
            .in_order
            .iter()
            .filter(|id| self.contains(**id))
            .count();
        if listed != self.objects.len() || self.in_order.len() - listed != self.gone_from_order {
            return Err("the listing order does not hold every object once".into());
        }
        let mut pending = 0u32;
        let mut total_refs = 0usize;
        let mut seen_names = 0usize;
        for (k, o) in self.objects.iter() {
            let k = k as Key;
            if slot_of(o.id.0) != k {
                return Err(format!("object {} is not in the slot its id names", o.id));
            }
            if o.id.0 >> crate::ids::SLOT_BITS > self.next_object.last() {
                return Err(format!("object {} beyond the id counter", o.id));
            }
            if o.state() == State::Removing {
                pending += 1;
            }
            if o.gone {
                if o.removal.is_some() || o.unbind_hold.is_some() {
                    return Err(format!("gone object {} still pending", o.id));
                }
            } else {
                seen_names += 1;
                if self.names[name_slot(o.kind, o.origin)].get(&o.name) != Some(&k) {
                    return Err(format!("object {} not indexed by name", o.id));
                }
            }
            if o.parent != NONE {
                let p = self
                    .objects
                    .get(o.parent as usize)
                    .ok_or("dangling parent")?;
                if p.children.get(o.pos_in_parent as usize) != Some(&k) {
                    return Err(format!("object {} misplaced in its parent", o.id));
                }
            }
            for (i, &c) in o.children.iter().enumerate() {
                let child = self.objects.get(c as usize).ok_or("dangling child")?;
                if child.parent != k || child.pos_in_parent as usize != i {
                    return Err(format!("child link of {} broken", o.id));
                }
            }
            let scanned = o
                .children
                .iter()
                .filter(|&&c| {
                    let c = self.obj(c);
                    c.scanned && !c.exiting
                })
                .count();
            if scanned != o.scanned_children as usize {
                return Err(format!(
                    "object {} counts {} scanned children, has {scanned}",
                    o.id, o.scanned_children
                ));
            }
            let riders = o.children.iter().filter(|&&c| self.obj(c).riding()).count();
            if riders != o.riders() as usize {
                return Err(format!(
                    "object {} counts {} riders, has {riders}",
                    o.id,
                    o.riders()
                ));
            }
            if o.riding() {
                let p = self
                    .objects
                    .get(o.parent as usize)
                    .ok_or("rider without a parent")?;
                if !o.exiting || o.removal.is_none() {
                    return Err(format!("rider {} is not on its way out", o.id));
                }
                if !o.is_idle() {
                    return Err(format!("rider {} is busy", o.id));
                }
                if p.removal.is_none() {
                    return Err(format!(
                        "rider {} rides on a parent that is not being removed",
                        o.id
                    ));
                }
            }
            if o.driver != NONE {
                let d = self
                    .objects
                    .get(o.driver as usize)
                    .ok_or("dangling driver")?;
                if d.bound().get(o.pos_in_driver as usize) != Some(&k) {
                    return Err(format!("object {} misplaced in its driver", o.id));
                }
            } else if o.unbind_hold.is_some() {
                return Err(format!("unbound object {} held for unbinding", o.id));
            }
            for (i, &b) in o.bound().iter().enumerate() {
                let bound = self.objects.get(b as usize).ok_or("dangling binding")?;
                if bound.driver != k || bound.pos_in_driver as usize != i {
                    return Err(format!("binding of {} broken", o.id));
                }
            }
            let (mut count, mut prev, mut r) = (0u32, NONE, o.ref_head);
            while r != NONE {
                let reference = self.refs.get(r as usize).ok_or("dangling reference")?;
                if reference.object != k || reference.prev != prev || count > o.ref_count {
                    return Err(format!("reference list of {} broken", o.id));
                }
                if reference.kernel.is_some() && (o.origin != Origin::Udev || o.scanned) {
                    return Err(format!(
                        "kernel user {} on {}, which is not a real device",
                        reference.id, o.id
                    ));
                }
                total_refs += 1;
                count += 1;
                (prev, r) = (r, reference.next);
            }
            if count != o.ref_count {
                return Err(format!(
                    "object {} counts {} references, has {count}",
                    o.id, o.ref_count
                ));
            }
            if let Some(req) = o.removal {
                if !o.exiting && !self.requests.contains_key(&req) {
                    return Err(format!("object {} pending on unknown request {req}", o.id));
                }
                if o.is_idle() && !o.exiting {
                    return Err(format!(
                        "object {} is idle but its removal is still pending",
                        o.id
                    ));
                }
            } else if o.exiting {
                return Err(format!("object {} exiting outside a removal", o.id));
            }
            if o.gone && o.is_idle() {
                return Err(format!("gone object {} is idle but still here", o.id));
            }
            if let Some(req) = o.unbind_hold {
                if !self.requests.contains_key(&req) {
                    return Err(format!("object {} held by unknown request {req}", o.id));
                }
                // While its driver is tearing it down, it stays bound to that driver.
                if o.ref_count == 0 && o.scanned_children == 0 && !o.exiting {
                    return Err(format!(
                        "object {} is free but still held for unbinding",
                        o.id
                    ));
                }
            }
        }
        if pending != self.pending {
            return Err(format!(
                "pending count {} but {pending} objects are removing",
                self.pending
            ));
        }
        let indexed: usize = self.names.iter().map(|m| m.len()).sum();
        if seen_names != indexed {
            return Err(format!(
                "{indexed} names indexed for {seen_names} named objects"
            ));
        }
        if total_refs != self.refs.len() {
            return Err(format!(
                "{} references, {total_refs} on objects",
                self.refs.len()
            ));
        }
        for (k, r) in self.refs.iter() {
            if slot_of(r.id.0) != k as Key {
                return Err(format!(
                    "reference {} is not in the slot its id names",
                    r.id
                ));
            }
            if !self.objects.contains(r.object as usize) {
                return Err(format!("reference {} points to a removed object", r.id));
            }
        }
        for (id, req) in &self.requests {
            let root = self
                .objects
                .get(req.root as usize)
                .ok_or("request with a removed root")?;
            if root.removal != Some(*id) {
                return Err(format!("request {id}'s root is not pending on it"));
            }
            if let Some((t, _)) = req.deadline {
                if !self.deadlines.contains(&(t, *id)) {
                    return Err(format!("request {id}'s deadline not scheduled"));
                }
            }
        }
        if self
            .deadlines
            .iter()
            .any(|(_, r)| !self.requests.contains_key(r))
        {
            return Err("deadline for an unknown request".into());
        }
        Ok(())
    }
}
