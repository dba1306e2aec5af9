//! Decoding what a call carries: object paths, `a{sv}` options, and a
//! body of the expected signature. Bad input is a typed error, never a
//! panic, and is found before anything changes.

use std::collections::HashMap;

use drivers::ObjectId;
use proto::NO_OBJECT_PATH;
use zbus::{ObjectPath, OwnedObjectPath, OwnedVariant};

use crate::bus::errors::bad_option;

/// A call's `a{sv}` options.
pub type Options = HashMap<String, OwnedVariant>;

/// The D-Bus path of an object, or `/` for none.
pub fn path_of(id: Option<ObjectId>) -> OwnedObjectPath {
    let path = id.map_or_else(|| NO_OBJECT_PATH.to_owned(), |id| proto::object_path(id.0));
    // Our own paths are always valid object paths.
    OwnedObjectPath::try_from(path).unwrap_or_else(|_| OwnedObjectPath::default())
}

/// The object a path names: `/` is none; a path that is not one of ours is `NotFound`.
pub fn id_of(path: &ObjectPath<'_>, what: &str) -> Result<Option<ObjectId>, proto::Error> {
    if path.as_str() == NO_OBJECT_PATH {
        return Ok(None);
    }
    proto::parse_object_path(path.as_str())
        .map(|id| Some(ObjectId(id)))
        .ok_or_else(|| proto::Error::NotFound(format!("{what}: no devmgr object at {path}")))
}

/// An object that must be named.
pub fn required(path: &ObjectPath<'_>, what: &str) -> Result<ObjectId, proto::Error> {
    id_of(path, what)?.ok_or_else(|| proto::Error::InvalidArgument(format!("{what} is required")))
}

/// Refuses whatever option is left.
pub fn no_options(options: &Options) -> Result<(), proto::Error> {
    match options.keys().next() {
        None => Ok(()),
        Some(key) => Err(proto::Error::InvalidArgument(format!(
            "unknown option {key:?}"
        ))),
    }
}

/// A `u` option.
pub fn optional_u32(options: &mut Options, key: &str) -> Result<Option<u32>, proto::Error> {
    options
        .remove(key)
        .map(|v| u32::try_from(&v).map_err(|e| bad_option(key, e)))
        .transpose()
}

/// An `s` option.
pub fn optional_str(options: &mut Options, key: &str) -> Result<Option<String>, proto::Error> {
    options
        .remove(key)
        .map(|v| String::try_from(v).map_err(|e| bad_option(key, e)))
        .transpose()
}

/// A `b` option, false when absent.
pub fn flag(options: &mut Options, key: &str) -> Result<bool, proto::Error> {
    options.remove(key).map_or(Ok(false), |v| {
        bool::try_from(&v).map_err(|e| bad_option(key, e))
    })
}

/// A wire name (kind, state, origin) as its enum.
pub fn wire_name<T: std::str::FromStr>(what: &str, text: &str) -> Result<T, proto::Error>
where
    T::Err: std::fmt::Display,
{
    text.parse()
        .map_err(|e| proto::Error::InvalidArgument(format!("{what}: {e}")))
}
