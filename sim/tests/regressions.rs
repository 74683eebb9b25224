//! Seeds that once failed, each named for what it found. They run as they failed: in a fresh
//! process, for 60 simulated seconds. The ones here failed in the simulator's first form (one
//! region, Raft and storage only); the three-region world replays them differently, and each
//! bug they found is pinned by a unit test in `crates/raft` as well.

mod common;

fn passes(seed: u64) {
    let report = common::run(seed, 60, false);
    assert!(report.passed(), "seed {seed}: {:?}", report.violations);
    assert!(report.ops_checked > 300, "seed {seed} checked only {} calls", report.ops_checked);
}

/// A crash between openraft's purge through an installed snapshot and the install becoming
/// durable left stale log entries below a hole; the node could not restart
/// ("try to get log at index N but got None").
#[test]
fn a_node_restarts_after_a_crash_during_a_snapshot_install() {
    for seed in [11, 12, 14, 16, 17, 20, 22] {
        passes(seed);
    }
}

/// Two nodes led the same numeric term one after the other (openraft names a leadership by
/// term and node id); the entries every node applied still agree.
#[test]
fn two_leaderships_of_one_term_still_apply_the_same_entries() {
    for seed in [38, 89] {
        passes(seed);
    }
}

/// A leader crashed just after acknowledging a write whose commit its log had not yet recorded;
/// openraft restored it as leader at restart and it served a linearizable read from before
/// that write. A stored vote now loads as not committed, so a restarted node must win an
/// election first.
#[test]
fn a_restarted_leader_serves_no_read_from_before_its_acknowledged_writes() {
    passes(72);
}

/// The operator's attempt to narrow the mirrors timed out just before the heal, and the
/// simulator took it as failed; it had committed, so the run ended under the narrow policy
/// while the convergence check expected the first (ap-south, rightly, held no copy). The
/// simulated operator now treats an attempt without an answer as maybe applied and applies
/// the policy it wants again.
#[test]
fn a_policy_change_with_an_unknown_outcome_is_applied_again() {
    passes(66);
}
