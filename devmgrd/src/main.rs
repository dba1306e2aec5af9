//! devmgrd: the devmgr daemon. Owns the device model and serves it on D-Bus
//! as `org.devmgr.DevMgr1` (shared/DESIGN.md §3).

mod bus;
mod cli;
mod config;
mod logging;
mod machine;
mod owner;
mod state;

use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: see devmgrd/Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use drivers::{AddRequest, Kind, Model};

use bus::choice::{BusChoice, EmbeddedBus};
use bus::{authz, peers};
use config::Settings;
use machine::{effects, ingest, replay, uevents, users};
use owner::handle::ModelHandle;
use state::{persist, store};
use zbus::connection;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = cli::Args::parse();
    if let Some(what) = args.generate {
        return match cli::generate(what) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("devmgrd: cannot write: {e}");
                ExitCode::FAILURE
            }
        };
    }
    logging::init();
    let state_directory = std::env::var("STATE_DIRECTORY").ok();
    let settings = match config::settings(args, state_directory.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(file) = &settings.config {
        tracing::info!("configuration from {}", file.display());
    }
    // Each reference holds one socket open; the usual soft limit of 1,024
    // would cap references near a thousand. The hard limit is ours to take.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!("open files limit: {limit}"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
    match run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The model (restored from `--state-dir` if given), its tracker, and the
/// open state directory with what it now keeps.
fn build_model(
    settings: &Settings,
) -> Result<(owner::handle::Owned, Option<(store::Store, persist::Kept)>), String> {
    let (store, kept) = match &settings.state_dir {
        None => (None, persist::Kept::default()),
        Some(dir) => {
            let (store, kept) = store::Store::open(dir)?;
            (Some(store), kept)
        }
    };
    let mut model = Model::with_sequence_after(drivers::Registry::builtin(), kept.sequence);
    // The simulated SCSI host adapter is always there, for demos and tests.
    model
        .add(AddRequest::new(Kind::Driver, proto::SIM_SCSI_DRIVER))
        .map_err(|e| format!("cannot create the sim-scsi driver: {e}"))?;
    let Some(mut store) = store else {
        return Ok((owner::handle::Owned::new(model, None), None));
    };
    let (tracker, restored) =
        persist::Tracker::restore(&mut model, &kept, owner::handle::now_micros());
    for why in &restored.dropped {
        tracing::warn!("not restored: {why}");
    }
    tracing::info!(
        "restored {} objects from {}{}",
        restored.objects,
        store.dir().display(),
        match restored.waiting {
            0 => String::new(),
            n => format!("; {n} wait for real devices"),
        }
    );
    // From here on, what is kept names the objects by their new ids.
    let kept = tracker.snapshot();
    store
        .compact(&kept)
        .map_err(|e| format!("cannot write the state in {}: {e}", store.dir().display()))?;
    let owned = owner::handle::Owned::new(model, Some(tracker));
    Ok((owned, Some((store, kept))))
}

/// The daemon, once its settings are whole: the model (restored) and its
/// limits, the owner task with the kernel users watcher and the state
/// directory's persister, the machine's device events, then the bus (the
/// name claimed once the coldplug is published); it serves until a signal
/// stops it or what it needs is lost.
async fn run(settings: Settings) -> Result<(), String> {
    // From the start: a SIGTERM while devmgrd starts up must still shut it
    // down cleanly (a test once caught the default action killing it).
    let shutdown = shutdown_signals();
    let (mut owned, store) = build_model(&settings)?;
    // After the restore: the limits are for what clients add from now on.
    set_limits(&mut owned.model, &settings);
    let actuation = effects::Actuation {
        enabled: settings.actuate,
        sysfs_root: settings.sysfs_root.clone(),
    };
    // The kernel's users of real devices are followed whenever real devices
    // are modelled (rule 17).
    let (watcher, kernel_updates) = if settings.udev || settings.replay.is_some() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = users::spawn(settings.sysfs_root.clone(), tx)?;
        (Some(watcher), Some(rx))
    } else {
        (None, None)
    };
    owned.kernel = users::Registry::new(watcher.clone());
    let (handle, batches) = owner::spawn(owned, actuation, watcher.clone());
    if let Some(updates) = kernel_updates {
        tokio::spawn(owner::record_kernel_users(handle.clone(), updates));
    }
    let (batches, state_failed, writable) = match store {
        None => (batches, None, store::Writable::default()),
        Some((store, kept)) => {
            let (batches, failed, writable) = store::spawn(store, kept, batches);
            (batches, Some(failed), writable)
        }
    };
    let authz = authz::Authorizer {
        policy: std::sync::Arc::new(authz::Policy {
            own_uid: proto::runtime::current_uid(),
            group: settings.authorized_group.clone(),
            restrict_acquire: settings.restrict_acquire,
        }),
        peers: peers::Peers::default(),
    };
    // The device events start before the bus: the name is claimed once the
    // coldplug is in (`bus::serve_on`).
    let coldplugged = start_device_events(&settings, &handle, &watcher).await?;
    let (conn, label, mut embedded) =
        serve_on_chosen_bus(&settings, &handle, &authz, &writable, batches, &coldplugged).await?;
    authz
        .peers
        .watch_departures(&conn)
        .await
        .map_err(|e| format!("cannot watch the bus's connections: {e}"))?;
    tracing::info!("serving {} on the {label} bus", proto::BUS_NAME);
    let bus_gone = bus::lost(&conn, &label)
        .await
        .map_err(|e| format!("cannot watch the bus connection: {e}"))?;
    let lost = until_stopped(shutdown, embedded.as_mut(), bus_gone, state_failed).await;
    tracing::info!("shutting down");
    let _ = conn.release_name(proto::BUS_NAME).await;
    if let Some(bus) = embedded {
        bus.stop().await;
    }
    match lost {
        None => Ok(()),
        Some(why) => Err(why),
    }
}

