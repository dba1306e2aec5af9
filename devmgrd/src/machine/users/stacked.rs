//! Block devices stacked on others, from sysfs (under `--sysfs-root`):
//! `holders/` lists what holds a device (only dm, md and bcache make such
//! links), `slaves/` what a stacked device is built on, and a loop device's
//! `loop/backing_file` the file (or device) behind it. The kernel sends a
//! uevent of the stacked device when any of it changes, which is when the
//! watcher reads them again.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use drivers::ObjectId;

use super::processes::block_device;
use super::DevNum;

/// What `holders/` lists for each followed device, and the reverse (which
/// devices list a stacked device), so that a uevent of one device costs
/// what concerns it, not a pass over every device.
#[derive(Default)]
pub struct Stacking {
    holders: HashMap<ObjectId, Vec<String>>,
    listed_by: HashMap<String, BTreeSet<ObjectId>>,
}

impl Stacking {
    /// Records what is stacked on `id`; whether that changed.
    pub fn set(&mut self, id: ObjectId, now: Vec<String>) -> bool {
        if self.holders.get(&id) == Some(&now) {
            return false;
        }
        self.remove(id);
        for holder in &now {
            self.listed_by.entry(holder.clone()).or_default().insert(id);
        }
        if !now.is_empty() {
            self.holders.insert(id, now);
        }
        true
    }

    /// `id` is no longer followed.
    pub fn remove(&mut self, id: ObjectId) {
        for holder in self.holders.remove(&id).unwrap_or_default() {
            if let Some(ids) = self.listed_by.get_mut(&holder) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.listed_by.remove(&holder);
                }
            }
        }
    }

    /// What is stacked on `id`.
    pub fn of(&self, id: ObjectId) -> &[String] {
        self.holders.get(&id).map_or(&[], Vec::as_slice)
    }

    /// The devices on which `holder` is stacked.
    pub fn listing(&self, holder: &str) -> impl Iterator<Item = ObjectId> + '_ {
        self.listed_by.get(holder).into_iter().flatten().copied()
    }
}

/// `/sys/class/block/<name>` under `root`.
fn class_block(root: &Path, name: &str) -> PathBuf {
    root.join("sys/class/block").join(name)
}

fn entries(dir: PathBuf) -> Vec<String> {
    let Ok(list) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = list
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// What is stacked on `name` (`dm-0`, `md127`).
pub fn holders_of(root: &Path, name: &str) -> Vec<String> {
    entries(class_block(root, name).join("holders"))
}

/// What `name` is built on.
pub fn slaves_of(root: &Path, name: &str) -> Vec<String> {
    entries(class_block(root, name).join("slaves"))
}

/// The device behind loop device `name`, if it is backed by a device node
/// (a loop device on a file holds that file's filesystem, whose mount is
/// its device's user already).
pub fn backing_device(root: &Path, name: &str) -> Option<DevNum> {
    let file = std::fs::read_to_string(class_block(root, name).join("loop/backing_file")).ok()?;
    super::device_node(file.trim_end()).and_then(block_device)
}

/// How a stacked device reads to people: `dm-0 (vg0-data)` for a
/// device-mapper device with a name, else its kernel name.
pub fn describe(root: &Path, holder: &str) -> String {
    match std::fs::read_to_string(class_block(root, holder).join("dm/name")) {
        Ok(name) if !name.trim().is_empty() => format!("{holder} ({})", name.trim()),
        _ => holder.to_owned(),
    }
}
