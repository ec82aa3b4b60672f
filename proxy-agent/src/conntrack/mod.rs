//! Connection-tracking lifecycle, decided in userspace: which entries have
//! been idle longer than their state allows, and which belong to backends
//! that are gone (pure, here), and the passes that delete them off the event
//! loop ([`gc`], through `datapath::ConntrackHandle`). The datapath only
//! records flows and moves their TCP state on.
//!
//! A flow has two entries (FORWARD, REPLY); it is judged as one: its state
//! is the furthest of the two, its idle time since the later of the two
//! last-seen times, and both entries go together.

pub mod gc;

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddrV4,
    time::Duration,
};

use proxy_common::{CT_F_HAIRPIN, CT_F_SNAT, CtKey, CtValue, ct_dir, ct_state, proto};

/// Idle timeouts by protocol and TCP state (kube-proxy's flag names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Half-open: a SYN without a completed handshake.
    pub tcp_syn: Duration,
    /// `--conntrack-tcp-timeout-established`.
    pub tcp_established: Duration,
    /// After a FIN or RST.
    pub tcp_close: Duration,
    /// `--conntrack-udp-timeout`.
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_syn: Duration::from_secs(60),
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_close: Duration::from_secs(10),
            udp: Duration::from_secs(60),
        }
    }
}

impl Timeouts {
    /// How long a flow of `proto` in `state` may stay idle.
    pub fn of(&self, proto: u8, state: u8) -> Duration {
        if proto != proto::TCP {
            return self.udp;
        }
        match state {
            ct_state::ESTABLISHED => self.tcp_established,
            ct_state::CLOSING | ct_state::CLOSED => self.tcp_close,
            _ => self.tcp_syn,
        }
    }
}

/// The REPLY key belonging to a FORWARD entry (the backend's answer as it
/// is sent: to the client, or to the address the client's source became:
/// the SNAT address, or the frontend for hairpin flows).
pub fn partner(key: &CtKey, v: &CtValue) -> CtKey {
    let (daddr_be, dport_be) = if v.flags & (CT_F_SNAT | CT_F_HAIRPIN) != 0 {
        (v.peer_addr_be, v.peer_port_be)
    } else {
        (key.saddr_be, key.sport_be)
    };
    CtKey {
        saddr_be: v.nat_addr_be,
        daddr_be,
        sport_be: v.nat_port_be,
        dport_be,
        proto: key.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    }
}

/// Flows idle longer than their timeout at `now_ns` (the kernel's
/// monotonic clock, as `bpf_ktime_get_coarse_ns`), each as its entries: a
/// FORWARD key with its REPLY partner when there is one, or a REPLY entry on
/// its own.
pub fn expired(entries: &HashMap<CtKey, CtValue>, now_ns: u64, t: &Timeouts) -> Vec<Vec<CtKey>> {
    let mut out = Vec::new();
    let mut paired = BTreeSet::new();
    let idle_too_long = |proto: u8, state: u8, last: u64| {
        let limit = u64::try_from(t.of(proto, state).as_nanos()).unwrap_or(u64::MAX);
        now_ns.saturating_sub(last) > limit
    };
    for (k, v) in entries.iter().filter(|(k, _)| k.dir == ct_dir::FORWARD) {
        let reply_key = partner(k, v);
        let reply = entries.get(&reply_key);
        let state = reply.map_or(v.state, |r| r.state.max(v.state));
        let last = reply.map_or(v.last_seen_ns, |r| r.last_seen_ns.max(v.last_seen_ns));
        if reply.is_some() {
            paired.insert(reply_key);
        }
        if idle_too_long(k.proto, state, last) {
            out.push(if reply.is_some() {
                vec![*k, reply_key]
            } else {
                vec![*k]
            });
        }
    }
    // REPLY entries on their own (learned from a DSR option, or whose
    // FORWARD entry the LRU evicted).
    for (k, v) in entries
        .iter()
        .filter(|(k, _)| k.dir == ct_dir::REPLY && !paired.contains(k))
    {
        if idle_too_long(k.proto, v.state, v.last_seen_ns) {
            out.push(vec![*k]);
        }
    }
    out
}

/// Entries of flows whose backend is gone (`gone`: no Service refers to it
/// any more, whatever the protocol), and UDP flows whose backend left their
/// Service (`udp_left`: (svc id, backend id)), so clients move on at once.
pub fn departed(
    entries: &HashMap<CtKey, CtValue>,
    gone: &BTreeSet<SocketAddrV4>,
    udp_left: &BTreeSet<(u32, u32)>,
) -> Vec<CtKey> {
    entries
        .iter()
        .filter(|(k, v)| {
            let backend = if k.dir == ct_dir::FORWARD {
                v.nat()
            } else {
                k.src()
            };
            gone.contains(&backend)
                || (k.proto == proto::UDP && udp_left.contains(&(v.svc_id, v.backend_id)))
        })
        .map(|(k, _)| *k)
        .collect()
}

