//! The largest message the bus accepts from us. dbus-daemon disconnects a
//! connection that sends a bigger one, and devmgrd's references die with
//! its connection, so nothing devmgrd sends may exceed it (docs/contract.md,
//! "Message sizes"). D-Bus has no call that tells the limit: it is read from
//! dbus-daemon's configuration for the system and session buses, and is
//! 32 MiB (the system bus's built-in default, the smallest in common use)
//! when it cannot be known.

use std::path::Path;

/// What the D-Bus specification allows at most, whatever a bus says.
pub const PROTOCOL_MAX: usize = 128 * 1024 * 1024;

/// The limit when nothing better is known.
pub const DEFAULT: usize = 32 * 1024 * 1024;

/// Which bus's configuration to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusType {
    /// The system bus (`system.conf` and its includes).
    System,
    /// A session bus (`session.conf` and its includes).
    Session,
    /// Any other bus: nothing to read.
    Unknown,
}

/// The largest message devmgrd may send on a bus of this type.
pub fn max_message_size(bus: BusType) -> usize {
    let (name, local) = match bus {
        BusType::System => ("system", "system-local.conf"),
        BusType::Session => ("session", "session-local.conf"),
        BusType::Unknown => return DEFAULT,
    };
    let mut files = vec![
        Path::new("/usr/share/dbus-1").join(format!("{name}.conf")),
        Path::new("/etc/dbus-1").join(local),
    ];
    for dir in [
        format!("/usr/share/dbus-1/{name}.d"),
        format!("/etc/dbus-1/{name}.d"),
    ] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut more: Vec<_> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "conf"))
                .collect();
            more.sort();
            files.extend(more);
        }
    }
    // The smallest value any file sets: dbus-daemon applies the last one it
    // reads, and the smallest is safe whichever that is.
    files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .filter_map(|text| limit_in(&String::from_utf8_lossy(&text)))
        .min()
        .unwrap_or(DEFAULT)
        .min(PROTOCOL_MAX)
}

/// The `max_message_size` a dbus-daemon configuration sets, outside
/// comments.
fn limit_in(config: &str) -> Option<usize> {
    let mut text = String::with_capacity(config.len());
    let mut rest = config;
    while let Some(start) = rest.find("<!--") {
        text.push_str(&rest[..start]);
        rest = rest[start..]
            .find("-->")
            .map_or("", |end| &rest[start + end + 3..]);
    }
    text.push_str(rest);
    let mut found = None;
    let mut rest = text.as_str();
    while let Some(at) = rest.find("<limit") {
        rest = &rest[at..];
        let Some(close) = rest.find("</limit>") else {
            break;
        };
        let element = &rest[..close];
        rest = &rest[close..];
        let named = element
            .split('>')
            .next()
            .is_some_and(|tag| tag.contains("\"max_message_size\""));
        if let (true, Some(value)) = (named, element.split('>').nth(1)) {
            if let Ok(n) = value.trim().parse::<usize>() {
                found = Some(found.map_or(n, |f: usize| f.min(n)));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commented_limit_is_not_a_limit() {
        let debian_system = r#"<busconfig>
  <!-- <limit name="max_message_size">33554432</limit> -->
  <limit name="max_incoming_bytes">1000</limit>
</busconfig>"#;
        assert_eq!(limit_in(debian_system), None);
        let session = r#"<limit name="max_message_size">1000000000</limit>
<limit name="max_message_size"> 4096 </limit>"#;
        assert_eq!(limit_in(session), Some(4096));
        assert_eq!(limit_in("<limit name=\"max_message_size\">x</limit>"), None);
        assert_eq!(limit_in("<!-- unterminated"), None);
    }
}
