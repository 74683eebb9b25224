//! Aggregating lag runs per (rate, delay, system), the ratios against etcd and the targets,
//! and rendering them as tables or JSON.

use std::fmt::Write as _;

use comfy_table::{presets, Table};
use serde::Serialize;

use super::measure::{LagResult, POLL_INTERVAL_DIVISOR, POLL_INTERVAL_MIN, POLL_LEAD};
use super::LagOptions;
use crate::load::{new_histogram, throughput};
use crate::report::{fmt_ratio, quantile_ms, right_align_numbers, Machine, TargetStatus, P99_RATIO_TARGET};
use crate::System;

/// Meridian's excess p99 must be at most this many ms ...
pub const EXCESS_P99_MS_TARGET: f64 = 20.0;
/// ... at this write rate (continuous links).
pub const EXCESS_TARGET_WRITES_PER_SEC: u32 = 500;

/// The exact parameters.
#[derive(Debug, Clone, Serialize)]
pub struct LagParams {
    /// Write rates, per second.
    pub writes_per_sec: Vec<u32>,
    /// One-way delays, ms.
    pub delays_ms: Vec<u64>,
    /// Systems, in run order.
    pub systems: Vec<System>,
    /// Window per run, seconds.
    pub duration_secs: f64,
    /// Warmup per run, seconds.
    pub warmup_secs: f64,
    /// Rounds per (rate, delay).
    pub rounds: usize,
    /// Sampled writes per second.
    pub samples_per_sec: u32,
    /// Value size, bytes.
    pub value_bytes: usize,
    /// Visibility timeout, seconds.
    pub visibility_timeout_secs: f64,
    /// Per-request timeout, seconds.
    pub request_timeout_secs: f64,
    /// First poll this long before `t_ack + delay`, ms.
    pub poll_lead_ms: f64,
    /// Shortest poll interval, ms.
    pub poll_interval_min_ms: f64,
    /// Past that, polls are this share of the wait apart.
    pub poll_interval_share: f64,
    /// First port of the plan.
    pub base_port: u16,
    /// etcd binary.
    pub etcd_bin: String,
    /// First line of `etcd --version`.
    pub etcd_version: Option<String>,
    /// etcdctl binary.
    pub etcdctl_bin: String,
    /// Meridian executable.
    pub meridian_exe: String,
}

impl LagParams {
    /// The parameters of `opts`.
    pub fn from_options(o: &LagOptions) -> Self {
        Self {
            writes_per_sec: o.writes_per_sec.clone(),
            delays_ms: o.delays_ms.clone(),
            systems: o.systems.clone(),
            duration_secs: o.duration.as_secs_f64(),
            warmup_secs: o.warmup.as_secs_f64(),
            rounds: o.rounds,
            samples_per_sec: o.samples_per_sec,
            value_bytes: o.value_bytes,
            visibility_timeout_secs: o.visibility_timeout.as_secs_f64(),
            request_timeout_secs: o.request_timeout.as_secs_f64(),
            poll_lead_ms: POLL_LEAD.as_secs_f64() * 1e3,
            poll_interval_min_ms: POLL_INTERVAL_MIN.as_secs_f64() * 1e3,
            poll_interval_share: 1.0 / f64::from(POLL_INTERVAL_DIVISOR),
            base_port: o.base_port,
            etcd_bin: o.etcd_bin.display().to_string(),
            etcd_version: o.systems.contains(&System::Etcd).then(|| crate::etcd::version(&o.etcd_bin)).flatten(),
            etcdctl_bin: o.etcdctl_bin.display().to_string(),
            meridian_exe: o.meridian_exe.display().to_string(),
        }
    }
}

