//! What of the model survives a restart (`--state-dir`), and how it comes
//! back: the records, the tracker that turns each batch's events into
//! record changes, and the restore that rebuilds a fresh model from records
//! (`restore.rs`). Pure and synchronous; the files are `state/store.rs`'s
//! business.
//!
//! Kept: objects added through the API (kind, name, parent, driver,
//! attributes, state), the admin state (`stopped`, `removing`) of real
//! devices by sys path, and a reserve of object-id sequence numbers, so no
//! id handed out before a crash is handed out again. Not kept: references
//! (their handles see the hang-up when the daemon dies), removal deadlines,
//! `LastError`, and the ids themselves — a restored object is a new object
//! (ids name slots of the engine's arena); it keeps its name.

mod restore;

use std::collections::{BTreeMap, HashMap};

use drivers::{Event, Model, ObjectId, ObjectInfo, Origin, RemoveOptions};
use proto::{Kind, State};
use serde::{Deserialize, Serialize};

/// How many object-id sequence numbers one durable reservation covers: a
/// storm of new devices costs one write per this many.
pub const SEQUENCE_RESERVE: u64 = 1 << 16;

/// Another object, as a record names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Link {
    /// An API object, by the id its record has.
    Object(u64),
    /// A real device, by sys path.
    Device(String),
}

/// An object added through the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    /// Its id when the record was written.
    pub id: u64,
    /// Driver, host or device.
    pub kind: Kind,
    /// Its name.
    pub name: String,
    /// Its parent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Link>,
    /// The driver it is bound to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<Link>,
    /// Its attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Made by its parent's driver (a scan), not added on its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub scanned: bool,
    /// `live`, `stopped` or `removing`.
    pub state: State,
}

/// The admin state of a real device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Its sysfs path.
    pub sys_path: String,
    /// `stopped` or `removing`.
    pub state: State,
}

/// One thing kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Record {
    /// An API object.
    Object(ObjectRecord),
    /// A real device's admin state.
    Device(DeviceRecord),
}

impl Record {
    /// What a later change or deletion names it by.
    pub fn key(&self) -> Link {
        match self {
            Record::Object(r) => Link::Object(r.id),
            Record::Device(r) => Link::Device(r.sys_path.clone()),
        }
    }
}

/// One change to what is kept: a journal line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// Keep this record (replacing one with the same key).
    Put(Record),
    /// Forget the record with this key.
    Delete(Link),
    /// Object ids up to this sequence number may have been handed out.
    Sequence(u64),
}

/// Everything kept, as loaded or as it stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Kept {
    /// The records, by key.
    pub records: HashMap<Link, Record>,
    /// The highest object-id sequence number that may have been used.
    pub sequence: u64,
}

impl Kept {
    /// Applies one change (idempotent: a journal replayed twice is fine).
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Put(record) => {
                self.records.insert(record.key(), record);
            }
            Change::Delete(key) => {
                self.records.remove(&key);
            }
            Change::Sequence(n) => self.sequence = self.sequence.max(n),
        }
    }
}

/// What the tracker knows of each object in the model.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tracked {
    Api(ObjectRecord),
    Device { sys_path: String, state: State },
}

/// Whether a state is worth keeping for a real device.
fn admin(state: State) -> bool {
    matches!(state, State::Stopped | State::Removing)
}

/// Follows the model through its events and says what to keep.
#[derive(Debug, Default)]
pub struct Tracker {
    objects: HashMap<ObjectId, Tracked>,
    /// Sequence numbers reserved durably; past it, reserve more.
    reserved: u64,
    /// Real devices' admin state from the last run, applied when the
    /// device shows up (by sys path), until the coldplug is over.
    awaiting: HashMap<String, State>,
    /// API objects whose parent or driver is a real device: restored once
    /// the coldplug has modelled the real devices.
    deferred: Vec<ObjectRecord>,
    /// Old id → new id of the objects restored so far.
    restored: HashMap<u64, ObjectId>,
    /// The coldplug is over: once this batch's events are followed, place
    /// what waited for it.
    coldplug_over: bool,
    /// Remembered states of real devices that came back with API objects
    /// waiting to go under them (or be bound to them): set once those are
    /// placed, as a disabled object takes no new children.
    held_states: Vec<(ObjectId, State)>,
}

impl Tracker {
    /// Starts tracking every object the model holds.
    fn track_all(&mut self, model: &Model) {
        for info in model.list() {
            let tracked = self.describe(&info);
            self.objects.insert(info.id, tracked);
        }
    }

