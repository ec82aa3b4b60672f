//! When the routes the datapath remembers may be stale: rtnetlink
//! notifications of routes, addresses, links and neighbours of this
//! network namespace. The datapath keeps the FIB result for each remote
//! backend (`ROUTES`) while `ROUTE_GEN` is unchanged; the agent bumps it
//! when anything a FIB lookup depends on changes.
//!
//! Every route, address and link change counts. Neighbour entries change
//! state all the time (reachable, stale, probing) without their MAC
//! changing, so those count only when a next hop's MAC changes, it stops
//! being usable (failed, incomplete) or it goes ([`Neighbours`]).

use std::{collections::BTreeMap, io};

use crate::netlink::{
    Batch, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH, Subscription,
};

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;

/// `struct nlmsghdr`: length, type, flags, sequence, port.
const NLMSG_HDR: usize = 16;
/// `struct ndmsg`: family, 3 bytes padding, ifindex, state, flags, type.
const NDMSG: usize = 12;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// Neighbour states with a usable MAC (`NUD_VALID`).
const NUD_VALID: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

/// A neighbour entry: interface and address.
type NeighKey = (i32, Vec<u8>);

/// The neighbours' MACs as notifications told them: decides which
/// neighbour notifications change a next hop.
#[derive(Debug, Default)]
pub struct Neighbours {
    macs: BTreeMap<NeighKey, Vec<u8>>,
}

impl Neighbours {
    /// Applies one batch of rtnetlink messages (as read from the socket);
    /// returns whether a remembered route may be stale now.
    pub fn apply(&mut self, buf: &[u8]) -> bool {
        let mut stale = false;
        let mut off = 0;
        while off + NLMSG_HDR <= buf.len() {
            let len =
                u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
            let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            if len < NLMSG_HDR || off + len > buf.len() {
                // Truncated or garbled: assume the worst.
                return true;
            }
            let body = &buf[off + NLMSG_HDR..off + len];
            stale |= match kind {
                RTM_NEWLINK | RTM_DELLINK | RTM_NEWADDR | RTM_DELADDR | RTM_NEWROUTE
                | RTM_DELROUTE => true,
                RTM_NEWNEIGH => self.neighbour(body, false),
                RTM_DELNEIGH => self.neighbour(body, true),
                _ => false,
            };
            off += (len + 3) & !3;
        }
        stale
    }

    /// A neighbour message: whether it changes a next hop.
    fn neighbour(&mut self, body: &[u8], gone: bool) -> bool {
        if body.len() < NDMSG {
            return true;
        }
        let ifindex = i32::from_ne_bytes([body[4], body[5], body[6], body[7]]);
        let state = u16::from_ne_bytes([body[8], body[9]]);
        let (mut dst, mut lladdr) = (None, None);
        let mut off = NDMSG;
        while off + 4 <= body.len() {
            let len = usize::from(u16::from_ne_bytes([body[off], body[off + 1]]));
            let kind = u16::from_ne_bytes([body[off + 2], body[off + 3]]);
            if len < 4 || off + len > body.len() {
                return true;
            }
            let value = &body[off + 4..off + len];
            match kind {
                NDA_DST => dst = Some(value.to_vec()),
                NDA_LLADDR => lladdr = Some(value.to_vec()),
                _ => {}
            }
            off += (len + 3) & !3;
        }
        let Some(dst) = dst else {
            return true;
        };
        let key = (ifindex, dst);
        match lladdr {
            Some(mac) if !gone && state & NUD_VALID != 0 => {
                self.macs.insert(key, mac.clone()) != Some(mac)
            }
            // Gone, or no usable MAC: a route through it must be looked up
            // again (and, for XDP, left to TC until it resolves).
            _ => {
                self.macs.remove(&key);
                true
            }
        }
    }
}

/// A subscription to route, address, link and neighbour notifications.
pub struct RouteWatcher {
    sub: Subscription,
    neighbours: Neighbours,
}

