//! Model-based property test: random sequences of every engine operation,
//! checked after every step against a shadow built only from the events the
//! engine emitted, plus the engine's own from-scratch recount.
//!
//! Checked after every step:
//! - nothing is removed while referenced unless the step revoked the references;
//! - a parent is removed only after all its descendants;
//! - a `removing` object is never idle (it completes exactly when it becomes idle)
//!   and never removed before it is idle;
//! - re-enable / stop cancel exactly what their removal caused;
//! - ids are never reused, and stale ids are rejected;
//! - the kernel's users (rule 17) keep an object exactly as references do,
//!   `force` never revokes them (rule 18), and a partition that goes with
//!   its disk never keeps the disk from going;
//! - every visible state change emits exactly one event, and nothing else does;
//! - no reference points to a removed object; every count agrees with a recount.
//!
//! 10,000 sequences per run (override with `PROPTEST_CASES`). `MB_TRACE=1`
//! prints every operation with its events and effects (for replaying a
//! shrunk case such as the regression tests at the end).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use drivers::{
    AddRequest, Effect, ErrorKind, Event, Holder, KernelUse, KernelUser, Kind, Model, ObjectId,
    OnTimeout, Origin, ProbeOptions, RefId, RemoveOptions, State,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    AddDriver {
        sim: bool,
    },
    AddHost {
        driver: Option<u16>,
        luns: u8,
        exit: u8,
        udev: bool,
    },
    AddDevice {
        parent: u16,
        udev: bool,
    },
    /// A real block device: a loop disk, or (with a parent) a partition
    /// that the kernel removes with its disk.
    AddDisk {
        parent: Option<u16>,
    },
    /// The kernel reports a user of a real device (rule 17).
    KernelUse {
        object: u16,
        kind: u8,
    },
    /// The kernel reports that one of them went.
    KernelUseEnded {
        which: u16,
    },
    /// A driver action found its device claimed (rule 19).
    ExitBusy {
        which: u16,
    },
    Acquire {
        object: u16,
    },
    Release {
        reference: u16,
    },
    Remove {
        object: u16,
        force: bool,
        dry_run: bool,
        timeout: Option<(u8, bool)>,
        detach: bool,
    },
    Stop {
        object: u16,
    },
    Reenable {
        object: u16,
    },
    Bind {
        object: u16,
        driver: u16,
        luns: u8,
    },
    Unbind {
        object: u16,
        force: bool,
    },
    KernelRemoved {
        object: u16,
    },
    ExitFinished {
        which: u16,
        ok: bool,
    },
    Tick {
        seconds: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let idx = any::<u16>;
    prop_oneof![
        1 => any::<bool>().prop_map(|sim| Op::AddDriver { sim }),
        3 => (proptest::option::of(idx()), 0u8..4, 0u8..4, any::<bool>())
            .prop_map(|(driver, luns, exit, udev)| Op::AddHost { driver, luns, exit, udev }),
        4 => (idx(), any::<bool>()).prop_map(|(parent, udev)| Op::AddDevice { parent, udev }),
        6 => idx().prop_map(|object| Op::Acquire { object }),
        5 => idx().prop_map(|reference| Op::Release { reference }),
        2 => proptest::option::weighted(0.6, idx()).prop_map(|parent| Op::AddDisk { parent }),
        3 => (idx(), 0u8..4).prop_map(|(object, kind)| Op::KernelUse { object, kind }),
        2 => idx().prop_map(|which| Op::KernelUseEnded { which }),
        1 => idx().prop_map(|which| Op::ExitBusy { which }),
        4 => (idx(), prop::bool::weighted(0.15), prop::bool::weighted(0.1),
              proptest::option::weighted(0.2, (1u8..5, any::<bool>())), prop::bool::weighted(0.15))
            .prop_map(|(object, force, dry_run, timeout, detach)| Op::Remove { object, force, dry_run, timeout, detach }),
        2 => idx().prop_map(|object| Op::Stop { object }),
        3 => idx().prop_map(|object| Op::Reenable { object }),
        2 => (idx(), idx(), 0u8..3).prop_map(|(object, driver, luns)| Op::Bind { object, driver, luns }),
        1 => (idx(), any::<bool>()).prop_map(|(object, force)| Op::Unbind { object, force }),
        2 => idx().prop_map(|object| Op::KernelRemoved { object }),
        2 => (idx(), prop::bool::weighted(0.7)).prop_map(|(which, ok)| Op::ExitFinished { which, ok }),
        1 => (1u8..4).prop_map(|seconds| Op::Tick { seconds }),
    ]
}

