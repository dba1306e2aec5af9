//! Who is calling: the bus's own credentials (uid, pid, groups) for each
//! caller's unique name, asked of the bus once per client connection rather
//! than on every call, and forgotten when that connection leaves the bus.
//! Unique names are never reused during a bus's life, so a cached answer
//! cannot name a different process.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use drivers::Holder;
use futures_util::StreamExt;
use zbus::names::UniqueName;
use zbus::{fdo, Connection};

/// One caller, as the bus vouches for it.
#[derive(Debug)]
pub struct Caller {
    /// What its references record: bus name, uid, pid.
    pub holder: Arc<Holder>,
    /// Its supplementary groups (the bus's `UnixGroupIDs`).
    pub groups: Vec<u32>,
}

/// The callers seen so far, by unique name.
#[derive(Clone, Default)]
pub struct Peers {
    known: Arc<Mutex<HashMap<String, Arc<Caller>>>>,
    /// Callers already warned about (a quota reached): logged once each.
    warned: Arc<Mutex<HashSet<String>>>,
    next_key: Arc<AtomicU64>,
}

impl Peers {
    /// Forgets callers as they leave `conn`'s bus. Until this runs (the
    /// first moments after start), a caller that leaves stays cached: one
    /// small entry, in that window only.
    pub async fn watch_departures(&self, conn: &Connection) -> zbus::Result<()> {
        let bus = fdo::DBusProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let mut departures = bus.receive_name_owner_changed().await?;
        let known = Arc::downgrade(&self.known);
        let warned = Arc::downgrade(&self.warned);
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
        Ok(())
    }

    /// `sender`, from the bus's credentials (asked once per connection).
    pub async fn caller(
        &self,
        conn: &Connection,
        sender: &UniqueName<'_>,
    ) -> Result<Arc<Caller>, proto::Error> {
        if let Some(caller) = lock(&self.known).get(sender.as_str()) {
            return Ok(caller.clone());
        }
        let unknown =
            |e: fdo::Error| proto::Error::AccessDenied(format!("cannot identify the caller: {e}"));
        let bus = fdo::DBusProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| unknown(e.into()))?;
        let credentials = bus
            .get_connection_credentials(sender.clone().into())
            .await
            .map_err(unknown)?;
        let caller = Arc::new(Caller {
            holder: Arc::new(Holder {
                key: self.next_key.fetch_add(1, Ordering::Relaxed) + 1,
                bus_name: sender.to_string(),
                uid: credentials.unix_user_id().unwrap_or(u32::MAX),
                pid: credentials.process_id().unwrap_or(0),
            }),
            groups: credentials.unix_group_ids().cloned().unwrap_or_default(),
        });
        // A caller that left between the lookup and here stays cached: one
        // small entry, and only in that race.
        Ok(lock(&self.known)
            .entry(sender.to_string())
            .or_insert(caller)
            .clone())
    }

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
