//! The lifecycle operations of DESIGN.md §2: add, acquire, release, remove
//! (cascading, non-blocking, with force / dry-run / deadline), stop,
//! re-enable, bind, unbind, kernel removal, driver exit completion and
//! deadline expiry.
//!
//! Every operation validates before it mutates, so a refused operation
//! changes nothing and emits nothing. Every operation costs O(the subtree it
//! touches) and never waits: a busy object is marked and settles later, when
//! the release that makes it idle arrives.

use std::collections::BTreeMap;
use std::sync::Arc;

use proto::{Kind, OnTimeout, Origin, RemoveOutcome, State};

use crate::driver::{Exit, ImplId, ProbeOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Effect, Event};
use crate::ids::{compose, Micros, ObjectId, RefId, RequestId, MAX_SLOTS};
use crate::kernel_users::KernelUse;
use crate::model::{
    name_slot, scope_prefix, Admin, Holder, Key, Model, Object, ReferenceInfo, Request, NONE,
};
use crate::validate;

/// What to add.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddRequest {
    /// Driver, host or device.
    pub kind: Kind,
    /// Its name (unique per kind among objects that are not `gone`).
    pub name: String,
    /// Its parent: none for drivers; none or a device for hosts; a host or
    /// device (or none, for stand-alone kernel devices) for devices.
    pub parent: Option<ObjectId>,
    /// A driver to bind it to at creation.
    pub driver: Option<ObjectId>,
    /// Options for that driver's probe (e.g. how many LUNs to scan).
    pub probe: ProbeOptions,
    /// Initial attributes.
    pub attributes: BTreeMap<String, String>,
    /// Where it comes from.
    pub origin: Origin,
    /// Kernel subsystem (udev objects).
    pub subsystem: String,
    /// sysfs path (udev objects).
    pub sys_path: String,
    /// The driver implementation that tears the real thing down on removal
    /// (udev objects); without one, a udev object cannot be removed.
    pub handler: Option<String>,
    /// Who asks (the daemon: the caller's holder key), for the per-client
    /// quota on objects added ([`Model::set_added_quota`]).
    pub added_by: Option<u64>,
    /// Created by its parent's driver, as that driver's probe would have
    /// (torn down when the parent is unbound, removed through the driver's
    /// exit): for a daemon restoring what a scan made before a restart.
    /// The parent must be bound to a driver.
    pub scanned: bool,
}

impl AddRequest {
    /// An API-origin object of this kind and name, with nothing else set.
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        AddRequest {
            kind,
            name: name.into(),
            parent: None,
            driver: None,
            probe: ProbeOptions::default(),
            attributes: BTreeMap::new(),
            origin: Origin::Api,
            subsystem: String::new(),
            sys_path: String::new(),
            handler: None,
            added_by: None,
            scanned: false,
        }
    }

    /// Sets the parent.
    pub fn parent(mut self, parent: ObjectId) -> Self {
        self.parent = Some(parent);
        self
    }

    /// Binds to this driver at creation.
    pub fn driver(mut self, driver: ObjectId) -> Self {
        self.driver = Some(driver);
        self
    }

    /// Asks the driver's probe to scan this many LUNs.
    pub fn luns(mut self, luns: u32) -> Self {
        self.probe.luns = Some(luns);
        self
    }

    /// Adds one attribute.
    pub fn attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(key.into(), value.into());
        self
    }
}

/// How to remove.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemoveOptions {
    /// Revoke every reference in the affected set and complete at once.
    pub force: bool,
    /// Report what would happen; change nothing.
    pub dry_run: bool,
    /// If the removal is left pending: how long it may wait (µs), and what
    /// to do then.
    pub timeout: Option<(Micros, OnTimeout)>,
    /// Take away the kernel's mounts and swap on the affected set (rule 18):
    /// an [`Effect::Detach`] per device that has any.
    pub detach_mounts: bool,
}

/// One object a removal is still waiting on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingObject {
    /// The object.
    pub id: ObjectId,
    /// Its kind.
    pub kind: Kind,
    /// Its name.
    pub name: Arc<str>,
    /// Its state now.
    pub state: State,
    /// The references that keep it.
    pub holders: Vec<ReferenceInfo>,
}

/// The answer to a removal request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoveReport {
    /// `removed` if the object is gone from the model, else `pending`.
    pub outcome: RemoveOutcome,
    /// What the removal still waits on (empty when removed), children first.
    pub pending: Vec<PendingObject>,
}

/// Outcome of a driver action reported back by the caller.
pub type ExitResult = std::result::Result<(), String>;

impl Model {
    // ----------------------------------------------------------------- add

    /// Adds an object (and, when bound to a scanning driver, what it finds).
    pub fn add(&mut self, req: AddRequest) -> Result<ObjectId> {
        validate::name(&req.name)?;
        validate::attributes(&req.attributes)?;
        if [Origin::Api, Origin::Udev]
            .iter()
            .any(|&o| req.name.starts_with(scope_prefix(o)))
        {
            return Err(Error::invalid_argument(format!(
                "name {:?} starts with a scope (api: or udev:), which qualifies names when they are looked up",
                req.name
            )));
        }
        self.require_room(1)?;
        let parent = match req.parent {
            None => NONE,
            Some(id) => self.key(id)?,
        };
        if parent != NONE {
            let p = self.obj(parent);
            let allowed = match req.kind {
                Kind::Driver => false,
                Kind::Host => p.kind == Kind::Device,
                Kind::Device => p.kind != Kind::Driver,
            };
            if !allowed {
                return Err(Error::invalid_argument(format!(
                    "a {} cannot be the parent of a {}",
                    p.kind, req.kind
                )));
            }
            // The kernel does not ask: a real device appears under whatever
            // state its parent is in, and the model follows (rule 20) —
            // except under one the kernel itself removed already (a stale
            // event: the kernel removes children before their parent).
            if req.origin == Origin::Api {
                self.require_live_chain(parent, "accepts no new children")?;
            } else if self.obj(parent).gone {
                return Err(Error::invalid_state(format!(
                    "{} is gone from the kernel: nothing appears under it",
                    self.describe(parent)
                )));
            }
        }
        self.require_free_name(req.kind, req.origin, &req.name)?;
        if req.scanned && (parent == NONE || self.obj(parent).driver == NONE) {
            return Err(Error::invalid_argument(
                "only a child of a bound object can be made by its driver",
            ));
        }
        let handler = match &req.handler {
            None if req.scanned => {
                let d = self.obj(parent).driver;
                self.obj(d).extra.as_ref().and_then(|e| e.implementation)
            }
            None => None,
            Some(name) => Some(self.registry.find(name).ok_or_else(|| {
                Error::invalid_argument(format!("no driver implementation named {name:?}"))
            })?),
        };
        let implementation = if req.kind == Kind::Driver {
            self.registry.find(&req.name)
        } else {
            None
        };
        // Validate the binding and run the probe before creating anything, so
        // that a refused bind leaves no half-made object behind.
        let binding = match req.driver {
            None if req.probe.luns.is_some() => {
                return Err(Error::invalid_argument(
                    "luns needs a driver that scans (bind to sim-scsi)",
                ))
            }
            None => None,
            Some(driver) => {
                if req.kind == Kind::Driver {
                    return Err(Error::invalid_argument(
                        "a driver cannot be bound to a driver",
                    ));
                }
                let d = self.key(driver)?;
                let view_name = req.name.clone();
                let view_attributes = crate::Attributes::from_map(&req.attributes);
                let probe_view = crate::driver::ObjectView {
                    id: ObjectId(compose(
                        self.next_object.peek(),
                        self.objects.vacant_key() as u32,
                    )),
                    kind: req.kind,
                    name: &view_name,
                    attributes: &view_attributes,
                    origin: req.origin,
                    subsystem: &req.subsystem,
                    sys_path: &req.sys_path,
                };
                let found = self.probe(d, &probe_view, &req.probe)?;
                Some((d, found))
            }
        };

        // The limits a site sets on what clients add (real devices are
        // modelled whatever their number: the machine bounds them).
        if req.origin == Origin::Api {
            let new = 1 + binding.as_ref().map_or(0, |(_, found)| found.len());
            if let Some(limit) = self.object_limit {
                if self.objects.len() + new > limit {
                    return Err(Error::new(
                        ErrorKind::QuotaExceeded,
                        format!(
                            "the model holds {} objects and this would add {new}; the limit is {limit}",
                            self.objects.len()
                        ),
                    ));
                }
            }
        }
        if let (Some(quota), Some(by)) = (self.added_quota, req.added_by) {
            let added = self.added_count.get(&by).copied().unwrap_or(0);
            if added >= quota {
                return Err(Error::new(
                    ErrorKind::QuotaExceeded,
                    format!("this client has added {added} objects still present; the limit per client is {quota}"),
                ));
            }
        }

        let key = self.insert_object(Object {
            id: ObjectId(0),
            name: Arc::from(req.name),
            kind: req.kind,
            origin: req.origin,
            admin: Admin::Live,
            gone: false,
            exiting: false,
            scanned: req.scanned,
            handler,
            parent,
            pos_in_parent: 0,
            children: Vec::new(),
            scanned_children: 0,
            driver: NONE,
            pos_in_driver: 0,
            ref_head: NONE,
            ref_count: 0,
            removal: None,
            unbind_hold: None,
            attributes: crate::Attributes::from_map(&req.attributes),
            extra: None,
        });
        {
            let o = self.obj_mut(key);
            if !req.subsystem.is_empty() || !req.sys_path.is_empty() || implementation.is_some() {
                let extra = o.extra_mut();
                extra.subsystem = req.subsystem;
                extra.sys_path = req.sys_path;
                extra.implementation = implementation;
            }
        }
        if let (Some(_), Some(by)) = (self.added_quota, req.added_by) {
            self.obj_mut(key).extra_mut().added_by = Some(by);
            *self.added_count.entry(by).or_insert(0) += 1;
        }
        if req.scanned {
            self.obj_mut(parent).scanned_children += 1;
        }
        let id = self.obj(key).id;
        self.events.push(Event::Added(Box::new(self.info(key))));
        if let Some((d, found)) = binding {
            self.bind_now(key, d);
            self.create_scanned(key, d, found);
        }
        if req.origin == Origin::Udev && parent != NONE {
            self.join_parents_removal(key);
        }
        Ok(id)
    }

