//! Cross-region links (docs/replication.md#links). On each region's leader, one shipper per destination
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

pub(crate) mod receiver;
pub(crate) mod shipper;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_core::{DatasetName, Key, NodeId, RegionId, Topology};
use meridian_raft::command::{Change, CommandV1, MergeRule};
use meridian_raft::{CommandResult, StoredObject};
use tokio::sync::{oneshot, Notify};

use self::receiver::Order;
use self::shipper::{CursorStep, Departure, Pipeline, Returned};
use crate::error::{to_peer_error, LocalError, NodeError};
use crate::limits::{
    LINK_BATCH_BYTES_MAX, LINK_BATCH_ENTRIES_MAX, ORDER_POLL, ORDER_WAIT_MAX, PIPELINE_MAX, SCAN_PACE_SLEEP_MAX,
    SCAN_PAGE, STATUS_TIMEOUT,
};
use crate::metrics::{DatasetLinkLabels, DeferralLabels, LinkLabels, ShadowLabels};
use crate::peer::{PeerError, PeerRequestV1, PeerResponseV1, RepairBatch, ShipBatch};
use crate::policy::ActivePolicy;
use crate::supervisor::{StopSignal, Supervisor};
use crate::traffic::{Candidate, Deferral, LinkTraffic};
use crate::Deps;
use meridian_policy::units::Dur;
use meridian_policy::Schedule;

/// Rung when a local write commits: every shipper subscribed wakes and looks at the outbox.
#[derive(Default)]
pub(crate) struct CommitBell {
    wakes: Mutex<Vec<Arc<Notify>>>,
}

impl CommitBell {
    pub(crate) fn subscribe(&self) -> Arc<Notify> {
        let wake = Arc::new(Notify::new());
        self.wakes.lock().expect("bell lock").push(wake.clone());
        wake
    }

    pub(crate) fn ring(&self) {
        for w in self.wakes.lock().expect("bell lock").iter() {
            w.notify_one();
        }
    }
}

/// The links component: this region's shippers (one per destination, on the leader) and the
/// receiver of other regions' batches.
pub struct Links {
    deps: Deps,
    supervisor: Arc<Supervisor>,
    commits: Arc<CommitBell>,
    topology: Arc<Topology>,
    here: RegionId,
    id: NodeId,
    /// Bytes per second each link may send (0: no limit).
    link_rate: u64,
    signals: LinkSignals,
}

/// Signals between the receiver and the shippers.
#[derive(Default)]
struct LinkSignals {
    /// Notified when this node merged a batch from another region.
    merged: tokio::sync::Notify,
    /// Per source region: the highest range end queued for this node's log (the leader's).
    queued: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Held while a batch is queued and recorded, so batches queue in range order.
    queue_lock: tokio::sync::Mutex<()>,
    /// Each shipper's latest report, by destination.
    reports: std::sync::Mutex<std::collections::BTreeMap<String, crate::peer::LinkReport>>,
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

/// One shipper's pipeline and the I/O it waits on: the batches that came back, and the
/// cursor proposal in flight. The shipper does not wait for that proposal: the destination's
/// acknowledgement is what lets the next batch go, and a cursor persisted late only costs a
/// resend after a leader change (the destination skips what it merged).
#[derive(Default)]
struct InFlight {
    pipe: Pipeline,
    completed: Vec<Returned>,
    persisting: Option<oneshot::Receiver<Result<CommandResult, NodeError>>>,
}

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
    fn report_queue(&mut self, node: &Links, dest: &RegionId, waiting: &[(&Candidate, Deferral)], now_ms: u64) {
        let (source, destination) = (node.here.to_string(), dest.to_string());
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
            node.deps.metrics.replication_queued_changes.get_or_create(&l).set(0);
            node.deps.metrics.replication_queued_bytes.get_or_create(&l).set(0);
            node.deps.metrics.replication_lag_seconds.get_or_create(&l).set(0.0);
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
            node.deps.metrics.replication_queued_changes.get_or_create(&l).set(n);
            node.deps.metrics.replication_queued_bytes.get_or_create(&l).set(bytes);
            node.deps.metrics.replication_lag_seconds.get_or_create(&l).set(age as f64 / 1000.0);
            self.reported.insert(d.to_owned());
        }
        for reason in [Deferral::Schedule, Deferral::Rate, Deferral::Congestion] {
            let l = DeferralLabels {
                source: source.clone(),
                destination: destination.clone(),
                reason: reason.as_str().into(),
            };
            node.deps.metrics.replication_deferred.get_or_create(&l).set(per_reason.get(&reason).copied().unwrap_or(0));
        }
        if let Some(rtt) = self.traffic.health.rtt_ms {
            let l = LinkLabels { source, destination };
            node.deps.metrics.replication_rtt_seconds.get_or_create(&l).set(rtt / 1000.0);
            node.deps.metrics.replication_congested.get_or_create(&l).set(i64::from(self.traffic.health.congested()));
        }
    }
}

