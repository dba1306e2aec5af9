//! The configuration file (/etc/devmgr/devmgrd.toml, docs/config.md) and
//! the settings devmgrd runs with: each from the command line if given
//! there, else from the file, else the built-in default. A file with an
//! unknown key or a bad value is an error naming its line: the daemon does
//! not start on a configuration it does not understand.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::bus::authz;
use crate::bus::choice::BusChoice;
use crate::cli;
use crate::machine::uevents;

/// Where the configuration file is unless `--config` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/devmgr/devmgrd.toml";

/// The built-in defaults.
const SUBSYSTEMS: [&str; 4] = ["scsi_host", "scsi", "block", "net"];
const MAX_REFERENCES_PER_CLIENT: u32 = 4096;
const MAX_OBJECTS: usize = 1_000_000;
const MAX_OBJECTS_PER_CLIENT: u32 = 65_536;

/// The file's keys: the long options of the same name. Every value keeps
/// its place in the file, so that a value wrong in meaning (a group that
/// does not exist) is reported at its line as a syntax error is.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct File {
    subsystems: Option<Spanned<Vec<String>>>,
    udev: Option<bool>,
    udev_source: Option<Spanned<String>>,
    actuate: Option<bool>,
    authorized_group: Option<Spanned<String>>,
    restrict_acquire: Option<bool>,
    max_references_per_client: Option<u32>,
    max_references_per_user: Option<u32>,
    max_objects: Option<usize>,
    max_objects_per_client: Option<u32>,
    max_message_size: Option<Spanned<u64>>,
    state_dir: Option<Spanned<String>>,
}

/// A configuration file that was read, for error messages.
pub struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    /// "FILE:LINE: why (in `the line`)", the line being where `span`
    /// starts: a type error names no key, the line shows it.
    fn error(&self, span: Option<Range<usize>>, why: &str) -> String {
        let Some(span) = span else {
            return format!("{}: {why}", self.path.display());
        };
        let start = span.start.min(self.text.len());
        let before = self.text.get(..start).unwrap_or_default();
        let number = before.matches('\n').count() + 1;
        let text = self.text.lines().nth(number - 1).unwrap_or_default().trim();
        if text.is_empty() {
            format!("{}:{number}: {why}", self.path.display())
        } else {
            format!("{}:{number}: {why} (in `{text}`)", self.path.display())
        }
    }
}

