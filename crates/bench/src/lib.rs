//! Benchmarks against etcd 3.4, each printing ratios against a baseline measured
//! in the same run (docs/design.md#performance): the in-region write benchmark here, and the
//! cross-region lag benchmark in [`lag`] (`meridian bench lag`).
//!
//! The in-region write benchmark behind `meridian bench`: it starts a fresh
//! three-node Meridian region and a fresh three-member etcd 3.4 cluster on
//! 127.0.0.1, alternating between them (etcd, Meridian, etcd, Meridian, ...),
//! drives each with N concurrent HTTP/1.1 writers, and reports throughput and
//! latency per concurrency level together with the targets Meridian must meet
//! against etcd (throughput ratio >= 1.0, p99 ratio <= 1.0).
//!
//! Entry points: [`run`] produces a [`Report`]; [`print_report`] prints it as a
//! table or as JSON. [`run_one`] measures a single system once.

pub mod base64;
pub mod bytes;
pub mod delay_proxy;
pub mod etcd;
pub mod failover;
pub mod lag;
pub mod load;
pub mod merge;
pub mod meridian;
pub mod ports;
pub mod procs;
pub mod report;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

pub use load::{RunResult, Target};
pub use report::{LevelReport, Machine, Params, Report, RunSummary, SystemSummary, TargetStatus};

use etcd::EtcdCluster;
use load::LoadParams;
use meridian::MeridianCluster;
use ports::PortPlan;

/// How long a cluster gets to become healthy after its processes start.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a healthy cluster gets to accept its first write.
pub const FIRST_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to look for a Meridian leader before falling back to node 1.
pub const LEADER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Default `--base-port`: below the Linux ephemeral range.
pub const DEFAULT_BASE_PORT: u16 = 24000;
/// Default etcd binary (Debian's `etcd-server` package).
pub const DEFAULT_ETCD_BIN: &str = "/usr/bin/etcd";

/// The system under test in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// A three-member etcd cluster.
    Etcd,
    /// A three-node Meridian region.
    Meridian,
}

impl System {
    /// Lowercase display name.
    pub fn name(self) -> &'static str {
        match self {
            System::Etcd => "etcd",
            System::Meridian => "meridian",
        }
    }
}

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `meridian` executable to start as `meridian server ...`
    /// (the CLI passes `std::env::current_exe()`).
    pub meridian_exe: PathBuf,
    /// Concurrency levels (concurrent writers), in run order.
    pub concurrency: Vec<usize>,
    /// Measurement window per run.
    pub duration: Duration,
    /// Load applied before the window opens; not recorded.
    pub warmup: Duration,
    /// Size of each written value, in bytes.
    pub value_bytes: usize,
    /// Rounds per concurrency level; each round is an etcd run then a Meridian run.
    pub rounds: usize,
    /// etcd 3.4 binary.
    pub etcd_bin: PathBuf,
    /// First port of the plan: etcd client +0..2, etcd peer +10..12,
    /// Meridian API +20..22, Meridian peer +30..32, all on 127.0.0.1.
    pub base_port: u16,
    /// Whether the caller wants JSON output (used by [`print_report`] via the CLI).
    pub json: bool,
    /// Per-request timeout for the load generator.
    pub request_timeout: Duration,
    /// Suppress per-run progress lines on stderr.
    pub quiet: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            meridian_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("meridian")),
            concurrency: vec![1, 16, 64],
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            value_bytes: 256,
            rounds: 2,
            etcd_bin: PathBuf::from(DEFAULT_ETCD_BIN),
            base_port: DEFAULT_BASE_PORT,
            json: false,
            request_timeout: Duration::from_secs(5),
            quiet: false,
        }
    }
}

impl BenchOptions {
    /// Defaults with the given Meridian executable.
    pub fn new(meridian_exe: impl Into<PathBuf>) -> Self {
        Self { meridian_exe: meridian_exe.into(), ..Self::default() }
    }

