//! Aggregating runs per system, the comparison maths (throughput and p99
//! ratios against the targets), and rendering the report as a table or JSON.

use std::fmt::Write as _;
use std::time::Duration;

use comfy_table::{presets, CellAlignment, Table};
use serde::Serialize;

use crate::load::{new_histogram, throughput, RunResult};
use crate::System;

/// Required throughput ratio (Meridian / etcd): at least this.
pub const THROUGHPUT_RATIO_TARGET: f64 = 1.0;
/// Required p99 latency ratio (Meridian / etcd): at most this.
pub const P99_RATIO_TARGET: f64 = 1.0;

/// Machine facts printed with the results.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical cores available to this process.
    pub cores: usize,
    /// `std::env::consts::OS`.
    pub os: String,
    /// `std::env::consts::ARCH`.
    pub arch: String,
}

/// The machine's CPU time counters (`/proc/stat`'s first line), to tell how much of a run the
/// hypervisor took away: on a shared virtual machine, steal time makes tails that are not the
/// system's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Every state's ticks.
    pub total: u64,
    /// Ticks stolen by the hypervisor.
    pub steal: u64,
}

impl CpuTimes {
    /// Now, or `None` where `/proc/stat` cannot be read (not Linux).
    pub fn now() -> Option<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// From `/proc/stat` text: `cpu  user nice system idle iowait irq softirq steal ...`.
    pub fn parse(text: &str) -> Option<Self> {
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let ticks: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>().ok()?;
        // guest and guest_nice (9th and 10th) are already counted in user and nice.
        let total = ticks.iter().take(8).sum();
        Some(Self { total, steal: *ticks.get(7)? })
    }

    /// The share of CPU time stolen between `self` and `later`, in percent.
    pub fn steal_pct_until(&self, later: &Self) -> Option<f64> {
        let total = later.total.checked_sub(self.total).filter(|t| *t > 0)?;
        Some(later.steal.saturating_sub(self.steal) as f64 * 100.0 / total as f64)
    }
}

impl Machine {
    /// Facts about the current machine.
    pub fn current() -> Self {
        Self {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: std::env::consts::OS.to_string(),
            arch: std::env::consts::ARCH.to_string(),
        }
    }
}

/// The exact parameters of the benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    /// Concurrency levels, in run order.
    pub concurrency: Vec<usize>,
    /// Measurement window per run, seconds.
    pub duration_secs: f64,
    /// Warmup per run (not recorded), seconds.
    pub warmup_secs: f64,
    /// Value size in bytes.
    pub value_bytes: usize,
    /// Rounds per concurrency level; each round is one etcd run then one Meridian run.
    pub rounds: usize,
    /// Per-request timeout, seconds.
    pub request_timeout_secs: f64,
    /// First port of the loopback port plan.
    pub base_port: u16,
    /// etcd binary used.
    pub etcd_bin: String,
    /// First line of `etcd --version`, if available.
    pub etcd_version: Option<String>,
    /// Meridian executable used.
    pub meridian_exe: String,
    /// Directory under which each run's fresh data directory was created.
    pub data_root: String,
}

/// One system's aggregate over the rounds at one concurrency level.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SystemSummary {
    /// Number of runs aggregated.
    pub runs: usize,
    /// Successful writes, summed over runs.
    pub ops: u64,
    /// Failed writes, summed over runs.
    pub errors: u64,
    /// Measured time, summed over runs, seconds.
    pub elapsed_secs: f64,
    /// `ops / elapsed_secs`.
    pub ops_per_sec: f64,
    /// Median write latency from the merged histogram, ms.
    pub p50_ms: f64,
    /// 99th-percentile write latency from the merged histogram, ms.
    pub p99_ms: f64,
}

