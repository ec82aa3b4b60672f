//! proxy-agent: the userspace half of the eBPF kube-proxy replacement.
//!
//! Layers, each testable alone:
//! sources ([`manifests`] → [`store`]) → [`translate`] (pure) →
//! [`reconcile`] (pure diff) → [`datapath`] (the only module touching aya).

pub mod agent;
pub mod conntrack;
pub mod datapath;
pub mod diagnose;
pub mod engine;
pub mod health;
pub mod healthcheck;
pub mod ifaces;
pub mod inspect;
pub mod kube_source;
pub mod maglev;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod store;
pub mod translate;
