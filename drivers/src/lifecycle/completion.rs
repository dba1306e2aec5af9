//! Completion: what follows when an object may have become idle (`settle`),
//! when a driver action ends (`exit_finished`) and when time passes
//! (`tick`); an idle object's exit through its driver (`begin_exit`), and
//! its leaving the model (`finish_removal`).
//!
//! Rules: 1 (a pending removal completes by itself once idle: `settle`), 4
//! (the parent completes last: `settle` climbs to parents and drivers), 5
//! (held-back unbindings: `settle`), 10 (`tick`), 14 (what a walk would
//! climb to before visiting it waits for its end: `settle_deferred`), 20
//! (an exit that fails or is not supported keeps the object, `stopped`:
//! `begin_exit`, `fail_exit`).

use std::sync::Arc;

use proto::{OnTimeout, Origin, State};

use super::removal::RemoveOptions;
use crate::driver::{Exit, ImplId};
use crate::error::{Error, Result};
use crate::event::{Effect, Event};
use crate::ids::{Micros, ObjectId, RequestId};
use crate::model::{name_slot, Admin, Key, Model, NONE};

/// Outcome of a driver action reported back by the caller.
pub type ExitResult = std::result::Result<(), String>;

impl Model {
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
    pub(super) fn exit_plan(&self, key: Key) -> Exit {
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
    pub(super) fn begin_exit(&mut self, key: Key, req: RequestId) -> bool {
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

    pub(super) fn set_error(&mut self, key: Key, error: String) {
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
    pub(super) fn release_scanned(&mut self, key: Key) {
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
    pub(super) fn finish_removal(&mut self, key: Key) {
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
