//! The engine-commands interpreter shared by the fuzz target and by
//! drivers/tests/fuzz_regressions.rs: any bytes as a sequence of engine
//! commands (4 bytes each), real-device operations and quotas included;
//! panics if a command panics or breaks an invariant.
//!
//! Two dialects: [`Dialect::Kernel`] (what the fuzz target runs) adds the
//! kernel's users (rules 17–19: a user appears or goes, a claim finds the
//! device busy, `detach-mounts`, partitions that go with their disk) in
//! bytes that [`Dialect::Classic`] reads as before, so every regression
//! input saved before them still replays the sequence that once failed.

use std::sync::Arc;

use drivers::{
    AddRequest, Effect, Holder, KernelUse, KernelUser, Kind, Model, ObjectId, OnTimeout, Origin,
    RefId, RemoveOptions,
};

/// How bytes are read as commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// The commands before the kernel's users existed (regression inputs
    /// named `engine_commands-*`).
    #[allow(dead_code)] // the fuzz target runs the other; the replay, both
    Classic,
    /// Every command, the kernel's users included (inputs named
    /// `engine_commands-v2-*`).
    Kernel,
}

fn pick<T: Copy>(list: &[T], i: u8) -> Option<T> {
    (!list.is_empty()).then(|| list[usize::from(i) % list.len()])
}

