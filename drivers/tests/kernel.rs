//! The engine's operations for real devices and site limits: the kernel's
//! own word on bindings, renames and attributes (recorded as given; an
//! `unbind` that a removal asked for completes it), and the quotas on
//! references and added objects (refused past the limit, changing nothing).

use std::sync::Arc;

use drivers::{AddRequest, Effect, Event, Kind, Model, ObjectId, Origin, RemoveOptions, State};

fn udev_device(model: &mut Model, name: &str, handler: Option<&str>) -> ObjectId {
    let mut req = AddRequest::new(Kind::Device, name);
    req.origin = Origin::Udev;
    req.subsystem = "net".into();
    req.sys_path = format!("/sys/devices/virtual/net/{name}");
    req.handler = handler.map(str::to_owned);
    let id = model.add(req).expect("add");
    model.take_events();
    id
}

fn driver(model: &mut Model, name: &str) -> ObjectId {
    let id = model
        .add(AddRequest::new(Kind::Driver, name))
        .expect("driver");
    model.take_events();
    id
}

/// Client `key`'s holder record.
fn holder(key: u64) -> Arc<drivers::Holder> {
    Arc::new(drivers::Holder {
        key,
        bus_name: format!(":1.{key}"),
        uid: 1000,
        pid: 1,
    })
}

fn checked(model: &Model) {
    model.check_invariants().expect("invariants");
}

#[test]
fn the_kernel_binds_rebinds_and_unbinds() {
    let mut m = Model::default();
    let dev = udev_device(&mut m, "eth7", None);
    let (e1000, igb) = (driver(&mut m, "e1000"), driver(&mut m, "igb"));

    m.kernel_bound(dev, e1000).expect("bind");
    assert_eq!(
        m.take_events(),
        [Event::Bound {
            id: dev,
            driver: e1000
        }]
    );
    m.kernel_bound(dev, e1000).expect("bind again");
    assert_eq!(m.take_events(), [], "a repeated bind changes nothing");
    m.kernel_bound(dev, igb).expect("rebind");
    assert_eq!(
        m.take_events(),
        [
            Event::Unbound {
                id: dev,
                driver: e1000
            },
            Event::Bound {
                id: dev,
                driver: igb
            }
        ]
    );
    checked(&m);
    m.kernel_unbound(dev).expect("unbind");
    assert_eq!(
        m.take_events(),
        [Event::Unbound {
            id: dev,
            driver: igb
        }]
    );
    m.kernel_unbound(dev).expect("unbind again");
    assert_eq!(m.take_events(), []);
    checked(&m);

    // Held or stopped makes no difference: the kernel has already done it.
    let holder = holder(1);
    m.acquire(dev, holder, "busy", 0).expect("acquire");
    m.stop(dev).expect("stop");
    m.take_events();
    m.kernel_bound(dev, e1000)
        .expect("bind while stopped and held");
    m.kernel_unbound(dev).expect("unbind while held");
    assert_eq!(m.state(dev).expect("state"), State::Stopped);
    checked(&m);

    assert!(
        m.kernel_bound(dev, dev).is_err(),
        "only a driver can be bound to"
    );
    assert!(
        m.kernel_bound(e1000, igb).is_err(),
        "a driver cannot be bound"
    );
}

#[test]
fn a_bind_to_a_driver_the_kernel_removed_is_stale_and_changes_nothing() {
    let mut m = Model::default();
    let dev = udev_device(&mut m, "eth6", None);
    let e1000 = driver(&mut m, "e1000");
    m.kernel_bound(dev, e1000).expect("bind");
    // Held, the driver stays in the model as gone after the kernel drops it.
    m.acquire(e1000, holder(1), "busy", 0).expect("acquire");
    m.kernel_removed(e1000).expect("driver gone");
    m.take_events();

    let err = m.kernel_bound(dev, e1000).expect_err("a stale bind");
    assert_eq!(err.kind, drivers::ErrorKind::InvalidState, "{err}");
    assert_eq!(m.take_events(), [], "a refused bind changes nothing");
    checked(&m);
    // Found by the fuzzer: the gone driver's forced removal then left the
    // device held for an unbind no request would ever finish.
    m.remove(
        e1000,
        RemoveOptions {
            force: true,
            ..RemoveOptions::default()
        },
        0,
    )
    .expect("forced removal");
    assert!(!m.contains(e1000));
    checked(&m);
}

#[test]
fn an_unbind_asked_for_by_a_removal_completes_it() {
    let mut m = Model::default();
    let dev = udev_device(&mut m, "eth8", Some(drivers::kernel::UNBIND));
    let e1000 = driver(&mut m, "e1000");
    m.kernel_bound(dev, e1000).expect("bind");
    m.take_events();
    m.remove(dev, RemoveOptions::default(), 0).expect("remove");
    let effects = m.take_effects();
    assert!(
        matches!(&effects[..], [Effect::Exit { action, .. }] if action.verb == drivers::kernel::verbs::DRIVER_UNBIND),
        "{effects:?}"
    );
    assert_eq!(m.state(dev).expect("state"), State::Removing);
    m.take_events();
    // The kernel confirms: the object leaves the model.
    m.kernel_unbound(dev).expect("unbound");
    assert!(!m.contains(dev));
    checked(&m);
}

#[test]
fn a_driver_removal_waiting_on_a_binding_completes_when_the_kernel_unbinds() {
    let mut m = Model::default();
    let dev = udev_device(&mut m, "eth9", Some(drivers::kernel::UNBIND));
    let e1000 = driver(&mut m, "e1000");
    m.kernel_bound(dev, e1000).expect("bind");
    let holder = holder(1);
    m.acquire(dev, holder, "busy", 0).expect("acquire");
    m.take_events();
    let report = m
        .remove(e1000, RemoveOptions::default(), 0)
        .expect("remove driver");
    assert_eq!(report.outcome, drivers::RemoveOutcome::Pending);
    m.kernel_unbound(dev).expect("unbound");
    assert!(!m.contains(e1000), "the driver went once nothing was bound");
    assert!(m.contains(dev));
    checked(&m);
}

