//! The event pump: publishes the engine's events on the bus, in order —
//! objects appear and disappear (ObjectManager's InterfacesAdded /
//! InterfacesRemoved), properties change (PropertiesChanged), and the
//! RemovalCompleted and ReleaseRequested signals go out — and only then
//! delivers the replies of the commands that caused them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use drivers::{Event, ObjectId, ReferenceInfo};
use proto::{MANAGER_INTERFACE, MANAGER_PATH, OBJECT_INTERFACE};
use tokio::sync::{mpsc, oneshot};
use zbus::{Connection, Message, OwnedObjectPath, Variant};

use crate::bus::serve::args::path_of;
use crate::bus::serve::{properties, wire, Shared};
use crate::owner::Batch;

/// Most batches published as one group: bounds how long the first reply
/// of a group waits for the others' signals.
const MAX_GROUP: usize = 256;

/// Signals handed to the socket at once: few writes for a burst, and other
/// tasks (calls being answered) run between two such writes.
const SIGNALS_PER_WRITE: usize = 512;

const PROPERTIES_INTERFACE: &str = "org.freedesktop.DBus.Properties";
const OBJECT_MANAGER: &str = "org.freedesktop.DBus.ObjectManager";

/// A batch with at least this many events is published in parts of
/// `PART` events, and calls about other objects may overtake it between
/// the parts (a part takes the bus about a millisecond).
const BIG: usize = 4096;
const PART: usize = 128;

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
/// A big batch (one Add of 100,000 LUNs) takes the bus a second or more.
/// Between two writes of it, a batch that came meanwhile is published and
/// answered at once if it was about single objects (calls on object paths)
/// that neither it nor anything still waiting concerns: what such a call
/// did or read cannot depend on what is not yet published. Anything else
/// (the manager's calls, the kernel's events) waits its turn, and so does
/// everything after it.
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
    let mut counts = Counts::default();
    let mut group = Vec::new();
    // Batches that came while a big one was published, and had to wait.
    let mut waiting: VecDeque<Batch> = VecDeque::new();
    let mut stop = Some(stop);
    loop {
        let first = match waiting.pop_front() {
            Some(batch) => batch,
            None => tokio::select! {
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
            },
        };
        let mut ends = first.ends_group;
        group.push(first);
        while group.len() < MAX_GROUP && !ends {
            let next = match waiting.pop_front() {
                Some(batch) => batch,
                None => match batches.try_recv() {
                    Ok(batch) => batch,
                    Err(_) => break,
                },
            };
            ends = next.ends_group;
            group.push(next);
        }
        // The latest holders of every object whose references changed.
        let mut holders = HashMap::new();
        for batch in &mut group {
            holders.extend(batch.holders.drain());
        }
        let mut replies = Vec::with_capacity(group.len());
        let in_group = group.len();
        for (index, mut batch) in group.drain(..).enumerate() {
            let events = std::mem::take(&mut batch.events);
            // Only the last of its group, with nothing waiting: what came
            // after it then came after everything published.
            let last = index + 1 == in_group && waiting.is_empty();
            if events.len() < BIG || !last {
                publish(&mut out, &shared, events, &mut holders).await;
            } else {
                let concerned = concerned_by(&events);
                let mut events = events.into_iter();
                loop {
                    let part: Vec<Event> = events.by_ref().take(PART).collect();
                    if part.is_empty() {
                        break;
                    }
                    publish(&mut out, &shared, part, &mut holders).await;
                    out.flush().await;
                    overtake(
                        &mut out,
                        &shared,
                        &mut batches,
                        &concerned,
                        &mut waiting,
                        &mut counts,
                    )
                    .await;
                }
            }
            counts.saw(&batch);
            replies.extend(batch.deliver);
        }
        counts.publish(&mut out);
        out.flush().await;
        for deliver in replies {
            deliver();
        }
    }
}

/// Publishes events in order, each object's holders where they first
/// changed.
async fn publish(
    out: &mut Outbox,
    shared: &Shared,
    events: Vec<Event>,
    holders: &mut HashMap<ObjectId, Vec<ReferenceInfo>>,
) {
    for event in events {
        if let Event::Revoked { reference, .. } = &event {
            shared.handles.revoke(*reference);
        }
        // Holders and RefCount go out where their first change happened,
        // so a client sees a release before what it caused.
        let refs_of = match &event {
            Event::Acquired { id, .. } | Event::Released { id, .. } | Event::Revoked { id, .. } => {
                holders.remove_entry(id)
            }
            _ => None,
        };
        if let Some((id, list)) = refs_of {
            out.holders(id, &list);
        }
        out.event(event);
        out.flush_if_full().await;
    }
}