/// What the test knows, learned only from events.
#[derive(Default)]
struct Shadow {
    /// Every id ever handed out, in order (including removed ones).
    all_ids: Vec<ObjectId>,
    seen_ids: HashSet<ObjectId>,
    kinds: HashMap<ObjectId, Kind>,
    parent: HashMap<ObjectId, ObjectId>,
    /// Which driver each object is bound to.
    bound_to: HashMap<ObjectId, ObjectId>,
    alive: HashSet<ObjectId>,
    refs: HashMap<ObjectId, HashSet<RefId>>,
    /// References handed out (some since released).
    all_refs: Vec<RefId>,
    /// The kernel's users among them (some since gone).
    kernel_refs: Vec<RefId>,
    live_refs: HashSet<RefId>,
    /// Objects waiting on a driver action.
    exiting: Vec<ObjectId>,
    /// Which remove step last made an object removing / held back.
    /// The remove steps that disabled each object (held back or made it
    /// removing), oldest first; a step leaves the stack when its removal ends.
    cause: HashMap<ObjectId, Vec<u64>>,
    /// When each remove step's deadline falls, if it has one: the request
    /// ends then, whatever happens to its root.
    deadline_of: HashMap<u64, u64>,
    /// The root object of each remove step, and its cancel deadline.
    serial_root: HashMap<u64, ObjectId>,
    /// The remove step that made each of the engine's requests.
    request_serial: HashMap<drivers::RequestId, u64>,
}

fn pick<T: Copy>(items: &[T], i: u16) -> Option<T> {
    (!items.is_empty()).then(|| items[usize::from(i) % items.len()])
}

struct Run {
    model: Model,
    shadow: Shadow,
    holder: Arc<Holder>,
    now: u64,
    step: u64,
}

const SECOND: u64 = 1_000_000;

impl Run {
    fn new() -> Self {
        // A per-holder quota far above what a sequence takes, so that every
        // step also checks the per-holder count against a recount.
        let mut model = Model::default();
        model.set_reference_quota(Some(1 << 20));
        Run {
            model,
            shadow: Shadow::default(),
            holder: Arc::new(Holder {
                key: 7,
                bus_name: ":1.7".into(),
                uid: 0,
                pid: 1,
            }),
            now: 0,
            step: 0,
        }
    }

    /// The mounts and swap on `id` and everything below it.
    fn detachable_below(&self, id: ObjectId) -> HashSet<RefId> {
        let mut found = HashSet::new();
        let mut stack = vec![id];
        while let Some(next) = stack.pop() {
            for r in self.model.holders(next).unwrap_or_default() {
                if r.kernel.is_some_and(KernelUse::detachable) {
                    found.insert(r.id);
                }
            }
            stack.extend(self.model.children(next).unwrap_or_default());
        }
        found
    }