    /// How `info` is kept (API objects) or followed (real devices).
    fn describe(&self, info: &ObjectInfo) -> Tracked {
        match info.origin {
            Origin::Api => Tracked::Api(ObjectRecord {
                id: info.id.0,
                kind: info.kind,
                name: info.name.to_string(),
                parent: info.parent.and_then(|p| self.link(p)),
                driver: info.driver.and_then(|d| self.link(d)),
                attributes: info.attributes.clone(),
                scanned: info.scanned,
                state: info.state,
            }),
            Origin::Udev => Tracked::Device {
                sys_path: info.sys_path.clone(),
                state: info.state,
            },
        }
    }

    fn link(&self, id: ObjectId) -> Option<Link> {
        match self.objects.get(&id)? {
            Tracked::Api(_) => Some(Link::Object(id.0)),
            Tracked::Device { sys_path, .. } => Some(Link::Device(sys_path.clone())),
        }
    }

    /// Follows one batch: returns what to keep. Applies a remembered admin
    /// state to a real device as it appears, appending what that caused
    /// to `events` (so the same batch publishes it).
    pub fn observe(&mut self, model: &mut Model, events: &mut Vec<Event>, now: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut i = 0;
        loop {
            if i < events.len() {
                self.follow(model, &events[i], now, &mut changes);
                i += 1;
                continue;
            }
            // What following caused (a remembered stop), followed in turn.
            let caused = model.take_events();
            if !caused.is_empty() {
                events.extend(caused);
                continue;
            }
            if std::mem::take(&mut self.coldplug_over) {
                self.finish_coldplug(model, now, &mut changes);
                continue;
            }
            break;
        }
        let sequence = model.object_sequence();
        if sequence > self.reserved {
            self.reserved = sequence.saturating_add(SEQUENCE_RESERVE);
            changes.push(Change::Sequence(self.reserved));
        }
        changes
    }

