//! Which bus devmgrd serves on, and the embedded private bus it starts when
//! no bus is usable (a fresh machine, CI): a supervised `dbus-daemon` child
//! that only our own uid may use, whose address is written where `devctl`
//! and the README look for it (`/run/devmgr/bus` as root, else
//! `$XDG_RUNTIME_DIR/devmgr/bus`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use zbus::connection;

use crate::bus::serve::limits::BusType;

/// The `--bus` choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusChoice {
    /// The bus that activated us if any ([`BusChoice::Starter`]), else the
    /// session bus if there is one, else the system bus if it runs, else an
    /// embedded private bus.
    Auto,
    /// The user's session bus.
    Session,
    /// The system bus.
    System,
    /// A private bus of our own.
    Embedded,
    /// Any D-Bus address.
    Address(String),
    /// The bus that started us by D-Bus activation (`auto` only): the
    /// bus daemon sets `$DBUS_STARTER_ADDRESS` and `$DBUS_STARTER_BUS_TYPE`
    /// and waits for the name there, whatever other buses exist.
    Starter {
        /// `$DBUS_STARTER_ADDRESS`.
        address: String,
        /// `$DBUS_STARTER_BUS_TYPE` (`system`, `session`, or unknown).
        bus_type: String,
    },
}

impl FromStr for BusChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => BusChoice::Auto,
            "session" => BusChoice::Session,
            "system" => BusChoice::System,
            "embedded" => BusChoice::Embedded,
            address if address.contains(':') => BusChoice::Address(address.to_owned()),
            other => {
                return Err(format!(
                    "{other:?} is not a bus: use auto, session, system, embedded or a D-Bus address"
                ))
            }
        })
    }
}

/// Where the system bus listens on Debian and most distributions.
const SYSTEM_BUS_SOCKET: &str = "/run/dbus/system_bus_socket";

impl BusChoice {
    /// What `auto` means on this machine right now.
    pub fn resolve(self) -> BusChoice {
        if self != BusChoice::Auto {
            return self;
        }
        if let Ok(address) = std::env::var("DBUS_STARTER_ADDRESS") {
            if !address.is_empty() {
                let bus_type = std::env::var("DBUS_STARTER_BUS_TYPE").unwrap_or_default();
                return BusChoice::Starter { address, bus_type };
            }
        }
        if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some() {
            BusChoice::Session
        } else if Path::new(SYSTEM_BUS_SOCKET).exists() {
            BusChoice::System
        } else {
            BusChoice::Embedded
        }
    }

    /// The bus to try, how to connect to it, its label for the log and its
    /// type (for its message size limit); `None` for the embedded bus.
    /// Call it on a resolved choice: `auto` is `None` too.
    pub(crate) fn builder(&self) -> Option<(connection::Builder<'static>, String, BusType)> {
        match self {
            BusChoice::Session => Some((
                connection::Builder::session(),
                "session".to_owned(),
                BusType::Session,
            )),
            BusChoice::System => Some((
                connection::Builder::system(),
                "system".to_owned(),
                BusType::System,
            )),
            BusChoice::Address(a) => Some((
                connection::Builder::address(a.as_str()),
                a.clone(),
                BusType::Unknown,
            )),
            BusChoice::Starter { address, bus_type } => Some((
                connection::Builder::address(address.as_str()),
                // "serving … on the activating system bus (unix:…)"
                format!(
                    "activating {}",
                    if bus_type.is_empty() {
                        address.clone()
                    } else {
                        format!("{bus_type} ({address})")
                    }
                ),
                match bus_type.as_str() {
                    "system" => BusType::System,
                    "session" => BusType::Session,
                    _ => BusType::Unknown,
                },
            )),
            BusChoice::Embedded | BusChoice::Auto => None,
        }
    }
}

pub use proto::runtime::{address_file, runtime_dir};

/// A running embedded bus; stopped (and its files removed) by [`EmbeddedBus::stop`].
pub struct EmbeddedBus {
    child: Child,
    dir: PathBuf,
    address: String,
}

impl EmbeddedBus {
    /// Starts a private dbus-daemon in `dir` and writes its address file.
    pub async fn start(dir: &Path) -> Result<EmbeddedBus, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        let socket = dir.join("bus.sock");
        let file = address_file(dir);
        if socket.exists() {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return Err(format!(
                    "a bus is already listening at {}: is another devmgrd running?",
                    socket.display()
                ));
            }
            // Left behind by a daemon that died: nobody listens on it.
            let _ = std::fs::remove_file(&socket);
        }
        // A stale address (another bus's guid) must never be read as ours.
        let _ = std::fs::remove_file(&file);
        let config = dir.join("bus.conf");
        // No <allow user=...>: only our own uid may connect (EXTERNAL auth).
        let text = format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
            socket.display()
        );
        std::fs::write(&config, text)
            .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        // setpriv --pdeathsig: the bus dies with us even if we are SIGKILLed.
        let mut command = if Path::new("/usr/bin/setpriv").exists() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "TERM", "--", "dbus-daemon"]);
            c
        } else {
            Command::new("dbus-daemon")
        };
        let mut child = command
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address"])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start dbus-daemon for the embedded bus: {e}"))?;
        let stdout = child.stdout.take().ok_or("dbus-daemon gave no stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let address = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .map_err(|_| "dbus-daemon did not report its address within 10 s".to_owned())?
            .map_err(|e| format!("reading dbus-daemon's address: {e}"))?
            .ok_or("dbus-daemon exited before reporting its address")?;
        let address = address.trim().to_owned();
        let tmp = dir.join("bus.tmp");
        std::fs::write(&tmp, format!("{address}\n"))
            .and_then(|()| std::fs::rename(&tmp, &file))
            .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
        Ok(EmbeddedBus {
            child,
            dir: dir.to_owned(),
            address,
        })
    }

    /// The bus's D-Bus address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Resolves when the bus process exits.
    pub async fn exited(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => format!("the embedded bus exited ({status})"),
            Err(e) => format!("lost track of the embedded bus: {e}"),
        }
    }

    /// Stops the bus and removes its files.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
        for name in ["bus", "bus.sock", "bus.conf"] {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }
}