    fn states(&self) -> HashMap<ObjectId, State> {
        self.model
            .list()
            .into_iter()
            .map(|o| (o.id, o.state))
            .collect()
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        self.step += 1;
        let before = self.states();
        let ids = self.shadow.all_ids.clone();
        let drivers: Vec<ObjectId> = ids
            .iter()
            .copied()
            .filter(|id| self.shadow.kinds.get(id) == Some(&Kind::Driver))
            .collect();
        let mut cancelled_root: Option<ObjectId> = None;
        let mut cancelled_request: Option<drivers::RequestId> = None;
        let mut remove_serial: Option<u64> = None;
        // Rule 18: only a removal with detach-mounts detaches, and it
        // detaches every mount and swap below its root (the affected set
        // holds at least that subtree), nothing else.
        let mut detach_allowed = false;
        let mut detach_expected: HashSet<RefId> = HashSet::new();
        let outcome: Result<(), drivers::Error> = match *op {
            Op::AddDriver { sim } => {
                let name = if sim {
                    "sim-scsi".to_owned()
                } else {
                    format!("drv{}", self.step)
                };
                self.model
                    .add(AddRequest::new(Kind::Driver, name))
                    .map(drop)
            }
            Op::AddHost {
                driver,
                luns,
                exit,
                udev,
            } => {
                let mut req = AddRequest::new(Kind::Host, format!("host{}", self.step));
                if let Some(d) = driver.and_then(|d| pick(&drivers, d)) {
                    req = req.driver(d);
                    if luns > 0 {
                        req = req.luns(u32::from(luns));
                    }
                }
                let mode = ["ok", "ok", "fail", "async"][usize::from(exit % 4)];
                req = req.attribute(drivers::sim_scsi::EXIT_ATTRIBUTE, mode);
                if udev {
                    req.origin = Origin::Udev;
                }
                self.model.add(req).map(drop)
            }
            Op::AddDevice { parent, udev } => {
                let mut req = AddRequest::new(Kind::Device, format!("dev{}", self.step));
                if let Some(p) = pick(&ids, parent) {
                    req = req.parent(p);
                }
                if udev {
                    req.origin = Origin::Udev;
                }
                self.model.add(req).map(drop)
            }
            Op::AddDisk { parent } => {
                // Mostly loop devices; now and then one whose removal fails.
                let name = if self.step.is_multiple_of(4) {
                    "disk"
                } else {
                    "loop"
                };
                let mut req = AddRequest::new(Kind::Device, format!("{name}{}", self.step));
                req.origin = Origin::Udev;
                req.subsystem = "block".into();
                req.handler = Some(drivers::kernel::LOOP.into());
                if let Some(p) = parent.and_then(|p| pick(&ids, p)) {
                    req = req.parent(p);
                    req.handler = Some(drivers::kernel::WITH_PARENT.into());
                }
                self.model.add(req).map(drop)
            }
            Op::KernelUse { object, kind } => match pick(&ids, object) {
                None => Ok(()),
                Some(id) => {
                    let user = KernelUser {
                        kind: KernelUse::ALL[usize::from(kind % 4)],
                        uid: 0,
                        pid: 0,
                        reason: "mounted at /prop (ext4)".into(),
                    };
                    let result = self.model.kernel_use_began(id, user, self.now);
                    if let Ok(r) = &result {
                        self.shadow.kernel_refs.push(*r);
                    }
                    result.map(drop)
                }
            },
            Op::KernelUseEnded { which } => match pick(&self.shadow.kernel_refs, which) {
                None => Ok(()),
                Some(r) => {
                    let live = self.shadow.live_refs.contains(&r);
                    let result = self.model.kernel_use_ended(r);
                    if !live {
                        prop_assert_eq!(
                            result.as_ref().map_err(|e| e.kind),
                            Err(ErrorKind::NotFound)
                        );
                    }
                    result
                }
            },
            Op::ExitBusy { which } => match pick(&self.shadow.exiting, which) {
                None => Ok(()),
                Some(id) => {
                    let result = self.model.exit_busy(id, "claimed".to_owned());
                    if result.is_ok() {
                        // Abandoned or failed: either way no action is in flight.
                        self.shadow.exiting.retain(|x| *x != id);
                    }
                    result
                }
            },
            Op::Acquire { object } => match pick(&ids, object) {
                None => Ok(()),
                Some(id) => self
                    .model
                    .acquire(id, Arc::clone(&self.holder), "prop", self.now)
                    .map(drop),
            },
            Op::Release { reference } => match pick(&self.shadow.all_refs, reference) {
                None => Ok(()),
                Some(r) => {
                    let live = self.shadow.live_refs.contains(&r);
                    let result = self.model.release(r);
                    if !live {
                        prop_assert_eq!(
                            result.as_ref().map_err(|e| e.kind),
                            Err(ErrorKind::NotFound)
                        );
                    }
                    result
                }
            },
            Op::Remove {
                object,
                force,
                dry_run,
                timeout,
                detach,
            } => match pick(&ids, object) {
                None => Ok(()),
                Some(id) => {
                    let timeout = timeout.map(|(s, revoke)| {
                        (
                            u64::from(s) * SECOND,
                            if revoke {
                                OnTimeout::Revoke
                            } else {
                                OnTimeout::Cancel
                            },
                        )
                    });
                    let options = RemoveOptions {
                        force,
                        dry_run,
                        timeout,
                        detach_mounts: detach,
                    };
                    // Removing a root that is already pending joins its
                    // request (rule 16): the same serial, not a new one.
                    let ongoing = (before.get(&id) == Some(&State::Removing))
                        .then(|| {
                            self.shadow.cause.get(&id).and_then(|stack| {
                                stack
                                    .iter()
                                    .rev()
                                    .find(|s| self.shadow.serial_root.get(s) == Some(&id))
                                    .copied()
                            })
                        })
                        .flatten();
                    let below = self.detachable_below(id);
                    let result = self.model.remove(id, options, self.now);
                    if result.is_ok() && detach && !dry_run {
                        detach_allowed = true;
                        detach_expected = below;
                    }
                    if let (Ok(_), false) = (&result, dry_run) {
                        let serial = ongoing.unwrap_or(self.step);
                        remove_serial = Some(serial);
                        self.shadow.serial_root.insert(serial, id);
                        if let Ok(Some(req)) = self.model.removal_request(id) {
                            self.shadow.request_serial.entry(req).or_insert(serial);
                        }
                        // A new request takes the deadline; a repeat only with force.
                        if let Some((after, _)) = timeout.filter(|_| ongoing.is_none() || force) {
                            self.shadow.deadline_of.insert(serial, self.now + after);
                        }
                    }
                    result.map(drop)
                }
            },
            Op::Stop { object } => match pick(&ids, object) {
                None => Ok(()),
                Some(id) => {
                    cancelled_root = Some(id);
                    cancelled_request = self.model.removal_request(id).ok().flatten();
                    self.model.stop(id)
                }
            },
            Op::Reenable { object } => match pick(&ids, object) {
                None => Ok(()),
                Some(id) => {
                    cancelled_root = Some(id);
                    cancelled_request = self.model.removal_request(id).ok().flatten();
                    self.model.reenable(id)
                }
            },
            Op::Bind {
                object,
                driver,
                luns,
            } => match (pick(&ids, object), pick(&drivers, driver)) {
                (Some(id), Some(d)) => {
                    let luns = (luns > 0).then_some(u32::from(luns));
                    self.model.bind(id, d, ProbeOptions { luns })
                }
                _ => Ok(()),
            },
            Op::Unbind { object, force } => match pick(&ids, object) {
                None => Ok(()),
                Some(id) => self.model.unbind(id, force),
            },
            Op::KernelRemoved { object } => match pick(&ids, object) {
                None => Ok(()),
                Some(id) => self.model.kernel_removed(id),
            },
            Op::ExitFinished { which, ok } => match pick(&self.shadow.exiting, which) {
                None => Ok(()),
                Some(id) => {
                    let result = if ok {
                        Ok(())
                    } else {
                        Err("simulated failure".to_owned())
                    };
                    // Whatever the outcome, no driver action is in flight for it any more.
                    self.shadow.exiting.retain(|x| *x != id);
                    self.model.exit_finished(id, result)
                }
            },
            Op::Tick { seconds } => {
                self.now += u64::from(seconds) * SECOND;
                self.model.tick(self.now);
                Ok(())
            }
        };
        let events = self.model.take_events();
        let effects = self.model.take_effects();
        if std::env::var_os("MB_TRACE").is_some() {
            eprintln!("{op:?} -> {outcome:?}\n  events {events:?}\n  effects {effects:?}");
        }
        if let Err(e) = &outcome {
            prop_assert!(
                events.is_empty(),
                "refused op {op:?} ({e}) emitted {events:?}"
            );
            prop_assert!(effects.is_empty(), "refused op {op:?} produced effects");
        }
        self.check_events(op, &before, &events, remove_serial)?;
        // A pending driver removal holds back whatever is still bound to it,
        // even an object whose state does not change (already removing).
        if let (Some(serial), Op::Remove { .. }) = (remove_serial, op) {
            let root = self.shadow.serial_root[&serial];
            if self.model.state(root).ok() == Some(State::Removing) {
                let held: Vec<ObjectId> = self
                    .shadow
                    .bound_to
                    .iter()
                    .filter(|(_, d)| **d == root)
                    .map(|(id, _)| *id)
                    .collect();
                for id in held {
                    let stack = self.shadow.cause.entry(id).or_default();
                    if !stack.contains(&serial) {
                        stack.push(serial);
                    }
                }
            }
        }
        if outcome.is_ok() {
            if let Some(root) = cancelled_root {
                self.check_cancel(root, cancelled_request, &before, &events)?;
            }
        }
        self.follow_transfers();
        let mut detached = Vec::new();
        for effect in effects {
            match effect {
                Effect::Exit { id, .. } => self.shadow.exiting.push(id),
                Effect::Detach { references, .. } => {
                    prop_assert!(detach_allowed, "a detach that {op:?} did not ask for");
                    for r in &references {
                        prop_assert!(
                            self.shadow.kernel_refs.contains(r),
                            "detach of a reference that is no kernel user"
                        );
                        let kind = self.model.reference(*r).ok().and_then(|i| i.kernel);
                        prop_assert!(
                            kind.is_some_and(KernelUse::detachable),
                            "detach of {kind:?}: processes and stacked devices are never taken away"
                        );
                    }
                    detached.extend(references);
                }
            }
        }
        let missed: Vec<&RefId> = detach_expected
            .iter()
            .filter(|r| !detached.contains(r))
            .collect();
        prop_assert!(missed.is_empty(), "{op:?} did not detach {missed:?}");
        self.shadow.exiting.retain(|id| self.model.contains(*id));
        self.model
            .check_invariants()
            .map_err(|e| TestCaseError::fail(format!("after {op:?}: {e}")))?;
        prop_assert_eq!(self.model.reference_count(), self.shadow.live_refs.len());
        prop_assert_eq!(self.model.object_count(), self.shadow.alive.len());
        // The kernel lets go of what was detached (lazily unmounted, swap
        // off), as the daemon's watcher then reports.
        for r in detached {
            if self.shadow.live_refs.contains(&r) {
                let which = self
                    .shadow
                    .kernel_refs
                    .iter()
                    .position(|x| *x == r)
                    .unwrap();
                self.apply(&Op::KernelUseEnded {
                    which: which as u16,
                })?;
            }
        }
        Ok(())
    }

