//! Where the embedded private bus's address is published: the daemon writes
//! it there and devctl reads it, so both must compute the same place
//! (`/run/devmgr/bus` as root, else `$XDG_RUNTIME_DIR/devmgr/bus`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Our uid, without libc: the owner of our own /proc entry.
pub fn current_uid() -> u32 {
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

/// The directory of the embedded bus and its address file.
pub fn runtime_dir() -> PathBuf {
    let uid = current_uid();
    if uid == 0 {
        return PathBuf::from("/run/devmgr");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("devmgr"),
        None => std::env::temp_dir().join(format!("devmgr-{uid}")),
    }
}

/// The file holding the embedded bus's address, in `dir`.
pub fn address_file(dir: &Path) -> PathBuf {
    dir.join("bus")
}
