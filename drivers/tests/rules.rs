//! Data-driven tests of every lifecycle rule of DESIGN.md §2: runs the
//! scenarios in `rules.scenarios`, checking each step's exact events,
//! effects, result and the states that follow.
//!
//! Scenario syntax, one item a line:
//! - `## title` starts a scenario (a fresh model at time 0);
//! - `> step` runs an operation (see [`World::run`]);
//! - `= result` is the step's result (`ok`, `removed`, `pending: a b`, `err Kind`);
//! - `+ event` is the step's next event, in order; every event must be listed;
//! - `! effect` is the step's next effect, likewise;
//! - `#N` names the N-th object the scenario added;
//! - `? check` asserts on the model after the step (`state X S`, `absent X`,
//!   `refs X N`, `driver X D|-`, `error X text`, `count N`, `pending N`,
//!   `found KIND NAME X`).

use std::collections::HashMap;
use std::sync::Arc;

use drivers::{
    AddRequest, Effect, Event, Holder, Kind, Model, ObjectId, OnTimeout, ProbeOptions, RefId,
    RemoveOptions, RemoveOutcome,
};

struct World {
    model: Model,
    /// Object names as scenarios write them (a name may be reused after removal:
    /// the latest object with that name wins).
    ids: HashMap<String, ObjectId>,
    names: HashMap<ObjectId, String>,
    /// Every object ever added, in order: `#N` in a scenario is the N-th.
    order: Vec<ObjectId>,
    refs: HashMap<String, RefId>,
    ref_names: HashMap<RefId, String>,
    holder: Arc<Holder>,
    now: u64,
}

const SECOND: u64 = 1_000_000;

impl World {
    fn new() -> Self {
        World {
            model: Model::default(),
            ids: HashMap::new(),
            names: HashMap::new(),
            order: Vec::new(),
            refs: HashMap::new(),
            ref_names: HashMap::new(),
            holder: Arc::new(Holder {
                key: 1,
                bus_name: ":1.1".into(),
                uid: 1000,
                pid: 4242,
            }),
            now: 0,
        }
    }

    fn id(&self, name: &str) -> ObjectId {
        if let Some(raw) = name.strip_prefix('#') {
            let n: usize = raw.parse().expect("#N");
            return self.order[n - 1];
        }
        *self
            .ids
            .get(name)
            .unwrap_or_else(|| panic!("scenario names unknown object {name}"))
    }

