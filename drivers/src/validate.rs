//! Checks on input from outside (names, reasons, attributes): bad input gets
//! an `InvalidArgument` error before anything changes.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Longest object name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest reference reason, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;
/// Most attributes on one object.
pub const MAX_ATTRIBUTES: usize = 256;
/// Longest attribute key, in bytes.
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 255;
/// Longest attribute value, in bytes.
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 4096;

/// Shows at most 40 characters of untrusted text in an error message.
fn excerpt(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    format!("{out:?}")
}

/// A name: non-empty, at most 255 bytes, printable, without `/`.
pub fn name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid_argument("a name cannot be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::invalid_argument(format!(
            "name {} is {} bytes long; the limit is {MAX_NAME_BYTES}",
            excerpt(name),
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| c.is_control() || *c == '/') {
        return Err(Error::invalid_argument(format!(
            "name {} contains {c:?}; names are printable and have no '/'",
            excerpt(name)
        )));
    }
    Ok(())
}

/// A reference's reason: at most 1024 bytes, no control characters.
pub fn reason(reason: &str) -> Result<()> {
    if reason.len() > MAX_REASON_BYTES {
        return Err(Error::invalid_argument(format!(
            "reason is {} bytes long; the limit is {MAX_REASON_BYTES}",
            reason.len()
        )));
    }
    if reason.chars().any(char::is_control) {
        return Err(Error::invalid_argument(
            "a reason cannot contain control characters",
        ));
    }
    Ok(())
}

/// Attributes: bounded count and sizes, printable keys.
pub fn attributes(attributes: &BTreeMap<String, String>) -> Result<()> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(Error::invalid_argument(format!(
            "{} attributes; the limit is {MAX_ATTRIBUTES}",
            attributes.len()
        )));
    }
    for (key, value) in attributes {
        if key.is_empty() || key.len() > MAX_ATTRIBUTE_KEY_BYTES {
            return Err(Error::invalid_argument(format!(
                "attribute key {} must be 1 to {MAX_ATTRIBUTE_KEY_BYTES} bytes",
                excerpt(key)
            )));
        }
        if key.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(Error::invalid_argument(format!(
                "attribute key {} has a space or control character",
                excerpt(key)
            )));
        }
        if value.contains('\0') {
            return Err(Error::invalid_argument(format!(
                "attribute {} has a NUL character in its value",
                excerpt(key)
            )));
        }
        if value.len() > MAX_ATTRIBUTE_VALUE_BYTES {
            return Err(Error::invalid_argument(format!(
                "attribute {} is {} bytes long; the limit is {MAX_ATTRIBUTE_VALUE_BYTES}",
                excerpt(key),
                value.len()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("host0").is_ok());
        assert!(name("0:0:0:0").is_ok());
        assert!(name(&"x".repeat(255)).is_ok());
        for bad in ["", "a/b", "a\nb", "\u{7f}"] {
            assert!(name(bad).is_err(), "{bad:?}");
        }
        assert!(name(&"x".repeat(256)).is_err());
        // A 10 MB name is refused without echoing it back in full.
        let huge = "y".repeat(10 << 20);
        let err = name(&huge).unwrap_err();
        assert!(err.message.len() < 200, "{}", err.message);
    }
}