/// The limits on what clients take and add (docs/config.md), set after
/// the restore: they are for what clients add from now on.
fn set_limits(model: &mut Model, settings: &Settings) {
    model.set_reference_quota(Some(settings.max_references_per_client).filter(|&n| n > 0));
    // Each reference holds a file descriptor open: all of them together may
    // not take the descriptors devmgrd needs for its own work, and one user
    // may not take them all (issue 13).
    let capacity = reference_capacity();
    let per_user = settings
        .max_references_per_user
        .unwrap_or_else(|| u32::try_from(capacity / 4).unwrap_or(u32::MAX));
    model.set_reference_limit(Some(capacity));
    // Root and devmgrd's own user could stop it anyway: the limit in all
    // is theirs.
    let exempt = [0, proto::runtime::current_uid()];
    model.set_user_reference_quota(Some(per_user).filter(|&n| n > 0), &exempt);
    tracing::info!(
        "references: at most {capacity} in all, {} per user (root aside), {} per client connection",
        limit_text(per_user),
        limit_text(settings.max_references_per_client)
    );
    model.set_object_limit(Some(settings.max_objects).filter(|&n| n > 0));
    model.set_added_quota(Some(settings.max_objects_per_client).filter(|&n| n > 0));
}

/// Starts the machine's device events (a replay, or the udev monitor)
/// into the ingestion; what it returns says when the coldplug is in. A
/// replay and `--no-udev` have no coldplug.
async fn start_device_events(
    settings: &Settings,
    handle: &ModelHandle,
    watcher: &Option<users::Handle>,
) -> Result<tokio::sync::watch::Receiver<bool>, String> {
    let (coldplugged_tx, coldplugged) =
        tokio::sync::watch::channel(settings.replay.is_some() || !settings.udev);
    if let Some(file) = settings.replay.clone() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(replay::run(
            file,
            settings.udev_source,
            settings.subsystems.clone(),
            tx,
        ));
        tokio::spawn(ingest::run(
            handle.clone(),
            rx,
            watcher.clone(),
            coldplugged_tx.clone(),
        ));
    } else if settings.udev {
        let source = settings.udev_source.unwrap_or_else(uevents::detect_source);
        if source == uevents::Source::Udev && !uevents::udevd_listening() {
            tracing::warn!("no systemd-udevd answers: udev events will not arrive until one runs");
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        uevents::start(
            source,
            &settings.subsystems,
            settings.udev_receive_buffer,
            tx,
        )
        .await?;
        tokio::spawn(ingest::run(
            handle.clone(),
            rx,
            watcher.clone(),
            coldplugged_tx.clone(),
        ));
        tracing::info!(
            "modelling {} from {} events",
            settings.subsystems.join(", "),
            source.as_str()
        );
    }
    // Only the ingestion may say the coldplug is in; if it stops first, the
    // wait ends with an error instead of forever.
    drop(coldplugged_tx);
    Ok(coldplugged)
}

