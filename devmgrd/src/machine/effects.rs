//! Carries out driver actions (the engine's effects) off the model owner's
//! path: each runs in its own task, so a slow or stuck driver action never
//! holds up another command, and its completion comes back to the owner as
//! an ordinary command (`Model::exit_finished`). A real action holds its
//! device's exclusive claim throughout (rule 19, `claim.rs`); a claim that
//! finds the device busy has the kernel users watcher look again, and the
//! removal waits for whom it finds (`Model::exit_busy`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use drivers::kernel::verbs;
use drivers::{ExitAction, ObjectId};
use tokio::sync::mpsc;

use crate::machine::{claim, users};
use crate::owner::handle::WeakModelHandle;

/// Work for the executor, as the owner hands it over.
pub enum Work {
    /// A driver action (`Effect::Exit`).
    Exit {
        /// The object waiting on it.
        id: ObjectId,
        /// The driver implementation that acts.
        driver: &'static str,
        /// What to do.
        action: ExitAction,
        /// The block devices of the object and below it (each object and
        /// node, whole disks first): claimed across the action, and looked
        /// at again if a claim finds one busy.
        devices: Vec<users::Node>,
    },
    /// Take away these kernel users (`Effect::Detach`, detach-mounts).
    Detach {
        /// The device.
        id: ObjectId,
        /// How to take each away.
        details: Vec<users::Detail>,
    },
}

/// How long a simulated SCSI delete takes: long enough that a client sees
/// the object `removing` while it runs, short enough for demos.
pub const SIM_DELETE_DELAY: Duration = Duration::from_millis(200);

/// What the executor may do to the machine.
#[derive(Clone, Debug)]
pub struct Actuation {
    /// Off (`--no-actuate`): real actions fail with a clear error instead.
    pub enabled: bool,
    /// Where sysfs is (`--sysfs-root`; tests point it at a fake tree).
    pub sysfs_root: PathBuf,
}

/// How a driver action ended, when it did not fail.
enum Completion {
    /// Done: the object may leave the model now.
    Done,
    /// Asked of the kernel: its own `remove` event will confirm it.
    AwaitKernel,
    /// Not done: the device turned out to be in use (rule 19).
    Busy(String),
}

/// Runs one driver action; the error is what the object's `LastError` shows.
async fn carry_out(
    driver: &str,
    action: &ExitAction,
    devices: &[users::Node],
    actuation: &Actuation,
) -> Result<Completion, String> {
    if driver == proto::SIM_SCSI_DRIVER && action.verb == "simulated-delete" {
        tokio::time::sleep(SIM_DELETE_DELAY).await;
        return Ok(Completion::Done);
    }
    let real = [verbs::LOOP_REMOVE, verbs::SCSI_DELETE, verbs::DRIVER_UNBIND];
    if !real.contains(&action.verb) {
        return Err(format!(
            "devmgrd has no executor for {driver}'s {} of {}",
            action.verb, action.target
        ));
    }
    if !actuation.enabled {
        return Err(format!(
            "not carried out: real actions are off (--no-actuate, or actuate = false): {} {}",
            action.verb, action.target
        ));
    }
    let (verb, target, root) = (
        action.verb,
        action.target.clone(),
        actuation.sysfs_root.clone(),
    );
    let disks: Vec<(PathBuf, users::DevNum)> = devices
        .iter()
        .filter(|d| d.whole_disk)
        .map(|d| (d.node.clone(), d.dev))
        .collect();
    tracing::debug!("{verb} {target}: the real removal starts");
    tokio::task::spawn_blocking(move || {
        // Held until the action is done: a mount attempted meanwhile fails.
        let claim = match claim::take(&disks) {
            Ok(claim) => claim,
            Err(claim::Refused::Busy(why)) => return Ok(Completion::Busy(why)),
            Err(claim::Refused::Failed(why)) => return Err(why),
        };
        match verb {
            verbs::LOOP_REMOVE => loop_remove(&target, claim),
            verbs::SCSI_DELETE => {
                let delete = in_sysfs(&root, &target).join("delete");
                std::fs::write(&delete, "1")
                    .map(|()| Completion::AwaitKernel)
                    .map_err(|e| format!("write 1 to {}: {e}", delete.display()))
            }
            _ => driver_unbind(&root, &target).map(|()| Completion::AwaitKernel),
        }
    })
    .await
    .map_err(|e| format!("{verb} of {}: {e}", action.target))?
}

