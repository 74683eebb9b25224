//! The cross-region lag benchmark behind `meridian bench lag`
//! (docs/benchmarks.md#cross-region-lag-against-etcd-make-mirror): how long after a write is
//! acknowledged in its source region it becomes visible in another region, minus the injected
//! one-way delay. Meridian's continuous link is compared with `etcdctl make-mirror` between two
//! single-member etcd 3.4 clusters through the same delay, and the comparison is printed as
//! ratios measured in the same run.
//!
//! Per (write rate, delay, round) it starts fresh systems, etcd first, then Meridian:
//! - Meridian: two regions of one node each, `[[wan]] one_way_ms` set to the delay (applied in
//!   the sender's node-to-node transport, once out and once back), and a policy that mirrors
//!   the `bench` dataset from `us-east` to `eu-west`.
//! - etcd: a source and a destination cluster of one member each, and `etcdctl make-mirror`
//!   whose source connection runs through a [`DelayProxy`](crate::delay_proxy::DelayProxy)
//!   with the same delay in each direction (the mirror stands in the destination region).
//!
//! The same open-loop writer and visibility pollers ([`measure`]) drive both. It does not
//! measure throughput limits, failover, bytes on the wire or conflict handling; each of those
//! is its own benchmark.

pub mod args;
pub mod measure;
pub mod pair;
pub mod report;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::load::Target;
use crate::ports::{self, loopback};
use crate::report::{CpuTimes, Machine};
use crate::System;
use measure::Destination;

pub use args::{run_cli, LagArgs};
pub use measure::{LagResult, Workload};
pub use report::{LagCell, LagParams, LagReport, LagRunSummary};

/// Default `--base-port`: below the Linux ephemeral range, clear of the write benchmark's.
pub const DEFAULT_BASE_PORT: u16 = 24100;
/// Default etcdctl binary (Debian's `etcd-client` package).
pub const DEFAULT_ETCDCTL_BIN: &str = "/usr/bin/etcdctl";
/// Highest write rate accepted, per second.
pub const WRITES_PER_SEC_MAX: u32 = 50_000;
/// Highest one-way delay accepted, in ms (the range `meridian chaos delay` accepts).
pub const DELAY_MS_MAX: u64 = 10_000;
/// How long a system gets to mirror its first key once started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Every port one lag run uses, all on 127.0.0.1, derived from `--base-port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagPorts {
    /// Source etcd member: client URL.
    pub etcd_source_client: u16,
    /// Source etcd member: peer URL.
    pub etcd_source_peer: u16,
    /// Destination etcd member: client URL.
    pub etcd_dest_client: u16,
    /// Destination etcd member: peer URL.
    pub etcd_dest_peer: u16,
    /// The delay proxy in front of the source etcd member, used by make-mirror.
    pub proxy: u16,
    /// Meridian node 1 (`us-east`): API.
    pub meridian_source_api: u16,
    /// Meridian node 1 (`us-east`): peer transport.
    pub meridian_source_peer: u16,
    /// Meridian node 2 (`eu-west`): API.
    pub meridian_dest_api: u16,
    /// Meridian node 2 (`eu-west`): peer transport.
    pub meridian_dest_peer: u16,
}

/// Highest offset from the base port.
pub const PORT_SPAN: u16 = 8;

impl LagPorts {
    /// `base + 0 ..= base + 8`, in field order.
    pub fn new(base: u16) -> anyhow::Result<Self> {
        if base == 0 || base.checked_add(PORT_SPAN).is_none() {
            bail!(
                "base port {base} is unusable: the lag benchmark needs ports {base}..={} on 127.0.0.1",
                u32::from(base) + u32::from(PORT_SPAN)
            );
        }
        Ok(Self {
            etcd_source_client: base,
            etcd_source_peer: base + 1,
            etcd_dest_client: base + 2,
            etcd_dest_peer: base + 3,
            proxy: base + 4,
            meridian_source_api: base + 5,
            meridian_source_peer: base + 6,
            meridian_dest_api: base + 7,
            meridian_dest_peer: base + 8,
        })
    }

