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
//!
//! Links ship continuously; schedules, rate limits and priorities come next.

use std::sync::Arc;
use std::time::Duration;

use meridian_core::{DatasetName, Key, RegionId};
use meridian_policy::{evaluate, ObjectAttributes};
use meridian_raft::command::{CommandV1, RemoteChange};
use meridian_raft::{CommandResult, StoredObject};

use crate::metrics::{LinkLabels, ShadowLabels};
use crate::peer::{PeerError, PeerRequestV1, PeerResponseV1, RepairBatch, ShipBatch};
use crate::policy::ActivePolicy;
use crate::{LocalError, Node, NodeError};

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

/// The epoch of the active entry, 0 without one.
pub(crate) fn epoch_of(active: Option<&ActivePolicy>) -> u64 {
    active.map_or(0, |a| a.entry.epoch)
}

impl Node {
    /// Start one shipper per destination region. Each runs only while this node leads its
    /// region, and stops with the node.
    pub(crate) fn spawn_links(self: &Arc<Self>) {
        let destinations: Vec<RegionId> =
            self.topology.regions().iter().map(|r| r.name.clone()).filter(|r| *r != self.spec.region).collect();
        for dest in destinations {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut failures: u32 = 0;
                loop {
                    let pause = if failures == 0 {
                        LINK_TICK
                    } else {
                        let cap = LINK_BACKOFF_MAX.as_millis() as u64;
                        let base = (LINK_TICK.as_millis() as u64) << failures.min(8);
                        let ms = base.min(cap);
                        Duration::from_millis(ms / 2 + rand::random::<u64>() % (ms / 2 + 1))
                    };
                    tokio::time::sleep(pause).await;
                    let Some(node) = weak.upgrade() else { return };
                    if node.links_stopped() {
                        return;
                    }
                    if node.raft.metrics().borrow().state != openraft::ServerState::Leader {
                        failures = 0;
                        continue;
                    }
                    match node.ship_once(&dest).await {
                        // A full batch: there is more; go again without waiting.
                        Ok(true) => {
                            failures = 0;
                            continue;
                        }
                        Ok(false) => failures = 0,
                        Err(e) => {
                            failures = failures.saturating_add(1);
                            node.metrics.replication_errors.get_or_create(&node.link_labels(&dest)).inc();
                            tracing::debug!(destination = %dest, error = %e, "link attempt failed");
                        }
                    }
                }
            });
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
        })
    }

    /// Every region's replication state, each as the first of its nodes that answers has it.
    pub async fn replication_view(&self) -> Vec<(RegionId, Result<crate::peer::RegionReplication, String>)> {
        let regions: Vec<RegionId> = self.topology.regions().iter().map(|r| r.name.clone()).collect();
        let asks = regions.into_iter().map(|region| async move {
            if region == self.spec.region {
                return (region, self.local_replication().map_err(|e| e.to_string()));
            }
            let mut last = String::from("no nodes");
            for n in self.topology.region_nodes(&region) {
                match self.transport.call(n.id, PeerRequestV1::ReplicationState, crate::STATUS_TIMEOUT).await {
                    Ok(PeerResponseV1::ReplicationState(Ok(r))) => return (region, Ok(r)),
                    Ok(PeerResponseV1::ReplicationState(Err(e))) => last = format!("node {}: {e}", n.id),
                    Ok(_) => last = format!("node {} sent an unexpected reply", n.id),
                    Err(e) => last = format!("node {}: {e}", n.id),
                }
            }
            (region, Err(last))
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
        let Some(active) = active else { return false };
        let (Ok(ds), Ok(k)) = (DatasetName::new(dataset), Key::new(key)) else { return false };
        let Some((policy, _)) = active.governing(&ds, &k) else { return false };
        // A user-homed key without a prefix lives where it was written: its origin region.
        let origin = obj.version.region.clone();
        let attrs =
            ObjectAttributes { home: Some(origin.clone()), origin: Some(origin), ..ObjectAttributes::default() };
        match evaluate(policy, &self.topology, &ds, &k, &attrs) {
            Ok(p) => p.holds_copy(region),
            Err(_) => false,
        }
    }

    /// Ship one batch to `dest`. `Ok(true)` when the batch was full (more may be waiting).
    async fn ship_once(&self, dest: &RegionId) -> Result<bool, NodeError> {
        let storage = |e: meridian_raft::StorageReadError| NodeError::Storage(e.to_string());
        let (state, region_seq) = self.reader.replication().map_err(storage)?;
        let cursor = state.cursors.get(dest.as_str()).copied().unwrap_or(0);
        let labels = self.link_labels(dest);
        self.metrics.replication_lag_changes.get_or_create(&labels).set(region_seq.saturating_sub(cursor) as i64);
        self.refresh_policy()?;
        let active = self.active_policy();
        let epoch = epoch_of(active.as_deref());
        // A new policy entry may let `dest` hold what earlier ones withheld: backfill that
        // before shipping anything under it.
        if let Some(active) = active.as_deref() {
            let done = state.backfilled.get(dest.as_str()).copied();
            if done != Some(epoch) {
                self.backfill(dest, active, done, cursor).await?;
                self.propose_link_command(CommandV1::SetBackfilled { destination: dest.to_string(), epoch }).await?;
                return Ok(true);
            }
        }
        if cursor < state.outbox_trimmed {
            self.catch_up(dest, active.as_deref(), cursor, region_seq).await?;
            return Ok(true);
        }
        let entries = self.reader.outbox_after(cursor, LINK_BATCH_ENTRIES_MAX).map_err(storage)?;
        // Writes that never enter the outbox (reserved namespaces) still take sequences: an
        // empty batch carries the range past them, so the destination's "merged up to" and
        // this link's lag reach the region's last write.
        if entries.is_empty() && region_seq <= cursor {
            return Ok(false);
        }
        let mut changes = Vec::new();
        let mut upto = cursor;
        let mut bytes = 0usize;
        let mut withheld = 0u64;
        let mut cut_short = false;
        for (seq, entry) in &entries {
            upto = *seq;
            let Some(obj) = self.reader.get(&entry.dataset, &entry.key).map_err(storage)? else { continue };
            // Only this region's own versions: a newer version merged from elsewhere is
            // shipped by its own origin's link.
            if obj.version.region != self.spec.region {
                continue;
            }
            let allowed = self.placement_allows(active.as_deref(), dest, &entry.dataset, &entry.key, &obj);
            self.count_shadow(active.as_deref(), dest, &entry.dataset, &entry.key, &obj, allowed);
            if !allowed {
                withheld += 1;
                continue;
            }
            bytes += obj.value.as_ref().map_or(0, Vec::len) + entry.key.len();
            changes.push(RemoteChange {
                dataset: entry.dataset.clone(),
                key: entry.key.clone(),
                version: obj.version,
                value: obj.value,
            });
            if bytes >= LINK_BATCH_BYTES_MAX {
                cut_short = true;
                break;
            }
        }
        let full = entries.len() >= LINK_BATCH_ENTRIES_MAX || cut_short;
        if !full {
            // Everything up to the region's last write was read (`region_seq` was read before
            // the outbox, so no entry at or below it can be missing).
            upto = upto.max(region_seq);
        }
        let shipped = changes.len() as u64;
        let batch = ShipBatch {
            source: self.spec.region.to_string(),
            from_seq: cursor + 1,
            upto_seq: upto,
            policy: active.as_ref().map(|a| a.entry.version.clone()),
            epoch,
            changes,
        };
        let unpack = |r| match r {
            PeerResponseV1::Shipped(r) => Some(r),
            _ => None,
        };
        // Idempotent: the destination merges by source range, so any failure may be resent.
        let (answer, _) = self.call_region(dest, || PeerRequestV1::ShipBatch(batch.clone()), unpack, true).await?;
        let acknowledged = match answer {
            CommandResult::Remote { merged_upto, .. } => merged_upto,
            // The destination has less than the cursor says (it lost state): resend from there.
            CommandResult::RemoteGap { merged_upto } => merged_upto,
            other => return Err(NodeError::Internal(format!("unexpected answer to a batch: {other:?}"))),
        };
        self.propose_link_command(CommandV1::SetCursor { destination: dest.to_string(), upto_seq: acknowledged })
            .await?;
        self.metrics.replication_shipped.get_or_create(&labels).inc_by(shipped);
        self.metrics.replication_withheld.get_or_create(&labels).inc_by(withheld);
        self.metrics.replication_batches.get_or_create(&labels).inc();
        self.metrics.replication_lag_changes.get_or_create(&labels).set(region_seq.saturating_sub(acknowledged) as i64);
        Ok(full)
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
                    sent += self.send_repair(dest, epoch, std::mem::take(&mut batch)).await?;
                    bytes = 0;
                }
            }
            if last_page {
                break;
            }
        }
        if !batch.is_empty() {
            sent += self.send_repair(dest, epoch, batch).await?;
        }
        self.metrics.replication_backfilled.get_or_create(&self.link_labels(dest)).inc_by(sent);
        Ok(sent)
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

    /// Backfill after the policy entry changed: everything up to the cursor that `active`
    /// lets `dest` hold and the entry last backfilled did not (all of it if that entry is
    /// unknown). What lies past the cursor ships through the outbox under `active`.
    async fn backfill(
        &self,
        dest: &RegionId,
        active: &ActivePolicy,
        done: Option<u64>,
        cursor: u64,
    ) -> Result<(), NodeError> {
        let previous = match done {
            Some(epoch) => self.entry_at_epoch(epoch)?,
            None => None,
        };
        let sent = self.scan_ship(dest, Some(active), 0, Some(cursor), previous.as_ref()).await?;
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
    ) -> Result<(), NodeError> {
        self.metrics.replication_catch_ups.get_or_create(&self.link_labels(dest)).inc();
        tracing::warn!(
            destination = %dest, cursor,
            "link fell behind the bounded outbox; catching up by a filtered scan of the data"
        );
        let sent = self.scan_ship(dest, active, cursor, None, None).await?;
        let batch = ShipBatch {
            source: self.spec.region.to_string(),
            from_seq: cursor + 1,
            upto_seq: region_seq,
            policy: active.map(|a| a.entry.version.clone()),
            epoch: epoch_of(active),
            changes: Vec::new(),
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
        self.admit(&batch.source, batch.epoch, &mut batch.changes)?;
        let cmd = CommandV1::ApplyRemote {
            source: batch.source,
            from_seq: batch.from_seq,
            upto_seq: batch.upto_seq,
            changes: batch.changes,
        };
        match self.propose_replication(cmd).await {
            Ok(r) => Ok(r),
            Err(LocalError::NotLeader(leader)) => Err(PeerError::NotLeader { leader }),
            Err(LocalError::Other(e)) => Err(crate::to_peer_error(e)),
        }
    }
}
