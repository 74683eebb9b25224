//! Cross-region links (DESIGN.md §7, §17). On each region's leader, one shipper per destination
//! region reads the outbox after the destination's cursor, filters every change through the
//! placement under the active policy, and sends the batch to the destination's leader, which
//! filters again by its own policy copy and merges it through its own Raft group exactly once.
//! The acknowledged range then advances the cursor, through this region's Raft group.
//!
//! Invariants:
//! - A change is shipped only to a region its placement lets hold a copy (a home or a mirror
//!   of the key); without an active policy nothing is shipped. The destination drops whatever
//!   its own copy of the policy forbids, so neither side's stale copy alone can place bytes
//!   where they may not be.
//! - The range a batch covers advances past withheld changes, so "everything from region X up
//!   to n that I may hold" stays true and cheap to check.
//! - A resend is harmless (the merge is keyed by source range); a lost acknowledgement only
//!   costs a resend. The cursor moves only after the destination acknowledged.
//! - Both ends filter under the same policy entry: every batch names the epoch it was
//!   filtered under and the destination refuses another, so a change withheld under one entry
//!   is never counted as merged under the next.
//! - Nothing is silently dropped. When a policy entry lets the destination hold more than
//!   the one before, the link backfills (a filtered scan of what it withheld) before it ships
//!   anything else under that entry, and records the epoch once done. When the bounded outbox
//!   was trimmed past the cursor, the link catches up by a filtered scan, then moves the
//!   cursor past the scan's start. Both scans send only this region's own versions, and the
//!   destination keeps a change only if it is newer than its copy, so a scan repeated after a
//!   crash is harmless.
//! - The shipper does not wait for its cursor to be persisted: the next batch and any
//!   backfill start from what the destination acknowledged, which the cursor never passes.
//!
//! Schedules, rate limits, priorities and congestion deferral are in [`crate::traffic`].

use std::sync::Arc;
use std::time::Duration;

use meridian_core::{DatasetName, Key, RegionId};
use meridian_policy::{evaluate, ObjectAttributes};
use meridian_raft::command::{CommandV1, RemoteChange};
use meridian_raft::{CommandResult, StoredObject};

use crate::metrics::{DatasetLinkLabels, DeferralLabels, LinkLabels, ShadowLabels};
use crate::peer::{PeerError, PeerRequestV1, PeerResponseV1, RepairBatch, ShipBatch};
use crate::policy::ActivePolicy;
use crate::traffic::{Candidate, Deferral, LinkTraffic};
use crate::{LocalError, Node, NodeError};
use meridian_policy::units::Dur;
use meridian_policy::{Placement, Schedule};

/// How often an idle link looks at the outbox.
pub const LINK_TICK: Duration = Duration::from_millis(50);
/// Most outbox entries in one batch.
pub const LINK_BATCH_ENTRIES_MAX: usize = 256;
/// A batch stops growing past this many bytes of values.
pub const LINK_BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Longest pause after repeated failures (exponential backoff with jitter up to this).
pub const LINK_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Objects read per page by catch-up and backfill scans.
pub const SCAN_PAGE: usize = 1024;
/// An idle link tells its destination it is current this often (for bounded-staleness reads).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Batches one link keeps in flight at once. Departures are spaced by the link's round trip
/// divided by this (but at least [`DEPARTURE_SPACING_MIN`]), so a change waits at most about
/// that long for its batch to leave: about 2.4 ms on a 300 ms round trip. (At 32, that wait
/// was the larger part of the lag excess on long links: p99 14.5 ms at 150 ms one way,
/// against 6.8 ms at 10 ms.)
pub const PIPELINE_MAX: usize = 128;
/// The least time between two departures on one link while batches are in flight. Smaller
/// batches cost bytes: every batch carries its own framing and compresses on its own, and at
/// 128 in flight with no floor the cross-region bytes of `meridian bench bytes` grew by 8%.
pub const DEPARTURE_SPACING_MIN: Duration = Duration::from_millis(2);
/// Key and value bytes one link keeps in flight at most (batches wait beyond it).
pub const PIPELINE_BYTES_MAX: u64 = 32 * 1024 * 1024;
/// How long a destination holds a batch that arrived before the one ahead of it was merged.
pub const ORDER_WAIT_MAX: Duration = Duration::from_secs(2);

/// Signals between the write path, the receivers and the shippers.
#[derive(Default)]
pub(crate) struct LinkSignals {
    /// One per shipper, notified when a local write commits.
    pub(crate) wakes: std::sync::Mutex<Vec<Arc<tokio::sync::Notify>>>,
    /// Notified when this node merged a batch from another region.
    pub(crate) merged: tokio::sync::Notify,
    /// Per source region: the highest range end queued for this node's log (the leader's).
    pub(crate) queued: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Held while a batch is queued and recorded, so batches queue in range order.
    pub(crate) queue_lock: tokio::sync::Mutex<()>,
    /// Each shipper's latest report, by destination.
    pub(crate) reports: std::sync::Mutex<std::collections::BTreeMap<String, crate::peer::LinkReport>>,
}

/// A batch ready to go, with what it carries.
pub(crate) struct Prepared {
    batch: ShipBatch,
    /// The outbox may hold more after it.
    more: bool,
    bytes: u64,
    shipped: u64,
    withheld: u64,
}

pub(crate) enum Round {
    Idle,
    /// A backfill or catch-up scan ran to its end.
    Scanned,
    Batch(Prepared),
}

/// A batch that came back.
pub(crate) struct Sent {
    result: Result<CommandResult, NodeError>,
    rtt_ms: f64,
    bytes: u64,
    shipped: u64,
    withheld: u64,
}

/// One shipper's batches in flight.
#[derive(Default)]
pub(crate) struct Pipeline {
    /// The end of the last range sent; the next batch starts after it (`None`: after the
    /// cursor).
    sent_upto: Option<u64>,
    in_flight: usize,
    /// The highest range end the destination acknowledged.
    acked: u64,
    failures: u32,
    completed: Vec<Sent>,
    batches: u64,
    errors: u64,
    last_error: Option<String>,
    last_departure: Option<tokio::time::Instant>,
    in_flight_bytes: u64,
    /// The cursor proposal in flight. The shipper does not wait for it: the destination's
    /// acknowledgement is what lets the next batch go, and a cursor persisted late only
    /// costs a resend after a leader change (the destination skips what it merged).
    persisting: Option<tokio::task::JoinHandle<Result<CommandResult, NodeError>>>,
}