/// Reads and parses `path`. A missing file that is not `required` is an
/// empty one.
pub fn read(path: &Path, required: bool) -> Result<Option<(File, Source)>, String> {
    let text = match std::fs::read(path) {
        Ok(bytes) => {
            String::from_utf8(bytes).map_err(|_| format!("{}: not UTF-8 text", path.display()))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let source = Source {
        path: path.to_owned(),
        text,
    };
    let file = parse(&source)?;
    Ok(Some((file, source)))
}

fn parse(source: &Source) -> Result<File, String> {
    toml::from_str(&source.text).map_err(|e| source.error(e.span(), e.message().trim()))
}

/// What devmgrd runs with.
#[derive(Debug)]
pub struct Settings {
    pub bus: BusChoice,
    pub runtime_dir: Option<PathBuf>,
    /// Which file was read, for the log.
    pub config: Option<PathBuf>,
    pub udev: bool,
    pub udev_source: Option<uevents::Source>,
    pub subsystems: Vec<String>,
    pub replay: Option<PathBuf>,
    pub actuate: bool,
    pub sysfs_root: PathBuf,
    pub udev_receive_buffer: usize,
    /// The group's name and gid.
    pub authorized_group: Option<(String, u32)>,
    pub restrict_acquire: bool,
    pub max_references_per_client: u32,
    /// None: the default, a share of what the fd limit allows.
    pub max_references_per_user: Option<u32>,
    pub max_objects: usize,
    pub max_objects_per_client: u32,
    /// The bus's largest message, if configured (else learned).
    pub max_message_size: Option<usize>,
    pub state_dir: Option<PathBuf>,
}

/// `--yes` / `--no-yes`: which of a pair was given last, if either.
fn either(yes: bool, no: bool) -> Option<bool> {
    match (yes, no) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

/// The file to read: `--config`, else the default one if it exists.
/// `Some((path, required))`.
fn config_file(args: &cli::Args) -> Option<(PathBuf, bool)> {
    if args.no_config {
        return None;
    }
    match &args.config {
        Some(path) => Some((path.clone(), true)),
        None => Some((PathBuf::from(DEFAULT_PATH), false)),
    }
}

/// The settings from `args` over the configuration file it names, over the
/// defaults. `state_directory` is `$STATE_DIRECTORY` (systemd's
/// StateDirectory=), the state directory when neither names one.
pub fn settings(args: cli::Args, state_directory: Option<&str>) -> Result<Settings, String> {
    let (file, source) = match config_file(&args) {
        None => (File::default(), None),
        Some((path, required)) => match read(&path, required)? {
            Some((file, source)) => (file, Some(source)),
            None => (File::default(), None),
        },
    };
    // Values wrong in meaning, at their line in the file.
    let at = |span: Range<usize>, why: String| match &source {
        Some(source) => source.error(Some(span), &why),
        None => why,
    };

    let subsystems = match (args.subsystems, file.subsystems) {
        (Some(list), _) => check_subsystems(list)?,
        (None, Some(list)) => {
            let span = list.span();
            check_subsystems(list.into_inner()).map_err(|why| at(span, why))?
        }
        (None, None) => SUBSYSTEMS.map(str::to_owned).to_vec(),
    };
    let udev_source = match (args.udev_source, file.udev_source) {
        (Some(choice), _) => Some(choice),
        (None, Some(name)) => Some(name.get_ref().parse().map_err(|why| at(name.span(), why))?),
        (None, None) => None,
    };
    let group = match (args.authorized_group, file.authorized_group) {
        (Some(name), _) => Some(lookup_group(name)?),
        (None, Some(name)) => {
            let span = name.span();
            Some(lookup_group(name.into_inner()).map_err(|why| at(span, why))?)
        }
        (None, None) => None,
    };
    let max_message_size = match (args.max_message_size, file.max_message_size) {
        (Some(n), _) => Some(check_message_size(n)?),
        (None, Some(n)) => {
            let span = n.span();
            Some(check_message_size(n.into_inner()).map_err(|why| at(span, why))?)
        }
        (None, None) => None,
    };
    let state_dir = match (args.state_dir, file.state_dir) {
        (Some(dir), _) => Some(dir),
        (None, Some(dir)) => {
            let path = PathBuf::from(dir.get_ref());
            if !path.is_absolute() {
                return Err(at(
                    dir.span(),
                    format!("state-dir {:?} is not an absolute path", dir.get_ref()),
                ));
            }
            Some(path)
        }
        (None, None) => state_directory
            // systemd joins several directories with ':'; ours is the first.
            .and_then(|dirs| dirs.split(':').next())
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from),
    };
    Ok(Settings {
        bus: args.bus,
        runtime_dir: args.runtime_dir,
        config: source.map(|s| s.path),
        udev: either(args.udev, args.no_udev)
            .or(file.udev)
            .unwrap_or(true),
        udev_source,
        subsystems,
        replay: args.replay,
        actuate: either(args.actuate, args.no_actuate)
            .or(file.actuate)
            .unwrap_or(true),
        sysfs_root: args.sysfs_root,
        udev_receive_buffer: args.udev_receive_buffer,
        authorized_group: group,
        restrict_acquire: either(args.restrict_acquire, args.no_restrict_acquire)
            .or(file.restrict_acquire)
            .unwrap_or(false),
        max_references_per_client: args
            .max_references_per_client
            .or(file.max_references_per_client)
            .unwrap_or(MAX_REFERENCES_PER_CLIENT),
        max_references_per_user: args
            .max_references_per_user
            .or(file.max_references_per_user),
        max_objects: args.max_objects.or(file.max_objects).unwrap_or(MAX_OBJECTS),
        max_objects_per_client: args
            .max_objects_per_client
            .or(file.max_objects_per_client)
            .unwrap_or(MAX_OBJECTS_PER_CLIENT),
        max_message_size,
        state_dir,
    })
}

/// A message size limit devmgrd can live with: one object's properties
/// (256 attributes of 4 KiB) must fit, and D-Bus allows no more than 128 MiB.
fn check_message_size(n: u64) -> Result<usize, String> {
    const LOW: u64 = 2 * 1024 * 1024;
    let high = crate::bus::serve::limits::PROTOCOL_MAX as u64;
    if (LOW..=high).contains(&n) {
        usize::try_from(n).map_err(|_| format!("max-message-size {n} is too large here"))
    } else {
        Err(format!(
            "max-message-size is {n}: it must be between {LOW} and {high} bytes"
        ))
    }
}

/// Subsystem names as the kernel spells them (`scsi_host`, `block`), at
/// least one.
fn check_subsystems(list: Vec<String>) -> Result<Vec<String>, String> {
    if list.is_empty() {
        return Err("subsystems is empty: name at least one (or set udev = false)".to_owned());
    }
    for name in &list {
        let fine = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !fine {
            return Err(format!(
                "{name:?} is not a subsystem name (letters, digits, '_' and '-')"
            ));
        }
    }
    Ok(list)
}

fn lookup_group(name: String) -> Result<(String, u32), String> {
    let gid = authz::group_id(&name)?;
    Ok((name, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> Source {
        Source {
            path: PathBuf::from("/etc/devmgr/devmgrd.toml"),
            text: text.to_owned(),
        }
    }

    fn error(text: &str) -> String {
        parse(&source(text)).expect_err("a bad file")
    }

    #[test]
    fn every_key_parses() {
        let file = parse(&source(
            "# a comment\n\
             subsystems = [\"block\", \"net\"]\n\
             udev = true\n\
             udev-source = \"kernel\"\n\
             actuate = false\n\
             authorized-group = \"root\"\n\
             restrict-acquire = true\n\
             max-references-per-client = 7\n\
             max-references-per-user = 9\n\
             max-objects = 100\n\
             max-objects-per-client = 3\n\
             max-message-size = 4194304\n\
             state-dir = \"/var/lib/devmgr\"\n",
        ))
        .expect("parses");
        assert_eq!(
            file.subsystems.map(Spanned::into_inner),
            Some(vec!["block".to_owned(), "net".to_owned()])
        );
        assert_eq!(file.actuate, Some(false));
        assert_eq!(file.max_references_per_client, Some(7));
        assert_eq!(file.max_references_per_user, Some(9));
        assert_eq!(file.max_objects, Some(100));
        assert_eq!(file.max_objects_per_client, Some(3));
        assert_eq!(
            file.max_message_size.map(Spanned::into_inner),
            Some(4_194_304)
        );
        assert_eq!(file.restrict_acquire, Some(true));
        assert_eq!(file.udev, Some(true));
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        let file = parse(&source("")).expect("parses");
        assert!(file.subsystems.is_none() && file.state_dir.is_none());
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let unknown = error("udev = true\n\nmax-refs = 3\n");
        assert!(
            unknown.starts_with("/etc/devmgr/devmgrd.toml:3: unknown field `max-refs`"),
            "{unknown}"
        );
        let negative = error("max-objects = 10\nmax-objects-per-client = -1\n");
        assert!(
            negative.starts_with("/etc/devmgr/devmgrd.toml:2: "),
            "{negative}"
        );
        let wrong_type = error("actuate = \"no\"\n");
        assert!(
            wrong_type.starts_with("/etc/devmgr/devmgrd.toml:1: "),
            "{wrong_type}"
        );
        let syntax = error("udev = true\nsubsystems = [\"block\"\n");
        assert!(syntax.contains(":2: "), "{syntax}");
        let duplicate = error("udev = true\nudev = false\n");
        assert!(duplicate.contains(":2: "), "{duplicate}");
    }

    #[test]
    fn bad_meanings_name_their_line() {
        let s = source("actuate = true\nudev-source = \"carrier-pigeon\"\n");
        let file = parse(&s).expect("parses");
        let name = file.udev_source.expect("present");
        let why = name
            .get_ref()
            .parse::<uevents::Source>()
            .expect_err("no such source");
        assert!(s
            .error(Some(name.span()), &why)
            .starts_with("/etc/devmgr/devmgrd.toml:2: \"carrier-pigeon\""),);
        assert!(check_subsystems(vec![]).is_err());
        assert!(check_subsystems(vec!["block,net".into()]).is_err());
        assert!(check_subsystems(vec!["scsi_host".into(), "net".into()]).is_ok());
        // One object's properties must fit; D-Bus allows no more.
        assert!(check_message_size(1024 * 1024).is_err());
        assert!(check_message_size(256 * 1024 * 1024).is_err());
        assert_eq!(check_message_size(2 * 1024 * 1024), Ok(2 * 1024 * 1024));
    }

    #[test]
    fn a_missing_default_file_is_no_file_but_a_named_one_must_exist() {
        let missing = Path::new("/nonexistent/devmgrd.toml");
        assert!(read(missing, false).expect("fine").is_none());
        let err = read(missing, true).err().expect("an error");
        assert!(err.contains("/nonexistent/devmgrd.toml"), "{err}");
    }
}
