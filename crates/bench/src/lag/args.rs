//! The `meridian bench lag` flags, kept next to the benchmark they drive so the CLI only wires
//! them in.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::{run, LagOptions, DEFAULT_BASE_PORT, DEFAULT_ETCDCTL_BIN};
use crate::System;

/// A system named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SystemArg {
    /// `etcdctl make-mirror` between two single-member etcd clusters.
    Etcd,
    /// Two Meridian regions of one node each.
    Meridian,
}

impl From<SystemArg> for System {
    fn from(s: SystemArg) -> Self {
        match s {
            SystemArg::Etcd => System::Etcd,
            SystemArg::Meridian => System::Meridian,
        }
    }
}

/// Measure cross-region lag against `etcdctl make-mirror` through the same one-way delay.
///
/// For each write rate and delay, starts fresh systems on 127.0.0.1, etcd first, then Meridian:
/// two Meridian regions of one node each (the delay as `[[wan]] one_way_ms`, a policy mirroring
/// the `bench` dataset from us-east to eu-west), and two single-member etcd clusters with
/// `etcdctl make-mirror` reading the source through a TCP proxy that delays each direction by
/// the same amount. An open-loop writer writes new keys at the source at the given rate; a
/// sample of them is polled at the destination until visible. It prints, per rate and delay,
/// p50 and p99 of (visible at the destination - acknowledged at the source - delay) for both
/// systems, the p99 ratio, and whether the targets are met (Meridian p99 <= 20 ms at 500
/// writes/s; p99 ratio <= 1). Needs Debian's etcd-server and etcd-client.
#[derive(Args, Debug, Clone)]
pub struct LagArgs {
    /// Write rates at the source, in writes per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "500,2000")]
    pub writes_per_sec: Vec<u32>,
    /// One-way delays between the regions, in milliseconds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,50,150")]
    pub delays_ms: Vec<u64>,
    /// Systems to run, comma-separated, in run order (without both, no ratio is printed).
    #[arg(long, value_delimiter = ',', default_value = "etcd,meridian")]
    pub systems: Vec<SystemArg>,
    /// Measured seconds per run: writes scheduled in this window are sampled.
    #[arg(long, default_value_t = 20)]
    pub duration_secs: u64,
    /// Seconds of writes before the window (not sampled).
    #[arg(long, default_value_t = 3)]
    pub warmup_secs: u64,
    /// Rounds per rate and delay; each round runs every system once on fresh processes.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Sampled writes per second of window; each is polled at the destination until visible.
    /// More samples steady the p99 but add read load on the shared cores.
    #[arg(long, default_value_t = 20)]
    pub samples_per_sec: u32,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_bytes: usize,
    /// Seconds past the delay a sample is polled before it counts as not visible (it is then
    /// recorded at this value, and the percentiles it reaches are printed as lower bounds).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub visibility_timeout_secs: u64,
    /// The etcd server binary (etcd 3.4).
    #[arg(long, default_value = crate::DEFAULT_ETCD_BIN)]
    pub etcd_bin: PathBuf,
    /// The etcdctl binary that runs make-mirror (etcdctl 3.4).
    #[arg(long, default_value = DEFAULT_ETCDCTL_BIN)]
    pub etcdctl_bin: PathBuf,
    /// First of the nine consecutive ports on 127.0.0.1 the systems and the proxy use.
    #[arg(long, default_value_t = DEFAULT_BASE_PORT)]
    pub base_port: u16,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl LagArgs {
    /// The benchmark options these flags ask for.
    pub fn options(&self) -> LagOptions {
        LagOptions {
            etcd_bin: self.etcd_bin.clone(),
            etcdctl_bin: self.etcdctl_bin.clone(),
            writes_per_sec: self.writes_per_sec.clone(),
            delays_ms: self.delays_ms.clone(),
            systems: self.systems.iter().map(|&s| s.into()).collect(),
            duration: Duration::from_secs(self.duration_secs),
            warmup: Duration::from_secs(self.warmup_secs),
            rounds: self.rounds,
            samples_per_sec: self.samples_per_sec,
            value_bytes: self.value_bytes,
            visibility_timeout: Duration::from_secs(self.visibility_timeout_secs),
            base_port: self.base_port,
            ..LagOptions::default()
        }
    }
}

/// `meridian bench lag`: runs the benchmark (Ctrl-C stops it and every process it started)
/// and prints the report.
pub async fn run_cli(args: LagArgs) -> anyhow::Result<()> {
    let opts = args.options();
    opts.validate()?;
    let report = tokio::select! {
        r = run(opts) => r?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        lag: LagArgs,
    }

    #[test]
    fn defaults_are_the_issue_matrix() {
        let cli = Cli::parse_from(["lag"]);
        let o = cli.lag.options();
        assert_eq!(o.writes_per_sec, vec![500, 2000]);
        assert_eq!(o.delays_ms, vec![10, 50, 150]);
        assert_eq!(o.systems, vec![System::Etcd, System::Meridian]);
        assert!(o.validate().is_ok());
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::parse_from([
            "lag",
            "--writes-per-sec",
            "100",
            "--delays-ms",
            "0,5",
            "--systems",
            "meridian",
            "--duration-secs",
            "2",
        ]);
        let o = cli.lag.options();
        assert_eq!((o.writes_per_sec, o.delays_ms, o.systems), (vec![100], vec![0, 5], vec![System::Meridian]));
        assert_eq!(o.duration, Duration::from_secs(2));
    }
}