impl Pipeline {
    /// Send the next batch from the cursor again.
    fn restart(&mut self, node: &Node, dest: &RegionId) {
        if self.sent_upto.take().is_some() {
            node.metrics.replication_restarts.get_or_create(&node.link_labels(dest)).inc();
        }
    }

    fn failed(&mut self, node: &Node, dest: &RegionId, e: &NodeError) {
        self.failures = self.failures.saturating_add(1);
        self.errors += 1;
        self.last_error = Some(e.to_string());
        self.restart(node, dest);
        node.metrics.replication_errors.get_or_create(&node.link_labels(dest)).inc();
        tracing::debug!(destination = %dest, error = %e, "link attempt failed");
    }

    /// How long to wait before the next round: the tick, or a backoff with jitter.
    fn pause(&self) -> Duration {
        if self.failures == 0 {
            return LINK_TICK;
        }
        let cap = LINK_BACKOFF_MAX.as_millis() as u64;
        let base = (LINK_TICK.as_millis() as u64) << self.failures.min(8);
        let ms = base.min(cap);
        Duration::from_millis(ms / 2 + meridian_raft::rt::random_u64() % (ms / 2 + 1))
    }
}

/// Changes a link remembers having sent ahead of its range (so the range does not send them
/// again); past this, changes behind a waiting one wait too.
pub const EARLY_SENT_MAX: usize = 4096;

/// What one link's shipper keeps between rounds (in memory: a new leader starts afresh, which
/// costs at most some resends).
pub(crate) struct LinkState {
    pub(crate) traffic: LinkTraffic,
    /// Sequence → version of changes sent ahead of the range.
    pub(crate) early_sent: std::collections::BTreeMap<u64, meridian_core::Version>,
    /// Datasets whose queue gauges were last set non-zero.
    reported: std::collections::BTreeSet<String>,
    /// Per dataset: changes waiting in the last window read, their bytes, the oldest's age (ms).
    queue: std::collections::BTreeMap<String, (u64, u64, u64)>,
    /// Changes waiting in the last window read, by reason.
    deferred: Vec<(String, u64)>,
    /// Per dataset: changes sent in batches, and their key and value bytes.
    sent: std::collections::BTreeMap<String, (u64, u64)>,
    /// When the last batch (or heartbeat) left.
    last_heartbeat_ms: u64,
}

impl LinkState {
    pub(crate) fn new(link_rate: Option<u64>, now_ms: u64) -> Self {
        LinkState {
            traffic: LinkTraffic::new(link_rate, now_ms),
            early_sent: Default::default(),
            reported: Default::default(),
            queue: Default::default(),
            deferred: Vec::new(),
            sent: Default::default(),
            last_heartbeat_ms: 0,
        }
    }

    /// Set the per-dataset queue gauges from the changes waiting in the window the link just
    /// looked at (at most one batch of outbox entries), and the per-reason deferral gauges.
    fn report_queue(&mut self, node: &Node, dest: &RegionId, waiting: &[(&Candidate, Deferral)], now_ms: u64) {
        let (source, destination) = (node.spec.region.to_string(), dest.to_string());
        let mut per_dataset: std::collections::BTreeMap<&str, (i64, i64, u64)> = Default::default();
        let mut per_reason: std::collections::HashMap<Deferral, i64> = Default::default();
        for (c, reason) in waiting {
            let e = per_dataset.entry(c.dataset.as_str()).or_default();
            e.0 += 1;
            e.1 += c.bytes as i64;
            e.2 = e.2.max(now_ms.saturating_sub(c.written_ms));
            *per_reason.entry(*reason).or_default() += 1;
        }
        let labels = |dataset: &str| DatasetLinkLabels {
            source: source.clone(),
            destination: destination.clone(),
            dataset: dataset.to_owned(),
        };
        let stale: Vec<String> =
            self.reported.iter().filter(|d| !per_dataset.contains_key(d.as_str())).cloned().collect();
        for d in stale {
            let l = labels(&d);
            node.metrics.replication_queued_changes.get_or_create(&l).set(0);
            node.metrics.replication_queued_bytes.get_or_create(&l).set(0);
            node.metrics.replication_lag_seconds.get_or_create(&l).set(0.0);
            self.reported.remove(&d);
        }
        self.queue =
            per_dataset.iter().map(|(d, (n, b, age))| ((*d).to_owned(), (*n as u64, *b as u64, *age))).collect();
        self.deferred = [Deferral::Schedule, Deferral::Rate, Deferral::Congestion]
            .iter()
            .map(|r| (r.as_str().to_owned(), per_reason.get(r).copied().unwrap_or(0) as u64))
            .collect();
        for (d, (n, bytes, age)) in per_dataset {
            let l = labels(d);
            node.metrics.replication_queued_changes.get_or_create(&l).set(n);
            node.metrics.replication_queued_bytes.get_or_create(&l).set(bytes);
            node.metrics.replication_lag_seconds.get_or_create(&l).set(age as f64 / 1000.0);
            self.reported.insert(d.to_owned());
        }
        for reason in [Deferral::Schedule, Deferral::Rate, Deferral::Congestion] {
            let l = DeferralLabels {
                source: source.clone(),
                destination: destination.clone(),
                reason: reason.as_str().into(),
            };
            node.metrics.replication_deferred.get_or_create(&l).set(per_reason.get(&reason).copied().unwrap_or(0));
        }
        if let Some(rtt) = self.traffic.health.rtt_ms {
            let l = LinkLabels { source, destination };
            node.metrics.replication_rtt_seconds.get_or_create(&l).set(rtt / 1000.0);
            node.metrics.replication_congested.get_or_create(&l).set(i64::from(self.traffic.health.congested()));
        }
    }
}

/// The epoch of the active entry, 0 without one.
pub(crate) fn epoch_of(active: Option<&ActivePolicy>) -> u64 {
    active.map_or(0, |a| a.entry.epoch)
}

