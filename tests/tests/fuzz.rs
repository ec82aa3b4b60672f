//! Differential fuzzing of the east-west programs against the reference
//! model (`proxy_tests::model`): a fixed-seed slice in the test command;
//! `cargo xtask fuzz --packets N --seed S` runs any size (through this test,
//! with `PXT_FUZZ_PACKETS` / `PXT_FUZZ_SEED`).
//!
//! Needs root (BPF). Runs in CI, which is root.

use proxy_tests::fuzz;

/// The slice the test command runs.
const DEFAULT_PACKETS: u64 = 30_000;
const DEFAULT_SEED: u64 = 1;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
#[expect(
    clippy::print_stdout,
    reason = "the fuzz run's summary is its report (cargo xtask fuzz shows it)"
)]
fn the_datapath_agrees_with_the_model_on_every_packet() {
    let packets = env_u64("PXT_FUZZ_PACKETS", DEFAULT_PACKETS);
    let seed = env_u64("PXT_FUZZ_SEED", DEFAULT_SEED);
    let mut dp = fuzz::datapath().unwrap();
    let report = fuzz::run(&mut dp, seed, packets).unwrap();
    println!(
        "fuzz: seed {seed}, {} packets ({} too short for BPF_PROG_TEST_RUN), {} mismatches, {} packets that are not a Service's modified; model outcomes {:?}",
        report.packets,
        report.unrunnable,
        report.mismatches,
        report.foreign_modified,
        report.outcomes
    );
    assert_eq!(report.packets, packets);
    assert!(
        report.mismatches == 0,
        "{} of {} packets differ from the model:\n{}",
        report.mismatches,
        report.packets,
        report.examples.join("\n")
    );
    // The slice exercises every outcome, or it proves little.
    for outcome in ["untouched", "translated", "rejected"] {
        assert!(
            report.outcomes.get(outcome).copied().unwrap_or(0) > packets / 50,
            "too few {outcome} packets: {:?}",
            report.outcomes
        );
    }
}
