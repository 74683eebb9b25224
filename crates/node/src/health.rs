//! Region health: every node probes every other region on a schedule, and keeps, per region,
//! whether it is reachable, with hysteresis, and how far away it is (round-trip time).
//!
//! A probe asks the region's nodes in turn (starting at a different one each round) for their
//! status until one answers within the probe timeout; the region is reachable when any of its
//! nodes answers, so one zone going away is not a region going away. A region is marked
//! `down` only after `down_after_failures` probes in a row failed, and `up` again only after
//! `up_after_successes` in a row succeeded, so one lost probe (or one lucky one across a
//! flapping link) does not flip anything that reads it. Before its first verdict a region is
//! `unknown`; its first answer marks it `up`.
//!
//! The verdict is this node's view: nodes of one region may disagree for a probe interval or
//! two. The gateway reads it to choose among a key's homes ([`nearest`]); failover will read it
//! too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_core::{RegionId, Topology};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::config::HealthSettings;
use crate::metrics::{Metrics, RegionLabels};
use crate::peer::{PeerRequestV1, PeerResponseV1};
use crate::transport::PeerTransport;

/// The weight of the newest round trip in the smoothed one (an exponentially weighted mean).
const RTT_WEIGHT_NEW: f64 = 0.2;
/// Longest error text kept per region (a peer's error can be long).
const ERROR_CHARS_MAX: usize = 200;

/// Whether a region answers, as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    /// No verdict yet: no probe answered, and fewer than the threshold failed.
    Unknown,
    Up,
    Down,
}

impl Reachability {
    pub fn name(self) -> &'static str {
        match self {
            Reachability::Unknown => "unknown",
            Reachability::Up => "up",
            Reachability::Down => "down",
        }
    }
}

/// One region's health as this node has probed it.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionHealth {
    pub reachability: Reachability,
    /// Probes in a row that succeeded, or that failed (one of the two is 0).
    pub consecutive_ok: u32,
    pub consecutive_failed: u32,
    /// Smoothed round-trip time of the probes that succeeded, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// The last successful probe's round trip, in milliseconds.
    pub last_rtt_ms: Option<f64>,
    /// Wall-clock time (ms since the epoch) of the last probe that succeeded.
    pub last_ok_at_ms: Option<u64>,
    /// Wall-clock time of the last change of `reachability`.
    pub since_ms: Option<u64>,
    /// Why the last failed probe failed.
    pub last_error: Option<String>,
    pub probes: u64,
    pub failures: u64,
    /// Changes of `reachability` (from `unknown` included).
    pub changes: u64,
}

impl Default for RegionHealth {
    fn default() -> Self {
        RegionHealth {
            reachability: Reachability::Unknown,
            consecutive_ok: 0,
            consecutive_failed: 0,
            rtt_ms: None,
            last_rtt_ms: None,
            last_ok_at_ms: None,
            since_ms: None,
            last_error: None,
            probes: 0,
            failures: 0,
            changes: 0,
        }
    }
}

impl RegionHealth {
    /// Take one probe's outcome (its round trip, or why it failed) at `now_ms`. Whether the
    /// verdict changed.
    pub fn observe(&mut self, outcome: Result<Duration, String>, now_ms: u64, s: &HealthSettings) -> bool {
        self.probes += 1;
        let before = self.reachability;
        match outcome {
            Ok(rtt) => {
                let ms = rtt.as_secs_f64() * 1000.0;
                self.consecutive_ok = self.consecutive_ok.saturating_add(1);
                self.consecutive_failed = 0;
                self.last_rtt_ms = Some(ms);
                self.rtt_ms = Some(match self.rtt_ms {
                    Some(old) => old + RTT_WEIGHT_NEW * (ms - old),
                    None => ms,
                });
                self.last_ok_at_ms = Some(now_ms);
                let enough = self.consecutive_ok >= s.up_after_successes;
                if before == Reachability::Unknown || (before == Reachability::Down && enough) {
                    self.reachability = Reachability::Up;
                }
            }
            Err(e) => {
                self.consecutive_failed = self.consecutive_failed.saturating_add(1);
                self.consecutive_ok = 0;
                self.failures += 1;
                self.last_error = Some(e.chars().take(ERROR_CHARS_MAX).collect());
                if before != Reachability::Down && self.consecutive_failed >= s.down_after_failures {
                    self.reachability = Reachability::Down;
                }
            }
        }
        let changed = self.reachability != before;
        if changed {
            self.changes += 1;
            self.since_ms = Some(now_ms);
        }
        changed
    }
}

