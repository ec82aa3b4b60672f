//! Differential fuzzing of the datapath against the reference model
//! (`proxy_tests::model`): the east-west programs and the external path,
//! each a fixed-seed slice in the test command; `cargo xtask fuzz --packets
//! N --seed S` runs any size (through these tests, with `PXT_FUZZ_PACKETS` /
//! `PXT_FUZZ_SEED`).
//!
//! Needs root (BPF). Runs in CI, which is root.
#![expect(
    clippy::unwrap_used,
    reason = "integration test: a failed unwrap is a test failure"
)]

use proxy_tests::fuzz::{self, World};

/// The slice the test command runs, per world.
const DEFAULT_PACKETS: u64 = 30_000;
const DEFAULT_SEED: u64 = 1;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs one world and checks the report; `outcomes` must each be common.
#[expect(
    clippy::print_stdout,
    reason = "the fuzz run's summary is its report (cargo xtask fuzz shows it)"
)]
fn agrees(world: World, outcomes: &[&str]) {
    let packets = env_u64("PXT_FUZZ_PACKETS", DEFAULT_PACKETS);
    let seed = env_u64("PXT_FUZZ_SEED", DEFAULT_SEED);
    let mut dp = match world {
        World::EastWest => fuzz::datapath(),
        World::External => fuzz::external_datapath(),
    }
    .unwrap();
    let report = fuzz::run(&mut dp, world, seed, packets).unwrap();
    println!(
        "fuzz {world:?}: seed {seed}, {} packets ({} too short for BPF_PROG_TEST_RUN), {} mismatches, {} packets the model leaves alone modified; model outcomes {:?}",
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
    for outcome in outcomes {
        assert!(
            report.outcomes.get(outcome).copied().unwrap_or(0) > packets / 50,
            "too few {outcome} packets: {:?}",
            report.outcomes
        );
    }
}

#[test]
fn the_east_west_programs_agree_with_the_model_on_every_packet() {
    agrees(World::EastWest, &["untouched", "translated", "rejected"]);
}

#[test]
fn the_external_path_agrees_with_the_model_on_every_packet() {
    agrees(
        World::External,
        &["untouched", "translated", "dropped", "rejected"],
    );
}
