//! The commands that change things: add, remove (with --wait), stop,
//! reenable, bind and unbind.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use zbus::{
    Connection, MatchRule, MessageStream, ObjectPath, OwnedObjectPath, OwnedVariant, Variant,
};

use crate::cli::{AddCommand, RemoveArgs};
use crate::failure::{Failure, Outcome};
use crate::model::{self, ObjectInfo};
use crate::query::print_json;
use crate::render;

fn root() -> ObjectPath<'static> {
    ObjectPath::from_static_str_unchecked(proto::NO_OBJECT_PATH)
}

pub async fn add(conn: &Connection, what: AddCommand, json: bool) -> Outcome {
    let manager = model::manager(conn).await?;
    let (kind, name, parent, driver, luns, attributes) = match what {
        AddCommand::Driver { name } => ("driver", name, None, None, None, Vec::new()),
        AddCommand::Host {
            name,
            driver,
            luns,
            attributes,
            parent,
        } => ("host", name, parent, driver, luns, attributes),
        AddCommand::Device {
            name,
            parent,
            driver,
            attributes,
        } => ("device", name, Some(parent), driver, None, attributes),
    };
    let parent = match parent {
        Some(p) => Some(model::resolve(conn, &p, None).await?),
        None => None,
    };
    let driver = match driver {
        Some(d) => Some(model::resolve(conn, &d, Some("driver")).await?),
        None => None,
    };
    let mut options: HashMap<&str, Variant<'_>> = HashMap::new();
    let driver_path = driver
        .as_deref()
        .map(ObjectPath::try_from)
        .transpose()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    if let Some(d) = driver_path {
        options.insert(proto::add_options::DRIVER, Variant::from(d));
    }
    if let Some(n) = luns {
        options.insert(proto::add_options::LUNS, Variant::from(n));
    }
    if !attributes.is_empty() {
        let map: HashMap<String, String> = attributes.into_iter().collect();
        options.insert(proto::add_options::ATTRIBUTES, Variant::from(map));
    }
    let parent_path = match parent.as_deref() {
        Some(p) => ObjectPath::try_from(p).map_err(|e| Failure::Usage(e.to_string()))?,
        None => root(),
    };
    let path = manager.add(kind, &name, &parent_path, options).await?;
    let info = model::read_object(conn, path.as_str()).await?;
    if json {
        return print_json(&info);
    }
    outln!("added {} (id {}, {})", info.label(), info.id, info.path);
    Ok(())
}

/// Every signal devmgrd sends (or only those about `path`), from now on.
pub async fn signals(conn: &Connection, path: Option<&str>) -> Outcome<MessageStream> {
    let mut rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(proto::BUS_NAME);
    if let Some(p) = path {
        rule = rule.path(p.to_owned());
    }
    let rule = rule.build().map_err(Failure::from)?;
    // A deep queue: signals must wait here rather than stall the bus reader.
    Ok(MessageStream::for_match_rule(rule, conn, std::num::NonZeroUsize::new(1 << 16)).await?)
}

#[derive(Serialize)]
struct RemoveReport {
    object: String,
    label: String,
    outcome: String,
    dry_run: bool,
    pending: Vec<ObjectInfo>,
    /// With --wait: `removed`, `cancelled`, `timed-out` or `interrupted`.
    waited: Option<String>,
}

/// How a wait for a removal ended.
enum WaitEnd {
    Removed,
    Cancelled,
    /// It stopped (its driver failed, or someone stopped it).
    Failed,
    TimedOut,
    Interrupted,
}

