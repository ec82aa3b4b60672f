//! Per-CPU counters: one per path/reason, and per service port.

use proxy_common::Counter;

use crate::maps::{STATS, SVC_STATS};

/// Adds one to `counter`.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(c) = STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
}

/// What happened to a packet of a service port.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SvcEvent {
    /// A packet of an existing flow, either direction.
    Packet,
    /// The first packet of a new flow.
    NewFlow,
    /// A packet refused for lack of endpoints.
    Rejected,
}

/// Accounts a socket-level event (a new connection, a refusal) to service
/// port `svc_id`: no packet is involved.
#[inline(always)]
pub fn socket(svc_id: u32, event: SvcEvent) {
    if let Some(c) = SVC_STATS.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe {
            match event {
                SvcEvent::Packet => {}
                SvcEvent::NewFlow => (*c).new_flows += 1,
                SvcEvent::Rejected => (*c).rejected += 1,
            }
        }
    }
}

/// Accounts one packet of `l3_len` bytes to service port `svc_id`.
#[inline(always)]
pub fn service(svc_id: u32, l3_len: u32, event: SvcEvent) {
    if let Some(c) = SVC_STATS.get_ptr_mut(svc_id) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(l3_len);
            match event {
                SvcEvent::Packet => {}
                SvcEvent::NewFlow => (*c).new_flows += 1,
                SvcEvent::Rejected => (*c).rejected += 1,
            }
        }
    }
}
