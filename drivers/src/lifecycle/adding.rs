//! Adding objects, and running a driver's probe on what is added bound to
//! it (its scan's finds are added with it).
//!
//! Rules: 2 and 3 (an API object's parent must be live: `add`), 4 (a real
//! device that appears under a parent being removed joins that removal:
//! `join_parents_removal`), 13 (every object gets a fresh id:
//! `insert_object`), 20 (names are unique per kind within an origin, and an
//! API name never takes a scope prefix: `add`, `require_free_name`; a real
//! device appears under whatever state its parent is in).

use std::collections::BTreeMap;
use std::sync::Arc;

use proto::{Kind, Origin, State};

use crate::driver::ProbeOptions;
use crate::error::{Error, ErrorKind, Result};
use crate::event::Event;
use crate::ids::{compose, ObjectId, MAX_SLOTS};
use crate::model::{name_slot, scope_prefix, Admin, Key, Model, Object, NONE};
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

impl Model {
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
    pub(super) fn probe(
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

    pub(super) fn create_scanned(
        &mut self,
        parent: Key,
        d: Key,
        found: Vec<crate::driver::NewChild>,
    ) {
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

    pub(super) fn require_free_name(&self, kind: Kind, origin: Origin, name: &str) -> Result<()> {
        match self.names[name_slot(kind, origin)].get(name) {
            None => Ok(()),
            Some(&k) => Err(Error::new(
                ErrorKind::NameInUse,
                format!("{} already has that name", self.describe(k)),
            )),
        }
    }
}
