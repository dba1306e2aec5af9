//! The event pump: publishes the engine's events on the bus, in order —
//! objects appear and disappear (ObjectManager's InterfacesAdded /
//! InterfacesRemoved), properties change (PropertiesChanged), and the
//! RemovalCompleted and ReleaseRequested signals go out — and only then
//! delivers the reply of the command that caused them.

use drivers::{Event, ObjectId, ReferenceInfo};
use proto::HolderTuple;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use zbus::object_server::{InterfaceRef, SignalEmitter};
use zbus::{Connection, ObjectServer};

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

/// Publishes every batch the owner produces until the owner stops.
pub async fn run(
    conn: Connection,
    shared: Shared,
    mut batches: mpsc::UnboundedReceiver<Batch>,
) {
    let server = conn.object_server();
    while let Some(batch) = batches.recv().await {
        let mut holders = batch.holders;
        for event in batch.events {
            if let Event::Revoked { reference, .. } = &event {
                shared.handles.revoke(*reference);
            }
            // Holders and RefCount go out where their first change happened,
            // so a client sees a release before what the release caused.
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
        if let Err(e) = set_counts(server, batch.counts).await {
            tracing::warn!("could not publish the manager's counts: {e}");
        }
        (batch.deliver)();
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
                .at(
                    path,
                    ObjectIface::new(shared.clone(), *info),
                )
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

async fn set_holders(
    server: &ObjectServer,
    id: ObjectId,
    holders: &[ReferenceInfo],
) -> zbus::Result<()> {
    let iref = object(server, id).await?;
    let iface = iref.get().await;
    iface.cache().holders = holders.iter().map(holder_tuple).collect();
    iface.holders_changed(iref.signal_emitter()).await?;
    iface.ref_count_changed(iref.signal_emitter()).await
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
