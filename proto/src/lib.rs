//! The devmgr public contract, version 1: bus names, paths, interface names,
//! the wire names of kinds, states and errors, and the typed D-Bus error enum.
//!
//! Everything here is part of the contract in `shared/DESIGN.md` §3: extending
//! is fine, renaming is a break. The engine (`drivers`) uses the plain parts
//! with `default-features = false`; the daemon and `devctl` use the D-Bus parts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[cfg(feature = "dbus")]
mod dbus_error;
#[cfg(feature = "dbus")]
pub use dbus_error::Error;
#[cfg(feature = "dbus")]
pub mod proxies;
pub mod runtime;

/// Contract version reported by the manager's `Version` property.
pub const CONTRACT_VERSION: &str = "1";
/// Well-known bus name of the daemon.
pub const BUS_NAME: &str = "org.devmgr.DevMgr1";
/// Path of the manager object.
pub const MANAGER_PATH: &str = "/org/devmgr/DevMgr1";
/// Interface of the manager object.
pub const MANAGER_INTERFACE: &str = "org.devmgr.DevMgr1.Manager";
/// Interface of every modelled object.
pub const OBJECT_INTERFACE: &str = "org.devmgr.DevMgr1.Object";
/// Prefix of every object path; the decimal id follows.
pub const OBJECT_PATH_PREFIX: &str = "/org/devmgr/DevMgr1/objects/";
/// Prefix of every devmgr D-Bus error name.
pub const ERROR_PREFIX: &str = "org.devmgr.DevMgr1.Error";
/// The object path that stands for "no object" (no parent, no driver).
pub const NO_OBJECT_PATH: &str = "/";

/// The D-Bus object path of the object with this id.
pub fn object_path(id: u64) -> String {
    format!("{OBJECT_PATH_PREFIX}{id}")
}

/// The id named by an object path, if it is one of ours.
///
/// Only canonical decimal ids are accepted (no sign, no leading zero), so one
/// object has exactly one path.
pub fn parse_object_path(path: &str) -> Option<u64> {
    let digits = path.strip_prefix(OBJECT_PATH_PREFIX)?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// Generates a wire-named enum with `as_str`, `Display`, `FromStr` and `ALL`.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $wire:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The name used on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    _ => Err(UnknownName {
                        what: stringify!($name),
                        name: s.chars().take(64).collect(),
                    }),
                }
            }
        }
    };
}

/// A string that names no value of a wire enum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownName {
    /// Which enum was being parsed.
    pub what: &'static str,
    /// The offending text (truncated to 64 characters).
    pub name: String,
}

impl fmt::Display for UnknownName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {} {:?}", self.what.to_lowercase(), self.name)
    }
}

impl std::error::Error for UnknownName {}

wire_enum! {
    /// What an object is.
    Kind {
        /// A driver that hosts and devices can be bound to.
        Driver = "driver",
        /// A host adapter: the root of a device tree.
        Host = "host",
        /// A device under a host or under another device.
        Device = "device",
    }
}

wire_enum! {
    /// The lifecycle state of a visible object (DESIGN.md §2).
    State {
        /// In service: accepts references, children and bindings.
        Live = "live",
        /// Administratively disabled and kept; existing references stay valid.
        Stopped = "stopped",
        /// Disabled with its removal pending until it is idle.
        Removing = "removing",
        /// The kernel removed the real device while it was still referenced.
        Gone = "gone",
    }
}

impl State {
    /// Whether the object accepts new references, children and bindings.
    pub const fn is_live(self) -> bool {
        matches!(self, State::Live)
    }
}

wire_enum! {
    /// Where an object came from.
    Origin {
        /// Added through the API (D-Bus `Add`, or a driver's scan of an API object).
        Api = "api",
        /// Ingested from udev / kernel uevents.
        Udev = "udev",
    }
}

wire_enum! {
    /// The immediate result of a removal request.
    RemoveOutcome {
        /// The object is gone from the model.
        Removed = "removed",
        /// The object is disabled and will go when it is idle.
        Pending = "pending",
    }
}

wire_enum! {
    /// What happens when a pending removal's deadline passes.
    OnTimeout {
        /// Revoke every reference in the affected set and complete the removal.
        Revoke = "revoke",
        /// Cancel the removal, as a re-enable would.
        Cancel = "cancel",
    }
}