/// `sys_path` (`/sys/…`) inside `root`.
fn in_sysfs(root: &Path, sys_path: &str) -> PathBuf {
    root.join(sys_path.trim_start_matches('/'))
}

/// Unbinds a device from its driver: its name into `<driver>/unbind`.
fn driver_unbind(root: &Path, sys_path: &str) -> Result<(), String> {
    let device = in_sysfs(root, sys_path);
    let driver = std::fs::canonicalize(device.join("driver"))
        .map_err(|e| format!("{} has no driver to unbind: {e}", device.display()))?;
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let unbind = driver.join("unbind");
    std::fs::write(&unbind, &name).map_err(|e| format!("write {name} to {}: {e}", unbind.display()))
}

nix::ioctl_write_int_bad!(loop_ctl_remove, 0x4C81);
nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);

/// Removes loop device `number`: detaches its backing file (LOOP_CLR_FD,
/// through the claimed node, so the file is let go of when the claim
/// closes), then, unbound, `LOOP_CTL_REMOVE` through /dev/loop-control
/// (the kernel refuses that while it is bound or open: udisks2's
/// Loop.Delete and `losetup -d` stop after the first step).
#[allow(unsafe_code)]
fn loop_remove(number: &str, claim: claim::Claim) -> Result<Completion, String> {
    use std::os::fd::AsRawFd;
    let n: i32 = number
        .parse()
        .map_err(|e| format!("loop device number {number:?}: {e}"))?;
    let started = std::time::Instant::now();
    if let Some(node) = claim.first() {
        // SAFETY: LOOP_CLR_FD takes no argument, on an fd that the claim
        // keeps open for the call.
        match unsafe { loop_clr_fd(node.as_raw_fd()) } {
            // ENXIO: nothing was bound.
            Ok(_) | Err(nix::errno::Errno::ENXIO) => {}
            Err(e) => return Err(format!("detach the backing file of loop{n}: {}", e.desc())),
        }
    }
    // Unbound now, a mount of it fails (no medium) without the claim.
    drop(claim);
    let detached = started.elapsed();
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| format!("open /dev/loop-control: {e}"))?;
    // systemd-udevd opens a changed loop device for a moment (blkid), which
    // makes the kernel answer EBUSY: retry that for about a second before
    // calling the device busy (a process holding it open keeps it so).
    let mut waited = Duration::ZERO;
    let mut pause = Duration::from_micros(500);
    let mut tries = 1;
    loop {
        // SAFETY: LOOP_CTL_REMOVE takes its argument by value (an int, no
        // pointer), on an fd that `control` keeps open for the call.
        match unsafe { loop_ctl_remove(control.as_raw_fd(), n) } {
            Ok(_) => {
                // What the kernel took (docs/benchmarks.md measures devmgrd's
                // share of a removal without it).
                tracing::debug!(
                    "loop{n} removed by the kernel in {:?}: LOOP_CLR_FD and close {detached:?}, \
                     LOOP_CTL_REMOVE after {tries} tries",
                    started.elapsed()
                );
                return Ok(Completion::AwaitKernel);
            }
            Err(nix::errno::Errno::EBUSY) if waited < Duration::from_secs(1) => {
                std::thread::sleep(pause);
                waited += pause;
                tries += 1;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(nix::errno::Errno::EBUSY) => {
                return Ok(Completion::Busy(format!(
                    "loop{n} is still open: the kernel refuses to remove it (EBUSY)"
                )))
            }
            Err(e) => {
                return Err(format!(
                    "remove loop{n} through /dev/loop-control: {}",
                    e.desc()
                ))
            }
        }
    }
}

