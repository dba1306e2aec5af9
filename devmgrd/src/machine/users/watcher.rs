//! The watcher thread: blocked in poll(2) on everything that says a
//! device's users changed (each mount namespace's mountinfo, /proc/swaps,
//! fanotify, the process connector, the pidfds of namespaces and holders),
//! it keeps the tables of who uses what and reports each followed device's
//! users whenever they differ from what it reported last. While nothing
//! changes it costs nothing: no timer wakes it (but the bounded re-check of
//! processes.rs when fanotify is missing).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use drivers::{KernelUse, Model, ObjectId};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::sync::mpsc::UnboundedSender;

use super::cnproc::{ProcConnector, ProcEvent};
use super::namespaces::Namespaces;
use super::processes::{block_device, Processes};
use super::{stacked, swaps, Detail, DevNum, Device, Found, Report, UserKey};

/// How long after a namespace's mounts change they are read: what changes
/// meanwhile is read with them.
const MOUNTS_SETTLE: std::time::Duration = std::time::Duration::from_millis(1);

/// A namespace's mounts are read at most once per this many times what
/// reading them took: the kernel writes the whole table for each read
/// (1.2 ms for 1,000 mounts here), so under a storm of mounts the watcher
/// spends at most a tenth of a core on it, and a change is seen later by
/// as much (12 ms with 1,000 mounts); a quiet namespace is read 1 ms after
/// it changes.
const MOUNTS_DUTY: u32 = 10;

/// Runs on the model once the reports of a rescan are recorded (how a real
/// action that found its device claimed explains itself: rule 19).
pub type Then = Box<dyn FnOnce(&mut Model) + Send>;

/// What the watcher is told.
pub enum Command {
    /// Follow this block device (it is in the model now).
    Track(Device),
    /// It left the model.
    Untrack(ObjectId),
    /// The kernel renamed it.
    Renamed { id: ObjectId, name: String },
    /// A block device had a uevent: what is stacked on what may have changed.
    Uevent { name: String },
    /// Look again at everything about these devices (namespaces not
    /// followed yet included), report, then run `then` on the model.
    Rescan { ids: Vec<ObjectId>, then: Then },
}

/// What the watcher sends to the owner: users to record, and maybe what
/// to do once they are.
pub struct Update {
    /// Devices whose users changed.
    pub reports: Vec<Report>,
    /// A rescan's continuation.
    pub then: Option<Then>,
}

/// A way to talk to the watcher thread.
#[derive(Clone)]
pub struct Handle {
    commands: Sender<Command>,
    wake: Arc<EventFd>,
}

impl Handle {
    /// Sends a command (what a stopped watcher, a bug it logged, would
    /// have followed is not followed any more).
    pub fn send(&self, command: Command) {
        let _ = self.try_send(command);
    }

    /// Sends a command; gives it back if the watcher stopped, so that what
    /// waits on it can be done without it.
    pub fn try_send(&self, command: Command) -> Result<(), Command> {
        match self.commands.send(command) {
            Ok(()) => {
                let _ = self.wake.write(1);
                Ok(())
            }
            Err(std::sync::mpsc::SendError(command)) => Err(command),
        }
    }
}

/// Starts the watcher; its updates arrive on `updates`.
pub fn spawn(sysfs_root: PathBuf, updates: UnboundedSender<Update>) -> Result<Handle, String> {
    let wake = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| format!("cannot make the kernel users watcher's eventfd: {e}"))?,
    );
    let (commands, rx) = std::sync::mpsc::channel();
    let thread_wake = Arc::clone(&wake);
    std::thread::Builder::new()
        .name("kernel-users".into())
        .spawn(move || {
            let watched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                Watcher::new(sysfs_root, updates, rx, thread_wake).run()
            }));
            if watched.is_err() {
                // A bug, not an input: say so. Real removals stay safe (their
                // claims), but kernel users are no longer followed.
                tracing::error!(
                    "the kernel users watcher failed: the kernel's users of real devices \
                     are no longer followed until devmgrd restarts"
                );
            }
        })
        .map_err(|e| format!("cannot start the kernel users watcher: {e}"))?;
    Ok(Handle { commands, wake })
}

/// Where a readiness came from.
enum Source {
    Wake,
    Mountinfo(u64),
    Representative(u64),
    Swaps,
    Fanotify,
    Connector,
    Holder(u32),
}

