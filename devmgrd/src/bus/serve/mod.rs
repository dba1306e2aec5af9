//! devmgrd's face on the bus: one dispatcher for every method call, with no
//! per-object state. Calls on `/org/devmgr/DevMgr1` (Manager, ObjectManager)
//! and on `/org/devmgr/DevMgr1/objects/<id>` (Object) are answered from the
//! model, through its owner, so a million objects cost the daemon nothing
//! beyond the engine's own bytes (docs/benchmarks.md, "Memory"). The
//! standard interfaces (Properties, Introspectable, Peer) are answered
//! here too. zbus's ObjectServer is not used: it keeps a node and an
//! interface instance per object, and its Introspect nests every child's
//! interfaces (docs/notes/zbus6.md).
//!
//! Nothing sent is larger than the bus accepts ([`limits`]): a reply that
//! would be is answered `org.freedesktop.DBus.Error.LimitsExceeded` instead.

pub mod args;
mod introspect;
pub mod limits;
mod manager;
mod object;
pub mod properties;
pub mod wire;

use std::future::Future;
use std::sync::Arc;

use futures_util::StreamExt;
use zbus::message::{Flags, Header, Type};
use zbus::{fdo, Connection, DBusError, MatchRule, Message, MessageStream};

use crate::owner::handle::ModelHandle;

/// What every call needs: the way to the model's owner, the handles given
/// out, the callers' credentials, and the bus's message size limit.
#[derive(Clone)]
pub struct Shared {
    pub handle: ModelHandle,
    pub handles: crate::bus::handles::Handles,
    pub authz: crate::bus::authz::Authorizer,
    /// The largest message the bus accepts from us.
    pub max_message: usize,
    /// Whether changes can be kept now (`--state-dir` on a full disk).
    pub writable: crate::state::store::Writable,
}

impl Shared {
    /// Refuses a change while the state directory cannot keep it.
    pub fn writable(&self) -> Result<(), Failure> {
        self.writable
            .check()
            .map_err(|why| Failure::Ours(proto::Error::QuotaExceeded(why)))
    }

    /// How many bytes one object's `Holders` may take in any message.
    pub fn holders_budget(&self) -> usize {
        (self.max_message / 8).min(4 * 1024 * 1024)
    }
}

/// Why a call failed: one of the contract's errors, or a standard one.
#[derive(Debug)]
pub enum Failure {
    Ours(proto::Error),
    Standard(fdo::Error),
}

impl From<proto::Error> for Failure {
    fn from(e: proto::Error) -> Self {
        Failure::Ours(e)
    }
}

impl From<fdo::Error> for Failure {
    fn from(e: fdo::Error) -> Self {
        Failure::Standard(e)
    }
}

/// What a call handler returns.
pub type Answer = Result<(), Failure>;

/// One method call being answered.
pub struct Call {
    pub conn: Connection,
    pub msg: Message,
    pub shared: Shared,
}