pub async fn remove(conn: &Connection, args: RemoveArgs, json: bool) -> Outcome {
    let path = model::resolve(conn, &args.obj, None).await?;
    let before = model::read_object(conn, &path).await?;
    let object = model::object(conn, &path).await?;
    let mut options: HashMap<&str, Variant<'_>> = HashMap::new();
    if args.force {
        options.insert(proto::remove_options::FORCE, Variant::from(true));
    }
    if args.dry_run {
        options.insert(proto::remove_options::DRY_RUN, Variant::from(true));
    }
    if args.detach_mounts {
        options.insert(proto::remove_options::DETACH_MOUNTS, Variant::from(true));
    }
    if let Some(t) = args.timeout {
        options.insert(proto::remove_options::TIMEOUT_SEC, Variant::from(t));
    }
    if let Some(on) = args.on_timeout {
        options.insert(
            proto::remove_options::ON_TIMEOUT,
            Variant::from(on.as_str()),
        );
    }
    let waiting = args.wait.is_some() && !args.dry_run;
    let signals = if waiting {
        // Ctrl-C is caught from before the call: one pressed while the
        // report prints must end the wait (exit 3), not kill devctl.
        let interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| Failure::Failed(format!("cannot catch Ctrl-C: {e}")))?;
        // Subscribed before the call, so no signal of this removal is missed.
        Some((signals(conn, None).await?, interrupt))
    } else {
        None
    };
    let (outcome, pending) = object.remove(options).await?;
    let mut pending_info = Vec::new();
    for p in &pending {
        // One that completed meanwhile has nothing left to report.
        if let Ok(info) = model::read_object(conn, p.as_str()).await {
            pending_info.push(info);
        }
    }
    let mut report = RemoveReport {
        object: path.clone(),
        label: before.label(),
        outcome: outcome.clone(),
        dry_run: args.dry_run,
        pending: pending_info,
        waited: None,
    };
    if !json {
        print_outcome(&report, before.origin == "udev")?;
    }
    let mut result = Ok(());
    if let (Some(signals), "pending") = (signals, outcome.as_str()) {
        let limit = args.wait.flatten().map(Duration::from_secs);
        let (signals, interrupt) = signals;
        let end = wait_for_removal(signals, interrupt, &path, limit).await?;
        let label = &report.label;
        let (word, outcome) = match end {
            WaitEnd::Removed => ("removed", Ok(())),
            WaitEnd::Failed => {
                let error = model::read_object(conn, &path)
                    .await
                    .map(|o| o.last_error)
                    .unwrap_or_default();
                let why = if error.is_empty() {
                    format!("the removal of {label} was called off: it is stopped")
                } else {
                    format!("the removal of {label} failed: {error}; it is stopped")
                };
                ("failed", Err(Failure::Failed(why)))
            }
            WaitEnd::Cancelled => (
                "cancelled",
                Err(Failure::Failed(format!(
                    "the removal of {label} was cancelled; it is back"
                ))),
            ),
            WaitEnd::TimedOut => (
                "timed-out",
                Err(Failure::StillPending(format!(
                    "gave up waiting after {}s; the removal of {label} is still pending",
                    limit.map_or(0, |l| l.as_secs())
                ))),
            ),
            WaitEnd::Interrupted => (
                "interrupted",
                Err(Failure::StillPending(format!(
                    "stopped waiting; the removal of {label} is still pending"
                ))),
            ),
        };
        if !json && matches!(end, WaitEnd::Removed) {
            outln!("removed {label}");
        }
        report.waited = Some(word.to_owned());
        result = outcome;
    }
    if json {
        print_json(&report)?;
    }
    result
}

