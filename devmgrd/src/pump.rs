//! The event pump: publishes the engine's events on the bus, in order —
//! objects appear and disappear (ObjectManager's InterfacesAdded /
//! InterfacesRemoved), properties change (PropertiesChanged), and the
//! RemovalCompleted and ReleaseRequested signals go out — and only then
//! delivers the replies of the commands that caused them.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use drivers::{Event, ObjectId, ReferenceInfo};
use proto::{MANAGER_INTERFACE, MANAGER_PATH, OBJECT_INTERFACE};
use tokio::sync::{mpsc, oneshot};
use zbus::{Connection, Message, OwnedObjectPath, Variant};

use crate::owner::Batch;
use crate::serve::args::path_of;
use crate::serve::{properties, Shared};

/// Most batches published as one group: bounds how long the first reply
/// of a group waits for the others' signals.
const MAX_GROUP: usize = 256;

/// Signals handed to the socket at once: few writes for a burst, and other
/// tasks (calls being answered) run between two such writes.
const SIGNALS_PER_WRITE: usize = 512;

const PROPERTIES_INTERFACE: &str = "org.freedesktop.DBus.Properties";
const OBJECT_MANAGER: &str = "org.freedesktop.DBus.ObjectManager";

/// Publishes every batch the owner produces until the owner stops.
///
/// When the pump falls behind (a flood of calls, or a bus slow to read),
/// it takes every batch already queued as one group: events still go out
/// one by one in order, but each object's `Holders`/`RefCount` goes out
/// once per group, with its latest value, and not at all if that equals
/// what clients last saw — as systemd coalesces property changes per
/// event-loop turn. Every reply still follows the signals its call caused.
/// A sequential client (no backlog) sees every change.
///
/// Sending on `stop` ends it between groups and hands the batches back
/// (for a pump on another connection); dropping `stop` never ends it.
pub async fn run(
    conn: Connection,
    shared: Shared,
    mut batches: mpsc::UnboundedReceiver<Batch>,
    stop: oneshot::Receiver<()>,
) -> mpsc::UnboundedReceiver<Batch> {
    let mut out = Outbox {
        conn,
        max_message: shared.max_message,
        holders_budget: shared.holders_budget(),
        queued: Vec::new(),
        published_holders: HashMap::new(),
    };
    let mut published_counts = (0, 0);
    let mut group = Vec::new();
    let mut stop = Some(stop);
    loop {
        let first = tokio::select! {
            biased;
            stopped = async {
                match stop.as_mut() {
                    Some(stop) => stop.await.is_ok(),
                    None => std::future::pending().await,
                }
            } => {
                if stopped {
                    return batches;
                }
                stop = None;
                continue;
            }
            batch = batches.recv() => match batch {
                Some(batch) => batch,
                None => return batches,
            },
        };
        let mut ends = first.ends_group;
        group.push(first);
        while group.len() < MAX_GROUP && !ends {
            match batches.try_recv() {
                Ok(batch) => {
                    ends = batch.ends_group;
                    group.push(batch);
                }
                Err(_) => break,
            }
        }
        // The latest holders of every object whose references changed.
        let mut holders = HashMap::new();
        for batch in &mut group {
            holders.extend(batch.holders.drain());
        }
        let mut counts = published_counts;
        let mut replies = Vec::with_capacity(group.len());
        for batch in group.drain(..) {
            for event in batch.events {
                if let Event::Revoked { reference, .. } = &event {
                    shared.handles.revoke(*reference);
                }
                // Holders and RefCount go out where their first change
                // happened, so a client sees a release before what it caused.
                let refs_of = match &event {
                    Event::Acquired { id, .. }
                    | Event::Released { id, .. }
                    | Event::Revoked { id, .. } => holders.remove_entry(id),
                    _ => None,
                };
                if let Some((id, list)) = refs_of {
                    out.holders(id, &list);
                }
                out.event(event);
                out.flush_if_full().await;
            }
            counts = batch.counts;
            replies.extend(batch.deliver);
        }
        // Most commands (reference churn above all) change neither count.
        if counts.0 != published_counts.0 {
            out.manager_property("ObjectCount", counts.0);
        }
        if counts.1 != published_counts.1 {
            out.manager_property("PendingRemovals", counts.1);
        }
        published_counts = counts;
        out.flush().await;
        for deliver in replies {
            deliver();
        }
    }
}

/// Signals waiting to be written, and what clients were last told of each
/// object's holders.
struct Outbox {
    conn: Connection,
    max_message: usize,
    holders_budget: usize,
    queued: Vec<Message>,
    /// A digest of the `Holders` last published, for objects that have
    /// some (absent: none).
    published_holders: HashMap<ObjectId, u64>,
}

impl Outbox {
    fn signal<B>(&mut self, path: &str, interface: &'static str, member: &'static str, body: &B)
    where
        B: serde::Serialize + zbus::DynamicType,
    {
        let built = Message::signal(path, interface, member).build(body);
        match built {
            Ok(msg) if msg.data().len() <= self.max_message => self.queued.push(msg),
            // Never sent: the bus would disconnect us. Budgets keep every
            // signal far below the limit; this is the last guard.
            Ok(msg) => tracing::warn!(
                "not sending {member} on {path}: {} bytes, the bus accepts {}",
                msg.data().len(),
                self.max_message
            ),
            Err(e) => tracing::warn!("could not build {member} on {path}: {e}"),
        }
    }