    /// Replays the step's events into the shadow, checking each against it.
    fn check_events(
        &mut self,
        op: &Op,
        before: &HashMap<ObjectId, State>,
        events: &[Event],
        remove_serial: Option<u64>,
    ) -> Result<(), TestCaseError> {
        let mut changes: HashMap<ObjectId, Vec<(State, State)>> = HashMap::new();
        for event in events {
            let id = event.object();
            match event {
                Event::Added(info) => {
                    prop_assert!(
                        self.shadow.seen_ids.insert(info.id),
                        "id {} reused",
                        info.id
                    );
                    if let Some(&last) = self.shadow.all_ids.last() {
                        prop_assert!(info.id > last, "ids not increasing");
                    }
                    self.shadow.all_ids.push(info.id);
                    self.shadow.kinds.insert(info.id, info.kind);
                    self.shadow.alive.insert(info.id);
                    if let Some(p) = info.parent {
                        prop_assert!(
                            self.shadow.alive.contains(&p),
                            "child added under a removed parent"
                        );
                        self.shadow.parent.insert(info.id, p);
                    }
                }
                Event::StateChanged { id, from, to } => {
                    prop_assert!(self.shadow.alive.contains(id));
                    changes.entry(*id).or_default().push((*from, *to));
                    if let Some(serial) = remove_serial {
                        if *to == State::Removing || *to == State::Stopped {
                            self.shadow.cause.entry(*id).or_default().push(serial);
                        }
                    } else if *to == State::Removing && !before.contains_key(id) {
                        // A real device added under a parent being removed
                        // joins that removal: the parent's cause is its own.
                        // (The removal the parent is part of, not a
                        // driver's removal holding it back.)
                        let heir = self
                            .model
                            .removal_request(*id)
                            .ok()
                            .flatten()
                            .and_then(|req| self.shadow.request_serial.get(&req).copied());
                        if let Some(serial) = heir {
                            self.shadow.cause.entry(*id).or_default().push(serial);
                        }
                    }
                }
                Event::Acquired {
                    id,
                    reference,
                    ref_count,
                } => {
                    let set = self.shadow.refs.entry(*id).or_default();
                    prop_assert!(set.insert(*reference));
                    prop_assert_eq!(set.len() as u32, *ref_count);
                    self.shadow.all_refs.push(*reference);
                    self.shadow.live_refs.insert(*reference);
                }
                Event::Revoked { reference, .. } if self.shadow.kernel_refs.contains(reference) => {
                    prop_assert!(false, "force revoked kernel user {} ({:?})", reference, op);
                }
                Event::Released { reference, .. }
                    if self.shadow.kernel_refs.contains(reference)
                        && !matches!(op, Op::KernelUseEnded { .. }) =>
                {
                    prop_assert!(false, "kernel user {} ended by {:?}", reference, op);
                }
                Event::Released {
                    id,
                    reference,
                    ref_count,
                }
                | Event::Revoked {
                    id,
                    reference,
                    ref_count,
                } => {
                    let set = self.shadow.refs.entry(*id).or_default();
                    prop_assert!(
                        set.remove(reference),
                        "released a reference it did not hold"
                    );
                    prop_assert_eq!(set.len() as u32, *ref_count);
                    prop_assert!(self.shadow.live_refs.remove(reference));
                }
                Event::Removed { id, .. } => {
                    let held = self.shadow.refs.get(id).map_or(0, HashSet::len);
                    prop_assert_eq!(held, 0, "object {} removed while referenced ({:?})", id, op);
                    let orphans = self
                        .shadow
                        .alive
                        .iter()
                        .filter(|c| self.shadow.parent.get(c) == Some(id))
                        .count();
                    prop_assert_eq!(orphans, 0, "object {} removed before its children", id);
                    prop_assert!(self.shadow.alive.remove(id), "removed twice");
                    self.shadow.bound_to.remove(id);
                    prop_assert!(!self.model.contains(*id));
                }
                Event::Bound { id, driver } => {
                    self.shadow.bound_to.insert(*id, *driver);
                }
                Event::Unbound { id, .. } => {
                    self.shadow.bound_to.remove(id);
                }
                Event::ReleaseRequested { .. }
                | Event::ErrorChanged { .. }
                | Event::AttributesChanged { .. }
                | Event::Renamed { .. } => {
                    prop_assert!(self.shadow.alive.contains(&id) || self.model.contains(id));
                }
            }
        }
        // Exactly one StateChanged per visible change, chained from the old state.
        let after = self.states();
        for (id, state) in &after {
            let Some(old) = before.get(id) else {
                // A real device that appears under a parent being removed
                // joins that removal (rule 4) in the step that adds it:
                // one change, from live.
                let joined = self.model.get(*id).is_ok_and(|o| {
                    o.origin == Origin::Udev
                        && o.parent.and_then(|p| before.get(&p)) == Some(&State::Removing)
                });
                match changes.get(id).map(Vec::as_slice) {
                    None | Some([]) => {}
                    Some([(State::Live, to)]) if joined => prop_assert_eq!(to, state),
                    Some(other) => prop_assert!(
                        false,
                        "new object {} changed state in its own step: {:?}",
                        id,
                        other
                    ),
                }
                continue;
            };
            match changes.get(id).map(Vec::as_slice) {
                None | Some([]) => {
                    prop_assert_eq!(old, state, "object {} changed silently in {:?}", id, op)
                }
                Some([(from, to)]) => {
                    prop_assert_eq!(from, old);
                    prop_assert_eq!(to, state);
                    prop_assert_ne!(from, to);
                }
                // Several deadlines expiring in one tick are several
                // transitions; each must still chain from the one before.
                Some(many) if matches!(op, Op::Tick { .. }) => {
                    prop_assert_eq!(many[0].0, *old);
                    prop_assert_eq!(many[many.len() - 1].1, *state);
                    for pair in many.windows(2) {
                        prop_assert_eq!(
                            pair[0].1,
                            pair[1].0,
                            "broken chain for {}: {:?}",
                            id,
                            many
                        );
                    }
                    prop_assert!(many.iter().all(|(from, to)| from != to));
                }
                Some(many) => {
                    return Err(TestCaseError::fail(format!(
                        "object {id} got {} state events in one step of {op:?}: {many:?}",
                        many.len()
                    )))
                }
            }
        }
        Ok(())
    }