#[test]
fn the_kernel_renames_and_changes_attributes() {
    let mut m = Model::default();
    let dev = udev_device(&mut m, "eth3", None);
    let other = udev_device(&mut m, "wan0", None);

    m.kernel_renamed(dev, "lan0", "/sys/devices/virtual/net/lan0")
        .expect("rename");
    assert_eq!(
        m.take_events(),
        [Event::Renamed {
            id: dev,
            name: "lan0".into(),
            sys_path: "/sys/devices/virtual/net/lan0".into()
        }]
    );
    assert_eq!(m.find(Kind::Device, "lan0").expect("new name"), dev);
    assert!(
        m.find(Kind::Device, "eth3").is_err(),
        "the old name is free"
    );
    assert!(
        m.kernel_renamed(dev, "wan0", "/sys/devices/virtual/net/wan0")
            .is_err(),
        "a taken name is refused"
    );
    assert_eq!(m.take_events(), []);
    assert_eq!(m.find(Kind::Device, "wan0").expect("untouched"), other);
    checked(&m);

    let attributes: std::collections::BTreeMap<String, String> =
        [("udev.ID_FS_TYPE".to_owned(), "ext4".to_owned())].into();
    m.set_attributes(dev, attributes.clone()).expect("change");
    assert_eq!(
        m.take_events(),
        [Event::AttributesChanged {
            id: dev,
            attributes: attributes.clone()
        }]
    );
    m.set_attributes(dev, attributes).expect("the same again");
    assert_eq!(m.take_events(), [], "no change, no event");
    assert_eq!(
        m.get(dev)
            .expect("info")
            .attributes
            .get("udev.ID_FS_TYPE")
            .map(String::as_str),
        Some("ext4")
    );
    checked(&m);
}

#[test]
fn a_reference_quota_refuses_past_the_limit_and_recovers() {
    let mut m = Model::default();
    m.set_reference_quota(Some(2));
    let dev = udev_device(&mut m, "eth4", None);
    let (a, b) = (holder(1), holder(2));
    let first = m.acquire(dev, a.clone(), "one", 0).expect("1st");
    m.acquire(dev, a.clone(), "two", 0).expect("2nd");
    m.take_events();
    let err = m
        .acquire(dev, a.clone(), "three", 0)
        .expect_err("3rd refused");
    assert_eq!(err.kind, drivers::ErrorKind::QuotaExceeded);
    assert_eq!(m.take_events(), [], "a refusal changes nothing");
    m.acquire(dev, b, "other client", 0)
        .expect("another holder is not limited by it");
    m.release(first).expect("release");
    m.acquire(dev, a, "three again", 0)
        .expect("room again after a release");
    checked(&m);
}

#[test]
fn object_limits_bound_what_clients_add_but_not_real_devices() {
    let mut m = Model::default();
    m.set_added_quota(Some(2));
    let add = |m: &mut Model, name: &str, by: u64| {
        let mut req = AddRequest::new(Kind::Host, name);
        req.added_by = Some(by);
        m.add(req)
    };
    let first = add(&mut m, "a1", 1).expect("1st");
    add(&mut m, "a2", 1).expect("2nd");
    let refused = add(&mut m, "a3", 1).expect_err("3rd refused");
    assert_eq!(refused.kind, drivers::ErrorKind::QuotaExceeded);
    add(&mut m, "b1", 2).expect("another client is not limited by it");
    m.remove(first, RemoveOptions::default(), 0)
        .expect("remove");
    add(&mut m, "a3", 1).expect("room again after a removal");
    checked(&m);

    // A global cap (here 5 objects: three hosts, the sim-scsi driver, one
    // more) refuses API objects past it, scans included, never real devices.
    let sim = m
        .add(AddRequest::new(Kind::Driver, "sim-scsi"))
        .expect("sim-scsi");
    m.set_object_limit(Some(5));
    let mut big = AddRequest::new(Kind::Host, "big").driver(sim).luns(3);
    big.added_by = Some(3);
    let refused = m.add(big).expect_err("1 + 3 LUNs past the cap");
    assert_eq!(refused.kind, drivers::ErrorKind::QuotaExceeded);
    add(&mut m, "c1", 3).expect("one more fits");
    assert!(add(&mut m, "c2", 3).is_err(), "full");
    udev_device(&mut m, "eth0", None);
    checked(&m);
}

/// Found by fuzzing (drivers/fuzz, engine_commands): a held device the
/// kernel removed (`gone`) was bound again by `kernel_bound`, then unbound
/// with force, which revoked its last reference and left it behind, idle.
/// A gone device can no longer be bound, and a forced unbind that makes a
/// gone object idle removes it.
#[test]
fn a_gone_device_cannot_be_bound_and_goes_when_let_go() {
    let mut m = Model::default();
    let dev = udev_device(&mut m, "sdz", None);
    let e1000 = driver(&mut m, "e1000");
    let holder = holder(1);
    let reference = m.acquire(dev, holder, "busy", 0).expect("acquire");
    m.kernel_removed(dev).expect("kernel removal");
    assert_eq!(m.state(dev).expect("state"), State::Gone);
    assert!(
        m.kernel_bound(dev, e1000).is_err(),
        "a gone device was bound"
    );
    checked(&m);
    m.release(reference).expect("release");
    assert!(!m.contains(dev));
    checked(&m);
}
