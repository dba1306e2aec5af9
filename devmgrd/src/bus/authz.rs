//! Who may change things (issue 6). A mutating call (Add, Remove, Stop,
//! Reenable, Bind, Unbind) is allowed to root, to the daemon's own uid (so
//! on a session or embedded bus its owner is trusted), to members of the
//! group given by `--authorized-group`, and to whoever polkit authorizes
//! for the call's action (`org.devmgr.DevMgr1.<verb>`, one per verb, with
//! a forced removal its own: data/org.devmgr.DevMgr1.policy) when polkitd
//! runs on the bus; anyone else gets AccessDenied and nothing changes.
//! polkit may ask the user to authenticate only when the call allows
//! interactive authorization (its header flag). Acquire is open to everyone
//! unless `--restrict-acquire` says it is a mutation too. References are
//! released only by closing their handle: no call drops another client's
//! reference.

use std::sync::Arc;

use zbus::message::Header;
use zbus::Connection;

use crate::bus::peers::{Caller, Peers};

/// What a caller wants to do.
#[derive(Clone, Copy, Debug)]
pub enum Verb {
    Add,
    Remove,
    /// A removal that revokes references.
    RemoveForce,
    Stop,
    Reenable,
    Bind,
    Unbind,
    Acquire,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Add => "add objects",
            Verb::Remove => "remove objects",
            Verb::RemoveForce => "force removals",
            Verb::Stop => "stop objects",
            Verb::Reenable => "re-enable objects",
            Verb::Bind => "bind objects",
            Verb::Unbind => "unbind objects",
            Verb::Acquire => "take references",
        }
    }

    /// The polkit action that authorizes it.
    pub fn action_id(self) -> &'static str {
        match self {
            Verb::Add => "org.devmgr.DevMgr1.add",
            Verb::Remove => "org.devmgr.DevMgr1.remove",
            Verb::RemoveForce => "org.devmgr.DevMgr1.remove-force",
            Verb::Stop => "org.devmgr.DevMgr1.stop",
            Verb::Reenable => "org.devmgr.DevMgr1.reenable",
            Verb::Bind => "org.devmgr.DevMgr1.bind",
            Verb::Unbind => "org.devmgr.DevMgr1.unbind",
            Verb::Acquire => "org.devmgr.DevMgr1.acquire",
        }
    }

    /// Every verb (the policy file must name each one's action), in the
    /// order `GetPermissions` lists them.
    pub const ALL: [Verb; 8] = [
        Verb::Add,
        Verb::Remove,
        Verb::RemoveForce,
        Verb::Stop,
        Verb::Reenable,
        Verb::Bind,
        Verb::Unbind,
        Verb::Acquire,
    ];
}

/// What `GetPermissions` says of one verb for its caller (as logind's
/// `CanPowerOff`): allowed now, allowed after authenticating to polkit, or
/// refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    Yes,
    Challenge,
    No,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Yes => "yes",
            Permission::Challenge => "challenge",
            Permission::No => "no",
        }
    }
}

impl Verb {
    /// The name `GetPermissions` gives it: its polkit action's last part
    /// (`remove-force`).
    pub fn key(self) -> &'static str {
        let action = self.action_id();
        action.rsplit('.').next().unwrap_or(action)
    }
}

/// The rules, fixed at start.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The daemon's own uid (trusted, as root is).
    pub own_uid: u32,
    /// Members of this group (name, gid) may change things.
    pub group: Option<(String, u32)>,
    /// Whether Acquire needs the same rights as a change.
    pub restrict_acquire: bool,
}

impl Policy {
    /// Whether `caller` may do `verb`.
    pub fn check(&self, caller: &Caller, verb: Verb) -> Result<(), proto::Error> {
        if matches!(verb, Verb::Acquire) && !self.restrict_acquire {
            return Ok(());
        }
        let uid = caller.holder.uid;
        if uid == 0 || uid == self.own_uid {
            return Ok(());
        }
        if let Some((_, gid)) = &self.group {
            if caller.groups.contains(gid) {
                return Ok(());
            }
        }
        let needs = match &self.group {
            Some((name, _)) => format!("root or a member of group {name}"),
            None => "root".to_owned(),
        };
        Err(proto::Error::AccessDenied(format!(
            "{} (uid {uid}) may not {}: that needs {needs}",
            caller.holder.bus_name,
            verb.as_str()
        )))
    }
}

/// The gid of group `name`, from /etc/group.
pub fn group_id(name: &str) -> Result<u32, String> {
    let groups = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group: {e}"))?;
    groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let group = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            Some((group, gid))
        })
        .find(|(group, _)| *group == name)
        .map(|(_, gid)| gid)
        .ok_or_else(|| format!("no group named {name:?} in /etc/group"))
}

/// The rules and the callers: what an adapter asks before a change.
#[derive(Clone)]
pub struct Authorizer {
    pub policy: Arc<Policy>,
    pub peers: Peers,
}

impl Authorizer {
    /// The caller of this call, once it is allowed to do `verb`.
    pub async fn allow(
        &self,
        conn: &Connection,
        header: &Header<'_>,
        verb: Verb,
    ) -> Result<Arc<Caller>, proto::Error> {
        let caller = self.caller_of(conn, header).await?;
        let Err(denied) = self.policy.check(&caller, verb) else {
            return Ok(caller);
        };
        match polkit_allows(conn, header, verb).await {
            Ok(true) => Ok(caller),
            Ok(false) => Err(proto::Error::AccessDenied(format!(
                "{denied_text}, and polkit did not authorize {action}",
                denied_text = text_of(denied),
                action = verb.action_id()
            ))),
            Err(why) => {
                tracing::debug!("polkit not consulted: {why}");
                Err(denied)
            }
        }
    }

