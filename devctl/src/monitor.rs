//! `devctl monitor`: the objects as they are, then every event as it
//! happens, one line each (like `udevadm monitor`). The signal stream is
//! opened before the snapshot is read, so nothing falls between the two;
//! an event the snapshot already shows may repeat, never go missing.

use std::collections::{HashMap, HashSet};

use futures_util::StreamExt;
use serde_json::{json, Value};
use zbus::{Connection, OwnedObjectPath, OwnedVariant};

use crate::act::signals;
use crate::cli::MonitorArgs;
use crate::failure::{Failure, Outcome};
use crate::model::{self, now_micros, ObjectInfo};
use crate::render;

type Interfaces = HashMap<String, HashMap<String, OwnedVariant>>;

struct Monitor {
    json: bool,
    kind: Option<String>,
    only: Option<HashSet<String>>,
    /// What each path is, so a removal can still be named.
    known: HashMap<String, (String, String)>,
}

fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3_600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_millis()
    )
}

impl Monitor {
    fn wanted(&self, path: &str) -> bool {
        let Some((kind, _)) = self.known.get(path) else {
            return false;
        };
        self.kind.as_ref().is_none_or(|k| k == kind)
            && self.only.as_ref().is_none_or(|only| only.contains(path))
    }

    fn label(&self, path: &str) -> String {
        self.known
            .get(path)
            .map_or_else(|| path.to_owned(), |(k, n)| format!("{k}/{n}"))
    }

    fn emit(&self, event: &str, path: &str, human: String, mut data: Value) -> Outcome {
        if self.json {
            if let Value::Object(map) = &mut data {
                map.insert("event".into(), event.into());
                map.insert("time_us".into(), now_micros().into());
                map.insert("object".into(), path.into());
                if let Some((kind, name)) = self.known.get(path) {
                    map.insert("kind".into(), kind.clone().into());
                    map.insert("name".into(), name.clone().into());
                }
            }
            outln!("{data}");
        } else {
            outln!(
                "{} {event:<9} {:<24} {human}",
                timestamp(),
                self.label(path)
            );
        }
        Ok(())
    }

    fn object(&mut self, event: &str, o: &ObjectInfo) -> Outcome {
        self.known
            .insert(o.path.clone(), (o.kind.clone(), o.name.clone()));
        if !self.wanted(&o.path) {
            return Ok(());
        }
        let human = format!(
            "{} refs={}{}{}",
            render::state(&o.state, 0),
            o.ref_count,
            match render::state_mark(o) {
                "" => String::new(),
                mark => format!(" {mark}"),
            },
            match render::holders_brief(&o.holders) {
                b if b.is_empty() => String::new(),
                b => format!(" held: {b}"),
            }
        );
        let mut data = serde_json::to_value(o).unwrap_or(json!({}));
        if let Value::Object(map) = &mut data {
            map.remove("path"); // it is "object"
        }
        self.emit(event, &o.path, human, data)
    }

    fn message(&mut self, msg: &zbus::Message) -> Outcome {
        let header = msg.header();
        let member = header.member().map(|m| m.to_string()).unwrap_or_default();
        let path = header.path().map(|p| p.to_string()).unwrap_or_default();
        let body = msg.body();
        match member.as_str() {
            "InterfacesAdded" => {
                let Ok((added, ifaces)) = body.deserialize::<(OwnedObjectPath, Interfaces)>()
                else {
                    return Ok(());
                };
                if let Some(props) = ifaces.get(proto::OBJECT_INTERFACE) {
                    let info = ObjectInfo::from_properties(added.as_str(), props);
                    self.object("added", &info)?;
                }
            }
            "InterfacesRemoved" => {
                let Ok((removed, _)) = body.deserialize::<(OwnedObjectPath, Vec<String>)>() else {
                    return Ok(());
                };
                if self.wanted(removed.as_str()) {
                    self.emit("removed", removed.as_str(), String::new(), json!({}))?;
                }
                self.known.remove(removed.as_str());
            }
            "PropertiesChanged" if path != proto::MANAGER_PATH => {
                let Ok((_, changed, _)) =
                    body.deserialize::<(String, HashMap<String, OwnedVariant>, Vec<String>)>()
                else {
                    return Ok(());
                };
                if !self.wanted(&path) {
                    return Ok(());
                }
                let info = ObjectInfo::from_properties(&path, &changed);
                let mut human = Vec::new();
                let mut data = serde_json::Map::new();
                let mut names: Vec<&String> = changed.keys().collect();
                names.sort();
                for name in names {
                    let (text, value) = match name.as_str() {
                        "State" => (render::state(&info.state, 0), json!(info.state)),
                        "RefCount" => (info.ref_count.to_string(), json!(info.ref_count)),
                        "Holders" => (
                            format!("[{}]", render::holders_brief(&info.holders)),
                            serde_json::to_value(&info.holders).unwrap_or(Value::Null),
                        ),
                        "Driver" => {
                            let d = info.driver.clone().unwrap_or_else(|| "/".into());
                            (self.label(&d), json!(d))
                        }
                        "LastError" => (format!("{:?}", info.last_error), json!(info.last_error)),
                        "Attributes" => (
                            format!("{:?}", info.attributes),
                            serde_json::to_value(&info.attributes).unwrap_or(Value::Null),
                        ),
                        "Name" => {
                            if let Some(entry) = self.known.get_mut(&path) {
                                entry.1 = info.name.clone();
                            }
                            (info.name.clone(), json!(info.name))
                        }
                        _ => ("…".to_owned(), Value::Null),
                    };
                    human.push(format!("{name}={text}"));
                    data.insert(name.clone(), value);
                }
                self.emit(
                    "changed",
                    &path,
                    human.join(" "),
                    json!({ "changed": data }),
                )?;
            }
            "ReleaseRequested" if self.wanted(&path) => {
                let why = body
                    .deserialize::<(String,)>()
                    .map(|(w,)| w)
                    .unwrap_or_default();
                self.emit(
                    "release-requested",
                    &path,
                    why.clone(),
                    json!({ "why": why }),
                )?;
            }
            // RemovalCompleted repeats InterfacesRemoved; the manager's
            // counts are not per-object events.
            _ => {}
        }
        Ok(())
    }
}

pub async fn monitor(conn: &Connection, args: MonitorArgs, json: bool) -> Outcome {
    let mut stream = signals(conn, None).await?;
    let mut only = None;
    if !args.objs.is_empty() {
        let mut paths = HashSet::new();
        for obj in &args.objs {
            paths.insert(model::resolve(conn, obj, None).await?);
        }
        only = Some(paths);
    }
    let mut monitor = Monitor {
        json,
        kind: args.kind,
        only,
        known: HashMap::new(),
    };
    // What is there already, page by page as it arrives.
    model::each_page(conn, |page| {
        page.iter().try_for_each(|o| monitor.object("present", o))
    })
    .await?;
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(msg)) => monitor.message(&msg)?,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(Failure::Unreachable("lost the bus".into())),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
