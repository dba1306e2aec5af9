//! The README walk-through: a sim-scsi host with four LUNs, one of them held,
//! removed while busy (pending, holder listed), re-enabled, removed again and
//! completed by the release — every event printed as it happens.

use std::sync::Arc;

use drivers::{AddRequest, Holder, Kind, Model, RemoveOptions};

fn show(model: &mut Model, what: &str) {
    println!("$ {what}");
    for event in model.take_events() {
        println!("    {event:?}");
    }
}

fn main() -> Result<(), drivers::Error> {
    let mut model = Model::default();
    let now = 0;
    let sim = model.add(AddRequest::new(Kind::Driver, "sim-scsi"))?;
    show(&mut model, "add driver sim-scsi");
    let host = model.add(AddRequest::new(Kind::Host, "host0").driver(sim).luns(4))?;
    show(&mut model, "add host host0 --driver sim-scsi --luns 4");

    let lun = model.find(Kind::Device, "0:0:0:2")?;
    let holder = Arc::new(Holder {
        key: 1,
        bus_name: ":1.42".into(),
        uid: 1000,
        pid: std::process::id(),
    });
    let reference = model.acquire(lun, holder, "mounted on /srv", now)?;
    show(&mut model, "hold 0:0:0:2 (reason: mounted on /srv)");

    let report = model.remove(host, RemoveOptions::default(), now)?;
    show(&mut model, "remove host0");
    println!("    => {} ; still waiting on:", report.outcome);
    for p in &report.pending {
        let holders: Vec<String> = p
            .holders
            .iter()
            .map(|h| {
                format!(
                    "ref {} by {} (pid {}): {}",
                    h.id, h.holder.bus_name, h.holder.pid, h.reason
                )
            })
            .collect();
        println!(
            "       {} {} [{}] {}",
            p.kind,
            p.name,
            p.state,
            holders.join("; ")
        );
    }

    model.reenable(host)?;
    show(&mut model, "reenable host0  (cancels the pending removal)");
    println!(
        "    host0 is {}, 0:0:0:2 is {}",
        model.state(host)?,
        model.state(lun)?
    );

    let report = model.remove(host, RemoveOptions::default(), now)?;
    show(&mut model, "remove host0");
    println!("    => {}", report.outcome);
    model.release(reference)?;
    show(
        &mut model,
        "release the reference  (the removal completes by itself)",
    );
    println!(
        "    objects left: {} (the sim-scsi driver)",
        model.object_count()
    );
    Ok(())
}
