//! A seed replays exactly: every run of one seed has the same fingerprint (a digest of the
//! event trace and of every client call), alone or inside a batch after other seeds.

mod common;

#[test]
fn a_seed_replays_exactly_alone_and_in_a_batch() {
    let alone = common::run(20, 20, false);
    assert!(alone.passed(), "{:?}", alone.violations);
    assert!(alone.ops_checked > 200, "only {} calls checked", alone.ops_checked);
    assert_eq!(common::run(20, 20, false).fingerprint, alone.fingerprint);
    let out = std::process::Command::new(common::BIN)
        .args(["--seeds", "3", "--first-seed", "18", "--duration-secs", "20", "--jobs", "1"])
        .output()
        .expect("run a batch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().find(|l| l.starts_with("seed 20:")).expect("seed 20 in the batch");
    assert!(line.contains(&format!("fingerprint {:016x}", alone.fingerprint)), "{line}");
}

#[test]
fn different_seeds_run_differently() {
    assert_ne!(common::run(1, 10, false).fingerprint, common::run(2, 10, false).fingerprint);
}
