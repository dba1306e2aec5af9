//! What faces the bus: which bus devmgrd serves on (`choice`), the
//! dispatcher that answers every method call (`serve`), the pump that
//! publishes the model's events as signals before the replies they back
//! (`pump`), fd-held references (`handles`), who is calling (`peers`) and
//! whether they may (`authz`), and the engine's errors as the contract's
//! (`errors`). It reaches the model only through the owner's handle, and
//! publishes the owner's batches.
//!
//! This file serves on one bus (`serve_on`: connect, answer calls, publish,
//! and only then claim the name) and notices the bus going (`lost`).

pub(crate) mod authz;
pub(crate) mod choice;
mod errors;
mod handles;
pub(crate) mod peers;
mod pump;
pub(crate) mod serve;

use zbus::{connection, fdo};

use crate::owner::handle::ModelHandle;
use crate::owner::Batch;
use crate::state::store::Writable;

/// Why devmgrd could not serve on a bus, and the owner's batches back (for
/// a pump on another bus).
pub(crate) struct Refused {
    /// Whether another bus may be tried (never when another devmgrd runs).
    pub(crate) fall_back: bool,
    pub(crate) why: String,
    pub(crate) batches: Option<tokio::sync::mpsc::UnboundedReceiver<Batch>>,
}

/// Serves the manager on one bus: connects, starts answering calls, lets
/// the pump publish what is queued, and only then claims the name, so that
/// the first client to find devmgrd (systemd's readiness check among them)
/// sees the whole model.
pub(crate) async fn serve_on(
    builder: connection::Builder<'_>,
    handle: &ModelHandle,
    authz: &authz::Authorizer,
    // The bus's label and type, and the message size limit configured.
    bus: (&str, serve::limits::BusType, Option<usize>),
    writable: &Writable,
    batches: tokio::sync::mpsc::UnboundedReceiver<Batch>,
    coldplugged: &tokio::sync::watch::Receiver<bool>,
) -> Result<zbus::Connection, Refused> {
    let (label, bus_type, configured_limit) = bus;
    let refused = |why: String, batches| Refused {
        fall_back: true,
        why,
        batches,
    };
    let conn = match builder.build().await {
        Ok(conn) => conn,
        Err(e) => {
            return Err(refused(
                format!("cannot serve on the {label} bus: {e}"),
                Some(batches),
            ))
        }
    };
    let max_message = configured_limit.unwrap_or_else(|| serve::limits::max_message_size(bus_type));
    tracing::debug!("the {label} bus accepts messages of up to {max_message} bytes");
    let shared = serve::Shared {
        handle: handle.clone(),
        handles: handles::Handles::default(),
        authz: authz.clone(),
        max_message,
        writable: writable.clone(),
    };
    let calls = match serve::start(&conn, shared.clone()).await {
        Ok(calls) => calls,
        Err(e) => {
            return Err(refused(
                format!("cannot receive calls on the {label} bus: {e}"),
                Some(batches),
            ))
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let pump = tokio::spawn(pump::run(conn.clone(), shared, batches, stopped));
    // The name is claimed once the machine's devices are modelled and
    // published (what Type=dbus promises: the first call, the one that
    // activated us, sees them), and everything queued before is published.
    let mut coldplugged = coldplugged.clone();
    let coldplug = coldplugged.wait_for(|done| *done).await.map(|_| ());
    let refusal = match (coldplug, handle.read(|_| ()).await) {
        (Err(_), _) => Some((
            false,
            "the device events stopped before the coldplug".to_owned(),
        )),
        (_, Err(_)) => Some((false, "the model's owner stopped".to_owned())),
        (Ok(()), Ok(())) => {
            let claimed = conn
                .request_name_with_flags(proto::BUS_NAME, fdo::RequestNameFlags::DO_NOT_QUEUE)
                .await;
            match claimed {
                Ok(fdo::RequestNameReply::PrimaryOwner | fdo::RequestNameReply::AlreadyOwner) => {
                    None
                }
                // Another devmgrd: never fall back, never steal.
                Ok(_) | Err(zbus::Error::NameTaken) => Some((
                    false,
                    format!(
                        "{} is already owned on the {label} bus: is another devmgrd running?",
                        proto::BUS_NAME
                    ),
                )),
                Err(e) => Some((
                    true,
                    format!("cannot own {} on the {label} bus: {e}", proto::BUS_NAME),
                )),
            }
        }
    };
    match refusal {
        // `stop` dropped: the pump runs for as long as the daemon.
        None => {
            tokio::spawn(calls);
            Ok(conn)
        }
        Some((fall_back, why)) => {
            let _ = stop.send(());
            Err(Refused {
                fall_back,
                why,
                batches: pump.await.ok(),
            })
        }
    }
}

/// Resolves when the bus connection closes, or the bus takes our name away.
pub(crate) async fn lost(
    conn: &zbus::Connection,
    label: &str,
) -> zbus::Result<impl std::future::Future<Output = String>> {
    use futures_util::StreamExt;
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender("org.freedesktop.DBus")
        .member("NameLost")
        .arg(0, proto::BUS_NAME)
        .build()?;
    let mut stream = zbus::MessageStream::for_match_rule(rule, conn, None).await?;
    let label = label.to_owned();
    Ok(async move {
        match stream.next().await {
            Some(Ok(_)) => format!("lost the name {} on the {label} bus", proto::BUS_NAME),
            Some(Err(e)) => format!("lost the connection to the {label} bus: {e}"),
            None => format!("lost the connection to the {label} bus"),
        }
    })
}
