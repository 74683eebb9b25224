//! Run a seed the way a batch does: in a fresh process of the simulator binary, whose report
//! comes back as JSON. (A seed's outcome is a function of the seed only in a fresh process.)

#![allow(dead_code)]

use meridian_sim::RunReport;

pub const BIN: &str = env!("CARGO_BIN_EXE_meridian-sim");

pub fn run(seed: u64, duration_secs: u64, lying_disks: bool) -> RunReport {
    run_with(seed, duration_secs, if lying_disks { &["--lying-disks"] } else { &[] })
}

/// Run a seed with extra flags (`--lying-disks`, `--leaky-policy`).
pub fn run_with(seed: u64, duration_secs: u64, flags: &[&str]) -> RunReport {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["--child", "--seed", &seed.to_string(), "--duration-secs", &duration_secs.to_string()]);
    cmd.args(flags);
    let out = cmd.output().expect("run the simulator");
    assert!(out.status.success(), "seed {seed}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("a report")
}