    /// Re-enable / stop of a removal's root undid exactly what that removal did.
    fn check_cancel(
        &self,
        root: ObjectId,
        cancelled: Option<drivers::RequestId>,
        before: &HashMap<ObjectId, State>,
        events: &[Event],
    ) -> Result<(), TestCaseError> {
        let Some(&serial) = self.shadow.cause.get(&root).and_then(|stack| {
            stack
                .iter()
                .rev()
                .find(|s| self.shadow.serial_root.get(s) == Some(&root))
        }) else {
            return Ok(());
        };
        if before.get(&root) != Some(&State::Removing) {
            return Ok(());
        }
        let touched = |id: &ObjectId| {
            self.shadow
                .cause
                .get(id)
                .is_some_and(|stack| stack.contains(&serial))
        };
        for event in events {
            if let Event::StateChanged { id, .. } = event {
                prop_assert!(
                    touched(id),
                    "cancelling {}'s removal changed {}, which another request caused",
                    root,
                    id
                );
            }
        }
        // Everything the removal still had disabled came back.
        for (id, old) in before {
            // Unless another pending removal needs it gone too (its parent's,
            // or the removal of the driver whose scan created it): then it
            // passes to that request, never staying in the cancelled one.
            let now_in = self.model.removal_request(*id).ok().flatten();
            prop_assert!(
                now_in.is_none() || now_in != cancelled,
                "object {} still in the cancelled request",
                id
            );
            if touched(id)
                && *old == State::Removing
                && !self.shadow.exiting.contains(id)
                && self.model.contains(*id)
                && now_in.is_none()
            {
                prop_assert_ne!(
                    self.model.state(*id).ok(),
                    Some(State::Removing),
                    "object {} still removing after its removal ({}) was cancelled",
                    id,
                    root
                );
            }
        }
        Ok(())
    }

