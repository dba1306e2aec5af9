//! The state directory (`--state-dir`): a snapshot replaced atomically, the
//! journal of changes since it (one JSON change per line, fsync'd before
//! the replies they back go out), and a lock that keeps a second daemon
//! out. Also the persister: the stage between the owner and the event pump
//! that makes each group of batches durable before it is published.
//!
//! Files: `state.json` names the journal that goes with it
//! (`journal.<generation>`). A compaction writes a new, empty journal, then
//! a new snapshot naming it (write, fsync, rename, fsync the directory),
//! then deletes the old journal: whenever the daemon dies, `state.json`
//! and the journal it names are a consistent pair.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::owner::Batch;
use crate::state::persist::{Change, Kept, Link, Record};

const SNAPSHOT: &str = "state.json";
const FORMAT: u32 = 1;

/// Room kept in the state directory (a file of this size, `reserve`):
/// when the filesystem fills up, deleting it lets the change that found
/// the disk full be written after all (so nothing acknowledged is ever
/// lost and nothing needs undoing), and what is still in flight after it.
const RESERVE: &str = "reserve";
const RESERVE_BYTES: i64 = 1024 * 1024;

/// Whether changes can be kept now: shared by the persister, which knows,
/// and the D-Bus adapters, which refuse changes while they cannot.
#[derive(Clone, Default)]
pub struct Writable(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl Writable {
    /// Ok, or why changes are refused (the state directory is full).
    pub fn check(&self) -> Result<(), String> {
        match &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    fn set(&self, why: Option<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }
}

/// The snapshot file's contents.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    /// The file format's version.
    format: u32,
    /// Which journal follows this snapshot.
    generation: u64,
    /// The highest object-id sequence number that may have been used.
    sequence: u64,
    /// Everything kept.
    records: Vec<Record>,
}

/// The open state directory.
pub struct Store {
    dir: PathBuf,
    generation: u64,
    journal: File,
    journal_lines: usize,
    /// Whether `reserve` holds its room.
    reserved: bool,
    _lock: Flock<File>,
}

fn journal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("journal.{generation}"))
}

