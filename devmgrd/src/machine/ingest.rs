//! Keeps the model true to the machine: turns device events into model
//! commands. A device is known by its sys path; its parent is the nearest
//! ancestor path already known, which gives the SCSI-like tree sysfs has:
//! host → target → LUN (`H:C:T:L`) → disk → partition. A SCSI host is the
//! `scsi` device of type `scsi_host` (`…/host0`), the parent of its targets;
//! its `scsi_host` class device (`…/host0/scsi_host/host0`) is the same
//! host, not another object. Everything else is a device, named by the
//! kernel's name for it (`loop3`, `eth0`, `0:0:0:1`, `sda1`). A `remove` is rule 8: idle objects go at once, referenced
//! ones become `gone` and go when released, and the name is free again.
//!
//! Duplicates are expected (coldplug overlaps the first events): an `add`
//! for a known sys path and a `remove` for an unknown one change nothing.

use std::collections::BTreeMap;

use drivers::{AddRequest, Kind, Model, ObjectId};
use tokio::sync::mpsc;

use crate::machine::uevents::{Action, Ingest, UEvent};
use crate::owner::handle::ModelHandle;

/// The devices the model holds from udev, by sys path.
#[derive(Default)]
struct Known {
    /// Ordered, so a removed device's descendants are one range away.
    by_sys_path: BTreeMap<String, Entry>,
}

#[derive(Clone)]
struct Entry {
    id: ObjectId,
    subsystem: String,
    /// A host's `scsi_host` class device: another path for the same object.
    alias: bool,
}

impl Known {
    /// The nearest known ancestor of `sys_path`.
    fn parent_of(&self, sys_path: &str) -> Option<&Entry> {
        let mut path = sys_path;
        while let Some((up, _)) = path.rsplit_once('/') {
            if let Some(entry) = self.by_sys_path.get(up) {
                return Some(entry);
            }
            path = up;
        }
        None
    }
}

/// One thing for the owner to do.
enum Item {
    /// Apply a device event.
    Event(UEvent),
    /// The coldplug's devices are all in: what waited for real devices
    /// after a restart is placed now (`persist::Tracker::coldplug_done`).
    ColdplugDone,
}

/// Most events applied in one owner job: a storm goes through in batches
/// (one publish, one wait per batch) without holding other commands up for
/// long (each batch's signals go out before the next command's reply).
const MAX_BATCH: usize = 64;

/// Applies events until the reader stops; tells the kernel users watcher
/// of every block device's event (what is stacked on what may change).
/// `coldplugged` turns true once the coldplug's devices are in the model
/// and published: the daemon claims its name only then.
pub async fn run(
    handle: ModelHandle,
    mut events: mpsc::UnboundedReceiver<Ingest>,
    watcher: Option<crate::machine::users::Handle>,
    coldplugged: tokio::sync::watch::Sender<bool>,
) {
    let mut known = Known::default();
    let mut queue = std::collections::VecDeque::new();
    loop {
        if queue.is_empty() {
            match events.recv().await {
                Some(ingest) => enqueue(&mut queue, &known, ingest),
                None => return,
            }
        }
        while queue.len() < MAX_BATCH {
            match events.try_recv() {
                Ok(ingest) => enqueue(&mut queue, &known, ingest),
                Err(_) => break,
            }
        }
        let batch: Vec<Item> = queue.drain(..queue.len().min(MAX_BATCH)).collect();
        let ends_coldplug = batch.iter().any(|item| matches!(item, Item::ColdplugDone));
        let block: Vec<String> = batch
            .iter()
            .filter_map(|item| match item {
                Item::Event(e) if e.subsystem == "block" && e.action != Action::Add => {
                    Some(e.sys_name.clone())
                }
                _ => None,
            })
            .collect();
        // The mapping travels with the job and comes back with it: one
        // owner of each, no lock.
        let mut mapping = std::mem::take(&mut known);
        let applied = handle.call_owned(move |owned| {
            for item in batch {
                match item {
                    Item::Event(event) => apply(&mut owned.model, &mut mapping, event),
                    Item::ColdplugDone => coldplug_done(owned),
                }
            }
            mapping
        });
        match applied.await {
            Ok(mapping) => known = mapping,
            Err(_) => return, // the owner is gone: shutting down
        }
        // (Answered after the batch's signals: the devices are published.)
        if ends_coldplug {
            coldplugged.send_replace(true);
        }
        // (A device's add reaches the watcher with the model's new object.)
        if let Some(w) = &watcher {
            for name in block {
                w.send(crate::machine::users::Command::Uevent { name });
            }
        }
    }
}

