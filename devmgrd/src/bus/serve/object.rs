//! `org.devmgr.DevMgr1.Object` at `/org/devmgr/DevMgr1/objects/<id>`, for
//! every object at once: decode the call, send one command to the model's
//! owner, map the typed error. A path whose object is not in the model is
//! `UnknownObject`, as for any path nothing is exported at.

use std::collections::HashMap;

use drivers::{Model, ObjectId, OnTimeout, ProbeOptions, RemoveOptions};
use zbus::{fdo, OwnedFd, OwnedObjectPath};

use super::args::{flag, no_options, optional_u32, path_of, required, Options};
use super::{introspect, is, properties, unknown_interface, unknown_method, Answer, Call, Failure};
use crate::bus::authz::Verb;
use crate::bus::errors::{bad_option, from_engine, from_owner};
use crate::owner::handle::now_micros;

/// Answers a call on object `id`.
pub async fn call(call: &Call, id: ObjectId, interface: Option<&str>, member: &str) -> Answer {
    match (interface, member) {
        (Some(super::PROPERTIES), _) | (None, "Get" | "GetAll" | "Set") => {
            let budget = call.shared.holders_budget();
            super::properties(call, member, |wanted| async move {
                let info = read(call, id, |m, id| m.get(id).ok()).await?;
                Ok(if wanted == proto::OBJECT_INTERFACE {
                    Some(properties::object_properties(&info, budget))
                } else if properties::STANDARD_INTERFACES.contains(&wanted.as_str()) {
                    Some(HashMap::new())
                } else {
                    None
                })
            })
            .await
        }
        (Some(super::INTROSPECTABLE) | None, "Introspect") => {
            read(call, id, |_, _| Some(())).await?;
            call.reply(&(introspect::object(),)).await
        }
        (Some(i), _) if i != proto::OBJECT_INTERFACE => Err(unknown_interface(i)),
        _ if is(interface, proto::OBJECT_INTERFACE) => method(call, id, member).await,
        _ => Err(unknown_method(member)),
    }
}

fn unknown_object(id: ObjectId) -> Failure {
    fdo::Error::UnknownObject(format!("Unknown object '{}'", path_of(Some(id)))).into()
}

/// Reads from object `id` as it stands once every earlier change is
/// published; `None` from `f` means the object is not there.
async fn read<R: Send + 'static>(
    call: &Call,
    id: ObjectId,
    f: impl FnOnce(&Model, ObjectId) -> Option<R> + Send + 'static,
) -> Result<R, Failure> {
    call.shared
        .handle
        .read_about(id, move |m| f(m, id))
        .await
        .map_err(from_owner)?
        .ok_or_else(|| unknown_object(id))
}

/// Runs `f` on object `id` if it is in the model.
async fn run<R: Send + 'static>(
    call: &Call,
    id: ObjectId,
    f: impl FnOnce(&mut Model, ObjectId) -> drivers::Result<R> + Send + 'static,
) -> Result<R, Failure> {
    call.shared
        .handle
        .call_about(id, move |m| m.contains(id).then(|| f(m, id)))
        .await
        .map_err(from_owner)?
        .ok_or_else(|| unknown_object(id))?
        .map_err(|e| from_engine(e).into())
}

async fn allow(
    call: &Call,
    verb: Verb,
) -> Result<std::sync::Arc<crate::bus::peers::Caller>, Failure> {
    let header = call.header();
    Ok(call.shared.authz.allow(&call.conn, &header, verb).await?)
}

fn warn_quota(call: &Call, failure: &Failure) {
    if let (Failure::Ours(proto::Error::QuotaExceeded(why)), Some(sender)) =
        (failure, call.header().sender())
    {
        // Once per client, not once per refused call.
        call.shared.authz.peers.warn_once(sender, why);
    }
}