fn print_outcome(report: &RemoveReport, real: bool) -> Outcome {
    let label = &report.label;
    let would = if report.dry_run { "would be " } else { "" };
    if report.outcome != "pending" {
        outln!("{label}: {would}removed");
        return Ok(());
    }
    // What the removal waits for: holders, or a driver that failed. Objects
    // that only wait on their children, or go with their parent, say nothing.
    let waits: Vec<&ObjectInfo> = report
        .pending
        .iter()
        .filter(|o| !o.holders.is_empty() || (!o.last_error.is_empty() && o.state == "stopped"))
        .collect();
    if waits.is_empty() {
        let who = if real {
            "the kernel removes the device"
        } else {
            "its driver lets go of it"
        };
        let when = if report.dry_run {
            "would be"
        } else {
            "is being"
        };
        outln!("{label}: {when} removed: nothing holds it; {who}");
        return Ok(());
    }
    outln!("{label}: {would}disabled, removal pending; it waits for:");
    for o in waits {
        outln!(
            "  {} ({}, {} reference{})",
            o.label(),
            render::state(&o.state, 0),
            o.ref_count,
            if o.ref_count == 1 { "" } else { "s" }
        );
        for h in &o.holders {
            outln!("    {}", render::holder_sentence(h));
        }
        // A stale error from an earlier attempt is not news.
        if !o.last_error.is_empty() && o.state == "stopped" {
            outln!("    its driver action failed: {}", o.last_error);
        }
    }
    Ok(())
}

/// Waits for `path`'s RemovalCompleted, its return to `live` (cancelled), the
/// limit, or Ctrl-C — whichever comes first. No polling: signals only.
async fn wait_for_removal(
    mut signals: MessageStream,
    mut interrupt: tokio::signal::unix::Signal,
    path: &str,
    limit: Option<Duration>,
) -> Outcome<WaitEnd> {
    let deadline = async {
        match limit {
            Some(l) => tokio::time::sleep(l).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => return Ok(WaitEnd::TimedOut),
            _ = interrupt.recv() => return Ok(WaitEnd::Interrupted),
            msg = signals.next() => {
                let Some(Ok(msg)) = msg else {
                    return Err(Failure::Unreachable("lost the bus while waiting".into()));
                };
                let header = msg.header();
                match header.member().map(|m| m.as_str()) {
                    Some("RemovalCompleted") => {
                        if let Ok((object, _, _)) =
                            msg.body().deserialize::<(OwnedObjectPath, String, String)>()
                        {
                            if object.as_str() == path {
                                return Ok(WaitEnd::Removed);
                            }
                        }
                    }
                    Some("PropertiesChanged")
                        if header.path().is_some_and(|p| p.as_str() == path) =>
                    {
                        if let Ok((_, changed, _)) = msg.body().deserialize::<(
                            String,
                            HashMap<String, OwnedVariant>,
                            Vec<String>,
                        )>() {
                            let state = changed
                                .get("State")
                                .and_then(|v| v.try_clone().ok())
                                .and_then(|v| String::try_from(v).ok());
                            match state.as_deref() {
                                Some("live") => return Ok(WaitEnd::Cancelled),
                                Some("stopped") => return Ok(WaitEnd::Failed),
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Stop, Reenable, Bind, Unbind: one call, then the object as it is now.
pub enum Simple {
    Stop,
    Reenable,
    Bind(String),
    Unbind,
}

pub async fn simple(conn: &Connection, obj: &str, action: Simple, json: bool) -> Outcome {
    let path = model::resolve(conn, obj, None).await?;
    let object = model::object(conn, &path).await?;
    let none = HashMap::new;
    let done = match action {
        Simple::Stop => {
            object.stop(none()).await?;
            "stopped".to_owned()
        }
        Simple::Reenable => {
            object.reenable(none()).await?;
            "re-enabled".to_owned()
        }
        Simple::Bind(driver) => {
            let driver = model::resolve(conn, &driver, Some("driver")).await?;
            let driver_path =
                ObjectPath::try_from(driver.as_str()).map_err(|e| Failure::Usage(e.to_string()))?;
            object.bind(&driver_path, none()).await?;
            let d = model::read_object(conn, &driver).await?;
            format!("bound to {}", d.label())
        }
        Simple::Unbind => {
            object.unbind(none()).await?;
            "unbound".to_owned()
        }
    };
    let info = model::read_object(conn, &path).await?;
    if json {
        return print_json(&info);
    }
    outln!(
        "{}: {done} (now {})",
        info.label(),
        render::state(&info.state, 0)
    );
    Ok(())
}
