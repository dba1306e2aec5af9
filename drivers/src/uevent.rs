//! Device events as devmgr understands them, with no I/O: the plain
//! [`UEvent`] that both the live udev monitor and a replay produce, and the
//! parser of `udevadm monitor --property` output (or the kernel's uevent
//! format) that `devmgrd --replay` and the benchmarks share. Parsing never
//! panics: a malformed block is a [`ReplayError`] naming its line.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

/// Which events to listen to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Events after systemd-udevd processed them (the default when it runs).
    Udev,
    /// The kernel's own uevents (when no udevd runs).
    Kernel,
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "udev" => Ok(Source::Udev),
            "kernel" => Ok(Source::Kernel),
            other => Err(format!("{other:?} is not a udev source (udev or kernel)")),
        }
    }
}

impl Source {
    /// How logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Udev => "udev",
            Source::Kernel => "kernel",
        }
    }
}

/// What happened to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Add,
    Remove,
    Change,
    Move,
    Bind,
    Unbind,
    Other,
}

/// One device event (or one existing device, at coldplug), decoupled from libudev.
#[derive(Clone, Debug)]
pub struct UEvent {
    pub action: Action,
    /// The kernel's sequence number (0 for coldplug).
    pub seqnum: u64,
    pub sys_path: String,
    pub subsystem: String,
    pub sys_name: String,
    /// The kind within the subsystem (`disk`, `partition`, `scsi_device`…).
    pub devtype: Option<String>,
    pub driver: Option<String>,
    /// For a `move`: the sys path it had before.
    pub sys_path_old: Option<String>,
    /// The properties worth showing as attributes ([`KEPT_PROPERTIES`]).
    pub properties: BTreeMap<String, String>,
}

/// The uevent properties kept as an object's attributes (`udev.<KEY>`):
/// what identifies a device to a person. The rest (timestamps, links,
/// rule flags) changes often and says little.
pub const KEPT_PROPERTIES: &[&str] = &[
    "DEVNAME",
    "MAJOR",
    "MINOR",
    "IFINDEX",
    "ID_VENDOR",
    "ID_MODEL",
    "ID_SERIAL",
    "ID_FS_TYPE",
    "ID_FS_UUID",
    "ID_FS_LABEL",
];

impl UEvent {
    /// The attributes an object for this device carries.
    pub fn attributes(&self) -> BTreeMap<String, String> {
        let mut attributes: BTreeMap<String, String> = self
            .properties
            .iter()
            .map(|(k, v)| (format!("udev.{k}"), v.clone()))
            .collect();
        if let Some(devtype) = &self.devtype {
            attributes.insert("udev.devtype".into(), devtype.clone());
        }
        attributes
    }
}

/// A block that could not be read, by line.
#[derive(Debug, PartialEq, Eq)]
pub struct ReplayError {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

struct Block {
    source: Source,
    line: usize,
    action: String,
    devpath: String,
    subsystem: String,
    properties: HashMap<String, String>,
    error: Option<ReplayError>,
}

/// Turns lines into events, one block at a time.
pub struct Parser {
    only: Option<Source>,
    line: usize,
    block: Option<Block>,
}

/// `KERNEL[123.456] add /devices/… (block)` or `UDEV  [123.456] …`.
fn header(line: &str) -> Option<(Source, &str)> {
    let (source, rest) = if let Some(rest) = line.strip_prefix("KERNEL") {
        (Source::Kernel, rest)
    } else if let Some(rest) = line.strip_prefix("UDEV") {
        (Source::Udev, rest)
    } else {
        return None;
    };
    let rest = rest.trim_start().strip_prefix('[')?;
    let (_, rest) = rest.split_once(']')?;
    Some((source, rest))
}

fn action(word: &str) -> Action {
    match word {
        "add" => Action::Add,
        "remove" => Action::Remove,
        "change" => Action::Change,
        "move" => Action::Move,
        "bind" => Action::Bind,
        "unbind" => Action::Unbind,
        _ => Action::Other,
    }
}

impl Parser {
    /// A parser replaying `only` that kind of block, or the first block's kind.
    pub fn new(only: Option<Source>) -> Parser {
        Parser {
            only,
            line: 0,
            block: None,
        }
    }

    /// Reads one line; returns the event a finished block makes, if any.
    pub fn line(&mut self, text: &str) -> Option<Result<UEvent, ReplayError>> {
        self.line += 1;
        let text = text.trim_end_matches(['\r', '\n']);
        if let Some((source, rest)) = header(text) {
            let done = self.finish();
            let mut words = rest.split_whitespace();
            let (act, devpath, subsystem) = (words.next(), words.next(), words.next());
            let error = match (act, devpath) {
                (Some(_), Some(p)) if p.starts_with('/') => None,
                _ => Some(ReplayError {
                    line: self.line,
                    message: format!("expected `ACTION /devpath (subsystem)` in {text:?}"),
                }),
            };
            self.block = Some(Block {
                source,
                line: self.line,
                action: act.unwrap_or_default().to_owned(),
                devpath: devpath.unwrap_or_default().to_owned(),
                subsystem: subsystem
                    .unwrap_or_default()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .to_owned(),
                properties: HashMap::new(),
                error,
            });
            return done;
        }
        if text.trim().is_empty() {
            return self.finish();
        }
        let line = self.line;
        if let Some(block) = self.block.as_mut() {
            match text.split_once('=') {
                Some((key, value)) if !key.is_empty() => {
                    block.properties.insert(key.to_owned(), value.to_owned());
                }
                _ => {
                    block.error.get_or_insert(ReplayError {
                        line,
                        message: format!("expected KEY=VALUE, found {text:?}"),
                    });
                }
            }
        }
        // Outside a block: udevadm's preamble, or comments. Ignored.
        None
    }

