//! devmgrd's command line (clap), and the man page and shell completions
//! generated from the same definitions (`devmgrd --generate …`, used by
//! `cargo xtask install`).

use std::path::PathBuf;

use clap::{CommandFactory, Parser, ValueEnum};

use crate::bus::choice::BusChoice;
use crate::machine::uevents;

/// The devmgr hotplug device-manager daemon.
///
/// Models drivers, SCSI-like host → device trees and the machine's real
/// devices, and the references clients hold on them, and serves them on
/// D-Bus as org.devmgr.DevMgr1. Removing an object in use never blocks: it
/// is disabled with its removal pending and goes when its last user lets
/// go, unless someone re-enables it first.
///
/// Settings come from the command line, then the configuration file
/// (/etc/devmgr/devmgrd.toml unless --config names another), then the
/// built-in defaults; each key of the file is the long option of the same
/// name (docs/config.md).
#[derive(Parser, Debug)]
#[command(name = "devmgrd", version, about, long_about, after_long_help = AFTER_HELP)]
pub struct Args {
    /// The bus to serve on: `auto` (the bus that started devmgrd by D-Bus
    /// activation, $DBUS_STARTER_ADDRESS, if any; else the session bus if
    /// there is one, else the system bus if it runs, else an embedded
    /// private bus), `session`,
    /// `system`, `embedded`, or a D-Bus address such as `unix:path=/run/x`.
    #[arg(long, default_value = "auto")]
    pub bus: BusChoice,
    /// Where the embedded bus puts its socket and address file (default
    /// /run/devmgr as root, else $XDG_RUNTIME_DIR/devmgr).
    #[arg(long, value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,
    /// The configuration file to read [default: /etc/devmgr/devmgrd.toml,
    /// which may be absent; a file named here must exist].
    #[arg(long, value_name = "FILE", conflicts_with = "no_config")]
    pub config: Option<PathBuf>,
    /// Read no configuration file.
    #[arg(long)]
    pub no_config: bool,
    /// Do not model the machine's devices (no udev monitor, no coldplug).
    #[arg(long, overrides_with = "udev")]
    pub no_udev: bool,
    /// Model the machine's devices (the default; overrides `udev = false`
    /// in the configuration file).
    #[arg(long, overrides_with = "no_udev")]
    pub udev: bool,
    /// Where device events come from: `udev` (processed by systemd-udevd;
    /// the default when it runs) or `kernel` (raw uevents).
    #[arg(long, value_name = "SOURCE")]
    pub udev_source: Option<uevents::Source>,
    /// The kernel subsystems to model, comma-separated [default:
    /// scsi_host,scsi,block,net].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub subsystems: Option<Vec<String>>,
    /// Feed the device events recorded in FILE (`udevadm monitor --property`
    /// output, or the kernel's uevent format) instead of the live ones; a
    /// FIFO is read as it is written.
    #[arg(long, value_name = "FILE")]
    pub replay: Option<PathBuf>,
    /// Never act on real devices: removals that need the kernel fail with a
    /// clear error (the object stays `stopped`, showing it) instead.
    #[arg(long, overrides_with = "actuate")]
    pub no_actuate: bool,
    /// Act on real devices (the default; overrides `actuate = false` in the
    /// configuration file).
    #[arg(long, overrides_with = "no_actuate")]
    pub actuate: bool,
    /// Where sysfs is mounted (a fake tree, for tests).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub sysfs_root: PathBuf,
    /// The uevent socket's receive buffer in bytes (tests shrink it to
    /// provoke an overflow and the resynchronisation that follows).
    #[arg(long, value_name = "BYTES", default_value_t = uevents::RECEIVE_BUFFER, hide = true)]
    pub udev_receive_buffer: usize,
    /// Members of this group may change things (add, remove, stop,
    /// re-enable, bind, unbind), as root and the daemon's own user may.
    #[arg(long, value_name = "GROUP")]
    pub authorized_group: Option<String>,
    /// Taking a reference (Acquire) needs the same rights as a change
    /// (by default anyone may).
    #[arg(long, overrides_with = "no_restrict_acquire")]
    pub restrict_acquire: bool,
    /// Anyone may take a reference (the default; overrides
    /// `restrict-acquire = true` in the configuration file).
    #[arg(long, overrides_with = "restrict_acquire")]
    pub no_restrict_acquire: bool,
    /// Most references one client connection may hold at once (0: no
    /// limit). Past it, Acquire answers QuotaExceeded [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_references_per_client: Option<u32>,
    /// Most references one user (uid) may hold at once over all its
    /// connections (0: no limit; root and devmgrd's own user are held only
    /// to the limit in all). Past it, Acquire answers QuotaExceeded
    /// [default: a quarter of the references devmgrd can hold, which is its
    /// open-files limit less a reserve of 5120]
    #[arg(long, value_name = "N")]
    pub max_references_per_user: Option<u32>,
    /// Most objects the model may hold when a client adds more (0: no
    /// limit); real devices are modelled regardless [default: 1000000].
    #[arg(long, value_name = "N")]
    pub max_objects: Option<usize>,
    /// Most objects one client connection may have added that still exist
    /// (0: no limit). Past it, Add answers QuotaExceeded [default: 65536].
    #[arg(long, value_name = "N")]
    pub max_objects_per_client: Option<u32>,
    /// The largest message the bus accepts, in bytes (2 MiB to 128 MiB);
    /// devmgrd never sends a bigger one. [default: read from dbus-daemon's
    /// configuration for the system and session buses, else 33554432]
    #[arg(long, value_name = "BYTES")]
    pub max_message_size: Option<u64>,
    /// Keep what clients change (objects they add, stopped and removing
    /// states, bindings) in DIR, durable before each reply, and restore it
    /// at start. References do not survive a restart. [default:
    /// $STATE_DIRECTORY when systemd sets it, else nothing is kept]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Print the man page (`man`) or a shell's completions (`bash`, `zsh`,
    /// `fish`) and exit.
    #[arg(long, value_name = "WHAT", hide = true)]
    pub generate: Option<Generate>,
}

const AFTER_HELP: &str = "\
Files:
  /etc/devmgr/devmgrd.toml   the configuration file (keys: subsystems, udev,
                             udev-source, actuate, authorized-group,
                             restrict-acquire, max-references-per-client,
                             max-references-per-user,
                             max-objects, max-objects-per-client,
                             max-message-size, state-dir)
  /var/lib/devmgr            the state directory of the systemd service

Logging goes to the journal when systemd connects stderr to it
(JOURNAL_STREAM), else to stderr; RUST_LOG filters it (default: info).
devmgrd exits non-zero when it cannot serve: a bad configuration file, the
name already owned, the bus or the state directory lost.";

/// What `--generate` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Generate {
    /// The devmgrd(8) man page (roff).
    Man,
    /// bash completions.
    Bash,
    /// zsh completions.
    Zsh,
    /// fish completions.
    Fish,
}

/// Writes what `what` asks for to stdout.
pub fn generate(what: Generate) -> std::io::Result<()> {
    use std::io::Write;
    let mut command = Args::command();
    let mut out = Vec::new();
    let shell = match what {
        Generate::Man => {
            clap_mangen::Man::new(command)
                .section("8")
                .render(&mut out)?;
            return std::io::stdout().write_all(&out);
        }
        Generate::Bash => clap_complete::Shell::Bash,
        Generate::Zsh => clap_complete::Shell::Zsh,
        Generate::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut command, "devmgrd", &mut out);
    std::io::stdout().write_all(&out)
}