/// One system's figures over the rounds of one (rate, delay).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ExcessSummary {
    /// Runs merged.
    pub runs: usize,
    /// Samples polled.
    pub samples: u64,
    /// Samples not visible within the timeout (recorded at the timeout).
    pub timed_out: u64,
    /// Samples visible on their first poll (upper bounds).
    pub seen_first_poll: u64,
    /// Median excess, ms.
    pub p50_ms: f64,
    /// 99th-percentile excess, ms.
    pub p99_ms: f64,
    /// Largest excess, ms.
    pub max_ms: f64,
    /// Acknowledged writes per second of window.
    pub acked_writes_per_sec: f64,
    /// Failed writes in the windows.
    pub write_errors: u64,
    /// 99th-percentile source acknowledgement latency, ms.
    pub ack_p99_ms: f64,
    /// Runs in which the system fell behind the source ([`LagResult::fell_behind`]).
    pub behind_runs: usize,
}

impl ExcessSummary {
    /// Merges runs: percentiles from the merged histograms, rates over summed windows.
    pub fn from_runs<'a>(runs: impl IntoIterator<Item = &'a LagResult>) -> Option<Self> {
        let (mut excess, mut ack) = (new_histogram(), new_histogram());
        let mut s = Self {
            runs: 0,
            samples: 0,
            timed_out: 0,
            seen_first_poll: 0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
            acked_writes_per_sec: 0.0,
            write_errors: 0,
            ack_p99_ms: 0.0,
            behind_runs: 0,
        };
        let (mut ok, mut window) = (0, std::time::Duration::ZERO);
        for r in runs {
            s.runs += 1;
            s.samples += r.samples;
            s.timed_out += r.timed_out;
            s.seen_first_poll += r.seen_first_poll;
            s.write_errors += r.write_errors;
            s.behind_runs += usize::from(r.fell_behind());
            ok += r.writes_ok;
            window += r.window;
            // Same bounds on both sides, so merging cannot fail.
            excess.add(&r.excess_hist).expect("histograms share bounds");
            ack.add(&r.ack_hist).expect("histograms share bounds");
        }
        if s.runs == 0 {
            return None;
        }
        s.p50_ms = quantile_ms(&excess, 0.50);
        s.p99_ms = quantile_ms(&excess, 0.99);
        s.max_ms = if excess.is_empty() { 0.0 } else { excess.max() as f64 / 1000.0 };
        s.acked_writes_per_sec = throughput(ok, window);
        s.ack_p99_ms = quantile_ms(&ack, 0.99);
        Some(s)
    }
}

/// The comparison at one (rate, delay).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LagCell {
    /// Scheduled writes per second.
    pub writes_per_sec: u32,
    /// One-way delay, ms.
    pub delay_ms: u64,
    /// etcd make-mirror, if measured.
    pub etcd: Option<ExcessSummary>,
    /// Meridian, if measured.
    pub meridian: Option<ExcessSummary>,
    /// Meridian excess p99 / etcd excess p99.
    pub p99_ratio: Option<f64>,
    /// `p99_ratio <= 1`.
    pub ratio_target: TargetStatus,
    /// Meridian excess p99 <= 20 ms; only at 500 writes/s.
    pub excess_target: Option<TargetStatus>,
}

impl LagCell {
    /// Compares the two systems at one (rate, delay).
    pub fn new(
        writes_per_sec: u32,
        delay_ms: u64,
        etcd: Option<ExcessSummary>,
        meridian: Option<ExcessSummary>,
    ) -> Self {
        let p99_ratio = match (&etcd, &meridian) {
            (Some(e), Some(m)) => crate::report::ratio(m.p99_ms, e.p99_ms),
            _ => None,
        };
        let excess_target = meridian
            .as_ref()
            .filter(|_| writes_per_sec == EXCESS_TARGET_WRITES_PER_SEC)
            .map(|m| TargetStatus::at_most(Some(m.p99_ms), EXCESS_P99_MS_TARGET));
        Self {
            writes_per_sec,
            delay_ms,
            ratio_target: TargetStatus::at_most(p99_ratio, P99_RATIO_TARGET),
            etcd,
            meridian,
            p99_ratio,
            excess_target,
        }
    }

