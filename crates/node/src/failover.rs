//! Region failover: when every home of a dataset stays unreachable, the first region of the
//! dataset's `failover.order` that is up takes its writes, if its copy's lag is within the
//! dataset's `rpo`; when a home is heard from again, the stand-in stops.
//!
//! A **promotion** is a record in the stand-in region's own Raft group (`_failover`, key
//! `promotion/DATASET`): the region, an epoch (one more than the highest this cluster's
//! reachable regions know for the dataset), when, the homes it stands in for, the lag it was
//! promoted with, and whether an operator made it. While it is active, that region's leader
//! takes writes of the dataset as if it were a home: the leader's policy guard accepts them
//! only with the record pinned in the same atomic proposal (`guard_checks`), so a write can
//! never land after the promotion ended. Gateways need not know: a write whose homes do not
//! answer is offered to the failover targets in order, and a target that holds no active
//! promotion refuses it (`NotPromoted`, nothing applied).
//!
//! The **lag** of a target is how much of a home's history it may lack: the time between the
//! last moment as of which everything the home committed is merged here (`fresh`, kept by
//! the links) and the last time this node heard from the home. Unknown counts as too much.
//!
//! **Ending** (automatic promotions only): once a home it stands in for is marked up again,
//! the stand-in's leader ends the promotion (the record keeps `ended_ms`). From then on it
//! refuses the dataset's writes again, its writes from the epoch reach the homes through the
//! ordinary links, and any that were concurrent with the home's own are merged by the
//! dataset's conflict rule, with conflict records. An operator's promotion stays until an
//! operator ends it.
//!
//! Every promotion, refusal and end is appended to the region's failover history
//! (`event/…`, the newest [`EVENTS_MAX`] kept).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_core::{DatasetName, RegionId};
use meridian_policy::Locality;
use meridian_raft::{CommandResult, Condition, StoredObject};
use serde::{Deserialize, Serialize};

use crate::error::NodeError;
use crate::gateway::Gateway;
use crate::health::Reachability;
use crate::peer::{PeerRequestV1, PeerResponseV1, WriteEffect, WriteOp, WriteRequest};
use crate::Deps;

/// The reserved namespace of failover records, in each region's own state.
pub const NAMESPACE: &str = "_failover";
const PROMOTION_PREFIX: &str = "promotion/";
const EVENT_PREFIX: &str = "event/";
/// Failover history entries each region keeps; older ones are removed.
pub const EVENTS_MAX: usize = 1000;
/// The longest detail text an event keeps.
const DETAIL_CHARS_MAX: usize = 300;
/// How long a promotion waits for the other regions to say which epochs they know.
const EPOCH_ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// `[failover]` settings (every node of the cluster shares them).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverSettings {
    /// How long every home of a dataset must have been marked down (by this node's probes)
    /// before a failover target promotes itself. 0 turns automatic promotion off.
    pub promote_after_ms: u64,
}

impl Default for FailoverSettings {
    fn default() -> Self {
        FailoverSettings { promote_after_ms: 5_000 }
    }
}

pub const PROMOTE_AFTER_MS_RANGE: std::ops::RangeInclusive<u64> = 0..=3_600_000;

/// One promotion of a region to take a dataset's writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    pub dataset: String,
    /// The stand-in region.
    pub region: String,
    pub epoch: u64,
    pub since_ms: u64,
    /// The homes it stands in for.
    pub homes: Vec<String>,
    /// The lag it was promoted with, in milliseconds (`None`: unknown, forced).
    pub lag_ms: Option<u64>,
    /// Made by an operator (`meridian failover promote`): only an operator ends it.
    pub manual: bool,
    /// Made despite the checks (`--force`).
    pub forced: bool,
    pub ended_ms: Option<u64>,
    pub reason: String,
}

impl Promotion {
    pub fn is_active(&self) -> bool {
        self.ended_ms.is_none()
    }
}