impl Node {
    /// Start one shipper per destination region. Each runs only while this node leads its
    /// region, and stops with the node. A shipper keeps up to [`PIPELINE_MAX`] batches in
    /// flight (the destination merges them in range order), wakes as soon as a local write
    /// commits, and otherwise looks every [`LINK_TICK`].
    pub(crate) fn spawn_links(self: &Arc<Self>) {
        let destinations: Vec<RegionId> =
            self.topology.regions().iter().map(|r| r.name.clone()).filter(|r| *r != self.spec.region).collect();
        let link_rate = self.config.replication.link_rate_bytes_per_sec;
        for dest in destinations {
            let weak = Arc::downgrade(self);
            let mut link = LinkState::new((link_rate > 0).then_some(link_rate), self.clock.now_ms());
            let wake = Arc::new(tokio::sync::Notify::new());
            self.link_signals.wakes.lock().expect("wakes lock").push(wake.clone());
            tokio::spawn(async move {
                let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Sent>(PIPELINE_MAX * 2);
                let mut pipe = Pipeline::default();
                let mut immediate = false;
                loop {
                    if !immediate {
                        let pause = pipe.pause();
                        tokio::select! {
                            _ = wake.notified(), if pipe.failures == 0 => {}
                            Some(sent) = done_rx.recv() => pipe.completed.push(sent),
                            _ = tokio::time::sleep(pause) => {}
                        }
                    }
                    immediate = false;
                    while let Ok(sent) = done_rx.try_recv() {
                        pipe.completed.push(sent);
                    }
                    let Some(node) = weak.upgrade() else { return };
                    if node.links_stopped() {
                        return;
                    }
                    node.settle(&dest, &mut link, &mut pipe).await;
                    node.publish_link_report(&dest, &link, &pipe);
                    if node.raft.metrics().borrow().state != openraft::ServerState::Leader {
                        pipe.sent_upto = None;
                        pipe.failures = 0;
                        continue;
                    }
                    if pipe.in_flight >= PIPELINE_MAX || pipe.in_flight_bytes >= PIPELINE_BYTES_MAX {
                        node.metrics.replication_window_full.get_or_create(&node.link_labels(&dest)).inc();
                        continue;
                    }
                    // Spread departures over the round trip: sending every batch at once
                    // and then waiting a whole round trip for room would make the changes
                    // written meanwhile wait that long.
                    if let (Some(rtt), Some(last)) = (link.traffic.health.rtt_ms, pipe.last_departure) {
                        let spacing =
                            Duration::from_secs_f64(rtt / 1000.0 / PIPELINE_MAX as f64).max(DEPARTURE_SPACING_MIN);
                        let since = last.elapsed();
                        if pipe.in_flight > 0 && since < spacing {
                            tokio::time::sleep(spacing - since).await;
                        }
                    }
                    match node.prepare_round(&dest, &mut link, &pipe).await {
                        // Nothing to send and nothing outstanding: nothing is failing either.
                        Ok(Round::Idle) if pipe.in_flight == 0 => pipe.failures = 0,
                        Ok(Round::Idle) => {}
                        Ok(Round::Scanned) => {
                            pipe.sent_upto = None;
                            pipe.failures = 0;
                            immediate = true;
                        }
                        Ok(Round::Batch(b)) => {
                            pipe.sent_upto = Some(b.batch.upto_seq);
                            pipe.in_flight += 1;
                            pipe.in_flight_bytes += b.bytes;
                            pipe.last_departure = Some(tokio::time::Instant::now());
                            immediate = b.more;
                            let (node2, dest2, tx) = (node.clone(), dest.clone(), done_tx.clone());
                            tokio::spawn(async move {
                                let started = tokio::time::Instant::now();
                                let result = node2.send_batch(&dest2, &b.batch).await;
                                let rtt_ms = started.elapsed().as_secs_f64() * 1000.0;
                                let _ = tx
                                    .send(Sent {
                                        result,
                                        rtt_ms,
                                        bytes: b.bytes,
                                        shipped: b.shipped,
                                        withheld: b.withheld,
                                    })
                                    .await;
                            });
                        }
                        Err(e) => pipe.failed(&node, &dest, &e),
                    }
                }
            });
        }
    }

    /// Keep what the shipper knows where `/v1/replication` can read it.
    fn publish_link_report(&self, dest: &RegionId, link: &LinkState, pipe: &Pipeline) {
        let bytes = |encoding: &str| -> u64 {
            ["ship", "repair"]
                .iter()
                .map(|kind| {
                    let labels = crate::metrics::CrossRegionLabels {
                        peer_region: dest.to_string(),
                        direction: "sent".into(),
                        kind: (*kind).into(),
                        encoding: encoding.into(),
                    };
                    self.metrics.cross_region_bytes.get_or_create(&labels).get()
                })
                .sum()
        };
        let names: std::collections::BTreeSet<&String> = link.queue.keys().chain(link.sent.keys()).collect();
        let datasets = names
            .into_iter()
            .map(|d| {
                let (queued_changes, queued_bytes, lag_ms) = link.queue.get(d).copied().unwrap_or_default();
                let (sent_changes, sent_bytes) = link.sent.get(d).copied().unwrap_or_default();
                crate::peer::LinkDatasetReport {
                    dataset: d.clone(),
                    queued_changes,
                    queued_bytes,
                    lag_ms,
                    sent_changes,
                    sent_bytes,
                }
            })
            .collect();
        let h = &link.traffic.health;
        let report = crate::peer::LinkReport {
            destination: dest.to_string(),
            batches_in_flight: pipe.in_flight as u32,
            failures: pipe.failures,
            last_error: pipe.last_error.clone(),
            rtt_us: h.rtt_ms.map(|r| (r * 1000.0) as u64),
            goodput_bytes_per_sec: h.goodput_bytes_per_sec.map(|g| g as u64),
            congested: h.congested(),
            batches: pipe.batches,
            errors: pipe.errors,
            sent_bytes_raw: bytes("raw"),
            sent_bytes_wire: bytes("wire"),
            deferred: link.deferred.clone(),
            datasets,
        };
        self.link_signals.reports.lock().expect("reports lock").insert(dest.to_string(), report);
    }