    /// Rule 4 for a real device that appears under a parent whose removal
    /// is pending (a partition table read while its disk waits on a
    /// holder): it is part of that removal, as if the cascade had met it.
    fn join_parents_removal(&mut self, key: Key) {
        let parent = self.obj(key).parent;
        // (Not when the parent's own teardown is under way without a
        // request: nothing would complete it then.)
        let joined = self
            .obj(parent)
            .removal
            .and_then(|req| Some((req, self.requests.get(&req)?.root)));
        if let Some((req, root)) = joined {
            // As the cascade would have met it and what its driver scanned
            // with it (found by the fuzzer: a host bound at creation),
            // children first.
            self.walking = Some(req);
            for (k, kid) in self.post_order(key) {
                if self.alive(k, kid) {
                    self.cascade_step(k, req, root);
                }
            }
            self.walking = None;
        }
        // One that does not ride keeps a riding parent busy (found by the
        // fuzzer: a child under a partition whose disk's driver acted).
        self.busy_again(parent);
        self.settle_deferred();
    }

    /// Stores a new object, giving it its id (sequence and slot); the caller
    /// checked `require_room`.
    fn insert_object(&mut self, mut object: Object) -> Key {
        let key = self.objects.vacant_key() as Key;
        object.id = ObjectId(compose(self.next_object.next(), key));
        let (kind, name, parent) = (object.kind, Arc::clone(&object.name), object.parent);
        let scope = name_slot(kind, object.origin);
        let id = object.id;
        self.objects.insert(object);
        self.ordered_insert(id);
        self.names[scope].insert(name, key);
        if parent != NONE {
            let pos = self.obj(parent).children.len() as u32;
            self.obj_mut(parent).children.push(key);
            self.obj_mut(key).pos_in_parent = pos;
        }
        key
    }

    /// Runs driver `d`'s probe on a would-be bound object and validates what
    /// it found (names free and distinct). Changes nothing.
    fn probe(
        &self,
        d: Key,
        view: &crate::driver::ObjectView<'_>,
        options: &ProbeOptions,
    ) -> Result<Vec<crate::driver::NewChild>> {
        let driver = self.obj(d);
        if driver.kind != Kind::Driver {
            return Err(Error::invalid_argument(format!(
                "{} is not a driver",
                self.describe(d)
            )));
        }
        if driver.state() != State::Live {
            return Err(Error::invalid_state(format!(
                "{} is {}: it accepts no new bindings",
                self.describe(d),
                driver.state()
            )));
        }
        let Some(implementation) = driver.extra.as_ref().and_then(|e| e.implementation) else {
            if options.luns.is_some() {
                return Err(Error::invalid_argument(format!(
                    "{} does not scan; luns needs a scanning driver such as sim-scsi",
                    self.describe(d)
                )));
            }
            return Ok(Vec::new());
        };
        let found = self.registry.get(implementation).probe(view, options)?;
        let mut fresh = std::collections::HashSet::with_capacity(found.len());
        for child in &found {
            validate::name(&child.name)?;
            validate::attributes(&child.attributes)?;
            if child.kind == Kind::Driver {
                return Err(Error::invalid_argument("a probe cannot create drivers"));
            }
            self.require_free_name(child.kind, view.origin, &child.name)?;
            if !fresh.insert((child.kind, child.name.as_str())) {
                return Err(Error::new(
                    ErrorKind::NameInUse,
                    format!("the probe found two {}s named {:?}", child.kind, child.name),
                ));
            }
        }
        self.require_room(found.len() + 1)?;
        Ok(found)
    }

    fn create_scanned(&mut self, parent: Key, d: Key, found: Vec<crate::driver::NewChild>) {
        let implementation = self.obj(d).extra.as_ref().and_then(|e| e.implementation);
        for child in found {
            let origin = self.obj(parent).origin;
            let key = self.insert_object(Object {
                id: ObjectId(0),
                name: Arc::from(child.name),
                kind: child.kind,
                origin,
                admin: Admin::Live,
                gone: false,
                exiting: false,
                scanned: true,
                handler: implementation,
                parent,
                pos_in_parent: 0,
                children: Vec::new(),
                scanned_children: 0,
                driver: NONE,
                pos_in_driver: 0,
                ref_head: NONE,
                ref_count: 0,
                removal: None,
                unbind_hold: None,
                attributes: crate::Attributes::from_map(&child.attributes),
                extra: None,
            });
            self.obj_mut(parent).scanned_children += 1;
            self.events.push(Event::Added(Box::new(self.info(key))));
        }
    }

    /// Refuses to add `count` objects beyond the arena's limits.
    fn require_room(&self, count: usize) -> Result<()> {
        if self.objects.len() + count > MAX_SLOTS - 1 {
            return Err(Error::new(ErrorKind::QuotaExceeded, "the model is full"));
        }
        if self.next_object.peek() + count as u64 > crate::ids::MAX_SEQUENCE {
            return Err(Error::new(
                ErrorKind::QuotaExceeded,
                "the model has handed out every object id it can; restart with a fresh state",
            ));
        }
        Ok(())
    }

    fn require_free_name(&self, kind: Kind, origin: Origin, name: &str) -> Result<()> {
        match self.names[name_slot(kind, origin)].get(name) {
            None => Ok(()),
            Some(&k) => Err(Error::new(
                ErrorKind::NameInUse,
                format!("{} already has that name", self.describe(k)),
            )),
        }
    }

    /// Rule 3: `key` and every ancestor must be live.
    fn require_live_chain(&self, key: Key, what: &str) -> Result<()> {
        let mut k = key;
        while k != NONE {
            let o = self.obj(k);
            let state = o.state();
            if state != State::Live {
                let subject = if k == key {
                    format!("{} is {state}: it {what}", self.describe(k))
                } else {
                    format!(
                        "{} is {state}, so {} {what}",
                        self.describe(k),
                        self.describe(key)
                    )
                };
                return Err(Error::invalid_state(subject));
            }
            k = o.parent;
        }
        Ok(())
    }

    /// "device 0:0:0:1 (id 7)", for messages.
    pub(crate) fn describe(&self, key: Key) -> String {
        let o = self.obj(key);
        format!("{} {} (id {})", o.kind, o.name, o.id)
    }

    // ------------------------------------------------------- references

