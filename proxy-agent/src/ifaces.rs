//! Network interfaces: listing, matching `--pod-iface` globs, and noticing
//! when interfaces come and go (rtnetlink link notifications).

use std::{
    collections::BTreeSet,
    ffi::CStr,
    io,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
};

use tokio::io::unix::AsyncFd;

/// Interface name patterns (shell globs, as `veth*`).
#[derive(Clone, Debug, Default)]
pub struct IfaceMatcher {
    patterns: Vec<glob::Pattern>,
}

impl IfaceMatcher {
    /// Compiles the patterns; an invalid one is an error naming it.
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        patterns
            .iter()
            .map(|p| {
                glob::Pattern::new(p).map_err(|e| format!("invalid interface pattern {p:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|patterns| Self { patterns })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// Every interface of the current network namespace as (ifindex, name).
pub fn list() -> io::Result<BTreeSet<(u32, String)>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, or null.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = BTreeSet::new();
    let mut cur = head;
    // SAFETY: walking the array until its terminator; names are NUL-terminated.
    unsafe {
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            let name = CStr::from_ptr((*cur).if_name)
                .to_string_lossy()
                .into_owned();
            out.insert(((*cur).if_index, name));
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
    }
    Ok(out)
}

/// IPv4 addresses of interface `name`, in the order the kernel lists them
/// (the primary address first).
pub fn ipv4_addresses(name: &str) -> io::Result<Vec<std::net::Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    // SAFETY: walking the list getifaddrs built; every pointer is checked for null.
    unsafe {
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                && !ifa.ifa_name.is_null()
                && CStr::from_ptr(ifa.ifa_name).to_bytes() == name.as_bytes()
            {
                let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                out.push(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok(out)
}

/// Interfaces of this namespace matching `matcher`.
pub fn matching(matcher: &IfaceMatcher) -> io::Result<BTreeSet<(u32, String)>> {
    Ok(list()?
        .into_iter()
        .filter(|(_, name)| matcher.matches(name))
        .collect())
}

/// A NETLINK_ROUTE socket subscribed to link notifications: it becomes readable
/// whenever an interface is added, removed or changed.
pub struct LinkWatcher {
    fd: AsyncFd<OwnedFd>,
}

const RTMGRP_LINK: u32 = 1;

impl LinkWatcher {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain socket(2) call.
        let raw: RawFd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_nl is valid; we set family and groups.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = RTMGRP_LINK;
        // SAFETY: `addr` is a valid sockaddr_nl of the given length.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the descriptor for its whole life.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Waits for at least one link notification, then drains the socket.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut guard = self.fd.readable_mut().await?;
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: reading into our own buffer.
            let n = unsafe {
                libc::recv(
                    guard.get_inner().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        return Ok(());
                    }
                    io::ErrorKind::Interrupted => continue,
                    // ENOBUFS: we missed notifications; a full rescan follows anyway.
                    _ if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                    _ => return Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let m = IfaceMatcher::new(&["veth*".into(), "eth0".into()]).unwrap();
        assert!(m.matches("veth12ab"));
        assert!(m.matches("eth0"));
        assert!(!m.matches("eth1"));
        assert!(IfaceMatcher::new(&["[".into()]).is_err());
    }

    #[test]
    fn loopback_has_its_address() {
        let addrs = ipv4_addresses("lo").unwrap();
        assert!(addrs.contains(&std::net::Ipv4Addr::LOCALHOST), "{addrs:?}");
    }

    #[test]
    fn loopback_is_listed() {
        let all = list().unwrap();
        assert!(all.iter().any(|(_, n)| n == "lo"), "{all:?}");
    }
}
