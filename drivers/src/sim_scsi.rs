//! `sim-scsi`: a simulated SCSI host adapter for demos, tests and benchmarks.
//! Binding a host to it with `luns = N` scans N devices named `H:C:T:L` under
//! it. Its exits can be told to fail or to complete later through the
//! attribute `sim.exit` (`ok`, the default; `fail`; `async`), so "exit may
//! fail" can be exercised without real hardware.

use std::collections::BTreeMap;

use proto::Kind;

use crate::driver::{Driver, Exit, ExitAction, NewChild, ObjectView, ProbeOptions};
use crate::error::{Error, Result};

/// Most LUNs one scan may create (a real SCSI host tops out far lower per target).
pub const MAX_LUNS: u32 = 1 << 20;

/// Attribute that chooses how a simulated exit behaves.
pub const EXIT_ATTRIBUTE: &str = "sim.exit";

/// The simulated SCSI host adapter driver.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimScsi;

impl SimScsi {
    /// The SCSI host number of a host: the digits of a `hostN` name, else its id
    /// (unique and never reused, so LUN names cannot collide across hosts).
    fn host_number(target: &ObjectView<'_>) -> u64 {
        target
            .name
            .strip_prefix("host")
            .and_then(|n| n.parse().ok())
            .unwrap_or(target.id.0)
    }
}

impl Driver for SimScsi {
    fn name(&self) -> &'static str {
        proto::SIM_SCSI_DRIVER
    }

    fn probe(&self, target: &ObjectView<'_>, options: &ProbeOptions) -> Result<Vec<NewChild>> {
        let Some(luns) = options.luns else {
            return Ok(Vec::new());
        };
        if target.kind != Kind::Host {
            return Err(Error::invalid_argument(format!(
                "{}: only a host can scan LUNs, not a {}",
                proto::SIM_SCSI_DRIVER,
                target.kind
            )));
        }
        if luns > MAX_LUNS {
            return Err(Error::invalid_argument(format!(
                "{}: at most {MAX_LUNS} LUNs per scan, not {luns}",
                proto::SIM_SCSI_DRIVER
            )));
        }
        let host = Self::host_number(target);
        Ok((0..luns)
            .map(|lun| NewChild {
                kind: Kind::Device,
                name: format!("{host}:0:0:{lun}"),
                attributes: BTreeMap::from([
                    ("scsi.host".to_owned(), host.to_string()),
                    ("scsi.lun".to_owned(), lun.to_string()),
                ]),
            })
            .collect())
    }

    fn exit(&self, target: &ObjectView<'_>) -> Exit {
        match target.attributes.get(EXIT_ATTRIBUTE) {
            None | Some("ok") => Exit::Done,
            Some("fail") => Exit::Failed(format!(
                "{}: simulated exit failure on {}",
                proto::SIM_SCSI_DRIVER,
                target.name
            )),
            Some("async") => Exit::Later(ExitAction {
                verb: "simulated-delete",
                target: target.name.to_owned(),
            }),
            Some(other) => Exit::Failed(format!(
                "{}: unknown {EXIT_ATTRIBUTE} value {other:?}",
                proto::SIM_SCSI_DRIVER
            )),
        }
    }
}