    /// Takes a reference on an object (rule 3: it and its ancestors must be live).
    pub fn acquire(
        &mut self,
        id: ObjectId,
        holder: Arc<Holder>,
        reason: impl Into<Arc<str>>,
        now: Micros,
    ) -> Result<RefId> {
        let key = self.key(id)?;
        let reason = reason.into();
        validate::reason(&reason)?;
        self.require_live_chain(key, "accepts no new references")?;
        self.require_reference_room()?;
        if let Some(limit) = self.reference_limit {
            if self.api_references >= limit {
                return Err(Error::new(
                    ErrorKind::QuotaExceeded,
                    format!(
                        "{} references are held; the daemon takes no more \
                         (each costs it a file descriptor, and its limit keeps a reserve)",
                        self.api_references
                    ),
                ));
            }
        }
        if let Some(quota) = self
            .user_reference_quota
            .filter(|_| !self.quota_exempt.contains(&holder.uid))
        {
            let held = self.held_by_user.get(&holder.uid).copied().unwrap_or(0);
            if held >= quota {
                return Err(Error::new(
                    ErrorKind::QuotaExceeded,
                    format!(
                        "uid {} holds {held} references; the limit per user is {quota}",
                        holder.uid
                    ),
                ));
            }
        }
        if let Some(quota) = self.reference_quota {
            let held = self.held_by.get(&holder.key).copied().unwrap_or(0);
            if held >= quota {
                return Err(Error::new(
                    ErrorKind::QuotaExceeded,
                    format!(
                        "{} holds {held} references; the limit per client is {quota}",
                        holder.bus_name
                    ),
                ));
            }
            *self.held_by.entry(holder.key).or_insert(0) += 1;
        }
        if self.user_reference_quota.is_some() {
            *self.held_by_user.entry(holder.uid).or_insert(0) += 1;
        }
        self.api_references += 1;
        Ok(self.insert_reference(key, holder, reason, now, None))
    }

    /// Refuses a reference beyond the arena's limits.
    pub(crate) fn require_reference_room(&self) -> Result<()> {
        if self.refs.len() >= MAX_SLOTS - 1 || self.next_ref.exhausted() {
            return Err(Error::new(ErrorKind::QuotaExceeded, "too many references"));
        }
        Ok(())
    }

    /// Stores a reference on `key` (the caller checked room and quota) and
    /// reports it.
    pub(crate) fn insert_reference(
        &mut self,
        key: Key,
        holder: Arc<Holder>,
        reason: Arc<str>,
        now: Micros,
        kernel: Option<KernelUse>,
    ) -> RefId {
        let rkey = self.refs.vacant_key() as Key;
        let reference = RefId(compose(self.next_ref.next(), rkey));
        let head = self.obj(key).ref_head;
        self.refs.insert(crate::model::Reference {
            id: reference,
            object: key,
            prev: NONE,
            next: head,
            holder,
            reason,
            since: now,
            kernel,
        });
        if head != NONE {
            self.refs[head as usize].prev = rkey;
        }
        let o = self.obj_mut(key);
        o.ref_head = rkey;
        o.ref_count += 1;
        let (id, ref_count) = (o.id, o.ref_count);
        self.events.push(Event::Acquired {
            id,
            reference,
            ref_count,
        });
        reference
    }

    /// Drops a reference. A pending removal waiting on it completes now if
    /// the object became idle.
    pub fn release(&mut self, reference: RefId) -> Result<()> {
        let rkey = self.ref_key(reference)?;
        if self.refs[rkey as usize].kernel.is_some() {
            return Err(Error::invalid_argument(format!(
                "reference {reference} is a kernel user: only the kernel ends it"
            )));
        }
        self.drop_reference(rkey);
        Ok(())
    }

    /// Drops the reference in slot `rkey`, reports it, and completes what
    /// it was the last obstacle to.
    pub(crate) fn drop_reference(&mut self, rkey: Key) {
        let reference = self.refs[rkey as usize].id;
        let key = self.detach_ref(rkey);
        let o = self.obj(key);
        let (id, ref_count) = (o.id, o.ref_count);
        let waiting = o.removal.is_some() || o.gone || o.unbind_hold.is_some();
        self.events.push(Event::Released {
            id,
            reference,
            ref_count,
        });
        if waiting {
            self.settle(key);
        }
        self.settle_deferred();
    }

    /// Removes a reference from the indexes; returns the object it was on.
    fn detach_ref(&mut self, rkey: Key) -> Key {
        let r = self.refs.remove(rkey as usize);
        if r.kernel.is_none() {
            self.api_references -= 1;
        }
        if self.reference_quota.is_some() && r.kernel.is_none() {
            if let Some(held) = self.held_by.get_mut(&r.holder.key) {
                *held -= 1;
                if *held == 0 {
                    self.held_by.remove(&r.holder.key);
                }
            }
        }
        if self.user_reference_quota.is_some() && r.kernel.is_none() {
            if let Some(held) = self.held_by_user.get_mut(&r.holder.uid) {
                *held -= 1;
                if *held == 0 {
                    self.held_by_user.remove(&r.holder.uid);
                }
            }
        }
        if r.next != NONE {
            self.refs[r.next as usize].prev = r.prev;
        }
        if r.prev != NONE {
            self.refs[r.prev as usize].next = r.next;
        } else {
            self.obj_mut(r.object).ref_head = r.next;
        }
        self.obj_mut(r.object).ref_count -= 1;
        r.object
    }

    /// Revokes every client reference on `key` (rule 9), telling the
    /// holders through `Revoked` events. The kernel's users stay (rule 18):
    /// force cannot unmount a filesystem or close a process's node.
    fn revoke_all(&mut self, key: Key) {
        let mut r = self.obj(key).ref_head;
        while r != NONE {
            let next = self.refs[r as usize].next;
            if self.refs[r as usize].kernel.is_none() {
                let reference = self.refs[r as usize].id;
                self.detach_ref(r);
                let o = self.obj(key);
                self.events.push(Event::Revoked {
                    id: o.id,
                    reference,
                    ref_count: o.ref_count,
                });
            }
            r = next;
        }
    }

    /// The kernel's users of `key`: (reference, kind), newest first.
    pub(crate) fn kernel_refs(&self, key: Key) -> Vec<(RefId, KernelUse)> {
        self.ref_keys(key)
            .into_iter()
            .filter_map(|r| {
                let r = &self.refs[r as usize];
                r.kernel.map(|k| (r.id, k))
            })
            .collect()
    }

    // --------------------------------------------------------- settling

    /// Completes whatever became possible now that `start` may be idle:
    /// pending removals, kernel-gone objects, held-back unbindings — and then
    /// their parents and drivers, transitively.
    pub(crate) fn settle(&mut self, start: Key) {
        let mut work = vec![(start, self.obj(start).id)];
        while let Some((k, id)) = work.pop() {
            // Keys are reused by the slab, so check that it is still the same object.
            let Some(o) = self.objects.get(k as usize) else {
                continue;
            };
            if o.id != id || o.exiting {
                continue;
            }
            if !o.is_idle() || !(o.gone || o.removal.is_some()) {
                // Not going away; but a driver removal holding it back may
                // now let it go. (When it does go, its removal comes first:
                // its driver must still be bound to tear it down.)
                if o.unbind_hold.is_some() && o.ref_count == 0 && o.scanned_children == 0 {
                    let d = o.driver;
                    self.unbind_now(k);
                    work.push((d, self.obj(d).id));
                }
                continue;
            }
            let (parent, driver) = (o.parent, o.driver);
            let next: Vec<(Key, ObjectId)> = [parent, driver]
                .into_iter()
                .filter(|&p| p != NONE)
                .map(|p| (p, self.obj(p).id))
                .collect();
            let removed = if self.obj(k).gone {
                self.finish_removal(k);
                true
            } else {
                match self.obj(k).removal {
                    Some(req) => self.begin_exit(k, req),
                    None => false,
                }
            };
            if removed {
                work.extend(next);
            }
        }
    }

    /// Changes an object through `change`, keeping the pending count in step
    /// and emitting exactly one `StateChanged` if its visible state moved.
    fn change_state(&mut self, key: Key, change: impl FnOnce(&mut Object)) {
        let o = self.obj_mut(key);
        let from = o.state();
        change(o);
        let to = o.state();
        let id = o.id;
        if from != to {
            if from == State::Removing {
                self.pending -= 1;
            }
            if to == State::Removing {
                self.pending += 1;
            }
            self.events.push(Event::StateChanged { id, from, to });
        }
    }

    /// The driver implementation that tears `key` down: the one that created
    /// it (or that the caller named), else the one of the driver it is bound to.
    fn implementation_of(&self, key: Key) -> Option<ImplId> {
        let o = self.obj(key);
        o.handler.or_else(|| {
            (o.driver != NONE)
                .then(|| {
                    self.obj(o.driver)
                        .extra
                        .as_ref()
                        .and_then(|e| e.implementation)
                })
                .flatten()
        })
    }

    /// How the real thing behind `key` is torn down.
    fn exit_plan(&self, key: Key) -> Exit {
        let o = self.obj(key);
        match self.implementation_of(key) {
            Some(i) => self.registry.get(i).exit(&o.view()),
            None if o.origin == Origin::Udev => Exit::NotSupported(format!(
                "{} has no driver that can remove the real device",
                self.describe(key)
            )),
            None => Exit::Done,
        }
    }

