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
    // Counts only: a million objects cost no more than ten.
    let manager = model::manager(&found.conn).await?;
    let version = manager.version().await?;
    let objects = manager.object_count().await?;
    let pending_removals = manager.pending_removals().await?;
    let references = u64::from(manager.reference_count().await?);
    let nonzero = |counts: std::collections::HashMap<String, u32>| {
        counts
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect::<BTreeMap<_, _>>()
    };
    let by_kind = nonzero(manager.kind_counts().await?);
    let by_state = nonzero(manager.state_counts().await?);
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
    if json {
        let snapshot = Snapshot::read(conn).await?;
        let objects: Vec<&ObjectInfo> = snapshot.objects.values().collect();
        return print_json(&objects);
    }
    // Printed as the pages arrive: the first line comes at once, whatever
    // the model's size.
    let mut listing = render::Listing::default();
    let columns = [
        "Id", "Kind", "Name", "State", "Driver", "Parent", "RefCount", "Origin",
    ];
    model::each_page_of(conn, Some(&columns), |page| {
        out!("{}", listing.page(&page));
        Ok(())
    })
    .await
}

#[derive(Serialize)]
struct TreeNode<'a> {
    #[serde(flatten)]
    object: &'a ObjectInfo,
    children: Vec<TreeNode<'a>>,
}

fn tree_nodes<'a>(snapshot: &'a Snapshot) -> Vec<TreeNode<'a>> {
    type Children<'a> = std::collections::HashMap<&'a str, Vec<&'a ObjectInfo>>;
    fn node<'a>(o: &'a ObjectInfo, children: &Children<'a>) -> TreeNode<'a> {
        let below = children.get(o.path.as_str()).map_or(&[][..], Vec::as_slice);
        TreeNode {
            object: o,
            children: below.iter().map(|c| node(c, children)).collect(),
        }
    }
    // Children by parent, in id order: one pass, not one per object.
    let mut children: Children<'a> = Default::default();
    let mut roots: Vec<&ObjectInfo> = Vec::new();
    for o in snapshot.objects.values() {
        match o.parent.as_deref().filter(|p| snapshot.get(p).is_some()) {
            Some(parent) => children.entry(parent).or_default().push(o),
            None => roots.push(o),
        }
    }
    roots.sort_by_key(|o| (o.kind != "driver", o.id));
    roots.into_iter().map(|o| node(o, &children)).collect()
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
