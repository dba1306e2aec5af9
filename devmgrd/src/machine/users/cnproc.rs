//! The kernel's process connector (a NETLINK_CONNECTOR socket, CN_IDX_PROC):
//! an event each time a program starts or a process forks. A new mount
//! namespace runs a program (a container's init, a service under
//! `PrivateTmp=`, `unshare -m CMD`), so its exec is how the watcher learns
//! that the namespace exists, without walking `/proc` on a timer; a fork
//! of a process holding a device node shares that open file. Since Linux
//! 6.6 the socket asks for those two events only; before, it gets every
//! event and skips the rest. Needs CAP_NET_ADMIN.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{netlink, AddressFamily, SocketFlags, SocketType};

/// `CN_IDX_PROC`, `CN_VAL_PROC`.
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
/// `PROC_CN_MCAST_LISTEN`.
const MCAST_LISTEN: u32 = 1;
/// `PROC_EVENT_FORK`, `PROC_EVENT_EXEC`.
const EVENT_FORK: u32 = 1;
const EVENT_EXEC: u32 = 2;
/// `NLMSG_DONE`.
const NLMSG_DONE: u16 = 3;
/// sizeof(struct nlmsghdr), sizeof(struct cn_msg).
const NLMSG_HEADER: usize = 16;
const CN_MSG_HEADER: usize = 20;

/// A subscription to exec events.
pub struct ProcConnector {
    socket: OwnedFd,
}

/// Whether this kernel filters connector events by type (6.6+).
fn filters_events() -> bool {
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (6, 6)
}

impl ProcConnector {
    /// Subscribes (`Err` without CAP_NET_ADMIN or the connector).
    pub fn open() -> std::io::Result<ProcConnector> {
        let socket = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            Some(netlink::CONNECTOR),
        )?;
        rustix::net::bind(&socket, &netlink::SocketAddrNetlink::new(0, CN_IDX_PROC))?;
        // struct proc_input { op; event_type } where the kernel reads it,
        // else the bare op (an older kernel ignores a longer message).
        let mut payload = MCAST_LISTEN.to_ne_bytes().to_vec();
        if filters_events() {
            payload.extend_from_slice(&(EVENT_FORK | EVENT_EXEC).to_ne_bytes());
        }
        let mut message = Vec::with_capacity(NLMSG_HEADER + CN_MSG_HEADER + payload.len());
        let total = (NLMSG_HEADER + CN_MSG_HEADER + payload.len()) as u32;
        message.extend_from_slice(&total.to_ne_bytes()); // nlmsg_len
        message.extend_from_slice(&NLMSG_DONE.to_ne_bytes()); // nlmsg_type
        message.extend_from_slice(&0u16.to_ne_bytes()); // nlmsg_flags
        message.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq
        message.extend_from_slice(&std::process::id().to_ne_bytes()); // nlmsg_pid
        message.extend_from_slice(&CN_IDX_PROC.to_ne_bytes()); // id.idx
        message.extend_from_slice(&CN_VAL_PROC.to_ne_bytes()); // id.val
        message.extend_from_slice(&0u32.to_ne_bytes()); // seq
        message.extend_from_slice(&0u32.to_ne_bytes()); // ack
        message.extend_from_slice(&(payload.len() as u16).to_ne_bytes()); // len
        message.extend_from_slice(&0u16.to_ne_bytes()); // flags
        message.extend_from_slice(&payload);
        rustix::net::sendto(
            &socket,
            &message,
            rustix::net::SendFlags::empty(),
            &netlink::SocketAddrNetlink::new(0, 0),
        )?;
        Ok(ProcConnector { socket })
    }

    /// What to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// What happened since the last call, in order: at most
    /// `DATAGRAMS_PER_CALL` datagrams, so that a fork storm cannot keep
    /// the watcher from its other sources (poll reports the rest).
    pub fn events(&self) -> Vec<ProcEvent> {
        let mut pids = Vec::new();
        let mut buffer = [0u8; 4096];
        for _ in 0..DATAGRAMS_PER_CALL {
            match rustix::net::recvfrom(&self.socket, &mut buffer, rustix::net::RecvFlags::empty())
            {
                Ok((0, _, _)) => break,
                // Only the kernel's (port 0): any process may send a
                // datagram to this socket.
                Ok((n, _, Some(from))) if from_kernel(&from) => {
                    pids.extend(events_in(&buffer[..n.min(buffer.len())]))
                }
                Ok(_) => continue,
                // ENOBUFS: events were lost; a missed namespace is found at
                // the next walk (before a claim's failure is explained).
                Err(e) if e == rustix::io::Errno::NOBUFS => continue,
                Err(_) => break,
            }
        }
        pids
    }
}

