//! Calling a removal off: `stop`, `reenable`, and `cancel` (which an expired
//! `cancel` deadline uses too), undoing exactly what the removal caused.
//!
//! Rules: 6 (re-enable cancels the removal and what it caused, not what
//! another request caused, and no child is re-enabled under a disabled
//! parent: `reenable`, `cancel`, `clear_removal`, `covering_request`), 7
//! (stop on a `removing` object: `stop`), 16 (stopping a stopped object, or
//! re-enabling a live one, changes nothing).

use proto::Kind;

use crate::error::{Error, Result};
use crate::ids::{ObjectId, RequestId};
use crate::model::{Admin, Key, Model, NONE};

impl Model {
    /// Cancels a pending request and everything it caused (rule 6): objects
    /// it made `removing` return to their administrative state, objects it
    /// held back are released. What other requests caused is untouched.
    pub(super) fn cancel(&mut self, req: RequestId) {
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
    pub(super) fn release_driver_request(&mut self, d: Key, req: RequestId) {
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
    pub(super) fn covering_request(&self, key: Key) -> Option<RequestId> {
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
}
