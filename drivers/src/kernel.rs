//! How real (udev-origin) devices are removed, in the engine's terms: each
//! implementation only *describes* the action (an [`Exit::Later`]); devmgrd
//! carries it out on the machine and the kernel's own `remove` event
//! confirms it. Which one a device gets is decided when it is ingested
//! ([`handler_for`]); a device with none cannot be removed (`NotSupported`).

use crate::driver::{Driver, Exit, ExitAction, NewChild, ObjectView, ProbeOptions};
use crate::error::Result;

/// Loop devices: `LOOP_CTL_REMOVE` on /dev/loop-control.
pub const LOOP: &str = "kernel-loop";
/// SCSI devices: write `1` to the device's sysfs `delete`.
pub const SCSI: &str = "kernel-scsi";
/// Devices bound to a kernel driver: write their name to the driver's `unbind`.
pub const UNBIND: &str = "kernel-unbind";
/// Disks and partitions of a SCSI device, partitions of a loop device:
/// nothing of their own to do; the kernel takes them away with their
/// device ([`crate::Exit::WithParent`]).
pub const WITH_PARENT: &str = "kernel-with-parent";

/// The verbs devmgrd's executor knows.
pub mod verbs {
    /// Target: the loop device's number.
    pub const LOOP_REMOVE: &str = "loop-remove";
    /// Target: the device's sys path.
    pub const SCSI_DELETE: &str = "scsi-delete";
    /// Target: the device's sys path.
    pub const DRIVER_UNBIND: &str = "driver-unbind";
}

/// Which removal a device gets, from what udev says of it (`None`: it
/// cannot be removed through devmgr).
pub fn handler_for(
    subsystem: &str,
    devtype: Option<&str>,
    sys_name: &str,
    parent_subsystem: Option<&str>,
    has_driver: bool,
) -> Option<&'static str> {
    let is_loop = sys_name
        .strip_prefix("loop")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    match (subsystem, devtype) {
        ("block", Some("disk")) if is_loop => Some(LOOP),
        ("scsi", Some("scsi_device")) => Some(SCSI),
        ("block", _) if matches!(parent_subsystem, Some("scsi" | "block")) => Some(WITH_PARENT),
        _ if has_driver => Some(UNBIND),
        _ => None,
    }
}

/// One of the kernel removal implementations above.
#[derive(Debug, Clone, Copy)]
pub struct KernelRemoval(&'static str);

impl KernelRemoval {
    /// Every kernel removal implementation, for the registry.
    pub fn all() -> [KernelRemoval; 4] {
        [LOOP, SCSI, UNBIND, WITH_PARENT].map(KernelRemoval)
    }
}

impl Driver for KernelRemoval {
    fn name(&self) -> &'static str {
        self.0
    }

    /// Real devices are found by the kernel, not by probing.
    fn probe(&self, _target: &ObjectView<'_>, _options: &ProbeOptions) -> Result<Vec<NewChild>> {
        Ok(Vec::new())
    }

    fn exit(&self, target: &ObjectView<'_>) -> Exit {
        let later = |verb, target: &str| {
            Exit::Later(ExitAction {
                verb,
                target: target.to_owned(),
            })
        };
        match self.0 {
            LOOP => match target.name.strip_prefix("loop").map(str::parse::<u32>) {
                Some(Ok(n)) => later(verbs::LOOP_REMOVE, &n.to_string()),
                _ => Exit::Failed(format!("{} is not a loop device", target.name)),
            },
            SCSI => later(verbs::SCSI_DELETE, target.sys_path),
            UNBIND => later(verbs::DRIVER_UNBIND, target.sys_path),
            _ => Exit::WithParent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_device_gets_its_removal() {
        assert_eq!(
            handler_for("block", Some("disk"), "loop7", None, false),
            Some(LOOP)
        );
        assert_eq!(
            handler_for("block", Some("disk"), "loopy", None, false),
            None
        );
        assert_eq!(
            handler_for("scsi", Some("scsi_device"), "0:0:0:1", Some("scsi"), true),
            Some(SCSI)
        );
        assert_eq!(
            handler_for("block", Some("disk"), "sda", Some("scsi"), false),
            Some(WITH_PARENT)
        );
        assert_eq!(
            handler_for("block", Some("partition"), "sda1", Some("block"), false),
            Some(WITH_PARENT)
        );
        assert_eq!(handler_for("net", None, "eth0", None, true), Some(UNBIND));
        assert_eq!(handler_for("net", None, "lo", None, false), None);
    }
}
