//! Traffic control for one link (docs/replication.md#schedules-rate-limits-priorities): when each dataset's changes are due
//! (schedules), how many bytes may leave (token buckets per link and per dataset), which
//! changes go first when the link is constrained (priorities), and which wait while the link
//! is congested (adaptive deferral within `max_lag` budgets).
//!
//! Pure: time comes in as milliseconds, so the planner is tested without clocks and the
//! simulator drives it with its own.
//!
//! Priority: a dataset with a tighter `max_lag` is more important; datasets without one come
//! last; ties go by sequence. Under congestion, datasets whose budget is at least
//! [`DEFERRABLE_MAX_LAG_MS`] wait, each change at most half its budget; tighter datasets, and
//! datasets without a budget (nothing says how long they may wait), are never deferred for
//! congestion.

use std::collections::HashMap;

use meridian_policy::units::{Dur, Rate};
use meridian_policy::Schedule;

/// Datasets whose `max_lag` is at least this may be deferred while the link is congested.
pub const DEFERRABLE_MAX_LAG_MS: u64 = 10_000;
/// The link counts as congested when its smoothed round trip exceeds this many times its best
/// recent one, plus [`CONGESTION_SLACK_MS`].
pub const CONGESTION_FACTOR: f64 = 3.0;
pub const CONGESTION_SLACK_MS: f64 = 25.0;

/// Whether a change written at `written_ms` is due on a link with this schedule at `now_ms`.
/// Interval: changes written before the link's latest firing (firings every `every`, shifted
/// by the link's fixed `phase`). Window: while the UTC time of day is inside the window.
pub fn due(schedule: &Schedule, phase: Dur, written_ms: u64, now_ms: u64) -> bool {
    match schedule {
        Schedule::Continuous => true,
        Schedule::Interval { every, .. } => {
            let every = every.ms().max(1);
            let phase = phase.ms() % every;
            if now_ms < phase {
                return false;
            }
            let last_firing = (now_ms - phase) / every * every + phase;
            written_ms < last_firing
        }
        Schedule::Window(w) => w.contains(((now_ms / 60_000) % 1440) as u16),
    }
}

/// A token bucket in bytes per second holding at most one second of tokens. A change larger
/// than the bucket may go when the bucket is full (it then owes), so nothing starves.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    pub fn new(rate: u64, now_ms: u64) -> Self {
        TokenBucket { rate: rate.max(1), tokens: rate.max(1) as f64, last_ms: now_ms }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        self.last_ms = self.last_ms.max(now_ms);
    }

    /// Whether `n` bytes may go now (without taking them).
    pub fn allows(&mut self, n: u64, now_ms: u64) -> bool {
        self.refill(now_ms);
        self.tokens >= n as f64 || self.tokens >= self.rate as f64
    }

    pub fn take(&mut self, n: u64) {
        self.tokens -= n as f64;
    }

    pub fn give_back(&mut self, n: u64) {
        self.tokens = (self.tokens + n as f64).min(self.rate as f64);
    }

    /// Milliseconds until `n` bytes would be allowed.
    pub fn wait_ms(&mut self, n: u64, now_ms: u64) -> u64 {
        self.refill(now_ms);
        let need = (n as f64).min(self.rate as f64) - self.tokens;
        if need <= 0.0 {
            0
        } else {
            (need / self.rate as f64 * 1000.0).ceil() as u64
        }
    }
}

/// One change the link may ship, with what its placement says about the link.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub seq: u64,
    pub dataset: String,
    /// Key plus value bytes.
    pub bytes: u64,
    /// HLC wall time of the change's version.
    pub written_ms: u64,
    pub schedule: Schedule,
    pub phase: Dur,
    pub rate: Option<Rate>,
    pub max_lag: Option<Dur>,
}

/// Why a change waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Deferral {
    /// Its schedule is not due.
    Schedule,
    /// A token bucket is empty.
    Rate,
    /// The link is congested and the dataset's budget leaves room.
    Congestion,
}

impl Deferral {
    pub fn as_str(self) -> &'static str {
        match self {
            Deferral::Schedule => "schedule",
            Deferral::Rate => "rate",
            Deferral::Congestion => "congestion",
        }
    }
}

/// A smoothed round trip and goodput of a link's calls, and the best recent round trip.
#[derive(Debug, Clone, Default)]
pub struct LinkHealth {
    pub rtt_ms: Option<f64>,
    pub best_rtt_ms: Option<f64>,
    pub goodput_bytes_per_sec: Option<f64>,
}