    /// Rejects unusable parameters before anything is started.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.concurrency.is_empty() {
            bail!("no concurrency levels given");
        }
        if self.concurrency.contains(&0) {
            bail!("concurrency levels must be at least 1");
        }
        if self.rounds == 0 {
            bail!("rounds must be at least 1");
        }
        if self.duration.is_zero() {
            bail!("duration must be positive");
        }
        if self.request_timeout.is_zero() {
            bail!("request timeout must be positive");
        }
        PortPlan::new(self.base_port)?;
        Ok(())
    }

    fn load_params(&self, concurrency: usize) -> LoadParams {
        LoadParams {
            concurrency,
            warmup: self.warmup,
            duration: self.duration,
            value_bytes: self.value_bytes,
            request_timeout: self.request_timeout,
        }
    }
}

/// Runs the whole benchmark: for each concurrency level, `rounds` × (etcd,
/// Meridian), each on a freshly started cluster in a fresh temporary
/// directory, then aggregates per system and compares.
pub async fn run(opts: BenchOptions) -> anyhow::Result<Report> {
    opts.validate()?;
    etcd::check_binary(&opts.etcd_bin)?;
    meridian::check_executable(&opts.meridian_exe)?;
    let plan = PortPlan::new(opts.base_port)?;
    ports::ensure_free(&plan.etcd_ports())?;
    ports::ensure_free(&plan.meridian_ports())?;

    let total = opts.concurrency.len() * opts.rounds * 2;
    let mut done = 0;
    let mut levels = Vec::with_capacity(opts.concurrency.len());
    let mut runs = Vec::with_capacity(total);
    for &c in &opts.concurrency {
        let mut etcd_runs = Vec::with_capacity(opts.rounds);
        let mut meridian_runs = Vec::with_capacity(opts.rounds);
        for round in 1..=opts.rounds {
            for system in [System::Etcd, System::Meridian] {
                done += 1;
                if !opts.quiet {
                    eprintln!("[{done}/{total}] {} clients={c} round {round}/{}: starting", system.name(), opts.rounds);
                }
                let (target, result) = run_one(&opts, system, c)
                    .await
                    .with_context(|| format!("{} run, clients={c}, round {round}", system.name()))?;
                let summary = RunSummary::new(system, c, round, target.base(), &result);
                if !opts.quiet {
                    eprintln!(
                        "[{done}/{total}] {} clients={c} round {round}: {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                        system.name(),
                        summary.ops_per_sec,
                        summary.p50_ms,
                        summary.p99_ms,
                        summary.errors
                    );
                }
                runs.push(summary);
                match system {
                    System::Etcd => etcd_runs.push(result),
                    System::Meridian => meridian_runs.push(result),
                }
            }
        }
        levels.push(LevelReport::new(
            c,
            SystemSummary::from_runs(&etcd_runs),
            SystemSummary::from_runs(&meridian_runs),
        ));
    }

    let params = Params {
        concurrency: opts.concurrency.clone(),
        duration_secs: opts.duration.as_secs_f64(),
        warmup_secs: opts.warmup.as_secs_f64(),
        value_bytes: opts.value_bytes,
        rounds: opts.rounds,
        request_timeout_secs: opts.request_timeout.as_secs_f64(),
        base_port: opts.base_port,
        etcd_bin: opts.etcd_bin.display().to_string(),
        etcd_version: etcd::version(&opts.etcd_bin),
        meridian_exe: opts.meridian_exe.display().to_string(),
        data_root: std::env::temp_dir().display().to_string(),
    };
    Ok(Report::new(Machine::current(), params, levels, runs))
}

/// Prints the report to stdout: pretty JSON if `json`, otherwise tables.
pub fn print_report(report: &Report, json: bool) {
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
}

