//! Subscriptions to rtnetlink notifications (NETLINK_ROUTE multicast
//! groups) of this network namespace, read as batches of messages.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use tokio::io::unix::AsyncFd;

/// Link notifications.
pub const RTMGRP_LINK: u32 = 0x1;
/// Neighbour notifications.
pub const RTMGRP_NEIGH: u32 = 0x4;
/// IPv4 address notifications.
pub const RTMGRP_IPV4_IFADDR: u32 = 0x10;
/// IPv4 route notifications.
pub const RTMGRP_IPV4_ROUTE: u32 = 0x40;

/// A NETLINK_ROUTE socket subscribed to some notification groups.
pub struct Subscription {
    fd: AsyncFd<OwnedFd>,
}

/// What a wait for notifications brought.
pub enum Batch<'a> {
    /// Messages, as read from the socket (one datagram).
    Messages(&'a [u8]),
    /// Notifications were lost (the socket's buffer overflowed).
    Lost,
}

impl Subscription {
    /// Subscribes to `groups` (`RTMGRP_*`).
    pub fn new(groups: u32) -> io::Result<Self> {
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
        addr.nl_groups = groups;
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

    /// Waits until notifications arrive, then hands every datagram queued
    /// (or the news that some were lost) to `each`.
    pub async fn drain(&mut self, mut each: impl FnMut(Batch<'_>)) -> io::Result<()> {
        let mut guard = self.fd.readable_mut().await?;
        let mut buf = vec![0u8; 32 * 1024];
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
                    _ if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        each(Batch::Lost);
                        continue;
                    }
                    _ => return Err(e),
                }
            }
            let n = usize::try_from(n).unwrap_or(0);
            each(Batch::Messages(&buf[..n]));
        }
    }
}