/// Takes what came while a big batch is published: a batch about single
/// objects that nothing unpublished concerns goes out and is answered now;
/// anything else waits, and once one waits for the whole model, all do.
async fn overtake(
    out: &mut Outbox,
    shared: &Shared,
    batches: &mut mpsc::UnboundedReceiver<Batch>,
    concerned: &HashSet<ObjectId>,
    waiting: &mut VecDeque<Batch>,
    counts: &mut Counts,
) {
    let mut held_back: HashSet<ObjectId> = waiting.iter().flat_map(about).collect();
    let mut all_wait = waiting.iter().any(|b| b.about.is_none());
    while let Ok(mut batch) = batches.try_recv() {
        let ids = about(&batch);
        let free = !all_wait
            && batch.about.is_some()
            && !batch.ends_group_globally()
            && ids
                .iter()
                .all(|id| !concerned.contains(id) && !held_back.contains(id));
        if !free {
            all_wait |= batch.about.is_none();
            held_back.extend(ids);
            waiting.push_back(batch);
            continue;
        }
        let mut holders = std::mem::take(&mut batch.holders);
        publish(out, shared, std::mem::take(&mut batch.events), &mut holders).await;
        counts.saw(&batch);
        counts.publish(out);
        out.flush().await;
        for deliver in batch.deliver {
            deliver();
        }
    }
}

/// Every object a batch's commands were about or its events name.
fn about(batch: &Batch) -> Vec<ObjectId> {
    let mut ids: Vec<ObjectId> = batch.about.clone().unwrap_or_default();
    ids.extend(concerned_by(&batch.events));
    ids
}

/// Every object the events name (themselves, their parents, drivers, and
/// the objects removals wait for).
fn concerned_by(events: &[Event]) -> HashSet<ObjectId> {
    let mut ids = HashSet::new();
    for event in events {
        match event {
            Event::Added(info) => {
                ids.insert(info.id);
                ids.extend(info.parent);
                ids.extend(info.driver);
            }
            Event::Bound { id, driver } | Event::Unbound { id, driver } => {
                ids.insert(*id);
                ids.insert(*driver);
            }
            Event::ReleaseRequested {
                id, waiting_for, ..
            } => {
                ids.insert(*id);
                ids.insert(*waiting_for);
            }
            Event::StateChanged { id, .. }
            | Event::Acquired { id, .. }
            | Event::Released { id, .. }
            | Event::Revoked { id, .. }
            | Event::ErrorChanged { id, .. }
            | Event::AttributesChanged { id, .. }
            | Event::Renamed { id, .. }
            | Event::Removed { id, .. } => {
                ids.insert(*id);
            }
        }
    }
    ids
}

/// The manager's counts: the newest batch's (by the owner's order), sent
/// when they differ from what clients last saw. A batch that overtook
/// others may be newer than the ones published after it.
#[derive(Default)]
struct Counts {
    newest: u64,
    latest: (u32, u32),
    published: (u32, u32),
}

impl Counts {
    fn saw(&mut self, batch: &Batch) {
        if batch.seq >= self.newest {
            self.newest = batch.seq;
            self.latest = batch.counts;
        }
    }

    // Most commands (reference churn above all) change neither count.
    fn publish(&mut self, out: &mut Outbox) {
        if self.latest.0 != self.published.0 {
            out.manager_property("ObjectCount", self.latest.0);
        }
        if self.latest.1 != self.published.1 {
            out.manager_property("PendingRemovals", self.latest.1);
        }
        self.published = self.latest;
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
        self.queue(built, path, member);
    }

    /// Queues a built signal if the bus can take it.
    fn queue(&mut self, built: zbus::Result<Message>, path: &str, member: &str) {
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
                let built = wire::Body::interfaces_added(&info, self.holders_budget).build(
                    Message::signal(MANAGER_PATH, OBJECT_MANAGER, "InterfacesAdded"),
                    wire::INTERFACES_ADDED,
                );
                self.queue(built, MANAGER_PATH, "InterfacesAdded");
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
