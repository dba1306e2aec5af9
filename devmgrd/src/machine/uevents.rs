//! Where the machine's device events come from: a udev monitor (events
//! processed by systemd-udevd, or the kernel's raw uevents) read on a thread
//! of its own, and the coldplug enumeration of what already exists. The
//! monitor is opened *before* the enumeration, so a device that appears in
//! between is seen twice (and deduplicated by sys path downstream), never
//! missed. Everything is turned into plain [`UEvent`]s before it leaves
//! this module: the rest of the daemon never touches libudev.

use std::os::fd::AsFd;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{setsockopt, sockopt};
use tokio::sync::mpsc;

use crate::machine::relay_check::RelayCheck;

pub use drivers::uevent::{Action, Source, UEvent};

/// The monitor socket's receive buffer, as systemd-udevd sets it.
pub const RECEIVE_BUFFER: usize = 128 * 1024 * 1024;

/// systemd-udevd's control socket.
const UDEVD_CONTROL: &str = "/run/udev/control";

/// udev when systemd-udevd is running, else kernel.
pub fn detect_source() -> Source {
    if udevd_listening() {
        Source::Udev
    } else {
        Source::Kernel
    }
}

/// Whether a udevd accepts connections on its control socket. The socket
/// file outlives a udevd that was killed, so its existence is not enough:
/// trusting it would leave the daemon on a monitor that never hears a thing.
pub fn udevd_listening() -> bool {
    seqpacket_listening(std::path::Path::new(UDEVD_CONTROL))
}

/// Whether something accepts SOCK_SEQPACKET connections at `path`.
fn seqpacket_listening(path: &std::path::Path) -> bool {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let Ok(address) = UnixAddr::new(path) else {
        return false;
    };
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .is_ok_and(|fd| connect(fd.as_raw_fd(), &address).is_ok())
}

/// What the reader thread hands to the ingestion.
#[derive(Debug)]
pub enum Ingest {
    /// The devices that existed when the monitor started, parents first.
    Coldplug(Vec<UEvent>),
    /// Every device that exists now, parents first, after the socket
    /// overflowed (ENOBUFS): events were lost, so reconcile against this.
    Resync(Vec<UEvent>),
    /// One event, in the order the kernel (or udevd) sent it.
    Event(UEvent),
}

fn text(s: Option<&std::ffi::OsStr>) -> Option<String> {
    s.map(|s| s.to_string_lossy().into_owned())
}

/// `driver` is what the caller read: an event's own DRIVER, or sysfs's
/// link for an enumerated device (see [`enumerate`]).
fn from_device(
    action: Action,
    seqnum: u64,
    device: &udev::Device,
    driver: Option<String>,
) -> UEvent {
    UEvent {
        action,
        seqnum,
        sys_path: device.syspath().to_string_lossy().into_owned(),
        subsystem: text(device.subsystem()).unwrap_or_default(),
        sys_name: device.sysname().to_string_lossy().into_owned(),
        devtype: text(device.devtype()),
        driver,
        sys_path_old: text(device.property_value("DEVPATH_OLD")).map(|old| format!("/sys{old}")),
        properties: drivers::uevent::KEPT_PROPERTIES
            .iter()
            .filter_map(|k| Some(((*k).to_owned(), text(device.property_value(k))?)))
            .collect(),
    }
}

fn action_of(event: &udev::Event) -> Action {
    match event.event_type() {
        udev::EventType::Add => Action::Add,
        udev::EventType::Remove => Action::Remove,
        udev::EventType::Change => Action::Change,
        udev::EventType::Bind => Action::Bind,
        udev::EventType::Unbind => Action::Unbind,
        // libudev reports `move` (a rename) as unknown; its ACTION says.
        _ => Action::Other,
    }
}