    fn name(&self, id: ObjectId) -> String {
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("#{id}"))
    }

    /// Runs one step; returns its rendered result.
    fn run(&mut self, step: &str) -> String {
        let words: Vec<&str> = step.split_whitespace().collect();
        let flag = |f: &str| words.contains(&f);
        let opt = |k: &str| {
            words
                .iter()
                .find_map(|w| w.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
        };
        let result: Result<String, drivers::Error> = match words[0] {
            "add" => {
                let kind: Kind = words[1].parse().unwrap();
                let mut req = AddRequest::new(kind, words[2]);
                if let Some(p) = opt("parent") {
                    req = req.parent(self.id(p));
                }
                if let Some(d) = opt("driver") {
                    req = req.driver(self.id(d));
                }
                if let Some(n) = opt("luns") {
                    req = req.luns(n.parse().unwrap());
                }
                if let Some(mode) = opt("exit") {
                    req = req.attribute(drivers::sim_scsi::EXIT_ATTRIBUTE, mode);
                }
                if flag("udev") {
                    req.origin = drivers::Origin::Udev;
                    req.subsystem = "block".into();
                    req.sys_path = format!("/sys/devices/virtual/block/{}", words[2]);
                }
                // How the real device is removed: `handler=loop`, `scsi`,
                // `with-parent` (a partition) (drivers::kernel).
                if let Some(h) = opt("handler") {
                    req.handler = Some(format!("kernel-{h}"));
                }
                self.model.add(req).map(|_| "ok".into())
            }
            "acquire" => {
                let id = self.id(words[2]);
                self.model
                    .acquire(id, Arc::clone(&self.holder), "test", self.now)
                    .map(|r| {
                        self.refs.insert(words[1].to_owned(), r);
                        self.ref_names.insert(r, words[1].to_owned());
                        "ok".into()
                    })
            }
            "release" => {
                let r = self.refs.get(words[1]).copied().unwrap_or(RefId(u64::MAX));
                self.model.release(r).map(|()| "ok".into())
            }
            "remove" => {
                let timeout = opt("timeout").map(|t| {
                    let (secs, action) = t.split_once(':').unwrap();
                    let action: OnTimeout = action.parse().unwrap();
                    (secs.parse::<u64>().unwrap() * SECOND, action)
                });
                let options = RemoveOptions {
                    force: flag("force"),
                    dry_run: flag("dry-run"),
                    timeout,
                    detach_mounts: flag("detach-mounts"),
                };
                let id = self.id(words[1]);
                self.model.remove(id, options, self.now).map(|report| {
                    let pending: Vec<String> =
                        report.pending.iter().map(|p| self.name(p.id)).collect();
                    match report.outcome {
                        RemoveOutcome::Removed => "removed".into(),
                        RemoveOutcome::Pending => format!("pending: {}", pending.join(" ")),
                    }
                })
            }
            // `kernel-use k1 OBJ mount|swap|stacked|process REASON…`
            "kernel-use" => {
                let kind = match words[3] {
                    "mount" => drivers::KernelUse::Mount,
                    "swap" => drivers::KernelUse::Swap,
                    "stacked" => drivers::KernelUse::Stacked,
                    "process" => drivers::KernelUse::Process,
                    other => panic!("unknown kernel use {other}"),
                };
                let user = drivers::KernelUser {
                    kind,
                    uid: 0,
                    pid: 0,
                    reason: words[4..].join(" "),
                };
                let id = self.id(words[2]);
                self.model.kernel_use_began(id, user, self.now).map(|r| {
                    self.refs.insert(words[1].to_owned(), r);
                    self.ref_names.insert(r, words[1].to_owned());
                    "ok".into()
                })
            }
            "kernel-use-ended" => {
                let r = self.refs.get(words[1]).copied().unwrap_or(RefId(u64::MAX));
                self.model.kernel_use_ended(r).map(|()| "ok".into())
            }
            "exit-busy" => self
                .model
                .exit_busy(self.id(words[1]), words[2..].join(" "))
                .map(|()| "ok".into()),
            "stop" => self.model.stop(self.id(words[1])).map(|()| "ok".into()),
            "reenable" => self.model.reenable(self.id(words[1])).map(|()| "ok".into()),
            "bind" => {
                let options = ProbeOptions {
                    luns: opt("luns").map(|n| n.parse().unwrap()),
                };
                self.model
                    .bind(self.id(words[1]), self.id(words[2]), options)
                    .map(|()| "ok".into())
            }
            "unbind" => self
                .model
                .unbind(self.id(words[1]), flag("force"))
                .map(|()| "ok".into()),
            "kernel-removed" => self
                .model
                .kernel_removed(self.id(words[1]))
                .map(|()| "ok".into()),
            "exit-ok" => self
                .model
                .exit_finished(self.id(words[1]), Ok(()))
                .map(|()| "ok".into()),
            "exit-fail" => self
                .model
                .exit_finished(self.id(words[1]), Err(words[2..].join(" ")))
                .map(|()| "ok".into()),
            "later" => {
                self.now += words[1].parse::<u64>().unwrap() * SECOND;
                Ok("ok".into())
            }
            "wait" => {
                self.now += words[1].parse::<u64>().unwrap() * SECOND;
                Ok(format!("expired {}", self.model.tick(self.now)))
            }
            other => panic!("unknown step {other}"),
        };
        match result {
            Ok(text) => text,
            Err(e) => format!("err {}", e.kind),
        }
    }

    /// Renders (and learns names from) the step's events.
    fn render_events(&mut self) -> Vec<String> {
        let events = self.model.take_events();
        events
            .into_iter()
            .map(|e| match e {
                Event::Added(info) => {
                    self.ids.insert(info.name.to_string(), info.id);
                    self.names.insert(info.id, info.name.to_string());
                    self.order.push(info.id);
                    format!("added {} {}", info.kind, info.name)
                }
                Event::StateChanged { id, from, to } => {
                    format!("state {} {from}->{to}", self.name(id))
                }
                Event::Bound { id, driver } => {
                    format!("bound {} to {}", self.name(id), self.name(driver))
                }
                Event::Unbound { id, driver } => {
                    format!("unbound {} from {}", self.name(id), self.name(driver))
                }
                Event::Acquired {
                    id,
                    reference,
                    ref_count,
                } => format!(
                    "acquired {} {} ({ref_count})",
                    self.name(id),
                    self.rname(reference)
                ),
                Event::Released {
                    id,
                    reference,
                    ref_count,
                } => format!(
                    "released {} {} ({ref_count})",
                    self.name(id),
                    self.rname(reference)
                ),
                Event::Revoked {
                    id,
                    reference,
                    ref_count,
                } => format!(
                    "revoked {} {} ({ref_count})",
                    self.name(id),
                    self.rname(reference)
                ),
                Event::ReleaseRequested {
                    id,
                    waiting_for,
                    references,
                } => {
                    let mut names: Vec<String> =
                        references.iter().map(|r| self.rname(*r)).collect();
                    names.sort();
                    format!(
                        "release-requested {} for {} [{}]",
                        self.name(id),
                        self.name(waiting_for),
                        names.join(" ")
                    )
                }
                Event::ErrorChanged { id, error } => format!("error {} {error}", self.name(id)),
                Event::AttributesChanged { id, attributes } => {
                    format!("attributes {} {attributes:?}", self.name(id))
                }
                Event::Renamed { id, name, sys_path } => {
                    format!("renamed {} {name} {sys_path}", self.name(id))
                }
                Event::Removed { kind, name, .. } => format!("removed {kind} {name}"),
            })
            .collect()
    }

    fn rname(&self, r: RefId) -> String {
        self.ref_names
            .get(&r)
            .cloned()
            .unwrap_or_else(|| format!("ref#{r}"))
    }

    fn render_effects(&mut self) -> Vec<String> {
        self.model
            .take_effects()
            .into_iter()
            .map(|effect| match effect {
                Effect::Exit { id, driver, action } => {
                    format!("exit {} {driver} {}", self.name(id), action.verb)
                }
                Effect::Detach { id, references } => {
                    let mut names: Vec<String> =
                        references.iter().map(|r| self.rname(*r)).collect();
                    names.sort();
                    format!("detach {} [{}]", self.name(id), names.join(" "))
                }
            })
            .collect()
    }

    fn check(&self, check: &str) -> Result<(), String> {
        let w: Vec<&str> = check.split_whitespace().collect();
        let info = |name: &str| {
            self.model
                .get(self.id(name))
                .map_err(|e| format!("{name}: {e}"))
        };
        match w[0] {
            "state" => {
                let s = info(w[1])?.state;
                (s.as_str() == w[2])
                    .then_some(())
                    .ok_or(format!("{} is {s}", w[1]))
            }
            "absent" => match self.model.get(self.id(w[1])) {
                Err(e) if e.kind == drivers::ErrorKind::NotFound => Ok(()),
                other => Err(format!("{} is still there: {other:?}", w[1])),
            },
            "refs" => {
                let n = info(w[1])?.ref_count();
                (n.to_string() == w[2])
                    .then_some(())
                    .ok_or(format!("{} has {n} refs", w[1]))
            }
            "driver" => {
                let d = info(w[1])?.driver.map_or("-".to_owned(), |d| self.name(d));
                (d == w[2])
                    .then_some(())
                    .ok_or(format!("{} is bound to {d}", w[1]))
            }
            "error" => {
                let e = info(w[1])?.last_error.to_string();
                let want = w[2..].join(" ");
                (e == want)
                    .then_some(())
                    .ok_or(format!("{} has error {e:?}", w[1]))
            }
            "count" => {
                let n = self.model.object_count();
                (n.to_string() == w[1])
                    .then_some(())
                    .ok_or(format!("{n} objects"))
            }
            "pending" => {
                let n = self.model.pending_removals();
                (n.to_string() == w[1])
                    .then_some(())
                    .ok_or(format!("{n} pending"))
            }
            "holder" => {
                let r = self.refs.get(w[1]).copied().ok_or("unknown reference")?;
                let info = self.model.reference(r).map_err(|e| e.to_string())?;
                let got = format!(
                    "{} {} {} {} {} {}",
                    self.name(info.object),
                    info.holder.bus_name,
                    info.holder.uid,
                    info.holder.pid,
                    info.reason,
                    info.since
                );
                let want = w[2..].join(" ");
                (got == want)
                    .then_some(())
                    .ok_or(format!("holder is {got:?}"))
            }
            // `found KIND NAME OBJ`: looking NAME up finds OBJ (`#N`).
            "found" => {
                let kind: Kind = w[1].parse().unwrap();
                let found = self.model.find(kind, w[2]).map_err(|e| e.to_string())?;
                (found == self.id(w[3])).then_some(()).ok_or(format!(
                    "find {} {} gave {}",
                    w[1],
                    w[2],
                    self.name(found)
                ))
            }
            "find" => {
                let kind: Kind = w[1].parse().unwrap();
                let found = self.model.find(kind, w[2]).map_err(|e| e.to_string())?;
                (found == self.id(w[2]))
                    .then_some(())
                    .ok_or(format!("find {} {} gave {found}", w[1], w[2]))
            }
            other => panic!("unknown check {other}"),
        }
    }
}