/// Takes kernel users away (detach-mounts): each on a blocking thread; the
/// watcher reports them gone as the kernel lets go.
async fn detach(id: ObjectId, details: Vec<users::Detail>) {
    for detail in details {
        let done = tokio::task::spawn_blocking(move || users::detach::detach(&detail)).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(why)) => tracing::warn!("detaching a user of object {id}: {why}"),
            Err(e) => tracing::warn!("detaching a user of object {id}: {e}"),
        }
    }
}

/// Starts the executor; the owner sends it every effect its commands produce.
/// It holds the owner only weakly, so it never keeps a stopping daemon alive.
pub fn spawn(
    owner: WeakModelHandle,
    actuation: Actuation,
    watcher: Option<users::Handle>,
) -> mpsc::UnboundedSender<Work> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Work>();
    tokio::spawn(async move {
        while let Some(work) = rx.recv().await {
            let owner = owner.clone();
            let actuation = actuation.clone();
            let watcher = watcher.clone();
            tokio::spawn(async move {
                let (id, driver, action, devices) = match work {
                    Work::Exit {
                        id,
                        driver,
                        action,
                        devices,
                    } => (id, driver, action, devices),
                    Work::Detach { id, details } => return detach(id, details).await,
                };
                tracing::debug!(
                    "{driver}: {} {} for object {id}",
                    action.verb,
                    action.target
                );
                let result = match carry_out(driver, &action, &devices, &actuation).await {
                    // The kernel's `remove` event will finish it (rule 8's
                    // path: the object is exiting, so it simply goes).
                    Ok(Completion::AwaitKernel) => return,
                    Ok(Completion::Done) => Ok(()),
                    Ok(Completion::Busy(why)) => {
                        tracing::info!("{why}: the removal of object {id} waits for its users");
                        return busy(&owner, watcher.as_ref(), id, &devices, why).await;
                    }
                    Err(why) => {
                        tracing::warn!("{why}");
                        Err(why)
                    }
                };
                let Some(handle) = owner.upgrade() else {
                    return; // shutting down
                };
                match handle.call(move |m| m.exit_finished(id, result)).await {
                    Ok(Ok(())) | Err(_) => {}
                    // Gone meanwhile (forced, or the kernel removed it): nothing to finish.
                    Ok(Err(e)) => tracing::debug!("finishing {driver}'s action on {id}: {e}"),
                }
            });
        }
    });
    tx
}

/// Rule 19: the device was claimed after all. The watcher looks again at
/// everything about it (namespaces it does not follow yet included) and
/// records whom it finds; then the removal waits for them, or fails if
/// nobody can be named.
async fn busy(
    owner: &WeakModelHandle,
    watcher: Option<&users::Handle>,
    id: ObjectId,
    devices: &[users::Node],
    why: String,
) {
    let then: users::Then = Box::new(move |m| {
        let why = format!("{why}, and devmgrd cannot name who has it");
        if let Err(e) = m.exit_busy(id, why) {
            tracing::debug!("abandoning the action on {id}: {e}");
        }
    });
    let rescan = users::Command::Rescan {
        ids: devices.iter().map(|d| d.id).collect(),
        then,
    };
    // Without a watcher (none, or it failed), nobody more can be named:
    // the removal waits for whom the model knows, or fails.
    let unsent = match watcher {
        Some(w) => w.try_send(rescan).err(),
        None => Some(rescan),
    };
    if let Some(users::Command::Rescan { then, .. }) = unsent {
        if let Some(handle) = owner.upgrade() {
            let _ = handle.call(then).await;
        }
    }
}
