//! The invariants are not vacuous: on disks that acknowledge syncs without making anything
//! durable, runs fail; on honest disks the same seeds pass.

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