wire_enum! {
    /// The kinds of error a client can tell apart by D-Bus error name.
    ErrorKind {
        /// No such object (or a stale id or path).
        NotFound = "NotFound",
        /// The object's state does not allow the operation.
        InvalidState = "InvalidState",
        /// Another object of the same kind already has that name.
        NameInUse = "NameInUse",
        /// An argument or option is malformed or out of range.
        InvalidArgument = "InvalidArgument",
        /// The object has no way to carry out the operation.
        NotSupported = "NotSupported",
        /// The caller may not do this.
        AccessDenied = "AccessDenied",
        /// A per-client or global limit was reached.
        QuotaExceeded = "QuotaExceeded",
    }
}

impl ErrorKind {
    /// The full D-Bus error name, e.g. `org.devmgr.DevMgr1.Error.NotFound`.
    pub fn dbus_name(self) -> String {
        format!("{ERROR_PREFIX}.{}", self.as_str())
    }
}

/// Option keys accepted by the manager's `Add`.
pub mod add_options {
    /// `o`: a driver to bind the new object to.
    pub const DRIVER: &str = "driver";
    /// `a{ss}`: initial attributes.
    pub const ATTRIBUTES: &str = "attributes";
    /// `u`: for a host bound to `sim-scsi`, how many LUNs to scan.
    pub const LUNS: &str = "luns";
}

/// Option keys accepted by an object's `Remove`.
pub mod remove_options {
    /// `b`: revoke every reference in the affected set and complete at once.
    pub const FORCE: &str = "force";
    /// `b`: report what would happen, change nothing.
    pub const DRY_RUN: &str = "dry-run";
    /// `u`: deadline for a pending removal, in seconds.
    pub const TIMEOUT_SEC: &str = "timeout-sec";
    /// `s`: `revoke` or `cancel`, what to do at the deadline.
    pub const ON_TIMEOUT: &str = "on-timeout";
    /// `b`: lazily detach every filesystem mounted from the affected set
    /// (in every mount namespace) and turn its swap off (rule 18).
    pub const DETACH_MOUNTS: &str = "detach-mounts";
}

/// The holder names of the kernel's own users of a real device in
/// `Holders` (DESIGN.md §2 rule 17, §3).
pub mod kernel_holders {
    /// A filesystem mounted from the device, in any mount namespace.
    pub const MOUNT: &str = "kernel:mount";
    /// Swap on the device.
    pub const SWAP: &str = "kernel:swap";
    /// A block device stacked on it (dm, md, bcache, a loop device).
    pub const STACKED: &str = "kernel:holder";
    /// A process with the device node open.
    pub const PROCESS: &str = "kernel:process";
    /// Every kernel holder name.
    pub const ALL: [&str; 4] = [MOUNT, SWAP, STACKED, PROCESS];

    /// Whether a holder name is one of the kernel's.
    pub fn is_kernel(holder: &str) -> bool {
        holder.starts_with("kernel:")
    }
}

/// Name of the simulated SCSI host adapter driver.
pub const SIM_SCSI_DRIVER: &str = "sim-scsi";

/// One entry of the `Holders` property: reference id, holder bus name, uid,
/// pid, reason, and since when (µs since the Unix epoch).
pub type HolderTuple = (u64, String, u32, u32, String, u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_round_trip_and_reject_non_canonical_ids() {
        assert_eq!(object_path(42), "/org/devmgr/DevMgr1/objects/42");
        assert_eq!(parse_object_path(&object_path(42)), Some(42));
        assert_eq!(parse_object_path(&object_path(u64::MAX)), Some(u64::MAX));
        for bad in [
            "/",
            "/org/devmgr/DevMgr1/objects/",
            "/org/devmgr/DevMgr1/objects/042",
            "/org/devmgr/DevMgr1/objects/-1",
            "/org/devmgr/DevMgr1/objects/1/2",
            "/org/devmgr/DevMgr1/objects/18446744073709551616",
            "/org/devmgr/DevMgr1",
        ] {
            assert_eq!(parse_object_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn wire_names_round_trip() {
        for k in Kind::ALL {
            assert_eq!(k.as_str().parse::<Kind>(), Ok(*k));
        }
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>(), Ok(*s));
        }
        assert!("Live".parse::<State>().is_err());
        assert_eq!(
            ErrorKind::InvalidState.dbus_name(),
            "org.devmgr.DevMgr1.Error.InvalidState"
        );
    }
}
