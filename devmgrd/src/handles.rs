//! fd-held references (the systemd-logind `Inhibit` pattern): `Acquire`
//! hands the client one end of a socketpair and keeps the other. The
//! reference lives as long as any copy of the client's end is open: when the
//! last copy closes (or the client dies) our end reads EOF and the reference
//! is released. Revocation drops our end, so the holder reads EOF too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use drivers::RefId;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use crate::owner::ModelHandle;

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

    /// Watches our end of `reference`'s handle: EOF releases the reference.
    pub fn watch(
        &self,
        handle: ModelHandle,
        reference: RefId,
        ours: std::os::unix::net::UnixStream,
    ) {
        let (revoke_tx, mut revoked) = oneshot::channel();
        self.revokers().insert(reference, revoke_tx);
        let handles = self.clone();
        tokio::spawn(async move {
            let ours = match ours
                .set_nonblocking(true)
                .and_then(|()| UnixStream::from_std(ours))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("cannot watch the handle of reference {reference}: {e}");
                    let _ = handle.call(move |m| m.release(reference)).await;
                    return;
                }
            };
            let mut buf = [0u8; 64];
            let closed_by_holder = loop {
                tokio::select! {
                    _ = &mut revoked => break false,
                    ready = ours.readable() => {
                        if ready.is_err() {
                            break true;
                        }
                        match ours.try_read(&mut buf) {
                            Ok(0) => break true,
                            // Whatever the holder writes means nothing; keep watching.
                            Ok(_) => continue,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                            Err(_) => break true,
                        }
                    }
                }
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
