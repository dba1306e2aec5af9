//! The one owner of the device model: a task that runs every command against
//! the `Model` in arrival order, then hands the events it produced to the
//! event pump together with the command's reply, so a client never sees a
//! method reply before the signals and objects that the call caused.
//!
//! The way in, `ModelHandle`, is `handle.rs`: the adapters and the effects
//! executor depend on it, and only this task depends on them.

pub(crate) mod handle;

use drivers::{Event, ObjectId, ReferenceInfo};

use crate::state::persist::Change;
use handle::{now_micros, Deliver, Job, ModelHandle, Owned};
use tokio::sync::mpsc;

/// What the owner hands to the event pump after each command.
pub struct Batch {
    /// Events in causal order.
    pub events: Vec<Event>,
    /// Object count and pending removals after the command.
    pub counts: (u32, u32),
    /// The holders, after the command, of every object whose references changed.
    pub holders: std::collections::HashMap<ObjectId, Vec<ReferenceInfo>>,
    /// The commands' replies, in order, to send after the events are published.
    pub deliver: Vec<Deliver>,
    /// What must be durable before any of it is published (`--state-dir`).
    pub changes: Vec<Change>,
    /// It ends with a read: the pump publishes nothing after it before
    /// delivering the replies.
    pub ends_group: bool,
    /// The objects its commands were about, if each was about one object
    /// (`None`: some command concerned the whole model).
    pub about: Option<Vec<ObjectId>>,
    /// Its place in the owner's order (batches are numbered as made).
    pub seq: u64,
}

impl Batch {
    /// It ends with a read of the whole model (ListObjects, a count): it
    /// must see exactly what was published before it, so nothing overtakes
    /// it.
    pub fn ends_group_globally(&self) -> bool {
        self.ends_group && self.about.is_none()
    }
}

/// Most commands run between two publications (bounds how long the first
/// one's reply waits for the others).
const MAX_JOBS_PER_BATCH: usize = 256;

/// Starts the owner task; returns the handle and the stream of batches.
pub fn spawn(
    mut owned: Owned,
    actuation: crate::machine::effects::Actuation,
    watcher: Option<crate::machine::users::Handle>,
) -> (ModelHandle, mpsc::UnboundedReceiver<Batch>) {
    let (jobs_tx, mut jobs_rx) = mpsc::unbounded_channel::<Job>();
    let (batch_tx, batch_rx) = mpsc::unbounded_channel();
    let handle = ModelHandle { jobs: jobs_tx };
    let effects = crate::machine::effects::spawn(handle.downgrade(), actuation, watcher);
    tokio::spawn(async move {
        let mut seq = 0u64;
        loop {
            // Sleep until the next command or the next removal deadline
            // (rule 10), whichever comes first.
            let job: Job = match owned.model.next_deadline() {
                None => match jobs_rx.recv().await {
                    Some(job) => job,
                    None => break,
                },
                Some(deadline) => {
                    let wait =
                        std::time::Duration::from_micros(deadline.saturating_sub(now_micros()));
                    tokio::select! {
                        job = jobs_rx.recv() => match job {
                            Some(job) => job,
                            None => break,
                        },
                        () = tokio::time::sleep(wait) => Job {
                            run: Box::new(|o: &mut Owned| {
                                o.model.tick(now_micros());
                                Box::new(|| ()) as Deliver
                            }),
                            read: false,
                            about: None,
                        },
                    }
                }
            };
            // Run every command already queued (up to a bound) before
            // publishing: one holders snapshot per object for all of them.
            // A burst (thousands of holders dying at once) would otherwise
            // copy an object's whole holder list once per release.
            let mut ends_group = job.read;
            let mut about = job.about.map(|id| vec![id]);
            let mut deliver = vec![(job.run)(&mut owned)];
            while deliver.len() < MAX_JOBS_PER_BATCH && !ends_group {
                match jobs_rx.try_recv() {
                    Ok(job) => {
                        ends_group = job.read;
                        about = match (about, job.about) {
                            (Some(mut ids), Some(id)) => {
                                ids.push(id);
                                Some(ids)
                            }
                            _ => None,
                        };
                        deliver.push((job.run)(&mut owned));
                    }
                    Err(_) => break,
                }
            }
            seq += 1;
            let Owned {
                model,
                tracker,
                kernel,
            } = &mut owned;
            let mut events = model.take_events();
            // The tracker may act on the model too (a real device's admin
            // state from before a restart): it appends what that caused.
            let changes = match tracker {
                Some(tracker) => tracker.observe(model, &mut events, now_micros()),
                None => Vec::new(),
            };
            // The watcher follows the block devices the model holds.
            kernel.observe(&events);
            // Driver actions run elsewhere; their completion is a later command.
            for effect in model.take_effects() {
                let work = match effect {
                    drivers::Effect::Exit { id, driver, action } => {
                        crate::machine::effects::Work::Exit {
                            id,
                            driver,
                            action,
                            devices: crate::machine::users::nodes_under(model, id),
                        }
                    }
                    drivers::Effect::Detach { id, references } => {
                        crate::machine::effects::Work::Detach {
                            id,
                            details: kernel.details(id, &references),
                        }
                    }
                };
                let _ = effects.send(work);
            }
            let holders = events
                .iter()
                .filter_map(|e| match e {
                    Event::Acquired { id, .. }
                    | Event::Released { id, .. }
                    | Event::Revoked { id, .. } => Some(*id),
                    _ => None,
                })
                .collect::<std::collections::HashSet<_>>()
                .into_iter()
                .filter_map(|id| model.holders(id).ok().map(|h| (id, h)))
                .collect();
            let batch = Batch {
                events,
                holders,
                counts: (
                    u32::try_from(model.object_count()).unwrap_or(u32::MAX),
                    model.pending_removals(),
                ),
                deliver,
                changes,
                ends_group,
                about,
                seq,
            };
            if batch_tx.send(batch).is_err() {
                break;
            }
        }
    });
    (handle, batch_rx)
}

/// Records what the kernel users watcher reports (each device's users as
/// kernel-user references, then a rescan's continuation), in the order it
/// reported them, as many updates per command as are waiting.
pub async fn record_kernel_users(
    handle: ModelHandle,
    mut updates: mpsc::UnboundedReceiver<crate::machine::users::Update>,
) {
    while let Some(first) = updates.recv().await {
        let mut group = vec![first];
        while let Ok(more) = updates.try_recv() {
            group.push(more);
        }
        let recorded = handle.call_owned(move |owned| {
            let now = now_micros();
            for update in group {
                for report in update.reports {
                    owned.kernel.apply(&mut owned.model, report, now);
                }
                if let Some(then) = update.then {
                    then(&mut owned.model);
                }
            }
        });
        if recorded.await.is_err() {
            return; // shutting down
        }
    }
}