/// Most datagrams read per call (each up to 4 KiB of events).
const DATAGRAMS_PER_CALL: usize = 64;

fn from_kernel(from: &rustix::net::SocketAddrAny) -> bool {
    netlink::SocketAddrNetlink::try_from(from.clone()).is_ok_and(|a| a.pid() == 0)
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// A process event the watcher cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcEvent {
    /// A process (its tgid) started a program.
    Exec(u32),
    /// A process forked a new one (not a thread).
    Fork { parent: u32, child: u32 },
}

/// The events of one datagram.
fn events_in(datagram: &[u8]) -> Vec<ProcEvent> {
    let mut events = Vec::new();
    let mut at = 0;
    while let Some(len) = u32_at(datagram, at) {
        let len = len as usize;
        let Some(message) = at
            .checked_add(len)
            .and_then(|end| datagram.get(at..end))
            .filter(|_| len >= NLMSG_HEADER)
        else {
            break;
        };
        // Messages are 4-byte aligned.
        at += (len + 3) & !3;
        // struct cn_msg: id (idx, val), seq, ack, len, flags; only the
        // process connector's.
        let cn = NLMSG_HEADER;
        if u32_at(message, cn) != Some(CN_IDX_PROC) || u32_at(message, cn + 4) != Some(CN_VAL_PROC)
        {
            continue;
        }
        // struct proc_event: what, cpu, timestamp_ns (u64), then the
        // event's data: exec (process_pid, process_tgid); fork
        // (parent_pid, parent_tgid, child_pid, child_tgid). Read within
        // the message only.
        let event = NLMSG_HEADER + CN_MSG_HEADER;
        let data = |n: usize| u32_at(message, event + 16 + 4 * n);
        match u32_at(message, event) {
            Some(EVENT_EXEC) => events.extend(data(1).map(ProcEvent::Exec)),
            Some(EVENT_FORK) => {
                if let (Some(parent), Some(child_pid), Some(child)) = (data(1), data(2), data(3)) {
                    if child_pid == child {
                        events.push(ProcEvent::Fork { parent, child });
                    }
                }
            }
            _ => {}
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(what: u32, data: &[u32]) -> Vec<u8> {
        let mut m = Vec::new();
        let len = (NLMSG_HEADER + CN_MSG_HEADER + 16 + 4 * data.len()) as u32;
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&[0; NLMSG_HEADER - 4]);
        m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        m.extend_from_slice(&[0; CN_MSG_HEADER - 8]);
        m.extend_from_slice(&what.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes()); // cpu
        m.extend_from_slice(&0u64.to_ne_bytes()); // timestamp
        for d in data {
            m.extend_from_slice(&d.to_ne_bytes());
        }
        m
    }

    #[test]
    fn exec_and_fork_events_give_their_processes_and_anything_else_is_skipped() {
        let mut datagram = event(EVENT_EXEC, &[42, 41]);
        datagram.extend(event(EVENT_FORK, &[7, 7, 8, 8]));
        datagram.extend(event(EVENT_FORK, &[7, 7, 9, 7])); // a thread
        datagram.extend(event(0x8000_0000, &[3, 3, 0, 0])); // an exit
        datagram.extend(event(EVENT_EXEC, &[9, 9]));
        assert_eq!(
            events_in(&datagram),
            [
                ProcEvent::Exec(41),
                ProcEvent::Fork {
                    parent: 7,
                    child: 8
                },
                ProcEvent::Exec(9)
            ]
        );
        assert!(events_in(&[]).is_empty());
        assert!(events_in(&[255, 255, 255, 255, 0, 0]).is_empty());
        assert!(events_in(&datagram[..30]).is_empty());
        // Another connector's message, and one too short for its event:
        // skipped, and nothing is read from the message after it.
        let mut other = event(EVENT_EXEC, &[5, 5]);
        other[NLMSG_HEADER] = 9;
        let mut short = event(EVENT_EXEC, &[6, 6]);
        short.truncate(NLMSG_HEADER + CN_MSG_HEADER + 4);
        let len = short.len() as u32;
        short[..4].copy_from_slice(&len.to_ne_bytes());
        other.extend(short);
        other.extend(event(EVENT_EXEC, &[7, 7]));
        assert_eq!(events_in(&other), [ProcEvent::Exec(7)]);
    }
}
