//! Identities handed out by the engine: object, reference and removal-request
//! ids. Each comes from its own monotonic counter and is never reused, so a
//! stale id is rejected instead of silently naming a newer thing.

use std::fmt;

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// An object's identity for its whole life (and its D-Bus path's last part).
    ObjectId
);
id_type!(
    /// A reference held on an object.
    RefId
);
id_type!(
    /// One removal request: what a re-enable, a stop or a deadline cancels.
    RequestId
);

/// Microseconds since the Unix epoch. The engine owns no clock: callers pass
/// "now" in, so tests and replays are deterministic.
pub type Micros = u64;

/// A monotonic counter that hands out ids starting at 1.
#[derive(Clone, Debug)]
pub(crate) struct Counter(u64);

impl Counter {
    pub(crate) fn starting_after(last: u64) -> Self {
        Counter(last)
    }

    pub(crate) fn next(&mut self) -> u64 {
        // 2^64 ids at one per nanosecond last 584 years; saturate rather than wrap.
        self.0 = self.0.saturating_add(1);
        self.0
    }

    /// The id `next` would hand out.
    pub(crate) fn peek(&self) -> u64 {
        self.0.saturating_add(1)
    }

    pub(crate) fn last(&self) -> u64 {
        self.0
    }
}
