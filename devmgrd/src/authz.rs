//! Who may change things (issue 6). A mutating call (Add, Remove, Stop,
//! Reenable, Bind, Unbind) is allowed to root, to the daemon's own uid (so
//! on a session or embedded bus its owner is trusted), and to members of the
//! group given by `--authorized-group`; anyone else gets AccessDenied and
//! nothing changes. Acquire is open to everyone unless
//! `--restrict-acquire` says it is a mutation too. References are released
//! only by closing their handle: no call drops another client's reference.
//! (polkit is not consulted yet.)

use std::sync::Arc;

use zbus::message::Header;
use zbus::Connection;

use crate::peers::{Caller, Peers};

/// What a caller wants to do.
#[derive(Clone, Copy, Debug)]
pub enum Verb {
    Add,
    Remove,
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
            Verb::Stop => "stop objects",
            Verb::Reenable => "re-enable objects",
            Verb::Bind => "bind objects",
            Verb::Unbind => "unbind objects",
            Verb::Acquire => "take references",
        }
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
        let sender = header
            .sender()
            .ok_or_else(|| proto::Error::AccessDenied("the call has no sender".into()))?;
        let caller = self.peers.caller(conn, sender).await?;
        self.policy.check(&caller, verb)?;
        Ok(caller)
    }
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