/// One entry of a region's failover history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverEvent {
    pub at_ms: u64,
    pub dataset: String,
    pub region: String,
    pub epoch: u64,
    /// `promoted`, `refused` (a promotion the checks did not allow) or `ended`.
    pub kind: String,
    pub detail: String,
}

/// Why a promotion was not made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A home still answers.
    HomeUp(RegionId),
    /// The lag is over the dataset's `rpo` (or unknown while it has one).
    OverRpo { lag_ms: Option<u64>, rpo_ms: u64 },
    /// The dataset cannot fail over here (no failover list naming this region, user-homed,
    /// this region is a home, restricted...).
    NotATarget(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::HomeUp(h) => write!(f, "home {h} is not marked down"),
            Refusal::OverRpo { lag_ms: Some(l), rpo_ms } => write!(f, "the lag is {l} ms, over the rpo of {rpo_ms} ms"),
            Refusal::OverRpo { lag_ms: None, rpo_ms } => {
                write!(f, "the lag is unknown (nothing merged from the home yet), and the rpo is {rpo_ms} ms")
            }
            Refusal::NotATarget(m) => f.write_str(m),
        }
    }
}

/// The failover component of one node.
pub struct Failover {
    deps: Deps,
    gateway: Arc<Gateway>,
    settings: FailoverSettings,
    here: RegionId,
    /// Per dataset, the last refusal recorded in the history (so a standing refusal is
    /// recorded once, not every round).
    refused: Mutex<BTreeMap<String, String>>,
}

impl Failover {
    pub(crate) fn new(deps: Deps, gateway: Arc<Gateway>, settings: FailoverSettings) -> Failover {
        let here = deps.region.spec().region.clone();
        Failover { deps, gateway, settings, here, refused: Mutex::new(BTreeMap::new()) }
    }

    /// This region's promotion for `dataset`, as this node has applied it.
    pub fn promotion(&self, dataset: &str) -> Result<Option<Promotion>, NodeError> {
        let obj = self.deps.region.reader().get(NAMESPACE, &promotion_key(dataset)).map_err(NodeError::storage)?;
        Ok(obj.and_then(|o| decode(&o)))
    }

    /// Every promotion record this region holds, active or ended, by dataset.
    pub fn promotions(&self) -> Result<Vec<Promotion>, NodeError> {
        let rows = self
            .deps
            .region
            .reader()
            .list(NAMESPACE, PROMOTION_PREFIX, None, meridian_core::limits::LIST_LIMIT_MAX)
            .map_err(NodeError::storage)?;
        Ok(rows.iter().filter_map(|(_, o)| decode(o)).collect())
    }

    /// This region's failover history, oldest first.
    pub fn events(&self) -> Result<Vec<FailoverEvent>, NodeError> {
        let rows = self
            .deps
            .region
            .reader()
            .list(NAMESPACE, EVENT_PREFIX, None, EVENTS_MAX + 1)
            .map_err(NodeError::storage)?;
        Ok(rows.iter().filter_map(|(_, o)| decode(o)).collect())
    }