    /// Starts tearing down an idle object that must go. Returns whether it
    /// is gone from the model now.
    fn begin_exit(&mut self, key: Key, req: RequestId) -> bool {
        match self.exit_plan(key) {
            Exit::Done => {
                // What rode on it goes with it, children first.
                for (k, kid) in self.post_order(key) {
                    if k != key && self.alive(k, kid) {
                        self.finish_removal(k);
                    }
                }
                self.finish_removal(key);
                true
            }
            Exit::Later(action) => {
                self.change_state(key, |o| {
                    o.removal = Some(req);
                    o.exiting = true;
                });
                self.release_scanned(key);
                let driver = self
                    .implementation_of(key)
                    .map_or("", |i| self.registry.get(i).name());
                self.effects.push(Effect::Exit {
                    id: self.obj(key).id,
                    driver,
                    action,
                });
                false
            }
            Exit::Failed(error) | Exit::NotSupported(error) => {
                self.fail_exit(key, error);
                false
            }
            Exit::WithParent => {
                let parent = self.obj(key).parent;
                if parent == NONE {
                    let why = format!(
                        "{} is removed by the kernel only with its parent",
                        self.describe(key)
                    );
                    self.fail_exit(key, why);
                    return false;
                }
                // If what carries it away cannot be removed, neither can
                // this: it stays now, with one transition, rather than
                // riding and failing in the same step.
                let mut carrier = parent;
                while carrier != NONE && self.exit_plan(carrier) == Exit::WithParent {
                    carrier = self.obj(carrier).parent;
                }
                if carrier != NONE {
                    if let Exit::Failed(error) = self.exit_plan(carrier) {
                        let why = format!(
                            "not removed: the removal of {} fails: {error}",
                            self.describe(carrier)
                        );
                        self.fail_exit(key, why);
                        return false;
                    }
                }
                // Its parent is part of the same removal — or is about to
                // be: a cascade meets children before their parent. Outside
                // one, a parent that is not being removed (its removal
                // failed; found by the fuzzer) keeps this too.
                if self.obj(parent).removal.is_none() && self.walking != Some(req) {
                    let why = format!(
                        "not removed: the kernel removes {} only with {}, which is not being removed",
                        self.describe(key),
                        self.describe(parent)
                    );
                    self.fail_exit(key, why);
                    return false;
                }
                self.change_state(key, |o| {
                    o.removal = Some(req);
                    o.exiting = true;
                });
                self.obj_mut(key).extra_mut().riding = true;
                self.obj_mut(parent).extra_mut().riders += 1;
                self.release_scanned(key);
                // The parent may be idle now (its last busy child rides);
                // it may also be a later step of the current walk.
                let parent_id = self.obj(parent).id;
                self.deferred.push((parent, parent_id));
                false
            }
        }
    }

    /// A rider that stops riding (a user of its own appeared, its parent's
    /// removal was called off or failed): it keeps its parent busy again —
    /// and a parent that rode on its own parent waits too (a SCSI disk
    /// whose partition got a user), so a rider is always idle.
    pub(crate) fn stop_riding(&mut self, key: Key) {
        let parent = self.obj(key).parent;
        let o = self.obj_mut(key);
        o.exiting = false;
        o.extra_mut().riding = false;
        // A driver removal that held it back while it rode lets it go now
        // if it is free (while still `removing`, so its state does not move).
        let o = self.obj(key);
        if o.unbind_hold.is_some() && o.ref_count == 0 && o.scanned_children == 0 {
            self.unbind_now(key);
        }
        self.requalify_removal(key);
        if parent != NONE {
            self.obj_mut(parent).extra_mut().riders -= 1;
            self.busy_again(parent);
        }
    }

    /// An object that was on its way out (riding, or its driver acting)
    /// waits on its own again: if the removal it was part of was called
    /// off meanwhile (found by the fuzzer), it is part of whatever still
    /// covers it, or of nothing.
    pub(crate) fn requalify_removal(&mut self, key: Key) {
        if let Some(req) = self.obj(key).removal {
            if !self.requests.contains_key(&req) {
                let inherit = self.covering_request(key);
                self.change_state(key, |o| o.removal = inherit);
                if inherit.is_none() {
                    self.release_riders(key);
                }
            }
        }
    }

    /// `key` is no longer being removed: what rode on it comes back too.
    fn release_riders(&mut self, key: Key) {
        let riders: Vec<Key> = self
            .obj(key)
            .children
            .iter()
            .copied()
            .filter(|&c| self.obj(c).riding())
            .collect();
        for c in riders {
            self.stop_riding(c);
            if self.obj(c).removal.is_some() {
                self.change_state(c, |o| o.removal = None);
            }
            self.release_riders(c);
        }
    }

    /// `key` may have stopped being idle (a user or a busy child appeared):
    /// if it was riding on its parent's removal, it waits on its own now.
    pub(crate) fn busy_again(&mut self, key: Key) {
        let o = self.obj(key);
        if o.riding() && !o.is_idle() {
            self.stop_riding(key);
        }
    }

    /// Rule 20 for what was to go with `key`: its removal failed, so the
    /// kernel keeps its partitions too (riding on it, or waiting on a user
    /// of their own that appeared while its driver acted). Each stays,
    /// `stopped`, saying why (children first).
    fn fail_riders(&mut self, key: Key, error: &str) {
        let Some(req) = self.obj(key).removal else {
            return;
        };
        let with_it: Vec<Key> = self
            .obj(key)
            .children
            .iter()
            .copied()
            .filter(|&c| {
                let c = self.obj(c);
                c.riding() || (c.removal == Some(req) && !c.exiting)
            })
            .collect();
        let why = format!(
            "not removed: the removal of {} failed: {error}",
            self.describe(key)
        );
        for c in with_it {
            self.fail_riders(c, error);
            if self.obj(c).riding() {
                self.stop_riding(c);
            }
            self.change_state(c, |o| {
                o.removal = None;
                o.admin = Admin::Stopped;
            });
            self.set_error(c, why.clone());
        }
    }

    /// A driver could not let go: the object stays, `stopped`, with the error
    /// shown, and is no longer its parent's driver's to tear down.
    pub(crate) fn fail_exit(&mut self, key: Key, error: String) {
        self.fail_riders(key, &error);
        let was_root = self.root_request_of(key);
        self.change_state(key, |o| {
            o.removal = None;
            o.exiting = false;
            o.admin = Admin::Stopped;
        });
        if let Some(req) = was_root {
            self.drop_request(req);
            // What below it still waited on this removal (a user appeared
            // while the driver acted; found by the fuzzer) waits on what
            // still covers it, or comes back. Parents first.
            let mut below = self.post_order(key);
            below.reverse();
            for (k, kid) in below.into_iter().skip(1) {
                let o = self.obj(k);
                if self.alive(k, kid) && o.removal == Some(req) && !o.exiting {
                    self.requalify_removal(k);
                }
            }
        }
        self.release_scanned(key);
        self.set_error(key, error);
        // It stays, but a driver removal holding it back may now let it go.
        if self.obj(key).unbind_hold.is_some() {
            let id = self.obj(key).id;
            self.deferred.push((key, id));
        }
    }

    fn set_error(&mut self, key: Key, error: String) {
        let o = self.obj_mut(key);
        let current = o.extra.as_ref().map_or("", |e| &*e.last_error);
        if current == error {
            return;
        }
        let error: Arc<str> = Arc::from(error);
        o.extra_mut().last_error = Arc::clone(&error);
        let id = o.id;
        self.events.push(Event::ErrorChanged { id, error });
    }

    /// A scanned object that its driver no longer tears down (exiting, failed,
    /// or gone) stops counting against its parent's unbinding.
    fn release_scanned(&mut self, key: Key) {
        let o = self.obj_mut(key);
        if !o.scanned {
            return;
        }
        o.scanned = false;
        let parent = o.parent;
        if parent != NONE {
            let p = self.obj_mut(parent);
            p.scanned_children -= 1;
            if p.unbind_hold.is_some() && p.scanned_children == 0 {
                // Deferred: the parent may be a later step of the current walk.
                let id = p.id;
                self.deferred.push((parent, id));
            }
        }
    }