    /// Ends the file: the last block's event, if any.
    pub fn finish(&mut self) -> Option<Result<UEvent, ReplayError>> {
        let block = self.block.take()?;
        let only = *self.only.get_or_insert(block.source);
        if block.source != only {
            return None;
        }
        if let Some(e) = block.error {
            return Some(Err(e));
        }
        let p = &block.properties;
        let devpath = p.get("DEVPATH").cloned().unwrap_or(block.devpath);
        if !devpath.starts_with('/') || devpath.split('/').any(|c| c == "..") {
            return Some(Err(ReplayError {
                line: block.line,
                message: format!("DEVPATH {devpath:?} is not a device path"),
            }));
        }
        let seqnum = match p.get("SEQNUM").map(|s| s.parse::<u64>()) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                return Some(Err(ReplayError {
                    line: block.line,
                    message: format!("SEQNUM: {e}"),
                }))
            }
        };
        let sys_name = devpath.rsplit('/').next().unwrap_or_default().to_owned();
        if sys_name.is_empty() {
            return Some(Err(ReplayError {
                line: block.line,
                message: format!("DEVPATH {devpath:?} names no device"),
            }));
        }
        Some(Ok(UEvent {
            action: action(
                p.get("ACTION")
                    .map_or(block.action.as_str(), String::as_str),
            ),
            seqnum,
            sys_path: format!("/sys{devpath}"),
            subsystem: p.get("SUBSYSTEM").cloned().unwrap_or(block.subsystem),
            sys_name,
            devtype: p.get("DEVTYPE").cloned(),
            driver: p.get("DRIVER").cloned(),
            sys_path_old: p.get("DEVPATH_OLD").map(|old| format!("/sys{old}")),
            properties: KEPT_PROPERTIES
                .iter()
                .filter_map(|k| Some(((*k).to_owned(), p.get(*k)?.clone())))
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, only: Option<Source>) -> Vec<Result<UEvent, ReplayError>> {
        let mut parser = Parser::new(only);
        let mut out: Vec<_> = text.lines().filter_map(|l| parser.line(l)).collect();
        out.extend(parser.finish());
        out
    }

    const RECORDING: &str = "\
monitor will print the received events for:
UDEV - the event which udev sends out after rule processing
KERNEL - the kernel uevent

KERNEL[100.000001] add      /devices/virtual/block/loop9 (block)
ACTION=add
DEVPATH=/devices/virtual/block/loop9
SUBSYSTEM=block
DEVTYPE=disk
SEQNUM=41

UDEV  [100.000200] add      /devices/virtual/block/loop9 (block)
ACTION=add
DEVPATH=/devices/virtual/block/loop9
SUBSYSTEM=block
DEVTYPE=disk
SEQNUM=41
ID_FS_TYPE=

KERNEL[100.5] remove   /devices/virtual/block/loop9 (block)
ACTION=remove
DEVPATH=/devices/virtual/block/loop9
SUBSYSTEM=block
SEQNUM=42
";

    #[test]
    fn a_recording_replays_one_kind_of_block() {
        let events = parse(RECORDING, None);
        assert_eq!(events.len(), 2, "the first block's kind (KERNEL) only");
        let first = events[0].as_ref().expect("an event");
        assert_eq!(first.action, Action::Add);
        assert_eq!(first.sys_path, "/sys/devices/virtual/block/loop9");
        assert_eq!(first.sys_name, "loop9");
        assert_eq!(first.subsystem, "block");
        assert_eq!(first.devtype.as_deref(), Some("disk"));
        assert_eq!(first.seqnum, 41);
        assert_eq!(events[1].as_ref().expect("an event").action, Action::Remove);
        let udev = parse(RECORDING, Some(Source::Udev));
        assert_eq!(udev.len(), 1);
    }

    #[test]
    fn malformed_blocks_are_errors_that_name_their_line() {
        let text = "KERNEL[1.0] add\nACTION=add\n\nKERNEL[2.0] add /devices/x (net)\nnot a property\n\nKERNEL[3.0] add /devices/../etc (net)\n\nKERNEL[4.0] add /devices/y (net)\nSEQNUM=lots\n";
        let errors: Vec<usize> = parse(text, None)
            .into_iter()
            .map(|r| r.expect_err("malformed").line)
            .collect();
        assert_eq!(errors, [1, 5, 7, 9]);
    }

    #[test]
    fn any_bytes_parse_without_panicking() {
        for text in [
            "",
            "\n\n",
            "KERNEL[",
            "KERNEL[]",
            "UDEV [x] add / ()",
            "=\n=",
            "KERNEL[1] add /\n",
        ] {
            let _ = parse(text, None);
        }
    }
}
