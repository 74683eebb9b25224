//! The open-loop writer and the visibility pollers, the same for every system.
//!
//! Writes go to the source at a fixed rate, on a schedule that does not wait for earlier
//! writes (open loop), each to a new key. A deterministic sample of the writes scheduled in the
//! measurement window (every k-th, for about `samples_per_sec` per second) is then polled at
//! the destination until it is visible; for each sample the benchmark records
//!
//! `excess = t_visible − t_ack − one_way`
//!
//! where `t_ack` is when the source's acknowledgement arrived and `t_visible` when the first
//! successful read's reply arrived, both on this process's monotonic clock.
//!
//! Resolution: a poll starts [`POLL_LEAD`] before `t_ack + one_way` (nothing can be visible
//! much earlier), then repeats every [`poll_interval`]: [`POLL_INTERVAL_MIN`] while the wait
//! past the delay is short, then a twentieth of that wait. So an excess is overstated by at most
//! one interval plus one local read round trip: about 1–2 ms (tokio's timer rounds up to the
//! next millisecond) below 20 ms, 5% above. Samples seen on the very first poll are counted,
//! since for them the figure is only an upper bound. A sample not visible within the
//! visibility timeout is recorded at the timeout, so percentiles that reach it are lower bounds.
//!
//! Falling behind: when a system applies fewer writes than the source takes, its excess
//! measures a queue, not a delay, and grows with the run. The run records how long after the
//! last scheduled write the last sample became visible ([`LagResult::caught_up_after`]); a
//! system that keeps up catches up within about the delay and its own excess.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use hdrhistogram::Histogram;
use reqwest::Client;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::load::{self, new_histogram, Payload, Target, MAX_LATENCY_US};

/// How long before `t_ack + one_way` the first poll of a sample is sent.
pub const POLL_LEAD: Duration = Duration::from_millis(2);
/// Shortest pause between two polls of one sample.
pub const POLL_INTERVAL_MIN: Duration = Duration::from_millis(1);
/// Past a short wait, polls are a `1 / POLL_INTERVAL_DIVISOR` share of the wait apart.
pub const POLL_INTERVAL_DIVISOR: u32 = 20;
/// Writes in flight at once; past this the writer waits and falls behind its schedule
/// (the achieved rate in the report shows it).
pub const WRITES_IN_FLIGHT_MAX: usize = 1024;
/// Extra time, past every timeout, allowed for the last samples to finish.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// A run fell behind if its last sample became visible more than this, plus one round trip,
/// after the writes stopped (or if any sample was never seen).
pub const CATCH_UP_SLACK: Duration = Duration::from_secs(1);

/// What one run applies.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Scheduled writes per second.
    pub writes_per_sec: u32,
    /// The injected one-way delay subtracted from every sample.
    pub one_way: Duration,
    /// Writes before the measurement window (not sampled).
    pub warmup: Duration,
    /// The measurement window.
    pub duration: Duration,
    /// Samples per second of window (each a write polled until visible).
    pub samples_per_sec: u32,
    /// Value size, bytes.
    pub value_bytes: usize,
    /// How long past `t_ack + one_way` a sample is polled before it counts as not visible.
    pub visibility_timeout: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
}

impl Workload {
    /// Every how many writes one is sampled.
    pub fn sample_every(&self) -> u64 {
        u64::from((self.writes_per_sec / self.samples_per_sec.max(1)).max(1))
    }
}

/// Where a sampled key is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `GET {base}/v1/datasets/bench/keys/{key}?consistency=local`: 200 once the node has
    /// applied the change, 404 before.
    Meridian {
        /// The destination node's API.
        base: String,
    },
    /// `POST {base}/v3/kv/range` with `serializable: true`: the member's own copy.
    Etcd {
        /// The destination member's client URL.
        base: String,
    },
}

