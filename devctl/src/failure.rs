//! Why devctl failed, and the exit status each reason gets (documented in
//! `--help` and the man page): the daemon's refusals keep their D-Bus error
//! name, so a script can tell them apart without parsing text.

use zbus::DBusError;

/// A failure, by exit status.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The daemon refused (exit 1): its error name and message.
    #[error("{name}: {message}")]
    Refused { name: String, message: String },
    /// Something else went wrong after the daemon was reached (exit 1).
    #[error("{0}")]
    Failed(String),
    /// Bad arguments or an unknown or ambiguous object name (exit 2).
    #[error("{0}")]
    Usage(String),
    /// `remove --wait` ended with the removal still pending (exit 3).
    #[error("{0}")]
    StillPending(String),
    /// devmgrd could not be reached (exit 69, EX_UNAVAILABLE).
    #[error("{0}")]
    Unreachable(String),
    /// Whoever read our output went away (exit 141, as if by SIGPIPE).
    #[error("")]
    OutputClosed,
    /// The caller may not do this (exit 77, EX_NOPERM).
    #[error("{name}: {message}")]
    AccessDenied { name: String, message: String },
}

impl Failure {
    /// The process exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused { .. } | Failure::Failed(_) => 1,
            Failure::Usage(_) => 2,
            Failure::StillPending(_) => 3,
            Failure::Unreachable(_) => 69,
            Failure::AccessDenied { .. } => 77,
            Failure::OutputClosed => 141,
        }
    }
}

/// Bus errors that mean the daemon is not there to answer.
const UNREACHABLE: &[&str] = &[
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.NoServer",
];

impl From<proto::Error> for Failure {
    fn from(e: proto::Error) -> Failure {
        match e {
            proto::Error::ZBus(e) => Failure::from(e),
            other => {
                let name = other.name().to_string();
                let message = other.description().unwrap_or_default().to_owned();
                if matches!(other, proto::Error::AccessDenied(_)) {
                    Failure::AccessDenied { name, message }
                } else {
                    Failure::Refused { name, message }
                }
            }
        }
    }
}

impl From<zbus::Error> for Failure {
    fn from(e: zbus::Error) -> Failure {
        match e {
            zbus::Error::MethodError(name, message, _) => {
                by_name(name.to_string(), message.unwrap_or_default())
            }
            zbus::Error::FDO(e) => by_name(
                e.name().to_string(),
                e.description().unwrap_or_default().to_owned(),
            ),
            zbus::Error::InputOutput(e) => {
                Failure::Unreachable(format!("lost the connection to the bus: {e}"))
            }
            other => Failure::Failed(other.to_string()),
        }
    }
}

/// An error reply from the bus or the daemon, by its name.
fn by_name(name: String, message: String) -> Failure {
    if name == "org.freedesktop.DBus.Error.AccessDenied" {
        Failure::AccessDenied { name, message }
    } else if UNREACHABLE.contains(&name.as_str()) {
        Failure::Unreachable(format!("devmgrd is not reachable: {name}: {message}"))
    } else {
        Failure::Refused { name, message }
    }
}

impl From<zbus::fdo::Error> for Failure {
    fn from(e: zbus::fdo::Error) -> Failure {
        Failure::from(zbus::Error::from(e))
    }
}

/// What a command returns.
pub type Outcome<T = ()> = Result<T, Failure>;