impl SystemSummary {
    /// Aggregates runs: throughput is summed ops over summed time; latency
    /// percentiles come from the merged histogram.
    pub fn from_runs<'a>(runs: impl IntoIterator<Item = &'a RunResult>) -> Self {
        let mut hist = new_histogram();
        let (mut n, mut ops, mut errors, mut elapsed) = (0, 0, 0, Duration::ZERO);
        for r in runs {
            n += 1;
            ops += r.ops;
            errors += r.errors;
            elapsed += r.elapsed;
            // Same bounds on both sides, so merging cannot fail.
            hist.add(&r.hist).expect("histograms share bounds");
        }
        Self {
            runs: n,
            ops,
            errors,
            elapsed_secs: elapsed.as_secs_f64(),
            ops_per_sec: throughput(ops, elapsed),
            p50_ms: quantile_ms(&hist, 0.50),
            p99_ms: quantile_ms(&hist, 0.99),
        }
    }
}

pub(crate) fn quantile_ms(hist: &hdrhistogram::Histogram<u64>, q: f64) -> f64 {
    if hist.is_empty() {
        0.0
    } else {
        hist.value_at_quantile(q) as f64 / 1000.0
    }
}

/// `num / den`, or `None` when `den` is not positive.
pub fn ratio(num: f64, den: f64) -> Option<f64> {
    (den > 0.0 && num.is_finite() && den.is_finite()).then(|| num / den)
}

/// Whether a target was met; `Unknown` when the ratio could not be computed.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TargetStatus {
    /// The ratio satisfies the target.
    Met,
    /// The ratio does not satisfy the target.
    Missed,
    /// No ratio (the baseline measured zero).
    Unknown,
}

impl TargetStatus {
    pub(crate) fn at_least(r: Option<f64>, target: f64) -> Self {
        match r {
            Some(r) if r >= target => Self::Met,
            Some(_) => Self::Missed,
            None => Self::Unknown,
        }
    }

    pub(crate) fn at_most(r: Option<f64>, target: f64) -> Self {
        match r {
            Some(r) if r <= target => Self::Met,
            Some(_) => Self::Missed,
            None => Self::Unknown,
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::Missed => "MISSED",
            Self::Unknown => "unknown",
        }
    }
}

/// The comparison at one concurrency level.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LevelReport {
    /// Concurrent clients.
    pub concurrency: usize,
    /// etcd aggregate.
    pub etcd: SystemSummary,
    /// Meridian aggregate.
    pub meridian: SystemSummary,
    /// Meridian ops/s divided by etcd ops/s.
    pub throughput_ratio: Option<f64>,
    /// Meridian p99 divided by etcd p99.
    pub p99_ratio: Option<f64>,
    /// `throughput_ratio >= 1.0`.
    pub throughput_target: TargetStatus,
    /// `p99_ratio <= 1.0`.
    pub p99_target: TargetStatus,
}

impl LevelReport {
    /// Compares the two aggregates.
    pub fn new(concurrency: usize, etcd: SystemSummary, meridian: SystemSummary) -> Self {
        let throughput_ratio = ratio(meridian.ops_per_sec, etcd.ops_per_sec);
        let p99_ratio = ratio(meridian.p99_ms, etcd.p99_ms);
        Self {
            concurrency,
            throughput_target: TargetStatus::at_least(throughput_ratio, THROUGHPUT_RATIO_TARGET),
            p99_target: TargetStatus::at_most(p99_ratio, P99_RATIO_TARGET),
            etcd,
            meridian,
            throughput_ratio,
            p99_ratio,
        }
    }
}

/// One run, as measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunSummary {
    /// Which system.
    pub system: System,
    /// Concurrent clients.
    pub concurrency: usize,
    /// 1-based round.
    pub round: usize,
    /// Base URL the writes went to.
    pub target: String,
    /// Successful writes.
    pub ops: u64,
    /// Failed writes.
    pub errors: u64,
    /// Measured time, seconds.
    pub elapsed_secs: f64,
    /// Successful writes per second.
    pub ops_per_sec: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th-percentile latency, ms.
    pub p99_ms: f64,
    /// First error in the window, if any.
    pub first_error: Option<String>,
}