    /// "etcd 2/2, meridian 0/2": runs that fell behind, per system; `None` if none did.
    pub fn behind_label(&self) -> Option<String> {
        let parts: Vec<String> = [("etcd", &self.etcd), ("meridian", &self.meridian)]
            .into_iter()
            .filter_map(|(name, s)| s.as_ref().map(|s| (name, s)))
            .filter(|(_, s)| s.behind_runs > 0)
            .map(|(name, s)| format!("{name} {}/{}", s.behind_runs, s.runs))
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    fn targets_met(&self) -> bool {
        self.ratio_target == TargetStatus::Met && self.excess_target.is_none_or(|t| t == TargetStatus::Met)
    }
}

/// One run, as measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LagRunSummary {
    /// Which system.
    pub system: System,
    /// Scheduled writes per second.
    pub writes_per_sec: u32,
    /// One-way delay, ms.
    pub delay_ms: u64,
    /// 1-based round.
    pub round: usize,
    /// Acknowledged writes per second of window.
    pub acked_writes_per_sec: f64,
    /// Failed writes in the window.
    pub write_errors: u64,
    /// Samples polled.
    pub samples: u64,
    /// Samples visible on their first poll.
    pub seen_first_poll: u64,
    /// Samples seen before the delay had elapsed (recorded as 0).
    pub seen_early: u64,
    /// Samples not visible in time.
    pub timed_out: u64,
    /// Polls sent, and how many failed.
    pub polls: u64,
    /// Polls that failed.
    pub poll_errors: u64,
    /// Median excess, ms.
    pub p50_ms: f64,
    /// 99th-percentile excess, ms.
    pub p99_ms: f64,
    /// Largest excess, ms.
    pub max_ms: f64,
    /// From the end of the write schedule until the last sample was seen, ms.
    pub caught_up_ms: Option<f64>,
    /// Whether the system fell behind the source.
    pub fell_behind: bool,
    /// Source acknowledgement p99, ms.
    pub ack_p99_ms: f64,
    /// Latest a write started after its schedule, ms.
    pub schedule_slip_max_ms: f64,
    /// CPU time the hypervisor stole during the run, percent.
    pub cpu_steal_pct: Option<f64>,
    /// The first write error, if any.
    pub first_error: Option<String>,
}

impl LagRunSummary {
    /// Summarises one run.
    pub fn new(system: System, writes_per_sec: u32, delay_ms: u64, round: usize, r: &LagResult) -> Self {
        Self {
            system,
            writes_per_sec,
            delay_ms,
            round,
            acked_writes_per_sec: r.achieved_writes_per_sec(),
            write_errors: r.write_errors,
            samples: r.samples,
            seen_first_poll: r.seen_first_poll,
            seen_early: r.seen_early,
            timed_out: r.timed_out,
            polls: r.polls,
            poll_errors: r.poll_errors,
            p50_ms: quantile_ms(&r.excess_hist, 0.50),
            p99_ms: quantile_ms(&r.excess_hist, 0.99),
            max_ms: if r.excess_hist.is_empty() { 0.0 } else { r.excess_hist.max() as f64 / 1000.0 },
            caught_up_ms: r.caught_up_after.map(|d| d.as_secs_f64() * 1e3),
            fell_behind: r.fell_behind(),
            ack_p99_ms: quantile_ms(&r.ack_hist, 0.99),
            schedule_slip_max_ms: r.schedule_slip_max.as_secs_f64() * 1e3,
            first_error: r.first_error.clone(),
            cpu_steal_pct: r.cpu_steal_pct,
        }
    }
}

/// The whole lag benchmark result.
#[derive(Debug, Clone, Serialize)]
pub struct LagReport {
    /// Where it ran.
    pub machine: Machine,
    /// With what parameters.
    pub params: LagParams,
    /// Per (rate, delay) comparisons, in run order.
    pub cells: Vec<LagCell>,
    /// Every run, in run order.
    pub runs: Vec<LagRunSummary>,
    /// Whether every target in every cell was met.
    pub all_targets_met: bool,
}

