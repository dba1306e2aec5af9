//! Riders: objects the kernel removes only with their parent (a partition, a
//! SCSI device's disk), which ride on their parent's removal rather than
//! exit on their own.
//!
//! Rules: 17 (a rider that gets a user, or a busy child, waits on its own
//! again, and so does every riding ancestor: `busy_again`, `stop_riding`),
//! 20 (the model never drops what the kernel keeps: `begin_exit` makes
//! riders; `fail_riders` keeps them when their carrier's removal fails,
//! `release_riders` when it is called off).

use crate::model::{Admin, Key, Model, NONE};

impl Model {
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
    pub(super) fn fail_riders(&mut self, key: Key, error: &str) {
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
}
