//! The typed D-Bus error enum: one variant per `org.devmgr.DevMgr1.Error.*`
//! name, so clients match on the error name and never on its text.

use crate::ErrorKind;

/// Errors the daemon returns over D-Bus. Each variant's D-Bus name is
/// `org.devmgr.DevMgr1.Error.<Variant>`; the string is the human-readable text.
#[derive(zbus::DBusError, Debug)]
#[zbus(prefix = "org.devmgr.DevMgr1.Error")]
pub enum Error {
    /// A transport-level zbus error (not one of ours).
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No such object (or a stale id or path).
    NotFound(String),
    /// The object's state does not allow the operation.
    InvalidState(String),
    /// Another object of the same kind already has that name.
    NameInUse(String),
    /// An argument or option is malformed or out of range.
    InvalidArgument(String),
    /// The object has no way to carry out the operation.
    NotSupported(String),
    /// The caller may not do this.
    AccessDenied(String),
    /// A per-client or global limit was reached.
    QuotaExceeded(String),
}

impl Error {
    /// Builds the error of the given kind with this message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let message = message.into();
        match kind {
            ErrorKind::NotFound => Error::NotFound(message),
            ErrorKind::InvalidState => Error::InvalidState(message),
            ErrorKind::NameInUse => Error::NameInUse(message),
            ErrorKind::InvalidArgument => Error::InvalidArgument(message),
            ErrorKind::NotSupported => Error::NotSupported(message),
            ErrorKind::AccessDenied => Error::AccessDenied(message),
            ErrorKind::QuotaExceeded => Error::QuotaExceeded(message),
        }
    }

    /// The contract kind of this error, or `None` for a transport error.
    pub fn kind(&self) -> Option<ErrorKind> {
        Some(match self {
            Error::ZBus(_) => return None,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::InvalidState(_) => ErrorKind::InvalidState,
            Error::NameInUse(_) => ErrorKind::NameInUse,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::NotSupported(_) => ErrorKind::NotSupported,
            Error::AccessDenied(_) => ErrorKind::AccessDenied,
            Error::QuotaExceeded(_) => ErrorKind::QuotaExceeded,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::DBusError;

    #[test]
    fn every_kind_maps_to_its_exact_dbus_name() {
        for kind in ErrorKind::ALL {
            let err = Error::new(*kind, "x");
            assert_eq!(err.kind(), Some(*kind));
            assert_eq!(err.name().as_str(), kind.dbus_name());
        }
    }
}