impl Call {
    /// The call's header.
    pub fn header(&self) -> Header<'_> {
        self.msg.header()
    }

    /// The arguments, if they have the signature `T` has.
    pub fn args<T>(&self) -> Result<T, Failure>
    where
        T: serde::de::DeserializeOwned + zbus::Type,
    {
        let body = self.msg.body();
        let signature = body.signature().to_string();
        body.deserialize::<T>().map_err(|e| {
            Failure::Standard(fdo::Error::InvalidArgs(format!(
                "arguments ({signature}) do not fit {}: {e}",
                T::SIGNATURE
            )))
        })
    }

    /// Replies with `body`, unless the reply would be bigger than the bus
    /// accepts (then LimitsExceeded, naming `instead`).
    pub async fn reply<B>(&self, body: &B) -> Answer
    where
        B: serde::Serialize + zbus::DynamicType,
    {
        let built = Message::method_return(&self.header()).build(body);
        self.send_reply(built).await
    }

    /// Sends a reply built elsewhere (a big one, built off the runtime).
    pub async fn send_reply(&self, built: zbus::Result<Message>) -> Answer {
        if self.no_reply_expected() {
            return Ok(());
        }
        let reply = match built {
            Ok(reply) if reply.data().len() <= self.shared.max_message => reply,
            Ok(reply) => return Err(too_big(reply.data().len(), self.shared.max_message)),
            Err(zbus::Error::ExcessData) => {
                return Err(too_big(limits::PROTOCOL_MAX, self.shared.max_message))
            }
            Err(e) => return Err(fdo::Error::Failed(format!("cannot build the reply: {e}")).into()),
        };
        if let Err(e) = self.conn.send(&reply).await {
            tracing::debug!("could not reply: {e}");
        }
        Ok(())
    }

    fn no_reply_expected(&self) -> bool {
        self.header()
            .primary()
            .flags()
            .contains(Flags::NO_REPLY_EXPECTED)
    }

    async fn fail(&self, failure: Failure) {
        if self.no_reply_expected() {
            return;
        }
        let header = self.header();
        let reply = match failure {
            Failure::Ours(e) => e.create_reply(&header),
            Failure::Standard(e) => e.create_reply(&header),
        };
        match reply {
            // An error's text is ours and short; checked all the same.
            Ok(reply) if reply.data().len() <= self.shared.max_message => {
                if let Err(e) = self.conn.send(&reply).await {
                    tracing::debug!("could not reply: {e}");
                }
            }
            Ok(_) | Err(_) => tracing::warn!("an error reply could not be built"),
        }
    }
}

/// The standard error for a reply that cannot fit in one message.
pub fn too_big(size: usize, max: usize) -> Failure {
    Failure::Standard(fdo::Error::LimitsExceeded(format!(
        "the reply would take at least {size} bytes, and the bus accepts at most {max}: \
         use org.devmgr.DevMgr1.Manager.ListObjects, which pages"
    )))
}

/// Starts answering calls on `conn`; the stream is open when this returns,
/// so no call made after it (after the name is claimed) is missed.
pub async fn start(conn: &Connection, shared: Shared) -> zbus::Result<impl Future<Output = ()>> {
    let mut rule = MatchRule::builder().msg_type(Type::MethodCall);
    if let Some(unique) = conn.unique_name() {
        rule = rule.destination(unique.as_ref());
    }
    // Calls queue here while the runtime is busy; beyond this, the socket
    // is read no further (back-pressure) rather than growing without end.
    let queued = std::num::NonZeroUsize::new(4096);
    let mut calls = MessageStream::for_match_rule(rule.build()?, conn, queued).await?;
    let conn = conn.clone();
    let shared = Arc::new(shared);
    Ok(async move {
        while let Some(next) = calls.next().await {
            let Ok(msg) = next else {
                continue;
            };
            let call = Call {
                conn: conn.clone(),
                msg,
                shared: Shared::clone(&shared),
            };
            // Each call waits for its own reply from the owner; none waits
            // for another.
            tokio::spawn(async move {
                if let Err(failure) = route(&call).await {
                    call.fail(failure).await;
                }
            });
        }
    })
}