/// The epoch of the active entry, 0 without one.
pub(crate) fn epoch_of(active: Option<&ActivePolicy>) -> u64 {
    active.map_or(0, |a| a.entry.epoch)
}

impl Links {
    pub(crate) fn new(deps: Deps, supervisor: Arc<Supervisor>, commits: Arc<CommitBell>, link_rate: u64) -> Links {
        let r = &deps.region;
        let (here, id, topology) = (r.spec().region.clone(), r.spec().id, r.topology().clone());
        let signals = LinkSignals::default();
        Links { deps, supervisor, commits, topology, here, id, link_rate, signals }
    }

    /// Start one shipper per destination region. Each runs only while this node leads its
    /// region, and stops with the node. A shipper keeps up to [`PIPELINE_MAX`] batches in
    /// flight (the destination merges them in range order), wakes as soon as a local write
    /// commits, and otherwise looks every [`LINK_TICK`].
    pub(crate) fn start(self: &Arc<Self>) {
        let destinations: Vec<RegionId> =
            self.topology.regions().iter().map(|r| r.name.clone()).filter(|r| *r != self.here).collect();
        for dest in destinations {
            let link = LinkState::new((self.link_rate > 0).then_some(self.link_rate), self.deps.clock.now_ms());
            let wake = self.commits.subscribe();
            let stop = self.supervisor.stop_signal();
            self.supervisor.spawn_worker("link-shipper", ship(Arc::downgrade(self), dest, link, wake, stop));
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
                    self.deps.metrics.cross_region_bytes.get_or_create(&labels).get()
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
        self.signals.reports.lock().expect("reports lock").insert(dest.to_string(), report);
    }

    /// A failed attempt: the pipeline backs off and goes back to the cursor; counted.
    fn note_failure(&self, dest: &RegionId, pipe: &mut Pipeline, e: &NodeError) {
        let restarted = pipe.fail(e.to_string());
        self.count_failures(dest, u64::from(restarted), std::slice::from_ref(&e.to_string()));
    }

    fn count_failures(&self, dest: &RegionId, restarts: u64, errors: &[String]) {
        let labels = self.link_labels(dest);
        self.deps.metrics.replication_restarts.get_or_create(&labels).inc_by(restarts);
        self.deps.metrics.replication_errors.get_or_create(&labels).inc_by(errors.len() as u64);
        for e in errors {
            tracing::debug!(destination = %dest, error = %e, "link attempt failed");
        }
    }

    /// Account for the batches that came back: move the cursor to the highest acknowledged
    /// range, or start again from the cursor after a failure or a gap.
    async fn settle(self: &Arc<Self>, dest: &RegionId, link: &mut LinkState, io: &mut InFlight) {
        let labels = self.link_labels(dest);
        let settled = io.pipe.settle(std::mem::take(&mut io.completed));
        for seq in &settled.unsent_early {
            link.early_sent.remove(seq);
        }
        for &(rtt_ms, bytes, shipped, withheld) in &settled.merged {
            link.traffic.health.observe(rtt_ms, bytes);
            self.deps.metrics.replication_shipped.get_or_create(&labels).inc_by(shipped);
            self.deps.metrics.replication_withheld.get_or_create(&labels).inc_by(withheld);
            self.deps.metrics.replication_batches.get_or_create(&labels).inc();
        }
        self.count_failures(dest, settled.restarts, &settled.errors);
        if let Some(rx) = io.persisting.as_mut() {
            let outcome = match rx.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => None,
                Ok(r) => Some(r.map(|_| ())),
                Err(oneshot::error::TryRecvError::Closed) => {
                    Some(Err(NodeError::Internal("the cursor proposal was dropped".into())))
                }
            };
            if let Some(outcome) = outcome {
                io.persisting = None;
                if let Err(e) = outcome {
                    self.note_failure(dest, &mut io.pipe, &e);
                }
            }
        }
        let cursor = match self.deps.region.reader().replication() {
            Ok((state, _)) => state.cursors.get(dest.as_str()).copied().unwrap_or(0),
            Err(_) => return,
        };
        let step = io.pipe.cursor_step(settled.gap, cursor, io.persisting.is_some());
        match step {
            CursorStep::MoveBack(g) => {
                if let Some(h) = io.persisting.take() {
                    let _ = h.await;
                }
                let cmd = CommandV1::SetCursor { destination: dest.to_string(), upto_seq: g };
                if let Err(e) = self.propose_link_command(cmd).await {
                    self.note_failure(dest, &mut io.pipe, &e);
                    return;
                }
                io.pipe.moved_back(g);
            }
            CursorStep::Persist(acked) => {
                let (node, cmd) =
                    (self.clone(), CommandV1::SetCursor { destination: dest.to_string(), upto_seq: acked });
                let (tx, rx) = oneshot::channel();
                if self.supervisor.spawn_job("link-cursor", async move {
                    let _ = tx.send(node.propose_link_command(cmd).await);
                }) {
                    io.persisting = Some(rx);
                }
            }
            CursorStep::Stay => {}
        }
        let acked = io.pipe.acked_through(step, cursor);
        link.early_sent.retain(|seq, _| *seq > acked);
        if let Ok((_, region_seq)) = self.deps.region.reader().replication() {
            self.deps
                .metrics
                .replication_lag_changes
                .get_or_create(&labels)
                .set(region_seq.saturating_sub(acked) as i64);
        }
    }

