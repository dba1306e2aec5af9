//! `detach-mounts` (rule 18): lazily detaching a mount (as `umount -l`) in
//! whatever mount namespace it is in, and turning swap off. Processes are
//! never touched. Each runs on a blocking thread; its effect comes back as
//! the watcher sees the mount or the swap go, never as an answer here.

use std::path::Path;

use super::Detail;

/// Takes one user away; the error says what the kernel answered.
pub fn detach(detail: &Detail) -> Result<(), String> {
    match detail {
        Detail::Mount {
            pid: 0,
            mount_point,
            ..
        } => lazy_unmount(Path::new(mount_point))
            .map_err(|e| format!("umount -l {mount_point}: {e}")),
        Detail::Mount {
            pid,
            ns,
            mount_point,
        } => in_namespace_of(*pid, *ns, mount_point),
        Detail::Swap { path } => swap_off(path).map_err(|e| format!("swapoff {path}: {e}")),
        Detail::Other => Ok(()),
    }
}

fn lazy_unmount(path: &Path) -> nix::Result<()> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
}

/// Detaches `mount_point` in namespace `ns` as the process `pid` sees it:
/// on a thread of its own that leaves the process's shared filesystem
/// context (CLONE_FS), so that it alone enters `pid`'s mount namespace and
/// root, and then ends. Nothing is detached if `pid` is no longer in `ns`
/// (it exited and its pid was reused, or it moved): the mount point would
/// name another namespace's mount.
fn in_namespace_of(pid: u32, ns: u64, mount_point: &str) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let path = mount_point.to_owned();
    let done = std::thread::Builder::new()
        .name("detach-mount".into())
        .spawn(move || -> Result<(), String> {
            let entered = std::fs::File::open(format!("/proc/{pid}/ns/mnt"))
                .map_err(|e| format!("the mount namespace of pid {pid}: {e}"))?;
            let root = std::fs::File::open(format!("/proc/{pid}/root"))
                .map_err(|e| format!("the root of pid {pid}: {e}"))?;
            // Checked on what is open, so it cannot change after the check.
            let inode = entered.metadata().map(|m| m.ino()).unwrap_or(0);
            if inode != ns {
                return Err(format!(
                    "pid {pid} is no longer in mount namespace {ns}: {path:?} not detached"
                ));
            }
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                .map_err(|e| format!("unshare(CLONE_FS): {e}"))?;
            nix::sched::setns(&entered, nix::sched::CloneFlags::CLONE_NEWNS)
                .map_err(|e| format!("entering the mount namespace of pid {pid}: {e}"))?;
            // The mount point is as the process sees it: from its root.
            nix::unistd::fchdir(&root).map_err(|e| format!("fchdir: {e}"))?;
            nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
            lazy_unmount(Path::new(&path))
                .map_err(|e| format!("umount -l {path} in the mount namespace of pid {pid}: {e}"))
        })
        .map_err(|e| format!("cannot start a thread to detach {mount_point}: {e}"))?;
    done.join()
        .unwrap_or_else(|_| Err(format!("detaching {mount_point} failed")))
}

#[allow(unsafe_code)]
fn swap_off(path: &str) -> std::io::Result<()> {
    let path = std::ffi::CString::new(path)?;
    // SAFETY: swapoff(2) reads a NUL-terminated path that `path` owns for
    // the duration of the call; it keeps no pointer to it.
    let rc = unsafe { libc::swapoff(path.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
