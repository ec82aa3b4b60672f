//! Program load time: the agent verifies every program at each start, and
//! verification is most of what loading costs. Each program must stay
//! within its budget of instructions the verifier processes (the kernel's
//! own count, the same on every load of the same object and kernel), so a
//! change that makes the verifier walk many more paths fails here rather
//! than in the cold-sync benchmark.

use proxy_common::maps::programs;
use proxy_tests::fixture;

/// The most instructions the verifier may process per program, and in all.
/// The fast paths are small; the slow ones (new flows, reached by a tail
/// call) are bigger but verified once, their steps apart.
const BUDGETS: &[(&str, u32)] = &[
    (programs::TC_POD_INGRESS, 20_000),
    (programs::TC_POD_EGRESS, 10_000),
    (programs::TC_POD_SLOW, 40_000),
    (programs::TC_EXT_INGRESS, 30_000),
    (programs::TC_EXT_SLOW, 60_000),
    (programs::XDP_EXT, 30_000),
    (programs::XDP_EXT_SLOW, 60_000),
    (programs::XDP_PASS, 100),
    (programs::SOCK_CONNECT4, 20_000),
    (programs::SOCK_SENDMSG4, 20_000),
    (programs::SOCK_RECVMSG4, 1_000),
    (programs::SOCK_GETPEERNAME4, 1_000),
    (programs::SOCK_RELEASE, 1_000),
];
const TOTAL: u32 = 250_000;

#[test]
fn every_program_verifies_within_its_budget() {
    let dp = fixture::load().unwrap();
    let counts = dp.verified_instructions().unwrap();
    let mut over = Vec::new();
    for (name, n) in &counts {
        let budget = BUDGETS
            .iter()
            .find(|(b, _)| b == name)
            .map(|(_, b)| *b)
            .unwrap_or_else(|| panic!("{name} has no budget"));
        println!("{name:20} {n:>8} of {budget}");
        assert!(*n > 0, "{name}: no verifier count");
        if *n > budget {
            over.push(format!("{name}: {n} > {budget}"));
        }
    }
    let total: u32 = counts.iter().map(|(_, n)| n).sum();
    println!("{:20} {total:>8} of {TOTAL}", "all");
    assert!(over.is_empty(), "over budget: {over:?}");
    assert!(total <= TOTAL, "all programs: {total} > {TOTAL}");
}