/// One measurement: starts a fresh cluster of `system` in a new temporary
/// directory, finds its leader, waits for a first successful write, applies
/// the load, and tears the cluster down. On failure the directory (with the
/// members' logs) is kept and named in the error.
pub async fn run_one(opts: &BenchOptions, system: System, concurrency: usize) -> anyhow::Result<(Target, RunResult)> {
    let plan = PortPlan::new(opts.base_port)?;
    // Pre-flight checks happen before the directory exists, so a failure
    // here leaves nothing behind.
    match system {
        System::Etcd => {
            etcd::check_binary(&opts.etcd_bin)?;
            ports::ensure_free(&plan.etcd_ports())?;
        }
        System::Meridian => {
            meridian::check_executable(&opts.meridian_exe)?;
            ports::ensure_free(&plan.meridian_ports())?;
        }
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("meridian-bench-{}-", system.name()))
        .tempdir()
        .context("creating temporary directory")?;
    match measure(opts, system, concurrency, &plan, dir.path()).await {
        Ok(r) => Ok(r),
        Err(e) => {
            let kept = dir.keep();
            Err(e.context(format!(
                "{} cluster failed; its data and logs are kept in {}",
                system.name(),
                kept.display()
            )))
        }
    }
}

async fn measure(
    opts: &BenchOptions,
    system: System,
    concurrency: usize,
    plan: &PortPlan,
    dir: &Path,
) -> anyhow::Result<(Target, RunResult)> {
    // A separate client for control requests so probes don't share the load pool.
    let control = load::http_client(2, Duration::from_secs(5))?;
    let params = opts.load_params(concurrency);
    match system {
        System::Etcd => {
            let cluster = EtcdCluster::start(&opts.etcd_bin, dir, plan, &control, STARTUP_TIMEOUT).await?;
            let leader = cluster.leader_url(&control, STARTUP_TIMEOUT).await?;
            let target = Target::Etcd { base: leader };
            load::wait_writable(&control, &target, FIRST_WRITE_TIMEOUT).await?;
            let result = load::generate(&target, &params).await?;
            cluster.stop();
            Ok((target, result))
        }
        System::Meridian => {
            let cluster = MeridianCluster::start(&opts.meridian_exe, dir, plan, &control, STARTUP_TIMEOUT).await?;
            let base = match cluster.leader_url(&control, LEADER_LOOKUP_TIMEOUT).await {
                Some(url) => url,
                None => {
                    if !opts.quiet {
                        eprintln!("no region leader found in GET /v1/cluster; sending writes to node 1");
                    }
                    cluster.api_urls()[0].clone()
                }
            };
            let target = Target::Meridian { base };
            load::wait_writable(&control, &target, FIRST_WRITE_TIMEOUT).await?;
            let result = load::generate(&target, &params).await?;
            cluster.stop();
            Ok((target, result))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let o = BenchOptions::new("/x/meridian");
        assert_eq!(o.concurrency, vec![1, 16, 64]);
        assert_eq!(o.duration, Duration::from_secs(10));
        assert_eq!(o.warmup, Duration::from_secs(2));
        assert_eq!(o.value_bytes, 256);
        assert_eq!(o.rounds, 2);
        assert_eq!(o.etcd_bin, PathBuf::from("/usr/bin/etcd"));
        assert!(o.validate().is_ok());
    }

    #[test]
    fn validation() {
        let base = BenchOptions::new("m");
        let bad = [
            BenchOptions { concurrency: vec![], ..base.clone() },
            BenchOptions { concurrency: vec![1, 0], ..base.clone() },
            BenchOptions { rounds: 0, ..base.clone() },
            BenchOptions { duration: Duration::ZERO, ..base.clone() },
            BenchOptions { base_port: u16::MAX, ..base.clone() },
        ];
        for o in bad {
            assert!(o.validate().is_err(), "{o:?}");
        }
    }

    #[tokio::test]
    async fn missing_etcd_fails_before_starting_anything() {
        let o = BenchOptions { etcd_bin: PathBuf::from("/nonexistent/etcd"), ..BenchOptions::new("meridian") };
        let err = run(o).await.unwrap_err();
        assert!(format!("{err:#}").contains("apt-get install etcd-server"));
    }
}