    /// Wake every link: a local write committed.
    pub(crate) fn wake_links(&self) {
        for w in self.link_signals.wakes.lock().expect("wakes lock").iter() {
            w.notify_one();
        }
    }

    /// Account for the batches that came back: move the cursor to the highest acknowledged
    /// range, or start again from the cursor after a failure or a gap.
    async fn settle(self: &Arc<Self>, dest: &RegionId, link: &mut LinkState, pipe: &mut Pipeline) {
        let labels = self.link_labels(dest);
        let mut gap: Option<u64> = None;
        for sent in std::mem::take(&mut pipe.completed) {
            pipe.in_flight -= 1;
            pipe.in_flight_bytes = pipe.in_flight_bytes.saturating_sub(sent.bytes);
            match sent.result {
                Ok(CommandResult::Remote { merged_upto, .. }) => {
                    pipe.acked = pipe.acked.max(merged_upto);
                    pipe.failures = 0;
                    pipe.batches += 1;
                    link.traffic.health.observe(sent.rtt_ms, sent.bytes);
                    self.metrics.replication_shipped.get_or_create(&labels).inc_by(sent.shipped);
                    self.metrics.replication_withheld.get_or_create(&labels).inc_by(sent.withheld);
                    self.metrics.replication_batches.get_or_create(&labels).inc();
                }
                // The destination has less than the cursor says (it lost state): resend from there.
                Ok(CommandResult::RemoteGap { merged_upto }) => {
                    gap = Some(gap.map_or(merged_upto, |g| g.min(merged_upto)));
                    pipe.restart(self, dest);
                }
                Ok(other) => {
                    pipe.failed(self, dest, &NodeError::Internal(format!("unexpected answer to a batch: {other:?}")))
                }
                Err(e) => pipe.failed(self, dest, &e),
            }
        }
        if pipe.persisting.as_ref().is_some_and(|h| h.is_finished()) {
            let outcome = match pipe.persisting.take().expect("checked").await {
                Ok(r) => r.map(|_| ()),
                Err(e) => Err(NodeError::Internal(format!("cursor proposal: {e}"))),
            };
            if let Err(e) = outcome {
                pipe.failed(self, dest, &e);
            }
        }
        let cursor = match self.reader.replication() {
            Ok((state, _)) => state.cursors.get(dest.as_str()).copied().unwrap_or(0),
            Err(_) => return,
        };
        if let Some(g) = gap.filter(|g| *g < cursor) {
            // The destination lost what it acknowledged: move the cursor back, after any
            // proposal in flight (which could otherwise land after this one).
            if let Some(h) = pipe.persisting.take() {
                let _ = h.await;
            }
            let cmd = CommandV1::SetCursor { destination: dest.to_string(), upto_seq: g };
            if let Err(e) = self.propose_link_command(cmd).await {
                pipe.failed(self, dest, &e);
                return;
            }
            pipe.acked = g;
        } else if pipe.acked > cursor && pipe.persisting.is_none() {
            let (node, cmd) =
                (self.clone(), CommandV1::SetCursor { destination: dest.to_string(), upto_seq: pipe.acked });
            pipe.persisting = Some(tokio::spawn(async move { node.propose_link_command(cmd).await }));
        }
        let acked = if gap.is_some_and(|g| g < cursor) { pipe.acked } else { pipe.acked.max(cursor) };
        link.early_sent.retain(|seq, _| *seq > acked);
        if let Ok((_, region_seq)) = self.reader.replication() {
            self.metrics.replication_lag_changes.get_or_create(&labels).set(region_seq.saturating_sub(acked) as i64);
        }
    }

    /// This node's view of its region's replication state.
    pub(crate) fn local_replication(&self) -> Result<crate::peer::RegionReplication, NodeError> {
        let (state, region_seq) = self.reader.replication().map_err(|e| NodeError::Storage(e.to_string()))?;
        Ok(crate::peer::RegionReplication {
            node: self.spec.id,
            region_seq,
            cursors: state.cursors.into_iter().collect(),
            merged: state.merged.into_iter().collect(),
            received: state.received.into_iter().collect(),
            repaired: state.repaired.into_iter().collect(),
            backfilled: state.backfilled.into_iter().collect(),
            purged: state.purged,
            outbox_trimmed: state.outbox_trimmed,
            epoch: epoch_of(self.active_policy().as_deref()),
            links: if self.raft.metrics().borrow().state == openraft::ServerState::Leader {
                self.link_signals.reports.lock().expect("reports lock").values().cloned().collect()
            } else {
                Vec::new()
            },
        })
    }

    /// Every region's replication state: every node of it is asked at once, and the leader's
    /// answer (the one that runs the links) is preferred over the others.
    pub async fn replication_view(&self) -> Vec<(RegionId, Result<crate::peer::RegionReplication, String>)> {
        let regions: Vec<RegionId> = self.topology.regions().iter().map(|r| r.name.clone()).collect();
        let asks = regions.into_iter().map(|region| async move {
            let nodes = self.topology.region_nodes(&region);
            let answers = futures::future::join_all(nodes.iter().map(|n| async move {
                if n.id == self.spec.id {
                    return self.local_replication().map_err(|e| format!("node {}: {e}", n.id));
                }
                match self.transport.call(n.id, PeerRequestV1::ReplicationState, crate::STATUS_TIMEOUT).await {
                    Ok(PeerResponseV1::ReplicationState(Ok(r))) => Ok(r),
                    Ok(PeerResponseV1::ReplicationState(Err(e))) => Err(format!("node {}: {e}", n.id)),
                    Ok(_) => Err(format!("node {} sent an unexpected reply", n.id)),
                    Err(e) => Err(format!("node {}: {e}", n.id)),
                }
            }))
            .await;
            let mut last = String::from("no nodes");
            let mut first_ok = None;
            for a in answers {
                match a {
                    Ok(r) if !r.links.is_empty() => return (region, Ok(r)),
                    Ok(r) => first_ok = first_ok.or(Some(r)),
                    Err(e) => last = e,
                }
            }
            (region, first_ok.ok_or(last))
        });
        futures::future::join_all(asks).await
    }

    pub(crate) fn link_labels(&self, dest: &RegionId) -> LinkLabels {
        LinkLabels { source: self.spec.region.to_string(), destination: dest.to_string() }
    }