    /// A removal that ended without completing (cancelled by a call or a
    /// deadline, or its driver root vanished in the kernel) leaves the causes
    /// of what it covered. What stays `removing` without an event was needed
    /// by another pending removal too: it now belongs to its parent's removal
    /// (or to the driver removal holding the parent back).
    fn follow_transfers(&mut self) {
        let now = self.now;
        let active: HashSet<u64> = self
            .shadow
            .serial_root
            .iter()
            .filter(|(_, root)| self.model.state(**root).ok() == Some(State::Removing))
            .filter(|(serial, _)| self.shadow.deadline_of.get(serial).is_none_or(|t| *t > now))
            .map(|(serial, _)| *serial)
            .collect();
        for stack in self.shadow.cause.values_mut() {
            stack.retain(|s| active.contains(s));
        }
        // Parents resolve before their children: repeat until nothing moves.
        loop {
            let orphans: Vec<(ObjectId, u64)> = self
                .shadow
                .cause
                .iter()
                .filter(|(id, stack)| {
                    stack.is_empty() && self.model.state(**id).ok() == Some(State::Removing)
                })
                .filter_map(|(id, _)| {
                    let parent = self.shadow.parent.get(id)?;
                    Some((*id, *self.shadow.cause.get(parent)?.last()?))
                })
                .collect();
            if orphans.is_empty() {
                break;
            }
            for (id, heir) in orphans {
                self.shadow.cause.entry(id).or_default().push(heir);
            }
        }
    }
}

