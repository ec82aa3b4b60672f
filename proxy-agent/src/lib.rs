//! proxy-agent: the userspace half of the eBPF kube-proxy replacement.
//!
//! Data flows one way (docs/ARCHITECTURE.md has the module map):
//! sources ([`kube_source`], [`manifests`]) → [`store`] → [`translate`]
//! (pure) → [`engine`] (incremental) → [`reconcile`] (pure plan) →
//! [`datapath`] (the only module touching aya), with [`programmed`] the
//! contract between the last two. [`agent`] is the loop that wires them.

pub mod agent;
#[cfg(test)]
mod architecture;
pub mod conntrack;
pub mod datapath;
pub mod diagnose;
pub mod engine;
pub mod health;
pub mod healthcheck;
pub mod host;
pub mod ifaces;
pub mod inspect;
pub mod kube_proxy;
pub mod kube_source;
pub mod maglev;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod node;
pub mod programmed;
pub mod reconcile;
pub mod routes;
pub mod sockdiag;
pub mod store;
pub mod translate;