/// The kernel's monotonic clock now, in ns (what the datapath stamps).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Parses a duration as kube-proxy's flags take it: `90`, `30s`, `500ms`,
/// `10m`, `24h`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{s:?}: expected a duration such as 30s, 10m or 24h"))?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += match &rest[..unit] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            u => return Err(format!("{s:?}: unknown unit {u:?} (ms, s, m, h)")),
        };
        rest = &rest[unit..];
    }
    if total.is_zero() {
        return Err(format!("{s:?}: must be longer than zero"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const S: u64 = 1_000_000_000;

    fn flow(
        client: u16,
        state: u8,
        proto: u8,
        last_s: u64,
        reply_last_s: Option<u64>,
    ) -> [(CtKey, CtValue); 2] {
        let fwd = CtKey::new(
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), client),
            SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 80),
            proto,
            ct_dir::FORWARD,
        );
        let mut v = CtValue {
            state,
            backend_id: 7,
            svc_id: 3,
            last_seen_ns: last_s * S,
            ..CtValue::default()
        };
        v.set_nat(SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 9), 8080));
        let rk = partner(&fwd, &v);
        let rv = CtValue {
            nat_addr_be: fwd.daddr_be,
            nat_port_be: fwd.dport_be,
            last_seen_ns: reply_last_s.unwrap_or(last_s) * S,
            ..v
        };
        [(fwd, v), (rk, rv)]
    }

    #[test]
    fn idle_flows_expire_by_state_both_entries_together() {
        let t = Timeouts {
            tcp_syn: Duration::from_secs(5),
            tcp_established: Duration::from_secs(100),
            tcp_close: Duration::from_secs(2),
            udp: Duration::from_secs(10),
        };
        let now = 1000 * S;
        // (case, flow, expired?)
        let cases = [
            (
                "established, idle 50 s",
                flow(1, ct_state::ESTABLISHED, proto::TCP, 950, None),
                false,
            ),
            (
                "established, idle 101 s",
                flow(2, ct_state::ESTABLISHED, proto::TCP, 899, None),
                true,
            ),
            (
                "half-open, idle 6 s",
                flow(3, ct_state::SYN_SENT, proto::TCP, 994, None),
                true,
            ),
            (
                "closing, idle 3 s",
                flow(4, ct_state::CLOSING, proto::TCP, 997, None),
                true,
            ),
            (
                "closing, idle 1 s",
                flow(5, ct_state::CLOSING, proto::TCP, 999, None),
                false,
            ),
            (
                "udp, idle 11 s",
                flow(6, ct_state::NONE, proto::UDP, 989, None),
                true,
            ),
            (
                "udp, forward idle but replies recent",
                flow(7, ct_state::NONE, proto::UDP, 900, Some(995)),
                false,
            ),
        ];
        let mut entries = HashMap::new();
        for (_, f, _) in &cases {
            entries.extend(f.iter().copied());
        }
        // The reply of a SYN_SENT flow saw a FIN: the flow is closing.
        let mut f = flow(8, ct_state::SYN_SENT, proto::TCP, 997, None);
        f[1].1.state = ct_state::CLOSING;
        entries.extend(f);
        let gone: BTreeSet<CtKey> = expired(&entries, now, &t).into_iter().flatten().collect();
        for (name, f, want) in &cases {
            for (k, _) in f {
                assert_eq!(gone.contains(k), *want, "{name} ({:?})", k.dir);
            }
        }
        assert!(
            gone.contains(&f[0].0) && gone.contains(&f[1].0),
            "furthest state of the two"
        );
        // An orphan REPLY entry is judged alone.
        let mut orphan = HashMap::new();
        let [_, r] = flow(9, ct_state::ESTABLISHED, proto::TCP, 800, None);
        orphan.insert(r.0, r.1);
        assert_eq!(expired(&orphan, now, &t), vec![vec![r.0]]);
    }

    #[test]
    fn partners_of_translated_sources() {
        let [(k, mut v), _] = flow(1, ct_state::ESTABLISHED, proto::TCP, 1, None);
        v.set_peer(SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 1));
        for flag in [CT_F_SNAT, CT_F_HAIRPIN] {
            v.flags = flag;
            let p = partner(&k, &v);
            assert_eq!((p.daddr_be, p.dport_be), (v.peer_addr_be, v.peer_port_be));
            assert_eq!((p.saddr_be, p.sport_be), (v.nat_addr_be, v.nat_port_be));
        }
        v.flags = 0;
        assert_eq!(
            partner(&k, &v).daddr_be,
            k.saddr_be,
            "plain flows answer the client"
        );
    }

    #[test]
    fn flows_of_gone_backends_and_departed_udp() {
        let mut entries = HashMap::new();
        let tcp = flow(1, ct_state::ESTABLISHED, proto::TCP, 1, None);
        let udp = flow(2, ct_state::NONE, proto::UDP, 1, None);
        entries.extend(tcp);
        entries.extend(udp);
        let backend = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 9), 8080);
        let none = BTreeSet::new();
        assert!(departed(&entries, &none, &BTreeSet::new()).is_empty());
        let mut all = departed(&entries, &BTreeSet::from([backend]), &BTreeSet::new());
        all.sort();
        assert_eq!(all.len(), 4, "both protocols, both directions");
        let left = departed(&entries, &BTreeSet::new(), &BTreeSet::from([(3, 7)]));
        assert_eq!(left.len(), 2);
        assert!(left.iter().all(|k| k.proto == proto::UDP));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        for bad in ["", "0s", "5d", "s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