struct Watcher {
    root: PathBuf,
    devices: HashMap<ObjectId, Device>,
    by_dev: HashMap<DevNum, BTreeSet<ObjectId>>,
    namespaces: Namespaces,
    swaps: Option<File>,
    /// Swap areas: path, and the device it is if it is one.
    swap_areas: Vec<(String, Option<DevNum>)>,
    /// The followed devices by kernel name.
    by_name: HashMap<String, BTreeSet<ObjectId>>,
    /// What `holders/` lists, per followed device.
    stacked: stacked::Stacking,
    /// Loop devices backed by a device node: loop name → that device.
    backed: HashMap<String, DevNum>,
    processes: Processes,
    connector: Option<ProcConnector>,
    /// Newly followed devices whose holders are found by the next full scan
    /// (one scan for a whole coldplug).
    to_scan: HashSet<DevNum>,
    /// Namespaces whose mounts changed, and when they are read.
    mounts_changed: HashMap<u64, Instant>,
    /// The earliest each namespace may be read again (`MOUNTS_DUTY`).
    mounts_next_read: HashMap<u64, Instant>,
    reported: HashMap<ObjectId, Vec<Found>>,
    updates: UnboundedSender<Update>,
    commands: Receiver<Command>,
    wake: Arc<EventFd>,
}

