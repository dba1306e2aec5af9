//! Finding devmgrd (DESIGN.md §3): `--address`, then `$DEVMGR_BUS_ADDRESS`,
//! then the embedded bus's address file, then the system bus, then the
//! session bus. An address given explicitly is the only one tried; otherwise
//! the first bus on which devmgrd owns its name, or can be started by D-Bus
//! activation (its service file is installed there), wins; when none does
//! the error lists every place tried and why it failed.

use std::path::Path;

use zbus::{fdo, Connection};

use crate::failure::Failure;

/// Where the daemon was found.
pub struct Found {
    /// The connection to its bus.
    pub conn: Connection,
    /// How the bus was chosen (`--address`, `embedded bus file …`, `system bus`…).
    pub source: String,
    /// The bus address, when it is known.
    pub address: Option<String>,
}

const SYSTEM_BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

/// Connects to the bus devmgrd is on.
pub async fn find(explicit: Option<&str>) -> Result<Found, Failure> {
    if let Some(address) = explicit {
        return try_address("--address", address)
            .await
            .map_err(|why| unreachable(&[why]));
    }
    if let Ok(address) = std::env::var("DEVMGR_BUS_ADDRESS") {
        return try_address("$DEVMGR_BUS_ADDRESS", &address)
            .await
            .map_err(|why| unreachable(&[why]));
    }
    let mut tried = Vec::new();
    let file = proto::runtime::address_file(&proto::runtime::runtime_dir());
    match std::fs::read_to_string(&file) {
        Ok(address) => {
            let source = format!("the embedded bus named in {}", file.display());
            match try_address(&source, address.trim()).await {
                Ok(found) => return Ok(found),
                Err(why) => tried.push(why),
            }
        }
        Err(e) => tried.push(format!("the embedded bus file {}: {e}", file.display())),
    }
    let system = std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .unwrap_or_else(|_| format!("unix:path={SYSTEM_BUS_SOCKET}"));
    if std::env::var_os("DBUS_SYSTEM_BUS_ADDRESS").is_none()
        && !Path::new(SYSTEM_BUS_SOCKET).exists()
    {
        tried.push(format!(
            "the system bus: {SYSTEM_BUS_SOCKET} does not exist"
        ));
    } else {
        match try_address("the system bus", &system).await {
            Ok(found) => return Ok(found),
            Err(why) => tried.push(why),
        }
    }
    match std::env::var("DBUS_SESSION_BUS_ADDRESS") {
        Ok(address) => match try_address("the session bus", &address).await {
            Ok(found) => return Ok(found),
            Err(why) => tried.push(why),
        },
        Err(_) => tried.push("the session bus: $DBUS_SESSION_BUS_ADDRESS is not set".into()),
    }
    Err(unreachable(&tried))
}

fn unreachable(tried: &[String]) -> Failure {
    let mut text = String::from("devmgrd is not reachable; tried:");
    for why in tried {
        text.push_str("\n  - ");
        text.push_str(why);
    }
    Failure::Unreachable(text)
}

/// Connects to `address` and checks that devmgrd owns its name there, or
/// starts it when the bus can (D-Bus activation; under systemd the bus asks
/// systemd to start devmgr.service and answers once the name is claimed,
/// which devmgrd does only after its coldplug).
async fn try_address(source: &str, address: &str) -> Result<Found, String> {
    let conn = zbus::connection::Builder::address(address)
        .build()
        .await
        .map_err(|e| format!("{source} ({address}): cannot connect: {e}"))?;
    let bus = fdo::DBusProxy::new(&conn)
        .await
        .map_err(|e| format!("{source} ({address}): {e}"))?;
    let name = || zbus::names::WellKnownName::from_static_str_unchecked(proto::BUS_NAME);
    let found = |conn| Found {
        conn,
        source: source.to_owned(),
        address: Some(address.to_owned()),
    };
    match bus.name_has_owner(name().into()).await {
        Ok(true) => return Ok(found(conn)),
        Ok(false) => {}
        Err(e) => return Err(format!("{source} ({address}): {e}")),
    }
    // Asking first keeps a bus that cannot start us from being reported
    // as a failed start, and a bus that can from being skipped.
    let activatable = bus
        .list_activatable_names()
        .await
        .map_err(|e| format!("{source} ({address}): {e}"))?
        .iter()
        .any(|n| n.as_str() == proto::BUS_NAME);
    if !activatable {
        return Err(format!(
            "{source} ({address}): no one owns {} and the bus cannot start it \
             (no D-Bus service file for it)",
            proto::BUS_NAME
        ));
    }
    match bus.start_service_by_name(name(), 0).await {
        Ok(_) => Ok(found(conn)),
        Err(e) => Err(format!(
            "{source} ({address}): starting {} failed: {e}",
            proto::BUS_NAME
        )),
    }
}