    /// Takes an idle object out of the model for good.
    fn finish_removal(&mut self, key: Key) {
        if self.obj(key).driver != NONE {
            self.unbind_now(key);
        }
        if let Some(req) = self.root_request_of(key) {
            self.drop_request(req);
        }
        let o = self.objects.remove(key as usize);
        self.ordered_remove();
        debug_assert!(o.ref_count == 0 && o.children.is_empty() && o.bound().is_empty());
        if let Some(by) = o.extra.as_deref().and_then(|e| e.added_by) {
            if let Some(n) = self.added_count.get_mut(&by) {
                *n -= 1;
                if *n == 0 {
                    self.added_count.remove(&by);
                }
            }
        }
        let state = o.state();
        if state == State::Removing {
            self.pending -= 1;
        }
        if !o.gone {
            self.names[name_slot(o.kind, o.origin)].remove(&*o.name);
        }
        if o.parent != NONE && o.riding() {
            self.obj_mut(o.parent).extra_mut().riders -= 1;
        }
        if o.parent != NONE {
            let p = self.obj_mut(o.parent);
            p.children.swap_remove(o.pos_in_parent as usize);
            if let Some(&moved) = p.children.get(o.pos_in_parent as usize) {
                self.obj_mut(moved).pos_in_parent = o.pos_in_parent;
            }
            if o.scanned && !o.exiting {
                self.obj_mut(o.parent).scanned_children -= 1;
            }
        }
        self.events.push(Event::Removed {
            id: o.id,
            kind: o.kind,
            name: o.name,
            was_pending: matches!(state, State::Removing | State::Gone),
        });
    }

    /// The request whose root `key` is, if any.
    fn root_request_of(&self, key: Key) -> Option<RequestId> {
        let req = self.obj(key).removal?;
        (self.requests.get(&req)?.root == key).then_some(req)
    }

    fn drop_request(&mut self, req: RequestId) {
        if let Some(r) = self.requests.remove(&req) {
            if let Some((t, _)) = r.deadline {
                self.deadlines.remove(&(t, req));
            }
        }
    }

    // ---------------------------------------------------------- binding

    fn bind_now(&mut self, key: Key, d: Key) {
        let pos = self.obj(d).bound().len() as u32;
        self.obj_mut(d).extra_mut().bound.push(key);
        let o = self.obj_mut(key);
        o.driver = d;
        o.pos_in_driver = pos;
        let (id, driver) = (o.id, self.obj(d).id);
        self.events.push(Event::Bound { id, driver });
    }

    fn unbind_now(&mut self, key: Key) {
        let (d, pos) = {
            let o = self.obj(key);
            (o.driver, o.pos_in_driver as usize)
        };
        let bound = &mut self.obj_mut(d).extra_mut().bound;
        bound.swap_remove(pos);
        if let Some(&moved) = bound.get(pos) {
            self.obj_mut(moved).pos_in_driver = pos as u32;
        }
        self.change_state(key, |o| {
            o.driver = NONE;
            o.unbind_hold = None;
        });
        let (id, driver) = (self.obj(key).id, self.obj(d).id);
        self.events.push(Event::Unbound { id, driver });
        self.deferred.push((d, driver));
    }

    /// Ends a mutating operation: settles what a walk deferred (drivers that
    /// lost bindings, hosts whose scanned devices are gone), which may be
    /// idle or free now.
    pub(crate) fn settle_deferred(&mut self) {
        while let Some((d, id)) = self.deferred.pop() {
            if self.alive(d, id) {
                self.settle(d);
            }
        }
    }

    /// Binds a host or device to a driver, running the driver's probe.
    pub fn bind(&mut self, id: ObjectId, driver: ObjectId, options: ProbeOptions) -> Result<()> {
        let key = self.key(id)?;
        let d = self.key(driver)?;
        if self.obj(key).kind == Kind::Driver {
            return Err(Error::invalid_argument(
                "only hosts and devices can be bound",
            ));
        }
        if self.obj(key).driver == d {
            return Ok(());
        }
        if self.obj(key).driver != NONE {
            return Err(Error::invalid_state(format!(
                "{} is bound to {}: unbind it first",
                self.describe(key),
                self.describe(self.obj(key).driver)
            )));
        }
        self.require_live_chain(key, "accepts no new bindings")?;
        let found = self.probe(d, &self.obj(key).view(), &options)?;
        self.bind_now(key, d);
        self.create_scanned(key, d, found);
        Ok(())
    }

    /// Unbinds a host or device from its driver, tearing down what the
    /// driver's probe created under it. Refused while anything involved is
    /// referenced, unless `force` revokes those references.
    pub fn unbind(&mut self, id: ObjectId, force: bool) -> Result<()> {
        let key = self.key(id)?;
        if self.obj(key).driver == NONE {
            return Ok(());
        }
        let scanned = self.scanned_subtrees(key);
        let holders: usize = std::iter::once(key)
            .chain(scanned.iter().map(|&(k, _)| k))
            .map(|k| self.obj(k).ref_count as usize)
            .sum();
        if holders > 0 && !force {
            return Err(Error::invalid_state(format!(
                "{} and what its driver created are in use by {holders} reference(s); \
                 release them or unbind with force",
                self.describe(key)
            )));
        }
        // An explicit unbind completes in one step, so every exit it needs
        // must be synchronous; otherwise removing the driver is the way.
        for &(k, _) in &scanned {
            match self.exit_plan(k) {
                Exit::Done => {}
                Exit::Later(_) => {
                    return Err(Error::invalid_state(format!(
                        "the driver needs time to let go of {}: remove the object or the driver instead",
                        self.describe(k)
                    )))
                }
                Exit::Failed(why) => return Err(Error::invalid_state(why)),
                Exit::NotSupported(why) => return Err(Error::new(ErrorKind::NotSupported, why)),
                Exit::WithParent => {
                    return Err(Error::new(
                        ErrorKind::NotSupported,
                        format!(
                            "{} goes only with its parent: remove that instead",
                            self.describe(k)
                        ),
                    ))
                }
            }
        }
        if force {
            self.revoke_all(key);
            for &(k, _) in &scanned {
                self.revoke_all(k);
            }
        }
        for (k, _) in scanned {
            // All idle with synchronous exits: each goes at once, children first.
            self.finish_removal(k);
        }
        let o = self.obj(key);
        if o.is_idle() && (o.removal.is_some() || o.gone) {
            // The force made a pending (or kernel-gone) object idle: its
            // removal goes first, and unbinds it as it completes. (Found by
            // the engine_commands fuzz target: a gone object was left
            // behind, idle.)
            self.settle(key);
        } else {
            self.unbind_now(key);
        }
        self.settle_deferred();
        Ok(())
    }

    /// Post-order (children first) keys of the subtrees of `key`'s scanned children.
    fn scanned_subtrees(&self, key: Key) -> Vec<(Key, ObjectId)> {
        let mut out = Vec::new();
        for &c in &self.obj(key).children {
            if self.obj(c).scanned {
                out.extend(self.post_order(c));
            }
        }
        out
    }

    /// `key`'s subtree, children before parents, as (key, id) pairs so that a
    /// walk can skip objects that an earlier step of it removed.
    pub(crate) fn post_order(&self, key: Key) -> Vec<(Key, ObjectId)> {
        let mut out = Vec::new();
        let mut stack = vec![(key, false)];
        while let Some((k, expanded)) = stack.pop() {
            if expanded {
                out.push((k, self.obj(k).id));
            } else {
                stack.push((k, true));
                stack.extend(self.obj(k).children.iter().map(|&c| (c, false)));
            }
        }
        out
    }

    // ---------------------------------------------------------- removal

