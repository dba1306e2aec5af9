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

use std::collections::HashMap;

use drivers::{AddRequest, Kind, ObjectId};
use tokio::sync::mpsc;

use crate::owner::ModelHandle;
use crate::uevents::{Action, Ingest, UEvent};

/// The devices the model holds from udev, by sys path.
#[derive(Default)]
struct Known {
    by_sys_path: HashMap<String, Entry>,
}

#[derive(Clone)]
struct Entry {
    id: ObjectId,
    subsystem: String,
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

/// Applies events until the reader stops.
pub async fn run(handle: ModelHandle, mut events: mpsc::UnboundedReceiver<Ingest>) {
    let mut known = Known::default();
    while let Some(ingest) = events.recv().await {
        let batch = match ingest {
            Ingest::Coldplug(devices) => {
                tracing::info!("coldplug: {} existing devices", devices.len());
                devices
            }
            Ingest::Event(event) => vec![event],
        };
        for event in batch {
            if apply(&handle, &mut known, event).await.is_err() {
                return; // the owner is gone: shutting down
            }
        }
    }
}

/// Applies one event; `Err` only when the model's owner has stopped.
async fn apply(handle: &ModelHandle, known: &mut Known, event: UEvent) -> Result<(), ()> {
    tracing::debug!(
        "uevent {:?} {} (seq {})",
        event.action,
        event.sys_path,
        event.seqnum
    );
    match event.action {
        Action::Add => {
            if known.by_sys_path.contains_key(&event.sys_path) {
                return Ok(()); // seen at coldplug, or a repeated add
            }
            if event.subsystem == "scsi_host" {
                // `<host>/scsi_host/<name>`: the class side of a known host.
                let host = event
                    .sys_path
                    .strip_suffix(&format!("/scsi_host/{}", event.sys_name))
                    .and_then(|host| known.by_sys_path.get(host).cloned());
                if let Some(host) = host {
                    known.by_sys_path.insert(event.sys_path, host);
                    return Ok(());
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
            if let Some(devtype) = &event.devtype {
                request
                    .attributes
                    .insert("udev.devtype".into(), devtype.clone());
            }
            if let Some(driver) = &event.driver {
                request
                    .attributes
                    .insert("udev.driver".into(), driver.clone());
            }
            let added = handle.call(move |m| m.add(request)).await.map_err(|_| ())?;
            match added {
                Ok(id) => {
                    let subsystem = event.subsystem.clone();
                    known
                        .by_sys_path
                        .insert(event.sys_path, Entry { id, subsystem });
                }
                Err(e) => tracing::warn!(
                    "not modelling {} ({}): {e}",
                    event.sys_path,
                    event.subsystem
                ),
            }
        }
        Action::Remove => {
            let Some(Entry { id, .. }) = known.by_sys_path.remove(&event.sys_path) else {
                return Ok(());
            };
            if known.by_sys_path.values().any(|other| other.id == id) {
                // The class side of a host went; the host itself stays.
                return Ok(());
            }
            // The kernel removes children before parents, but a parent's
            // removal takes any known child with it: forget them too.
            let prefix = format!("{}/", event.sys_path);
            known
                .by_sys_path
                .retain(|path, _| !path.starts_with(&prefix));
            let removed = handle
                .call(move |m| m.kernel_removed(id))
                .await
                .map_err(|_| ())?;
            if let Err(e) = removed {
                // NotFound: it already went (e.g. with its parent).
                tracing::debug!("kernel removal of {}: {e}", event.sys_path);
            }
        }
        // Attribute changes, renames and bindings of real devices come with
        // the next part of udev ingestion (issue 5).
        _ => {}
    }
    Ok(())
}
