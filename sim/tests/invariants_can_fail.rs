//! The invariants are not vacuous: on disks that acknowledge syncs without making anything
//! durable, runs fail; under a policy that lets the restricted dataset out, the residency
//! check fails; when regions merge by the newest version alone, acknowledged multi-primary
//! writes vanish and the check says so; on honest disks under the real policy and the real
//! merge the same seeds pass.

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

#[test]
fn merging_by_the_newest_version_alone_loses_acknowledged_multi_primary_writes() {
    let invariant = meridian_sim::invariants::multi_primary::INVARIANT;
    let (seed, lost) = (1..=4)
        .find_map(|seed| {
            let report = common::run_with(seed, 20, &["--plain-lww"]);
            report.violations.into_iter().find(|v| v.invariant == invariant).map(|v| (seed, v))
        })
        .expect("no run that merges by the newest version alone lost an acknowledged multi-primary write");
    assert!(lost.detail.contains("acknowledged"), "{}", lost.detail);
    // The same seed under the real merge keeps every one.
    let report = common::run(seed, 20, false);
    assert!(report.passed(), "seed {seed}: {:?}", report.violations);
    assert!(report.coverage.paths.get("set add found in every copy").is_some_and(|&n| n > 0));
}
