//! Removal: `remove` with its cascade, force, dry-run, deadline and
//! detach-mounts, and the removal of a driver.
//!
//! Rules: 1 (remove never waits: `remove`, `cascade_step`, `report`), 4 (the
//! cascade, bottom-up: `affected_set`, `cascade_step`), 5 (`remove_driver`),
//! 9 (force: `remove` revokes over the affected set), 10 (`remove` sets the
//! deadline; `tick` applies it), 11 (`request_release`), 16 (removing a
//! `removing` object answers the same, with no new event: `remove`), 18
//! (`detach_kernel_users`; `predict_removal` counts what force leaves), 20
//! (`require_own_removal`, and a removal no driver can carry out is refused
//! before anything changes).

use std::sync::Arc;

use proto::{Kind, OnTimeout, RemoveOutcome, State};

use crate::driver::Exit;
use crate::error::{Error, ErrorKind, Result};
use crate::event::{Effect, Event};
use crate::ids::{Micros, ObjectId, RefId, RequestId};
use crate::model::{Key, Model, ReferenceInfo, Request, NONE};

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

impl Model {
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

    /// One step of a cascade (rule 4), applied children first: an idle object
    /// goes now; a busy one becomes `removing` and its holders are asked to
    /// let go; one already on its way keeps its own request.
    pub(super) fn cascade_step(&mut self, key: Key, req: RequestId, root: Key) {
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
}