    /// May `region` hold this object under `active`? Without a policy, no region but the origin.
    pub(crate) fn placement_allows(
        &self,
        active: Option<&ActivePolicy>,
        region: &RegionId,
        dataset: &str,
        key: &str,
        obj: &StoredObject,
    ) -> bool {
        self.placement_of(active, dataset, key, obj).is_some_and(|p| p.holds_copy(region))
    }

    /// The placement of this object under the version of `active` that governs it.
    pub(crate) fn placement_of(
        &self,
        active: Option<&ActivePolicy>,
        dataset: &str,
        key: &str,
        obj: &StoredObject,
    ) -> Option<Placement> {
        let active = active?;
        let (Ok(ds), Ok(k)) = (DatasetName::new(dataset), Key::new(key)) else { return None };
        let (policy, _) = active.governing(&ds, &k)?;
        // A user-homed key without a prefix lives where it was written: its origin region.
        let origin = obj.version.region.clone();
        let attrs =
            ObjectAttributes { home: Some(origin.clone()), origin: Some(origin), ..ObjectAttributes::default() };
        evaluate(policy, &self.topology, &ds, &k, &attrs).ok()
    }

    /// Decide this round for `dest`: a backfill or catch-up scan (run here, with nothing in
    /// flight), nothing, or the next batch after what was last sent.
    async fn prepare_round(&self, dest: &RegionId, link: &mut LinkState, pipe: &Pipeline) -> Result<Round, NodeError> {
        let storage = |e: meridian_raft::StorageReadError| NodeError::Storage(e.to_string());
        // Taken before the region sequence is read: every write committed before this instant
        // is at or below that sequence, so a range reaching it is fresh as of this instant.
        let read_at = self.clock.now_ms();
        let (state, region_seq) = self.reader.replication().map_err(storage)?;
        let cursor = state.cursors.get(dest.as_str()).copied().unwrap_or(0);
        self.refresh_policy()?;
        let active = self.active_policy();
        let epoch = epoch_of(active.as_deref());
        let idle = pipe.in_flight == 0;
        // A new policy entry may let `dest` hold what earlier ones withheld: backfill that
        // before shipping anything under it.
        if let Some(active) = active.as_deref() {
            let done = state.backfilled.get(dest.as_str()).copied();
            if done != Some(epoch) {
                if !idle {
                    return Ok(Round::Idle);
                }
                // Everything up to what the destination acknowledged was passed under an
                // earlier entry (the cursor may not be persisted that far yet).
                self.backfill(dest, active, done, cursor.max(pipe.acked), link).await?;
                self.propose_link_command(CommandV1::SetBackfilled { destination: dest.to_string(), epoch }).await?;
                return Ok(Round::Scanned);
            }
        }
        // The destination acknowledged up to `acked` (the cursor may not be persisted yet).
        let from = pipe.sent_upto.unwrap_or(cursor.max(pipe.acked)).max(cursor);
        if from < state.outbox_trimmed {
            if !idle {
                return Ok(Round::Idle);
            }
            self.catch_up(dest, active.as_deref(), cursor, region_seq, read_at, link).await?;
            return Ok(Round::Scanned);
        }
        let cursor = from;
        let entries = self.reader.outbox_after(cursor, LINK_BATCH_ENTRIES_MAX).map_err(storage)?;
        // Writes that never enter the outbox (reserved namespaces) still take sequences: an
        // empty batch carries the range past them, so the destination's "merged up to" and
        // this link's lag reach the region's last write.
        if entries.is_empty() && region_seq <= cursor {
            link.report_queue(self, dest, &[], self.clock.now_ms());
            return Ok(self.heartbeat(link, idle, cursor, epoch, read_at, true));
        }
        // What may go: this region's own versions the placement lets `dest` hold.
        let here = self.spec.region.clone();
        let mut withheld = 0u64;
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut objects: Vec<RemoteChange> = Vec::new();
        for (seq, entry) in &entries {
            let Some(obj) = self.reader.get(&entry.dataset, &entry.key).map_err(storage)? else { continue };
            // Only this region's own versions, each under its own sequence: a key written
            // again later is shipped under the later entry, and a newer version merged from
            // elsewhere by its own origin's link.
            if obj.version.region != here || obj.version.seq != *seq {
                continue;
            }
            let placement = self.placement_of(active.as_deref(), &entry.dataset, &entry.key, &obj);
            let allowed = placement.as_ref().is_some_and(|p| p.holds_copy(dest));
            self.count_shadow(active.as_deref(), dest, &entry.dataset, &entry.key, &obj, allowed);
            let Some(placement) = placement.filter(|_| allowed) else {
                withheld += 1;
                continue;
            };
            // Sent ahead of the range in an earlier round: delivered; the range passes it.
            if link.early_sent.get(seq) == Some(&obj.version) {
                continue;
            }
            // The dataset's link from here to `dest`; a region that originated the change but
            // is no longer a home ships it continuously.
            let l = placement.links.iter().find(|l| l.from == here && l.to == *dest);
            candidates.push(Candidate {
                seq: obj.version.seq,
                dataset: entry.dataset.clone(),
                bytes: (entry.key.len() + obj.value.as_ref().map_or(0, Vec::len)) as u64,
                written_ms: obj.version.hlc.wall_ms(),
                schedule: l.map_or(Schedule::Continuous, |l| l.schedule),
                phase: l.map_or(Dur(0), |l| l.phase),
                rate: l.and_then(|l| l.rate),
                max_lag: l.and_then(|l| l.max_lag),
            });
            objects.push(RemoteChange {
                dataset: entry.dataset.clone(),
                key: entry.key.clone(),
                version: obj.version,
                value: obj.value,
            });
        }
        let now = self.clock.now_ms();
        let plan = link.traffic.plan(&candidates, now);
        // The range stops before the first change that waits (it stays behind the cursor);
        // changes admitted past it go at once, outside the range, and are not sent again when
        // the range reaches them. A batch stops growing at its byte bound.
        let last_read = entries.last().map_or(cursor, |(s, _)| *s);
        let mut upto = candidates.iter().zip(&plan).find(|(_, p)| p.is_err()).map(|(c, _)| c.seq - 1);
        let mut changes = Vec::new();
        let mut early = Vec::new();
        let mut bytes = 0u64;
        let mut deferred: Vec<(usize, Deferral)> = Vec::new();
        for (i, (c, p)) in candidates.iter().zip(&plan).enumerate() {
            if let Err(reason) = p {
                deferred.push((i, *reason));
                continue;
            }
            let in_range = upto.is_none_or(|u| c.seq <= u);
            let over = bytes >= LINK_BATCH_BYTES_MAX as u64;
            if over || (!in_range && link.early_sent.len() >= EARLY_SENT_MAX) {
                // Not this round: return its tokens, and end the range before it.
                link.traffic.give_back(c);
                upto = Some(upto.map_or(c.seq - 1, |u| u.min(c.seq - 1)));
                continue;
            }
            let change = objects[i].clone();
            if in_range {
                bytes += c.bytes;
                changes.push(change);
            } else {
                bytes += c.bytes;
                link.early_sent.insert(c.seq, change.version.clone());
                early.push(change);
            }
        }
        // Changes past a range end that stopped short belong to the next round.
        changes.retain(|ch| upto.is_none_or(|u| ch.version.seq <= u));
        let full = entries.len() >= LINK_BATCH_ENTRIES_MAX || upto.is_some();
        // Everything up to the region's last write was read when the outbox held no more
        // (`region_seq` was read before the outbox, so no entry at or below it is missing).
        let upto =
            upto.unwrap_or(if entries.len() >= LINK_BATCH_ENTRIES_MAX { last_read } else { last_read.max(region_seq) });
        let queued: Vec<(&Candidate, Deferral)> = deferred.iter().map(|(i, r)| (&candidates[*i], *r)).collect();
        link.report_queue(self, dest, &queued, now);
        if upto <= cursor && early.is_empty() {
            // Everything waits: keep measuring the path, or a link deferring for congestion
            // would never see it recover.
            return Ok(self.heartbeat(link, idle, cursor, epoch, read_at, false));
        }
        let shipped = (changes.len() + early.len()) as u64;
        let upto_seq = upto.max(cursor);
        let batch = ShipBatch {
            source: here.to_string(),
            from_seq: cursor + 1,
            upto_seq,
            epoch,
            // Fresh as of `read_at` only if the range covers every write committed by then.
            fresh_ms: if upto_seq >= region_seq { read_at } else { 0 },
            changes,
            early,
        };
        link.last_heartbeat_ms = read_at;
        for c in batch.changes.iter().chain(&batch.early) {
            let e = link.sent.entry(c.dataset.clone()).or_default();
            e.0 += 1;
            e.1 += (c.key.len() + c.value.as_ref().map_or(0, Vec::len)) as u64;
        }
        Ok(Round::Batch(Prepared { batch, more: full, bytes, shipped, withheld }))
    }

