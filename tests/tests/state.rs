//! Crash-safe admin state (`--state-dir`): devmgrd SIGKILLed in the middle
//! of a stream of acknowledged changes comes back with every one of them;
//! a bad state file stops it with the file and line named; one daemon per
//! directory; references do not survive a restart.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devmgr_tests::*;
use zbus::{OwnedObjectPath, Variant as Value};

/// One object as a client knows it from acknowledged replies.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    state: String,
    parent: Option<(String, String)>,
    driver: Option<(String, String)>,
    attributes: BTreeMap<String, String>,
}

/// Objects by (kind, name).
type Objects = BTreeMap<(String, String), Seen>;

fn key(kind: &str, name: &str) -> (String, String) {
    (kind.to_owned(), name.to_owned())
}

/// A state directory for one test, and the daemon arguments that use it.
struct StateDir {
    dir: TempDir,
    path: String,
}

impl StateDir {
    fn new(tag: &str) -> StateDir {
        let dir = TempDir::unique(tag);
        let path = dir.0.to_str().expect("utf-8 path").to_owned();
        StateDir { dir, path }
    }

    /// `--no-udev --state-dir DIR`.
    fn args(&self) -> [&str; 3] {
        ["--no-udev", "--state-dir", &self.path]
    }

    /// The journal the directory holds now.
    fn journal(&self) -> std::path::PathBuf {
        std::fs::read_dir(&self.dir.0)
            .expect("state dir")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains("journal."))
            .expect("a journal")
    }
}

