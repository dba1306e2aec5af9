//! Compact storage for an object's attributes: every key and value in one
//! allocation (`key\0value\0key\0value`, sorted by key), because most objects
//! carry a handful of short attributes and a map per object would cost more
//! than the object itself. Maps are used only at the API's edges.

use std::collections::BTreeMap;

/// An object's attributes. Keys and values never contain NUL (checked by
/// `validate::attributes`), so NUL separates them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes(Option<Box<str>>);

impl Attributes {
    /// Packs a (validated) map.
    pub fn from_map(map: &BTreeMap<String, String>) -> Self {
        if map.is_empty() {
            return Attributes(None);
        }
        let mut packed =
            String::with_capacity(map.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
        for (k, v) in map {
            if !packed.is_empty() {
                packed.push('\0');
            }
            packed.push_str(k);
            packed.push('\0');
            packed.push_str(v);
        }
        Attributes(Some(packed.into_boxed_str()))
    }

    /// Every (key, value), sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut parts = self.0.as_deref().unwrap_or("").split('\0');
        let empty = self.0.is_none();
        std::iter::from_fn(move || {
            if empty {
                return None;
            }
            Some((parts.next()?, parts.next()?))
        })
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// How many attributes there are.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The attributes as a map.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_including_empty_values() {
        let map = BTreeMap::from([
            ("b".to_owned(), String::new()),
            ("a".to_owned(), "1".to_owned()),
            ("c".to_owned(), "x y".to_owned()),
        ]);
        let packed = Attributes::from_map(&map);
        assert_eq!(packed.to_map(), map);
        assert_eq!(packed.get("b"), Some(""));
        assert_eq!(packed.get("c"), Some("x y"));
        assert_eq!(packed.get("d"), None);
        assert_eq!(packed.len(), 3);
        let empty = Attributes::from_map(&BTreeMap::new());
        assert!(empty.is_empty() && empty.to_map().is_empty() && empty.get("a").is_none());
    }
}