impl RouteWatcher {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            sub: Subscription::new(
                RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE,
            )?,
            neighbours: Neighbours::default(),
        })
    }

    /// Waits for notifications and returns whether a remembered route may
    /// be stale (lost notifications count).
    pub async fn changed(&mut self) -> io::Result<bool> {
        let mut stale = false;
        let neighbours = &mut self.neighbours;
        self.sub
            .drain(|batch| {
                stale |= match batch {
                    Batch::Messages(m) => neighbours.apply(m),
                    Batch::Lost => true,
                };
            })
            .await?;
        Ok(stale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One rtnetlink message of `kind` with `body`.
    fn msg(kind: u16, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDR + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    /// A neighbour message for 10.0.0.2 on interface 3.
    fn neigh(kind: u16, state: u16, mac: Option<[u8; 6]>) -> Vec<u8> {
        let mut body = vec![2, 0, 0, 0];
        body.extend_from_slice(&3i32.to_ne_bytes());
        body.extend_from_slice(&state.to_ne_bytes());
        body.extend_from_slice(&[0, 1]);
        body.extend(attr(NDA_DST, &[10, 0, 0, 2]));
        if let Some(mac) = mac {
            body.extend(attr(NDA_LLADDR, &mac));
        }
        msg(kind, &body)
    }

    const REACHABLE: u16 = 0x02;
    const STALE: u16 = 0x04;
    const FAILED: u16 = 0x20;

    #[test]
    fn neighbour_state_changes_keep_routes_mac_changes_do_not() {
        let mac = [2, 0, 0, 0, 0, 1];
        let mut n = Neighbours::default();
        // (what happens, message, routes stale after it)
        let cases = [
            ("learned", neigh(RTM_NEWNEIGH, REACHABLE, Some(mac)), true),
            (
                "goes stale, same MAC",
                neigh(RTM_NEWNEIGH, STALE, Some(mac)),
                false,
            ),
            (
                "reachable again",
                neigh(RTM_NEWNEIGH, REACHABLE, Some(mac)),
                false,
            ),
            (
                "another MAC",
                neigh(RTM_NEWNEIGH, REACHABLE, Some([2, 0, 0, 0, 0, 9])),
                true,
            ),
            ("fails", neigh(RTM_NEWNEIGH, FAILED, None), true),
            (
                "learned again",
                neigh(RTM_NEWNEIGH, REACHABLE, Some(mac)),
                true,
            ),
            ("deleted", neigh(RTM_DELNEIGH, REACHABLE, Some(mac)), true),
        ];
        for (what, m, stale) in cases {
            assert_eq!(n.apply(&m), stale, "{what}");
        }
    }

    #[test]
    fn route_address_and_link_changes_always_count() {
        let mut n = Neighbours::default();
        for kind in [
            RTM_NEWROUTE,
            RTM_DELROUTE,
            RTM_NEWADDR,
            RTM_DELADDR,
            RTM_NEWLINK,
            RTM_DELLINK,
        ] {
            assert!(n.apply(&msg(kind, &[0; 12])), "message {kind}");
        }
        assert!(!n.apply(&msg(3, &[])), "NLMSG_DONE changes nothing");
        // A batch counts if any of it does.
        let mac = [2, 0, 0, 0, 0, 1];
        let mut batch = neigh(RTM_NEWNEIGH, REACHABLE, Some(mac));
        n.apply(&batch);
        batch.extend(msg(RTM_NEWROUTE, &[0; 12]));
        assert!(n.apply(&batch));
    }

    #[test]
    fn garbled_messages_count_as_changes() {
        let mut n = Neighbours::default();
        let mut m = neigh(RTM_NEWNEIGH, REACHABLE, Some([2, 0, 0, 0, 0, 1]));
        m[0] = 200;
        assert!(n.apply(&m), "length past the buffer");
        assert!(n.apply(&msg(RTM_NEWNEIGH, &[0; 4])), "short ndmsg");
    }
}