impl RunSummary {
    /// Summarises one run.
    pub fn new(system: System, concurrency: usize, round: usize, target: &str, r: &RunResult) -> Self {
        Self {
            system,
            concurrency,
            round,
            target: target.to_string(),
            ops: r.ops,
            errors: r.errors,
            elapsed_secs: r.elapsed.as_secs_f64(),
            ops_per_sec: r.ops_per_sec(),
            p50_ms: quantile_ms(&r.hist, 0.50),
            p99_ms: quantile_ms(&r.hist, 0.99),
            first_error: r.first_error.clone(),
        }
    }
}

/// The whole benchmark result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// With what parameters.
    pub params: Params,
    /// Per-concurrency comparisons, in run order.
    pub levels: Vec<LevelReport>,
    /// Every individual run, in run order.
    pub runs: Vec<RunSummary>,
    /// Whether every target at every level was met.
    pub all_targets_met: bool,
}

impl Report {
    /// Builds the report, computing `all_targets_met`.
    pub fn new(machine: Machine, params: Params, levels: Vec<LevelReport>, runs: Vec<RunSummary>) -> Self {
        let all_targets_met = !levels.is_empty()
            && levels.iter().all(|l| l.throughput_target == TargetStatus::Met && l.p99_target == TargetStatus::Met);
        Self { machine, params, levels, runs, all_targets_met }
    }

    /// Pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises")
    }

    /// Human-readable text: parameters, the comparison table, targets, and runs.
    pub fn to_table(&self) -> String {
        let p = &self.params;
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(out, "In-region write benchmark: Meridian vs etcd (3 nodes each, 127.0.0.1)");
        let _ = writeln!(
            out,
            "machine:    {} cores ({} {}), shared by both clusters and the load generator",
            m.cores, m.os, m.arch
        );
        let _ = writeln!(
            out,
            "parameters: concurrency {:?}, duration {}s, warmup {}s, value {} B, rounds {} \
             (etcd, meridian alternating, fresh cluster per run), request timeout {}s, base port {}",
            p.concurrency, p.duration_secs, p.warmup_secs, p.value_bytes, p.rounds, p.request_timeout_secs, p.base_port
        );
        let _ = writeln!(
            out,
            "etcd:       {}{}",
            p.etcd_bin,
            p.etcd_version.as_ref().map(|v| format!(" ({v})")).unwrap_or_default()
        );
        let _ = writeln!(out, "meridian:   {}", p.meridian_exe);
        let _ = writeln!(out, "data root:  {}", p.data_root);
        let _ = writeln!(out);

        let mut t = Table::new();
        t.load_style(presets::UTF8_FULL_CONDENSED);
        t.set_header(vec![
            "clients",
            "etcd ops/s",
            "meridian ops/s",
            "ops ratio",
            "etcd p50 ms",
            "etcd p99 ms",
            "meridian p50 ms",
            "meridian p99 ms",
            "p99 ratio",
            "errors e/m",
        ]);
        for l in &self.levels {
            t.add_row(vec![
                l.concurrency.to_string(),
                format!("{:.0}", l.etcd.ops_per_sec),
                format!("{:.0}", l.meridian.ops_per_sec),
                fmt_ratio(l.throughput_ratio),
                format!("{:.2}", l.etcd.p50_ms),
                format!("{:.2}", l.etcd.p99_ms),
                format!("{:.2}", l.meridian.p50_ms),
                format!("{:.2}", l.meridian.p99_ms),
                fmt_ratio(l.p99_ratio),
                format!("{}/{}", l.etcd.errors, l.meridian.errors),
            ]);
        }
        right_align_numbers(&mut t, 10);
        let _ = writeln!(out, "{t}");
        let _ = writeln!(out);

        let mut t = Table::new();
        t.load_style(presets::UTF8_FULL_CONDENSED);
        t.set_header(vec![
            "clients".to_string(),
            format!("ops ratio >= {THROUGHPUT_RATIO_TARGET:.1}"),
            format!("p99 ratio <= {P99_RATIO_TARGET:.1}"),
        ]);
        for l in &self.levels {
            t.add_row(vec![
                l.concurrency.to_string(),
                format!("{} ({})", l.throughput_target.label(), fmt_ratio(l.throughput_ratio)),
                format!("{} ({})", l.p99_target.label(), fmt_ratio(l.p99_ratio)),
            ]);
        }
        let _ = writeln!(out, "targets:");
        let _ = writeln!(out, "{t}");
        let _ = writeln!(out, "all targets {}", if self.all_targets_met { "met" } else { "NOT met" });
        let _ = writeln!(out);

        let mut t = Table::new();
        t.load_style(presets::UTF8_FULL_CONDENSED);
        t.set_header(vec!["clients", "round", "system", "ops/s", "p50 ms", "p99 ms", "errors"]);
        for r in &self.runs {
            t.add_row(vec![
                r.concurrency.to_string(),
                r.round.to_string(),
                r.system.name().to_string(),
                format!("{:.0}", r.ops_per_sec),
                format!("{:.2}", r.p50_ms),
                format!("{:.2}", r.p99_ms),
                r.errors.to_string(),
            ]);
        }
        right_align_numbers(&mut t, 7);
        let _ = writeln!(out, "runs:");
        let _ = write!(out, "{t}");
        for r in self.runs.iter().filter(|r| r.first_error.is_some()) {
            let _ = write!(
                out,
                "\nfirst error, {} clients={} round {}: {}",
                r.system.name(),
                r.concurrency,
                r.round,
                r.first_error.as_deref().unwrap_or_default()
            );
        }
        out.push('\n');
        out
    }
}

