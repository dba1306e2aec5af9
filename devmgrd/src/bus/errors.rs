//! Maps engine errors and malformed options onto the typed D-Bus errors of
//! the contract, one to one by kind: clients match on the error name.

use crate::owner::handle::OwnerGone;

/// An engine error as its `org.devmgr.DevMgr1.Error.*` counterpart.
pub fn from_engine(e: drivers::Error) -> proto::Error {
    proto::Error::new(e.kind, e.message)
}

/// The daemon is shutting down.
pub fn from_owner(_: OwnerGone) -> proto::Error {
    proto::Error::InvalidState("devmgrd is shutting down".into())
}

/// A malformed option value.
pub fn bad_option(key: &str, e: impl std::fmt::Display) -> proto::Error {
    proto::Error::InvalidArgument(format!("option {key:?}: {e}"))
}
