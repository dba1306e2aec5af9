//! Human output: tables, the tree and the property sheet. States are marked
//! in words so the output reads the same without colour; colour is added
//! with ANSI styles that anstream strips when stdout is not a terminal or
//! NO_COLOR is set.

use std::fmt::Write as _;

use anstyle::{AnsiColor, Style};

use crate::model::{HolderInfo, ObjectInfo, Snapshot};

fn style(color: AnsiColor) -> Style {
    Style::new().fg_color(Some(color.into()))
}

/// The state, styled, padded to `width` (padding outside the escapes).
pub fn state(state: &str, width: usize) -> String {
    let style = match state {
        "live" => style(AnsiColor::Green),
        "stopped" => style(AnsiColor::Yellow),
        "removing" => style(AnsiColor::Red).bold(),
        "gone" => style(AnsiColor::Magenta),
        _ => Style::new(),
    };
    let pad = width.saturating_sub(state.chars().count());
    format!("{style}{state}{style:#}{}", " ".repeat(pad))
}

/// What the state means, for the tree and `show` (empty when live).
pub fn state_mark(o: &ObjectInfo) -> &'static str {
    match o.state.as_str() {
        "stopped" => "[disabled]",
        "removing" => "[disabled, removal pending]",
        "gone" => "[gone from the kernel, held]",
        _ => "",
    }
}

fn header(text: &str) -> String {
    let bold = Style::new().bold();
    format!("{bold}{text}{bold:#}")
}

/// Pads plain cells to their column's width; the last column is not padded.
fn table(rows: &[Vec<String>], styled_column: Option<usize>) -> String {
    let mut widths = Vec::new();
    table_part(rows, styled_column, &mut widths, true)
}