    /// With nothing to send: now and then an empty batch, which tells the destination it is
    /// current (`current`: every write is acknowledged, so bounded-staleness reads there keep
    /// being served locally) and measures the path's round trip.
    fn heartbeat(
        &self,
        link: &mut LinkState,
        idle: bool,
        cursor: u64,
        epoch: u64,
        read_at: u64,
        current: bool,
    ) -> Round {
        if !idle || read_at.saturating_sub(link.last_heartbeat_ms) < HEARTBEAT_INTERVAL.as_millis() as u64 {
            return Round::Idle;
        }
        link.last_heartbeat_ms = read_at;
        let batch = ShipBatch {
            source: self.spec.region.to_string(),
            from_seq: cursor + 1,
            upto_seq: cursor,
            epoch,
            fresh_ms: if current { read_at } else { 0 },
            changes: Vec::new(),
            early: Vec::new(),
        };
        Round::Batch(Prepared { batch, more: false, bytes: 0, shipped: 0, withheld: 0 })
    }

    /// Send one batch to `dest`'s leader. Idempotent: the destination merges by source range,
    /// so any failure may be resent.
    async fn send_batch(&self, dest: &RegionId, batch: &ShipBatch) -> Result<CommandResult, NodeError> {
        let unpack = |r| match r {
            PeerResponseV1::Shipped(r) => Some(r),
            _ => None,
        };
        Ok(self.call_region(dest, || PeerRequestV1::ShipBatch(batch.clone()), unpack, true).await?.0)
    }

    /// Propose a link's bookkeeping (cursor, backfill mark) to this region's group.
    async fn propose_link_command(&self, cmd: CommandV1) -> Result<CommandResult, NodeError> {
        self.propose_replication(cmd).await.map_err(|e| match e {
            LocalError::NotLeader(_) => NodeError::NoLeader,
            LocalError::Other(e) => e,
        })
    }

    /// Under a shadow rollout, count the changes the shadow version would decide otherwise.
    fn count_shadow(
        &self,
        active: Option<&ActivePolicy>,
        dest: &RegionId,
        dataset: &str,
        key: &str,
        obj: &StoredObject,
        allowed: bool,
    ) {
        let Some(active) = active else { return };
        let (Ok(ds), Ok(k)) = (DatasetName::new(dataset), Key::new(key)) else { return };
        let Some(shadow) = active.shadow(&ds, &k) else { return };
        let origin = obj.version.region.clone();
        let attrs =
            ObjectAttributes { home: Some(origin.clone()), origin: Some(origin), ..ObjectAttributes::default() };
        let would = evaluate(shadow, &self.topology, &ds, &k, &attrs).is_ok_and(|p| p.holds_copy(dest));
        if would != allowed {
            let labels = ShadowLabels {
                source: self.spec.region.to_string(),
                destination: dest.to_string(),
                outcome: if would { "would_ship" } else { "would_withhold" }.into(),
            };
            self.metrics.replication_shadow.get_or_create(&labels).inc();
        }
    }

