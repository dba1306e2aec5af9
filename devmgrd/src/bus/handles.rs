//! fd-held references (the systemd-logind `Inhibit` pattern): `Acquire`
//! hands the client the read end of a pipe and keeps the write end. The
//! reference lives as long as any copy of the client's end is open: when the
//! last copy closes (or the client dies) our end reports an error (no reader
//! left) and the reference is released. Revocation closes our end, so the
//! holder reads EOF.
//!
//! A pipe rather than a socketpair: passing a Unix socket through the bus
//! makes the kernel track it for its in-flight-socket garbage collector on
//! every hop, which made an Acquire about 5% slower end to end.

use std::collections::HashMap;
use std::io::PipeWriter;
use std::sync::{Arc, Mutex};

use drivers::RefId;
use std::os::fd::OwnedFd;
use tokio::io::Interest;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use crate::owner::handle::ModelHandle;

/// The daemon's ends of the handles it gave out, by reference.
#[derive(Clone, Default)]
pub struct Handles {
    /// Dropping a sender stops that reference's watcher, closing our end.
    revokers: Arc<Mutex<HashMap<RefId, oneshot::Sender<()>>>>,
}

impl Handles {
    fn revokers(&self) -> std::sync::MutexGuard<'_, HashMap<RefId, oneshot::Sender<()>>> {
        self.revokers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches our end of `reference`'s handle: once no reader is left, the
    /// reference is released.
    pub fn watch(&self, handle: ModelHandle, reference: RefId, ours: PipeWriter) {
        let (revoke_tx, mut revoked) = oneshot::channel();
        self.revokers().insert(reference, revoke_tx);
        let handles = self.clone();
        tokio::spawn(async move {
            // The kernel reports an error on a pipe's write end once every
            // read end is closed; nothing else ever makes it ready, since
            // we never write.
            let ours = match pipe::Sender::from_owned_fd(OwnedFd::from(ours)) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::warn!("cannot watch the handle of reference {reference}: {e}");
                    let _ = handle.call(move |m| m.release(reference)).await;
                    return;
                }
            };
            let closed_by_holder = tokio::select! {
                _ = &mut revoked => false,
                _ = ours.ready(Interest::ERROR) => true,
            };
            handles.revokers().remove(&reference);
            if closed_by_holder {
                // NotFound means it was revoked meanwhile: nothing left to release.
                let _ = handle.call(move |m| m.release(reference)).await;
            }
            drop(ours);
        });
    }

    /// A reference was revoked (or its object vanished): close our end.
    pub fn revoke(&self, reference: RefId) {
        if let Some(tx) = self.revokers().remove(&reference) {
            let _ = tx.send(());
        }
    }
}