/// Fsyncs a directory, so a rename or a new file in it is durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    /// Opens (creating if needed) the state directory and loads what it
    /// keeps. A malformed file is an error naming it (and the line); only
    /// a torn last journal line — a write the crash cut short, never
    /// acknowledged — is skipped, with a warning.
    pub fn open(dir: &Path) -> Result<(Store, Kept), String> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create the state directory {}: {e}", dir.display()))?;
        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            format!(
                "the state directory {} is in use by another devmgrd ({e})",
                dir.display()
            )
        })?;
        let mut kept = Kept::default();
        let snapshot_path = dir.join(SNAPSHOT);
        let generation = match std::fs::read(&snapshot_path) {
            Ok(bytes) => {
                let snapshot: Snapshot = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{}: {e}", snapshot_path.display()))?;
                if snapshot.format != FORMAT {
                    return Err(format!(
                        "{}: format {} is not one this devmgrd reads ({FORMAT})",
                        snapshot_path.display(),
                        snapshot.format
                    ));
                }
                kept.sequence = snapshot.sequence;
                for record in snapshot.records {
                    kept.apply(Change::Put(record));
                }
                snapshot.generation
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(format!("cannot read {}: {e}", snapshot_path.display())),
        };
        let path = journal_path(dir, generation);
        match std::fs::read(&path) {
            Ok(bytes) => read_journal(&path, &bytes, &mut kept)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        let journal = open_journal(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let store = Store {
            dir: dir.to_owned(),
            generation,
            journal,
            journal_lines: 0,
            reserved: false,
            _lock: lock,
        };
        let mut store = store;
        if let Err(e) = store.reserve() {
            tracing::warn!(
                "cannot keep {RESERVE_BYTES} bytes in reserve in {}: {e}",
                dir.display()
            );
        }
        Ok((store, kept))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the reserve hold its room (allocated, not merely sized).
    fn reserve(&mut self) -> std::io::Result<()> {
        let path = self.dir.join(RESERVE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)?;
        if let Err(e) = nix::fcntl::posix_fallocate(&file, 0, RESERVE_BYTES) {
            // Whatever part was allocated would only hide the shortage.
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
        file.sync_all()?;
        sync_dir(&self.dir)?;
        self.reserved = true;
        Ok(())
    }

    /// Appends `changes` to the journal and makes them durable. If the
    /// filesystem is full, the reserve is given up for them: `Ok(true)`
    /// says that happened (and no more changes should be accepted until
    /// [`Store::recover`]).
    pub fn append(&mut self, changes: &[Change]) -> std::io::Result<bool> {
        let mut buffer = Vec::with_capacity(changes.len() * 128);
        for change in changes {
            serde_json::to_writer(&mut buffer, change)?;
            buffer.push(b'\n');
        }
        let before = self.journal.metadata()?.len();
        match self.write_durably(&buffer) {
            Ok(()) => {}
            Err(e) if self.reserved && is_full(&e) => {
                // No torn line may stay behind what comes next.
                self.journal.set_len(before)?;
                std::fs::remove_file(self.dir.join(RESERVE))?;
                self.reserved = false;
                sync_dir(&self.dir)?;
                tracing::warn!(
                    "{} is full ({e}): writing with the reserve; changes are refused until there is room",
                    self.dir.display()
                );
                self.write_durably(&buffer)?;
                self.journal_lines += changes.len();
                return Ok(true);
            }
            Err(e) => {
                let _ = self.journal.set_len(before);
                return Err(e);
            }
        }
        self.journal_lines += changes.len();
        Ok(!self.reserved)
    }

    fn write_durably(&mut self, buffer: &[u8]) -> std::io::Result<()> {
        self.journal.write_all(buffer)?;
        self.journal.sync_data()
    }

    /// Whether the reserve is back (there was room for it): changes may be
    /// accepted again.
    pub fn recover(&mut self) -> bool {
        self.reserved || self.reserve().is_ok()
    }

    /// Whether the journal has grown past what a snapshot of `kept` costs.
    pub fn wants_compaction(&self, kept: &Kept) -> bool {
        self.journal_lines > 10_000.max(2 * kept.records.len())
    }

    /// Replaces the snapshot with `kept` and starts an empty journal.
    pub fn compact(&mut self, kept: &Kept) -> std::io::Result<()> {
        let generation = self.generation + 1;
        let path = journal_path(&self.dir, generation);
        let journal = open_journal(&path)?;
        journal.sync_all()?;
        let mut records: Vec<Record> = kept.records.values().cloned().collect();
        // A stable order: the same state is the same file.
        records.sort_by(|a, b| order(&a.key()).cmp(&order(&b.key())));
        let snapshot = Snapshot {
            format: FORMAT,
            generation,
            sequence: kept.sequence,
            records,
        };
        let temporary = self.dir.join(format!("{SNAPSHOT}.new"));
        let written = (|| {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&temporary)?;
            serde_json::to_writer(std::io::BufWriter::new(&mut file), &snapshot)?;
            file.sync_all()?;
            std::fs::rename(&temporary, self.dir.join(SNAPSHOT))?;
            sync_dir(&self.dir)
        })();
        if let Err(e) = written {
            // The old snapshot and journal still stand: undo the new
            // journal and the half-written snapshot, and go on with them.
            let _ = std::fs::remove_file(&temporary);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let old = journal_path(&self.dir, self.generation);
        self.generation = generation;
        self.journal = journal;
        self.journal_lines = 0;
        match std::fs::remove_file(&old) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

fn order(key: &Link) -> (u8, u64, &str) {
    match key {
        Link::Object(id) => (0, *id, ""),
        Link::Device(path) => (1, 0, path.as_str()),
    }
}

/// A write refused for want of room (not a failing disk).
fn is_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

fn open_journal(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn read_journal(path: &Path, bytes: &[u8], kept: &mut Kept) -> Result<(), String> {
    let complete = bytes.ends_with(b"\n");
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let last = lines.len() - 1;
    for (index, line) in lines.into_iter().enumerate() {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<Change>(line) {
            Ok(change) => kept.apply(change),
            Err(e) if index == last && !complete => {
                tracing::warn!(
                    "{} line {}: an unfinished write ({e}); it was never acknowledged, skipped",
                    path.display(),
                    index + 1
                );
            }
            Err(e) => return Err(format!("{} line {}: {e}", path.display(), index + 1)),
        }
    }
    Ok(())
}

/// Starts the persister: every batch from the owner goes on to the pump
/// only once its changes are durable. Batches that wait meanwhile are
/// written together (one fsync for all). When the filesystem fills up, the
/// reserve takes what is in flight, `writable` refuses further changes,
/// and every two seconds the persister tries to take its reserve back;
/// once it can, changes are accepted again. If the disk fails otherwise
/// (or even the reserve is used up), nothing more is published and
/// `failed` says why (the daemon must stop: it can no longer keep its word).
pub fn spawn(
    store: Store,
    kept: Kept,
    mut batches: mpsc::UnboundedReceiver<Batch>,
) -> (
    mpsc::UnboundedReceiver<Batch>,
    oneshot::Receiver<String>,
    Writable,
) {
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (failed_tx, failed_rx) = oneshot::channel();
    let writable = Writable::default();
    let shared = writable.clone();
    tokio::spawn(async move {
        let mut state = Some((store, kept));
        let mut group = Vec::new();
        let mut full = false;
        loop {
            let first = if full {
                tokio::select! {
                    batch = batches.recv() => batch,
                    () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {
                        let Some((mut store, kept)) = state.take() else {
                            return;
                        };
                        let recovered = tokio::task::spawn_blocking(move || {
                            let recovered = store.recover();
                            (store, kept, recovered)
                        })
                        .await;
                        let Ok((store, kept, recovered)) = recovered else {
                            return;
                        };
                        if recovered {
                            tracing::info!("{} has room again: changes are accepted", store.dir().display());
                            full = false;
                            shared.set(None);
                        }
                        state = Some((store, kept));
                        continue;
                    }
                }
            } else {
                batches.recv().await
            };
            let Some(first) = first else {
                return;
            };
            group.push(first);
            while let Ok(batch) = batches.try_recv() {
                group.push(batch);
            }
            let changes: Vec<Change> = group
                .iter_mut()
                .flat_map(|b: &mut Batch| std::mem::take(&mut b.changes))
                .collect();
            if !changes.is_empty() {
                let Some((mut store, mut kept)) = state.take() else {
                    return;
                };
                let written = tokio::task::spawn_blocking(move || {
                    let result = write(&mut store, &mut kept, changes);
                    (store, kept, result)
                })
                .await;
                match written {
                    Ok((store, kept, Ok(now_full))) => {
                        if now_full && !full {
                            shared.set(Some(format!(
                                "the state directory {} is full: changes are refused until there \
                                 is room (references and reads still work)",
                                store.dir().display()
                            )));
                        }
                        full = now_full;
                        state = Some((store, kept));
                    }
                    Ok((_, _, Err(e))) => {
                        let _ = failed_tx.send(format!("cannot write the state: {e}"));
                        return;
                    }
                    Err(e) => {
                        let _ = failed_tx.send(format!("the state writer failed: {e}"));
                        return;
                    }
                }
            }
            for batch in group.drain(..) {
                if out_tx.send(batch).is_err() {
                    return;
                }
            }
        }
    });
    (out_rx, failed_rx, writable)
}

/// Appends, then compacts if due; `Ok(true)`: the filesystem is full (the
/// changes are durable, but no more should be accepted).
fn write(store: &mut Store, kept: &mut Kept, changes: Vec<Change>) -> std::io::Result<bool> {
    let full = store.append(&changes)?;
    for change in changes {
        kept.apply(change);
    }
    if !full && store.wants_compaction(kept) {
        // The journal is still whole: a compaction that fails for want of
        // room is tried again later, it loses nothing.
        match store.compact(kept) {
            Err(e) if is_full(&e) => {
                tracing::warn!("cannot compact the state in {}: {e}", store.dir().display());
            }
            other => other?,
        }
    }
    Ok(full)
}