    /// Send `dest` every object this region originated with a sequence in `lo < seq <= hi`
    /// (`hi` unbounded if `None`) that `active` lets it hold and `skip` (the entry the link
    /// last backfilled under) did not already: as repair batches, which apply only what is
    /// newer than the destination's copy. The number of changes sent.
    async fn scan_ship(
        &self,
        dest: &RegionId,
        active: Option<&ActivePolicy>,
        lo: u64,
        hi: Option<u64>,
        skip: Option<&ActivePolicy>,
        link: &mut LinkState,
    ) -> Result<u64, NodeError> {
        let storage = |e: meridian_raft::StorageReadError| NodeError::Storage(e.to_string());
        let epoch = epoch_of(active);
        let mut after: Option<(String, String)> = None;
        let mut batch: Vec<RemoteChange> = Vec::new();
        let mut bytes = 0usize;
        let mut sent = 0u64;
        loop {
            let page = self.reader.scan(None, after.as_ref().map(|(d, k)| (d.as_str(), k.as_str())), SCAN_PAGE);
            let page = page.map_err(storage)?;
            let last_page = page.len() < SCAN_PAGE;
            for (dataset, key, obj) in page {
                after = Some((dataset.clone(), key.clone()));
                let seq = obj.version.seq;
                if obj.version.region != self.spec.region || seq <= lo || hi.is_some_and(|h| seq > h) {
                    continue;
                }
                let allowed = self.placement_allows(active, dest, &dataset, &key, &obj);
                if skip.is_none() {
                    // A catch-up decides for each change as the outbox path would.
                    self.count_shadow(active, dest, &dataset, &key, &obj, allowed);
                }
                if !allowed || self.placement_allows(skip, dest, &dataset, &key, &obj) {
                    continue;
                }
                bytes += obj.value.as_ref().map_or(0, Vec::len) + key.len();
                batch.push(RemoteChange { dataset, key, version: obj.version, value: obj.value });
                if batch.len() >= LINK_BATCH_ENTRIES_MAX || bytes >= LINK_BATCH_BYTES_MAX {
                    self.pace(link, bytes as u64).await;
                    sent += self.send_repair(dest, epoch, std::mem::take(&mut batch)).await?;
                    bytes = 0;
                }
            }
            if last_page {
                break;
            }
        }
        if !batch.is_empty() {
            self.pace(link, bytes as u64).await;
            sent += self.send_repair(dest, epoch, batch).await?;
        }
        self.metrics.replication_backfilled.get_or_create(&self.link_labels(dest)).inc_by(sent);
        Ok(sent)
    }