    fn follow(&mut self, model: &mut Model, event: &Event, now: u64, changes: &mut Vec<Change>) {
        match event {
            Event::Added(info) => {
                let tracked = self.describe(info);
                if self.objects.get(&info.id) == Some(&tracked) {
                    return; // restored at start: already kept as it is
                }
                match &tracked {
                    Tracked::Api(record) => {
                        changes.push(Change::Put(Record::Object(record.clone())))
                    }
                    Tracked::Device { sys_path, .. } => {
                        if let Some(state) = self.awaiting.remove(sys_path) {
                            let link = Some(Link::Device(sys_path.clone()));
                            let awaited = self
                                .deferred
                                .iter()
                                .any(|r| r.parent == link || r.driver == link);
                            if awaited {
                                self.held_states.push((info.id, state));
                            } else if let Err(e) = set_state(model, info.id, state, now) {
                                // Its events follow in this batch (and are followed).
                                tracing::warn!("cannot make {sys_path} {state} again: {e}");
                                changes.push(Change::Delete(Link::Device(sys_path.clone())));
                            }
                        }
                    }
                }
                self.objects.insert(info.id, tracked);
            }
            Event::StateChanged { id, to, .. } => self.update(*id, changes, |t| match t {
                Tracked::Api(r) => r.state = *to,
                Tracked::Device { state, .. } => *state = *to,
            }),
            Event::Bound { id, driver } => {
                let link = self.link(*driver);
                self.update(*id, changes, |t| {
                    if let Tracked::Api(r) = t {
                        r.driver = link;
                    }
                });
            }
            Event::Unbound { id, .. } => self.update(*id, changes, |t| {
                if let Tracked::Api(r) = t {
                    r.driver = None;
                }
            }),
            Event::Renamed { id, sys_path, .. } => {
                if let Some(Tracked::Device {
                    sys_path: old,
                    state,
                }) = self.objects.get(id)
                {
                    if admin(*state) {
                        changes.push(Change::Delete(Link::Device(old.clone())));
                    }
                }
                self.update(*id, changes, |t| {
                    if let Tracked::Device { sys_path: p, .. } = t {
                        p.clone_from(sys_path);
                    }
                });
            }
            Event::Removed { id, .. } => match self.objects.remove(id) {
                Some(Tracked::Api(_)) => changes.push(Change::Delete(Link::Object(id.0))),
                Some(Tracked::Device { sys_path, state }) if admin(state) => {
                    changes.push(Change::Delete(Link::Device(sys_path)));
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// Changes what is known of `id` and says what to keep of it now.
    fn update(&mut self, id: ObjectId, changes: &mut Vec<Change>, edit: impl FnOnce(&mut Tracked)) {
        let Some(tracked) = self.objects.get_mut(&id) else {
            return;
        };
        let was_kept = matches!(tracked, Tracked::Device { state, .. } if admin(*state));
        edit(tracked);
        match tracked {
            Tracked::Api(record) => changes.push(Change::Put(Record::Object(record.clone()))),
            Tracked::Device { sys_path, state } => {
                if admin(*state) {
                    changes.push(Change::Put(Record::Device(DeviceRecord {
                        sys_path: sys_path.clone(),
                        state: *state,
                    })));
                } else if was_kept {
                    changes.push(Change::Delete(Link::Device(sys_path.clone())));
                }
            }
        }
    }

    /// The coldplug is over (every device that existed at start is in
    /// this batch or an earlier one): see [`Tracker::finish_coldplug`].
    pub fn coldplug_done(&mut self) {
        self.coldplug_over = true;
    }

    /// Everything to keep about the model as it stands, plus what still
    /// waits (for a compaction snapshot).
    pub fn snapshot(&self) -> Kept {
        let mut kept = Kept {
            records: HashMap::new(),
            sequence: self.reserved,
        };
        for tracked in self.objects.values() {
            let record = match tracked {
                Tracked::Api(r) => Record::Object(r.clone()),
                Tracked::Device { sys_path, state } if admin(*state) => {
                    Record::Device(DeviceRecord {
                        sys_path: sys_path.clone(),
                        state: *state,
                    })
                }
                Tracked::Device { .. } => continue,
            };
            kept.records.insert(record.key(), record);
        }
        for (sys_path, state) in &self.awaiting {
            let record = Record::Device(DeviceRecord {
                sys_path: sys_path.clone(),
                state: *state,
            });
            kept.records.insert(record.key(), record);
        }
        for record in &self.deferred {
            let mut record = record.clone();
            // Links to objects restored meanwhile name their new ids.
            for link in [&mut record.parent, &mut record.driver]
                .into_iter()
                .flatten()
            {
                if let Link::Object(old) = link {
                    if let Some(id) = self.restored.get(old) {
                        *old = id.0;
                    }
                }
            }
            let record = Record::Object(record);
            kept.records.insert(record.key(), record);
        }
        kept
    }
}

/// Brings `id` to `state` (`stopped` or `removing`) as the API would.
fn set_state(model: &mut Model, id: ObjectId, state: State, now: u64) -> drivers::Result<()> {
    match state {
        State::Stopped => model.stop(id),
        State::Removing => model.remove(id, RemoveOptions::default(), now).map(|_| ()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drivers::{AddRequest, Holder, ProbeOptions, Registry};
    use std::sync::Arc;

    /// What a restart must keep of one object: everything but its id,
    /// references and last error.
    type Shape = (
        Kind,
        String,
        State,
        Option<String>,
        Option<String>,
        Origin,
        bool,
    );

    fn shapes(model: &Model) -> Vec<(Shape, BTreeMap<String, String>)> {
        let all = model.list();
        let name = |id: Option<ObjectId>| {
            id.and_then(|id| all.iter().find(|o| o.id == id))
                .map(|o| o.name.to_string())
        };
        let mut shapes: Vec<_> = all
            .iter()
            .map(|o| {
                let shape = (
                    o.kind,
                    o.name.to_string(),
                    o.state,
                    name(o.parent),
                    name(o.driver),
                    o.origin,
                    o.scanned,
                );
                (shape, o.attributes.clone())
            })
            .collect();
        shapes.sort();
        shapes
    }

    fn real_device(model: &mut Model, name: &str) -> ObjectId {
        let mut request = AddRequest::new(Kind::Device, name);
        request.origin = Origin::Udev;
        request.subsystem = "block".to_owned();
        request.sys_path = format!("/sys/devices/virtual/block/{name}");
        model.add(request).expect("real device")
    }

    fn fresh(sequence: u64) -> Model {
        let mut model = Model::with_sequence_after(Registry::builtin(), sequence);
        model
            .add(AddRequest::new(Kind::Driver, proto::SIM_SCSI_DRIVER))
            .expect("sim-scsi");
        model
    }

    /// Keeps a model through a tracker, "restarts" into a fresh model,
    /// brings the real device back by coldplug, and compares.
    #[test]
    fn a_restored_model_is_the_one_that_was_kept() {
        let mut model = fresh(0);
        let (mut tracker, _) = Tracker::restore(&mut model, &Kept::default(), 0);
        let mut kept = tracker.snapshot();
        let sim = model
            .find(Kind::Driver, proto::SIM_SCSI_DRIVER)
            .expect("sim");
        let host = model
            .add(AddRequest::new(Kind::Host, "host3").driver(sim).luns(3))
            .expect("host");
        let lun1 = model.find(Kind::Device, "3:0:0:1").expect("lun 1");
        let lun2 = model.find(Kind::Device, "3:0:0:2").expect("lun 2");
        model.stop(lun1).expect("stop a lun");
        model
            .remove(lun2, RemoveOptions::default(), 0)
            .expect("remove a lun");
        // A driver made after what it is bound to.
        let disk = model
            .add(
                AddRequest::new(Kind::Device, "disk")
                    .parent(host)
                    .attribute("k", "v"),
            )
            .expect("disk");
        let fs = model.add(AddRequest::new(Kind::Driver, "fs")).expect("fs");
        model.bind(disk, fs, ProbeOptions::default()).expect("bind");
        // Held while its removal was asked: it completes after the restart.
        let held = model
            .add(AddRequest::new(Kind::Device, "held"))
            .expect("held");
        let holder = Arc::new(Holder {
            key: 1,
            bus_name: ":1.1".to_owned(),
            uid: 0,
            pid: 1,
        });
        model.acquire(held, holder, "test", 0).expect("acquire");
        model
            .remove(held, RemoveOptions::default(), 0)
            .expect("remove held");
        // A real device stopped, with an API device under it.
        let loop7 = real_device(&mut model, "loop7");
        model.stop(loop7).expect("stop the real device");
        let real_parent = model
            .add(AddRequest::new(Kind::Device, "on-real"))
            .expect("child of nothing yet");
        model
            .remove(real_parent, RemoveOptions::default(), 0)
            .expect("remove it again");
        let on_real = model
            .add(AddRequest::new(Kind::Device, "on-real").parent(loop7))
            .err();
        assert!(on_real.is_some(), "a stopped parent takes no children");
        model.reenable(loop7).expect("reenable");
        model
            .add(AddRequest::new(Kind::Device, "on-real").parent(loop7))
            .expect("under a real device");
        model.stop(loop7).expect("stop the real device again");
        let mut events = model.take_events();
        for change in tracker.observe(&mut model, &mut events, 0) {
            kept.apply(change);
        }
        assert_eq!(
            kept,
            tracker.snapshot(),
            "the journal and the snapshot agree"
        );
        let before = shapes(&model);

        let mut restored = fresh(kept.sequence);
        let (mut tracker, report) = Tracker::restore(&mut restored, &kept, 0);
        assert!(report.dropped.is_empty(), "{:?}", report.dropped);
        assert_eq!(report.waiting, 2, "the real device's state and its child");
        real_device(&mut restored, "loop7");
        tracker.coldplug_done();
        let mut events = restored.take_events();
        tracker.observe(&mut restored, &mut events, 0);
        restored.check_invariants().expect("invariants");
        let expected: Vec<_> = before
            .into_iter()
            .filter(|((_, name, ..), _)| name != "held")
            .collect();
        assert_eq!(shapes(&restored), expected);
        assert!(
            restored.next_deadline().is_none() && restored.pending_removals() == 0,
            "nothing left pending"
        );
        // What the scan made is still the driver's: unbinding takes it.
        let host = restored.find(Kind::Host, "host3").expect("host");
        restored.unbind(host, true).expect("unbind");
        assert!(restored.find(Kind::Device, "3:0:0:0").is_err());
        // No id from before comes back.
        let newest = restored
            .add(AddRequest::new(Kind::Driver, "new"))
            .expect("new");
        assert!(newest.0 >> 24 > kept.sequence);
    }

    /// Journal lines read back as the changes written.
    #[test]
    fn changes_round_trip_through_json() {
        let changes = vec![
            Change::Put(Record::Object(ObjectRecord {
                id: 7,
                kind: Kind::Device,
                name: "d".to_owned(),
                parent: Some(Link::Device("/sys/x".to_owned())),
                driver: Some(Link::Object(3)),
                attributes: BTreeMap::from([("a".to_owned(), "b".to_owned())]),
                scanned: true,
                state: State::Removing,
            })),
            Change::Put(Record::Device(DeviceRecord {
                sys_path: "/sys/y".to_owned(),
                state: State::Stopped,
            })),
            Change::Delete(Link::Object(7)),
            Change::Sequence(99),
        ];
        for change in changes {
            let line = serde_json::to_string(&change).expect("json");
            assert_eq!(serde_json::from_str::<Change>(&line).expect("read"), change);
        }
    }
}
