//! What persists (`--state-dir`): `persist` says what of the model is kept
//! and rebuilds a model from it (pure and synchronous); `store` keeps it in
//! the state directory's files, and holds each batch back from the bus
//! until its changes are fsync'd.

pub(crate) mod persist;
pub(crate) mod store;