    /// Removes an object (rules 1, 4, 5, 9, 10, 11, 16). Never waits: a busy
    /// object is left `removing` and completes by itself when idle.
    pub fn remove(
        &mut self,
        id: ObjectId,
        options: RemoveOptions,
        now: Micros,
    ) -> Result<RemoveReport> {
        let key = self.key(id)?;
        let deadline = match options.timeout {
            None => None,
            Some((0, _)) => {
                return Err(Error::invalid_argument(
                    "a removal timeout must be at least 1 second",
                ))
            }
            Some((after, action)) => Some((now.saturating_add(after), action)),
        };
        let affected = self.affected_set(key);
        if let Some(k) = affected
            .iter()
            .map(|&(k, _)| k)
            .find(|&k| self.needs_unsupported_exit(k))
        {
            let Exit::NotSupported(why) = self.exit_plan(k) else {
                unreachable!("needs_unsupported_exit checked the plan")
            };
            return Err(Error::new(ErrorKind::NotSupported, why));
        }
        self.require_own_removal(key)?;
        let root = self.obj(key);
        let already = root.removal.is_some() || root.gone || root.exiting;
        if options.dry_run {
            return Ok(self.predict_removal(key, &affected, options));
        }
        if options.detach_mounts {
            self.detach_kernel_users(&affected);
        }
        if already && !options.force {
            return Ok(self.report(id, &affected));
        }
        if options.force {
            for &(k, _) in &affected {
                self.revoke_all(k);
            }
        }
        // The root's own request, or the live one it is already part of
        // (an ancestor's: what the cascade marks then belongs to that one,
        // which outlives this call; found by the fuzzer), else a new one.
        let joined = self.root_request_of(key).or_else(|| {
            self.obj(key)
                .removal
                .filter(|r| self.requests.contains_key(r))
        });
        let created = joined.is_none();
        // (A deadline is for the root's own removal, never an ancestor's.)
        let ancestors = joined.is_some() && self.root_request_of(key).is_none();
        let req = match joined {
            Some(existing) => existing,
            None => {
                let req = RequestId::from_counter(self.next_request.next());
                self.requests.insert(
                    req,
                    Request {
                        root: key,
                        deadline: None,
                    },
                );
                // A root whose driver is acting, whose removal was called
                // off meanwhile, is this removal's now: what the cascade
                // marks below it has a request to belong to (found by the
                // fuzzer).
                let o = self.obj(key);
                if o.exiting && o.removal.is_some_and(|r| !self.requests.contains_key(&r)) {
                    self.obj_mut(key).removal = Some(req);
                }
                req
            }
        };
        // Whoever may be waiting on the root: if it goes at once, they may
        // be free now (found by fuzzing: a parent whose own removal waited
        // on this object, after its driver action had failed, stayed
        // pending although idle).
        let above: Vec<(Key, ObjectId)> = [self.obj(key).parent, self.obj(key).driver]
            .into_iter()
            .filter(|&k| k != NONE)
            .map(|k| (k, self.obj(k).id))
            .collect();
        self.walking = Some(req);
        if self.obj(key).kind == Kind::Driver {
            self.remove_driver(key, req);
        } else {
            for &(k, kid) in &affected {
                if self.alive(k, kid) {
                    self.cascade_step(k, req, key);
                }
            }
        }
        self.walking = None;
        if !self.contains(id) {
            self.deferred.extend(above);
        }
        if options.force {
            // The revocations may have freed objects that a driver's pending
            // removal holds back while they are in use: settle them too, at
            // the end (found by fuzzing: one whose own removal then waited
            // on a failed child kept a stale hold).
            for &(k, kid) in &affected {
                if self.alive(k, kid) && self.obj(k).unbind_hold.is_some() {
                    self.deferred.push((k, kid));
                }
            }
        }
        if created && (!self.contains(id) || self.obj(key).removal != Some(req)) {
            // The root went at once, or did not end up pending on this request
            // (its exit failed, or it belongs to an ancestor's removal).
            self.drop_request(req);
        }
        let deadline = deadline.filter(|_| !ancestors);
        if let (Some((t, action)), Some(r)) = (deadline, self.requests.get_mut(&req)) {
            if let Some((old, _)) = r.deadline.replace((t, action)) {
                self.deadlines.remove(&(old, req));
            }
            self.deadlines.insert((t, req));
        }
        self.settle_deferred();
        Ok(self.report(id, &affected))
    }

