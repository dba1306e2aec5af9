//! Measures the engine's heap use per object (issue 2: "≤ 256 bytes per object
//! beyond its strings") with a counting global allocator.
//!
//! Run with `cargo run --release -p devmgr-drivers --example memory`.
//!
//! It builds models of 1k, 100k and 1M devices under hosts (1,000 devices a
//! host), in two shapes: LUN devices scanned by `sim-scsi` (each carrying the
//! driver's two attributes, `scsi.host` and `scsi.lun`) and plain API devices
//! without attributes. Events are drained as a daemon would. For each model
//! it prints the live heap bytes per object, how much of that is strings
//! (names: bytes + the 16-byte `Arc<str>` header, padded to 8 bytes;
//! attributes: key and value bytes), and what is left beyond the strings. Live bytes are what the
//! engine asked the allocator for; the allocator's own per-block overhead
//! (8-16 bytes a block with glibc malloc) comes on top.

// A counting allocator must implement `GlobalAlloc`, an unsafe trait; this
// example is the only place that needs it (the workspace denies unsafe code).
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use drivers::{AddRequest, Holder, Kind, Model, ObjectId};

/// `std::alloc::System`, counting the bytes live and the largest block handed out.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

fn allocated(size: usize) {
    LIVE.fetch_add(size, Relaxed);
    LARGEST.fetch_max(size, Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged and only updates counters besides, so `System`'s guarantees hold.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            allocated(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s contract.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            allocated(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is; `ptr` came from this allocator, i.e. from `System`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            allocated(new_size);
        }
        new
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const DEVICES_PER_HOST: u32 = 1_000;
/// Bytes of an `Arc<str>` allocation besides the text: the strong and weak counts.
const ARC_HEADER: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Hosts bound to `sim-scsi`, which scans their LUN devices.
    ScsiLuns,
    /// Unbound hosts with plain API devices added one by one.
    PlainDevices,
}

impl Shape {
    fn label(self) -> &'static str {
        match self {
            Shape::ScsiLuns => "sim-scsi LUNs (2 attributes each)",
            Shape::PlainDevices => "plain devices (no attributes)",
        }
    }
}

/// Builds a model of `devices` devices, draining every event as it goes.
fn build(shape: Shape, devices: u32) -> (Model, Vec<ObjectId>) {
    let mut model = Model::default();
    let driver = model
        .add(AddRequest::new(Kind::Driver, proto::SIM_SCSI_DRIVER))
        .expect("add the driver");
    let mut hosts = Vec::new();
    for h in 0..devices / DEVICES_PER_HOST {
        let host = AddRequest::new(Kind::Host, format!("host{h}"));
        let host = match shape {
            Shape::ScsiLuns => model.add(host.driver(driver).luns(DEVICES_PER_HOST)),
            Shape::PlainDevices => model.add(host),
        }
        .expect("add a host");
        drop(model.take_events());
        if shape == Shape::PlainDevices {
            for d in 0..DEVICES_PER_HOST {
                let device = AddRequest::new(Kind::Device, format!("{h}:0:0:{d}")).parent(host);
                model.add(device).expect("add a device");
                drop(model.take_events());
            }
        }
        hosts.push(host);
    }
    drop(model.take_effects());
    (model, hosts)
}

/// String bytes held by the objects of `model`: (names, attributes).
fn string_bytes(model: &Model, hosts: &[ObjectId]) -> (usize, usize) {
    let driver = model
        .find(Kind::Driver, proto::SIM_SCSI_DRIVER)
        .expect("the driver");
    let mut names = 0;
    let mut attributes = 0;
    let children = hosts
        .iter()
        .flat_map(|&h| model.children(h).expect("children"));
    for id in [driver]
        .into_iter()
        .chain(hosts.iter().copied())
        .chain(children)
    {
        let info = model.get(id).expect("object");
        // The `Arc<str>` block: header and text, padded to its 8-byte alignment.
        names += (ARC_HEADER + info.name.len()).next_multiple_of(8);
        attributes += info
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
    }
    (names, attributes)
}

fn per(bytes: usize, count: usize) -> f64 {
    bytes as f64 / count as f64
}

fn measure(shape: Shape, label: &str, devices: u32) {
    let before = LIVE.load(Relaxed);
    LARGEST.store(0, Relaxed);
    let (mut model, hosts) = build(shape, devices);
    let heap = LIVE.load(Relaxed) - before;
    let largest = LARGEST.load(Relaxed);
    let objects = model.object_count();
    let (names, attributes) = string_bytes(&model, &hosts);
    let beyond_names = heap - names;
    let beyond_strings = beyond_names - attributes;
    println!(
        "{label:>5} {objects:>9} {:>11.1} {:>8.1} {:>8.1} {:>12.1} {:>14.1}",
        per(heap, objects),
        per(names, objects),
        per(attributes, objects),
        per(beyond_names, objects),
        per(beyond_strings, objects),
    );
    // The largest block is the object slab's buffer, whose capacity grows by
    // doubling from 4: it gives the size of one slab entry (the crate-private
    // `Object` plus the slab's tag).
    let capacity = (objects.next_power_of_two()).max(4);
    if largest.is_multiple_of(capacity) {
        println!(
            "{:>5} largest block {largest} bytes = {capacity} slab entries of {} bytes",
            "",
            largest / capacity
        );
    }

    if label == "100k" {
        // What a reference costs: one on each of 100,000 distinct devices.
        let holder = Arc::new(Holder {
            key: 1,
            bus_name: ":1.42".into(),
            uid: 1000,
            pid: 4242,
        });
        let reason: Arc<str> = Arc::from("memory");
        let targets: Vec<ObjectId> = hosts
            .iter()
            .flat_map(|&h| model.children(h).expect("children"))
            .collect();
        let before_refs = LIVE.load(Relaxed);
        for &id in &targets {
            model
                .acquire(id, Arc::clone(&holder), Arc::clone(&reason), 0)
                .expect("acquire");
            model.clear_outputs();
        }
        drop(model.take_events());
        let refs = model.reference_count();
        println!(
            "{:>5} + {refs} references (one per device, shared holder and reason): {:.1} bytes each",
            "",
            per(LIVE.load(Relaxed) - before_refs, refs)
        );
    }
    drop(model);
}

fn main() {
    let sizes = [("1k", 1_000), ("100k", 100_000), ("1M", 1_000_000)];
    for shape in [Shape::ScsiLuns, Shape::PlainDevices] {
        println!("\n{}", shape.label());
        println!(
            "{:>5} {:>9} {:>11} {:>8} {:>8} {:>12} {:>14}",
            "size", "objects", "heap/object", "names", "attrs", "beyond names", "beyond strings"
        );
        for (label, devices) in sizes {
            measure(shape, label, devices);
        }
    }
    println!(
        "\nAll figures are bytes per object, averaged over every object of the model \
         (the driver, the hosts and their devices)."
    );
    println!(
        "Heap still live after dropping every model: {} bytes",
        LIVE.load(Relaxed)
    );
}
