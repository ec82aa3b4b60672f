//! Facts about the host the agent runs on: its cgroup v2 hierarchy (where
//! the socket hooks attach) and its network namespace.

use std::{
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// `CGROUP2_SUPER_MAGIC`.
const CGROUP2_MAGIC: libc::__fsword_t = 0x6367_7270;
/// `SO_NETNS_COOKIE`.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// Where a cgroup2 hierarchy is mounted when the host has none mounted.
pub const FALLBACK_CGROUP_MOUNT: &str = "/run/proxy-agent/cgroupv2";

/// Whether `path` is a directory of a cgroup v2 hierarchy.
pub fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct we own from a NUL-terminated path.
    unsafe {
        let mut s: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &raw mut s) == 0 && s.f_type == CGROUP2_MAGIC
    }
}

/// The host's cgroup2 mount point, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        // ... mount point (field 5) ... " - " fstype source options
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount))
    })
}

/// Mounts a cgroup2 hierarchy at [`FALLBACK_CGROUP_MOUNT`] (a host without
/// one mounted), returning its path.
pub fn mount_cgroup2() -> io::Result<PathBuf> {
    let path = PathBuf::from(FALLBACK_CGROUP_MOUNT);
    if is_cgroup2(&path) {
        return Ok(path);
    }
    std::fs::create_dir_all(&path)?;
    let target = std::ffi::CString::new(FALLBACK_CGROUP_MOUNT)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: mount(2) with NUL-terminated strings we own.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(path)
}

/// Whether `path` is the root of the machine's cgroup v2 hierarchy (hooks
/// there see every process). The root lacks the files the kernel gives
/// every other cgroup (`cgroup.type`), which tells it from the root of a
/// container's cgroup namespace, where a cgroup2 mount shows the
/// container's own cgroup.
pub fn is_cgroup_root(path: &Path) -> bool {
    is_cgroup2(path) && !path.join("cgroup.type").exists()
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, what
/// `bpf_get_netns_cookie` returns for sockets there).
pub fn netns_cookie() -> io::Result<u64> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the u64 we own.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Whether this process is in the network namespace of the machine's init
/// process (the host's, for a DaemonSet with host networking).
pub fn in_host_netns() -> bool {
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    ino("/proc/self/ns/net").is_some_and(|me| Some(me) == ino("/proc/1/ns/net"))
}