pub(crate) fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".to_string(), |r| format!("{r:.2}"))
}

pub(crate) fn right_align_numbers(t: &mut Table, columns: usize) {
    for i in 0..columns {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_read_from_proc_stat() {
        let a = CpuTimes::parse("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n").expect("parses");
        assert_eq!(a, CpuTimes { total: 1000, steal: 40 });
        let b = CpuTimes { total: 1200, steal: 90 };
        assert_eq!(a.steal_pct_until(&b), Some(25.0));
        assert_eq!(a.steal_pct_until(&a), None);
        assert_eq!(CpuTimes::parse("intr 1 2 3"), None);
    }

    fn run(ops: u64, secs: u64, latencies_us: &[u64]) -> RunResult {
        let mut r = RunResult::empty();
        r.ops = ops;
        r.elapsed = Duration::from_secs(secs);
        for &l in latencies_us {
            r.hist.record(l).unwrap();
        }
        r
    }

    #[test]
    fn aggregation_sums_ops_over_time() {
        // 1000 ops in 10 s and 3000 ops in 10 s: 200 ops/s overall, not the
        // mean of per-run rates weighted differently.
        let a = run(1000, 10, &[1000; 10]);
        let b = run(3000, 10, &[3000; 10]);
        let s = SystemSummary::from_runs([&a, &b]);
        assert_eq!(s.runs, 2);
        assert_eq!(s.ops, 4000);
        assert_eq!(s.elapsed_secs, 20.0);
        assert_eq!(s.ops_per_sec, 200.0);

        let c = run(100, 1, &[]);
        let d = run(900, 9, &[]);
        assert_eq!(SystemSummary::from_runs([&c, &d]).ops_per_sec, 100.0);
    }

    #[test]
    fn percentiles_come_from_merged_histogram() {
        // 99 fast samples in one run, 1 slow sample in the other: the merged
        // p99 is still fast, p100 would be slow; the median is fast.
        let fast: Vec<u64> = vec![1000; 99];
        let a = run(99, 1, &fast);
        let b = run(1, 1, &[50_000]);
        let s = SystemSummary::from_runs([&a, &b]);
        assert!((s.p50_ms - 1.0).abs() < 0.01, "{}", s.p50_ms);
        assert!((s.p99_ms - 1.0).abs() < 0.01, "{}", s.p99_ms);

        // With two slow samples out of 100, p99 is slow.
        let a = run(98, 1, &vec![1000; 98]);
        let b = run(2, 1, &[50_000, 50_000]);
        let s = SystemSummary::from_runs([&a, &b]);
        assert!((s.p99_ms - 50.0).abs() < 0.1, "{}", s.p99_ms);
    }

    #[test]
    fn empty_aggregate_is_zero() {
        let s = SystemSummary::from_runs(std::iter::empty());
        assert_eq!((s.runs, s.ops, s.ops_per_sec, s.p50_ms, s.p99_ms), (0, 0, 0.0, 0.0, 0.0));
    }

    #[test]
    fn ratios_and_targets() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
        let sum = |ops_per_sec: f64, p99_ms: f64| SystemSummary {
            runs: 1,
            ops: 0,
            errors: 0,
            elapsed_secs: 1.0,
            ops_per_sec,
            p50_ms: 0.0,
            p99_ms,
        };
        let l = LevelReport::new(16, sum(1000.0, 10.0), sum(1500.0, 5.0));
        assert_eq!(l.throughput_ratio, Some(1.5));
        assert_eq!(l.p99_ratio, Some(0.5));
        assert_eq!(l.throughput_target, TargetStatus::Met);
        assert_eq!(l.p99_target, TargetStatus::Met);

        let l = LevelReport::new(16, sum(1000.0, 10.0), sum(999.0, 10.5));
        assert_eq!(l.throughput_target, TargetStatus::Missed);
        assert_eq!(l.p99_target, TargetStatus::Missed);

        // Exactly equal meets both targets.
        let l = LevelReport::new(1, sum(1000.0, 10.0), sum(1000.0, 10.0));
        assert_eq!(l.throughput_target, TargetStatus::Met);
        assert_eq!(l.p99_target, TargetStatus::Met);

        let l = LevelReport::new(1, sum(0.0, 0.0), sum(1000.0, 10.0));
        assert_eq!(l.throughput_target, TargetStatus::Unknown);
        assert_eq!(l.p99_target, TargetStatus::Unknown);
    }

    fn sample_report(meridian_ops: f64) -> Report {
        let s = |ops_per_sec: f64| SystemSummary {
            runs: 2,
            ops: 100,
            errors: 0,
            elapsed_secs: 20.0,
            ops_per_sec,
            p50_ms: 1.0,
            p99_ms: 4.0,
        };
        let params = Params {
            concurrency: vec![1],
            duration_secs: 10.0,
            warmup_secs: 2.0,
            value_bytes: 256,
            rounds: 2,
            request_timeout_secs: 5.0,
            base_port: 24000,
            etcd_bin: "/usr/bin/etcd".into(),
            etcd_version: Some("etcd Version: 3.4.23".into()),
            meridian_exe: "/bin/meridian".into(),
            data_root: "/tmp".into(),
        };
        let r = run(10, 1, &[1000]);
        let runs = vec![RunSummary::new(System::Etcd, 1, 1, "http://127.0.0.1:1", &r)];
        Report::new(
            Machine { cores: 2, os: "linux".into(), arch: "x86_64".into() },
            params,
            vec![LevelReport::new(1, s(100.0), s(meridian_ops))],
            runs,
        )
    }

    #[test]
    fn report_renders_and_serialises() {
        let rep = sample_report(120.0);
        assert!(rep.all_targets_met);
        let text = rep.to_table();
        for needle in ["2 cores", "value 256 B", "rounds 2", "1.20", "met", "etcd Version: 3.4.23"] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let v: serde_json::Value = serde_json::from_str(&rep.to_json()).unwrap();
        assert_eq!(v["machine"]["cores"], 2);
        assert_eq!(v["levels"][0]["throughput_target"], "met");
        assert_eq!(v["levels"][0]["throughput_ratio"], 1.2);
        assert_eq!(v["runs"][0]["system"], "etcd");
        assert_eq!(v["all_targets_met"], true);

        let rep = sample_report(80.0);
        assert!(!rep.all_targets_met);
        assert!(rep.to_table().contains("MISSED"));
    }
}
