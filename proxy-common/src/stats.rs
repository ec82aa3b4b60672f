//! The per-CPU `SVC_STATS` array: per service port counters (the global
//! `STATS` counters are in [`crate::counters`]).

use crate::pod;

/// Per-service counters: value of the per-CPU `SVC_STATS` array, indexed by svc id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcCounters {
    /// Packets sent to the service (both directions of its flows).
    pub packets: u64,
    /// Bytes of those packets (L3 length).
    pub bytes: u64,
    /// Flows that selected a backend.
    pub new_flows: u64,
    /// Packets refused because the service had no ready endpoint.
    pub rejected: u64,
}

pod!(SvcCounters);
