//! Global datapath counters: indices of the per-CPU `STATS` array.
//!
//! Every packet the datapath handles specially ends in exactly one counter:
//! a path it took (new flow, established flow, reply, reject) or the reason it
//! was left alone or dropped. Drops are never silent.

/// What happens to a packet that ends with a given [`Counter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The packet was translated or answered by the datapath.
    Handled,
    /// The packet went on untouched (not ours, or nothing safe to do with it).
    Passed,
    /// The packet was dropped by policy (expected, not logged).
    Dropped,
    /// The packet was dropped because something failed (logged).
    Failed,
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $variant:ident = $value:literal, $name:literal, $verdict:ident; )*) => {
        /// Index into the `STATS` per-CPU array.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Counter {
            $( $(#[$doc])* $variant = $value, )*
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];
            /// Number of counters.
            pub const COUNT: usize = Self::ALL.len();
            /// Size of the `STATS` array: room for counters yet to come, so
            /// adding one does not change the pinned layout.
            pub const CAPACITY: usize = 64;

            /// The counter with index `index`, if there is one.
            pub const fn from_index(index: u32) -> Option<Counter> {
                match index { $($value => Some(Counter::$variant),)* _ => None }
            }

            /// Stable snake_case name, used in metrics and CLI output.
            pub const fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name,)* }
            }

            /// What happens to a packet counted here.
            pub const fn verdict(self) -> Verdict {
                match self { $(Counter::$variant => Verdict::$verdict,)* }
            }
        }
    };
}

counters! {
    /// A packet to a frontend picked a backend and was DNATed.
    NewFlow = 0, "new_flow", Handled;
    /// A packet of a tracked flow was DNATed to its backend.
    Established = 1, "established", Handled;
    /// A reply from a backend got its source rewritten back to the frontend.
    ReplyNat = 2, "reply_nat", Handled;
    /// A packet to a service without ready endpoints was answered with ICMP port unreachable.
    RejectNoEndpoints = 3, "reject_no_endpoints", Handled;
    /// IPv4 header shorter than 20 bytes, bad version, or longer than the packet.
    MalformedIp = 4, "malformed_ip", Passed;
    /// TCP/UDP header truncated or inconsistent (TCP data offset < 5).
    MalformedL4 = 5, "malformed_l4", Passed;
    /// IP fragment: ports are not available, the datapath does not reassemble.
    Fragment = 6, "fragment", Passed;
    /// Pulling packet headers into linear data failed.
    PullFailed = 7, "pull_failed", Failed;
    /// A service matched but its selection table is missing.
    NoSelectionTable = 8, "no_selection_table", Failed;
    /// A selection table slot pointed at a backend id that is not set.
    BackendMissing = 9, "backend_missing", Failed;
    /// Creating the connection-tracking entries failed.
    CtInsertFailed = 10, "ct_insert_failed", Failed;
    /// A checksum helper failed while rewriting; the packet cannot be left half-rewritten.
    CsumFailed = 11, "csum_failed", Failed;
    /// Building or sending the ICMP reject failed.
    RejectFailed = 12, "reject_failed", Failed;
    /// Endpoints exist, but none this traffic may use (a Local traffic policy
    /// on a node without local endpoints): dropped, as kube-proxy does.
    NoLocalEndpoints = 13, "no_local_endpoints", Dropped;
    /// A packet of an external flow was translated and sent straight on to a
    /// backend on another node (XDP_TX or redirect after a FIB lookup).
    Forwarded = 14, "forwarded", Handled;
    /// A translated packet to a remote backend was handed to the kernel to
    /// forward (the FIB lookup needs a neighbour entry or a slow path).
    ForwardedByKernel = 15, "forwarded_by_kernel", Handled;
    /// A reply of a SNATed external flow was translated back and sent to the client.
    SnatReply = 16, "snat_reply", Handled;
    /// A reply of an external flow to a local backend got the frontend as its source.
    ExternalReply = 17, "external_reply", Handled;
    /// A reply of a DSR flow got the service address as its source on the
    /// backend's node and went straight to the client.
    DsrReply = 18, "dsr_reply", Handled;
    /// A packet carrying the DSR option taught this (backend's) node a flow.
    DsrLearned = 19, "dsr_learned", Handled;
    /// No free SNAT port for a new external flow: dropped.
    SnatPortsExhausted = 20, "snat_ports_exhausted", Failed;
    /// The DSR option does not fit (IPv4 options already present, or the
    /// packet would exceed the MTU): dropped.
    DsrNoRoom = 21, "dsr_no_room", Dropped;
    /// A packet to an external frontend (NodePort, LoadBalancer IP,
    /// externalIP) whose Service has no endpoints at all: answered with an
    /// ICMP port unreachable, sent back out of its interface.
    NoEndpointsExternal = 22, "no_endpoints_external", Handled;
    /// Growing the packet for the DSR option failed.
    AdjustFailed = 23, "adjust_failed", Failed;
    /// XDP left an external packet untouched for TC: the next hop's MAC is
    /// not known yet (TC has the kernel resolve it).
    DeferredToTc = 24, "deferred_to_tc", Passed;
    /// An ICMP error about a translated flow was translated back (its quote,
    /// and where needed its addresses) for the flow's client.
    IcmpTranslated = 25, "icmp_translated", Handled;
    /// A packet to a LoadBalancer frontend from outside its
    /// `loadBalancerSourceRanges`: dropped.
    SourceRangeDenied = 26, "source_range_denied", Dropped;
    /// A packet of a pod reaching itself through its Service (hairpin),
    /// either direction: translated both ways and sent back into the pod.
    Hairpin = 27, "hairpin", Handled;
    /// A socket's connect (TCP, connected UDP) or unconnected UDP send to a
    /// frontend got a backend's address instead (socket-level load balancing).
    SockTranslated = 28, "sock_translated", Handled;
    /// A socket's connect or send to a frontend without usable endpoints
    /// failed at once with ECONNREFUSED.
    SockRefused = 29, "sock_refused", Handled;
    /// A socket's peer or a datagram's source showed the frontend instead
    /// of the backend (getpeername, recvmsg).
    SockReplyNat = 30, "sock_reply_nat", Handled;
    /// A socket's connect or send to a frontend was left to the packet path
    /// (source ranges apply, or the selection failed).
    SockPassed = 31, "sock_passed", Passed;
    /// A connected socket was translated but `SOCK_PEER` was full:
    /// getpeername shows it the backend (raise `--sock-entries`).
    SockPeerFull = 32, "sock_peer_full", Failed;
    /// A packet with the DSR option that names no external frontend here,
    /// or is not addressed to a local backend of it: dropped, nothing learned.
    DsrRefused = 33, "dsr_refused", Dropped;
    /// The client's packet that completes a TCP handshake: the flow moved
    /// from `CT_NEW` to `CONNTRACK`, the packet translated as established.
    HandshakeDone = 34, "handshake_done", Handled;
    /// A part of the datapath verified apart from its caller returned a
    /// result the caller does not know: a bug, dropped and logged.
    Internal = 35, "internal_error", Failed;
}

// Every counter has a slot in `STATS`.
const _: () = assert!(Counter::COUNT <= Counter::CAPACITY);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_names_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?} out of order");
            assert_eq!(Counter::from_index(i as u32), Some(*c));
            for other in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), other.name());
            }
        }
        assert_eq!(Counter::from_index(Counter::COUNT as u32), None);
    }
}