/// Serves on the bus the settings choose, or on an embedded bus where
/// `auto` finds none that serves (never when a bus activated us, nor when
/// another devmgrd has the name). Returns the connection, the bus's label
/// for the log, and the embedded bus if it is one.
async fn serve_on_chosen_bus(
    settings: &Settings,
    handle: &ModelHandle,
    authz: &authz::Authorizer,
    writable: &store::Writable,
    batches: tokio::sync::mpsc::UnboundedReceiver<owner::Batch>,
    coldplugged: &tokio::sync::watch::Receiver<bool>,
) -> Result<(zbus::Connection, String, Option<EmbeddedBus>), String> {
    let runtime_dir = settings
        .runtime_dir
        .clone()
        .unwrap_or_else(bus::choice::runtime_dir);
    let choice = settings.bus.clone().resolve();
    // Falling back to an embedded bus would leave a bus that activated us
    // waiting for a name that never comes: fail instead.
    let auto = settings.bus == BusChoice::Auto && !matches!(choice, BusChoice::Starter { .. });
    let mut embedded = None;
    let shared = choice.builder();
    let mut batches = Some(batches);
    let conn = match shared {
        Some((builder, label, bus_type)) => {
            let Some(taken) = batches.take() else {
                return Err("the model's batches are gone".to_owned());
            };
            let limit = settings.max_message_size;
            match bus::serve_on(
                builder,
                handle,
                authz,
                (&label, bus_type, limit),
                writable,
                taken,
                coldplugged,
            )
            .await
            {
                Ok(conn) => Some((conn, label)),
                Err(refused) if refused.fall_back && auto => {
                    tracing::warn!("{}; serving on an embedded bus instead", refused.why);
                    batches = refused.batches;
                    None
                }
                Err(refused) => return Err(refused.why),
            }
        }
        None => None,
    };
    let (conn, label) = match conn {
        Some(served) => served,
        None => {
            let Some(taken) = batches.take() else {
                return Err("the model's batches are gone".to_owned());
            };
            let bus = EmbeddedBus::start(&runtime_dir).await?;
            let address = bus.address().to_owned();
            embedded = Some(bus);
            let conn = bus::serve_on(
                connection::Builder::address(address.as_str()),
                handle,
                authz,
                (
                    "embedded",
                    bus::serve::limits::BusType::Unknown,
                    settings.max_message_size,
                ),
                writable,
                taken,
                coldplugged,
            )
            .await
            .map_err(|refused| refused.why)?;
            tracing::info!(
                "embedded bus at {address} (written to {})",
                bus::choice::address_file(&runtime_dir).display()
            );
            (conn, "embedded".to_owned())
        }
    };
    Ok((conn, label, embedded))
}

/// Waits for a reason to stop: SIGTERM or SIGINT (`None`), or the loss of
/// the embedded bus, of the bus connection or name, or of the state
/// directory (why).
async fn until_stopped(
    shutdown: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
    embedded: Option<&mut EmbeddedBus>,
    bus_gone: impl std::future::Future<Output = String>,
    state_failed: Option<tokio::sync::oneshot::Receiver<String>>,
) -> Option<String> {
    tokio::select! {
        () = wait_for_shutdown(shutdown) => None,
        why = async {
            match embedded {
                Some(bus) => bus.exited().await,
                None => std::future::pending().await,
            }
        } => Some(why),
        // Without the bus there is nothing to serve: exit non-zero, so that
        // a service manager restarts the daemon.
        why = bus_gone => Some(why),
        // Nor without a disk to keep changes on: nothing more is published.
        why = async {
            match state_failed {
                Some(failed) => failed.await.unwrap_or_else(|_| "the state writer stopped".to_owned()),
                None => std::future::pending().await,
            }
        } => Some(why),
    }
}

/// File descriptors kept for devmgrd's own work (the bus, the kernel users
/// watcher's pidfds (at most 4,096), the state directory, udev): no
/// reference may take them.
const RESERVED_FDS: u64 = 5120;

/// How many references devmgrd can hold: its open-files limit (already
/// raised to the hard limit) less the reserve, and at least 256.
fn reference_capacity() -> usize {
    let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    usize::try_from(soft.saturating_sub(RESERVED_FDS).max(256)).unwrap_or(usize::MAX)
}

fn limit_text(n: u32) -> String {
    if n == 0 {
        "no limit".to_owned()
    } else {
        n.to_string()
    }
}

/// SIGTERM and SIGINT, caught from now on.
fn shutdown_signals() -> Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => Some((term, int)),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("cannot watch SIGTERM and SIGINT: {e}");
            None
        }
    }
}

async fn wait_for_shutdown(
    signals: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
) {
    let Some((mut term, mut int)) = signals else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
