//! Manual smoke check of the etcd half of the benchmark: starts a fresh
//! three-member etcd cluster per run and drives it at concurrency 1 and 16
//! for 3 s each (1 s warmup). Needs `/usr/bin/etcd` (Debian's etcd-server).
//!
//! `cargo run -p meridian-bench --example etcd_only [ETCD_BIN] [BASE_PORT]`

use std::path::PathBuf;
use std::time::Duration;

use meridian_bench::{run_one, BenchOptions, RunSummary, System};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut opts = BenchOptions::new("meridian");
    if let Some(bin) = args.next() {
        opts.etcd_bin = PathBuf::from(bin);
    }
    if let Some(port) = args.next() {
        opts.base_port = port.parse()?;
    }
    opts.duration = Duration::from_secs(3);
    opts.warmup = Duration::from_secs(1);
    for c in [1, 16] {
        let (target, result) = run_one(&opts, System::Etcd, c).await?;
        let s = RunSummary::new(System::Etcd, c, 1, target.base(), &result);
        println!(
            "etcd clients={c:<3} {:>8.0} ops/s  p50 {:>6.2} ms  p99 {:>6.2} ms  ops {}  errors {}  (leader {})",
            s.ops_per_sec, s.p50_ms, s.p99_ms, s.ops, s.errors, s.target
        );
        if let Some(e) = &s.first_error {
            println!("  first error: {e}");
        }
    }
    Ok(())
}