    /// What the caller of this call may do, verb by verb, without doing
    /// it and without asking anyone to authenticate: what a client (the
    /// Cockpit page) needs to offer only the actions that can succeed.
    pub async fn permissions(
        &self,
        conn: &Connection,
        header: &Header<'_>,
    ) -> Result<Vec<(&'static str, Permission)>, proto::Error> {
        let caller = self.caller_of(conn, header).await?;
        let mut answer = Vec::with_capacity(Verb::ALL.len());
        // Where polkit does not answer once (no polkitd on this bus), it is
        // not asked seven more times.
        let mut polkit_answers = true;
        for verb in Verb::ALL {
            let permission = if self.policy.check(&caller, verb).is_ok() {
                Permission::Yes
            } else if !polkit_answers {
                Permission::No
            } else {
                polkit_permission(conn, header, verb)
                    .await
                    .unwrap_or_else(|why| {
                        tracing::debug!("polkit not consulted: {why}");
                        polkit_answers = false;
                        Permission::No
                    })
            };
            answer.push((verb.key(), permission));
        }
        Ok(answer)
    }

    /// The caller of this call (its credentials, asked once per connection).
    async fn caller_of(
        &self,
        conn: &Connection,
        header: &Header<'_>,
    ) -> Result<Arc<Caller>, proto::Error> {
        let sender = header
            .sender()
            .ok_or_else(|| proto::Error::AccessDenied("the call has no sender".into()))?;
        self.peers.caller(conn, sender).await
    }
}

fn text_of(e: proto::Error) -> String {
    match e {
        proto::Error::AccessDenied(text) => text,
        other => other.to_string(),
    }
}

/// Asks polkit (on the bus the call came over, where it lives with the
/// caller) whether the caller may do `verb`. Err: polkit did not answer
/// (it does not run there: on a session or embedded bus, say).
async fn polkit_allows(conn: &Connection, header: &Header<'_>, verb: Verb) -> Result<bool, String> {
    let interactive = header
        .primary()
        .flags()
        .contains(zbus::message::Flags::ALLOW_INTERACTIVE_AUTH);
    let result = polkit_check(conn, header, verb, interactive).await?;
    Ok(result.is_authorized)
}

/// polkit's answer for `verb` with no interaction: a challenge means the
/// caller could be authorized by authenticating.
async fn polkit_permission(
    conn: &Connection,
    header: &Header<'_>,
    verb: Verb,
) -> Result<Permission, String> {
    let result = polkit_check(conn, header, verb, false).await?;
    Ok(if result.is_authorized {
        Permission::Yes
    } else if result.is_challenge {
        Permission::Challenge
    } else {
        Permission::No
    })
}

async fn polkit_check(
    conn: &Connection,
    header: &Header<'_>,
    verb: Verb,
    interactive: bool,
) -> Result<zbus_polkit::policykit1::AuthorizationResult, String> {
    use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};
    let subject = Subject::new_for_message_header(header).map_err(|e| e.to_string())?;
    let authority = AuthorityProxy::new(conn).await.map_err(|e| e.to_string())?;
    let flags = if interactive {
        CheckAuthorizationFlags::ALLOW_USER_INTERACTION
    } else {
        CheckAuthorizationFlags::empty()
    };
    let details = std::collections::HashMap::new();
    authority
        .check_authorization(&subject, verb.action_id(), &details, flags, "")
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, groups: &[u32]) -> Caller {
        Caller {
            holder: Arc::new(drivers::Holder {
                key: 1,
                bus_name: ":1.9".into(),
                uid,
                pid: 1,
            }),
            groups: groups.to_vec(),
        }
    }

    /// Every verb's action is in the polkit policy that ships, once.
    #[test]
    fn the_polkit_policy_names_every_action() {
        let policy = include_str!("../../../data/org.devmgr.DevMgr1.policy");
        for verb in Verb::ALL {
            let action = format!("<action id=\"{}\">", verb.action_id());
            assert_eq!(policy.matches(&action).count(), 1, "{action}");
        }
        assert_eq!(policy.matches("<action id=").count(), Verb::ALL.len());
    }

    #[test]
    fn root_the_owner_and_the_group_may_change_things() {
        let policy = Policy {
            own_uid: 1000,
            group: Some(("devmgr".into(), 990)),
            restrict_acquire: false,
        };
        assert!(policy.check(&caller(0, &[]), Verb::Remove).is_ok());
        assert!(policy.check(&caller(1000, &[]), Verb::Add).is_ok());
        assert!(policy.check(&caller(1001, &[990]), Verb::Stop).is_ok());
        let denied = policy.check(&caller(1001, &[5]), Verb::Remove);
        assert!(matches!(denied, Err(proto::Error::AccessDenied(_))));
        assert!(policy.check(&caller(1001, &[]), Verb::Acquire).is_ok());
        let strict = Policy {
            restrict_acquire: true,
            ..policy
        };
        assert!(strict.check(&caller(1001, &[]), Verb::Acquire).is_err());
    }
}