/// What the daemon holds now, from `devctl --json list`.
fn actual(bus: &TestBus) -> Objects {
    let out = devctl(bus, &["--json", "list"]);
    assert!(out.status.success(), "devctl list: {out:?}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let list = list.as_array().expect("a list");
    let text = |o: &serde_json::Value, f: &str| o[f].as_str().unwrap_or_default().to_owned();
    let by_path: BTreeMap<String, (String, String)> = list
        .iter()
        .map(|o| (text(o, "path"), (text(o, "kind"), text(o, "name"))))
        .collect();
    list.iter()
        .map(|o| {
            let link = |f: &str| o[f].as_str().and_then(|p| by_path.get(p).cloned());
            let attributes = o["attributes"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let seen = Seen {
                state: text(o, "state"),
                parent: link("parent"),
                driver: link("driver"),
                attributes,
            };
            ((text(o, "kind"), text(o, "name")), seen)
        })
        .collect()
}

/// A small, seeded random source (xorshift): the same seed, the same run.
struct Random(u64);

impl Random {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// One change a client asks for.
#[derive(Clone, Debug)]
enum Op {
    AddDriver(String),
    /// A host bound to sim-scsi that scans two LUNs.
    AddHost(u32),
    AddDevice {
        name: String,
        parent: Option<(String, String)>,
    },
    Stop((String, String)),
    Reenable((String, String)),
    Remove((String, String)),
    Bind {
        device: (String, String),
        driver: (String, String),
    },
}

/// Whether `k` and every ancestor are live.
fn live_chain(objects: &Objects, k: &(String, String)) -> bool {
    let mut at = Some(k.clone());
    while let Some(k) = at {
        match objects.get(&k) {
            Some(seen) if seen.state == "live" => at = seen.parent.clone(),
            _ => return false,
        }
    }
    true
}

/// What `op` does to what a client knows (all its ops are valid ones).
fn apply(objects: &mut Objects, op: &Op) {
    let live = |parent, driver, attributes| Seen {
        state: "live".to_owned(),
        parent,
        driver,
        attributes,
    };
    match op {
        Op::AddDriver(name) => {
            objects.insert(key("driver", name), live(None, None, BTreeMap::new()));
        }
        Op::AddHost(number) => {
            let host = key("host", &format!("host{number}"));
            let sim = Some(key("driver", proto::SIM_SCSI_DRIVER));
            objects.insert(host.clone(), live(None, sim, BTreeMap::new()));
            for lun in 0..2 {
                let attributes = BTreeMap::from([
                    ("scsi.host".to_owned(), number.to_string()),
                    ("scsi.lun".to_owned(), lun.to_string()),
                ]);
                let name = format!("{number}:0:0:{lun}");
                objects.insert(
                    key("device", &name),
                    live(Some(host.clone()), None, attributes),
                );
            }
        }
        Op::AddDevice { name, parent } => {
            let attributes = BTreeMap::from([("made-by".to_owned(), name.clone())]);
            objects.insert(key("device", name), live(parent.clone(), None, attributes));
        }
        Op::Stop(k) => {
            if let Some(seen) = objects.get_mut(k) {
                seen.state = "stopped".to_owned();
            }
        }
        Op::Reenable(k) => {
            if let Some(seen) = objects.get_mut(k) {
                seen.state = "live".to_owned();
            }
        }
        Op::Remove(k) => {
            // Its subtree goes; what a removed driver had bound stays, unbound.
            let mut gone = vec![k.clone()];
            let mut i = 0;
            while i < gone.len() {
                let up = gone[i].clone();
                gone.extend(
                    objects
                        .iter()
                        .filter(|(_, s)| s.parent.as_ref() == Some(&up))
                        .map(|(k, _)| k.clone()),
                );
                i += 1;
            }
            for k in &gone {
                objects.remove(k);
            }
            for seen in objects.values_mut() {
                if seen.driver.as_ref() == Some(k) {
                    seen.driver = None;
                }
            }
        }
        Op::Bind { device, driver } => {
            if let Some(seen) = objects.get_mut(device) {
                seen.driver = Some(driver.clone());
            }
        }
    }
}

/// A valid next change for client `c`, given what it has.
fn choose(objects: &Objects, c: u32, serial: &mut u32, random: &mut Random) -> Op {
    let mine: Vec<&(String, String)> = objects
        .keys()
        .filter(|(kind, name)| !(kind == "driver" && name == proto::SIM_SCSI_DRIVER))
        .collect();
    *serial += 1;
    let n = *serial;
    for _ in 0..8 {
        let op = match random.below(10) {
            0 => Op::AddDriver(format!("c{c}-drv{n}")),
            1 => Op::AddHost((c + 1) * 100_000 + n),
            2 | 3 => {
                let parents: Vec<_> = mine
                    .iter()
                    .filter(|k| k.0 != "driver" && live_chain(objects, k))
                    .collect();
                let parent = match parents.len() {
                    0 => None,
                    len => Some((*parents[random.below(len + 1).min(len - 1)]).clone()),
                };
                Op::AddDevice {
                    name: format!("c{c}-dev{n}"),
                    parent,
                }
            }
            4 | 5 if !mine.is_empty() => {
                let k = mine[random.below(mine.len())].clone();
                match objects[&k].state.as_str() {
                    "live" => Op::Stop(k),
                    _ if objects[&k]
                        .parent
                        .as_ref()
                        .is_none_or(|p| live_chain(objects, p)) =>
                    {
                        Op::Reenable(k)
                    }
                    _ => continue,
                }
            }
            6 if !mine.is_empty() => Op::Remove(mine[random.below(mine.len())].clone()),
            7 => {
                let devices: Vec<_> = mine
                    .iter()
                    .filter(|k| {
                        k.0 == "device"
                            && objects[*k].driver.is_none()
                            && k.1.starts_with('c')
                            && live_chain(objects, k)
                    })
                    .collect();
                let drivers: Vec<_> = mine
                    .iter()
                    .filter(|k| k.0 == "driver" && objects[*k].state == "live")
                    .collect();
                if devices.is_empty() || drivers.is_empty() {
                    continue;
                }
                Op::Bind {
                    device: (*devices[random.below(devices.len())]).clone(),
                    driver: (*drivers[random.below(drivers.len())]).clone(),
                }
            }
            _ => continue,
        };
        return op;
    }
    Op::AddDriver(format!("c{c}-drv{n}"))
}

/// Sends `op`; Err when the daemon did not answer (it was killed).
async fn send(client: &Client, op: &Op) -> Result<(), String> {
    let path_of = |k: &(String, String)| {
        let client = &client.manager;
        let k = k.clone();
        async move { client.find_object(&k.0, &k.1).await }
    };
    let result: Result<(), proto::Error> = async {
        match op {
            Op::AddDriver(name) => {
                client.manager.add("driver", name, &root(), none()).await?;
            }
            Op::AddHost(number) => {
                let sim = path_of(&key("driver", proto::SIM_SCSI_DRIVER)).await?;
                let opts = options(&[
                    ("driver", Value::from(sim.as_ref())),
                    ("luns", Value::U32(2)),
                ]);
                client
                    .manager
                    .add("host", &format!("host{number}"), &root(), opts)
                    .await?;
            }
            Op::AddDevice { name, parent } => {
                let attributes = std::collections::HashMap::from([("made-by", name.as_str())]);
                let opts = options(&[("attributes", Value::from(attributes))]);
                let parent = match parent {
                    Some(p) => path_of(p).await?,
                    None => OwnedObjectPath::from(root()),
                };
                client.manager.add("device", name, &parent, opts).await?;
            }
            Op::Stop(k) => client.object(&path_of(k).await?).await.stop(none()).await?,
            Op::Reenable(k) => {
                client
                    .object(&path_of(k).await?)
                    .await
                    .reenable(none())
                    .await?
            }
            Op::Remove(k) => {
                let (outcome, _) = client.remove(&path_of(k).await?, none()).await?;
                assert_eq!(outcome, "removed", "{op:?}: nothing holds it");
            }
            Op::Bind { device, driver } => {
                let driver = path_of(driver).await?;
                client
                    .object(&path_of(device).await?)
                    .await
                    .bind(&driver, none())
                    .await?
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(()),
        // devmgrd's own refusal: the test asked for something invalid.
        Err(e) if error_name(&e).starts_with("org.devmgr.") => {
            panic!("devmgrd refused {op:?}: {e}")
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Which client's objects a name belongs to.
fn owner_of(kind: &str, name: &str) -> Option<u32> {
    if kind == "driver" && name == proto::SIM_SCSI_DRIVER {
        return None;
    }
    let digits = name
        .strip_prefix('c')
        .or_else(|| name.strip_prefix("host"))
        .unwrap_or(name);
    let first = digits.chars().next()?.to_digit(10)?;
    Some(if name.starts_with('c') {
        first
    } else {
        first - 1
    })
}

const CLIENTS: u32 = 3;

/// The kill loop: each round, clients stream changes and devmgrd is
/// SIGKILLed at a random moment; restarted on the same directory, it must
/// hold every acknowledged change, and each in-flight one either fully or
/// not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_sigkill() {
    let rounds: u32 = std::env::var("DEVMGR_KILL_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let bus = TestBus::start();
    let state = StateDir::new("state");
    let args = state.args();
    let mut known: Vec<Objects> = vec![Objects::new(); CLIENTS as usize];
    let mut serials = vec![0u32; CLIENTS as usize];
    let mut acknowledged = 0usize;
    let mut in_flight_applied = 0usize;
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    for round in 0..rounds {
        let mut daemon = Daemon::start_with_args(&bus, &args);
        // What survived must be what the clients were told, exactly.
        let now = actual(&bus);
        for c in 0..CLIENTS {
            let theirs: Objects = now
                .iter()
                .filter(|((kind, name), _)| owner_of(kind, name) == Some(c))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(
                theirs, known[c as usize],
                "round {round}, client {c}: the restarted daemon differs from what was acknowledged\n{}",
                daemon.log()
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let mut objects = known[c as usize].clone();
            let mut serial = serials[c as usize];
            let mut random = Random(random.below(usize::MAX) as u64 | 1);
            let address = bus.address.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let client = Client::connect(&address).await;
                let mut done = 0;
                loop {
                    let op = choose(&objects, c, &mut serial, &mut random);
                    match send(&client, &op).await {
                        Ok(()) => {
                            apply(&mut objects, &op);
                            done += 1;
                        }
                        Err(_) => return (objects, serial, done, Some(op)),
                    }
                    if stop.load(Ordering::Relaxed) {
                        return (objects, serial, done, None);
                    }
                }
            }));
        }
        let wait = 20 + random.below(300) as u64;
        tokio::time::sleep(Duration::from_millis(wait)).await;
        daemon.sigkill();
        stop.store(true, Ordering::Relaxed);
        let mut in_flight = Vec::new();
        for (c, task) in tasks.into_iter().enumerate() {
            let (objects, serial, done, op) = task.await.expect("client task");
            known[c] = objects;
            serials[c] = serial;
            acknowledged += done;
            in_flight.push(op);
        }
        // A change in flight at the kill may or may not have been made.
        let daemon = Daemon::start_with_args(&bus, &args);
        let now = actual(&bus);
        for (c, op) in in_flight.into_iter().enumerate() {
            let theirs: Objects = now
                .iter()
                .filter(|((kind, name), _)| owner_of(kind, name) == Some(c as u32))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if theirs == known[c] {
                continue;
            }
            let mut after = known[c].clone();
            if let Some(op) = &op {
                apply(&mut after, op);
            }
            assert_eq!(
                theirs,
                after,
                "round {round}, client {c}: neither the acknowledged state nor that plus {op:?}\n{}",
                daemon.log()
            );
            known[c] = after;
            in_flight_applied += 1;
        }
        drop(daemon);
    }
    println!(
        "{rounds} SIGKILLs: {acknowledged} acknowledged changes, all there after each restart; \
         {in_flight_applied} changes in flight at a kill were found made"
    );
    assert!(
        acknowledged > rounds as usize,
        "the clients got changes through"
    );
}

/// A journal line cut short by the crash is skipped; a bad line before
/// the end stops the daemon, naming the file and the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_state_file_is_named_and_a_torn_last_line_skipped() {
    let bus = TestBus::start();
    let state = StateDir::new("state-bad");
    let args = state.args();
    let daemon = Daemon::start_with_args(&bus, &args);
    assert!(devctl(&bus, &["add", "driver", "kept"]).status.success());
    drop(daemon);
    let journal = state.journal();
    let good = std::fs::read_to_string(&journal).expect("journal");
    assert_eq!(good.lines().count(), 1, "one change: {good}");

    // Torn: the last line has no end.
    std::fs::write(&journal, format!("{good}{{\"put\":{{\"obj")).expect("write");
    let daemon = Daemon::start_with_args(&bus, &args);
    daemon.wait_for_log("an unfinished write");
    let out = devctl(&bus, &["show", "driver/kept"]);
    assert!(out.status.success(), "the acknowledged driver is back");
    let (status, _) = daemon.terminate();
    assert!(status.success());

    // Garbage before the end: refused, named.
    let journal = state.journal();
    std::fs::write(&journal, "{\"put\":7}\n{\"sequence\":9}\n").expect("write");
    let out = devmgrd_command()
        .args(["--bus", &bus.address])
        .args(args)
        .output()
        .expect("devmgrd");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it must not start: {log}");
    assert!(
        log.contains(&format!("{} line 1", journal.display())),
        "the file and line are named: {log}"
    );
}

/// Two daemons never share a state directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_has_one_daemon() {
    let bus = TestBus::start();
    let other = TestBus::start();
    let state = StateDir::new("state-lock");
    let _daemon = Daemon::start_with_args(&bus, &state.args());
    let out = devmgrd_command()
        .args(["--bus", &other.address])
        .args(state.args())
        .output()
        .expect("devmgrd");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(log.contains("in use by another devmgrd"), "{log}");
}

/// References end with the daemon; a removal they held up completes
/// when it comes back (nothing holds the object any more), and a
/// stopped object stays stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_do_not_survive_a_restart() {
    let bus = TestBus::start();
    let state = StateDir::new("state-refs");
    let args = state.args();
    let mut daemon = Daemon::start_with_args(&bus, &args);
    let client = Client::connect(&bus.address).await;
    let held = client.add("device", "held", None, none()).await;
    let stopped = client.add("device", "stopped-one", None, none()).await;
    let fd = client.acquire(&held).await;
    let (outcome, _) = client.remove(&held, none()).await.expect("remove");
    assert_eq!(outcome, "pending");
    client
        .object(&stopped)
        .await
        .stop(none())
        .await
        .expect("stop");
    daemon.sigkill();
    assert!(handle_closed_by_daemon(fd), "the holder sees the hang-up");
    let _daemon = Daemon::start_with_args(&bus, &args);
    let client = Client::connect(&bus.address).await;
    assert!(
        client.manager.find_object("device", "held").await.is_err(),
        "the pending removal completed"
    );
    let stopped = client
        .manager
        .find_object("device", "stopped-one")
        .await
        .expect("still there");
    assert_eq!(client.state(&stopped).await.as_deref(), Some("stopped"));
}

/// A tmpfs of its own, unmounted when dropped.
struct SmallDisk(TempDir);

impl SmallDisk {
    fn mount(tag: &str, size: &str) -> SmallDisk {
        let dir = TempDir::unique(tag);
        std::fs::create_dir_all(&dir.0).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir.0)
            .status()
            .expect("mount")
            .success();
        assert!(
            ok,
            "cannot mount a tmpfs on {} (root is needed)",
            dir.0.display()
        );
        SmallDisk(dir)
    }

    /// Fills the filesystem to the last byte with `filler`.
    fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.0 .0.join("filler")).expect("filler");
        let block = vec![0u8; 4096];
        while file.write_all(&block).is_ok() {}
        let _ = file.write_all(&block[..1]);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0 .0)
            .status();
    }
}

