//! `devctl hold`: hold a reference while a command runs, like
//! systemd-inhibit. The reference is the fd Acquire returns; it is released
//! by closing it, which happens when devctl exits — after the command.

use std::os::fd::{AsFd, OwnedFd};

use futures_util::StreamExt;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::net::unix::pipe;
use zbus::Connection;

use crate::act::signals;
use crate::cli::HoldArgs;
use crate::failure::{Failure, Outcome};
use crate::model;

/// Resolves when the daemon closes its end of the handle (revocation).
async fn revoked(handle: &pipe::Receiver) {
    let mut buf = [0u8; 16];
    loop {
        if handle.readable().await.is_err() {
            return;
        }
        match handle.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {} // the daemon never writes; ignore it if it ever does
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Resolves at the next ReleaseRequested on the held object (never, when
/// not asked to listen).
async fn release_requested(stream: &mut Option<zbus::MessageStream>) -> String {
    let Some(stream) = stream.as_mut() else {
        return std::future::pending().await;
    };
    while let Some(Ok(msg)) = stream.next().await {
        if msg
            .header()
            .member()
            .is_some_and(|m| m.as_str() == "ReleaseRequested")
        {
            return msg
                .body()
                .deserialize::<(String,)>()
                .map(|(why,)| why)
                .unwrap_or_default();
        }
    }
    std::future::pending().await
}

/// Holds the reference; returns the exit status (the command's, when there is one).
pub async fn hold(conn: &Connection, args: HoldArgs) -> Outcome<u8> {
    let path = model::resolve(conn, &args.obj, None).await?;
    let info = model::read_object(conn, &path).await?;
    let label = info.label();
    let reason = args.reason.clone().unwrap_or_else(|| {
        if args.command.is_empty() {
            "devctl hold".to_owned()
        } else {
            args.command.join(" ")
        }
    });
    // Listen before acquiring, so a request that comes at once is not missed.
    let mut requests = if args.release_on_request {
        Some(signals(conn, Some(&path)).await?)
    } else {
        None
    };
    let object = model::object(conn, &path).await?;
    let fd: OwnedFd = object
        .acquire(&reason, std::collections::HashMap::new())
        .await?
        .into();
    // zbus receives fds without close-on-exec: the command must not inherit
    // the handle, or the reference would outlive our letting go.
    fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| Failure::Failed(format!("cannot set close-on-exec on the handle: {e}")))?;
    let handle = pipe::Receiver::from_owned_fd(fd)
        .map_err(|e| Failure::Failed(format!("cannot watch the handle: {e}")))?;
    eprintln!("holding {label} ({reason:?})");

    if args.command.is_empty() {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                eprintln!("interrupted: releasing {label}");
                Ok(0)
            }
            why = release_requested(&mut requests) => {
                eprintln!("release requested ({why}): releasing {label}");
                Ok(0)
            }
            () = revoked(&handle) => Err(Failure::Failed(format!(
                "the daemon revoked the reference on {label}"
            ))),
        }
    } else {
        let mut child = tokio::process::Command::new(&args.command[0])
            .args(&args.command[1..])
            .spawn()
            .map_err(|e| Failure::Failed(format!("cannot run {}: {e}", args.command[0])))?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw);
        let mut watching_handle = true;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                why = release_requested(&mut requests) => {
                    eprintln!("release requested ({why}): stopping {} (SIGTERM), then releasing {label}", args.command[0]);
                    if let Some(pid) = pid {
                        let _ = kill(pid, Signal::SIGTERM);
                    }
                    requests = None;
                }
                () = revoked(&handle), if watching_handle => {
                    eprintln!("warning: the daemon revoked the reference on {label}; {} keeps running", args.command[0]);
                    watching_handle = false;
                }
                _ = tokio::signal::ctrl_c() => {
                    // The terminal sent SIGINT to the command too; pass it
                    // on in case it did not, and wait for the command.
                    if let Some(pid) = pid {
                        let _ = kill(pid, Signal::SIGINT);
                    }
                }
            }
        };
        let status =
            status.map_err(|e| Failure::Failed(format!("waiting for the command: {e}")))?;
        drop(handle);
        use std::os::unix::process::ExitStatusExt;
        Ok(match (status.code(), status.signal()) {
            (Some(code), _) => u8::try_from(code).unwrap_or(1),
            (None, Some(sig)) => u8::try_from(128 + sig).unwrap_or(255),
            _ => 1,
        })
    }
}
