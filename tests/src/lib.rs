//! Test harness for proxy: network namespaces, packet fixtures, pod servers
//! and clients, and the agent as a process. Used by the tests in `tests/` and
//! by the demo (`cargo xtask demo`).
#![expect(
    clippy::expect_used,
    reason = "test harness: a broken fixture is a test failure, not a runtime error"
)]

pub mod cluster;
pub mod fake_api;
pub mod fixture;
pub mod flood;
pub mod fuzz;
pub mod model;
pub mod netns;
pub mod old_layout;
pub mod packet;
pub mod twonode;