    /// The ports `system` needs, each with a label for error messages.
    pub fn for_system(&self, system: System) -> Vec<(String, u16)> {
        let l = |s: &str, p: u16| (s.to_string(), p);
        match system {
            System::Etcd => vec![
                l("source etcd client", self.etcd_source_client),
                l("source etcd peer", self.etcd_source_peer),
                l("destination etcd client", self.etcd_dest_client),
                l("destination etcd peer", self.etcd_dest_peer),
                l("delay proxy", self.proxy),
            ],
            System::Meridian => vec![
                l("meridian us-east api", self.meridian_source_api),
                l("meridian us-east peer", self.meridian_source_peer),
                l("meridian eu-west api", self.meridian_dest_api),
                l("meridian eu-west peer", self.meridian_dest_peer),
            ],
        }
    }
}

/// Lag benchmark parameters.
#[derive(Debug, Clone)]
pub struct LagOptions {
    /// The `meridian` executable started as `meridian server` and `meridian policy apply`.
    pub meridian_exe: PathBuf,
    /// etcd 3.4 server binary.
    pub etcd_bin: PathBuf,
    /// etcdctl 3.4 binary (runs `make-mirror`).
    pub etcdctl_bin: PathBuf,
    /// Write rates, per second, in run order.
    pub writes_per_sec: Vec<u32>,
    /// One-way delays, ms, in run order (inside each rate).
    pub delays_ms: Vec<u64>,
    /// Systems measured, in run order inside each round.
    pub systems: Vec<System>,
    /// Measurement window per run (writes scheduled in it are sampled).
    pub duration: Duration,
    /// Load before the window; not sampled.
    pub warmup: Duration,
    /// Rounds per (rate, delay).
    pub rounds: usize,
    /// Sampled writes per second (each is polled at the destination until visible).
    pub samples_per_sec: u32,
    /// Size of each written value, bytes.
    pub value_bytes: usize,
    /// How long past the delay a sample is polled before it counts as not visible.
    pub visibility_timeout: Duration,
    /// Per-request timeout for writes and reads.
    pub request_timeout: Duration,
    /// First port of the plan ([`LagPorts`]).
    pub base_port: u16,
    /// Suppress per-run progress lines on stderr.
    pub quiet: bool,
}

impl Default for LagOptions {
    fn default() -> Self {
        Self {
            meridian_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("meridian")),
            etcd_bin: PathBuf::from(crate::DEFAULT_ETCD_BIN),
            etcdctl_bin: PathBuf::from(DEFAULT_ETCDCTL_BIN),
            writes_per_sec: vec![500, 2000],
            delays_ms: vec![10, 50, 150],
            systems: vec![System::Etcd, System::Meridian],
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(3),
            rounds: 1,
            samples_per_sec: 20,
            value_bytes: 256,
            visibility_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(5),
            base_port: DEFAULT_BASE_PORT,
            quiet: false,
        }
    }
}

impl LagOptions {
    /// Rejects unusable parameters before anything is started, naming every problem.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        if self.writes_per_sec.is_empty() || self.writes_per_sec.iter().any(|&r| r == 0 || r > WRITES_PER_SEC_MAX) {
            problems.push(format!("write rates must be given, each between 1 and {WRITES_PER_SEC_MAX} per second"));
        }
        if self.delays_ms.is_empty() || self.delays_ms.iter().any(|&d| d > DELAY_MS_MAX) {
            problems.push(format!("delays must be given, each at most {DELAY_MS_MAX} ms"));
        }
        if self.systems.is_empty() {
            problems.push("no system to measure".to_string());
        }
        if self.duration.is_zero() {
            problems.push("duration must be positive".to_string());
        }
        if self.rounds == 0 {
            problems.push("rounds must be at least 1".to_string());
        }
        if self.samples_per_sec == 0 {
            problems.push("samples per second must be at least 1".to_string());
        }
        if self.visibility_timeout.is_zero() || self.request_timeout.is_zero() {
            problems.push("timeouts must be positive".to_string());
        }
        if self.visibility_timeout.as_micros() > u128::from(crate::load::MAX_LATENCY_US) {
            problems.push("the visibility timeout must be at most 60 s (the histograms' range)".to_string());
        }
        if let Err(e) = LagPorts::new(self.base_port) {
            problems.push(e.to_string());
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        Ok(())
    }

    fn workload(&self, writes_per_sec: u32, delay_ms: u64) -> Workload {
        Workload {
            writes_per_sec,
            one_way: Duration::from_millis(delay_ms),
            warmup: self.warmup,
            duration: self.duration,
            samples_per_sec: self.samples_per_sec,
            value_bytes: self.value_bytes,
            visibility_timeout: self.visibility_timeout,
            request_timeout: self.request_timeout,
        }
    }

    fn preflight(&self) -> anyhow::Result<()> {
        let ports = LagPorts::new(self.base_port)?;
        for &system in &self.systems {
            match system {
                System::Etcd => {
                    crate::etcd::check_binary(&self.etcd_bin)?;
                    pair::check_etcdctl(&self.etcdctl_bin)?;
                }
                System::Meridian => crate::meridian::check_executable(&self.meridian_exe)?,
            }
            ports::ensure_free(&ports.for_system(system))?;
        }
        Ok(())
    }
}