    fn object_changed(&mut self, id: ObjectId, changed: HashMap<&'static str, Variant<'_>>) {
        let path = path_of(Some(id));
        let invalidated: &[&str] = &[];
        self.signal(
            path.as_str(),
            PROPERTIES_INTERFACE,
            "PropertiesChanged",
            &(OBJECT_INTERFACE, changed, invalidated),
        );
    }

    fn manager_property(&mut self, name: &'static str, value: u32) {
        let invalidated: &[&str] = &[];
        self.signal(
            MANAGER_PATH,
            PROPERTIES_INTERFACE,
            "PropertiesChanged",
            &(
                MANAGER_INTERFACE,
                HashMap::from([(name, Variant::from(value))]),
                invalidated,
            ),
        );
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Added(info) => {
                let path = path_of(Some(info.id));
                let interfaces = properties::object_interfaces(&info, self.holders_budget);
                self.signal(
                    MANAGER_PATH,
                    OBJECT_MANAGER,
                    "InterfacesAdded",
                    &(path, interfaces),
                );
            }
            Event::StateChanged { id, to, .. } => {
                self.object_changed(id, HashMap::from([("State", Variant::from(to.as_str()))]));
            }
            Event::Bound { id, driver } => {
                self.object_changed(
                    id,
                    HashMap::from([("Driver", Variant::from(path_of(Some(driver))))]),
                );
            }
            Event::Unbound { id, .. } => {
                self.object_changed(
                    id,
                    HashMap::from([("Driver", Variant::from(path_of(None)))]),
                );
            }
            Event::ErrorChanged { id, error } => {
                self.object_changed(
                    id,
                    HashMap::from([("LastError", Variant::from(error.to_string()))]),
                );
            }
            Event::AttributesChanged { id, attributes } => {
                let map: HashMap<String, String> = attributes.into_iter().collect();
                self.object_changed(id, HashMap::from([("Attributes", Variant::from(map))]));
            }
            Event::Renamed { id, name, sys_path } => {
                // Name and SysPath change together: one PropertiesChanged.
                self.object_changed(
                    id,
                    HashMap::from([
                        ("Name", Variant::from(name.to_string())),
                        ("SysPath", Variant::from(sys_path)),
                    ]),
                );
            }
            Event::ReleaseRequested {
                id, waiting_for, ..
            } => {
                let why = format!("removal of {} is waiting", path_of(Some(waiting_for)));
                let path = path_of(Some(id));
                self.signal(path.as_str(), OBJECT_INTERFACE, "ReleaseRequested", &(why,));
            }
            // Holders and RefCount are published from the owner's snapshot.
            Event::Acquired { .. } | Event::Released { .. } | Event::Revoked { .. } => {}
            Event::Removed { id, kind, name, .. } => {
                let path: OwnedObjectPath = path_of(Some(id));
                self.published_holders.remove(&id);
                // A slice: an array would go out as a structure, `(s)`.
                let interfaces: &[&str] = &[OBJECT_INTERFACE];
                self.signal(
                    MANAGER_PATH,
                    OBJECT_MANAGER,
                    "InterfacesRemoved",
                    &(&path, interfaces),
                );
                self.signal(
                    MANAGER_PATH,
                    MANAGER_INTERFACE,
                    "RemovalCompleted",
                    &(&path, kind.as_str(), name.as_ref()),
                );
            }
        }
    }

    /// Publishes `Holders` and `RefCount` together, in one
    /// PropertiesChanged (they always change together, and reference churn
    /// is the busiest traffic the daemon sends), unless clients already
    /// see exactly this.
    fn holders(&mut self, id: ObjectId, holders: &[ReferenceInfo]) {
        let shown = properties::holders_within(holders, self.holders_budget);
        let count = u32::try_from(holders.len()).unwrap_or(u32::MAX);
        let digest = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&shown, count).hash(&mut h);
            h.finish()
        };
        let before = if count == 0 {
            self.published_holders.remove(&id)
        } else {
            self.published_holders.insert(id, digest)
        };
        let unchanged = match before {
            Some(before) => count != 0 && before == digest,
            None => count == 0,
        };
        if unchanged {
            return; // net unchanged within a group: nothing to tell
        }
        self.object_changed(
            id,
            HashMap::from([
                ("Holders", Variant::from(shown)),
                ("RefCount", Variant::from(count)),
            ]),
        );
    }

    async fn flush_if_full(&mut self) {
        if self.queued.len() >= SIGNALS_PER_WRITE {
            self.flush().await;
        }
    }

    async fn flush(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let msgs = std::mem::take(&mut self.queued);
        if let Err(e) = self.conn.send_all(&msgs).await {
            tracing::warn!("could not publish {} signals: {e}", msgs.len());
        }
        // Let calls being answered run between two big writes.
        tokio::task::yield_now().await;
    }
}
