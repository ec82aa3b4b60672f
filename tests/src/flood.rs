//! Hostile traffic for hardening tests: TCP SYNs from spoofed sources, sent
//! through a raw socket from the calling thread's network namespace (run it
//! inside a test's pod or client namespace with `Netns::run`).

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Result, bail};

use crate::packet::Frame;

/// Ethernet header length: raw IP sockets take the packet from the IP header.
const ETH_LEN: usize = 14;

/// A spoofed source: `n`-th address of 10.250.0.0/16 and a port, spread so
/// no two of the first 2^32 repeat.
fn spoofed(n: u32) -> SocketAddrV4 {
    let addr = Ipv4Addr::from(0x0afa_0000 | (n & 0xffff));
    let port = 1024 + ((n >> 16) as u16 % 60_000);
    SocketAddrV4::new(addr, port)
}

/// Sends `count` TCP SYNs to `dst`, each from a different spoofed source
/// in 10.250.0.0/16 (starting at the `first`-th), each `copies` times in a
/// row (a retransmitted SYN is what marks a flow as used twice, which an
/// LRU keeps longest), as fast as the socket takes them.
pub fn syn_flood(dst: SocketAddrV4, first: u32, count: u32, copies: u32) -> Result<()> {
    send_raw(
        (first..first.saturating_add(count))
            .flat_map(|n| std::iter::repeat_n(Frame::tcp_syn(spoofed(n), dst), copies as usize)),
    )
}

/// Sends each frame's IP packet as built (any source, any IP options)
/// through a raw socket, towards its destination address.
pub fn send_raw(frames: impl IntoIterator<Item = Frame>) -> Result<()> {
    // SAFETY: plain socket(2); the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        bail!("raw socket: {}", std::io::Error::last_os_error());
    }
    let sent = (|| -> Result<()> {
        for frame in frames {
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*frame.dst.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            let bytes = frame.build();
            let ip = bytes.get(ETH_LEN..).unwrap_or_default();
            loop {
                // SAFETY: the buffer and address outlive the call; lengths are theirs.
                let r = unsafe {
                    libc::sendto(
                        fd,
                        ip.as_ptr().cast(),
                        ip.len(),
                        0,
                        (&raw const to).cast(),
                        size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                if r >= 0 {
                    break;
                }
                let e = std::io::Error::last_os_error();
                // A full queue: wait for it to drain, then send it again.
                if e.raw_os_error() != Some(libc::ENOBUFS) {
                    bail!("sending a raw packet to {}: {e}", frame.dst);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        Ok(())
    })();
    // SAFETY: our descriptor, closed once.
    unsafe { libc::close(fd) };
    sent
}