/// The prober and what it found, per other region.
pub struct Health {
    here: RegionId,
    topology: Arc<Topology>,
    transport: PeerTransport,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    settings: HealthSettings,
    regions: Mutex<BTreeMap<RegionId, RegionHealth>>,
}

impl Health {
    pub fn new(
        here: RegionId,
        topology: Arc<Topology>,
        transport: PeerTransport,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        settings: HealthSettings,
    ) -> Self {
        let regions = topology
            .regions()
            .iter()
            .map(|r| r.name.clone())
            .filter(|r| *r != here)
            .map(|r| (r, RegionHealth::default()))
            .collect();
        Health { here, topology, transport, clock, metrics, settings, regions: Mutex::new(regions) }
    }

    /// The wall clock the probes are timed by, in milliseconds since the epoch.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Which of `candidates` (in the policy's order of preference) a request should go to, as
    /// this node's probes see them: see [`nearest`]. This node's own region is always up.
    pub fn nearest(&self, candidates: &[RegionId]) -> Option<RegionId> {
        let regions = self.regions.lock().expect("health lock");
        nearest(candidates, &self.here, &regions).cloned()
    }

    /// `region`'s reachability as this node sees it (its own region is always up).
    pub fn reachability(&self, region: &RegionId) -> Reachability {
        if *region == self.here {
            return Reachability::Up;
        }
        self.regions.lock().expect("health lock").get(region).map_or(Reachability::Unknown, |h| h.reachability)
    }

    /// `candidates` in the order a request should try them: see [`ranked`].
    pub fn ranked(&self, candidates: &[RegionId]) -> Vec<(RegionId, Reachability)> {
        let regions = self.regions.lock().expect("health lock");
        ranked(candidates, &self.here, &regions).into_iter().map(|(r, s)| (r.clone(), s)).collect()
    }

    /// Every other region's health, in region order.
    pub fn regions(&self) -> BTreeMap<RegionId, RegionHealth> {
        self.regions.lock().expect("health lock").clone()
    }

    /// Probe every other region once per interval, until the supervisor stops it.
    pub(crate) async fn run(self: Arc<Self>) {
        let interval = Duration::from_millis(self.settings.probe_interval_ms);
        let mut round = 0usize;
        loop {
            let next = Instant::now() + interval;
            let targets: Vec<RegionId> = self.regions.lock().expect("health lock").keys().cloned().collect();
            let probes = targets.into_iter().map(|r| {
                let this = self.clone();
                async move {
                    let outcome = this.probe(&r, round).await;
                    this.record(&r, outcome);
                }
            });
            futures::future::join_all(probes).await;
            round = round.wrapping_add(1);
            tokio::time::sleep_until(next).await;
        }
    }

    /// Ask `region`'s nodes in turn, starting at a different one each round, until one answers
    /// its status within the probe timeout: that answer's round trip, or the last failure.
    async fn probe(&self, region: &RegionId, round: usize) -> Result<Duration, String> {
        let nodes = self.topology.region_nodes(region);
        if nodes.is_empty() {
            return Err(format!("region {region} has no nodes"));
        }
        let timeout = Duration::from_millis(self.settings.probe_timeout_ms);
        let mut last = String::new();
        for i in 0..nodes.len() {
            let n = nodes[(round + i) % nodes.len()];
            let start = Instant::now();
            match self.transport.call(n.id, PeerRequestV1::Status, timeout).await {
                Ok(PeerResponseV1::Status(_)) => return Ok(start.elapsed()),
                Ok(_) => last = format!("node {} sent an unexpected reply", n.id),
                Err(e) => last = format!("node {}: {e}", n.id),
            }
        }
        Err(last)
    }

