//! Carries out driver actions (the engine's effects) off the model owner's
//! path: each runs in its own task, so a slow or stuck driver action never
//! holds up another command, and its completion comes back to the owner as
//! an ordinary command (`Model::exit_finished`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use drivers::kernel::verbs;
use drivers::{Effect, ExitAction};
use tokio::sync::mpsc;

use crate::owner::WeakModelHandle;

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
}

/// Runs one driver action; the error is what the object's `LastError` shows.
async fn carry_out(
    driver: &str,
    action: &ExitAction,
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
    tokio::task::spawn_blocking(move || match verb {
        verbs::LOOP_REMOVE => loop_remove(&target),
        verbs::SCSI_DELETE => {
            let delete = in_sysfs(&root, &target).join("delete");
            std::fs::write(&delete, "1")
                .map_err(|e| format!("write 1 to {}: {e}", delete.display()))
        }
        _ => driver_unbind(&root, &target),
    })
    .await
    .map_err(|e| format!("{verb} of {}: {e}", action.target))??;
    Ok(Completion::AwaitKernel)
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

/// `LOOP_CTL_REMOVE` of loop device `number` through /dev/loop-control.
#[allow(unsafe_code)]
fn loop_remove(number: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let n: i32 = number
        .parse()
        .map_err(|e| format!("loop device number {number:?}: {e}"))?;
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(|e| format!("open /dev/loop-control: {e}"))?;
    // systemd-udevd opens a new or changed loop device for a moment (blkid),
    // which makes the kernel answer EBUSY: retry that for about a second
    // before calling the device busy (a backing file keeps it so for good).
    let mut attempts = 0;
    loop {
        // SAFETY: LOOP_CTL_REMOVE takes its argument by value (an int, no
        // pointer), on an fd that `control` keeps open for the call.
        match unsafe { loop_ctl_remove(control.as_raw_fd(), n) } {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EBUSY) if attempts < 10 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(100));
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

/// Starts the executor; the owner sends it every effect its commands produce.
/// It holds the owner only weakly, so it never keeps a stopping daemon alive.
pub fn spawn(owner: WeakModelHandle, actuation: Actuation) -> mpsc::UnboundedSender<Effect> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Effect>();
    tokio::spawn(async move {
        while let Some(effect) = rx.recv().await {
            let owner = owner.clone();
            let actuation = actuation.clone();
            tokio::spawn(async move {
                let Effect::Exit { id, driver, action } = effect;
                tracing::debug!(
                    "{driver}: {} {} for object {id}",
                    action.verb,
                    action.target
                );
                let result = match carry_out(driver, &action, &actuation).await {
                    // The kernel's `remove` event will finish it (rule 8's
                    // path: the object is exiting, so it simply goes).
                    Ok(Completion::AwaitKernel) => return,
                    Ok(Completion::Done) => Ok(()),
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
