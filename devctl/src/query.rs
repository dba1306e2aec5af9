//! The commands that only read: status, list, tree and show.

use std::collections::BTreeMap;

use serde::Serialize;
use zbus::Connection;

use crate::connect::Found;
use crate::failure::Outcome;
use crate::model::{self, ObjectInfo, Snapshot};
use crate::render;

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl Serialize) -> Outcome {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| crate::failure::Failure::Failed(format!("cannot encode JSON: {e}")))?;
    outln!("{text}");
    Ok(())
}

#[derive(Serialize)]
struct Status {
    version: String,
    bus: BusInfo,
    objects: u32,
    pending_removals: u32,
    references: u64,
    by_kind: BTreeMap<String, u32>,
    by_state: BTreeMap<String, u32>,
}

#[derive(Serialize)]
struct BusInfo {
    source: String,
    address: Option<String>,
    /// devmgrd's unique name on that bus.
    daemon: Option<String>,
}

pub async fn status(found: &Found, json: bool) -> Outcome {
    let manager = model::manager(&found.conn).await?;
    let version = manager.version().await?;
    let objects = manager.object_count().await?;
    let pending_removals = manager.pending_removals().await?;
    let snapshot = Snapshot::read(&found.conn).await?;
    let mut by_kind = BTreeMap::new();
    let mut by_state = BTreeMap::new();
    let mut references = 0;
    for o in snapshot.objects.values() {
        *by_kind.entry(o.kind.clone()).or_insert(0) += 1;
        *by_state.entry(o.state.clone()).or_insert(0) += 1;
        references += u64::from(o.ref_count);
    }
    let status = Status {
        version,
        bus: BusInfo {
            source: found.source.clone(),
            address: found.address.clone(),
            daemon: owner_of(&found.conn).await,
        },
        objects,
        pending_removals,
        references,
        by_kind,
        by_state,
    };
    if json {
        return print_json(&status);
    }
    let counts = |m: &BTreeMap<String, u32>| {
        if m.is_empty() {
            "none".to_owned()
        } else {
            m.iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    outln!("daemon       devmgrd {}", status.version);
    outln!(
        "bus          {}{}",
        status.bus.source,
        status
            .bus
            .address
            .as_deref()
            .map(|a| format!(" ({a})"))
            .unwrap_or_default()
    );
    outln!(
        "objects      {} ({})",
        status.objects,
        counts(&status.by_kind)
    );
    outln!("states       {}", counts(&status.by_state));
    outln!("references   {}", status.references);
    outln!(
        "pending      {} object(s) removing",
        status.pending_removals
    );
    Ok(())
}

/// The daemon's unique name on the bus.
async fn owner_of(conn: &Connection) -> Option<String> {
    let bus = zbus::fdo::DBusProxy::new(conn).await.ok()?;
    let name = zbus::names::WellKnownName::from_static_str_unchecked(proto::BUS_NAME).into();
    bus.get_name_owner(name).await.ok().map(|n| n.to_string())
}

pub async fn list(conn: &Connection, json: bool) -> Outcome {
    let snapshot = Snapshot::read(conn).await?;
    if json {
        let objects: Vec<&ObjectInfo> = snapshot.objects.values().collect();
        return print_json(&objects);
    }
    out!("{}", render::list(&snapshot));
    Ok(())
}

#[derive(Serialize)]
struct TreeNode<'a> {
    #[serde(flatten)]
    object: &'a ObjectInfo,
    children: Vec<TreeNode<'a>>,
}

fn tree_nodes<'a>(snapshot: &'a Snapshot) -> Vec<TreeNode<'a>> {
    fn node<'a>(o: &'a ObjectInfo, snapshot: &'a Snapshot) -> TreeNode<'a> {
        let children = snapshot
            .objects
            .values()
            .filter(|c| c.parent.as_deref() == Some(o.path.as_str()))
            .map(|c| node(c, snapshot))
            .collect();
        TreeNode {
            object: o,
            children,
        }
    }
    let mut roots: Vec<&ObjectInfo> = snapshot
        .objects
        .values()
        .filter(|o| o.parent.as_deref().and_then(|p| snapshot.get(p)).is_none())
        .collect();
    roots.sort_by_key(|o| (o.kind != "driver", o.id));
    roots.into_iter().map(|o| node(o, snapshot)).collect()
}

pub async fn tree(conn: &Connection, json: bool) -> Outcome {
    let snapshot = Snapshot::read(conn).await?;
    if json {
        return print_json(&tree_nodes(&snapshot));
    }
    out!("{}", render::tree(&snapshot));
    Ok(())
}

pub async fn show(conn: &Connection, obj: &str, json: bool) -> Outcome {
    let path = model::resolve(conn, obj, None).await?;
    let info = model::read_object(conn, &path).await?;
    if json {
        return print_json(&info);
    }
    // Parent and driver read as kind/name: one lookup each.
    let mut labels = BTreeMap::new();
    for p in [info.parent.as_deref(), info.driver.as_deref()]
        .into_iter()
        .flatten()
    {
        if let Ok(o) = model::read_object(conn, p).await {
            labels.insert(p.to_owned(), format!("{} ({p})", o.label()));
        }
    }
    let label = |p: Option<&str>| match p {
        None => "-".to_owned(),
        Some(p) => labels.get(p).cloned().unwrap_or_else(|| p.to_owned()),
    };
    out!("{}", render::show(&info, label));
    Ok(())
}