    /// Wait until the link's rate limit lets `bytes` go, then take them (scans ignore
    /// schedules, but not the link's rate limit).
    async fn pace(&self, link: &mut LinkState, bytes: u64) {
        loop {
            let wait = link.traffic.scan_wait_ms(bytes, self.clock.now_ms());
            if wait == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(wait.min(1_000))).await;
        }
        link.traffic.scan_take(bytes);
    }

    async fn send_repair(&self, dest: &RegionId, epoch: u64, changes: Vec<RemoteChange>) -> Result<u64, NodeError> {
        let n = changes.len() as u64;
        let batch = RepairBatch { source: self.spec.region.to_string(), epoch, changes };
        let unpack = |r| match r {
            PeerResponseV1::Repaired(r) => Some(r),
            _ => None,
        };
        self.call_region(dest, || PeerRequestV1::Repair(batch.clone()), unpack, true).await?;
        Ok(n)
    }

    /// Backfill after the policy entry changed: everything up to `passed` (what the link has
    /// passed: the cursor, or the destination's acknowledgement if that is further) that
    /// `active` lets `dest` hold and the entry last backfilled did not (all of it if that entry
    /// is unknown). What lies past it ships through the outbox under `active`.
    async fn backfill(
        &self,
        dest: &RegionId,
        active: &ActivePolicy,
        done: Option<u64>,
        passed: u64,
        link: &mut LinkState,
    ) -> Result<(), NodeError> {
        let previous = match done {
            Some(epoch) => self.entry_at_epoch(epoch)?,
            None => None,
        };
        let sent = self.scan_ship(dest, Some(active), 0, Some(passed), previous.as_ref(), link).await?;
        if sent > 0 {
            tracing::info!(
                destination = %dest, epoch = active.entry.epoch, sent,
                "backfilled what the new policy entry lets the destination hold"
            );
        }
        Ok(())
    }

    /// The outbox was trimmed past the cursor: send every change after it by a filtered
    /// scan, then acknowledge the range up to `region_seq` (read before the scan) with an
    /// empty batch, so the destination's merged mark and the cursor move past the gap.
    async fn catch_up(
        &self,
        dest: &RegionId,
        active: Option<&ActivePolicy>,
        cursor: u64,
        region_seq: u64,
        read_at: u64,
        link: &mut LinkState,
    ) -> Result<(), NodeError> {
        self.metrics.replication_catch_ups.get_or_create(&self.link_labels(dest)).inc();
        tracing::warn!(
            destination = %dest, cursor,
            "link fell behind the bounded outbox; catching up by a filtered scan of the data"
        );
        let sent = self.scan_ship(dest, active, cursor, None, None, link).await?;
        let batch = ShipBatch {
            source: self.spec.region.to_string(),
            from_seq: cursor + 1,
            upto_seq: region_seq,
            epoch: epoch_of(active),
            fresh_ms: read_at,
            changes: Vec::new(),
            early: Vec::new(),
        };
        let unpack = |r| match r {
            PeerResponseV1::Shipped(r) => Some(r),
            _ => None,
        };
        let (answer, _) = self.call_region(dest, || PeerRequestV1::ShipBatch(batch.clone()), unpack, true).await?;
        let acknowledged = match answer {
            CommandResult::Remote { merged_upto, .. } | CommandResult::RemoteGap { merged_upto } => merged_upto,
            other => return Err(NodeError::Internal(format!("unexpected answer to a batch: {other:?}"))),
        };
        self.propose_link_command(CommandV1::SetCursor { destination: dest.to_string(), upto_seq: acknowledged })
            .await?;
        tracing::info!(destination = %dest, sent, acknowledged, "catch-up done");
        Ok(())
    }

    /// Check a batch from another region before it is proposed here: a valid other region,
    /// this node leads, both ends under the same policy entry, and nothing this region's
    /// copy forbids it to hold (dropped and counted). The batch's source region.
    fn admit(&self, source: &str, epoch: u64, changes: &mut Vec<RemoteChange>) -> Result<RegionId, PeerError> {
        if self.raft.metrics().borrow().state != openraft::ServerState::Leader {
            return Err(PeerError::NotLeader { leader: self.leader_hint() });
        }
        let Ok(source) = RegionId::new(source.to_owned()) else {
            return Err(PeerError::Protocol(format!("batch from an invalid region name {source:?}")));
        };
        if self.topology.regions().iter().all(|r| r.name != source) || source == self.spec.region {
            return Err(PeerError::Protocol(format!(
                "batch from {source}, which is not another region of this cluster"
            )));
        }
        if let Err(e) = self.refresh_policy() {
            return Err(PeerError::Internal(e.to_string()));
        }
        let active = self.active_policy();
        let ours = epoch_of(active.as_deref());
        if ours != epoch {
            return Err(PeerError::Unavailable(format!(
                "the batch was filtered under policy epoch {epoch} and this region's copy has epoch {ours}; \
                 retry once both copies agree"
            )));
        }
        let here = self.spec.region.clone();
        let before = changes.len();
        changes.retain(|c| {
            let obj = StoredObject { version: c.version.clone(), value: None };
            c.version.region == source && self.placement_allows(active.as_deref(), &here, &c.dataset, &c.key, &obj)
        });
        let refused = (before - changes.len()) as u64;
        if refused > 0 {
            let labels = LinkLabels { source: source.to_string(), destination: here.to_string() };
            self.metrics.replication_refused.get_or_create(&labels).inc_by(refused);
            tracing::warn!(source = %source, refused, "refused changes this region's policy does not let it hold");
        }
        Ok(source)
    }

    /// Changes a catch-up or backfill scan sent: merged here if newer than the copy held.
    pub(crate) async fn receive_repair(&self, mut batch: RepairBatch) -> Result<CommandResult, PeerError> {
        self.admit(&batch.source, batch.epoch, &mut batch.changes)?;
        let cmd = CommandV1::Repair { source: batch.source, changes: batch.changes };
        match self.propose_replication(cmd).await {
            Ok(r) => Ok(r),
            Err(LocalError::NotLeader(leader)) => Err(PeerError::NotLeader { leader }),
            Err(LocalError::Other(e)) => Err(crate::to_peer_error(e)),
        }
    }

    /// A batch from another region's link: drop what this region's policy copy forbids it to
    /// hold, then merge the rest through this region's Raft group.
    pub(crate) async fn receive_batch(&self, mut batch: ShipBatch) -> Result<CommandResult, PeerError> {
        let source = self.admit(&batch.source, batch.epoch, &mut batch.changes)?;
        self.admit(&batch.source, batch.epoch, &mut batch.early)?;
        let stamps: Vec<u64> = batch.changes.iter().chain(&batch.early).map(|c| c.version.hlc.wall_ms()).collect();
        let to_peer = |e| match e {
            LocalError::NotLeader(leader) => PeerError::NotLeader { leader },
            LocalError::Other(e) => crate::to_peer_error(e),
        };
        // Changes sent ahead of the range first: they are newer-only merges, so applying
        // them before (or without) the range is harmless.
        if !batch.early.is_empty() {
            let cmd = CommandV1::Repair { source: batch.source.clone(), changes: batch.early };
            self.propose_replication(cmd).await.map_err(to_peer)?;
        }
        // Pipelined batches may overtake each other on the way: hold one that starts past
        // what is merged or already queued for the log until the one ahead of it is queued
        // (bounded; after that the merge answers with the gap and the source resends). The
        // log applies in queue order, so a batch never needs to wait for the previous one to
        // be applied, only to be queued.
        let deadline = tokio::time::Instant::now() + ORDER_WAIT_MAX;
        let source_name = batch.source.clone();
        let mut held = false;
        loop {
            let notified = self.link_signals.merged.notified();
            let merged = match self.reader.replication() {
                Ok((state, _)) => state.merged.get(source_name.as_str()).copied().unwrap_or(0),
                Err(e) => return Err(PeerError::Internal(e.to_string())),
            };
            let queued = self.link_signals.queued.lock().expect("queued lock").get(&source_name).copied().unwrap_or(0);
            let in_order = batch.from_seq <= merged.max(queued) + 1;
            if in_order || tokio::time::Instant::now() >= deadline {
                if held {
                    let labels = crate::metrics::HeldLabels {
                        source: source_name.clone(),
                        destination: self.spec.region.to_string(),
                        outcome: if in_order { "in_order" } else { "timed_out" }.into(),
                    };
                    self.metrics.replication_order_held.get_or_create(&labels).inc();
                }
                break;
            }
            held = true;
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(20)),
                notified,
            )
            .await;
        }
        if self.raft.metrics().borrow().state != openraft::ServerState::Leader {
            return Err(PeerError::NotLeader { leader: self.leader_hint() });
        }
        let upto = batch.upto_seq;
        let cmd = CommandV1::ApplyRemoteAt {
            source: batch.source,
            from_seq: batch.from_seq,
            upto_seq: batch.upto_seq,
            fresh_ms: batch.fresh_ms,
            changes: batch.changes,
        };
        let answer = {
            // Queue and record under one lock, so two batches cannot queue out of order.
            let _order = self.link_signals.queue_lock.lock().await;
            let answer = self.enqueue(cmd, 0).await.map_err(to_peer)?;
            let mut q = self.link_signals.queued.lock().expect("queued lock");
            let e = q.entry(source_name.clone()).or_default();
            *e = (*e).max(upto);
            answer
        };
        self.link_signals.merged.notify_waiters();
        let result = Self::answer_of(answer).await.map_err(to_peer);
        if !matches!(result, Ok(CommandResult::Remote { .. })) {
            // Not merged: what was queued is no guide any more; the merged mark is.
            self.link_signals.queued.lock().expect("queued lock").remove(&source_name);
        }
        self.link_signals.merged.notify_waiters();
        let result = result?;
        // Visible here now: how long after the source stamped each change.
        let now = self.clock.now_ms();
        let labels = LinkLabels { source: source.to_string(), destination: self.spec.region.to_string() };
        let h = self.metrics.replication_apply_lag.get_or_create(&labels);
        for stamp in stamps {
            h.observe(now.saturating_sub(stamp) as f64 / 1000.0);
        }
        Ok(result)
    }
}