    fn record(&self, region: &RegionId, outcome: Result<Duration, String>) {
        let labels = RegionLabels { region: region.to_string() };
        let failed = outcome.is_err();
        let now_ms = self.clock.now_ms();
        let mut regions = self.regions.lock().expect("health lock");
        let Some(h) = regions.get_mut(region) else { return };
        let before = h.reachability;
        if h.observe(outcome, now_ms, &self.settings) {
            self.metrics.region_reachability_changes.get_or_create(&labels).inc();
            tracing::info!(region = %region, from = before.name(), to = h.reachability.name(), here = %self.here,
                "region reachability changed");
        }
        if failed {
            self.metrics.region_probe_failures.get_or_create(&labels).inc();
        }
        self.metrics.region_reachable.get_or_create(&labels).set(i64::from(h.reachability == Reachability::Up));
        if let Some(ms) = h.rtt_ms {
            self.metrics.region_probe_rtt_seconds.get_or_create(&labels).set(ms / 1000.0);
        }
    }
}

/// The region of `candidates` to send a request to: `here` if it is one; else the nearest
/// that is up, by smoothed round trip (ties to the earlier); else the first whose state is not
/// known yet; else the first (every one is down: trying it costs no more than refusing). `None`
/// only for no candidates.
pub fn nearest<'a>(
    candidates: &'a [RegionId],
    here: &RegionId,
    health: &BTreeMap<RegionId, RegionHealth>,
) -> Option<&'a RegionId> {
    ranked(candidates, here, health).into_iter().next().map(|(r, _)| r)
}

