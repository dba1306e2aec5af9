//! The owner's side of the kernel's users: what the watcher reports for a
//! device becomes the model's kernel-user references (rule 17) — a user
//! that appeared begins one, a user that went ends its own — and the
//! details `detach-mounts` needs (rule 18). It also tells the watcher which
//! block devices the model holds, from the events of each batch.

use std::collections::{BTreeMap, HashMap, HashSet};

use drivers::{Event, Model, ObjectId, RefId};

use super::watcher::{Command, Handle};
use super::{Detail, Device, Report, UserKey};

/// Each device's kernel users, by what identifies them.
#[derive(Default)]
pub struct Registry {
    by_object: HashMap<ObjectId, BTreeMap<UserKey, (RefId, Detail)>>,
    /// The watcher, if devmgrd follows the machine's devices.
    watcher: Option<Handle>,
    /// The devices it follows (so that a simulated host's 100,000 LUNs
    /// going cost it nothing).
    tracked: HashSet<ObjectId>,
}

impl Registry {
    /// A registry that keeps `watcher` told of the model's block devices.
    pub fn new(watcher: Option<Handle>) -> Registry {
        Registry {
            by_object: HashMap::new(),
            watcher,
            tracked: HashSet::new(),
        }
    }

    /// Makes the model's kernel users of `report.id` what the report says.
    /// New users begin before old ones end, so a removal waiting on a
    /// device never completes in between (a remount, a holder handing over
    /// to its child).
    pub fn apply(&mut self, model: &mut Model, report: Report, now: u64) {
        let id = report.id;
        let mut current = self.by_object.remove(&id).unwrap_or_default();
        if !model.contains(id) {
            return; // it left the model: its references went with it
        }
        let mut next = BTreeMap::new();
        for found in report.users {
            if next.contains_key(&found.key) {
                continue;
            }
            match current.remove(&found.key) {
                Some((reference, _)) => {
                    next.insert(found.key, (reference, found.detail));
                }
                None => match model.kernel_use_began(id, found.user, now) {
                    Ok(reference) => {
                        next.insert(found.key, (reference, found.detail));
                    }
                    Err(e) => tracing::warn!("recording a kernel user of object {id}: {e}"),
                },
            }
        }
        for (_, (reference, _)) in current {
            if let Err(e) = model.kernel_use_ended(reference) {
                tracing::debug!("ending kernel user {reference} of object {id}: {e}");
            }
        }
        if !next.is_empty() {
            self.by_object.insert(id, next);
        }
    }

    /// How to take away these kernel users of `id`.
    pub fn details(&self, id: ObjectId, references: &[RefId]) -> Vec<Detail> {
        self.by_object.get(&id).map_or_else(Vec::new, |users| {
            users
                .values()
                .filter(|(r, _)| references.contains(r))
                .map(|(_, d)| d.clone())
                .collect()
        })
    }

    /// Tells the watcher about block devices that appeared, were renamed
    /// or left the model in this batch.
    pub fn observe(&mut self, events: &[Event]) {
        for event in events {
            match event {
                Event::Added(info) => {
                    if let (Some(w), Some(device)) = (&self.watcher, Device::of(info)) {
                        self.tracked.insert(device.id);
                        w.send(Command::Track(device));
                    }
                }
                Event::Renamed { id, name, .. } if self.tracked.contains(id) => {
                    if let Some(w) = &self.watcher {
                        w.send(Command::Renamed {
                            id: *id,
                            name: name.to_string(),
                        });
                    }
                }
                Event::Removed { id, .. } if self.tracked.remove(id) => {
                    self.by_object.remove(id);
                    if let Some(w) = &self.watcher {
                        w.send(Command::Untrack(*id));
                    }
                }
                _ => {}
            }
        }
    }
}