fn coldplug_done(owned: &mut crate::owner::handle::Owned) {
    if let Some(tracker) = &mut owned.tracker {
        tracker.coldplug_done();
    }
}

fn enqueue(queue: &mut std::collections::VecDeque<Item>, known: &Known, ingest: Ingest) {
    match ingest {
        Ingest::Coldplug(devices) => {
            tracing::info!("coldplug: {} existing devices", devices.len());
            queue.extend(devices.into_iter().map(Item::Event));
            queue.push_back(Item::ColdplugDone);
        }
        Ingest::Resync(devices) => {
            let (vanished, new) = reconcile(known, devices);
            tracing::warn!(
                "resynchronised after an overflow: {} vanished, {} new",
                vanished.len(),
                new.len()
            );
            queue.extend(vanished.into_iter().map(Item::Event));
            queue.extend(new.into_iter().map(Item::Event));
        }
        Ingest::Event(event) => queue.push_back(Item::Event(event)),
    }
}

/// What a fresh enumeration says was missed: removals for known devices
/// that no longer exist (children first), additions for unknown ones
/// (parents first). Events still queued may repeat some; repeats change
/// nothing.
fn reconcile(known: &Known, devices: Vec<UEvent>) -> (Vec<UEvent>, Vec<UEvent>) {
    let present: std::collections::HashSet<&str> =
        devices.iter().map(|d| d.sys_path.as_str()).collect();
    let mut vanished: Vec<UEvent> = known
        .by_sys_path
        .iter()
        .filter(|(path, entry)| !entry.alias && !present.contains(path.as_str()))
        .map(|(path, entry)| UEvent {
            action: Action::Remove,
            seqnum: 0,
            sys_path: path.clone(),
            subsystem: entry.subsystem.clone(),
            sys_name: path.rsplit('/').next().unwrap_or_default().to_owned(),
            devtype: None,
            driver: None,
            sys_path_old: None,
            properties: Default::default(),
        })
        .collect();
    vanished.reverse(); // children (longer paths) before their parents
    let new = devices
        .into_iter()
        .filter(|d| !known.by_sys_path.contains_key(&d.sys_path))
        .collect();
    (vanished, new)
}

