//! Who is calling: the bus's own credentials (uid, pid) for each caller's
//! unique name, asked of the bus once per client connection rather than on
//! every Acquire, and forgotten when that connection leaves the bus. Unique
//! names are never reused during a bus's life, so a cached answer cannot
//! name a different process.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use drivers::Holder;
use futures_util::StreamExt;
use zbus::names::UniqueName;
use zbus::{fdo, Connection};

/// The callers seen so far, by unique name.
#[derive(Clone)]
pub struct Peers {
    known: Arc<Mutex<HashMap<String, Arc<Holder>>>>,
    /// Callers already warned about (a quota reached): logged once each.
    warned: Arc<Mutex<HashSet<String>>>,
    next_key: Arc<AtomicU64>,
    bus: fdo::DBusProxy<'static>,
}

impl Peers {
    /// Starts watching the bus for departing connections.
    pub async fn start(conn: &Connection) -> zbus::Result<Peers> {
        let bus = fdo::DBusProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let peers = Peers {
            known: Arc::default(),
            warned: Arc::default(),
            next_key: Arc::new(AtomicU64::new(1)),
            bus,
        };
        let mut departures = peers.bus.receive_name_owner_changed().await?;
        let known = Arc::downgrade(&peers.known);
        let warned = Arc::downgrade(&peers.warned);
        tokio::spawn(async move {
            while let Some(signal) = departures.next().await {
                let Ok(args) = signal.args() else { continue };
                if args.new_owner().is_some() || !args.name().starts_with(':') {
                    continue;
                }
                if let Some(warned) = warned.upgrade() {
                    lock(&warned).remove(args.name().as_str());
                }
                let Some(known) = known.upgrade() else { break };
                let mut known = lock(&known);
                if known.remove(args.name().as_str()).is_some() {
                    tracing::debug!(
                        "forgot the credentials of {}, which left the bus ({} callers known)",
                        args.name(),
                        known.len()
                    );
                }
            }
        });
        Ok(peers)
    }

    /// The holder record for `sender`, from the bus's credentials.
    pub async fn holder(&self, sender: &UniqueName<'_>) -> Result<Arc<Holder>, proto::Error> {
        if let Some(holder) = lock(&self.known).get(sender.as_str()) {
            return Ok(holder.clone());
        }
        let credentials = self
            .bus
            .get_connection_credentials(sender.clone().into())
            .await
            .map_err(|e| proto::Error::AccessDenied(format!("cannot identify the caller: {e}")))?;
        let holder = Arc::new(Holder {
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
            bus_name: sender.to_string(),
            uid: credentials.unix_user_id().unwrap_or(u32::MAX),
            pid: credentials.process_id().unwrap_or(0),
        });
        // A caller that left between the lookup and here stays cached: one
        // small entry, and only in that race.
        Ok(lock(&self.known)
            .entry(sender.to_string())
            .or_insert(holder)
            .clone())
    }
}

impl Peers {
    /// Logs `why` for `sender` the first time only (until it leaves the bus).
    pub fn warn_once(&self, sender: &UniqueName<'_>, why: &str) {
        if lock(&self.warned).insert(sender.to_string()) {
            tracing::warn!("{sender}: {why} (further refusals for it are not logged)");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
