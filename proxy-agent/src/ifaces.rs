//! Network interfaces: listing, matching `--pod-iface` globs, and noticing
//! when interfaces come and go (rtnetlink link notifications).

use std::{collections::BTreeSet, ffi::CStr, io};

use crate::netlink::{RTMGRP_LINK, Subscription};

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

/// A subscription to link notifications: it wakes whenever an interface
/// is added, removed or changed.
pub struct LinkWatcher {
    sub: Subscription,
}

impl LinkWatcher {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            sub: Subscription::new(RTMGRP_LINK)?,
        })
    }

    /// Waits for link notifications (a lost batch counts: a full rescan
    /// follows anyway).
    pub async fn changed(&mut self) -> io::Result<()> {
        self.sub.drain(|_| {}).await
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