struct Scenario {
    title: String,
    lines: Vec<(usize, String)>,
}

fn scenarios() -> Vec<Scenario> {
    let text = include_str!("rules.scenarios");
    let mut out: Vec<Scenario> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if let Some(title) = line.strip_prefix("## ") {
            out.push(Scenario {
                title: title.to_owned(),
                lines: Vec::new(),
            });
        } else if !line.trim().is_empty() && !line.starts_with("//") {
            out.last_mut()
                .expect("text before the first scenario")
                .lines
                .push((n + 1, line.to_owned()));
        }
    }
    out
}

/// Runs one scenario; returns the first mismatch.
fn play(s: &Scenario) -> Result<(), String> {
    let mut world = World::new();
    let mut i = 0;
    while i < s.lines.len() {
        let (line_no, line) = &s.lines[i];
        let step = line
            .strip_prefix("> ")
            .ok_or_else(|| format!("line {line_no}: expected a step, found {line:?}"))?;
        let result = world.run(step);
        let events = world.render_events();
        let effects = world.render_effects();
        let (mut want_result, mut want_events, mut want_effects) = (None, Vec::new(), Vec::new());
        i += 1;
        while i < s.lines.len() && !s.lines[i].1.starts_with("> ") {
            let (n, l) = &s.lines[i];
            if let Some(r) = l.strip_prefix("= ") {
                want_result = Some(r.to_owned());
            } else if let Some(e) = l.strip_prefix("+ ") {
                want_events.push(e.to_owned());
            } else if let Some(e) = l.strip_prefix("! ") {
                want_effects.push(e.to_owned());
            } else if let Some(c) = l.strip_prefix("? ") {
                world
                    .check(c)
                    .map_err(|e| format!("line {n} ({step}): check {c:?} failed: {e}"))?;
            } else {
                return Err(format!("line {n}: cannot read {l:?}"));
            }
            i += 1;
        }
        let want_result = want_result.unwrap_or_else(|| "ok".to_owned());
        if result != want_result {
            return Err(format!(
                "line {line_no} ({step}): result {result:?}, expected {want_result:?}\n  events: {events:#?}"
            ));
        }
        if events != want_events {
            return Err(format!(
                "line {line_no} ({step}): events differ\n  got:      {events:#?}\n  expected: {want_events:#?}"
            ));
        }
        if effects != want_effects {
            return Err(format!(
                "line {line_no} ({step}): effects differ\n  got:      {effects:#?}\n  expected: {want_effects:#?}"
            ));
        }
        world
            .model
            .check_invariants()
            .map_err(|e| format!("line {line_no} ({step}): invariant broken: {e}"))?;
    }
    Ok(())
}

#[test]
fn every_rule_scenario_gives_the_exact_states_and_events() {
    let all = scenarios();
    assert!(all.len() >= 16, "only {} scenarios", all.len());
    let failures: Vec<String> = all
        .iter()
        .filter_map(|s| play(s).err().map(|e| format!("## {}\n{e}", s.title)))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} scenarios failed:\n\n{}",
        failures.len(),
        all.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_rule_of_the_design_has_a_scenario() {
    let all = scenarios();
    for rule in 1..=20 {
        let tag = format!("rule {rule}:");
        assert!(
            all.iter().any(|s| s.title.starts_with(&tag)),
            "no scenario for {tag}"
        );
    }
}
