//! Binding hosts and devices to drivers and unbinding them: `bind` runs the
//! driver's probe and adds what it finds; `unbind` tears that down again,
//! refused while anything involved is referenced unless forced.
//!
//! Rules: 2 (a disabled object takes no new binding: `bind`), 5 (`unbind_now`,
//! which a driver's removal applies to its idle objects), 16 (binding to the
//! driver it is bound to already, or unbinding what is not bound, changes
//! nothing).

use proto::Kind;

use crate::driver::{Exit, ProbeOptions};
use crate::error::{Error, ErrorKind, Result};
use crate::event::Event;
use crate::ids::ObjectId;
use crate::model::{Key, Model, NONE};

impl Model {
    pub(super) fn bind_now(&mut self, key: Key, d: Key) {
        let pos = self.obj(d).bound().len() as u32;
        self.obj_mut(d).extra_mut().bound.push(key);
        let o = self.obj_mut(key);
        o.driver = d;
        o.pos_in_driver = pos;
        let (id, driver) = (o.id, self.obj(d).id);
        self.events.push(Event::Bound { id, driver });
    }

    pub(super) fn unbind_now(&mut self, key: Key) {
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
}