impl Destination {
    /// Whether `key` is visible at the destination now.
    pub async fn is_visible(&self, http: &Client, key: &str) -> anyhow::Result<bool> {
        match self {
            Destination::Meridian { base } => {
                let resp = http.get(format!("{base}/v1/datasets/bench/keys/{key}?consistency=local")).send().await?;
                let status = resp.status();
                // Read the body so the connection is reused.
                let body = resp.bytes().await?;
                match status.as_u16() {
                    200 => Ok(true),
                    404 => Ok(false),
                    _ => Err(anyhow!("HTTP {status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)]))),
                }
            }
            Destination::Etcd { base } => crate::etcd::key_exists_local(http, base, key).await,
        }
    }
}

/// The key named `name` at a target (etcd keys carry the prefix make-mirror copies).
pub fn key_for(target: &Target, name: &str) -> String {
    match target {
        Target::Meridian { .. } => name.to_string(),
        Target::Etcd { .. } => format!("{}{name}", super::pair::ETCD_PREFIX),
    }
}

/// The pause before the next poll of a sample, given how long past `t_ack + one_way` the
/// previous poll was sent: [`POLL_INTERVAL_MIN`], or a twentieth of the wait once that is more.
pub fn poll_interval(waited: Duration) -> Duration {
    (waited / POLL_INTERVAL_DIVISOR).max(POLL_INTERVAL_MIN)
}

/// How one sample ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    /// Seen; `excess_us` may be negative (seen before the delay had elapsed).
    Seen {
        /// `t_visible − t_ack − one_way`, µs.
        excess_us: i64,
        /// Whether the first poll already saw it (the figure is then an upper bound).
        first_poll: bool,
        /// Polls sent.
        polls: u32,
        /// Polls that failed (not 200/404, or transport errors).
        errors: u32,
        /// When the reply that saw it arrived.
        visible_at: Instant,
    },
    /// Not seen within the visibility timeout.
    TimedOut {
        /// Polls sent.
        polls: u32,
        /// Polls that failed.
        errors: u32,
    },
}

/// `a − b` in µs, signed.
pub fn signed_us(a: Instant, b: Instant) -> i64 {
    match a.checked_duration_since(b) {
        Some(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        None => -i64::try_from((b - a).as_micros()).unwrap_or(i64::MAX),
    }
}

/// Polls `dest` for `key` from just before `t_ack + one_way` until it is visible or the
/// visibility timeout passes.
pub async fn wait_visible(
    http: &Client,
    dest: &Destination,
    key: &str,
    t_ack: Instant,
    one_way: Duration,
    timeout: Duration,
) -> Visibility {
    let due = t_ack + one_way;
    let deadline = due + timeout;
    tokio::time::sleep_until((due - POLL_LEAD).max(t_ack)).await;
    let (mut polls, mut errors) = (0u32, 0u32);
    loop {
        let sent = Instant::now();
        let result = dest.is_visible(http, key).await;
        let replied = Instant::now();
        polls += 1;
        match result {
            Ok(true) => {
                let excess_us = signed_us(replied, due);
                return Visibility::Seen { excess_us, first_poll: polls == 1, polls, errors, visible_at: replied };
            }
            Ok(false) => {}
            Err(_) => errors += 1,
        }
        if replied >= deadline {
            return Visibility::TimedOut { polls, errors };
        }
        tokio::time::sleep_until(sent + poll_interval(sent.saturating_duration_since(due))).await;
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct LagResult {
    /// Writes scheduled in the window.
    pub writes_scheduled: u64,
    /// Of those, acknowledged.
    pub writes_ok: u64,
    /// Of those, failed.
    pub write_errors: u64,
    /// The first write error in the window.
    pub first_error: Option<String>,
    /// The window's length.
    pub window: Duration,
    /// The injected one-way delay.
    pub one_way: Duration,
    /// Source acknowledgement latency of the window's writes, µs.
    pub ack_hist: Histogram<u64>,
    /// Excess of every sample, µs: negative ones as 0, timed-out ones at the timeout.
    pub excess_hist: Histogram<u64>,
    /// Samples polled (sampled writes that were acknowledged).
    pub samples: u64,
    /// Samples already visible on their first poll.
    pub seen_first_poll: u64,
    /// Samples seen before `t_ack + one_way` (recorded as 0).
    pub seen_early: u64,
    /// Samples not visible within the visibility timeout.
    pub timed_out: u64,
    /// Polls sent.
    pub polls: u64,
    /// Polls that failed.
    pub poll_errors: u64,
    /// From the end of the write schedule until the last sample was seen (`None` without
    /// seen samples).
    pub caught_up_after: Option<Duration>,
    /// When the last sample was seen.
    last_visible: Option<Instant>,
    /// Latest a write started after its scheduled time.
    pub schedule_slip_max: Duration,
    /// Meridian's link counters over the run (pipeline restarts, full windows, held
    /// batches...), for explaining a tail; empty for etcd.
    pub link_counters: Vec<(String, f64)>,
    /// CPU time the hypervisor stole during the run, percent (Linux only).
    pub cpu_steal_pct: Option<f64>,
}

impl LagResult {
    /// A result with nothing recorded yet.
    pub fn empty(window: Duration, one_way: Duration) -> Self {
        Self {
            writes_scheduled: 0,
            writes_ok: 0,
            write_errors: 0,
            first_error: None,
            window,
            one_way,
            ack_hist: new_histogram(),
            excess_hist: new_histogram(),
            samples: 0,
            seen_first_poll: 0,
            seen_early: 0,
            timed_out: 0,
            polls: 0,
            poll_errors: 0,
            caught_up_after: None,
            last_visible: None,
            schedule_slip_max: Duration::ZERO,
            link_counters: Vec::new(),
            cpu_steal_pct: None,
        }
    }

    /// Acknowledged writes per second of window.
    pub fn achieved_writes_per_sec(&self) -> f64 {
        load::throughput(self.writes_ok, self.window)
    }

    /// Whether the system applied fewer writes than the source took: a sample was never seen,
    /// or the last one was seen more than [`CATCH_UP_SLACK`] plus a round trip after the writes
    /// stopped.
    pub fn fell_behind(&self) -> bool {
        self.timed_out > 0 || self.caught_up_after.is_some_and(|d| d > CATCH_UP_SLACK + 2 * self.one_way)
    }

    /// A progress line.
    pub fn one_line(&self) -> String {
        let q = |q: f64| crate::report::quantile_ms(&self.excess_hist, q);
        format!(
            "{:.0} writes/s acknowledged, {} samples, excess p50 {:.1} ms, p99 {:.1} ms{}{}{}{}",
            self.achieved_writes_per_sec(),
            self.samples,
            q(0.50),
            q(0.99),
            if self.timed_out > 0 { format!(", {} not visible in time", self.timed_out) } else { String::new() },
            if self.write_errors > 0 { format!(", {} write errors", self.write_errors) } else { String::new() },
            self.cpu_steal_pct.map_or(String::new(), |s| format!("; cpu steal {s:.0}%")),
            if self.link_counters.is_empty() {
                String::new()
            } else {
                let parts: Vec<String> =
                    self.link_counters.iter().map(|(n, v)| format!("{n} {}", v.max(0.0))).collect();
                format!("; link: {}", parts.join(", "))
            },
        )
    }

    fn add(&mut self, o: WriteOutcome, timeout: Duration) {
        if !o.measured {
            return;
        }
        self.writes_scheduled += 1;
        self.schedule_slip_max = self.schedule_slip_max.max(o.slip);
        match o.ack {
            Ok(latency) => {
                self.writes_ok += 1;
                self.ack_hist.saturating_record(clamp_us(latency.as_micros()));
            }
            Err(e) => {
                self.write_errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
        let Some(v) = o.visibility else { return };
        self.samples += 1;
        match v {
            Visibility::Seen { excess_us, first_poll, polls, errors, visible_at } => {
                self.polls += u64::from(polls);
                self.poll_errors += u64::from(errors);
                self.seen_first_poll += u64::from(first_poll);
                if excess_us < 0 {
                    self.seen_early += 1;
                }
                self.excess_hist.saturating_record(clamp_us(excess_us.max(0) as u128));
                self.last_visible = self.last_visible.max(Some(visible_at));
            }
            Visibility::TimedOut { polls, errors } => {
                self.polls += u64::from(polls);
                self.poll_errors += u64::from(errors);
                self.timed_out += 1;
                self.excess_hist.saturating_record(clamp_us(timeout.as_micros()));
            }
        }
    }
}

fn clamp_us(us: u128) -> u64 {
    us.min(u128::from(MAX_LATENCY_US)) as u64
}

struct WriteOutcome {
    measured: bool,
    slip: Duration,
    ack: Result<Duration, String>,
    visibility: Option<Visibility>,
}

/// Drives `source` at the workload's rate for warmup + duration, polls the sampled writes at
/// `dest`, and waits for the last samples (bounded by the timeouts). Fails only if no write in
/// the window was acknowledged.
pub async fn run(source: &Target, dest: &Destination, w: &Workload) -> anyhow::Result<LagResult> {
    let writers = load::http_client(64, w.request_timeout)?;
    let pollers = load::http_client(64, w.request_timeout)?;
    let payload = Arc::new(Payload::new(w.value_bytes, 1));
    let source = Arc::new(source.clone());
    let dest = Arc::new(dest.clone());
    let in_flight = Arc::new(Semaphore::new(WRITES_IN_FLIGHT_MAX));
    let sample_every = w.sample_every();
    let rate = u64::from(w.writes_per_sec);

    let start = Instant::now() + Duration::from_millis(10);
    let measure_start = start + w.warmup;
    let end = measure_start + w.duration;
    let mut result = LagResult::empty(w.duration, w.one_way);
    let mut tasks: JoinSet<WriteOutcome> = JoinSet::new();
    for seq in 0u64.. {
        let due = start + Duration::from_nanos(seq.saturating_mul(1_000_000_000) / rate);
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let permit = Arc::clone(&in_flight).acquire_owned().await.context("writer semaphore closed")?;
        let slip = Instant::now().saturating_duration_since(due);
        let measured = due >= measure_start;
        let sampled = measured && seq % sample_every == 0;
        let (writers, pollers, payload, source, dest) =
            (writers.clone(), pollers.clone(), Arc::clone(&payload), Arc::clone(&source), Arc::clone(&dest));
        let (one_way, timeout) = (w.one_way, w.visibility_timeout);
        tasks.spawn(async move {
            let key = key_for(&source, &format!("w{seq:010}"));
            let t0 = Instant::now();
            let written = load::write_once(&writers, &source, &key, &payload).await;
            let t_ack = Instant::now();
            drop(permit);
            let ack = written.map(|()| t_ack - t0).map_err(|e| format!("{e:#}"));
            let visibility = match (&ack, sampled) {
                (Ok(_), true) => Some(wait_visible(&pollers, &dest, &key, t_ack, one_way, timeout).await),
                _ => None,
            };
            WriteOutcome { measured, slip, ack, visibility }
        });
        while let Some(done) = tasks.try_join_next() {
            result.add(done.context("writer task panicked")?, w.visibility_timeout);
        }
    }
    let drain_deadline = Instant::now() + w.request_timeout + w.one_way + w.visibility_timeout + DRAIN_GRACE;
    loop {
        match tokio::time::timeout_at(drain_deadline, tasks.join_next()).await {
            Ok(Some(done)) => result.add(done.context("writer task panicked")?, w.visibility_timeout),
            Ok(None) => break,
            Err(_) => {
                // Only a hung request can get here (every poller has its own deadline).
                tasks.abort_all();
                break;
            }
        }
    }
    result.caught_up_after = result.last_visible.map(|t| t.saturating_duration_since(end));
    if result.writes_ok == 0 {
        anyhow::bail!(
            "all {} writes to {} in the measurement window failed; first error: {}",
            result.write_errors,
            source.base(),
            result.first_error.as_deref().unwrap_or("none (no write was issued)")
        );
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_interval_is_fine_then_relative() {
        assert_eq!(poll_interval(Duration::ZERO), POLL_INTERVAL_MIN);
        assert_eq!(poll_interval(Duration::from_millis(19)), POLL_INTERVAL_MIN);
        assert_eq!(poll_interval(Duration::from_millis(100)), Duration::from_millis(5));
        assert_eq!(poll_interval(Duration::from_secs(2)), Duration::from_millis(100));
    }

    #[test]
    fn sampling_rate() {
        let w = |writes_per_sec, samples_per_sec| Workload {
            writes_per_sec,
            samples_per_sec,
            one_way: Duration::ZERO,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
            value_bytes: 1,
            visibility_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        };
        assert_eq!(w(500, 20).sample_every(), 25);
        assert_eq!(w(2000, 20).sample_every(), 100);
        assert_eq!(w(10, 20).sample_every(), 1);
    }

    #[test]
    fn signed_differences() {
        let a = Instant::now();
        let b = a + Duration::from_micros(1500);
        assert_eq!(signed_us(b, a), 1500);
        assert_eq!(signed_us(a, b), -1500);
    }

    #[test]
    fn outcomes_accumulate() {
        let timeout = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut r = LagResult::empty(Duration::from_secs(10), Duration::from_millis(50));
        let ok =
            |v| WriteOutcome { measured: true, slip: Duration::ZERO, ack: Ok(Duration::from_millis(1)), visibility: v };
        let seen = |excess_us, first_poll, polls, ms| Visibility::Seen {
            excess_us,
            first_poll,
            polls,
            errors: 0,
            visible_at: t0 + Duration::from_millis(ms),
        };
        r.add(ok(Some(seen(3_000, false, 4, 900))), timeout);
        r.add(ok(Some(seen(-500, true, 1, 800))), timeout);
        r.add(ok(Some(Visibility::TimedOut { polls: 9, errors: 1 })), timeout);
        r.add(ok(None), timeout);
        r.add(WriteOutcome { measured: false, ..ok(None) }, timeout);
        r.add(WriteOutcome { ack: Err("HTTP 503".into()), ..ok(None) }, timeout);
        assert_eq!((r.writes_scheduled, r.writes_ok, r.write_errors), (5, 4, 1));
        assert_eq!(r.first_error.as_deref(), Some("HTTP 503"));
        assert_eq!((r.samples, r.seen_first_poll, r.seen_early, r.timed_out), (3, 1, 1, 1));
        assert_eq!((r.polls, r.poll_errors), (14, 1));
        assert_eq!(r.excess_hist.len(), 3);
        assert_eq!(r.excess_hist.min(), 0);
        assert!(r.excess_hist.max() >= 29_000_000);
        assert_eq!(r.last_visible, Some(t0 + Duration::from_millis(900)));
        // A sample never seen means the system fell behind.
        assert!(r.fell_behind());
    }

    #[test]
    fn falling_behind_is_judged_from_the_catch_up() {
        let mut r = LagResult::empty(Duration::from_secs(10), Duration::from_millis(150));
        assert!(!r.fell_behind());
        r.caught_up_after = Some(Duration::from_millis(1_290));
        assert!(!r.fell_behind(), "within the slack plus a round trip");
        r.caught_up_after = Some(Duration::from_millis(1_310));
        assert!(r.fell_behind());
    }

    #[test]
    fn etcd_keys_carry_the_mirrored_prefix() {
        let m = Target::Meridian { base: "http://x".into() };
        let e = Target::Etcd { base: "http://x".into() };
        assert_eq!(key_for(&m, "w1"), "w1");
        assert_eq!(key_for(&e, "w1"), "bench/w1");
    }
}
