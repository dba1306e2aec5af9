//! Object quotas (issue 6): how many objects one client may have added, and
//! how many the model holds when a client adds more. Excess gets
//! QuotaExceeded, changes nothing, is logged once per client, and there is
//! room again once objects go. (The per-client reference quota is tested
//! with the other reference tests.)

use devmgr_tests::*;
use zbus::Variant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_quotas_are_reached_and_recovered_from() {
    object_quotas(&[
        "--no-udev",
        "--max-objects-per-client",
        "2",
        "--max-objects",
        "10",
    ])
    .await;
}

/// The same quotas from the configuration file (issue 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_quotas_from_the_configuration_file() {
    let (_dir, config) = config_file(
        "quota-config",
        "udev = false\nmax-objects-per-client = 2\nmax-objects = 10\n",
    );
    object_quotas(&["--config", &config]).await;
}

/// Each client may have added 2 objects that still exist, and the model
/// may hold 10 when a client adds more (as `args` say).
async fn object_quotas(args: &[&str]) {
    let bus = TestBus::start();
    let daemon = Daemon::start_with_args(&bus, args);
    let a = Client::connect(&bus.address).await;
    let b = Client::connect(&bus.address).await;
    let first = a.add_host("a1").await;
    a.add_host("a2").await;
    let quota = "org.devmgr.DevMgr1.Error.QuotaExceeded";
    for _ in 0..3 {
        let refused = a
            .manager
            .add("host", "a3", &root(), none())
            .await
            .expect_err("past the per-client quota");
        assert_eq!(error_name(&refused), quota);
    }
    assert!(
        a.manager.find_object("host", "a3").await.is_err(),
        "nothing added"
    );
    b.add_host("b1").await;

    // Room again once one of a's objects goes (whoever removes it).
    let (outcome, _) = b.remove(&first, none()).await.expect("remove");
    assert_eq!(outcome, "removed");
    a.add_host("a3").await;

    // The global cap counts what a driver's scan would add: the sim-scsi
    // driver and 3 hosts are 4 objects; a host with 6 LUNs would make 11.
    let sim = b.sim_scsi().await;
    let refused = b
        .manager
        .add(
            "host",
            "big",
            &root(),
            options(&[
                ("driver", Variant::from(sim.as_ref())),
                ("luns", Variant::from(6u32)),
            ]),
        )
        .await
        .expect_err("past the global cap");
    assert_eq!(error_name(&refused), quota);
    assert!(b.manager.find_object("host", "big").await.is_err());

    let (_, log) = daemon.terminate();
    let a_name = a.conn.unique_name().expect("unique name").to_string();
    assert_eq!(
        log.matches(&format!("{a_name}: this client has added"))
            .count(),
        1,
        "logged once per client:\n{log}"
    );
}