/// `candidates` in the order a request should try them, each with its reachability as this
/// node sees it: this node's own region first (always up), then the regions marked up, nearest
/// (lowest smoothed round trip) first, then those without a verdict, then those marked down;
/// within each group the candidates keep their order (the policy's preference).
pub fn ranked<'a>(
    candidates: &'a [RegionId],
    here: &RegionId,
    health: &BTreeMap<RegionId, RegionHealth>,
) -> Vec<(&'a RegionId, Reachability)> {
    let state = |r: &RegionId| {
        if r == here {
            Reachability::Up
        } else {
            health.get(r).map_or(Reachability::Unknown, |h| h.reachability)
        }
    };
    let group = |r: &RegionId, s: Reachability| match s {
        _ if r == here => 0u8,
        Reachability::Up => 1,
        Reachability::Unknown => 2,
        Reachability::Down => 3,
    };
    let rtt = |r: &RegionId| health.get(r).and_then(|h| h.rtt_ms).unwrap_or(f64::MAX);
    let mut out: Vec<(&RegionId, Reachability)> = candidates.iter().map(|c| (c, state(c))).collect();
    // A stable sort: equal keys keep the policy's order.
    out.sort_by(|(a, sa), (b, sb)| {
        group(a, *sa).cmp(&group(b, *sb)).then_with(|| match sa {
            Reachability::Up => rtt(a).total_cmp(&rtt(b)),
            _ => std::cmp::Ordering::Equal,
        })
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_go_here_else_to_the_nearest_region_up_else_to_one_not_known_down() {
        let r = |s: &str| RegionId::new(s).unwrap();
        let (us, eu, ap, sa) = (r("us-east"), r("eu-west"), r("ap-south"), r("sa-east"));
        let at = |state: Reachability, rtt: Option<f64>| RegionHealth {
            reachability: state,
            rtt_ms: rtt,
            ..RegionHealth::default()
        };
        let mut health = BTreeMap::new();
        health.insert(us.clone(), at(Reachability::Up, Some(80.0)));
        health.insert(ap.clone(), at(Reachability::Up, Some(150.0)));
        health.insert(sa.clone(), at(Reachability::Unknown, None));
        let pick = |c: &[RegionId], h: &BTreeMap<RegionId, RegionHealth>| nearest(c, &eu, h).cloned();
        assert_eq!(pick(&[ap.clone(), eu.clone()], &health), Some(eu.clone()), "a home here is always chosen");
        assert_eq!(pick(&[ap.clone(), us.clone()], &health), Some(us.clone()), "the nearer, not the first");
        health.get_mut(&us).unwrap().reachability = Reachability::Down;
        assert_eq!(pick(&[us.clone(), ap.clone()], &health), Some(ap.clone()), "a region down is skipped");
        assert_eq!(pick(&[us.clone(), sa.clone()], &health), Some(sa.clone()), "not known beats down");
        health.get_mut(&ap).unwrap().reachability = Reachability::Down;
        assert_eq!(pick(&[ap.clone(), us.clone()], &health), Some(ap.clone()), "all down: the first");
        assert_eq!(pick(&[], &health), None);
        // Before any probe, the policy's order, as before health existed.
        assert_eq!(pick(&[ap.clone(), us.clone()], &BTreeMap::new()), Some(ap.clone()));

        // The whole order a request tries: here, up by round trip, unknown, down.
        health.get_mut(&ap).unwrap().reachability = Reachability::Up;
        health.insert(r("ca-central"), at(Reachability::Up, Some(20.0)));
        let all = [sa.clone(), us.clone(), ap.clone(), eu.clone(), r("ca-central")];
        let order: Vec<&str> = ranked(&all, &eu, &health).into_iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(order, ["eu-west", "ca-central", "ap-south", "sa-east", "us-east"]);
    }

    fn s() -> HealthSettings {
        HealthSettings { down_after_failures: 3, up_after_successes: 2, ..HealthSettings::default() }
    }

    fn ok(ms: u64) -> Result<Duration, String> {
        Ok(Duration::from_millis(ms))
    }

    fn lost() -> Result<Duration, String> {
        Err("node 4: timed out".into())
    }

    #[test]
    fn the_first_answer_marks_a_region_up_and_one_lost_probe_does_not_mark_it_down() {
        let mut h = RegionHealth::default();
        assert_eq!(h.reachability, Reachability::Unknown);
        assert!(h.observe(ok(80), 1, &s()));
        assert_eq!((h.reachability, h.since_ms, h.changes), (Reachability::Up, Some(1), 1));
        for (i, outcome) in [lost(), lost(), ok(90), lost(), lost(), ok(70)].into_iter().enumerate() {
            assert!(!h.observe(outcome, 2 + i as u64, &s()), "probe {i}: fewer than three in a row failed");
            assert_eq!(h.reachability, Reachability::Up);
        }
        assert_eq!((h.probes, h.failures), (7, 4));
        assert_eq!(h.last_error.as_deref(), Some("node 4: timed out"));
    }

    #[test]
    fn down_after_the_threshold_of_failures_and_up_after_the_threshold_of_answers() {
        let mut h = RegionHealth::default();
        h.observe(ok(100), 0, &s());
        h.observe(lost(), 1, &s());
        h.observe(lost(), 2, &s());
        assert!(h.observe(lost(), 3, &s()), "the third failure in a row");
        assert_eq!((h.reachability, h.since_ms), (Reachability::Down, Some(3)));
        assert!(!h.observe(lost(), 4, &s()), "already down");
        assert!(!h.observe(ok(100), 5, &s()), "one answer is not enough to come back");
        assert_eq!(h.reachability, Reachability::Down);
        assert!(!h.observe(lost(), 6, &s()));
        assert!(!h.observe(ok(100), 7, &s()));
        assert!(h.observe(ok(100), 8, &s()), "two answers in a row");
        assert_eq!((h.reachability, h.changes, h.last_ok_at_ms), (Reachability::Up, 3, Some(8)));
    }

    #[test]
    fn a_region_never_heard_from_goes_down_after_the_threshold() {
        let mut h = RegionHealth::default();
        assert!(!h.observe(lost(), 1, &s()));
        assert!(!h.observe(lost(), 2, &s()));
        assert_eq!(h.reachability, Reachability::Unknown);
        assert!(h.observe(lost(), 3, &s()));
        assert_eq!(h.reachability, Reachability::Down);
        assert_eq!(h.rtt_ms, None);
    }

    #[test]
    fn the_round_trip_is_smoothed_and_the_last_one_kept() {
        let mut h = RegionHealth::default();
        h.observe(ok(100), 0, &s());
        assert_eq!(h.rtt_ms, Some(100.0));
        h.observe(ok(200), 1, &s());
        assert_eq!(h.last_rtt_ms, Some(200.0));
        assert!((h.rtt_ms.unwrap() - 120.0).abs() < 1e-9, "{:?}", h.rtt_ms);
        h.observe(lost(), 2, &s());
        assert!((h.rtt_ms.unwrap() - 120.0).abs() < 1e-9, "a failure leaves the round trip alone");
    }

    #[test]
    fn long_errors_are_cut() {
        let mut h = RegionHealth::default();
        h.observe(Err("x".repeat(10_000)), 0, &s());
        assert_eq!(h.last_error.as_ref().map(String::len), Some(ERROR_CHARS_MAX));
    }
}