    /// Rule 20: an object the kernel removes only with its parent (a
    /// partition, a SCSI device's disk) cannot be removed alone; the error
    /// names what to remove instead.
    fn require_own_removal(&self, key: Key) -> Result<()> {
        let o = self.obj(key);
        if o.gone || o.exiting || o.parent == NONE || self.exit_plan(key) != Exit::WithParent {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::NotSupported,
            format!(
                "{} is removed by the kernel only with {}: remove that instead",
                self.describe(key),
                self.describe(o.parent)
            ),
        ))
    }

    /// Rule 18's `detach-mounts`: asks for the mounts and swap on every
    /// device of the affected set to be taken away.
    fn detach_kernel_users(&mut self, affected: &[(Key, ObjectId)]) {
        for &(k, id) in affected {
            let references: Vec<RefId> = self
                .kernel_refs(k)
                .into_iter()
                .filter(|(_, kind)| kind.detachable())
                .map(|(r, _)| r)
                .collect();
            if !references.is_empty() {
                self.effects.push(Effect::Detach { id, references });
            }
        }
    }

    /// Whether `key` would have to exit through a driver that cannot remove it.
    fn needs_unsupported_exit(&self, key: Key) -> bool {
        let o = self.obj(key);
        !o.gone && !o.exiting && matches!(self.exit_plan(key), Exit::NotSupported(_))
    }

    /// What a removal of `key` touches: its subtree, children first; for a
    /// driver, the subtrees its probes created, the bound objects, then itself.
    fn affected_set(&self, key: Key) -> Vec<(Key, ObjectId)> {
        let o = self.obj(key);
        if o.kind != Kind::Driver {
            return self.post_order(key);
        }
        let mut out = Vec::new();
        for &b in o.bound() {
            out.extend(self.scanned_subtrees(b));
            out.push((b, self.obj(b).id));
        }
        out.push((key, o.id));
        out
    }

    /// Whether `key` still names the object `id` (keys are reused by the slab).
    fn alive(&self, key: Key, id: ObjectId) -> bool {
        self.objects.get(key as usize).is_some_and(|o| o.id == id)
    }

    /// One step of a cascade (rule 4), applied children first: an idle object
    /// goes now; a busy one becomes `removing` and its holders are asked to
    /// let go; one already on its way keeps its own request.
    fn cascade_step(&mut self, key: Key, req: RequestId, root: Key) {
        let o = self.obj(key);
        if o.exiting {
            return;
        }
        if o.gone || o.removal.is_some() {
            // Already on its way under its own request; after a force it may
            // be idle now, so let it finish. Inside the walk its parent is a
            // later step, so only the root may settle upwards.
            if o.is_idle() {
                if key == root {
                    self.settle(key);
                } else if o.gone {
                    self.finish_removal(key);
                } else {
                    let req = o.removal.unwrap_or(req);
                    self.begin_exit(key, req);
                }
            }
            return;
        }
        if o.is_idle() {
            self.begin_exit(key, req);
            return;
        }
        self.change_state(key, |o| o.removal = Some(req));
        self.request_release(key, root);
    }

    /// Rule 11: tells the holders of `key` that a removal waits on them.
    fn request_release(&mut self, key: Key, root: Key) {
        let o = self.obj(key);
        if o.ref_count == 0 {
            return;
        }
        let references = self
            .ref_keys(key)
            .into_iter()
            .map(|r| self.refs[r as usize].id)
            .collect();
        let (id, waiting_for) = (o.id, self.obj(root).id);
        self.events.push(Event::ReleaseRequested {
            id,
            waiting_for,
            references,
        });
    }

    /// Rule 5: unbind idle bound objects now, hold back busy ones, tear down
    /// what the driver's probes created, and remove the driver when idle.
    fn remove_driver(&mut self, d: Key, req: RequestId) {
        let d_id = self.obj(d).id;
        let bound: Vec<(Key, ObjectId)> = self
            .obj(d)
            .bound()
            .iter()
            .map(|&b| (b, self.obj(b).id))
            .collect();
        // First tear down everything the driver's probes created, so that an
        // object both created and bound by this driver (a LUN bound to the
        // HBA driver that scanned it) is swept up before any hold is placed.
        for &(b, bid) in &bound {
            if !self.alive(b, bid) {
                continue;
            }
            for (k, kid) in self.scanned_subtrees(b) {
                if self.alive(k, kid) {
                    self.cascade_step(k, req, d);
                }
            }
        }
        for (b, bid) in bound {
            // The teardown may have removed it, completed its own pending
            // removal, or unbound it already.
            if !self.alive(b, bid) || self.obj(b).driver != d {
                continue;
            }
            let o = self.obj(b);
            if o.is_idle() && (o.removal.is_some() || o.gone) {
                // A forced removal just made it idle while its own removal was
                // pending: that removal goes first, through this driver, and
                // unbinds it as it completes.
                self.settle(b);
                if !self.alive(b, bid) || self.obj(b).driver != d {
                    continue;
                }
            }
            let o = self.obj(b);
            if o.ref_count == 0 && o.scanned_children == 0 && !o.exiting {
                self.unbind_now(b);
            } else if o.unbind_hold.is_none() {
                // Its holders were already asked if this removal swept it up.
                let asked = o.removal == Some(req);
                self.change_state(b, |o| o.unbind_hold = Some(req));
                if !asked {
                    self.request_release(b, d);
                }
            }
        }
        // Settling a bound object above can unbind the last binding of a
        // driver that was already pending (a forced or deadline-revoked
        // repeat) and complete it; then there is nothing left to do.
        if self.alive(d, d_id) {
            self.cascade_step(d, req, d);
        }
    }

    /// What a removal would do, without doing it: an object goes at once if
    /// it is unreferenced (or forced), its children all go, and its driver
    /// lets go synchronously; a driver's bound object is unbound at once if
    /// it is unreferenced (or forced) and what its probe created all goes.
    fn predict_removal(
        &self,
        key: Key,
        affected: &[(Key, ObjectId)],
        options: RemoveOptions,
    ) -> RemoveReport {
        let mut goes = rustc_hash::FxHashSet::default();
        let root_is_driver = self.obj(key).kind == Kind::Driver;
        let mut pending = Vec::new();
        for &(k, _) in affected {
            let o = self.obj(k);
            // What is left once force revokes the clients' references and
            // detach-mounts takes the mounts and swap: the kernel's other
            // users are never taken away (rule 18).
            let free = self.ref_keys(k).into_iter().all(|r| {
                let r = &self.refs[r as usize];
                match r.kernel {
                    None => options.force,
                    Some(kind) => options.detach_mounts && kind.detachable(),
                }
            });
            if root_is_driver && k != key && o.driver == key {
                // A bound object: it is unbound, not removed.
                let scanned_go = o
                    .children
                    .iter()
                    .filter(|&&c| self.obj(c).scanned)
                    .all(|c| goes.contains(c));
                if free && scanned_go {
                    goes.insert(k);
                } else {
                    pending.push(self.pending_object(k));
                }
                continue;
            }
            let children_go = o.children.iter().all(|c| goes.contains(c));
            let bound_go = o.bound().iter().all(|b| goes.contains(b));
            // A rider goes with its parent, which is in the affected set.
            let exits_now = o.gone
                || o.riding()
                || (!o.exiting && matches!(self.exit_plan(k), Exit::Done | Exit::WithParent));
            if free && children_go && bound_go && exits_now {
                goes.insert(k);
            } else {
                pending.push(self.pending_object(k));
            }
        }
        let outcome = if goes.contains(&key) {
            RemoveOutcome::Removed
        } else {
            RemoveOutcome::Pending
        };
        RemoveReport { outcome, pending }
    }

    fn pending_object(&self, key: Key) -> PendingObject {
        let o = self.obj(key);
        PendingObject {
            id: o.id,
            kind: o.kind,
            name: Arc::clone(&o.name),
            state: o.state(),
            holders: self.reference_infos(key),
        }
    }

    /// The report after a removal: what of the affected set is still here.
    fn report(&self, id: ObjectId, affected: &[(Key, ObjectId)]) -> RemoveReport {
        if !self.contains(id) {
            return RemoveReport {
                outcome: RemoveOutcome::Removed,
                pending: Vec::new(),
            };
        }
        let pending = affected
            .iter()
            .filter(|&&(k, kid)| self.alive(k, kid))
            .map(|&(k, _)| k)
            .filter(|&k| {
                let o = self.obj(k);
                o.state() != State::Live || !o.ref_count == 0
            })
            .map(|k| self.pending_object(k))
            .collect();
        RemoveReport {
            outcome: RemoveOutcome::Pending,
            pending,
        }
    }

    /// Cancels a pending request and everything it caused (rule 6): objects
    /// it made `removing` return to their administrative state, objects it
    /// held back are released. What other requests caused is untouched.
    fn cancel(&mut self, req: RequestId) {
        let Some(request) = self.requests.get(&req).cloned() else {
            return;
        };
        self.drop_request(req);
        let root = request.root;
        if self.obj(root).kind == Kind::Driver {
            self.change_state(root, |o| o.removal = None);
            self.release_driver_request(root, req);
            return;
        }
        let mut subtree = self.post_order(root);
        subtree.reverse();
        for (k, _) in subtree {
            self.clear_removal(k, req);
        }
    }

    /// Undoes what driver `d`'s removal `req` did to the objects bound to it:
    /// holds are released, the teardown of what its probes created is called off.
    fn release_driver_request(&mut self, d: Key, req: RequestId) {
        let bound: Vec<Key> = self.obj(d).bound().to_vec();
        // Holds first: an object both held and swept up (a LUN bound to the
        // driver that created it) must then change state only once.
        for &b in &bound {
            if self.obj(b).unbind_hold == Some(req) {
                self.change_state(b, |o| o.unbind_hold = None);
            }
        }
        for b in bound {
            let mut scanned = self.scanned_subtrees(b);
            scanned.reverse();
            for (k, _) in scanned {
                self.clear_removal(k, req);
            }
        }
    }

    /// Takes `key` out of request `req`. Walks run parents first, so if the
    /// parent is (still) being removed, what `req` covered still has to go:
    /// it passes to the parent's request instead of coming back.
    fn clear_removal(&mut self, key: Key, req: RequestId) {
        let o = self.obj(key);
        if o.removal != Some(req) {
            return;
        }
        let inherit = self.covering_request(key);
        if o.riding() {
            // Nothing real is under way for a rider until its parent acts
            // (and an acting parent cannot be called off): it rides on
            // whatever still removes its parent, or comes back.
            match inherit {
                Some(other) => self.obj_mut(key).removal = Some(other),
                None => {
                    self.stop_riding(key);
                    self.change_state(key, |o| o.removal = None);
                }
            }
            return;
        }
        if o.exiting {
            return;
        }
        self.change_state(key, |o| o.removal = inherit);
    }

    // ---------------------------------------------------- stop, reenable

    /// Stops an object: it refuses new users and is kept. On a `removing`
    /// object it cancels the removal and leaves it `stopped` (rule 7).
    pub fn stop(&mut self, id: ObjectId) -> Result<()> {
        let key = self.key(id)?;
        self.require_cancellable(key, "stopped")?;
        let own = self.root_request_of(key);
        if own.is_some() && self.covering_request(key).is_some() {
            return Err(Error::invalid_state(format!(
                "{} must go anyway: its parent, or the driver that created it, is being removed",
                self.describe(key)
            )));
        }
        self.change_state(key, |o| o.admin = Admin::Stopped);
        if let Some(req) = own {
            self.cancel(req);
        }
        self.settle_deferred();
        Ok(())
    }

    /// Re-enables a `stopped` or `removing` object (rule 6), cancelling its
    /// pending removal and everything that removal caused.
    pub fn reenable(&mut self, id: ObjectId) -> Result<()> {
        let key = self.key(id)?;
        self.require_cancellable(key, "re-enabled")?;
        let parent = self.obj(key).parent;
        if parent != NONE {
            self.require_live_chain(parent, "cannot have a child re-enabled under it")?;
        }
        if let Some(req) = self.obj(key).unbind_hold {
            let driver = self
                .requests
                .get(&req)
                .map(|r| r.root)
                .unwrap_or(self.obj(key).driver);
            return Err(Error::invalid_state(format!(
                "{} is held back by the pending removal of {}: re-enable that driver",
                self.describe(key),
                self.describe(driver)
            )));
        }
        let own = self.root_request_of(key);
        self.change_state(key, |o| o.admin = Admin::Live);
        if let Some(req) = own {
            self.cancel(req);
        }
        self.settle_deferred();
        Ok(())
    }

    /// Refuses stop / re-enable on objects whose state cannot be taken back.
    fn require_cancellable(&self, key: Key, verb: &str) -> Result<()> {
        let o = self.obj(key);
        if o.gone {
            return Err(Error::invalid_state(format!(
                "{} is gone (removed by the kernel) and cannot be {verb}",
                self.describe(key)
            )));
        }
        if o.exiting && !o.riding() {
            return Err(Error::invalid_state(format!(
                "{} is being torn down by its driver and cannot be {verb}",
                self.describe(key)
            )));
        }
        if let Some(req) = o.removal {
            if let Some(root) = self.requests.get(&req).map(|r| r.root) {
                if root != key {
                    return Err(Error::invalid_state(format!(
                        "{} is part of the pending removal of {}: stop or re-enable that instead",
                        self.describe(key),
                        self.describe(root)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Another pending request that needs `key` gone regardless of its own:
    /// its parent's removal, or, for a device its parent's driver created,
    /// the removal of that driver (which is holding the parent back).
    fn covering_request(&self, key: Key) -> Option<RequestId> {
        let o = self.obj(key);
        if o.parent == NONE {
            return None;
        }
        let parent = self.obj(o.parent);
        // Not one that was dropped while the parent's driver acts (the
        // parent keeps it, exiting; found by the fuzzer).
        let alive = |r: &RequestId| self.requests.contains_key(r);
        parent.removal.filter(alive).or(if o.scanned {
            parent.unbind_hold.filter(alive)
        } else {
            None
        })
    }

    // ------------------------------------------------- kernel and drivers

    /// Rule 8: the kernel removed the real thing. Idle objects (and the
    /// idle part of the subtree) go at once; referenced ones become `gone`
    /// and go when released. The name is free again at once.
    pub fn kernel_removed(&mut self, id: ObjectId) -> Result<()> {
        let key = self.key(id)?;
        for (k, kid) in self.post_order(key) {
            if !self.alive(k, kid) {
                continue;
            }
            let o = self.obj(k);
            if o.is_idle() {
                // Idle, or its driver's teardown is what the kernel just
                // confirmed (an exiting object is idle, unless a kernel user
                // raced in: then it is gone below, and goes with that user).
                // Parents inside the subtree come later in this walk; settling
                // them now would give them two transitions in one step.
                let (parent, driver) = (o.parent, o.driver);
                self.finish_removal(k);
                let outside_parent = if k == key { parent } else { NONE };
                for p in [outside_parent, driver] {
                    if p != NONE && self.objects.contains(p as usize) {
                        self.settle(p);
                    }
                }
                continue;
            }
            if o.gone {
                continue;
            }
            if o.riding() {
                self.stop_riding(k);
            } else if o.exiting {
                self.obj_mut(k).exiting = false;
            }
            if let Some(req) = self.root_request_of(k) {
                // Its descendants were handled first; for a driver, call off
                // what its removal did to the objects bound to it.
                self.drop_request(req);
                if self.obj(k).kind == Kind::Driver {
                    self.release_driver_request(k, req);
                }
            }
            self.change_state(k, |o| {
                o.gone = true;
                o.removal = None;
                o.unbind_hold = None;
            });
            let o = self.obj(k);
            let (slot, name) = (name_slot(o.kind, o.origin), Arc::clone(&o.name));
            self.names[slot].remove(&*name);
            self.release_scanned(k);
            if self.obj(k).driver != NONE {
                let d = self.obj(k).driver;
                self.unbind_now(k);
                self.settle(d);
            }
            let bound: Vec<Key> = self.obj(k).bound().to_vec();
            for b in bound {
                self.unbind_now(b);
            }
            self.settle(k);
        }
        self.settle_deferred();
        Ok(())
    }

    /// The kernel changed what it says of `id` (a `change` uevent): its
    /// attributes become `attributes`. Nothing is emitted if they are the same.
    pub fn set_attributes(
        &mut self,
        id: ObjectId,
        attributes: BTreeMap<String, String>,
    ) -> Result<()> {
        let key = self.key(id)?;
        validate::attributes(&attributes)?;
        if self.obj(key).attributes.to_map() == attributes {
            return Ok(());
        }
        self.obj_mut(key).attributes = crate::Attributes::from_map(&attributes);
        self.events
            .push(Event::AttributesChanged { id, attributes });
        Ok(())
    }

    /// The kernel renamed `id` (a `move` uevent). Refused, changing nothing,
    /// if another object of its kind has the new name.
    pub fn kernel_renamed(&mut self, id: ObjectId, name: &str, sys_path: &str) -> Result<()> {
        let key = self.key(id)?;
        validate::name(name)?;
        let (kind, origin, gone, old) = {
            let o = self.obj(key);
            (o.kind, o.origin, o.gone, o.name.clone())
        };
        let old_path = self.obj(key).view().sys_path.to_owned();
        if *old == *name && old_path == sys_path {
            return Ok(());
        }
        let name: Arc<str> = Arc::from(name);
        if *old != *name {
            self.require_free_name(kind, origin, &name)?;
            // A gone object's name is already free (rule 8); it stays unindexed.
            if !gone {
                let slot = name_slot(kind, origin);
                self.names[slot].remove(&*old);
                self.names[slot].insert(name.clone(), key);
            }
            self.obj_mut(key).name = name.clone();
        }
        self.obj_mut(key).extra_mut().sys_path = sys_path.to_owned();
        self.events.push(Event::Renamed {
            id,
            name,
            sys_path: sys_path.to_owned(),
        });
        Ok(())
    }

    /// The kernel bound `id` to `driver` (a `bind` uevent, or `DRIVER=` on a
    /// device that appeared bound). The kernel has done it: nothing is
    /// probed and no state is checked; a previous binding is replaced.
    pub fn kernel_bound(&mut self, id: ObjectId, driver: ObjectId) -> Result<()> {
        let key = self.key(id)?;
        let d = self.key(driver)?;
        if self.obj(key).kind == Kind::Driver || self.obj(d).kind != Kind::Driver {
            return Err(Error::invalid_argument(
                "only a host or device can be bound, and only to a driver",
            ));
        }
        // A bind uevent naming what the kernel already removed is stale:
        // binding to a gone driver would leave the object on a driver that
        // no removal will ever unbind it from.
        for k in [key, d] {
            if self.obj(k).gone {
                return Err(Error::invalid_state(format!(
                    "{} is gone from the kernel: it cannot be bound",
                    self.describe(k)
                )));
            }
        }
        let old = self.obj(key).driver;
        if old == d {
            return Ok(());
        }
        if old != NONE {
            self.unbind_now(key);
        }
        self.bind_now(key, d);
        self.settle_deferred();
        Ok(())
    }

    /// The kernel unbound `id` from its driver (an `unbind` uevent). If
    /// unbinding was the driver action of its removal, this is the kernel's
    /// confirmation and the removal completes; otherwise the binding just
    /// ends (and a driver removal waiting on it may complete).
    pub fn kernel_unbound(&mut self, id: ObjectId) -> Result<()> {
        let key = self.key(id)?;
        if self.obj(key).exiting {
            if let Exit::Later(action) = self.exit_plan(key) {
                if action.verb == crate::kernel::verbs::DRIVER_UNBIND {
                    return self.exit_finished(id, Ok(()));
                }
            }
        }
        if self.obj(key).driver == NONE {
            return Ok(());
        }
        self.unbind_now(key);
        self.settle_deferred();
        Ok(())
    }

    /// The caller finished a driver action ([`Effect::Exit`]): on success the
    /// object leaves the model; on failure it stays `stopped` with the error.
    pub fn exit_finished(&mut self, id: ObjectId, result: ExitResult) -> Result<()> {
        let key = self.key(id)?;
        if !self.obj(key).exiting {
            return Err(Error::invalid_state(format!(
                "{} has no driver action in flight",
                self.describe(key)
            )));
        }
        if self.obj(key).riding() {
            return Err(Error::invalid_state(format!(
                "{} goes with its parent: it has no driver action of its own",
                self.describe(key)
            )));
        }
        match result {
            Ok(()) if !self.obj(key).is_idle() => {
                // A kernel user raced in while the driver acted (rule 19
                // keeps mounts out, not every open): it is gone from the
                // driver now, and goes with that user.
                return self.kernel_removed(id);
            }
            Ok(()) => {
                let o = self.obj(key);
                let next: Vec<(Key, ObjectId)> = [o.parent, o.driver]
                    .into_iter()
                    .filter(|&p| p != NONE)
                    .map(|p| (p, self.obj(p).id))
                    .collect();
                // What rode on it goes with it, children first.
                for (k, kid) in self.post_order(key) {
                    if k != key && self.alive(k, kid) {
                        self.finish_removal(k);
                    }
                }
                self.finish_removal(key);
                // Settling the parent can complete the driver too (when the
                // parent is bound to the same removing driver): then there
                // is nothing left to settle there.
                for (p, id) in next {
                    if self.alive(p, id) {
                        self.settle(p);
                    }
                }
            }
            Err(error) => self.fail_exit(key, error),
        }
        self.settle_deferred();
        Ok(())
    }

    /// Rule 10: applies every deadline that has passed by `now`. Returns how
    /// many requests expired.
    pub fn tick(&mut self, now: Micros) -> usize {
        let mut expired = 0;
        while let Some(&(t, req)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(request) = self.requests.get_mut(&req) else {
                continue;
            };
            expired += 1;
            let Some((_, action)) = request.deadline.take() else {
                continue;
            };
            let root = request.root;
            match action {
                // A driver action already under way cannot be called off
                // (as Reenable refuses it): the removal runs to its end.
                OnTimeout::Cancel if self.obj(root).exiting => {}
                OnTimeout::Cancel => {
                    self.cancel(req);
                    self.settle_deferred();
                }
                OnTimeout::Revoke => {
                    let id = self.obj(root).id;
                    let force = RemoveOptions {
                        force: true,
                        ..RemoveOptions::default()
                    };
                    // The root is pending and exists, so this cannot fail.
                    let _ = self.remove(id, force, now);
                }
            }
        }
        expired
    }
}
