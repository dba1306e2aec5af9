//! A paged, filtered listing of the model in id order, and counts by kind
//! and state: what `Manager.ListObjects` and the Manager's count properties
//! serve (docs/contract.md, "Listing a big model").
//!
//! Ids only grow, so the order in which objects were added is id order: the
//! model keeps their ids in a vector as they are added and drops the
//! removed ones in bulk, now and then (`in_order`). A page resumes after
//! the last id the previous page returned, so an object that exists for the
//! whole listing is returned exactly once, whatever is added or removed
//! between pages; one added meanwhile may appear (after the cursor) and one
//! removed meanwhile may not.

use crate::model::{Model, ObjectInfo};
use crate::{Error, Kind, ObjectId, Origin, Result, State};

/// Most objects one page looks at (matching or not), so that a selective
/// filter over a million objects never holds the model's owner for long:
/// such a page may come back short, even empty, with a cursor to go on.
pub const MAX_SCAN: usize = 65_536;

/// What a page asks for.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Resume after this object (a cursor); `None` starts at the beginning.
    pub after: Option<ObjectId>,
    /// Most objects in the page.
    pub max: usize,
    /// Only objects of this kind.
    pub kind: Option<Kind>,
    /// Only objects in this state.
    pub state: Option<State>,
    /// Only objects of this origin.
    pub origin: Option<Origin>,
    /// Only this object and those below it.
    pub subtree: Option<ObjectId>,
}

/// Objects per kind and per state, every kind and state named.
pub type Counts = (Vec<(Kind, u32)>, Vec<(State, u32)>);

/// One page.
#[derive(Debug)]
pub struct Page {
    /// The matching objects, in id order.
    pub objects: Vec<ObjectInfo>,
    /// Where the next page starts (after this id), or `None`: no more.
    pub next: Option<ObjectId>,
}

impl Model {
    /// The page `query` asks for. `fits` is asked about each matching
    /// object in turn: `false` ends the page before it (the caller's byte
    /// budget), except that a page always holds at least one object. A
    /// `subtree` that does not exist is `NotFound`.
    pub fn page(&self, query: &Query, mut fits: impl FnMut(&ObjectInfo) -> bool) -> Result<Page> {
        let subtree = query.subtree.map(|id| self.key(id)).transpose()?;
        let start = match query.after {
            None => 0,
            Some(after) => self.in_order.partition_point(|id| *id <= after),
        };
        let mut objects = Vec::new();
        let mut last = None;
        for (scanned, &id) in self.in_order[start..].iter().enumerate() {
            if objects.len() >= query.max || scanned >= MAX_SCAN {
                return Ok(Page {
                    objects,
                    next: last,
                });
            }
            let Ok(key) = self.key(id) else {
                continue; // removed, not yet dropped from the order
            };
            let o = self.obj(key);
            let matches = query.kind.is_none_or(|k| o.kind == k)
                && query.origin.is_none_or(|k| o.origin == k)
                && query.state.is_none_or(|s| o.state() == s)
                && subtree.is_none_or(|root| self.is_within(key, root));
            if matches {
                let info = self.info(key);
                if !fits(&info) && !objects.is_empty() {
                    return Ok(Page {
                        objects,
                        next: last,
                    });
                }
                objects.push(info);
            }
            last = Some(id);
        }
        Ok(Page {
            objects,
            next: None,
        })
    }

    /// How many objects there are of each kind and in each state (every
    /// kind and state named, zero or not).
    pub fn counts(&self) -> Counts {
        let mut kinds = vec![0u32; Kind::ALL.len()];
        let mut states = vec![0u32; State::ALL.len()];
        for (_, o) in &self.objects {
            if let Some(i) = Kind::ALL.iter().position(|k| *k == o.kind) {
                kinds[i] += 1;
            }
            let state = o.state();
            if let Some(i) = State::ALL.iter().position(|s| *s == state) {
                states[i] += 1;
            }
        }
        (
            Kind::ALL.iter().copied().zip(kinds).collect(),
            State::ALL.iter().copied().zip(states).collect(),
        )
    }

    /// Whether `key` is `root` or below it.
    fn is_within(&self, mut key: crate::model::Key, root: crate::model::Key) -> bool {
        loop {
            if key == root {
                return true;
            }
            match self.obj(key).parent {
                crate::model::NONE => return false,
                parent => key = parent,
            }
        }
    }

    /// Every object's id, in id order.
    pub fn ids_in_order(&self) -> impl Iterator<Item = ObjectId> + '_ {
        self.in_order
            .iter()
            .copied()
            .filter(|id| self.contains(*id))
    }

    /// Records a new object's place in the order (ids only grow).
    pub(crate) fn ordered_insert(&mut self, id: ObjectId) {
        debug_assert!(self.in_order.last().is_none_or(|last| *last < id));
        self.in_order.push(id);
    }

    /// Notes that an object left; once most of the order is gone, drops
    /// the gone ones at once (amortized: each id is dropped once).
    pub(crate) fn ordered_remove(&mut self) {
        self.gone_from_order += 1;
        if self.gone_from_order > 1024 && self.gone_from_order * 2 > self.in_order.len() {
            let mut order = std::mem::take(&mut self.in_order);
            order.retain(|id| self.contains(*id));
            self.in_order = order;
            self.gone_from_order = 0;
        }
    }
}

impl Model {
    /// The object a client's cursor resumes after: the decimal id a page
    /// returned; "" is the beginning. Anything else, or an id this model
    /// never handed out, is `InvalidArgument`.
    pub fn cursor(&self, cursor: &str) -> Result<Option<ObjectId>> {
        if cursor.is_empty() {
            return Ok(None);
        }
        let bad = || Error::invalid_argument(format!("bad cursor {cursor:?}"));
        if !cursor.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let id = cursor.parse::<u64>().map_err(|_| bad())?;
        if id >> crate::ids::SLOT_BITS > self.object_sequence() {
            return Err(bad());
        }
        Ok(Some(ObjectId(id)))
    }
}

/// The cursor for a page that ends after `next` ("" when nothing is left).
pub fn cursor_of(next: Option<ObjectId>) -> String {
    next.map_or_else(String::new, |id| id.0.to_string())
}
