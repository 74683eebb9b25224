//! The invariants are not vacuous: on disks that acknowledge syncs without making anything
//! durable, runs fail; under a policy that lets the restricted dataset out, the residency
//! check fails; on honest disks under the real policy the same seeds pass.

mod common;

#[test]
fn disks_that_lose_synced_writes_fail_runs() {
    let failed: Vec<u64> = (1..=6).filter(|&seed| !common::run(seed, 30, true).passed()).collect();
    assert!(!failed.is_empty(), "no run on lying disks failed an invariant");
}

#[test]
fn honest_disks_pass_the_same_seeds() {
    for seed in 1..=6 {
        let report = common::run(seed, 30, false);
        assert!(report.passed(), "seed {seed}: {:?}", report.violations);
    }
}

#[test]
fn a_policy_that_lets_restricted_bytes_out_fails_the_residency_check() {
    let report = common::run_with(3, 20, &["--leaky-policy"]);
    let residency: Vec<_> = report.violations.iter().filter(|v| v.invariant == "residency").collect();
    assert!(!residency.is_empty(), "no residency breach seen: {:?}", report.violations);
    assert!(residency[0].detail.contains("CANARY-"), "{}", residency[0].detail);
}