/// Runs every (rate, delay, round, system) on fresh systems and compares them.
pub async fn run(opts: LagOptions) -> anyhow::Result<LagReport> {
    opts.validate()?;
    opts.preflight()?;
    let total = opts.writes_per_sec.len() * opts.delays_ms.len() * opts.rounds * opts.systems.len();
    let mut done = 0;
    let mut runs: Vec<(System, u32, u64, usize, LagResult)> = Vec::with_capacity(total);
    for &rate in &opts.writes_per_sec {
        for &delay_ms in &opts.delays_ms {
            for round in 1..=opts.rounds {
                for &system in &opts.systems {
                    done += 1;
                    let what = format!("{} {rate} writes/s, delay {delay_ms} ms, round {round}", system.name());
                    if !opts.quiet {
                        eprintln!("[{done}/{total}] {what}: starting");
                    }
                    let result = run_one(&opts, system, rate, delay_ms).await.with_context(|| what.clone())?;
                    if !opts.quiet {
                        eprintln!("[{done}/{total}] {what}: {}", result.one_line());
                    }
                    runs.push((system, rate, delay_ms, round, result));
                }
            }
        }
    }
    let params = LagParams::from_options(&opts);
    Ok(LagReport::new(Machine::current(), params, &runs))
}

/// One measurement on freshly started systems in a new temporary directory. On failure the
/// directory (with every process's log) is kept and named in the error.
pub async fn run_one(
    opts: &LagOptions,
    system: System,
    writes_per_sec: u32,
    delay_ms: u64,
) -> anyhow::Result<LagResult> {
    let ports = LagPorts::new(opts.base_port)?;
    ports::ensure_free(&ports.for_system(system))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("meridian-bench-lag-{}-", system.name()))
        .tempdir()
        .context("create a temporary directory")?;
    let outcome = async {
        let control = crate::load::http_client(2, Duration::from_secs(5))?;
        let one_way = Duration::from_millis(delay_ms);
        let mut pair = pair::Pair::start(opts, system, one_way, &ports, dir.path(), &control).await?;
        pair.wait_mirroring(&control, READY_TIMEOUT).await?;
        let counters = || async {
            match (pair.source(), pair.destination()) {
                (Target::Meridian { base: source }, Destination::Meridian { base: dest }) => {
                    link_counters(&control, &source, &dest).await
                }
                _ => Vec::new(),
            }
        };
        let before = counters().await;
        let cpu_before = CpuTimes::now();
        let mut result =
            measure::run(&pair.source(), &pair.destination(), &opts.workload(writes_per_sec, delay_ms)).await?;
        result.cpu_steal_pct = cpu_before.zip(CpuTimes::now()).and_then(|(a, b)| a.steal_pct_until(&b));
        // Over the warm-up and the window only: setting up (the policy reaching both regions)
        // has its own refusals and resends.
        result.link_counters = counters()
            .await
            .into_iter()
            .map(|(name, after)| {
                let was = before.iter().find(|(n, _)| *n == name).map_or(0.0, |(_, v)| *v);
                (name, after - was)
            })
            .collect();
        // A mirror that died mid-run makes the figures meaningless: say so rather than print them.
        pair.ensure_running()?;
        pair.stop();
        Ok::<_, anyhow::Error>(result)
    }
    .await;
    outcome.map_err(|e| {
        let kept = dir.keep();
        e.context(format!("{} run failed; its data and logs are kept in {}", system.name(), kept.display()))
    })
}

