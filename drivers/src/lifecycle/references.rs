//! References: taking one (`acquire`, within the quotas), letting one go
//! (`release`), and revoking them (`revoke_all`).
//!
//! Rules: 1 (a release that leaves an object idle completes its pending
//! removal: `drop_reference`), 2 and 3 (a new reference needs the object
//! and every ancestor live: `acquire`), 9 (force revokes, and tells each
//! holder: `revoke_all`), 15 (every reference names its holder:
//! `insert_reference`), 18 (force never revokes a kernel user, and only the
//! kernel ends one: `revoke_all`, `release`).

use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::event::Event;
use crate::ids::{compose, Micros, ObjectId, RefId, MAX_SLOTS};
use crate::kernel_users::KernelUse;
use crate::model::{Holder, Key, Model, NONE};
use crate::validate;

impl Model {
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
    pub(super) fn revoke_all(&mut self, key: Key) {
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
}