async fn method(call: &Call, id: ObjectId, member: &str) -> Answer {
    match member {
        "Acquire" => {
            let (reason, options): (String, Options) = call.args()?;
            no_options(&options)?;
            let caller = allow(call, Verb::Acquire).await?;
            let holder = caller.holder.clone();
            let (theirs, ours) = std::io::pipe()
                .map_err(|e| proto::Error::QuotaExceeded(format!("cannot make a handle: {e}")))?;
            let reference = run(call, id, move |m, id| {
                m.acquire(id, holder, reason, now_micros())
            })
            .await;
            if let Err(failure) = &reference {
                warn_quota(call, failure);
            }
            let reference = reference?;
            call.shared
                .handles
                .watch(call.shared.handle.clone(), reference, ours);
            let fd = OwnedFd::from(std::os::fd::OwnedFd::from(theirs));
            // Passing the handle may need a descriptor too; if none is left,
            // the reference goes (our end closes with its watcher) and the
            // caller learns why, typed.
            match zbus::Message::method_return(&call.header()).build(&(fd,)) {
                Ok(reply) => call.send_reply(Ok(reply)).await,
                Err(e) => Err(proto::Error::QuotaExceeded(format!(
                    "cannot pass the handle (out of file descriptors?): {e}"
                ))
                .into()),
            }
        }
        "Remove" => {
            use proto::remove_options as keys;
            let (mut options,): (Options,) = call.args()?;
            let force = flag(&mut options, keys::FORCE)?;
            let detach_mounts = flag(&mut options, keys::DETACH_MOUNTS)?;
            // Taking users away (references or the kernel's mounts) is a
            // forced removal's right.
            let verb = if force || detach_mounts {
                Verb::RemoveForce
            } else {
                Verb::Remove
            };
            allow(call, verb).await?;
            let dry_run = flag(&mut options, keys::DRY_RUN)?;
            if !dry_run {
                call.shared.writable()?;
            }
            let timeout = optional_u32(&mut options, keys::TIMEOUT_SEC)?;
            let on_timeout = match options.remove(keys::ON_TIMEOUT) {
                None => OnTimeout::Revoke,
                Some(v) => <&str>::try_from(&v)
                    .map_err(|e| bad_option(keys::ON_TIMEOUT, e))?
                    .parse()
                    .map_err(|e| bad_option(keys::ON_TIMEOUT, e))?,
            };
            no_options(&options)?;
            let options = RemoveOptions {
                force,
                dry_run,
                timeout: timeout.map(|s| (u64::from(s) * 1_000_000, on_timeout)),
                detach_mounts,
            };
            let report = run(call, id, move |m, id| m.remove(id, options, now_micros())).await?;
            let pending: Vec<OwnedObjectPath> =
                report.pending.iter().map(|p| path_of(Some(p.id))).collect();
            call.reply(&(report.outcome.to_string(), pending)).await
        }
        "Stop" => {
            let (options,): (Options,) = call.args()?;
            allow(call, Verb::Stop).await?;
            call.shared.writable()?;
            no_options(&options)?;
            run(call, id, |m, id| m.stop(id)).await?;
            call.reply(&()).await
        }
        "Reenable" => {
            let (options,): (Options,) = call.args()?;
            allow(call, Verb::Reenable).await?;
            call.shared.writable()?;
            no_options(&options)?;
            run(call, id, |m, id| m.reenable(id)).await?;
            call.reply(&()).await
        }
        "Bind" => {
            let (driver, mut options): (OwnedObjectPath, Options) = call.args()?;
            allow(call, Verb::Bind).await?;
            call.shared.writable()?;
            let driver = required(&driver, "driver")?;
            let luns = optional_u32(&mut options, proto::add_options::LUNS)?;
            no_options(&options)?;
            run(call, id, move |m, id| {
                m.bind(id, driver, ProbeOptions { luns })
            })
            .await?;
            call.reply(&()).await
        }
        "Unbind" => {
            let (mut options,): (Options,) = call.args()?;
            allow(call, Verb::Unbind).await?;
            call.shared.writable()?;
            let force = flag(&mut options, "force")?;
            no_options(&options)?;
            run(call, id, move |m, id| m.unbind(id, force)).await?;
            call.reply(&()).await
        }
        _ => Err(unknown_method(member)),
    }
}