impl LinkHealth {
    /// Record one acknowledged call: its round trip and the bytes it carried.
    pub fn observe(&mut self, rtt_ms: f64, bytes: u64) {
        const ALPHA: f64 = 0.2;
        self.rtt_ms = Some(self.rtt_ms.map_or(rtt_ms, |r| r + ALPHA * (rtt_ms - r)));
        // The best round trip decays upwards slowly, so a path that became slower for good
        // becomes the new normal instead of counting as congested forever.
        self.best_rtt_ms = Some(self.best_rtt_ms.map_or(rtt_ms, |b| if rtt_ms < b { rtt_ms } else { b * 1.01 }));
        if rtt_ms > 0.0 && bytes > 0 {
            let g = bytes as f64 / (rtt_ms / 1000.0);
            self.goodput_bytes_per_sec = Some(self.goodput_bytes_per_sec.map_or(g, |x| x + ALPHA * (g - x)));
        }
    }

    pub fn congested(&self) -> bool {
        match (self.rtt_ms, self.best_rtt_ms) {
            (Some(r), Some(b)) => r > b * CONGESTION_FACTOR + CONGESTION_SLACK_MS,
            _ => false,
        }
    }
}

/// Per-link traffic state: the link's bucket, one bucket per rate-limited dataset, health.
#[derive(Debug)]
pub struct LinkTraffic {
    link_bucket: Option<TokenBucket>,
    dataset_buckets: HashMap<String, TokenBucket>,
    pub health: LinkHealth,
}

impl LinkTraffic {
    /// `link_rate`: bytes per second for the whole link, `None` for unlimited.
    pub fn new(link_rate: Option<u64>, now_ms: u64) -> Self {
        LinkTraffic {
            link_bucket: link_rate.map(|r| TokenBucket::new(r, now_ms)),
            dataset_buckets: HashMap::new(),
            health: LinkHealth::default(),
        }
    }

    /// Decide for each candidate (given in sequence order) whether it ships now; the answer is
    /// in the same order. Admission runs in priority order, so when buckets run short the more
    /// important datasets go first. Shipped changes take their bytes from the buckets.
    pub fn plan(&mut self, candidates: &[Candidate], now_ms: u64) -> Vec<Result<(), Deferral>> {
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.sort_by_key(|&i| (candidates[i].max_lag.map_or(u64::MAX, Dur::ms), candidates[i].seq));
        let congested = self.health.congested();
        let mut out = vec![Ok(()); candidates.len()];
        for i in order {
            let c = &candidates[i];
            if !due(&c.schedule, c.phase, c.written_ms, now_ms) {
                out[i] = Err(Deferral::Schedule);
                continue;
            }
            if congested {
                let age = now_ms.saturating_sub(c.written_ms);
                let room = match c.max_lag {
                    Some(b) if b.ms() >= DEFERRABLE_MAX_LAG_MS => age < b.ms() / 2,
                    _ => false,
                };
                if room {
                    out[i] = Err(Deferral::Congestion);
                    continue;
                }
            }
            let dataset_bucket = c.rate.map(|r| {
                let b = self
                    .dataset_buckets
                    .entry(c.dataset.clone())
                    .or_insert_with(|| TokenBucket::new(r.bytes_per_sec(), now_ms));
                if b.rate() != r.bytes_per_sec().max(1) {
                    *b = TokenBucket::new(r.bytes_per_sec(), now_ms);
                }
                b.allows(c.bytes, now_ms)
            });
            let link_ok = self.link_bucket.as_mut().is_none_or(|b| b.allows(c.bytes, now_ms));
            if dataset_bucket == Some(false) || !link_ok {
                out[i] = Err(Deferral::Rate);
                continue;
            }
            if c.rate.is_some() {
                self.dataset_buckets.get_mut(&c.dataset).expect("bucket made above").take(c.bytes);
            }
            if let Some(b) = self.link_bucket.as_mut() {
                b.take(c.bytes);
            }
        }
        out
    }

    /// Return the bytes of a change that was admitted but will not be sent after all.
    pub fn give_back(&mut self, c: &Candidate) {
        if c.rate.is_some() {
            if let Some(b) = self.dataset_buckets.get_mut(&c.dataset) {
                b.give_back(c.bytes);
            }
        }
        if let Some(b) = self.link_bucket.as_mut() {
            b.give_back(c.bytes);
        }
    }

    /// Pace a scan: wait until the link's bucket allows `bytes`, then take them.
    pub fn scan_wait_ms(&mut self, bytes: u64, now_ms: u64) -> u64 {
        match self.link_bucket.as_mut() {
            None => 0,
            Some(b) => b.wait_ms(bytes, now_ms),
        }
    }