/// Runs `data` as engine commands, checking the invariants after each;
/// `trace` prints each command and its events.
pub fn run(data: &[u8], trace: bool, dialect: Dialect) {
    let kernel = dialect == Dialect::Kernel;
    let mut m = Model::default();
    m.set_reference_quota(Some(6));
    m.set_added_quota(Some(12));
    m.set_object_limit(Some(64));
    let holders: Vec<Arc<Holder>> = (0..3)
        .map(|k| {
            Arc::new(Holder {
                key: k,
                bus_name: format!(":1.{k}"),
                uid: 0,
                pid: 1,
            })
        })
        .collect();
    let mut ids: Vec<ObjectId> = Vec::new();
    let mut refs: Vec<RefId> = Vec::new();
    let mut kernel_refs: Vec<RefId> = Vec::new();
    let mut exiting: Vec<ObjectId> = Vec::new();
    let mut now = 0u64;
    for (n, cmd) in data.chunks_exact(4).take(256).enumerate() {
        let (op, a, b, c) = (cmd[0] % 18, cmd[1], cmd[2], cmd[3]);
        let name = format!("o{n}");
        match op {
            0 => {
                let mut req = AddRequest::new(
                    Kind::Driver,
                    if c & 1 == 0 { "sim-scsi".into() } else { name },
                );
                req.added_by = Some(u64::from(b % 3));
                ids.extend(m.add(req).ok());
            }
            1 | 2 => {
                let mut req =
                    AddRequest::new(if op == 1 { Kind::Host } else { Kind::Device }, name);
                req.parent = pick(&ids, a).filter(|_| c & 1 == 1);
                req.driver = pick(&ids, b).filter(|_| c & 2 == 2);
                if c & 4 == 4 {
                    req.probe.luns = Some(u32::from(c >> 5));
                }
                if c & 8 == 8 {
                    req.origin = Origin::Udev;
                    req.subsystem = "block".into();
                    req.sys_path = format!("/sys/devices/virtual/block/o{n}");
                    // A partition: it goes with its disk.
                    let rides = kernel && a & 1 == 1 && req.parent.is_some();
                    req.handler = Some(
                        if rides {
                            drivers::kernel::WITH_PARENT
                        } else {
                            drivers::kernel::LOOP
                        }
                        .into(),
                    );
                } else {
                    req.added_by = Some(u64::from(b % 3));
                }
                if c & 16 == 16 {
                    req.attributes.insert(
                        "sim.exit".into(),
                        ["ok", "fail", "async"][usize::from(a % 3)].into(),
                    );
                }
                ids.extend(m.add(req).ok());
            }
            3 => {
                if let Some(id) = pick(&ids, a) {
                    let holder = holders[usize::from(b % 3)].clone();
                    refs.extend(m.acquire(id, holder, "fuzz", now).ok());
                }
            }
            4 => {
                if let Some(r) = pick(&refs, a) {
                    let _ = m.release(r);
                }
            }
            5 => {
                if let Some(id) = pick(&ids, a) {
                    let options = RemoveOptions {
                        force: c & 1 == 1,
                        dry_run: c & 2 == 2,
                        timeout: (c & 4 == 4).then(|| {
                            (
                                u64::from(b % 3) * 1_000_000,
                                if c & 8 == 8 {
                                    OnTimeout::Cancel
                                } else {
                                    OnTimeout::Revoke
                                },
                            )
                        }),
                        detach_mounts: kernel && c & 16 == 16,
                    };
                    let _ = m.remove(id, options, now);
                }
            }
            6 => drop(pick(&ids, a).map(|id| m.stop(id))),
            7 => drop(pick(&ids, a).map(|id| m.reenable(id))),
            8 => {
                if let (Some(id), Some(d)) = (pick(&ids, a), pick(&ids, b)) {
                    let options = drivers::ProbeOptions {
                        luns: (c & 1 == 1).then_some(u32::from(c >> 6)),
                    };
                    let _ = m.bind(id, d, options);
                }
            }
            9 => drop(pick(&ids, a).map(|id| m.unbind(id, c & 1 == 1))),
            10 => drop(pick(&ids, a).map(|id| m.kernel_removed(id))),
            11 => {
                if let Some(id) = pick(&exiting, a) {
                    let result = if c & 1 == 1 {
                        Ok(())
                    } else {
                        Err("fuzzed failure".to_owned())
                    };
                    let _ = m.exit_finished(id, result);
                }
            }
            12 => {
                now += u64::from(a) * 100_000;
                m.tick(now);
            }
            13 => {
                if let (Some(id), Some(d)) = (pick(&ids, a), pick(&ids, b)) {
                    let _ = m.kernel_bound(id, d);
                }
            }
            14 => drop(pick(&ids, a).map(|id| m.kernel_unbound(id))),
            15 => {
                if let Some(id) = pick(&ids, a) {
                    let new = format!("r{n}");
                    let _ = m.kernel_renamed(
                        id,
                        if c & 1 == 1 { &new } else { "o0" },
                        "/sys/devices/x",
                    );
                }
            }
            16 => {
                if let Some(id) = pick(&ids, a) {
                    let mut attributes = std::collections::BTreeMap::new();
                    attributes.insert(format!("k{b}"), format!("v{c}"));
                    let _ = m.set_attributes(id, attributes);
                }
            }
            _ if kernel && a % 4 == 1 => {
                if let Some(id) = pick(&ids, b) {
                    let user = KernelUser {
                        kind: KernelUse::ALL[usize::from(c % 4)],
                        uid: 0,
                        pid: u32::from(c),
                        reason: "fuzz".into(),
                    };
                    kernel_refs.extend(m.kernel_use_began(id, user, now).ok());
                }
            }
            _ if kernel && a % 4 == 2 => {
                if let Some(r) = pick(&kernel_refs, b) {
                    let _ = m.kernel_use_ended(r);
                }
            }
            _ if kernel && a % 4 == 3 => {
                if let Some(id) = pick(&exiting, b) {
                    let _ = m.exit_busy(id, "fuzzed claim".to_owned());
                }
            }
            _ => {
                let quota = (c & 1 == 1).then_some(u32::from(b % 8));
                m.set_reference_quota(quota);
            }
        }
        for effect in m.take_effects() {
            match effect {
                Effect::Exit { id, .. } => exiting.push(id),
                // The watcher would see the mounts go and the swap end.
                // Only mounts and swap are detached (rule 18).
                Effect::Detach { references, .. } => {
                    for r in references {
                        let kind = m.reference(r).ok().and_then(|i| i.kernel);
                        if !kind.is_some_and(KernelUse::detachable) {
                            panic!("after command {n} ({cmd:?}): detach of {r:?}, a {kind:?}");
                        }
                        let _ = m.kernel_use_ended(r);
                    }
                }
            }
        }
        let events = m.take_events();
        if trace {
            eprintln!("{n}: {cmd:?} -> {events:?}");
        }
        if let Err(e) = m.check_invariants() {
            panic!("after command {n} ({cmd:?}): {e}");
        }
    }
}