/// Opens the monitor, enumerates what exists, and starts the reader thread.
/// Errors (no netlink socket, no libudev) come back before anything starts.
/// libudev's handles may not cross threads, so all of it lives on the reader.
pub async fn start(
    source: Source,
    subsystems: &[String],
    receive_buffer: usize,
    events: mpsc::UnboundedSender<Ingest>,
) -> Result<(), String> {
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let subsystems = subsystems.to_vec();
    std::thread::Builder::new()
        .name(format!("uevents-{}", source.as_str()))
        .spawn(move || {
            let socket = match open(source, &subsystems, receive_buffer, &events) {
                Ok(socket) => {
                    let _ = ready_tx.send(Ok(()));
                    socket
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            read(source, &subsystems, &socket, &events);
        })
        .map_err(|e| format!("cannot start the uevent reader: {e}"))?;
    ready
        .await
        .unwrap_or_else(|_| Err("the uevent reader stopped at once".into()))
}

/// Opens the monitor, then sends what already exists.
fn open(
    source: Source,
    subsystems: &[String],
    receive_buffer: usize,
    events: &mpsc::UnboundedSender<Ingest>,
) -> Result<udev::MonitorSocket, String> {
    let mut builder = match source {
        Source::Udev => udev::MonitorBuilder::new(),
        Source::Kernel => udev::MonitorBuilder::new_kernel(),
    }
    .map_err(|e| format!("cannot open a {} monitor: {e}", source.as_str()))?;
    for subsystem in subsystems {
        builder = builder
            .match_subsystem(subsystem)
            .map_err(|e| format!("cannot filter on subsystem {subsystem}: {e}"))?;
    }
    let socket = builder
        .listen()
        .map_err(|e| format!("cannot listen for {} events: {e}", source.as_str()))?;
    // A burst (thousands of devices at once) must wait in the socket, not
    // overflow it: udevd's own choice, 128 MiB, past rmem_max as root.
    if let Err(e) = setsockopt(&socket.as_fd(), sockopt::RcvBufForce, &receive_buffer) {
        tracing::warn!("cannot set the uevent socket's buffer to {receive_buffer} bytes: {e}");
    }
    // Monitor first, then the enumeration (see the module's note).
    let _ = events.send(Ingest::Coldplug(enumerate(subsystems)?));
    Ok(socket)
}

/// Every device of these subsystems, parents first.
fn enumerate(subsystems: &[String]) -> Result<Vec<UEvent>, String> {
    let mut enumerator =
        udev::Enumerator::new().map_err(|e| format!("cannot enumerate devices: {e}"))?;
    for subsystem in subsystems {
        enumerator
            .match_subsystem(subsystem)
            .map_err(|e| format!("cannot enumerate subsystem {subsystem}: {e}"))?;
    }
    let mut existing: Vec<UEvent> = enumerator
        .scan_devices()
        .map_err(|e| format!("cannot enumerate devices: {e}"))?
        .map(|device| {
            let driver = text(device.driver());
            from_device(Action::Add, 0, &device, driver)
        })
        .collect();
    // Parents before children: a parent's sys path is a prefix of its child's.
    existing.sort_by(|a, b| a.sys_path.cmp(&b.sys_path));
    Ok(existing)
}

/// Forwards events until the daemon stops listening.
fn read(
    source: Source,
    subsystems: &[String],
    socket: &udev::MonitorSocket,
    events: &mpsc::UnboundedSender<Ingest>,
) {
    let mut relay = (source == Source::Udev).then(|| RelayCheck::open(subsystems));
    loop {
        let mut fds = vec![PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        let kernel_fd = relay.as_ref().and_then(RelayCheck::fd);
        fds.extend(kernel_fd.map(|fd| PollFd::new(fd, PollFlags::POLLIN)));
        let timeout = relay
            .as_ref()
            .map_or(PollTimeout::NONE, RelayCheck::timeout);
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!("the {} monitor failed: {e}", source.as_str());
                return;
            }
        }
        let kernel_readable = fds
            .get(1)
            .and_then(PollFd::revents)
            .is_some_and(|r| !r.is_empty());
        drop(fds);
        if let Some(check) = relay.as_mut() {
            if kernel_readable {
                check.on_kernel_readable();
            }
            check.expire();
            if check.fd().is_none() {
                relay = None;
            }
        }
        // libudev ends the iteration with errno set: EAGAIN when drained,
        // ENOBUFS when the kernel dropped events because we fell behind.
        Errno::clear();
        for event in socket.iter() {
            // The event's own DRIVER, never `device.driver()`: without the
            // property libudev reads the sysfs link, a kernfs lookup that
            // waits behind the very burst being reported (measured: the
            // reader's tail latency) and that describes the device as it is
            // now, not as the event saw it.
            let driver = text(event.property_value("DRIVER"));
            let mut uevent =
                from_device(action_of(&event), event.sequence_number(), &event, driver);
            if uevent.action == Action::Other
                && event.property_value("ACTION").is_some_and(|a| a == "move")
            {
                uevent.action = Action::Move;
            }
            if events.send(Ingest::Event(uevent)).is_err() {
                return; // the daemon is shutting down
            }
            if let Some(mut check) = relay.take() {
                check.on_relayed();
            }
        }
        if Errno::last() == Errno::ENOBUFS {
            tracing::warn!(
                "the {} event socket overflowed: events were lost; re-enumerating",
                source.as_str()
            );
            match enumerate(subsystems) {
                Ok(devices) => {
                    if events.send(Ingest::Resync(devices)).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!("cannot re-enumerate after the overflow: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::seqpacket_listening;
    use nix::sys::socket::UnixAddr;
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
    use std::os::fd::AsRawFd;

    /// A udevd that was killed leaves its socket file behind: that must
    /// read as "no udevd", and a listening socket as one.
    #[test]
    fn a_stale_control_socket_is_not_a_running_udevd() {
        let dir = std::env::temp_dir().join(format!("devmgrd-udevd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("control");
        let _ = std::fs::remove_file(&path);
        assert!(!seqpacket_listening(&path), "no file");
        let live = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        bind(live.as_raw_fd(), &UnixAddr::new(&path).expect("address")).expect("bind");
        listen(&live, Backlog::new(4).expect("backlog")).expect("listen");
        assert!(seqpacket_listening(&path), "a listening socket");
        drop(live);
        assert!(path.exists());
        assert!(!seqpacket_listening(&path), "the file of a closed socket");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