    /// Whether this region may be promoted for `dataset` now, and with what lag: every home
    /// marked down (unless `force`), and the lag within the dataset's rpo (unless `force`).
    fn check(&self, dataset: &DatasetName, force: bool) -> Result<(Vec<RegionId>, Option<u64>), Refusal> {
        let active = self.deps.policy.active().ok_or_else(|| Refusal::NotATarget("no policy is active".into()))?;
        let Some((rules, _)) = active.current.rules(dataset) else {
            return Err(Refusal::NotATarget(format!("the active policy does not name {dataset}")));
        };
        if rules.locality == Locality::User {
            return Err(Refusal::NotATarget(format!("{dataset} is user-homed: each key has its own home")));
        }
        if rules.homes.contains(&self.here) {
            return Err(Refusal::NotATarget(format!("{} is a home of {dataset}", self.here)));
        }
        if !rules.failover.contains(&self.here) {
            return Err(Refusal::NotATarget(format!(
                "{} is not in {dataset}'s failover.order ({})",
                self.here,
                rules.failover.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let health = self.deps.health.regions();
        let (state, _) = self
            .deps
            .region
            .reader()
            .replication()
            .map_err(|e| Refusal::NotATarget(format!("cannot read the replication state: {e}")))?;
        let lag = judge(&rules.homes, &health, &state.fresh, rules.rpo.map(|d| d.ms()), force)?;
        Ok((rules.homes.clone(), lag))
    }

    /// Promote this region for `dataset` (this node must lead the region). Without `force`,
    /// every home must be marked down and the lag within the rpo. An active promotion here is
    /// kept as it is.
    pub async fn promote(&self, dataset: &DatasetName, force: bool, manual: bool) -> Result<Promotion, PromoteError> {
        if let Some(p) = self.promotion(dataset.as_str()).map_err(PromoteError::Node)?.filter(Promotion::is_active) {
            return Ok(p);
        }
        let (homes, lag_ms) = self.check(dataset, force).map_err(PromoteError::Refused)?;
        let epoch = self.next_epoch(dataset.as_str()).await;
        let now = self.deps.clock.now_ms();
        let reason = match (manual, force) {
            (true, true) => "an operator forced it".to_owned(),
            (true, false) => "an operator asked; every home is down and the lag is within the rpo".to_owned(),
            (false, _) => format!(
                "every home ({}) has been down for {} ms or more",
                homes.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", "),
                self.settings.promote_after_ms
            ),
        };
        let p = Promotion {
            dataset: dataset.to_string(),
            region: self.here.to_string(),
            epoch,
            since_ms: now,
            homes: homes.iter().map(|r| r.to_string()).collect(),
            lag_ms,
            manual,
            forced: force,
            ended_ms: None,
            reason,
        };
        let detail = format!("{}; lag {}", p.reason, lag_ms.map_or("unknown".to_owned(), |l| format!("{l} ms")));
        self.record(&p, "promoted", &detail).await.map_err(PromoteError::Node)?;
        self.deps.metrics.failover_promotions.get_or_create(&dataset_label(dataset.as_str())).inc();
        tracing::warn!(dataset = %dataset, region = %self.here, epoch, ?lag_ms, manual, force, "promoted to take the dataset's writes");
        Ok(p)
    }

    /// End this region's active promotion for `dataset` (this node must lead the region).
    pub async fn end(&self, dataset: &str, why: &str) -> Result<Option<Promotion>, NodeError> {
        let Some(mut p) = self.promotion(dataset)?.filter(Promotion::is_active) else { return Ok(None) };
        p.ended_ms = Some(self.deps.clock.now_ms());
        self.record(&p, "ended", why).await?;
        tracing::warn!(dataset, region = %self.here, epoch = p.epoch, why, "promotion ended");
        Ok(Some(p))
    }

    /// The promotion record and its history entry, in one atomic write; then the history is
    /// trimmed to its bound.
    async fn record(&self, p: &Promotion, kind: &str, detail: &str) -> Result<(), NodeError> {
        let event = FailoverEvent {
            at_ms: self.deps.clock.now_ms(),
            dataset: p.dataset.clone(),
            region: p.region.clone(),
            epoch: p.epoch,
            kind: kind.to_owned(),
            detail: detail.chars().take(DETAIL_CHARS_MAX).collect(),
        };
        // A refusal changes no promotion: only its history entry is written.
        let mut writes = vec![put(&self.event_key(&event), &event)];
        if kind != "refused" {
            writes.push(put(&promotion_key(&p.dataset), p));
        }
        let (result, _) = self.gateway.write_in(&self.here, WriteOp::Atomic(writes)).await?;
        match result {
            CommandResult::Batch(_) => {}
            other => return Err(NodeError::Internal(format!("failover record: unexpected result {other:?}"))),
        }
        self.trim_history().await
    }

    async fn refuse(&self, dataset: &str, refusal: &Refusal) {
        let text = refusal.to_string();
        let mut last = self.refused.lock().expect("failover lock").get(dataset).cloned();
        if last.as_deref() == Some(text.as_str()) {
            return;
        }
        let p = Promotion {
            dataset: dataset.to_owned(),
            region: self.here.to_string(),
            epoch: 0,
            since_ms: 0,
            homes: Vec::new(),
            lag_ms: None,
            manual: false,
            forced: false,
            ended_ms: None,
            reason: String::new(),
        };
        match self.record(&p, "refused", &text).await {
            Ok(()) => last = Some(text),
            Err(e) => tracing::warn!(dataset, error = %e, "could not record a refused promotion"),
        }
        if let Some(l) = last {
            self.refused.lock().expect("failover lock").insert(dataset.to_owned(), l);
        }
    }

    fn event_key(&self, e: &FailoverEvent) -> String {
        // Time first so keys sort oldest first; the epoch and dataset keep them distinct.
        format!("{EVENT_PREFIX}{:020}/{}/{:010}", e.at_ms, e.dataset, e.epoch)
    }

    async fn trim_history(&self) -> Result<(), NodeError> {
        let rows = self
            .deps
            .region
            .reader()
            .list(NAMESPACE, EVENT_PREFIX, None, EVENTS_MAX + 64)
            .map_err(NodeError::storage)?;
        if rows.len() <= EVENTS_MAX {
            return Ok(());
        }
        let old: Vec<WriteRequest> = rows[..rows.len() - EVENTS_MAX]
            .iter()
            .map(|(k, _)| WriteRequest {
                dataset: NAMESPACE.into(),
                key: k.clone(),
                value: None,
                condition: Condition::Always,
                effect: WriteEffect::Replace,
            })
            .collect();
        self.gateway.write_in(&self.here, WriteOp::Atomic(old)).await.map(|_| ())
    }

    /// One more than the highest epoch for `dataset` this region and every other region that
    /// answers within [`EPOCH_ASK_TIMEOUT`] know of (any node of each may answer: a dead home
    /// costs that long at most).
    async fn next_epoch(&self, dataset: &str) -> u64 {
        let mut highest = self.promotion(dataset).ok().flatten().map_or(0, |p| p.epoch);
        let others: Vec<RegionId> =
            self.deps.region.topology().regions().iter().map(|r| r.name.clone()).filter(|r| *r != self.here).collect();
        let deadline = tokio::time::Instant::now() + EPOCH_ASK_TIMEOUT;
        let unpack = |reply| match reply {
            PeerResponseV1::Failover(r) => Some(r),
            _ => None,
        };
        let asks = others
            .iter()
            .map(|r| self.deps.transport.call_any(r, deadline, || PeerRequestV1::Failover { events: 0 }, unpack));
        for ((promotions, _), _) in futures::future::join_all(asks).await.into_iter().flatten() {
            for p in promotions.iter().filter(|p| p.dataset == dataset) {
                highest = highest.max(p.epoch);
            }
        }
        highest + 1
    }

    /// One round: on the region's leader, promote for each dataset whose homes have all been
    /// down long enough and whose first target up is this region; end automatic promotions
    /// whose homes answer again.
    async fn round(&self) {
        if !self.deps.region.is_leader() {
            return;
        }
        let Some(active) = self.deps.policy.active() else { return };
        let health = self.deps.health.regions();
        let now = self.deps.clock.now_ms();
        for (dataset, rules) in active.current.datasets() {
            let ds = dataset.as_str();
            if rules.locality == Locality::User
                || !rules.failover.contains(&self.here)
                || rules.homes.contains(&self.here)
            {
                continue;
            }
            let state = |r: &RegionId| health.get(r).map_or(Reachability::Unknown, |h| h.reachability);
            let record = match self.promotion(ds) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(dataset = ds, error = %e, "read the promotion record");
                    continue;
                }
            };
            // Ended while the homes are still down (an operator's end): not promoted again
            // until a home has come back and gone away again.
            let outage_since = rules.homes.iter().filter_map(|h| health.get(h).and_then(|s| s.since_ms)).min();
            let ended_this_outage =
                record.as_ref().and_then(|p| p.ended_ms).zip(outage_since).is_some_and(|(ended, since)| ended >= since);
            let current = record.filter(Promotion::is_active);
            if let Some(p) = current {
                if let Some(back) = rules.homes.iter().find(|h| state(h) == Reachability::Up).filter(|_| !p.manual) {
                    let why = format!("home {back} is reachable again: its writes go home, and this epoch's follow");
                    if let Err(e) = self.end(ds, &why).await {
                        tracing::warn!(dataset = ds, error = %e, "end a promotion");
                    }
                }
                continue;
            }
            if self.settings.promote_after_ms == 0 {
                continue;
            }
            let down_long = rules.homes.iter().all(|h| {
                health.get(h).is_some_and(|s| {
                    s.reachability == Reachability::Down
                        && s.since_ms.is_some_and(|since| now.saturating_sub(since) >= self.settings.promote_after_ms)
                })
            });
            // The first target of the list that is up (this region is, to itself).
            let first_up = rules.failover.iter().find(|t| **t == self.here || state(t) == Reachability::Up);
            if !down_long || first_up != Some(&self.here) || ended_this_outage {
                self.refused.lock().expect("failover lock").remove(ds);
                continue;
            }
            match self.promote(dataset, false, false).await {
                Ok(_) => {
                    self.refused.lock().expect("failover lock").remove(ds);
                }
                Err(PromoteError::Refused(r)) => self.refuse(ds, &r).await,
                Err(PromoteError::Node(e)) => tracing::warn!(dataset = ds, error = %e, "promote"),
            }
        }
        self.refresh_metrics();
    }

    fn refresh_metrics(&self) {
        if let Ok(all) = self.promotions() {
            for p in all {
                self.deps
                    .metrics
                    .failover_active
                    .get_or_create(&dataset_label(&p.dataset))
                    .set(i64::from(p.is_active()));
            }
        }
    }

    /// Run a round every health probe interval until the supervisor stops it.
    pub(crate) async fn run(self: Arc<Self>, interval: Duration) {
        loop {
            self.round().await;
            tokio::time::sleep(interval).await;
        }
    }
}

/// Whether a target may stand in for `homes`, and with what lag (see the module's doc):
/// every home marked down, and the largest lag over the homes within `rpo_ms`; `force` skips
/// both checks. `fresh`: source region → the moment as of which everything it committed is
/// merged here.
pub fn judge(
    homes: &[RegionId],
    health: &BTreeMap<RegionId, crate::health::RegionHealth>,
    fresh: &BTreeMap<String, u64>,
    rpo_ms: Option<u64>,
    force: bool,
) -> Result<Option<u64>, Refusal> {
    let mut lag: Option<u64> = Some(0);
    for h in homes {
        let seen = health.get(h);
        if !force && seen.is_none_or(|s| s.reachability != Reachability::Down) {
            return Err(Refusal::HomeUp(h.clone()));
        }
        let this = match (seen.and_then(|s| s.last_ok_at_ms), fresh.get(h.as_str())) {
            (Some(heard), Some(fresh)) => Some(heard.saturating_sub(*fresh)),
            _ => None,
        };
        lag = lag.zip(this).map(|(a, b)| a.max(b));
    }
    if let (Some(rpo), false) = (rpo_ms, force) {
        if lag.is_none_or(|l| l > rpo) {
            return Err(Refusal::OverRpo { lag_ms: lag, rpo_ms: rpo });
        }
    }
    Ok(lag)
}

/// Why `promote` did not promote.
#[derive(Debug, Clone)]
pub enum PromoteError {
    Refused(Refusal),
    Node(NodeError),
}

/// The check a write of `dataset` by a region that is not its home must carry: the region's
/// active promotion record, pinned to its version, so the write applies only while that
/// promotion stands (`None`: no active promotion here, so the write is refused).
pub(crate) fn guard_check(
    reader: &meridian_raft::StateMachineReader,
    dataset: &str,
) -> Result<Option<(String, Condition, u64)>, NodeError> {
    let key = promotion_key(dataset);
    let Some(obj) = reader.get(NAMESPACE, &key).map_err(NodeError::storage)? else { return Ok(None) };
    Ok(decode::<Promotion>(&obj).filter(Promotion::is_active).map(|p| (key, Condition::IfMatch(obj.version), p.epoch)))
}

fn promotion_key(dataset: &str) -> String {
    format!("{PROMOTION_PREFIX}{dataset}")
}

fn dataset_label(dataset: &str) -> crate::metrics::DatasetLabels {
    crate::metrics::DatasetLabels { dataset: dataset.to_owned() }
}

fn put<T: Serialize>(key: &str, value: &T) -> WriteRequest {
    WriteRequest {
        dataset: NAMESPACE.into(),
        key: key.to_owned(),
        value: Some(serde_json::to_vec(value).expect("a failover record serializes")),
        condition: Condition::Always,
        effect: WriteEffect::Replace,
    }
}

fn decode<T: for<'de> Deserialize<'de>>(o: &StoredObject) -> Option<T> {
    o.value.as_deref().and_then(|v| serde_json::from_slice(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::RegionHealth;

    fn r(s: &str) -> RegionId {
        RegionId::new(s).unwrap()
    }

    fn seen(state: Reachability, last_ok_at_ms: Option<u64>) -> RegionHealth {
        RegionHealth { reachability: state, last_ok_at_ms, ..RegionHealth::default() }
    }

    #[test]
    fn a_target_stands_in_only_when_every_home_is_down_and_its_lag_is_within_the_rpo() {
        let homes = [r("us-east"), r("sa-east")];
        let mut health = BTreeMap::from([
            (r("us-east"), seen(Reachability::Down, Some(10_000))),
            (r("sa-east"), seen(Reachability::Up, Some(10_000))),
        ]);
        let fresh = BTreeMap::from([("us-east".to_owned(), 9_000), ("sa-east".to_owned(), 7_500)]);
        assert_eq!(judge(&homes, &health, &fresh, None, false), Err(Refusal::HomeUp(r("sa-east"))));
        assert_eq!(judge(&homes, &health, &fresh, None, true), Ok(Some(2_500)), "forced: the lag still shows");
        health.get_mut(&r("sa-east")).unwrap().reachability = Reachability::Down;
        // The lag is the largest over the homes: sa-east's 2.5 s.
        assert_eq!(judge(&homes, &health, &fresh, Some(3_000), false), Ok(Some(2_500)));
        assert_eq!(
            judge(&homes, &health, &fresh, Some(2_000), false),
            Err(Refusal::OverRpo { lag_ms: Some(2_500), rpo_ms: 2_000 })
        );
        assert_eq!(judge(&homes, &health, &fresh, None, false), Ok(Some(2_500)), "no rpo: any lag");
        // Never heard from, or nothing merged: unknown, which no rpo admits.
        let none = BTreeMap::new();
        assert_eq!(
            judge(&homes, &health, &none, Some(60_000), false),
            Err(Refusal::OverRpo { lag_ms: None, rpo_ms: 60_000 })
        );
        assert_eq!(judge(&homes, &health, &none, Some(60_000), true), Ok(None));
        let unknown = BTreeMap::from([(r("us-east"), seen(Reachability::Unknown, None))]);
        assert_eq!(
            judge(&homes[..1], &unknown, &fresh, None, false),
            Err(Refusal::HomeUp(r("us-east"))),
            "no verdict is not down"
        );
    }
}