/// Some rows of a table printed in parts (a listing that streams): each
/// column is as wide as its widest cell so far, so a later part may be
/// wider than an earlier one but never cuts a cell. With `header`, the
/// first row is the header.
fn table_part(
    rows: &[Vec<String>],
    styled_column: Option<usize>,
    widths: &mut Vec<usize>,
    with_header: bool,
) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    widths.resize(columns.max(widths.len()), 0);
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (r, row) in rows.iter().enumerate() {
        let r = if with_header { r } else { r + 1 };
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let last = i + 1 == columns;
            let width = if last { 0 } else { widths[i] };
            let cell = if r == 0 && cell.is_empty() {
                " ".repeat(width)
            } else if r == 0 {
                let pad = width.saturating_sub(cell.chars().count());
                format!("{}{}", header(cell), " ".repeat(pad))
            } else if Some(i) == styled_column {
                state(cell, width)
            } else {
                format!("{cell:<width$}")
            };
            line.push_str(&cell);
            if !last {
                line.push_str("  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

const LIST_HEADER: [&str; 8] = [
    "ID", "KIND", "NAME", "STATE", "DRIVER", "PARENT", "REFS", "ORIGIN",
];

/// `devctl list`, printed page by page as the pages arrive: parents and
/// drivers are named from the objects already listed (they come first,
/// in id order), else by path.
#[derive(Default)]
pub struct Listing {
    widths: Vec<usize>,
    started: bool,
    /// kind and name of every object listed so far, by path.
    seen: std::collections::HashMap<String, (String, String)>,
}

impl Listing {
    /// The rows of one page (and the header before the first).
    pub fn page(&mut self, objects: &[ObjectInfo]) -> String {
        for o in objects {
            self.seen
                .insert(o.path.clone(), (o.kind.clone(), o.name.clone()));
        }
        let mut rows = Vec::with_capacity(objects.len() + 1);
        let header = !self.started;
        if header {
            rows.push(LIST_HEADER.map(String::from).to_vec());
            self.started = true;
        }
        let name_of = |p: Option<&str>, with_kind: bool| match p {
            None => "-".to_owned(),
            Some(p) => match self.seen.get(p) {
                Some((kind, name)) if with_kind => format!("{kind}/{name}"),
                Some((_, name)) => name.clone(),
                None => p.to_owned(),
            },
        };
        for o in objects {
            rows.push(vec![
                o.id.to_string(),
                o.kind.clone(),
                o.display_name(),
                o.state.clone(),
                name_of(o.driver.as_deref(), false),
                name_of(o.parent.as_deref(), true),
                o.ref_count.to_string(),
                o.origin.clone(),
            ]);
        }
        if rows.is_empty() {
            return String::new();
        }
        table_part(&rows, Some(3), &mut self.widths, header)
    }
}

/// `devctl tree`: drivers, then each root with its children below it, like lsblk.
pub fn tree(snapshot: &Snapshot) -> String {
    let mut children: std::collections::BTreeMap<&str, Vec<&ObjectInfo>> = Default::default();
    let mut roots = Vec::new();
    for o in snapshot.objects.values() {
        match o.parent.as_deref().filter(|p| snapshot.get(p).is_some()) {
            Some(parent) => children.entry(parent).or_default().push(o),
            None => roots.push(o),
        }
    }
    // Drivers first, then the device trees, each in creation order.
    roots.sort_by_key(|o| (o.kind != "driver", o.id));
    let mut rows = vec![["NAME", "KIND", "STATE", "DRIVER", "REFS", ""]
        .map(String::from)
        .to_vec()];
    fn walk<'a>(
        o: &'a ObjectInfo,
        prefix: &str,
        branch: &str,
        children: &std::collections::BTreeMap<&str, Vec<&'a ObjectInfo>>,
        snapshot: &Snapshot,
        rows: &mut Vec<Vec<String>>,
    ) {
        let notes = [state_mark(o).to_owned(), holders_brief(&o.holders)]
            .into_iter()
            .filter(|n| !n.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        rows.push(vec![
            format!("{prefix}{branch}{}", snapshot.display_name(o)),
            o.kind.clone(),
            o.state.clone(),
            snapshot.name_of(o.driver.as_deref()),
            o.ref_count.to_string(),
            notes,
        ]);
        let below = children.get(o.path.as_str()).map_or(&[][..], Vec::as_slice);
        let prefix = match branch {
            "├─" => format!("{prefix}│ "),
            "└─" => format!("{prefix}  "),
            _ => prefix.to_owned(),
        };
        for (i, child) in below.iter().enumerate() {
            let branch = if i + 1 == below.len() {
                "└─"
            } else {
                "├─"
            };
            walk(child, &prefix, branch, children, snapshot, rows);
        }
    }
    for root in roots {
        walk(root, "", "", &children, snapshot, &mut rows);
    }
    table(&rows, Some(2))
}

/// Age in a short human form.
pub fn age(seconds: u64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

/// The holders as a table (empty string when none).
pub fn holders(holders: &[HolderInfo]) -> String {
    if holders.is_empty() {
        return String::new();
    }
    let mut rows = vec![
        ["REF", "BUS NAME", "PID", "PROCESS", "UID", "AGE", "REASON"]
            .map(String::from)
            .to_vec(),
    ];
    for h in holders {
        rows.push(vec![
            h.reference.to_string(),
            h.bus_name.clone(),
            h.pid.to_string(),
            match (&h.process, h.pid) {
                (Some(p), _) => p.clone(),
                (None, 0) => "-".into(),
                (None, _) => "?".into(),
            },
            h.uid.to_string(),
            age(h.age_sec),
            h.reason.clone(),
        ]);
    }
    table(&rows, None)
}

/// One holder in a sentence, for `remove`'s pending report: a client's
/// reference with its words, a kernel user as what it is ("mounted at /srv
/// (ext4)", "open by postgres (pid 812, uid 105)").
pub fn holder_sentence(h: &HolderInfo) -> String {
    let age = age(h.age_sec);
    match h.bus_name.as_str() {
        proto::kernel_holders::PROCESS => {
            let program = h.process.clone().unwrap_or_else(|| {
                // "open by NAME (pid N)", from when it was found.
                h.reason
                    .strip_prefix("open by ")
                    .and_then(|r| r.rsplit_once(" (pid "))
                    .map_or_else(|| "?".to_owned(), |(name, _)| name.to_owned())
            });
            return format!(
                "open by {program} (pid {}, uid {}), for {age}",
                h.pid, h.uid
            );
        }
        proto::kernel_holders::SWAP => return format!("swap is on it, for {age}"),
        name if proto::kernel_holders::is_kernel(name) => {
            return format!("{}, for {age}", h.reason)
        }
        _ => {}
    }
    format!(
        "held by {} (pid {}{}, uid {}) for {}: {:?}",
        h.bus_name,
        h.pid,
        h.process
            .as_deref()
            .map(|p| format!(" {p}"))
            .unwrap_or_default(),
        h.uid,
        age,
        h.reason
    )
}

/// The holders in a few words, for the tree: what the kernel's users are,
/// and a client's reason with who gave it.
pub fn holders_brief(holders: &[HolderInfo]) -> String {
    const SHOWN: usize = 2;
    let mut parts: Vec<String> = holders
        .iter()
        .take(SHOWN)
        .map(|h| {
            if proto::kernel_holders::is_kernel(&h.bus_name) {
                h.reason.clone()
            } else {
                let who = h.process.clone().unwrap_or_else(|| h.bus_name.clone());
                format!("{:?} ({who})", h.reason)
            }
        })
        .collect();
    if holders.len() > SHOWN {
        parts.push(format!("{} more", holders.len() - SHOWN));
    }
    parts.join("; ")
}

/// `devctl show OBJ`.
pub fn show(o: &ObjectInfo, snapshot_label: impl Fn(Option<&str>) -> String) -> String {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let mark = state_mark(o);
    let fields: Vec<(&str, String)> = vec![
        ("Path", o.path.clone()),
        ("Id", o.id.to_string()),
        ("Kind", o.kind.clone()),
        ("Name", o.name.clone()),
        (
            "State",
            format!(
                "{}{}{mark}",
                state(&o.state, 0),
                if mark.is_empty() { "" } else { " " }
            ),
        ),
        ("Parent", snapshot_label(o.parent.as_deref())),
        ("Driver", snapshot_label(o.driver.as_deref())),
        ("RefCount", o.ref_count.to_string()),
        ("Origin", o.origin.clone()),
        ("Subsystem", dash(&o.subsystem)),
        ("SysPath", dash(&o.sys_path)),
        ("LastError", dash(&o.last_error)),
    ];
    let mut out = String::new();
    for (key, value) in fields {
        let _ = writeln!(out, "{}  {value}", header(&format!("{key:<10}")));
    }
    if o.attributes.is_empty() {
        let _ = writeln!(out, "{}  -", header(&format!("{:<10}", "Attributes")));
    } else {
        let _ = writeln!(out, "{}", header("Attributes"));
        for (k, v) in &o.attributes {
            let _ = writeln!(out, "  {k}={v}");
        }
    }
    if o.holders.is_empty() {
        let _ = writeln!(out, "{}  -", header(&format!("{:<10}", "Holders")));
    } else {
        let _ = writeln!(out, "{}", header("Holders"));
        for line in holders(&o.holders).lines() {
            let _ = writeln!(out, "  {line}");
        }
        // devmgrd lists the newest that fit in one message (docs/contract.md).
        let shown = o.holders.len();
        if (shown as u64) < u64::from(o.ref_count) {
            let _ = writeln!(
                out,
                "  … and {} older, not listed (Holders shows the newest {shown})",
                u64::from(o.ref_count) - shown as u64
            );
        }
    }
    out
}