/// The link counters that explain a tail, summed over their labels, from the source's and the
/// destination's `/metrics` (a counter that cannot be read is left out).
async fn link_counters(http: &reqwest::Client, source: &str, dest: &str) -> Vec<(String, f64)> {
    const SOURCE: [(&str, &str); 4] = [
        ("batches", "meridian_replication_batches_total"),
        ("restarts", "meridian_replication_pipeline_restarts_total"),
        ("window full", "meridian_replication_window_waits_total"),
        ("errors", "meridian_replication_errors_total"),
    ];
    const DEST: [(&str, &str); 2] = [
        ("held in order", "meridian_replication_order_held_batches_total{outcome=\"in_order\""),
        ("held timed out", "meridian_replication_order_held_batches_total{outcome=\"timed_out\""),
    ];
    let mut out = Vec::new();
    for (base, names) in [(source, &SOURCE[..]), (dest, &DEST[..])] {
        let Ok(text) = async { http.get(format!("{base}/metrics")).send().await?.text().await }.await else {
            continue;
        };
        for (label, prefix) in names {
            out.push(((*label).to_owned(), metric_sum(&text, prefix)));
        }
    }
    out
}

/// The sum of every sample whose line starts with `prefix` (a name, optionally with the start
/// of its labels), in Prometheus text format.
fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(['{', ' ', ',', '}']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `127.0.0.1:port` as a URL.
pub(crate) fn http_url(port: u16) -> String {
    format!("http://{}", loopback(port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_match_names_and_label_prefixes() {
        let text = "# HELP x\nmeridian_a_total{outcome=\"in_order\",source=\"s\"} 2\n\
                    meridian_a_total{outcome=\"timed_out\",source=\"s\"} 5\nmeridian_ab_total 7\nmeridian_a_total{outcome=\"in_order\",source=\"t\"} 1\n";
        assert_eq!(metric_sum(text, "meridian_a_total"), 8.0);
        assert_eq!(metric_sum(text, "meridian_a_total{outcome=\"in_order\""), 3.0);
        assert_eq!(metric_sum(text, "meridian_ab_total"), 7.0);
        assert_eq!(metric_sum(text, "meridian_c_total"), 0.0);
    }

    #[test]
    fn ports_are_distinct_and_bounded() {
        let p = LagPorts::new(24100).unwrap();
        let mut all: Vec<u16> =
            [System::Etcd, System::Meridian].into_iter().flat_map(|s| p.for_system(s)).map(|(_, port)| port).collect();
        assert_eq!(all.len(), 9);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 9);
        assert_eq!(all.first(), Some(&24100));
        assert_eq!(all.last(), Some(&(24100 + PORT_SPAN)));
        assert!(LagPorts::new(u16::MAX - PORT_SPAN).is_ok());
        assert!(LagPorts::new(u16::MAX - PORT_SPAN + 1).is_err());
        assert!(LagPorts::new(0).is_err());
    }

    #[test]
    fn defaults_match_the_issue() {
        let o = LagOptions::default();
        assert_eq!(o.writes_per_sec, vec![500, 2000]);
        assert_eq!(o.delays_ms, vec![10, 50, 150]);
        assert_eq!(o.systems, vec![System::Etcd, System::Meridian]);
        assert!(o.validate().is_ok());
    }

    #[test]
    fn validation_names_every_problem() {
        let o = LagOptions {
            writes_per_sec: vec![0],
            delays_ms: vec![20_000],
            rounds: 0,
            samples_per_sec: 0,
            ..LagOptions::default()
        };
        let msg = o.validate().unwrap_err().to_string();
        for needle in ["write rates", "delays", "rounds", "samples"] {
            assert!(msg.contains(needle), "missing {needle:?} in {msg}");
        }
    }
}
