//! Whether systemd-udevd's broadcasts reach us at all. They travel on
//! netlink, which stops at the network namespace: a devmgrd in a container
//! with a private network hears the kernel's uevents but none of udevd's,
//! and would model a machine that never changes without a word. So beside
//! the udev monitor, a kernel monitor of the same subsystems counts raw
//! uevents until the first udev event proves the path; when the kernel
//! reports events and udevd relays none within [`GRACE`], devmgrd says so,
//! once, and stops counting.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::PollTimeout;

/// How long udevd may take to relay the kernel's first event. udevd runs
/// rules (and programs) before it broadcasts; a burst of 1,000 devices is
/// relayed within 0.3 s here, so 10 s without any is not a busy udevd.
pub const GRACE: Duration = Duration::from_secs(10);

/// The kernel monitor and what it has heard that udevd has not relayed.
pub struct RelayCheck {
    kernel: Option<udev::MonitorSocket>,
    /// When the first kernel event arrived with no udev event yet.
    first_unrelayed: Option<Instant>,
    unrelayed: u64,
    subsystems: String,
}

impl RelayCheck {
    /// Starts counting. Without a kernel monitor (no permission, no socket)
    /// there is nothing to compare with, and nothing to warn about.
    pub fn open(subsystems: &[String]) -> RelayCheck {
        let kernel = udev::MonitorBuilder::new_kernel().and_then(|mut builder| {
            for subsystem in subsystems {
                builder = builder.match_subsystem(subsystem)?;
            }
            builder.listen()
        });
        let kernel = match kernel {
            Ok(socket) => Some(socket),
            Err(e) => {
                tracing::debug!("cannot check that udevd's events reach us: {e}");
                None
            }
        };
        RelayCheck {
            kernel,
            first_unrelayed: None,
            unrelayed: 0,
            subsystems: subsystems.join(", "),
        }
    }

    /// The kernel monitor's socket, while the check runs.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.kernel.as_ref().map(|socket| socket.as_fd())
    }

    /// How long the reader may sleep before [`RelayCheck::expire`] is due.
    pub fn timeout(&self) -> PollTimeout {
        match self.first_unrelayed {
            Some(first) if self.kernel.is_some() => {
                let left = GRACE.saturating_sub(first.elapsed());
                // Round up: waking a millisecond early would only loop.
                let ms = left.as_millis().saturating_add(1);
                PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX))
            }
            _ => PollTimeout::NONE,
        }
    }

    /// Drains the kernel monitor, counting what it heard.
    pub fn on_kernel_readable(&mut self) {
        let Some(socket) = &self.kernel else { return };
        let heard = socket.iter().count() as u64;
        if heard > 0 {
            self.unrelayed = self.unrelayed.saturating_add(heard);
            self.first_unrelayed.get_or_insert_with(Instant::now);
        }
    }

    /// udevd relayed an event: the path works, stop counting.
    pub fn on_relayed(&mut self) {
        if self.kernel.take().is_some() {
            tracing::debug!("udevd's events reach us");
        }
    }

    /// Warns, once, when the kernel's events have gone unrelayed too long.
    pub fn expire(&mut self) {
        let Some(first) = self.first_unrelayed else {
            return;
        };
        if self.kernel.is_none() || first.elapsed() < GRACE {
            return;
        }
        self.kernel = None;
        tracing::warn!(
            "the kernel reported {} device events ({}) in the last {} s and systemd-udevd \
             relayed none of them: its broadcasts do not reach devmgrd (a private network \
             namespace, as in a container with its own network, stops them), so the model \
             will not follow the machine's devices; use --udev-source kernel here",
            self.unrelayed,
            self.subsystems,
            GRACE.as_secs()
        );
    }
}