/// Applies one event to the model.
fn apply(model: &mut Model, known: &mut Known, event: UEvent) {
    tracing::debug!(
        "uevent {:?} {} (seq {})",
        event.action,
        event.sys_path,
        event.seqnum
    );
    match event.action {
        Action::Add => {
            if let Some(entry) = known.by_sys_path.get(&event.sys_path) {
                if model.contains(entry.id) {
                    return; // seen at coldplug, or a repeated add
                }
                // Its object went (removed by unbinding it, say) while the
                // device stayed: it is new to the model again.
                known.by_sys_path.remove(&event.sys_path);
            }
            if event.subsystem == "scsi_host" {
                // `<host>/scsi_host/<name>`: the class side of a known host.
                let host = event
                    .sys_path
                    .strip_suffix(&format!("/scsi_host/{}", event.sys_name))
                    .and_then(|host| known.by_sys_path.get(host).cloned());
                if let Some(host) = host {
                    let alias = Entry {
                        alias: true,
                        ..host
                    };
                    known.by_sys_path.insert(event.sys_path, alias);
                    return;
                }
            }
            let is_host = event.subsystem == "scsi_host"
                || (event.subsystem == "scsi" && event.devtype.as_deref() == Some("scsi_host"));
            let kind = if is_host { Kind::Host } else { Kind::Device };
            let parent = known.parent_of(&event.sys_path);
            let mut request = AddRequest::new(kind, event.sys_name.clone());
            request.parent = parent.map(|p| p.id);
            request.handler = drivers::kernel::handler_for(
                &event.subsystem,
                event.devtype.as_deref(),
                &event.sys_name,
                parent.map(|p| p.subsystem.as_str()),
                event.driver.is_some(),
            )
            .map(str::to_owned);
            request.origin = proto::Origin::Udev;
            request.subsystem = event.subsystem.clone();
            request.sys_path = event.sys_path.clone();
            request.attributes = event.attributes();
            match model.add(request) {
                Ok(id) => {
                    if let Some(driver) = &event.driver {
                        bind(model, id, driver, &event.sys_path);
                    }
                    let subsystem = event.subsystem.clone();
                    let entry = Entry {
                        id,
                        subsystem,
                        alias: false,
                    };
                    known.by_sys_path.insert(event.sys_path, entry);
                }
                Err(e) => tracing::warn!(
                    "not modelling {} ({}): {e}",
                    event.sys_path,
                    event.subsystem
                ),
            }
        }
        Action::Remove => {
            let Some(Entry { id, alias, .. }) = known.by_sys_path.remove(&event.sys_path) else {
                return;
            };
            if alias {
                return; // the class side of a host went; the host stays
            }
            // The kernel removes children before parents, but a parent's
            // removal takes any known child with it: forget them too.
            let prefix = format!("{}/", event.sys_path);
            let below: Vec<String> = known
                .by_sys_path
                .range(prefix.clone()..)
                .take_while(|(path, _)| path.starts_with(&prefix))
                .map(|(path, _)| path.clone())
                .collect();
            for path in below {
                known.by_sys_path.remove(&path);
            }
            if let Err(e) = model.kernel_removed(id) {
                // NotFound: it already went (e.g. with its parent).
                tracing::debug!("kernel removal of {}: {e}", event.sys_path);
            }
        }
        Action::Bind => {
            let (Some(id), Some(driver)) = (live(model, known, &event.sys_path), &event.driver)
            else {
                return;
            };
            bind(model, id, driver, &event.sys_path);
        }
        Action::Unbind => {
            let Some(id) = live(model, known, &event.sys_path) else {
                return;
            };
            if let Err(e) = model.kernel_unbound(id) {
                tracing::warn!("recording the unbinding of {}: {e}", event.sys_path);
            }
        }
        Action::Change => {
            let Some(id) = live(model, known, &event.sys_path) else {
                return;
            };
            if let Err(e) = model.set_attributes(id, event.attributes()) {
                tracing::warn!("recording the change of {}: {e}", event.sys_path);
            }
        }
        Action::Move => {
            let Some(old) = event.sys_path_old.as_deref() else {
                return;
            };
            let Some(id) = live(model, known, old) else {
                return;
            };
            if let Err(e) = model.kernel_renamed(id, &event.sys_name, &event.sys_path) {
                tracing::warn!("recording {old} renamed {}: {e}", event.sys_path);
                return;
            }
            // It and everything known below it now live under the new path.
            let prefix = format!("{old}/");
            let moved: Vec<String> = std::iter::once(old.to_owned())
                .chain(
                    known
                        .by_sys_path
                        .range(prefix.clone()..)
                        .take_while(|(path, _)| path.starts_with(&prefix))
                        .map(|(path, _)| path.clone()),
                )
                .collect();
            for path in moved {
                if let Some(entry) = known.by_sys_path.remove(&path) {
                    let new = format!("{}{}", event.sys_path, &path[old.len()..]);
                    known.by_sys_path.insert(new, entry);
                }
            }
        }
        Action::Other => {}
    }
}

/// The live object of a known (non-alias) sys path.
fn live(model: &Model, known: &Known, sys_path: &str) -> Option<ObjectId> {
    known
        .by_sys_path
        .get(sys_path)
        .filter(|e| !e.alias && model.contains(e.id))
        .map(|e| e.id)
}

/// Records that the kernel bound `id` to the driver `name`: a driver object
/// of that name (added, as udev-origin, the first time it is seen).
fn bind(model: &mut Model, id: ObjectId, name: &str, sys_path: &str) {
    let driver = match model.find_in(Kind::Driver, proto::Origin::Udev, name) {
        Ok(d) => d,
        Err(_) => {
            let mut request = AddRequest::new(Kind::Driver, name);
            request.origin = proto::Origin::Udev;
            match model.add(request) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!("not modelling driver {name} (bound to {sys_path}): {e}");
                    return;
                }
            }
        }
    };
    if let Err(e) = model.kernel_bound(id, driver) {
        tracing::warn!("recording {sys_path} bound to {name}: {e}");
    }
}