/// Where a path leads.
enum Node {
    Manager,
    Object(drivers::ObjectId),
    /// A path above the manager, or the `objects` node: only children.
    Inner(&'static str),
}

fn node_at(path: &str) -> Option<Node> {
    match path {
        "/" => Some(Node::Inner("org")),
        "/org" => Some(Node::Inner("devmgr")),
        "/org/devmgr" => Some(Node::Inner("DevMgr1")),
        proto::MANAGER_PATH => Some(Node::Manager),
        "/org/devmgr/DevMgr1/objects" => Some(Node::Inner("")),
        _ => proto::parse_object_path(path).map(|id| Node::Object(drivers::ObjectId(id))),
    }
}

const PEER: &str = "org.freedesktop.DBus.Peer";
const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const OBJECT_MANAGER: &str = "org.freedesktop.DBus.ObjectManager";

async fn route(call: &Call) -> Answer {
    let header = call.header();
    let (Some(path), Some(member)) = (header.path(), header.member()) else {
        return Err(fdo::Error::Failed("a method call needs a path and a member".into()).into());
    };
    let path = path.as_str().to_owned();
    let member = member.as_str().to_owned();
    let interface = header.interface().map(|i| i.as_str().to_owned());
    drop(header);
    // Peer answers on every path (D-Bus specification).
    if interface.as_deref() == Some(PEER) || (interface.is_none() && peer_member(&member)) {
        return peer(call, &member).await;
    }
    let Some(node) = node_at(&path) else {
        return Err(fdo::Error::UnknownObject(format!("Unknown object '{path}'")).into());
    };
    match node {
        Node::Manager => manager::call(call, interface.as_deref(), &member).await,
        Node::Object(id) => object::call(call, id, interface.as_deref(), &member).await,
        Node::Inner(child) => match (interface.as_deref(), member.as_str()) {
            (Some(INTROSPECTABLE) | None, "Introspect") => {
                let xml = if child.is_empty() {
                    introspect::objects_node(call).await?
                } else {
                    introspect::inner(child)
                };
                call.reply(&(xml,)).await
            }
            (Some(i), _) if i != INTROSPECTABLE => {
                Err(fdo::Error::UnknownInterface(format!("Unknown interface '{i}'")).into())
            }
            _ => Err(unknown_method(&member)),
        },
    }
}

fn peer_member(member: &str) -> bool {
    matches!(member, "Ping" | "GetMachineId")
}

async fn peer(call: &Call, member: &str) -> Answer {
    match member {
        "Ping" => call.reply(&()).await,
        "GetMachineId" => {
            let id = std::fs::read_to_string("/etc/machine-id")
                .or_else(|_| std::fs::read_to_string("/var/lib/dbus/machine-id"))
                .map_err(|e| fdo::Error::Failed(format!("no machine id: {e}")))?;
            call.reply(&(id.trim().to_owned(),)).await
        }
        _ => Err(unknown_method(member)),
    }
}

/// The standard error for a member a node does not have.
pub fn unknown_method(member: &str) -> Failure {
    fdo::Error::UnknownMethod(format!("Unknown method '{member}'")).into()
}

/// The standard error for an interface a node does not have.
pub fn unknown_interface(interface: &str) -> Failure {
    fdo::Error::UnknownInterface(format!("Unknown interface '{interface}'")).into()
}

/// Properties.Get/GetAll/Set for a node whose properties come from `read`
/// (the named interface's properties, all of them; None: no such
/// interface here).
pub async fn properties<F, Fut>(call: &Call, member: &str, read: F) -> Answer
where
    F: FnOnce(String) -> Fut,
    Fut: Future<
        Output = Result<
            Option<std::collections::HashMap<&'static str, zbus::Variant<'static>>>,
            Failure,
        >,
    >,
{
    match member {
        "Get" => {
            let (interface, name): (String, String) = call.args()?;
            let all = read(interface.clone())
                .await?
                .ok_or_else(|| unknown_interface(&interface))?;
            let value = all.get(name.as_str()).ok_or_else(|| {
                Failure::Standard(fdo::Error::UnknownProperty(format!(
                    "Unknown property '{name}'"
                )))
            })?;
            call.reply(&(value,)).await
        }
        "GetAll" => {
            let (interface,): (String,) = call.args()?;
            let all = read(interface.clone())
                .await?
                .ok_or_else(|| unknown_interface(&interface))?;
            call.reply(&(all,)).await
        }
        "Set" => {
            let (interface, name, _): (String, String, zbus::OwnedVariant) = call.args()?;
            let all = read(interface.clone())
                .await?
                .ok_or_else(|| unknown_interface(&interface))?;
            if all.contains_key(name.as_str()) {
                Err(fdo::Error::PropertyReadOnly(format!("Property '{name}' is read-only")).into())
            } else {
                Err(fdo::Error::UnknownProperty(format!("Unknown property '{name}'")).into())
            }
        }
        _ => Err(unknown_method(member)),
    }
}

/// Whether `interface` (or none given) names `wanted`.
pub fn is(interface: Option<&str>, wanted: &str) -> bool {
    interface.is_none_or(|i| i == wanted)
}
