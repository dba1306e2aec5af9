//! Carries out driver actions (the engine's effects) off the model owner's
//! path: each runs in its own task, so a slow or stuck driver action never
//! holds up another command, and its completion comes back to the owner as
//! an ordinary command (`Model::exit_finished`).

use std::time::Duration;

use drivers::{Effect, ExitAction};
use tokio::sync::mpsc;

use crate::owner::WeakModelHandle;

/// How long a simulated SCSI delete takes: long enough that a client sees
/// the object `removing` while it runs, short enough for demos.
pub const SIM_DELETE_DELAY: Duration = Duration::from_millis(200);

/// Runs one driver action; the error is what the object's `LastError` shows.
async fn carry_out(driver: &str, action: &ExitAction) -> Result<(), String> {
    match (driver, action.verb) {
        (proto::SIM_SCSI_DRIVER, "simulated-delete") => {
            tokio::time::sleep(SIM_DELETE_DELAY).await;
            Ok(())
        }
        _ => Err(format!(
            "devmgrd has no executor for {driver}'s {} of {}",
            action.verb, action.target
        )),
    }
}

/// Starts the executor; the owner sends it every effect its commands produce.
/// It holds the owner only weakly, so it never keeps a stopping daemon alive.
pub fn spawn(owner: WeakModelHandle) -> mpsc::UnboundedSender<Effect> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Effect>();
    tokio::spawn(async move {
        while let Some(effect) = rx.recv().await {
            let owner = owner.clone();
            tokio::spawn(async move {
                let Effect::Exit { id, driver, action } = effect;
                tracing::debug!(
                    "{driver}: {} {} for object {id}",
                    action.verb,
                    action.target
                );
                let result = carry_out(driver, &action).await;
                if let Err(why) = &result {
                    tracing::warn!("{why}");
                }
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