/// Whether something `id`'s removal waits on carries a failed driver action:
/// an object in its subtree, or (for a driver) an object bound to it or in
/// such an object's subtree, or what carries a riding partition away.
fn failed_below(model: &Model, id: ObjectId) -> bool {
    let all = model.list();
    let mut stack = vec![id];
    let mut seen = HashSet::new();
    while let Some(next) = stack.pop() {
        if !seen.insert(next) {
            continue;
        }
        let Ok(info) = model.get(next) else { continue };
        if !info.last_error.is_empty() {
            return true;
        }
        // A partition riding on its disk's removal waits on what the disk
        // waits on.
        if info.state == State::Removing {
            stack.extend(
                info.parent
                    .filter(|p| model.state(*p).ok() == Some(State::Removing)),
            );
        }
        stack.extend(model.children(next).unwrap_or_default());
        stack.extend(all.iter().filter(|o| o.driver == Some(next)).map(|o| o.id));
    }
    false
}

/// Runs `ops`, then releases every reference and finishes every exit, and
/// checks that nothing is left pending without a failed driver action.
fn run_to_quiescence(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut run = Run::new();
    for op in ops {
        run.apply(op)?;
    }
    // Releasing every reference, the kernel letting go of every device
    // and finishing every exit leaves nothing pending.
    for r in run.shadow.all_refs.clone() {
        if !run.shadow.live_refs.contains(&r) {
            continue;
        }
        match run.shadow.kernel_refs.iter().position(|x| *x == r) {
            Some(which) => run.apply(&Op::KernelUseEnded {
                which: which as u16,
            })?,
            None => run.apply(&Op::Release {
                reference: run.shadow.all_refs.iter().position(|x| *x == r).unwrap() as u16,
            })?,
        }
    }
    while let Some(&id) = run.shadow.exiting.first() {
        let which = run.shadow.exiting.iter().position(|x| *x == id).unwrap() as u16;
        run.apply(&Op::ExitFinished { which, ok: true })?;
    }
    // With nothing held, a removal can only still be pending because a
    // driver failed to tear down something below it (that object stays
    // `stopped` with its error and holds its ancestors until an operator
    // re-enables or forces them): never silently stuck.
    for info in run.model.list() {
        if info.state == State::Removing {
            prop_assert!(
                failed_below(&run.model, info.id),
                "{} {} still removing with nothing held and no failed driver action below it",
                info.kind,
                info.name
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 10_000,
        max_shrink_iters: 20_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operation_sequences_keep_every_lifecycle_invariant(ops in prop::collection::vec(op(), 1..80)) {
        run_to_quiescence(&ops)?;
    }
}

/// Found by a 300,000-case run: a driver whose removal waited on a bound host.
#[test]
fn regression_driver_removal_waiting_on_a_bound_host() {
    use Op::*;
    let host = || AddHost {
        driver: None,
        luns: 0,
        exit: 0,
        udev: false,
    };
    let ops = [
        host(),
        host(),
        AddDriver { sim: false },
        Acquire { object: 0 },
        AddDriver { sim: true },
        host(),
        AddDevice {
            parent: 44337,
            udev: false,
        },
        AddDevice {
            parent: 24877,
            udev: false,
        },
        AddHost {
            driver: Some(10159),
            luns: 3,
            exit: 0,
            udev: false,
        },
        AddDevice {
            parent: 5001,
            udev: true,
        },
        Acquire { object: 0 },
        AddDevice {
            parent: 63749,
            udev: false,
        },
        Acquire { object: 9899 },
        Bind {
            object: 15455,
            driver: 2747,
            luns: 2,
        },
        host(),
        host(),
        Bind {
            object: 64374,
            driver: 12845,
            luns: 0,
        },
        AddDriver { sim: false },
        Remove {
            object: 3011,
            force: false,
            dry_run: false,
            timeout: None,
            detach: false,
        },
    ];
    if let Err(e) = run_to_quiescence(&ops) {
        panic!("{e}");
    }
}
