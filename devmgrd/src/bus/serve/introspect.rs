//! Introspection XML: the contract's interfaces come from the checked-in
//! `data/org.devmgr.DevMgr1.xml` (so what is served is what is documented),
//! the standard ones are written here. A node lists its children but never
//! their interfaces, and the `objects` node lists its children only while
//! the list stays small beside the bus's message limit.

use std::sync::OnceLock;

use super::{Call, Failure};
use crate::bus::errors::from_owner;

const CONTRACT: &str = include_str!("../../../../data/org.devmgr.DevMgr1.xml");

const DOCTYPE: &str = "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n";

const STANDARD: &str = r#"  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping"/>
    <method name="GetMachineId">
      <arg type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect">
      <arg type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg type="v" direction="out"/>
    </method>
    <method name="Set">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="in"/>
    </method>
    <method name="GetAll">
      <arg name="interface_name" type="s" direction="in"/>
      <arg type="a{sv}" direction="out"/>
    </method>
    <signal name="PropertiesChanged">
      <arg name="interface_name" type="s"/>
      <arg name="changed_properties" type="a{sv}"/>
      <arg name="invalidated_properties" type="as"/>
    </signal>
  </interface>
"#;

const OBJECT_MANAGER: &str = r#"  <interface name="org.freedesktop.DBus.ObjectManager">
    <method name="GetManagedObjects">
      <arg name="object_paths_interfaces_and_properties" type="a{oa{sa{sv}}}" direction="out"/>
    </method>
    <signal name="InterfacesAdded">
      <arg name="object_path" type="o"/>
      <arg name="interfaces_and_properties" type="a{sa{sv}}"/>
    </signal>
    <signal name="InterfacesRemoved">
      <arg name="object_path" type="o"/>
      <arg name="interfaces" type="as"/>
    </signal>
  </interface>
"#;

/// One `<interface>` block of the contract file, as it stands there.
fn contract_block(name: &str) -> &'static str {
    let open = format!("  <interface name=\"{name}\">");
    let Some(start) = CONTRACT.find(&open) else {
        return "";
    };
    let end = CONTRACT[start..]
        .find("</interface>\n")
        .map_or(CONTRACT.len(), |e| start + e + "</interface>\n".len());
    &CONTRACT[start..end]
}

/// The manager's node.
pub fn manager() -> &'static str {
    static XML: OnceLock<String> = OnceLock::new();
    XML.get_or_init(|| {
        format!(
            "{DOCTYPE}<node>\n{STANDARD}{OBJECT_MANAGER}{}  <node name=\"objects\"/>\n</node>\n",
            contract_block(proto::MANAGER_INTERFACE)
        )
    })
}

/// Any object's node.
pub fn object() -> &'static str {
    static XML: OnceLock<String> = OnceLock::new();
    XML.get_or_init(|| {
        format!(
            "{DOCTYPE}<node>\n{STANDARD}{}</node>\n",
            contract_block(proto::OBJECT_INTERFACE)
        )
    })
}

/// A node above the manager: its one child.
pub fn inner(child: &str) -> String {
    format!(
        "{DOCTYPE}<node>\n{}  <node name=\"{child}\"/>\n</node>\n",
        peer_and_introspectable()
    )
}

fn peer_and_introspectable() -> &'static str {
    // The Peer and Introspectable blocks: the first two of STANDARD.
    STANDARD
        .find("  <interface name=\"org.freedesktop.DBus.Properties\">")
        .map_or(STANDARD, |end| &STANDARD[..end])
}

/// Bytes one child takes in the list (`  <node name="…"/>` and an id).
const CHILD_BYTES: usize = 40;

/// The `objects` node: each object as a child, if the list takes at most
/// an eighth of the bus's limit; else none, and a comment that says where
/// to look instead.
pub async fn objects_node(call: &Call) -> Result<String, Failure> {
    let most = call.shared.max_message / 8 / CHILD_BYTES;
    let ids = call
        .shared
        .handle
        .read(move |m| {
            (m.object_count() <= most).then(|| m.ids_in_order().map(|id| id.0).collect::<Vec<_>>())
        })
        .await
        .map_err(from_owner)?;
    let mut xml = format!("{DOCTYPE}<node>\n{}", peer_and_introspectable());
    match ids {
        Some(ids) => {
            for id in ids {
                xml.push_str(&format!("  <node name=\"{id}\"/>\n"));
            }
        }
        None => xml.push_str(
            "  <!-- too many objects to list here: use org.devmgr.DevMgr1.Manager.ListObjects -->\n",
        ),
    }
    xml.push_str("</node>\n");
    Ok(xml)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_blocks_are_found_whole() {
        for name in [proto::MANAGER_INTERFACE, proto::OBJECT_INTERFACE] {
            let block = contract_block(name);
            assert!(block.starts_with("  <interface name="), "{name}");
            assert!(block.ends_with("</interface>\n"), "{name}");
            assert_eq!(block.matches("<interface").count(), 1, "{name}");
        }
        assert!(manager().contains("ListObjects"));
        assert!(object().contains("<method name=\"Acquire\">"));
    }
}