/// Keeps a reason within the engine's limits (printable, 1 KiB): a mount
/// point may hold any byte but `/` and NUL.
fn printable(text: String) -> String {
    let mut out: String = text
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    let limit = drivers::validate::MAX_REASON_BYTES;
    if out.len() > limit {
        let mut end = limit - 3;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

impl Watcher {
    fn new(
        root: PathBuf,
        updates: UnboundedSender<Update>,
        commands: Receiver<Command>,
        wake: Arc<EventFd>,
    ) -> Watcher {
        let own = std::process::id();
        let swaps = match File::open("/proc/swaps") {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("cannot follow /proc/swaps: {e}");
                None
            }
        };
        let connector = match ProcConnector::open() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(
                    "no process connector ({e}): a mount namespace made after devmgrd started \
                     is found only when a removal's claim finds its device busy"
                );
                None
            }
        };
        let mut watcher = Watcher {
            root,
            devices: HashMap::new(),
            by_dev: HashMap::new(),
            namespaces: Namespaces::start(own),
            swaps,
            swap_areas: Vec::new(),
            by_name: HashMap::new(),
            stacked: stacked::Stacking::default(),
            backed: HashMap::new(),
            processes: Processes::new(own),
            connector,
            to_scan: HashSet::new(),
            mounts_changed: HashMap::new(),
            mounts_next_read: HashMap::new(),
            reported: HashMap::new(),
            updates,
            commands,
            wake,
        };
        watcher.reread_swaps();
        watcher
    }

    fn run(mut self) {
        loop {
            let next = [
                self.processes.next_recheck(),
                self.mounts_changed.values().min().copied(),
            ]
            .into_iter()
            .flatten()
            .min();
            let timeout = match next {
                None => PollTimeout::NONE,
                Some(at) => {
                    let ms = at.saturating_duration_since(Instant::now()).as_millis();
                    PollTimeout::try_from(ms.min(60_000) as u16 as i32 + 1)
                        .unwrap_or(PollTimeout::NONE)
                }
            };
            let ready = match self.wait(timeout) {
                Ok(ready) => ready,
                Err(nix::errno::Errno::EINTR) => continue,
                // (ENOMEM, or more fds than the limit: the watcher must go
                // on, and look again a moment later.)
                Err(e) => {
                    tracing::warn!("the kernel users watcher's poll failed ({e}): trying again");
                    std::thread::sleep(std::time::Duration::from_millis(500));
                    continue;
                }
            };
            let mut dirty: HashSet<DevNum> = HashSet::new();
            let mut dirty_ids: HashSet<ObjectId> = HashSet::new();
            let mut then = Vec::new();
            for source in ready {
                match source {
                    Source::Wake => {
                        let _ = self.wake.read();
                        loop {
                            match self.commands.try_recv() {
                                Ok(command) => {
                                    self.command(command, &mut dirty, &mut dirty_ids, &mut then)
                                }
                                Err(TryRecvError::Empty) => break,
                                Err(TryRecvError::Disconnected) => return,
                            }
                        }
                    }
                    // Read a moment later, once: a storm of mounts (a
                    // container starting) is read once per moment, not once
                    // per mount.
                    Source::Mountinfo(ns) => {
                        let soonest = Instant::now() + MOUNTS_SETTLE;
                        let allowed = self.mounts_next_read.get(&ns).copied();
                        let at = allowed.map_or(soonest, |a| a.max(soonest));
                        self.mounts_changed.entry(ns).or_insert(at);
                    }
                    Source::Representative(ns) => {
                        dirty.extend(self.namespaces.representative_exited(ns))
                    }
                    Source::Swaps => dirty.extend(self.reread_swaps()),
                    Source::Fanotify => {
                        let tracked: HashSet<DevNum> = self.by_dev.keys().copied().collect();
                        dirty.extend(self.processes.on_events(&tracked));
                    }
                    Source::Connector => {
                        let events = self
                            .connector
                            .as_ref()
                            .map(|c| c.events())
                            .unwrap_or_default();
                        for event in events {
                            match event {
                                ProcEvent::Exec(pid) => {
                                    dirty.extend(self.namespaces.exec(pid));
                                    dirty.extend(self.processes.exec(pid));
                                }
                                ProcEvent::Fork { parent, child } => {
                                    dirty.extend(self.processes.forked(parent, child))
                                }
                            }
                        }
                    }
                    Source::Holder(pid) => dirty.extend(self.processes.exited(pid)),
                }
            }
            let now = Instant::now();
            let due: Vec<u64> = self
                .mounts_changed
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(ns, _)| *ns)
                .collect();
            for ns in due {
                self.mounts_changed.remove(&ns);
                let started = Instant::now();
                dirty.extend(self.namespaces.reread(ns));
                let took = started.elapsed();
                self.mounts_next_read
                    .insert(ns, Instant::now() + took * (MOUNTS_DUTY - 1));
            }
            // (Forget the namespaces that are gone.)
            let followed = &self.namespaces.list;
            self.mounts_next_read
                .retain(|ns, _| followed.contains_key(ns));
            self.mounts_changed
                .retain(|ns, _| followed.contains_key(ns));
            dirty.extend(self.processes.due_rechecks(Instant::now()));
            if !self.to_scan.is_empty() {
                let scan = std::mem::take(&mut self.to_scan);
                dirty.extend(self.processes.full_scan(&scan));
            }
            for dev in dirty {
                dirty_ids.extend(self.by_dev.get(&dev).into_iter().flatten().copied());
            }
            self.publish(dirty_ids, then);
        }
    }

    /// Polls everything; returns what is ready.
    fn wait(&self, timeout: PollTimeout) -> nix::Result<Vec<Source>> {
        let changed = PollFlags::POLLPRI | PollFlags::POLLERR;
        let readable = PollFlags::POLLIN;
        let mut wanted: Vec<(Source, BorrowedFd<'_>, PollFlags)> =
            vec![(Source::Wake, self.wake.as_fd(), readable)];
        for (ns, mountinfo, pidfd) in self.namespaces.poll_fds() {
            // (One already known to have changed is read when it settles.)
            if !self.mounts_changed.contains_key(&ns) {
                wanted.push((Source::Mountinfo(ns), mountinfo, changed));
            }
            if let Some(pidfd) = pidfd {
                wanted.push((Source::Representative(ns), pidfd, readable));
            }
        }
        if let Some(swaps) = &self.swaps {
            wanted.push((Source::Swaps, swaps.as_fd(), changed));
        }
        let (fanotify, holders) = self.processes.poll_fds();
        if let Some(f) = fanotify {
            wanted.push((Source::Fanotify, f, readable));
        }
        for (pid, fd) in holders {
            wanted.push((Source::Holder(pid), fd, readable));
        }
        if let Some(c) = &self.connector {
            wanted.push((Source::Connector, c.fd(), readable));
        }
        let (sources, mut fds): (Vec<Source>, Vec<PollFd<'_>>) = wanted
            .into_iter()
            .map(|(s, fd, flags)| (s, PollFd::new(fd, flags)))
            .unzip();
        poll(&mut fds, timeout)?;
        Ok(sources
            .into_iter()
            .zip(fds)
            .filter(|(_, fd)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|(s, _)| s)
            .collect())
    }

    fn command(
        &mut self,
        command: Command,
        dirty: &mut HashSet<DevNum>,
        dirty_ids: &mut HashSet<ObjectId>,
        then: &mut Vec<Then>,
    ) {
        match command {
            Command::Track(device) => {
                let id = device.id;
                self.processes.watch_node(&device.node);
                self.to_scan.insert(device.dev);
                self.by_dev.entry(device.dev).or_default().insert(id);
                self.by_name
                    .entry(device.name.clone())
                    .or_default()
                    .insert(id);
                self.stacked
                    .set(id, stacked::holders_of(&self.root, &device.name));
                let name = device.name.clone();
                self.devices.insert(id, device);
                dirty_ids.insert(id);
                self.restack(&name, dirty_ids);
            }
            Command::Untrack(id) => {
                let Some(device) = self.devices.remove(&id) else {
                    return;
                };
                if let Some(ids) = self.by_dev.get_mut(&device.dev) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.by_dev.remove(&device.dev);
                        self.processes.unwatch_node(&device.node);
                        self.processes.forget(device.dev);
                    }
                }
                self.stacked.remove(id);
                self.reported.remove(&id);
                let name = device.name;
                self.forget_name(&name, id);
                if let Some(dev) = self.backed.remove(&name) {
                    dirty.insert(dev);
                }
            }
            Command::Renamed { id, name } => {
                if let Some(device) = self.devices.get_mut(&id) {
                    self.processes.unwatch_node(&device.node);
                    device.node = PathBuf::from("/dev").join(&name);
                    let old = std::mem::replace(&mut device.name, name.clone());
                    self.processes.watch_node(&device.node);
                    self.forget_name(&old, id);
                    self.by_name.entry(name).or_default().insert(id);
                }
            }
            Command::Uevent { name } => self.restack(&name, dirty_ids),
            Command::Rescan { ids, then: after } => {
                dirty.extend(self.namespaces.representatives_moved(None));
                dirty.extend(self.namespaces.discover_all());
                dirty.extend(self.namespaces.reread_all());
                dirty.extend(self.reread_swaps());
                let mut devs = HashSet::new();
                for id in &ids {
                    if let Some(d) = self.devices.get(id) {
                        devs.insert(d.dev);
                        let name = d.name.clone();
                        self.stacked
                            .set(*id, stacked::holders_of(&self.root, &name));
                    }
                    dirty_ids.insert(*id);
                }
                // A device mounted nowhere any more may still be held by the
                // processes on its lazily detached filesystem.
                let unmounted: HashSet<DevNum> =
                    devs.iter().copied().filter(|d| !self.mounted(*d)).collect();
                dirty.extend(self.processes.full_scan_with_files(&devs, &unmounted));
                then.push(after);
            }
        }
    }

    /// Device `name` had a uevent (or appeared): re-reads what is stacked on
    /// it, on what it is stacked, and what a loop device is backed by.
    fn restack(&mut self, name: &str, dirty_ids: &mut HashSet<ObjectId>) {
        // It, what it is built on, and the devices that listed it (the
        // link goes when it is torn down).
        let mut ids: BTreeSet<ObjectId> = self.stacked.listing(name).collect();
        for n in stacked::slaves_of(&self.root, name)
            .iter()
            .map(String::as_str)
            .chain([name])
        {
            ids.extend(self.by_name.get(n).into_iter().flatten().copied());
        }
        for id in ids {
            let Some(device) = self.devices.get(&id) else {
                continue;
            };
            let now = stacked::holders_of(&self.root, &device.name);
            if self.stacked.set(id, now) {
                dirty_ids.insert(id);
            }
        }
        if name.starts_with("loop") {
            let now = stacked::backing_device(&self.root, name);
            let before = match now {
                Some(dev) => self.backed.insert(name.to_owned(), dev),
                None => self.backed.remove(name),
            };
            if before != now {
                for dev in [before, now].into_iter().flatten() {
                    dirty_ids.extend(self.by_dev.get(&dev).into_iter().flatten().copied());
                }
            }
        }
    }

    fn forget_name(&mut self, name: &str, id: ObjectId) {
        if let Some(ids) = self.by_name.get_mut(name) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_name.remove(name);
            }
        }
    }

    /// Reads /proc/swaps again; returns the devices whose swap changed.
    fn reread_swaps(&mut self) -> HashSet<DevNum> {
        let Some(file) = &mut self.swaps else {
            return HashSet::new();
        };
        let Ok(text) = super::reread_lossy(file) else {
            return HashSet::new();
        };
        let areas: Vec<(String, Option<DevNum>)> = swaps::parse(&text)
            .into_iter()
            .map(|path| {
                let dev = super::device_node(&path).and_then(block_device);
                (path, dev)
            })
            .collect();
        let devs = |a: &[(String, Option<DevNum>)]| -> HashSet<(String, DevNum)> {
            a.iter()
                .filter_map(|(p, d)| d.map(|d| (p.clone(), d)))
                .collect()
        };
        let changed = devs(&self.swap_areas)
            .symmetric_difference(&devs(&areas))
            .map(|(_, d)| *d)
            .collect();
        self.swap_areas = areas;
        changed
    }

    /// Whether a filesystem of `dev` is mounted in any namespace followed.
    fn mounted(&self, dev: DevNum) -> bool {
        self.namespaces
            .list
            .values()
            .any(|n| n.mounts.iter().any(|(_, d)| *d == dev))
    }

    /// Every user of device `id` now.
    fn users_of(&self, id: ObjectId) -> Vec<Found> {
        let Some(device) = self.devices.get(&id) else {
            return Vec::new();
        };
        let dev = device.dev;
        let mut users = Vec::new();
        let primary = self.namespaces.primary;
        let copies = self.namespaces.primary_groups(dev);
        let mut namespaces: Vec<(&u64, &super::namespaces::Namespace)> =
            self.namespaces.list.iter().collect();
        namespaces.sort_by_key(|(ns, n)| (**ns != primary, n.rep));
        for (&ns, n) in namespaces {
            let followed_primary = self.namespaces.list.contains_key(&primary);
            let machines = ns == primary || (!followed_primary && ns == self.namespaces.own);
            for (m, _) in n.mounts.iter().filter(|(_, d)| *d == dev) {
                // A copy that follows the machine's own mount (a slave of
                // its peer group, as a sandboxed service's view) is that mount.
                if !machines && m.master.is_some_and(|g| copies.contains(&g)) {
                    continue;
                }
                let (uid, pid, whose) = if machines {
                    (0, 0, String::new())
                } else {
                    (
                        n.uid,
                        n.rep,
                        format!(" in the mount namespace of {} (pid {})", n.comm, n.rep),
                    )
                };
                let reason = printable(format!(
                    "mounted at {} ({}){whose}",
                    m.mount_point, m.fstype
                ));
                let via = if ns == self.namespaces.own { 0 } else { n.rep };
                users.push(Found::new(
                    UserKey::Mount { ns, mount: m.id },
                    KernelUse::Mount,
                    uid,
                    pid,
                    reason,
                    Detail::Mount {
                        pid: via,
                        ns,
                        mount_point: m.mount_point.clone(),
                    },
                ));
            }
        }
        for (path, _) in self.swap_areas.iter().filter(|(_, d)| *d == Some(dev)) {
            users.push(Found::new(
                UserKey::Swap { path: path.clone() },
                KernelUse::Swap,
                0,
                0,
                "swap".into(),
                Detail::Swap { path: path.clone() },
            ));
        }
        let loops = self
            .backed
            .iter()
            .filter(|(_, d)| **d == dev)
            .map(|(name, _)| name.clone());
        let holders: BTreeSet<String> = self.stacked.of(id).iter().cloned().chain(loops).collect();
        for holder in holders {
            let reason = printable(format!(
                "held by {}",
                stacked::describe(&self.root, &holder)
            ));
            users.push(Found::new(
                UserKey::Stacked { holder },
                KernelUse::Stacked,
                0,
                0,
                reason,
                Detail::Other,
            ));
        }
        // While it is mounted, the mount is the user, not what is open on it.
        if !self.mounted(dev) {
            for (pid, info) in self.processes.files_of(dev) {
                users.push(Found::new(
                    UserKey::Files {
                        pid,
                        program: info.comm.clone(),
                    },
                    KernelUse::Process,
                    info.uid,
                    pid,
                    printable(format!(
                        "open on its detached filesystem by {} (pid {pid})",
                        info.comm
                    )),
                    Detail::Other,
                ));
            }
        }
        for (pid, info) in self.processes.holders(dev) {
            users.push(Found::new(
                UserKey::Process {
                    pid,
                    program: info.comm.clone(),
                },
                KernelUse::Process,
                info.uid,
                pid,
                printable(format!("open by {} (pid {pid})", info.comm)),
                Detail::Other,
            ));
        }
        users
    }

    /// Reports the devices whose users differ from what was reported.
    fn publish(&mut self, ids: HashSet<ObjectId>, then: Vec<Then>) {
        let mut reports = Vec::new();
        let mut ids: Vec<ObjectId> = ids.into_iter().collect();
        ids.sort();
        for id in ids {
            if !self.devices.contains_key(&id) {
                continue;
            }
            let users = self.users_of(id);
            if self
                .reported
                .get(&id)
                .map_or(users.is_empty(), |r| *r == users)
            {
                continue;
            }
            self.reported.insert(id, users.clone());
            reports.push(Report { id, users });
        }
        if reports.is_empty() && then.is_empty() {
            return;
        }
        let mut then = then.into_iter();
        let first = then.next();
        let _ = self.updates.send(Update {
            reports,
            then: first,
        });
        for more in then {
            let _ = self.updates.send(Update {
                reports: Vec::new(),
                then: Some(more),
            });
        }
    }
}
