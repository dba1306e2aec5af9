//! What the kernel says of the real devices, recorded as given (the
//! ingestion's commands): a device removed, bound, unbound or renamed, and
//! its new attributes.
//!
//! Rules: 8 (`kernel_removed`: a referenced object becomes `gone`, an idle
//! one goes at once, and its name is free again at once), 20 (the model
//! follows the machine: no state refuses what the kernel did, and an unbind
//! that a removal asked for completes it: `kernel_unbound`).

use std::collections::BTreeMap;
use std::sync::Arc;

use proto::Kind;

use crate::driver::Exit;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::ids::ObjectId;
use crate::model::{name_slot, Key, Model, NONE};
use crate::validate;

impl Model {
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
}
