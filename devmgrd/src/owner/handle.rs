//! The way to the model's owner: `ModelHandle` (and its weak form, for
//! helpers that must not keep a stopping daemon alive) sends each command
//! as a job to the owner task, which runs it on what it owns (`Owned`) and
//! delivers the reply once the events it caused are published. Everything
//! that reaches the model (the bus, the machine's events, the effects
//! executor) holds one of these; the owner task itself (`owner/mod.rs`) is
//! the only code that runs jobs.

use drivers::{Model, ObjectId};

use crate::machine::users::Registry;
use crate::state::persist::Tracker;
use tokio::sync::{mpsc, oneshot};

/// Microseconds since the Unix epoch: the engine's "now".
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Delivers a command's reply once its events have been published.
pub type Deliver = Box<dyn FnOnce() + Send>;

/// What the owner owns: the model, and (with `--state-dir`) the tracker
/// that says what of each batch must be kept.
pub struct Owned {
    /// The device model.
    pub model: Model,
    /// What to keep across restarts, if anything is kept.
    pub tracker: Option<Tracker>,
    /// The kernel's users of real devices, as references (rule 17).
    pub kernel: Registry,
}

impl Owned {
    /// The owner's charge: `model`, and a tracker if state is kept.
    pub fn new(model: Model, tracker: Option<Tracker>) -> Owned {
        Owned {
            model,
            tracker,
            kernel: Registry::default(),
        }
    }
}

/// A command: runs on the model, returns how to deliver its reply.
pub(super) struct Job {
    pub(super) run: Box<dyn FnOnce(&mut Owned) -> Deliver + Send>,
    /// A read: its batch ends with it, and its group of batches too, so
    /// that what it read is exactly what has been published when its
    /// reply goes (a later command's signals never precede it).
    pub(super) read: bool,
    /// The one object a call on an object's path is about; `None`: the
    /// whole model (the manager's calls, the kernel's events, releases).
    /// The pump lets a call about one object overtake a big publication
    /// that does not concern it.
    pub(super) about: Option<ObjectId>,
}

/// A cheap, cloneable way to send commands to the owner.
#[derive(Clone)]
pub struct ModelHandle {
    pub(super) jobs: mpsc::UnboundedSender<Job>,
}

/// A [`ModelHandle`] that lets the owner stop once every strong one is gone.
#[derive(Clone)]
pub struct WeakModelHandle(mpsc::WeakUnboundedSender<Job>);

impl WeakModelHandle {
    /// A usable handle, unless the owner is stopping.
    pub fn upgrade(&self) -> Option<ModelHandle> {
        self.0.upgrade().map(|jobs| ModelHandle { jobs })
    }
}

/// The owner stopped (the daemon is shutting down).
#[derive(Debug)]
pub struct OwnerGone;

impl ModelHandle {
    /// A handle that does not keep the owner running (for helpers that
    /// must not hold up shutdown, such as the effects executor).
    pub fn downgrade(&self) -> WeakModelHandle {
        WeakModelHandle(self.jobs.downgrade())
    }

    /// Runs `f` on the model and returns its result, after the events it
    /// caused have been published on the bus.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Model) -> R + Send + 'static,
    ) -> Result<R, OwnerGone> {
        self.call_owned(move |owned| f(&mut owned.model)).await
    }

    /// Runs `f` on the model without changing it, and returns its result
    /// once everything before it has been published: what it read is
    /// what clients have been told, no more and no less.
    pub async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Model) -> R + Send + 'static,
    ) -> Result<R, OwnerGone> {
        self.send_job(move |owned| f(&owned.model), true, None)
            .await
    }

    /// [`ModelHandle::read`] of one object only: it may be answered while
    /// a big publication that does not concern `id` is still going out.
    pub async fn read_about<R: Send + 'static>(
        &self,
        id: ObjectId,
        f: impl FnOnce(&Model) -> R + Send + 'static,
    ) -> Result<R, OwnerGone> {
        self.send_job(move |owned| f(&owned.model), true, Some(id))
            .await
    }

    /// [`ModelHandle::call`] of a command about one object only (a call on
    /// its path): its events and reply may overtake a big publication
    /// that does not concern the objects its events name.
    pub async fn call_about<R: Send + 'static>(
        &self,
        id: ObjectId,
        f: impl FnOnce(&mut Model) -> R + Send + 'static,
    ) -> Result<R, OwnerGone> {
        self.send_job(move |owned| f(&mut owned.model), false, Some(id))
            .await
    }

    /// Same as `call`, with the tracker too (for what only the owner may
    /// tell it).
    pub async fn call_owned<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Owned) -> R + Send + 'static,
    ) -> Result<R, OwnerGone> {
        self.send_job(f, false, None).await
    }

    async fn send_job<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Owned) -> R + Send + 'static,
        read: bool,
        about: Option<ObjectId>,
    ) -> Result<R, OwnerGone> {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            run: Box::new(move |owned| {
                let result = f(owned);
                Box::new(move || {
                    // The caller may have gone away meanwhile; nothing to do then.
                    let _ = tx.send(result);
                })
            }),
            read,
            about,
        };
        self.jobs.send(job).map_err(|_| OwnerGone)?;
        rx.await.map_err(|_| OwnerGone)
    }
}
