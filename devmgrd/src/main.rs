//! devmgrd: the devmgr daemon. Owns the device model and serves it on D-Bus
//! as `org.devmgr.DevMgr1` (shared/DESIGN.md §3).

mod errors;
mod handles;
mod owner;
mod pump;
mod service;

use std::process::ExitCode;

use clap::Parser;
use drivers::{AddRequest, Kind, Model};
use zbus::{connection, fdo};

/// The devmgr hotplug device-manager daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The bus to serve on: `session`, `system`, or a D-Bus address such as
    /// `unix:path=/run/devmgr/bus`.
    #[arg(long, default_value = "system")]
    bus: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let mut model = Model::default();
    // The simulated SCSI host adapter is always there, for demos and tests.
    model
        .add(AddRequest::new(Kind::Driver, proto::SIM_SCSI_DRIVER))
        .map_err(|e| format!("cannot create the sim-scsi driver: {e}"))?;
    let (handle, batches) = owner::spawn(model);
    let manager = service::Manager {
        handle: handle.clone(),
        object_count: 0.into(),
        pending_removals: 0.into(),
    };
    // Builders are infallible in zbus 6: a bad or unreachable bus shows up at `build()`.
    let builder = match args.bus.as_str() {
        "session" => connection::Builder::session(),
        "system" => connection::Builder::system(),
        address => connection::Builder::address(address),
    };
    let conn = builder
        .serve_at(proto::MANAGER_PATH, manager)
        .serve_at(proto::MANAGER_PATH, fdo::ObjectManager)
        .name(proto::BUS_NAME)
        .allow_name_replacements(false)
        .build()
        .await
        .map_err(|e| match e {
            zbus::Error::NameTaken => format!(
                "{} is already owned on the {} bus: is another devmgrd running?",
                proto::BUS_NAME,
                args.bus
            ),
            e => format!("cannot serve on the {} bus: {e}", args.bus),
        })?;
    let handles = handles::Handles::default();
    tokio::spawn(pump::run(conn.clone(), handle.clone(), handles, batches));
    // Publish what the model already holds (the sim-scsi driver).
    handle
        .call(|_| ())
        .await
        .map_err(|_| "the model's owner stopped".to_owned())?;
    tracing::info!("serving {} on the {} bus", proto::BUS_NAME, args.bus);
    wait_for_shutdown().await;
    tracing::info!("shutting down");
    let _ = conn.release_name(proto::BUS_NAME).await;
    Ok(())
}

async fn wait_for_shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
