//! The lifecycle operations of DESIGN.md §2, one family to a file: adding
//! (and probing), binding, references, removal, cancelling a removal, the
//! kernel's events, completion, and riders. The kernel's users (rules 17–19)
//! are `kernel_users.rs`; storage, queries and invariants are `model.rs`.
//!
//! Every operation validates before it mutates, so a refused operation
//! changes nothing and emits nothing. Every operation costs O(the subtree it
//! touches) and never waits (rule 12): a busy object is marked and settles
//! later, when the release that makes it idle arrives.
//!
//! This file holds what the families share: rules 2 and 3's live chain
//! (`require_live_chain`), rule 14's one event per transition
//! (`change_state`), the children-first walks of rule 4 (`post_order`,
//! `scanned_subtrees`), and a removal request's bookkeeping.

mod adding;
mod binding;
mod cancelling;
mod completion;
mod kernel_events;
mod references;
mod removal;
mod riders;

pub use adding::AddRequest;
pub use completion::ExitResult;
pub use removal::{PendingObject, RemoveOptions, RemoveReport};

use proto::State;

use crate::error::{Error, Result};
use crate::event::Event;
use crate::ids::{ObjectId, RequestId};
use crate::model::{Key, Model, Object, NONE};

impl Model {
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

    /// Whether `key` still names the object `id` (keys are reused by the slab).
    fn alive(&self, key: Key, id: ObjectId) -> bool {
        self.objects.get(key as usize).is_some_and(|o| o.id == id)
    }
}
