//! Making sure the pin root is on a BPF filesystem.
//!
//! `ip netns exec` remounts /sys, so an agent started that way finds no bpffs at
//! /sys/fs/bpf: it mounts one there (or, for a pin root elsewhere, on the pin
//! root itself).

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

fn statfs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into a zeroed struct we own.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path, `buf` a valid out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut buf) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf.f_type)
}

/// Whether `path` (which must exist) is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    statfs_magic(path).is_ok_and(|m| m == BPF_FS_MAGIC)
}

/// Whether `path` is where a filesystem is mounted (its device differs from
/// its parent's).
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (Some(parent), Ok(meta)) = (path.parent(), std::fs::metadata(path)) else {
        return true;
    };
    std::fs::metadata(parent).is_ok_and(|p| p.dev() != meta.dev())
}

/// The nearest existing ancestor of `path` (or `path` itself).
fn existing_ancestor(path: &Path) -> Option<PathBuf> {
    path.ancestors().find(|p| p.exists()).map(Path::to_path_buf)
}

fn mount_bpffs(target: &Path) -> io::Result<()> {
    let c_target = CString::new(target.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            c_target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates `dir` (and its parents) if needed and makes it private: owned by
/// root, mode 0700. The agent's pins are its state; nobody else writes
/// them, and their contents (every flow's addresses) are not for other users.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    std::os::unix::fs::chown(dir, Some(0), Some(0))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Ensures `root` exists on a bpffs, mounting one when needed. Returns true if it mounted.
pub fn ensure(root: &Path) -> io::Result<bool> {
    let ancestor = existing_ancestor(root).unwrap_or_else(|| PathBuf::from("/"));
    if is_bpffs(&ancestor) {
        std::fs::create_dir_all(root)?;
        return Ok(false);
    }
    let target = if root.starts_with(DEFAULT_BPFFS) {
        PathBuf::from(DEFAULT_BPFFS)
    } else {
        std::fs::create_dir_all(root)?;
        root.to_path_buf()
    };
    tracing::info!(target = %target.display(), "no bpffs at the pin root; mounting one");
    mount_bpffs(&target).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("mounting bpffs on {}: {e}", target.display()),
        )
    })?;
    std::fs::create_dir_all(root)?;
    if !is_bpffs(root) {
        return Err(io::Error::other(format!(
            "{} is still not on a bpffs after mounting",
            root.display()
        )));
    }
    Ok(true)
}
