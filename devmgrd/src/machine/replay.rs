//! `devmgrd --replay FILE`: device events recorded with `udevadm monitor
//! --property` (or written by hand in the kernel's uevent format) fed
//! through the same ingestion as live ones, so a storm seen on a real
//! machine can be reproduced offline. The file is read as a stream: a FIFO
//! works, and lets a test write events while it watches the bus.
//!
//! A recording holds a `KERNEL[…]` and a `UDEV […]` block per event; only
//! one kind is replayed — the one `--udev-source` names, else the kind of
//! the first block. A malformed block is reported with its line number and
//! skipped; it changes nothing.

use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use drivers::uevent::{Parser, ReplayError, Source, UEvent};

use crate::machine::uevents::Ingest;

/// Reads `path` to its end, sending each event; malformed blocks are logged.
pub async fn run(
    path: std::path::PathBuf,
    only: Option<Source>,
    subsystems: Vec<String>,
    events: mpsc::UnboundedSender<Ingest>,
) {
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("cannot replay {}: {e}", path.display());
            return;
        }
    };
    let mut lines = tokio::io::BufReader::new(file).lines();
    let mut parser = Parser::new(only);
    let (mut replayed, mut skipped) = (0u64, 0u64);
    loop {
        let next = match lines.next_line().await {
            Ok(Some(line)) => parser.line(&line),
            Ok(None) => {
                let last = parser.finish().filter(|r| {
                    r.as_ref()
                        .map_or(true, |e| subsystems.contains(&e.subsystem))
                });
                if let Some(result) = last {
                    deliver(result, &path, &events, &mut replayed, &mut skipped);
                }
                break;
            }
            Err(e) => {
                tracing::error!("cannot read {}: {e}", path.display());
                break;
            }
        };
        // Only the subsystems asked for, as the live monitor filters.
        let next = next.filter(|r| {
            r.as_ref()
                .map_or(true, |e| subsystems.contains(&e.subsystem))
        });
        if let Some(result) = next {
            deliver(result, &path, &events, &mut replayed, &mut skipped);
        }
    }
    tracing::info!(
        "replayed {replayed} events from {} ({skipped} malformed, skipped)",
        path.display()
    );
}

fn deliver(
    result: Result<UEvent, ReplayError>,
    path: &std::path::Path,
    events: &mpsc::UnboundedSender<Ingest>,
    replayed: &mut u64,
    skipped: &mut u64,
) {
    match result {
        Ok(event) => {
            *replayed += 1;
            let _ = events.send(Ingest::Event(event));
        }
        Err(e) => {
            *skipped += 1;
            tracing::warn!("{}: {e}; skipped", path.display());
        }
    }
}