    pub fn scan_take(&mut self, bytes: u64) {
        if let Some(b) = self.link_bucket.as_mut() {
            b.take(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_policy::units::Window;

    fn cand(seq: u64, dataset: &str, bytes: u64, schedule: Schedule) -> Candidate {
        Candidate {
            seq,
            dataset: dataset.into(),
            bytes,
            written_ms: 1_000,
            schedule,
            phase: Dur(0),
            rate: None,
            max_lag: None,
        }
    }

    #[test]
    fn interval_changes_wait_for_the_next_firing_of_their_link() {
        let s = Schedule::Interval { every: Dur(10_000), jitter: Dur(0) };
        // Firings at 3 s, 13 s, 23 s (phase 3 s).
        assert!(!due(&s, Dur(3_000), 4_000, 12_999));
        assert!(due(&s, Dur(3_000), 4_000, 13_000));
        assert!(!due(&s, Dur(3_000), 13_000, 13_000), "written at the firing: the next one");
        assert!(!due(&s, Dur(3_000), 0, 2_000), "before the first firing");
    }

    #[test]
    fn window_changes_go_only_inside_the_window() {
        let s = Schedule::Window(Window::parse("01:00-02:00").unwrap());
        let at = |h: u64, m: u64| (h * 60 + m) * 60_000 + 86_400_000 * 3;
        assert!(!due(&s, Dur(0), 0, at(0, 59)));
        assert!(due(&s, Dur(0), 0, at(1, 0)));
        assert!(due(&s, Dur(0), 0, at(1, 59)));
        assert!(!due(&s, Dur(0), 0, at(2, 0)));
        let wrap = Schedule::Window(Window::parse("23:00-01:00").unwrap());
        assert!(due(&wrap, Dur(0), 0, at(0, 30)) && due(&wrap, Dur(0), 0, at(23, 30)));
        assert!(!due(&wrap, Dur(0), 0, at(12, 0)));
    }

    #[test]
    fn buckets_admit_a_second_of_bytes_then_refill_and_never_starve_a_large_change() {
        let mut b = TokenBucket::new(1_000, 0);
        assert!(b.allows(600, 0));
        b.take(600);
        assert!(!b.allows(600, 0));
        assert_eq!(b.wait_ms(600, 0), 200);
        assert!(b.allows(600, 200));
        let mut big = TokenBucket::new(100, 0);
        assert!(big.allows(5_000, 0), "a full bucket lets a larger change go");
        big.take(5_000);
        assert!(!big.allows(1, 10_000), "and then owes: 4,900 bytes of debt take 49 s to repay");
        assert!(big.allows(1, 60_000));
    }

    #[test]
    fn when_the_link_is_short_the_tighter_budget_goes_first() {
        let mut t = LinkTraffic::new(Some(1_000), 0);
        let mut loose = cand(1, "logs", 600, Schedule::Continuous);
        loose.max_lag = Some(Dur(60_000));
        let mut tight = cand(2, "orders", 600, Schedule::Continuous);
        tight.max_lag = Some(Dur(2_000));
        let plan = t.plan(&[loose.clone(), tight.clone()], 0);
        assert_eq!(plan, vec![Err(Deferral::Rate), Ok(())], "orders (2 s budget) before logs (60 s)");
        // A second later the bucket is full again and logs go.
        let plan = t.plan(&[loose], 1_000);
        assert_eq!(plan, vec![Ok(())]);
    }

    #[test]
    fn dataset_rates_limit_only_their_dataset() {
        let mut t = LinkTraffic::new(None, 0);
        let mut slow = cand(1, "bulk", 800, Schedule::Continuous);
        slow.rate = Some(Rate(1_000));
        let mut slow2 = slow.clone();
        slow2.seq = 2;
        let fast = cand(3, "catalog", 800, Schedule::Continuous);
        let plan = t.plan(&[slow, slow2, fast], 0);
        assert_eq!(plan, vec![Ok(()), Err(Deferral::Rate), Ok(())]);
    }

    #[test]
    fn congestion_defers_loose_budgets_within_half_their_budget_and_never_tight_or_unbudgeted_ones() {
        let mut t = LinkTraffic::new(None, 0);
        t.health.observe(10.0, 1_000);
        for _ in 0..20 {
            t.health.observe(200.0, 1_000);
        }
        assert!(t.health.congested());
        let mut loose = cand(1, "logs", 10, Schedule::Continuous);
        loose.max_lag = Some(Dur(60_000));
        let mut tight = cand(2, "orders", 10, Schedule::Continuous);
        tight.max_lag = Some(Dur(2_000));
        let unbudgeted = cand(3, "misc", 10, Schedule::Continuous);
        assert_eq!(t.plan(&[loose.clone(), tight, unbudgeted], 1_500), vec![Err(Deferral::Congestion), Ok(()), Ok(())]);
        // Past half its budget a loose change goes anyway.
        assert_eq!(t.plan(&[loose], 40_000), vec![Ok(())]);
    }

    #[test]
    fn health_recovers_when_round_trips_return_to_normal() {
        let mut h = LinkHealth::default();
        h.observe(10.0, 100);
        for _ in 0..20 {
            h.observe(300.0, 100);
        }
        assert!(h.congested());
        for _ in 0..40 {
            h.observe(10.0, 100);
        }
        assert!(!h.congested());
    }
}