    /// This node's view of its region's replication state.
    pub(crate) fn local_replication(&self) -> Result<crate::peer::RegionReplication, NodeError> {
        let (state, region_seq) =
            self.deps.region.reader().replication().map_err(|e| NodeError::Storage(e.to_string()))?;
        Ok(crate::peer::RegionReplication {
            node: self.id,
            region_seq,
            cursors: state.cursors.into_iter().collect(),
            merged: state.merged.into_iter().collect(),
            received: state.received.into_iter().collect(),
            repaired: state.repaired.into_iter().collect(),
            backfilled: state.backfilled.into_iter().collect(),
            purged: state.purged,
            outbox_trimmed: state.outbox_trimmed,
            epoch: epoch_of(self.deps.policy.active().as_deref()),
            links: if self.deps.region.is_leader() {
                self.signals.reports.lock().expect("reports lock").values().cloned().collect()
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
                if n.id == self.id {
                    return self.local_replication().map_err(|e| format!("node {}: {e}", n.id));
                }
                match self.deps.transport.call(n.id, PeerRequestV1::ReplicationState, STATUS_TIMEOUT).await {
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
        LinkLabels { source: self.here.to_string(), destination: dest.to_string() }
    }

    /// Decide this round for `dest`: a backfill or catch-up scan (run here, with nothing in
    /// flight), nothing, or the next batch after what was last sent.
    async fn prepare_round(&self, dest: &RegionId, link: &mut LinkState, pipe: &Pipeline) -> Result<Round, NodeError> {
        let storage = |e: meridian_raft::StorageReadError| NodeError::Storage(e.to_string());
        // Taken before the region sequence is read: every write committed before this instant
        // is at or below that sequence, so a range reaching it is fresh as of this instant.
        let read_at = self.deps.clock.now_ms();
        let (state, region_seq) = self.deps.region.reader().replication().map_err(storage)?;
        let cursor = state.cursors.get(dest.as_str()).copied().unwrap_or(0);
        self.deps.policy.refresh()?;
        let active = self.deps.policy.active();
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
        let from = pipe.next_from(cursor);
        if from < state.outbox_trimmed {
            if !idle {
                return Ok(Round::Idle);
            }
            self.catch_up(dest, active.as_deref(), cursor, region_seq, read_at, link).await?;
            return Ok(Round::Scanned);
        }
        let cursor = from;
        let entries = self.deps.region.reader().outbox_after(cursor, LINK_BATCH_ENTRIES_MAX).map_err(storage)?;
        // Writes that never enter the outbox (reserved namespaces) still take sequences: an
        // empty batch carries the range past them, so the destination's "merged up to" and
        // this link's lag reach the region's last write.
        if entries.is_empty() && region_seq <= cursor {
            link.report_queue(self, dest, &[], self.deps.clock.now_ms());
            return Ok(self.heartbeat(link, idle, cursor, epoch, read_at, true));
        }
        // What may go: this region's own versions the placement lets `dest` hold.
        let here = self.here.clone();
        let mut withheld = 0u64;
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut objects: Vec<Change> = Vec::new();
        for (seq, entry) in &entries {
            let Some(obj) = self.deps.region.reader().get(&entry.dataset, &entry.key).map_err(storage)? else {
                continue;
            };
            // Each write of this region under its own sequence, with whatever it was merged
            // with since: a key written here again later ships under the later entry.
            if obj.vv.get(&here) != *seq {
                continue;
            }
            let placement = self.deps.policy.placement_of_object(active.as_deref(), &entry.dataset, &entry.key, &obj);
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
                seq: *seq,
                dataset: entry.dataset.clone(),
                bytes: (entry.key.len() + obj.payload_len()) as u64,
                written_ms: obj.version.hlc.wall_ms(),
                schedule: l.map_or(Schedule::Continuous, |l| l.schedule),
                phase: l.map_or(Dur(0), |l| l.phase),
                rate: l.and_then(|l| l.rate),
                max_lag: l.and_then(|l| l.max_lag),
            });
            objects.push(Change {
                dataset: entry.dataset.clone(),
                key: entry.key.clone(),
                rule: crate::policy::merge_rule(placement.conflict),
                object: obj,
            });
        }
        let now = self.deps.clock.now_ms();
        let plan = link.traffic.plan(&candidates, now);
        let formed = shipper::form_batch(&candidates, &plan, &objects, &mut link.early_sent);
        for &i in &formed.given_back {
            link.traffic.give_back(&candidates[i]);
        }
        let last_read = entries.last().map_or(cursor, |(s, _)| *s);
        let full = shipper::more_after(formed.upto, entries.len());
        let upto = shipper::range_end(formed.upto, entries.len(), last_read, region_seq);
        let shipper::Formed { changes, early, bytes, deferred, .. } = formed;
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
            e.1 += (c.key.len() + c.object.payload_len()) as u64;
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
        if !shipper::heartbeat_due(idle, read_at, link.last_heartbeat_ms) {
            return Round::Idle;
        }
        link.last_heartbeat_ms = read_at;
        let batch = ShipBatch {
            source: self.here.to_string(),
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
        Ok(self.deps.transport.call_region(dest, || PeerRequestV1::ShipBatch(batch.clone()), unpack, true).await?.0)
    }

    /// Propose a link's bookkeeping (cursor, backfill mark) to this region's group.
    async fn propose_link_command(&self, cmd: CommandV1) -> Result<CommandResult, NodeError> {
        self.deps.proposer.propose_if_leader(cmd).await.map_err(LocalError::into_node_error)
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
        if active.shadow(&ds, &k).is_none() {
            return;
        }
        let origin = &obj.version.region;
        let would = self
            .deps
            .policy
            .shadow_placement(active, &ds, &k, Some(origin), Some(origin))
            .is_some_and(|p| p.holds_copy(dest));
        if would != allowed {
            let labels = ShadowLabels {
                source: self.here.to_string(),
                destination: dest.to_string(),
                outcome: if would { "would_ship" } else { "would_withhold" }.into(),
            };
            self.deps.metrics.replication_shadow.get_or_create(&labels).inc();
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
        let mut batch: Vec<Change> = Vec::new();
        let mut bytes = 0usize;
        let mut sent = 0u64;
        loop {
            let page =
                self.deps.region.reader().scan(None, after.as_ref().map(|(d, k)| (d.as_str(), k.as_str())), SCAN_PAGE);
            let page = page.map_err(storage)?;
            let last_page = page.len() < SCAN_PAGE;
            for (dataset, key, obj) in page {
                after = Some((dataset.clone(), key.clone()));
                // The newest write of this region the object carries.
                let seq = obj.vv.get(&self.here);
                if seq == 0 || seq <= lo || hi.is_some_and(|h| seq > h) {
                    continue;
                }
                let allowed = self.deps.policy.placement_allows(active, dest, &dataset, &key, &obj);
                if skip.is_none() {
                    // A catch-up decides for each change as the outbox path would.
                    self.count_shadow(active, dest, &dataset, &key, &obj, allowed);
                }
                if !allowed || self.deps.policy.placement_allows(skip, dest, &dataset, &key, &obj) {
                    continue;
                }
                bytes += obj.payload_len() + key.len();
                let rule = self
                    .deps
                    .policy
                    .placement_of_object(active, &dataset, &key, &obj)
                    .map_or(MergeRule::Lww, |p| crate::policy::merge_rule(p.conflict));
                batch.push(Change { dataset, key, object: obj, rule });
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
        self.deps.metrics.replication_backfilled.get_or_create(&self.link_labels(dest)).inc_by(sent);
        Ok(sent)
    }

    /// Wait until the link's rate limit lets `bytes` go, then take them (scans ignore
    /// schedules, but not the link's rate limit).
    async fn pace(&self, link: &mut LinkState, bytes: u64) {
        loop {
            let wait = link.traffic.scan_wait_ms(bytes, self.deps.clock.now_ms());
            if wait == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(wait).min(SCAN_PACE_SLEEP_MAX)).await;
        }
        link.traffic.scan_take(bytes);
    }

    async fn send_repair(&self, dest: &RegionId, epoch: u64, changes: Vec<Change>) -> Result<u64, NodeError> {
        let n = changes.len() as u64;
        let batch = RepairBatch { source: self.here.to_string(), epoch, changes };
        let unpack = |r| match r {
            PeerResponseV1::Repaired(r) => Some(r),
            _ => None,
        };
        self.deps.transport.call_region(dest, || PeerRequestV1::Repair(batch.clone()), unpack, true).await?;
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
            Some(epoch) => self.deps.policy.entry_at_epoch(epoch)?,
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
        self.deps.metrics.replication_catch_ups.get_or_create(&self.link_labels(dest)).inc();
        tracing::warn!(
            destination = %dest, cursor,
            "link fell behind the bounded outbox; catching up by a filtered scan of the data"
        );
        let sent = self.scan_ship(dest, active, cursor, None, None, link).await?;
        let batch = ShipBatch {
            source: self.here.to_string(),
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
        let (answer, _) =
            self.deps.transport.call_region(dest, || PeerRequestV1::ShipBatch(batch.clone()), unpack, true).await?;
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
    fn admit(&self, source: &str, epoch: u64, changes: &mut Vec<Change>) -> Result<RegionId, PeerError> {
        self.deps.region.lead_or_refuse().map_err(LocalError::into_peer_error)?;
        let source = receiver::check_source(source, &self.topology, &self.here)?;
        self.deps.policy.refresh().map_err(to_peer_error)?;
        let active = self.deps.policy.active();
        receiver::check_epoch(epoch, epoch_of(active.as_deref()))?;
        let refused = receiver::keep_allowed(changes, &source, |c| {
            self.deps.policy.merge_rule_if_allowed(active.as_deref(), &self.here, &c.dataset, &c.key, &c.object)
        });
        if refused > 0 {
            let labels = LinkLabels { source: source.to_string(), destination: self.here.to_string() };
            self.deps.metrics.replication_refused.get_or_create(&labels).inc_by(refused);
            tracing::warn!(source = %source, refused, "refused changes this region's policy does not let it hold");
        }
        Ok(source)
    }

    /// Changes a catch-up or backfill scan sent: merged here if newer than the copy held.
    pub(crate) async fn receive_repair(&self, mut batch: RepairBatch) -> Result<CommandResult, PeerError> {
        self.admit(&batch.source, batch.epoch, &mut batch.changes)?;
        let cmd = CommandV1::RepairChanges { source: batch.source, changes: batch.changes };
        match self.deps.proposer.propose_if_leader(cmd).await {
            Ok(r) => Ok(r),
            Err(LocalError::NotLeader(leader)) => Err(PeerError::NotLeader { leader }),
            Err(LocalError::Other(e)) => Err(to_peer_error(e)),
        }
    }

    /// A batch from another region's link: drop what this region's policy copy forbids it to
    /// hold, then merge the rest through this region's Raft group.
    pub(crate) async fn receive_batch(&self, mut batch: ShipBatch) -> Result<CommandResult, PeerError> {
        let source = self.admit(&batch.source, batch.epoch, &mut batch.changes)?;
        self.admit(&batch.source, batch.epoch, &mut batch.early)?;
        let stamps: Vec<u64> =
            batch.changes.iter().chain(&batch.early).map(|c| c.object.version.hlc.wall_ms()).collect();
        let to_peer = |e| match e {
            LocalError::NotLeader(leader) => PeerError::NotLeader { leader },
            LocalError::Other(e) => to_peer_error(e),
        };
        // Changes sent ahead of the range first: they are newer-only merges, so applying
        // them before (or without) the range is harmless.
        if !batch.early.is_empty() {
            let cmd = CommandV1::RepairChanges { source: batch.source.clone(), changes: batch.early };
            self.deps.proposer.propose_if_leader(cmd).await.map_err(to_peer)?;
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
            let notified = self.signals.merged.notified();
            let merged = match self.deps.region.reader().replication() {
                Ok((state, _)) => state.merged.get(source_name.as_str()).copied().unwrap_or(0),
                Err(e) => return Err(PeerError::Internal(e.to_string())),
            };
            let queued = self.signals.queued.lock().expect("queued lock").get(&source_name).copied().unwrap_or(0);
            let out_of_time = tokio::time::Instant::now() >= deadline;
            match receiver::order(batch.from_seq, merged, queued, held, out_of_time) {
                Order::Go { held: outcome } => {
                    if let Some(outcome) = outcome {
                        let labels = crate::metrics::HeldLabels {
                            source: source_name.clone(),
                            destination: self.here.to_string(),
                            outcome: outcome.into(),
                        };
                        self.deps.metrics.replication_order_held.get_or_create(&labels).inc();
                    }
                    break;
                }
                Order::Hold => {}
            }
            held = true;
            let _ = tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + ORDER_POLL), notified).await;
        }
        if !self.deps.region.is_leader() {
            return Err(PeerError::NotLeader { leader: self.deps.region.leader_hint() });
        }
        let upto = batch.upto_seq;
        let cmd = CommandV1::ApplyChanges {
            source: batch.source,
            from_seq: batch.from_seq,
            upto_seq: batch.upto_seq,
            fresh_ms: batch.fresh_ms,
            changes: batch.changes,
        };
        let answer = {
            // Queue and record under one lock, so two batches cannot queue out of order.
            let _order = self.signals.queue_lock.lock().await;
            let answer = self.deps.proposer.enqueue(cmd).await.map_err(to_peer)?;
            let mut q = self.signals.queued.lock().expect("queued lock");
            let e = q.entry(source_name.clone()).or_default();
            *e = (*e).max(upto);
            answer
        };
        self.signals.merged.notify_waiters();
        let result = answer.wait().await.map_err(to_peer);
        if !matches!(result, Ok(CommandResult::Remote { .. })) {
            // Not merged: what was queued is no guide any more; the merged mark is.
            self.signals.queued.lock().expect("queued lock").remove(&source_name);
        }
        self.signals.merged.notify_waiters();
        let result = result?;
        // Visible here now: how long after the source stamped each change.
        let now = self.deps.clock.now_ms();
        let labels = LinkLabels { source: source.to_string(), destination: self.here.to_string() };
        let h = self.deps.metrics.replication_apply_lag.get_or_create(&labels);
        for stamp in stamps {
            h.observe(now.saturating_sub(stamp) as f64 / 1000.0);
        }
        Ok(result)
    }
}

/// One link's shipper: rounds of settle, decide, send, until the node stops.
async fn ship(links: std::sync::Weak<Links>, dest: RegionId, mut link: LinkState, wake: Arc<Notify>, stop: StopSignal) {
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Returned>(PIPELINE_MAX * 2);
    let mut io = InFlight::default();
    let mut immediate = false;
    loop {
        if !immediate {
            let pause = io.pipe.pause(meridian_raft::rt::random_u64);
            tokio::select! {
                biased;
                _ = stop.raised() => return,
                _ = wake.notified(), if io.pipe.failures == 0 => {}
                Some(returned) = done_rx.recv() => io.completed.push(returned),
                _ = tokio::time::sleep(pause) => {}
            }
        }
        immediate = false;
        while let Ok(returned) = done_rx.try_recv() {
            io.completed.push(returned);
        }
        let Some(node) = links.upgrade() else { return };
        if stop.is_raised() {
            return;
        }
        node.settle(&dest, &mut link, &mut io).await;
        node.publish_link_report(&dest, &link, &io.pipe);
        if !node.deps.region.is_leader() {
            io.pipe.not_leading();
            continue;
        }
        match io.pipe.departure(link.traffic.health.rtt_ms, tokio::time::Instant::now()) {
            Departure::Go => {}
            Departure::WindowFull => {
                node.deps.metrics.replication_window_full.get_or_create(&node.link_labels(&dest)).inc();
                continue;
            }
            Departure::After(wait) => tokio::time::sleep(wait).await,
        }
        // Room for the send is reserved before the batch is formed: forming it takes tokens
        // and marks changes as sent ahead of the range, which a batch that never left would
        // leave stranded.
        let Some(slot) = node.supervisor.reserve_job() else {
            let e = NodeError::Unavailable { node: node.id, reason: "no room to start a send".into() };
            node.note_failure(&dest, &mut io.pipe, &e);
            continue;
        };
        match node.prepare_round(&dest, &mut link, &io.pipe).await {
            // Nothing to send and nothing outstanding: nothing is failing either.
            Ok(Round::Idle) if io.pipe.in_flight == 0 => io.pipe.quiet(),
            Ok(Round::Idle) => {}
            Ok(Round::Scanned) => {
                io.pipe.not_leading();
                immediate = true;
            }
            Ok(Round::Batch(b)) => {
                let (upto, bytes, more) = (b.batch.upto_seq, b.bytes, b.more);
                let (node2, dest2, tx) = (node.clone(), dest.clone(), done_tx.clone());
                let early: Vec<u64> = b.batch.early.iter().map(|c| c.object.vv.get(&node.here)).collect();
                node.supervisor.spawn_reserved(slot, "link-batch", async move {
                    let sent_at = tokio::time::Instant::now();
                    let result = node2.send_batch(&dest2, &b.batch).await;
                    let rtt_ms = sent_at.elapsed().as_secs_f64() * 1000.0;
                    let returned = match result {
                        Ok(CommandResult::Remote { merged_upto, .. }) => Returned::Merged {
                            upto: merged_upto,
                            rtt_ms,
                            bytes: b.bytes,
                            shipped: b.shipped,
                            withheld: b.withheld,
                        },
                        Ok(CommandResult::RemoteGap { merged_upto }) => {
                            Returned::Gap { merged_upto, bytes: b.bytes, early }
                        }
                        Ok(other) => Returned::Failed {
                            reason: format!("unexpected answer to a batch: {other:?}"),
                            bytes: b.bytes,
                            early,
                        },
                        Err(e) => Returned::Failed { reason: e.to_string(), bytes: b.bytes, early },
                    };
                    let _ = tx.send(returned).await;
                });
                io.pipe.departed(upto, bytes, tokio::time::Instant::now());
                immediate = more;
            }
            Err(e) => node.note_failure(&dest, &mut io.pipe, &e),
        }
    }
}