/// With `--state-dir` on a filesystem that fills up, the change that finds
/// it full is still kept (devmgrd's reserve), then changes are refused
/// with QuotaExceeded while references, reads and dry runs go on; once
/// there is room again devmgrd accepts changes by itself; and every
/// acknowledged change survives a SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_directory_refuses_changes_and_recovers_by_itself() {
    let disk = SmallDisk::mount("state-full", "4m");
    let dir = disk.0 .0.join("state");
    let dir = dir.to_str().expect("utf-8").to_owned();
    let bus = TestBus::start();
    let args = ["--no-udev", "--state-dir", dir.as_str()];
    let mut daemon = Daemon::start_with_args(&bus, &args);
    let client = Client::connect(&bus.address).await;
    let kept = client.add_host("before").await;
    disk.fill();

    // Changes go on until one finds the disk full; that one is still kept
    // (on the reserve), and the next ones are refused, typed, changing
    // nothing. (The journal's last page may hold a few more first.)
    let mut acknowledged = vec!["before".to_owned()];
    let refused = loop {
        let name = format!("h{}", acknowledged.len());
        match client.manager.add("host", &name, &root(), none()).await {
            Ok(_) => acknowledged.push(name),
            Err(e) => break e,
        }
        assert!(acknowledged.len() < 10_000, "the disk never filled");
    };
    // (The log is read by a thread of the harness: wait for it.)
    daemon.wait_for_log("writing with the reserve");
    assert_eq!(
        error_name(&refused),
        "org.devmgr.DevMgr1.Error.QuotaExceeded"
    );
    assert!(refused.to_string().contains("is full"), "{refused}");
    let count = client.manager.object_count().await.expect("count");
    let stop = client
        .object(&kept)
        .await
        .stop(none())
        .await
        .expect_err("refused");
    assert_eq!(error_name(&stop), "org.devmgr.DevMgr1.Error.QuotaExceeded");
    assert_eq!(client.manager.object_count().await.expect("count"), count);
    assert_eq!(client.state(&kept).await.as_deref(), Some("live"));
    // References, reads and a dry run still work.
    let fd = client.acquire(&kept).await;
    assert_eq!(client.ref_count(&kept).await, Some(1));
    let dry = client
        .remove(&kept, options(&[("dry-run", Value::from(true))]))
        .await
        .expect("a dry run");
    assert_eq!(dry.0, "pending");
    drop(fd);
    eventually("the reference to go", || async {
        client.ref_count(&kept).await == Some(0)
    })
    .await;
    assert!(
        daemon.child.try_wait().expect("wait").is_none(),
        "devmgrd exited"
    );

    // Room again: changes are accepted by themselves, within seconds.
    std::fs::remove_file(disk.0 .0.join("filler")).expect("remove the filler");
    let mut after = None;
    for _ in 0..100 {
        if let Ok(path) = client.manager.add("host", "after", &root(), none()).await {
            after = Some(path);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        after.is_some(),
        "changes still refused after 10 s with room: {}",
        daemon.log()
    );
    daemon.wait_for_log("has room again");

    // Every acknowledged change survives.
    daemon.sigkill();
    let _daemon = Daemon::start_with_args(&bus, &args);
    let client = Client::connect(&bus.address).await;
    acknowledged.push("after".to_owned());
    for name in &acknowledged {
        assert!(
            client.manager.find_object("host", name).await.is_ok(),
            "host {name} was acknowledged but is lost"
        );
    }
    let refused_name = format!("h{}", acknowledged.len() - 1);
    assert!(client
        .manager
        .find_object("host", &refused_name)
        .await
        .is_err());
}