impl LagReport {
    /// Groups runs `(system, rate, delay, round, result)` into cells, in first-seen order.
    pub fn new(machine: Machine, params: LagParams, runs: &[(System, u32, u64, usize, LagResult)]) -> Self {
        let mut keys: Vec<(u32, u64)> = Vec::new();
        for (_, rate, delay, _, _) in runs {
            if !keys.contains(&(*rate, *delay)) {
                keys.push((*rate, *delay));
            }
        }
        let cells: Vec<LagCell> = keys
            .into_iter()
            .map(|(rate, delay)| {
                let of = |sys: System| {
                    ExcessSummary::from_runs(
                        runs.iter().filter(|r| r.0 == sys && r.1 == rate && r.2 == delay).map(|r| &r.4),
                    )
                };
                LagCell::new(rate, delay, of(System::Etcd), of(System::Meridian))
            })
            .collect();
        let runs: Vec<LagRunSummary> =
            runs.iter().map(|(s, rate, delay, round, r)| LagRunSummary::new(*s, *rate, *delay, *round, r)).collect();
        let all_targets_met = !cells.is_empty() && cells.iter().all(LagCell::targets_met);
        Self { machine, params, cells, runs, all_targets_met }
    }

    /// Pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises")
    }

    /// Human-readable text: parameters, method, the comparison, targets, and runs.
    pub fn to_table(&self) -> String {
        let (p, m) = (&self.params, &self.machine);
        let mut out = String::new();
        let _ =
            writeln!(out, "Cross-region lag: Meridian link vs etcdctl make-mirror (one node per region, 127.0.0.1)");
        let _ =
            writeln!(out, "machine:    {} cores ({} {}), shared by every process and the load", m.cores, m.os, m.arch);
        let _ = writeln!(
            out,
            "parameters: writes/s {:?}, one-way delay ms {:?}, window {}s after {}s warmup, rounds {}, \
             {} samples/s, value {} B, visibility timeout {}s, base port {}",
            p.writes_per_sec,
            p.delays_ms,
            p.duration_secs,
            p.warmup_secs,
            p.rounds,
            p.samples_per_sec,
            p.value_bytes,
            p.visibility_timeout_secs,
            p.base_port
        );
        let _ = writeln!(
            out,
            "excess:     t_visible - t_ack - delay, per sampled write; polls from {} ms before the delay, \
             every {} ms, then every {:.0}% of the wait (figures overstate by at most one interval + one read)",
            p.poll_lead_ms,
            p.poll_interval_min_ms,
            p.poll_interval_share * 100.0
        );
        let _ = writeln!(
            out,
            "etcd:       {}{} + {} make-mirror, its source read through a delay proxy",
            p.etcd_bin,
            p.etcd_version.as_ref().map(|v| format!(" ({v})")).unwrap_or_default(),
            p.etcdctl_bin
        );
        let _ = writeln!(out, "meridian:   {} (delay as [[wan]] one_way_ms)", p.meridian_exe);
        let _ = writeln!(out);

        let ms = |s: &Option<ExcessSummary>, f: fn(&ExcessSummary) -> f64| match s {
            Some(s) => format!("{}{:.1}", if s.timed_out > 0 { ">=" } else { "" }, f(s)),
            None => "-".to_string(),
        };
        let mut t = Table::new();
        t.load_style(presets::UTF8_FULL_CONDENSED);
        t.set_header(vec![
            "writes/s",
            "delay ms",
            "meridian p50 ms",
            "meridian p99 ms",
            "etcd p50 ms",
            "etcd p99 ms",
            "p99 ratio",
            "fell behind (runs)",
        ]);
        for c in &self.cells {
            t.add_row(vec![
                c.writes_per_sec.to_string(),
                c.delay_ms.to_string(),
                ms(&c.meridian, |s| s.p50_ms),
                ms(&c.meridian, |s| s.p99_ms),
                ms(&c.etcd, |s| s.p50_ms),
                ms(&c.etcd, |s| s.p99_ms),
                fmt_ratio(c.p99_ratio),
                c.behind_label().unwrap_or_else(|| "-".to_string()),
            ]);
        }
        right_align_numbers(&mut t, 7);
        let _ = writeln!(
            out,
            "excess over the injected delay (\">=\": some samples not visible in time; \"fell behind\": \
             the system applied fewer writes than the source took, so its figures measure a queue and \
             grow with the window)"
        );
        let _ = writeln!(out, "{t}");
        let _ = writeln!(out);

        let mut t = Table::new();
        t.load_style(presets::UTF8_FULL_CONDENSED);
        t.set_header(vec![
            "writes/s".to_string(),
            "delay ms".to_string(),
            format!("meridian p99 <= {EXCESS_P99_MS_TARGET:.0} ms (at {EXCESS_TARGET_WRITES_PER_SEC}/s)"),
            format!("p99 ratio <= {P99_RATIO_TARGET:.1}"),
        ]);
        for c in &self.cells {
            let excess = match (c.excess_target, &c.meridian) {
                (Some(status), Some(m)) => format!("{} ({:.1} ms)", status.label(), m.p99_ms),
                _ => "-".to_string(),
            };
            let baseline_behind = c.etcd.as_ref().is_some_and(|e| e.behind_runs > 0);
            t.add_row(vec![
                c.writes_per_sec.to_string(),
                c.delay_ms.to_string(),
                excess,
                format!(
                    "{} ({}){}",
                    c.ratio_target.label(),
                    fmt_ratio(c.p99_ratio),
                    if baseline_behind { ", against a baseline that fell behind" } else { "" }
                ),
            ]);
        }
        let _ = writeln!(out, "targets:");
        let _ = writeln!(out, "{t}");
        let _ = writeln!(out, "all targets {}", if self.all_targets_met { "met" } else { "NOT met" });
        let _ = writeln!(out);

        let mut t = Table::new();
        t.load_style(presets::UTF8_FULL_CONDENSED);
        t.set_header(vec![
            "writes/s",
            "delay ms",
            "round",
            "system",
            "acked/s",
            "errors",
            "samples",
            "1st poll",
            "late",
            "p50 ms",
            "p99 ms",
            "max ms",
            "caught up ms",
            "ack p99 ms",
            "steal %",
        ]);
        for r in &self.runs {
            t.add_row(vec![
                r.writes_per_sec.to_string(),
                r.delay_ms.to_string(),
                r.round.to_string(),
                r.system.name().to_string(),
                format!("{:.0}", r.acked_writes_per_sec),
                r.write_errors.to_string(),
                r.samples.to_string(),
                r.seen_first_poll.to_string(),
                r.timed_out.to_string(),
                format!("{:.1}", r.p50_ms),
                format!("{:.1}", r.p99_ms),
                format!("{:.1}", r.max_ms),
                match (r.caught_up_ms, r.fell_behind) {
                    (Some(ms), true) => format!("{ms:.0} (behind)"),
                    (Some(ms), false) => format!("{ms:.0}"),
                    (None, _) => "-".to_string(),
                },
                format!("{:.2}", r.ack_p99_ms),
                r.cpu_steal_pct.map_or("-".to_string(), |s| format!("{s:.0}")),
            ]);
        }
        right_align_numbers(&mut t, 15);
        let _ = writeln!(
            out,
            "runs (1st poll: seen on the first poll, an upper bound; late: not visible within the timeout; \
             caught up: from the last scheduled write until the last sample was seen; \"behind\" past 1 s \
             plus a round trip; steal: CPU time the hypervisor took during the run):"
        );
        let _ = write!(out, "{t}");
        for r in self.runs.iter().filter(|r| r.first_error.is_some()) {
            let _ = write!(
                out,
                "\nfirst write error, {} {}/s delay {} ms round {}: {}",
                r.system.name(),
                r.writes_per_sec,
                r.delay_ms,
                r.round,
                r.first_error.as_deref().unwrap_or_default()
            );
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(p99_ms: f64) -> ExcessSummary {
        ExcessSummary {
            runs: 1,
            samples: 100,
            timed_out: 0,
            seen_first_poll: 0,
            p50_ms: p99_ms / 2.0,
            p99_ms,
            max_ms: p99_ms,
            acked_writes_per_sec: 500.0,
            write_errors: 0,
            ack_p99_ms: 1.0,
            behind_runs: 0,
        }
    }

    #[test]
    fn targets_per_cell() {
        let c = LagCell::new(500, 50, Some(summary(10.0)), Some(summary(8.0)));
        assert_eq!(c.p99_ratio, Some(0.8));
        assert_eq!((c.ratio_target, c.excess_target), (TargetStatus::Met, Some(TargetStatus::Met)));
        assert!(c.targets_met());

        let c = LagCell::new(500, 50, Some(summary(30.0)), Some(summary(25.0)));
        assert_eq!((c.ratio_target, c.excess_target), (TargetStatus::Met, Some(TargetStatus::Missed)));
        assert!(!c.targets_met());

        // The excess target applies at 500 writes/s only.
        let c = LagCell::new(2000, 50, Some(summary(10.0)), Some(summary(25.0)));
        assert_eq!((c.ratio_target, c.excess_target), (TargetStatus::Missed, None));

        let c = LagCell::new(2000, 50, Some(ExcessSummary { behind_runs: 2, runs: 2, ..summary(9.0) }), None);
        assert_eq!(c.behind_label().as_deref(), Some("etcd 2/2"));
        assert_eq!(LagCell::new(500, 50, Some(summary(1.0)), Some(summary(1.0))).behind_label(), None);

        // Without a baseline there is no ratio.
        let c = LagCell::new(500, 10, None, Some(summary(5.0)));
        assert_eq!((c.p99_ratio, c.ratio_target), (None, TargetStatus::Unknown));
        assert!(!c.targets_met());
    }

    #[test]
    fn runs_group_into_cells_in_order() {
        let mk = |excess_us: u64| {
            let mut r = LagResult::empty(std::time::Duration::from_secs(1), std::time::Duration::from_millis(10));
            r.writes_scheduled = 10;
            r.writes_ok = 10;
            r.samples = 1;
            r.polls = 3;
            r.excess_hist.record(excess_us).unwrap();
            r.ack_hist.record(900).unwrap();
            r
        };
        let runs = vec![
            (System::Etcd, 500, 10, 1, mk(2_000)),
            (System::Meridian, 500, 10, 1, mk(1_000)),
            (System::Etcd, 500, 50, 1, mk(2_000)),
            (System::Meridian, 500, 50, 1, mk(80_000)),
        ];
        let params = LagParams::from_options(&LagOptions { systems: vec![], ..LagOptions::default() });
        let rep = LagReport::new(Machine { cores: 2, os: "linux".into(), arch: "x86_64".into() }, params, &runs);
        assert_eq!(rep.cells.len(), 2);
        assert_eq!((rep.cells[0].writes_per_sec, rep.cells[0].delay_ms), (500, 10));
        assert_eq!(rep.cells[0].ratio_target, TargetStatus::Met);
        assert_eq!(rep.cells[1].excess_target, Some(TargetStatus::Missed));
        assert!(!rep.all_targets_met);
        assert_eq!(rep.runs.len(), 4);
        let text = rep.to_table();
        for needle in ["2 cores", "make-mirror", "MISSED", "all targets NOT met", "p99 ratio"] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let v: serde_json::Value = serde_json::from_str(&rep.to_json()).unwrap();
        assert_eq!(v["cells"][1]["excess_target"], "missed");
        assert_eq!(v["runs"][3]["system"], "meridian");
    }
}
