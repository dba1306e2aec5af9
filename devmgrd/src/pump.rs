//! The event pump: publishes the engine's events on the bus, in order —
//! objects appear and disappear (ObjectManager's InterfacesAdded /
//! InterfacesRemoved), properties change (PropertiesChanged), and the
//! RemovalCompleted and ReleaseRequested signals go out — and only then
//! delivers the reply of the command that caused them.

use drivers::{Event, ObjectId, ReferenceInfo};
use proto::HolderTuple;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};
use zbus::names::InterfaceName;
use zbus::object_server::{InterfaceRef, SignalEmitter};
use zbus::{Connection, ObjectServer, Variant};

use crate::owner::Batch;
use crate::service::{path_of, set_state, Manager, ObjectIface, Shared};

/// One `Holders` entry.
pub fn holder_tuple(r: &ReferenceInfo) -> HolderTuple {
    (
        r.id.0,
        r.holder.bus_name.clone(),
        r.holder.uid,
        r.holder.pid,
        r.reason.to_string(),
        r.since,
    )
}

/// Most batches published as one group: bounds how long the first reply
/// of a group waits for the others' signals.
const MAX_GROUP: usize = 256;

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
    let server = conn.object_server();
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
        group.push(first);
        while group.len() < MAX_GROUP {
            match batches.try_recv() {
                Ok(batch) => group.push(batch),
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
                    if let Err(e) = set_holders(server, id, &list).await {
                        tracing::warn!("could not publish the holders of {id}: {e}");
                    }
                }
                if let Err(e) = publish(&conn, server, &shared, event).await {
                    tracing::warn!("could not publish an event: {e}");
                }
            }
            counts = batch.counts;
            replies.extend(batch.deliver);
        }
        // Most commands (reference churn above all) change neither count.
        if counts != published_counts {
            if let Err(e) = set_counts(server, counts).await {
                tracing::warn!("could not publish the manager's counts: {e}");
            }
            published_counts = counts;
        }
        for deliver in replies {
            deliver();
        }
    }
}

async fn object(server: &ObjectServer, id: ObjectId) -> zbus::Result<InterfaceRef<ObjectIface>> {
    server.interface::<_, ObjectIface>(path_of(Some(id))).await
}

async fn publish(
    conn: &Connection,
    server: &ObjectServer,
    shared: &Shared,
    event: Event,
) -> zbus::Result<()> {
    match event {
        Event::Added(info) => {
            let path = path_of(Some(info.id));
            server
                .at(path, ObjectIface::new(shared.clone(), *info))
                .await?;
        }
        Event::StateChanged { id, to, .. } => {
            let iref = object(server, id).await?;
            let iface = iref.get().await;
            if set_state(&iface, to) {
                iface.state_changed(iref.signal_emitter()).await?;
            }
        }
        Event::Bound { id, driver } => {
            let iref = object(server, id).await?;
            let iface = iref.get().await;
            iface.cache().info.driver = Some(driver);
            iface.driver_changed(iref.signal_emitter()).await?;
        }
        Event::Unbound { id, .. } => {
            let iref = object(server, id).await?;
            let iface = iref.get().await;
            iface.cache().info.driver = None;
            iface.driver_changed(iref.signal_emitter()).await?;
        }
        Event::ErrorChanged { id, error } => {
            let iref = object(server, id).await?;
            let iface = iref.get().await;
            iface.cache().info.last_error = error;
            iface.last_error_changed(iref.signal_emitter()).await?;
        }
        Event::AttributesChanged { id, attributes } => {
            let iref = object(server, id).await?;
            let iface = iref.get().await;
            iface.cache().info.attributes = attributes;
            iface.attributes_changed(iref.signal_emitter()).await?;
        }
        Event::Renamed { id, name, sys_path } => {
            let iref = object(server, id).await?;
            {
                let iface = iref.get().await;
                let mut cache = iface.cache();
                cache.info.name = name.clone();
                cache.info.sys_path = sys_path.clone();
            }
            // Name and SysPath change together: one PropertiesChanged.
            let changed = HashMap::from([
                ("Name", Variant::from(name.to_string())),
                ("SysPath", Variant::from(sys_path)),
            ]);
            zbus::fdo::Properties::properties_changed(
                iref.signal_emitter(),
                InterfaceName::from_static_str_unchecked(proto::OBJECT_INTERFACE),
                changed,
                Cow::Borrowed(&[]),
            )
            .await?;
        }
        Event::ReleaseRequested {
            id, waiting_for, ..
        } => {
            let iref = object(server, id).await?;
            let why = format!("removal of {} is waiting", path_of(Some(waiting_for)));
            ObjectIface::release_requested(iref.signal_emitter(), &why).await?;
        }
        // Holders and RefCount were published from the owner's snapshot.
        Event::Acquired { .. } | Event::Released { .. } | Event::Revoked { .. } => {}
        Event::Removed { id, kind, name, .. } => {
            let path = path_of(Some(id));
            server.remove::<ObjectIface, _>(&path).await?;
            let emitter = SignalEmitter::new(conn, proto::MANAGER_PATH)?;
            Manager::removal_completed(&emitter, path.as_ref(), kind.as_str(), &name).await?;
        }
    }
    Ok(())
}

/// Publishes `Holders` and `RefCount` together, in one PropertiesChanged:
/// they always change together, and reference churn is the busiest traffic
/// the daemon sends.
async fn set_holders(
    server: &ObjectServer,
    id: ObjectId,
    holders: &[ReferenceInfo],
) -> zbus::Result<()> {
    let iref = object(server, id).await?;
    let tuples: Vec<HolderTuple> = holders.iter().map(holder_tuple).collect();
    let count = u32::try_from(tuples.len()).unwrap_or(u32::MAX);
    {
        let iface = iref.get().await;
        let mut cache = iface.cache();
        if cache.holders == tuples {
            return Ok(()); // net unchanged within a group: nothing to tell
        }
        cache.holders = tuples.clone();
    }
    let changed = HashMap::from([
        ("Holders", Variant::from(tuples)),
        ("RefCount", Variant::from(count)),
    ]);
    zbus::fdo::Properties::properties_changed(
        iref.signal_emitter(),
        InterfaceName::from_static_str_unchecked(proto::OBJECT_INTERFACE),
        changed,
        Cow::Borrowed(&[]),
    )
    .await
}

async fn set_counts(server: &ObjectServer, (objects, pending): (u32, u32)) -> zbus::Result<()> {
    let iref = server.interface::<_, Manager>(proto::MANAGER_PATH).await?;
    let manager = iref.get().await;
    let objects_changed = manager.object_count.swap(objects, Ordering::Relaxed) != objects;
    let pending_changed = manager.pending_removals.swap(pending, Ordering::Relaxed) != pending;
    if objects_changed {
        manager.object_count_changed(iref.signal_emitter()).await?;
    }
    if pending_changed {
        manager
            .pending_removals_changed(iref.signal_emitter())
            .await?;
    }
    Ok(())
}
