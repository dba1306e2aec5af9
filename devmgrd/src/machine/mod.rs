//! What faces the machine: its device events in (`uevents`, with
//! `relay_check`; `replay` for recorded ones) and into the model
//! (`ingest`), the kernel's own users of its block devices (`users`), and
//! the real actions that removals ask for (`effects`, under `claim`'s
//! exclusive hold). It reaches the model only through the owner's handle.

mod claim;
pub(crate) mod effects;
pub(crate) mod ingest;
mod relay_check;
pub(crate) mod replay;
pub(crate) mod uevents;
pub(crate) mod users;
