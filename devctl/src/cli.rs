//! The command line's shape (clap): parsed by `main`, and rendered as shell
//! completions and the man page from the same definitions.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// How devctl's exit codes read; shown by `--help` and in the man page.
pub const EXIT_CODES: &str = "\
Exit status:
  0   success
  1   the daemon refused (its error name is shown) or cancelled the removal
  2   usage error (bad arguments, an ambiguous or unknown object name)
  3   remove --wait timed out or was interrupted; the removal is still pending
  69  devmgrd is unreachable (every bus tried is listed)
  77  access denied (by the daemon or by the bus's policy)
  141 whoever read the output went away (as after SIGPIPE)

The daemon is found at --address, else $DEVMGR_BUS_ADDRESS, else the embedded
bus's address file (/run/devmgr/bus as root, $XDG_RUNTIME_DIR/devmgr/bus
otherwise), else on the system bus, else on the session bus; on a bus where it
is not running but can be started (D-Bus activation), the first call starts it.

OBJ is an object path, an id, KIND/NAME (e.g. host/host0), or a name that is
unique across kinds. The machine's devices and those clients add have
separate names: udev:NAME or api:NAME says which (a plain name is the
client's, if a client added one).";

/// devctl: the administrator's tool for devmgrd, the hotplug device manager.
#[derive(Parser, Debug)]
#[command(name = "devctl", version, about, after_help = EXIT_CODES)]
pub struct Cli {
    /// The D-Bus address of devmgrd's bus (overrides the search).
    #[arg(long, global = true, value_name = "ADDR")]
    pub address: Option<String>,
    /// Print data as JSON (one document; `monitor`: one object per line).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The daemon's version, bus, object counts and pending removals.
    Status,
    /// Every object, one per line.
    List,
    /// Hosts and their devices as a tree, with state, driver and references.
    Tree,
    /// Every property of one object, and who holds it.
    Show {
        /// The object.
        obj: String,
    },
    /// Add a driver, host or device.
    #[command(subcommand)]
    Add(AddCommand),
    /// Remove an object; a busy one is disabled with its removal pending.
    Remove(RemoveArgs),
    /// Refuse new references; existing ones stay valid.
    Stop {
        /// The object.
        obj: String,
    },
    /// Bring a stopped object back, cancelling its pending removal.
    Reenable {
        /// The object.
        obj: String,
    },
    /// Bind an object to a driver.
    Bind {
        /// The object.
        obj: String,
        /// The driver (a name, or any OBJ form).
        driver: String,
    },
    /// Unbind an object from its driver.
    Unbind {
        /// The object.
        obj: String,
    },
    /// Hold a reference while COMMAND runs (without one: until interrupted).
    Hold(HoldArgs),
    /// The current objects, then every event as it happens, one per line.
    Monitor(MonitorArgs),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Manpage,
}

#[derive(Subcommand, Debug)]
pub enum AddCommand {
    /// A driver.
    Driver {
        /// Its name.
        name: String,
    },
    /// A host adapter.
    Host {
        /// Its name.
        name: String,
        /// Bind it to this driver at creation.
        #[arg(long, value_name = "D")]
        driver: Option<String>,
        /// Devices for the simulated SCSI driver to scan.
        #[arg(long, value_name = "N")]
        luns: Option<u32>,
        /// An attribute (repeatable).
        #[arg(long = "attr", value_name = "K=V", value_parser = parse_attribute)]
        attributes: Vec<(String, String)>,
        /// Its parent device, if any.
        #[arg(long, value_name = "OBJ")]
        parent: Option<String>,
    },
    /// A device.
    Device {
        /// Its name.
        name: String,
        /// Its parent (a host or device).
        #[arg(long, value_name = "OBJ")]
        parent: String,
        /// Bind it to this driver at creation.
        #[arg(long, value_name = "D")]
        driver: Option<String>,
        /// An attribute (repeatable).
        #[arg(long = "attr", value_name = "K=V", value_parser = parse_attribute)]
        attributes: Vec<(String, String)>,
    },
}

#[derive(Args, Debug)]
pub struct RemoveArgs {
    /// The object.
    pub obj: String,
    /// Revoke every reference in the way and remove at once. The kernel's
    /// users (mounts, swap, processes) stay: the removal waits for them.
    #[arg(long)]
    pub force: bool,
    /// Also lazily unmount every filesystem on it, in every mount
    /// namespace (as umount -l), and turn its swap off, then wait for the
    /// kernel to let go. Processes are never killed.
    #[arg(long)]
    pub detach_mounts: bool,
    /// Say what would happen; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Wait until a pending removal completes (at most SECS seconds).
    #[arg(long, value_name = "SECS", num_args = 0..=1, require_equals = true)]
    pub wait: Option<Option<u64>>,
    /// Give the holders this long, then apply --on-timeout.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u32>,
    /// What the daemon does when --timeout expires.
    #[arg(long, value_name = "ACTION", requires = "timeout")]
    pub on_timeout: Option<OnTimeout>,
}

/// What happens when a removal's deadline passes.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum OnTimeout {
    /// Revoke the references still held and finish the removal.
    Revoke,
    /// Give up the removal; the object comes back.
    Cancel,
}

impl OnTimeout {
    /// The contract's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            OnTimeout::Revoke => "revoke",
            OnTimeout::Cancel => "cancel",
        }
    }
}

#[derive(Args, Debug)]
pub struct HoldArgs {
    /// The object.
    pub obj: String,
    /// Why it is held (shown to whoever removes it).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Let go when a removal asks holders to release (stopping COMMAND with SIGTERM).
    #[arg(long)]
    pub release_on_request: bool,
    /// The command to run while holding.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct MonitorArgs {
    /// Only objects of this kind.
    #[arg(long, value_name = "K", value_parser = ["driver", "host", "device"])]
    pub kind: Option<String>,
    /// Only these objects.
    pub objs: Vec<String>,
}

fn parse_attribute(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}
