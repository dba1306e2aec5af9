//! The restore: a fresh model rebuilt from what was kept, at start
//! ([`Tracker::restore`]) and, for what waited for real devices, once the
//! coldplug is over ([`Tracker::finish_coldplug`]). API objects come back
//! in the order they were created, drivers first, each bound as it is
//! added; then removals, then stops.

use drivers::{AddRequest, Model, ObjectId, Origin, ProbeOptions};
use proto::{Kind, State};

use super::{
    set_state, Change, Kept, Link, ObjectRecord, Record, Tracked, Tracker, SEQUENCE_RESERVE,
};

/// What a restore did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// API objects back in the model.
    pub objects: usize,
    /// Records that could not be restored, with why.
    pub dropped: Vec<String>,
    /// Records waiting for the real devices they name.
    pub waiting: usize,
}

impl Tracker {
    /// Rebuilds `model` (fresh, with sequence numbers after
    /// `kept.sequence`) from `kept`: API objects in the order they were
    /// created, then their bindings, then their states (removals first, so
    /// a stop that followed a removal ends stopped, as it did). What needs
    /// real devices waits for the coldplug ([`Tracker::coldplug_done`]).
    /// Objects that exist already (the built-in sim-scsi driver) are
    /// matched by kind and name.
    pub fn restore(model: &mut Model, kept: &Kept, now: u64) -> (Tracker, Restored) {
        let mut tracker = Tracker {
            reserved: kept.sequence,
            ..Tracker::default()
        };
        let mut report = Restored::default();
        let mut objects: Vec<&ObjectRecord> = Vec::new();
        for record in kept.records.values() {
            match record {
                Record::Object(r) => objects.push(r),
                Record::Device(d) => {
                    tracker.awaiting.insert(d.sys_path.clone(), d.state);
                }
            }
        }
        objects.sort_by_key(|r| r.id);
        let objects: Vec<ObjectRecord> = objects.into_iter().cloned().collect();
        tracker.rebuild(model, objects, now, &mut report);
        tracker.track_all(model);
        // The snapshot written before serving carries this reservation.
        tracker.reserved = model.object_sequence().saturating_add(SEQUENCE_RESERVE);
        report.waiting = tracker.awaiting.len() + tracker.deferred.len();
        (tracker, report)
    }

    /// Adds, binds and sets the state of `records` (sorted by old id).
    /// Drivers come first, since an object may be bound to a driver created
    /// after it; each host or device is bound as soon as it is added, so
    /// that what its driver made can be placed under it.
    fn rebuild(
        &mut self,
        model: &mut Model,
        records: Vec<ObjectRecord>,
        now: u64,
        report: &mut Restored,
    ) {
        let (drivers, others): (Vec<_>, Vec<_>) =
            records.into_iter().partition(|r| r.kind == Kind::Driver);
        let mut placed = Vec::new();
        for record in drivers.into_iter().chain(others) {
            let parent = self.resolve_opt(model, record.parent.as_ref());
            let driver = self.resolve_opt(model, record.driver.as_ref());
            let (parent, driver) = match (parent, driver) {
                (Ok(parent), Ok(driver)) => (parent, driver),
                (Err(Missing::Later), _) | (_, Err(Missing::Later)) => {
                    self.deferred.push(record);
                    continue;
                }
                (Err(Missing::Never), _) | (_, Err(Missing::Never)) => {
                    report.dropped.push(format!(
                        "{} {}: its parent or driver is gone",
                        record.kind, record.name
                    ));
                    continue;
                }
            };
            let id = match model.find_in(record.kind, Origin::Api, &record.name) {
                Ok(existing) if record.kind == Kind::Driver => existing,
                _ => {
                    let mut request = AddRequest::new(record.kind, record.name.clone());
                    request.parent = parent;
                    request.attributes = record.attributes.clone();
                    request.scanned = record.scanned;
                    match model.add(request) {
                        Ok(id) => id,
                        Err(e) => {
                            report
                                .dropped
                                .push(format!("{} {}: {e}", record.kind, record.name));
                            continue;
                        }
                    }
                }
            };
            if let Some(driver) = driver {
                if let Err(e) = model.bind(id, driver, ProbeOptions::default()) {
                    report.dropped.push(format!(
                        "the binding of {} {}: {e}",
                        record.kind, record.name
                    ));
                }
            }
            self.restored.insert(record.id, id);
            report.objects += 1;
            placed.push((id, record));
        }
        for wanted in [State::Removing, State::Stopped] {
            for (id, record) in &placed {
                if record.state == wanted {
                    if let Err(e) = set_state(model, *id, wanted, now) {
                        report.dropped.push(format!(
                            "the {wanted} state of {} {}: {e}",
                            record.kind, record.name
                        ));
                    }
                }
            }
        }
    }

    fn resolve_opt(&self, model: &Model, link: Option<&Link>) -> Result<Option<ObjectId>, Missing> {
        link.map(|link| self.resolve(model, link)).transpose()
    }

    /// The object a link names now.
    fn resolve(&self, model: &Model, link: &Link) -> Result<ObjectId, Missing> {
        match link {
            Link::Object(old) => match self.restored.get(old) {
                Some(id) => Ok(*id),
                None if self.deferred.iter().any(|r| r.id == *old) => Err(Missing::Later),
                None => Err(Missing::Never),
            },
            Link::Device(sys_path) => self
                .objects
                .iter()
                .find_map(|(id, t)| match t {
                    Tracked::Device { sys_path: p, .. } if p == sys_path => Some(*id),
                    _ => None,
                })
                .filter(|id| model.contains(*id))
                .ok_or(Missing::Later),
        }
    }

    /// API objects that waited for real devices come back now; remembered
    /// states of devices that did not show up are forgotten (the device
    /// went while the daemon was down).
    pub(super) fn finish_coldplug(
        &mut self,
        model: &mut Model,
        now: u64,
        changes: &mut Vec<Change>,
    ) {
        changes.extend(
            self.awaiting
                .drain()
                .map(|(sys_path, _)| Change::Delete(Link::Device(sys_path))),
        );
        let mut report = Restored::default();
        let deferred = std::mem::take(&mut self.deferred);
        for record in &deferred {
            changes.push(Change::Delete(Link::Object(record.id)));
        }
        self.rebuild(model, deferred, now, &mut report);
        let mut held = std::mem::take(&mut self.held_states);
        // Removals first, as at start.
        held.sort_by_key(|(_, state)| *state != State::Removing);
        for (id, state) in held {
            if let Err(e) = set_state(model, id, state, now) {
                report
                    .dropped
                    .push(format!("the {state} state of a real device: {e}"));
            }
        }
        // What could still not be placed never will be in this run.
        for record in std::mem::take(&mut self.deferred) {
            report.dropped.push(format!(
                "{} {}: what it needs did not show up",
                record.kind, record.name
            ));
        }
        for why in &report.dropped {
            tracing::warn!("not restored: {why}");
        }
        if report.objects > 0 {
            tracing::info!(
                "restored {} objects that waited for real devices",
                report.objects
            );
        }
    }
}

enum Missing {
    /// Not there yet (a real device, or an object waiting for one).
    Later,
    /// Not there, and it will not be.
    Never,
}
