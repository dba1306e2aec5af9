//! Identities handed out by the engine: object, reference and removal-request
//! ids. None is ever reused, so a stale id is rejected instead of silently
//! naming a newer thing.
//!
//! Object and reference ids are `(sequence << 24) | slot`: the sequence comes
//! from a monotonic counter (so ids only grow and never repeat), and the slot
//! is where the thing lives in its arena, so resolving an id is one array
//! access checked against the stored id — no hash lookup on the hot path.
//! Limits: 2^24 (16.7 million) live objects or references at once, and 2^40
//! (1.1 × 10^12) creations of each over the model's life; past either, adding
//! is refused with `QuotaExceeded` — an id is never reused.

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
/// One removal request: what a re-enable, a stop or a deadline cancels.
/// Never zero, so `Option<RequestId>` costs no more than the id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(std::num::NonZeroU64);

impl RequestId {
    /// The request id for a counter value (counters start at 1).
    pub(crate) fn from_counter(n: u64) -> Self {
        RequestId(std::num::NonZeroU64::new(n).unwrap_or(std::num::NonZeroU64::MIN))
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Microseconds since the Unix epoch. The engine owns no clock: callers pass
/// "now" in, so tests and replays are deterministic.
pub type Micros = u64;

/// Bits of an arena id that hold the slot.
pub(crate) const SLOT_BITS: u32 = 24;
/// Most things one arena holds at once.
pub(crate) const MAX_SLOTS: usize = 1 << SLOT_BITS;
/// Most things one arena hands ids to over its life.
pub(crate) const MAX_SEQUENCE: u64 = (1 << (64 - SLOT_BITS)) - 1;

/// Builds an arena id from a sequence number and a slot.
pub(crate) const fn compose(sequence: u64, slot: u32) -> u64 {
    (sequence << SLOT_BITS) | slot as u64
}

/// The arena slot an id names (the caller checks the stored id matches).
pub(crate) const fn slot_of(id: u64) -> u32 {
    (id & (MAX_SLOTS as u64 - 1)) as u32
}

/// A monotonic counter that hands out ids starting at 1.
#[derive(Clone, Debug)]
pub(crate) struct Counter(u64);

impl Counter {
    pub(crate) fn starting_after(last: u64) -> Self {
        Counter(last)
    }

    pub(crate) fn next(&mut self) -> u64 {
        // Callers check `exhausted` first: saturating here would reuse ids.
        self.0 = self.0.saturating_add(1);
        self.0
    }

    /// Whether an arena id built from `next` would overflow its sequence bits.
    pub(crate) fn exhausted(&self) -> bool {
        self.0 >= MAX_SEQUENCE
    }

    /// The id `next` would hand out.
    pub(crate) fn peek(&self) -> u64 {
        self.0.saturating_add(1)
    }

    pub(crate) fn last(&self) -> u64 {
        self.0
    }
}
