//! The engine's typed error: a contract error kind plus a human message.
//! The daemon maps the kind one-to-one onto `org.devmgr.DevMgr1.Error.*`.

pub use proto::ErrorKind;

/// Why an operation was refused. A refused operation changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// Which contract error this is.
    pub kind: ErrorKind,
    /// What went wrong, for people.
    pub message: String,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub(crate) fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidState, message)
    }
    pub(crate) fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
}

/// Result of an engine operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
