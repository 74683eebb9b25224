//! Anti-entropy, verification and purge (docs/replication.md#anti-entropy): what keeps every allowed copy equal
//! even if a message or a bug lost a change, proves that it is, and removes copies a policy
//! change no longer lets a region hold.
//!
//! - **Digests.** For a pair of regions (A, B), each side sums a hash of (dataset, key,
//!   version) over the objects it holds that the active placement lets *both* hold, into
//!   [`DIGEST_BUCKETS`] buckets by the hash's first byte. Equal sets give equal buckets on
//!   both sides whatever the scan order; tombstones count (a delete is a version too).
//!   Digests taken under different policy epochs are never compared.
//! - **Repair.** On each anti-entropy round a region's leader compares its digests with every
//!   other region's, lists the keys of the buckets that differ, fetches the objects the other
//!   side holds newer (the other side sends only what this region may hold) and merges them
//!   through its own Raft group as a [`CommandV1::Repair`]. Only changes the origin's link has
//!   already passed (at or below what this region merged from the origin) are divergences;
//!   newer ones are still on their way, held by a schedule or a rate limit, and pulling them
//!   would bypass both. Each side pulls what it lacks, so a round on both sides converges the
//!   pair.
//! - **Purge.** A copy the active placement no longer lets this region hold is removed, but
//!   only once a region that may hold it has it (its origin, or a region that merged the
//!   origin's sequence past it): a policy change never loses the last copy. Each purge is
//!   counted, logged, and recorded in the region's `_audit` namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use meridian_core::{RegionId, Version, VersionVector};
use meridian_raft::command::{Change, CommandV1};
use meridian_raft::{CommandResult, StoredObject};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use crate::error::{to_peer_error, LocalError, NodeError};
use crate::gateway::Gateway;
use crate::limits::{
    ANTI_ENTROPY_TICK, DIGEST_BUCKETS, DIGEST_ENTRIES_MAX, FETCH_BYTES_MAX, FETCH_KEYS_MAX, SCAN_PAGE,
};
use crate::links::{epoch_of, Links};
use crate::metrics::{DatasetLabels, LinkLabels};
use crate::peer::{DatasetDigest, PeerError, PeerRequestV1, PeerResponseV1, RegionDigest, WriteOp, WriteRequest};
use crate::policy::ActivePolicy;
use crate::Deps;
use meridian_core::Topology;
/// Namespace of the region's audit records.
pub const AUDIT_NAMESPACE: &str = "_audit";

/// The digest hash of one stored object: its name, the version a read answers with, and its
/// version vector (two copies with the same front version may have merged different writes).
fn object_hash(dataset: &str, key: &str, version: &Version, vv: &meridian_core::VersionVector) -> u64 {
    let mut h = Sha256::new();
    for part in [dataset.as_bytes(), key.as_bytes(), version.region.as_str().as_bytes()] {
        h.update(part);
        h.update([0xff]);
    }
    h.update(version.hlc.wall_ms().to_be_bytes());
    h.update(version.hlc.logical().to_be_bytes());
    h.update(version.seq.to_be_bytes());
    for (region, n) in vv.iter() {
        h.update(region.as_str().as_bytes());
        h.update([0xff]);
        h.update(n.to_be_bytes());
    }
    let d = h.finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// One pair of regions compared for one dataset.
#[derive(Debug, Clone, Serialize)]
pub struct DatasetVerdict {
    pub dataset: String,
    /// Objects each side holds that both may hold.
    pub count_a: u64,
    pub count_b: u64,
    pub equal: bool,
}

/// The comparison of two regions' copies.
#[derive(Debug, Clone, Serialize)]
pub struct PairVerdict {
    pub a: String,
    pub b: String,
    /// The per-dataset comparisons, or why the pair could not be compared.
    pub result: Result<Vec<DatasetVerdict>, String>,
}

/// The repair component: digests, anti-entropy rounds, purge passes and verification.
pub struct Repair {
    deps: Deps,
    links: Arc<Links>,
    gateway: Arc<Gateway>,
    topology: Arc<Topology>,
    here: RegionId,
    interval: Duration,
    /// A tombstone is kept at least this long (ms of this node's clock after its stamp).
    tombstone_grace_ms: u64,
}

/// Tombstones one collection pass considers at most.
const COLLECT_CANDIDATES_MAX: usize = 4096;

impl Repair {
    /// `interval`: how often a round runs on the leader.
    /// `interval`: how often a round runs on the leader.
    pub(crate) fn new(
        deps: Deps,
        links: Arc<Links>,
        gateway: Arc<Gateway>,
        interval: Duration,
        tombstone_grace_ms: u64,
    ) -> Repair {
        let (here, topology) = (deps.region.spec().region.clone(), deps.region.topology().clone());
        Repair { deps, links, gateway, topology, here, interval, tombstone_grace_ms }
    }

    /// Both regions may hold this object under `active`.
    fn shared_by(
        &self,
        active: Option<&ActivePolicy>,
        a: &RegionId,
        b: &RegionId,
        ds: &str,
        key: &str,
        obj: &StoredObject,
    ) -> bool {
        self.deps.policy.placement_allows(active, a, ds, key, obj)
            && self.deps.policy.placement_allows(active, b, ds, key, obj)
    }

    /// Visit every stored object (tombstones too) of `dataset`, or of every dataset.
    fn for_each_object(
        &self,
        dataset: Option<&str>,
        mut f: impl FnMut(&str, &str, &StoredObject),
    ) -> Result<(), NodeError> {
        let mut after: Option<(String, String)> = None;
        loop {
            let page = self
                .deps
                .region
                .reader()
                .scan(dataset, after.as_ref().map(|(d, k)| (d.as_str(), k.as_str())), SCAN_PAGE)
                .map_err(|e| NodeError::Storage(e.to_string()))?;
            let done = page.len() < SCAN_PAGE;
            for (ds, key, obj) in &page {
                f(ds, key, obj);
            }
            match page.into_iter().last() {
                Some((ds, key, _)) if !done => after = Some((ds, key)),
                _ => return Ok(()),
            }
        }
    }

    fn peer_region(with: &str, what: &str) -> Result<RegionId, PeerError> {
        RegionId::new(with).map_err(|_| PeerError::Protocol(format!("{what} for an invalid region {with:?}")))
    }

    fn lead_or_refuse(&self) -> Result<(), PeerError> {
        self.deps.region.lead_or_refuse().map_err(LocalError::into_peer_error)
    }

    /// This region's digests of what it and `with` may both hold.
    pub(crate) fn local_digest(&self, with: &RegionId) -> Result<RegionDigest, NodeError> {
        self.deps.policy.refresh()?;
        let active = self.deps.policy.active();
        let here = self.here.clone();
        let mut datasets: BTreeMap<String, DatasetDigest> = BTreeMap::new();
        self.for_each_object(None, |ds, key, obj| {
            if !self.shared_by(active.as_deref(), &here, with, ds, key, obj) {
                return;
            }
            let d = datasets.entry(ds.to_owned()).or_insert_with(|| DatasetDigest {
                dataset: ds.to_owned(),
                count: 0,
                buckets: vec![0; DIGEST_BUCKETS],
            });
            let h = object_hash(ds, key, &obj.version, &obj.vv);
            d.count += 1;
            let b = (h >> 56) as usize;
            d.buckets[b] = d.buckets[b].wrapping_add(h);
        })?;
        Ok(RegionDigest { epoch: epoch_of(active.as_deref()), datasets: datasets.into_values().collect() })
    }

    pub(crate) fn serve_digest(&self, with: &str) -> Result<RegionDigest, PeerError> {
        self.lead_or_refuse()?;
        let with = Self::peer_region(with, "a digest")?;
        self.local_digest(&with).map_err(to_peer_error)
    }

    /// Keys of `dataset` in `buckets` that this region and `with` may both hold, with their
    /// copies' version vectors.
    fn local_digest_entries(
        &self,
        with: &RegionId,
        dataset: &str,
        buckets: &[u8],
        limit: usize,
    ) -> Result<BTreeMap<String, VersionVector>, NodeError> {
        self.deps.policy.refresh()?;
        let active = self.deps.policy.active();
        let here = self.here.clone();
        let wanted: BTreeSet<u8> = buckets.iter().copied().collect();
        let mut out = BTreeMap::new();
        self.for_each_object(Some(dataset), |ds, key, obj| {
            if out.len() >= limit || !wanted.contains(&((object_hash(ds, key, &obj.version, &obj.vv) >> 56) as u8)) {
                return;
            }
            if self.shared_by(active.as_deref(), &here, with, ds, key, obj) {
                out.insert(key.to_owned(), obj.vv.clone());
            }
        })?;
        Ok(out)
    }

    pub(crate) fn serve_digest_entries(
        &self,
        with: &str,
        dataset: &str,
        buckets: &[u8],
        limit: u32,
    ) -> Result<Vec<(String, VersionVector)>, PeerError> {
        self.lead_or_refuse()?;
        let with = Self::peer_region(with, "digest entries")?;
        let limit = limit.min(DIGEST_ENTRIES_MAX) as usize;
        let entries = self.local_digest_entries(&with, dataset, buckets, limit).map_err(to_peer_error)?;
        Ok(entries.into_iter().collect())
    }

    /// The objects under `keys` that region `with` may hold (the others are left out: this
    /// is where residency is enforced for repairs).
    pub(crate) fn serve_fetch(
        &self,
        with: &str,
        dataset: &str,
        keys: &[String],
    ) -> Result<Vec<(String, StoredObject)>, PeerError> {
        self.lead_or_refuse()?;
        let with = Self::peer_region(with, "a fetch")?;
        if keys.len() > FETCH_KEYS_MAX {
            return Err(PeerError::Protocol(format!("a fetch names {} keys; at most {FETCH_KEYS_MAX}", keys.len())));
        }
        self.deps.policy.refresh().map_err(to_peer_error)?;
        let active = self.deps.policy.active();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for key in keys {
            // The answer stays inside a peer body: the keys past the bound are fetched again
            // next round (the asking side repairs what it got, and the digests still differ).
            if bytes >= FETCH_BYTES_MAX {
                break;
            }
            let obj = self.deps.region.reader().get(dataset, key).map_err(|e| PeerError::Internal(e.to_string()))?;
            if let Some(obj) =
                obj.filter(|o| self.deps.policy.placement_allows(active.as_deref(), &with, dataset, key, o))
            {
                bytes += obj.value.as_ref().map_or(0, Vec::len);
                out.push((key.clone(), obj));
            }
        }
        Ok(out)
    }

    /// `region`'s digests of what it and `with` may both hold, from its leader.
    async fn digest_in(&self, region: &RegionId, with: &RegionId) -> Result<RegionDigest, NodeError> {
        let unpack = |r| match r {
            PeerResponseV1::Digest(r) => Some(r),
            _ => None,
        };
        let req = || PeerRequestV1::Digest { with: with.to_string() };
        Ok(self.deps.transport.call_region(region, req, unpack, true).await?.0)
    }

    /// Compare every pair of regions' copies by digest (optionally one dataset).
    pub async fn verify(&self, dataset: Option<&str>) -> Vec<PairVerdict> {
        let regions: Vec<RegionId> = self.topology.regions().iter().map(|r| r.name.clone()).collect();
        let mut pairs = Vec::new();
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                pairs.push((a.clone(), b.clone()));
            }
        }
        let checks = pairs.into_iter().map(|(a, b)| async move {
            let (da, db) = futures::join!(self.digest_in(&a, &b), self.digest_in(&b, &a));
            let result = match (da, db) {
                (Ok(da), Ok(db)) if da.epoch != db.epoch => {
                    Err(format!("policy epochs differ ({a}: {}, {b}: {}); compare again shortly", da.epoch, db.epoch))
                }
                (Ok(da), Ok(db)) => Ok(compare(&da, &db, dataset)),
                (Err(e), _) => Err(format!("{a}: {e}")),
                (_, Err(e)) => Err(format!("{b}: {e}")),
            };
            PairVerdict { a: a.to_string(), b: b.to_string(), result }
        });
        futures::future::join_all(checks).await
    }

    /// The worker that runs anti-entropy rounds and purge passes on the region leader (the
    /// supervisor cancels it when the node stops).
    pub(crate) async fn run(self: Arc<Self>) {
        let mut purged_epoch: Option<u64> = None;
        let mut next_round = Instant::now() + self.interval;
        loop {
            tokio::time::sleep(ANTI_ENTROPY_TICK).await;
            if !self.deps.region.is_leader() {
                purged_epoch = None;
                continue;
            }
            let due = Instant::now() >= next_round;
            let epoch = epoch_of(self.deps.policy.active().as_deref());
            if due || purged_epoch != Some(epoch) {
                match self.purge_pass().await {
                    Ok(_) => purged_epoch = Some(epoch),
                    Err(e) => tracing::warn!(error = %e, "purge pass"),
                }
            }
            if !due {
                continue;
            }
            next_round = Instant::now() + self.interval;
            let others: Vec<RegionId> =
                self.topology.regions().iter().map(|r| r.name.clone()).filter(|r| *r != self.here).collect();
            for peer in others {
                match self.anti_entropy_with(&peer).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(peer = %peer, repaired = n, "anti-entropy repaired copies"),
                    Err(e) => tracing::debug!(peer = %peer, error = %e, "anti-entropy round"),
                }
            }
            match self.collect_pass().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(collected = n, "collected tombstones every region holds alike"),
                Err(e) => tracing::debug!(error = %e, "tombstone collection"),
            }
        }
    }

    /// One anti-entropy round against `peer`: pull every object it holds newer than this
    /// region's copy (or that this region lacks) among those both may hold. Copies repaired.
    pub(crate) async fn anti_entropy_with(&self, peer: &RegionId) -> Result<u64, NodeError> {
        let labels = LinkLabels { source: peer.to_string(), destination: self.here.to_string() };
        let mine = self.local_digest(peer)?;
        let theirs = self.digest_in(peer, &self.here).await?;
        self.deps.metrics.anti_entropy_rounds.get_or_create(&labels).inc();
        if mine.epoch != theirs.epoch {
            return Ok(0);
        }
        let mine: BTreeMap<&str, &DatasetDigest> = mine.datasets.iter().map(|d| (d.dataset.as_str(), d)).collect();
        let mut repaired = 0u64;
        for d in &theirs.datasets {
            let differing: Vec<u8> = (0..DIGEST_BUCKETS)
                .filter(|&b| mine.get(d.dataset.as_str()).map_or(0, |m| m.buckets[b]) != d.buckets[b])
                .map(|b| b as u8)
                .collect();
            if differing.is_empty() {
                continue;
            }
            let req = || PeerRequestV1::DigestEntries {
                with: self.here.to_string(),
                dataset: d.dataset.clone(),
                buckets: differing.clone(),
                limit: DIGEST_ENTRIES_MAX,
            };
            let unpack = |r| match r {
                PeerResponseV1::DigestEntries(r) => Some(r),
                _ => None,
            };
            let (their_entries, _) = self.deps.transport.call_region(peer, req, unpack, true).await?;
            let local = self.local_digest_entries(peer, &d.dataset, &differing, usize::MAX)?;
            // Their copy holds writes this one lacks (causally, whatever the clocks say); only
            // writes the origin's link has already passed are a divergence: a newer change is
            // still on its way (waiting for its schedule or rate limit, or in flight), and
            // pulling it here would bypass both.
            let (state, _) = self.deps.region.reader().replication().map_err(|e| NodeError::Storage(e.to_string()))?;
            let empty = VersionVector::new();
            let needed: Vec<String> = their_entries
                .into_iter()
                .filter(|(k, theirs)| {
                    let mine = local.get(k).unwrap_or(&empty);
                    let lacking: Vec<(&RegionId, u64)> = theirs.iter().filter(|(r, n)| mine.get(r) < *n).collect();
                    !lacking.is_empty()
                        && lacking.iter().all(|(r, n)| state.merged.get(r.as_str()).is_some_and(|m| n <= m))
                })
                .map(|(k, _)| k)
                .collect();
            for keys in needed.chunks(FETCH_KEYS_MAX) {
                repaired += self.pull_objects(peer, &d.dataset, keys).await?;
            }
        }
        self.deps.metrics.anti_entropy_repaired.get_or_create(&labels).inc_by(repaired);
        Ok(repaired)
    }

    /// Fetch `keys` from `peer` and merge whatever is newer through this region's group.
    async fn pull_objects(&self, peer: &RegionId, dataset: &str, keys: &[String]) -> Result<u64, NodeError> {
        let req = || PeerRequestV1::FetchObjects {
            with: self.here.to_string(),
            dataset: dataset.to_owned(),
            keys: keys.to_vec(),
        };
        let unpack = |r| match r {
            PeerResponseV1::Objects(r) => Some(r),
            _ => None,
        };
        let (objects, _) = self.deps.transport.call_region(peer, req, unpack, true).await?;
        let active = self.deps.policy.active();
        let here = self.here.clone();
        let changes: Vec<Change> = objects
            .into_iter()
            .filter_map(|(key, o)| {
                let rule = self.deps.policy.merge_rule_if_allowed(active.as_deref(), &here, dataset, &key, &o)?;
                Some(Change { dataset: dataset.to_owned(), key, object: o, rule })
            })
            .collect();
        if changes.is_empty() {
            return Ok(0);
        }
        let cmd = CommandV1::RepairChanges { source: peer.to_string(), changes };
        match self.deps.proposer.propose_if_leader(cmd).await.map_err(LocalError::into_node_error)? {
            CommandResult::Repaired { applied } => Ok(u64::from(applied)),
            other => Err(NodeError::Internal(format!("unexpected answer to a repair: {other:?}"))),
        }
    }

    /// Collect the tombstones this region originated once they are past their grace period and
    /// every region that may hold the key holds that same tombstone (or has collected it) and
    /// has merged every write it covers: no write concurrent with it is left anywhere, and no
    /// link can deliver an older one. Every other region removes its copy first (each only if
    /// still exactly this tombstone), this region's goes last, so a failed step is retried by
    /// the next pass. Tombstones collected here.
    pub(crate) async fn collect_pass(&self) -> Result<u64, NodeError> {
        self.deps.policy.refresh()?;
        let Some(active) = self.deps.policy.active() else { return Ok(0) };
        let now = self.deps.clock.now_ms();
        let here = self.here.clone();
        let mut candidates: BTreeMap<String, Vec<(String, StoredObject)>> = BTreeMap::new();
        let mut found = 0usize;
        self.for_each_object(None, |ds, key, obj| {
            let old_enough = obj.version.hlc.wall_ms().saturating_add(self.tombstone_grace_ms) <= now;
            if found < COLLECT_CANDIDATES_MAX && obj.is_bare_tombstone() && obj.version.region == here && old_enough {
                candidates.entry(ds.to_owned()).or_default().push((key.to_owned(), obj.clone()));
                found += 1;
            }
        })?;
        if candidates.is_empty() {
            return Ok(0);
        }
        // What every region has merged from each origin; a region that cannot answer holds
        // collection back.
        let mut merged: BTreeMap<RegionId, BTreeMap<String, u64>> = BTreeMap::new();
        for (region, state) in self.links.replication_view().await {
            match state {
                Ok(s) => {
                    merged.insert(region, s.merged.into_iter().collect());
                }
                Err(_) => return Ok(0),
            }
        }
        // `region` has merged every write the tombstone covers (its own it holds anyway).
        let covered = |region: &RegionId, obj: &StoredObject| {
            obj.vv.iter().all(|(r, n)| {
                r == region || merged.get(region).and_then(|m| m.get(r.as_str())).is_some_and(|&m| m >= n)
            })
        };
        let others: Vec<RegionId> =
            self.topology.regions().iter().map(|r| r.name.clone()).filter(|r| *r != here).collect();
        let allows = |r: &RegionId, ds: &str, k: &str, o: &StoredObject| {
            self.deps.policy.placement_allows(Some(&active), r, ds, k, o)
        };
        let mut total = 0u64;
        for (dataset, objs) in candidates {
            for chunk in objs.chunks(FETCH_KEYS_MAX) {
                let mut keep: Vec<(String, StoredObject)> =
                    chunk.iter().filter(|(_, o)| covered(&here, o)).cloned().collect();
                for r in &others {
                    let keys: Vec<String> =
                        keep.iter().filter(|(k, o)| allows(r, &dataset, k, o)).map(|(k, _)| k.clone()).collect();
                    if keys.is_empty() {
                        continue;
                    }
                    let req = || PeerRequestV1::FetchObjects {
                        with: here.to_string(),
                        dataset: dataset.clone(),
                        keys: keys.clone(),
                    };
                    let unpack = |resp| match resp {
                        PeerResponseV1::Objects(r) => Some(r),
                        _ => None,
                    };
                    let (theirs, _) = self.deps.transport.call_region(r, req, unpack, true).await?;
                    // A fetch answer may stop at its byte bound after a live copy: then a key
                    // missing from it says nothing.
                    let complete = theirs.iter().all(|(_, o)| o.value.is_none());
                    let theirs: BTreeMap<String, StoredObject> = theirs.into_iter().collect();
                    keep.retain(|(k, o)| {
                        !allows(r, &dataset, k, o)
                            || (covered(r, o)
                                && match theirs.get(k) {
                                    Some(t) => t == o,
                                    // Collected there already (by an earlier pass of this one).
                                    None => complete,
                                })
                    });
                }
                if keep.is_empty() {
                    continue;
                }
                for r in &others {
                    let theirs: Vec<(String, StoredObject)> =
                        keep.iter().filter(|(k, o)| allows(r, &dataset, k, o)).cloned().collect();
                    if theirs.is_empty() {
                        continue;
                    }
                    let req = || PeerRequestV1::CollectTombstones {
                        source: here.to_string(),
                        dataset: dataset.clone(),
                        keys: theirs.clone(),
                    };
                    let unpack = |resp| match resp {
                        PeerResponseV1::Collected(r) => Some(r),
                        _ => None,
                    };
                    self.deps.transport.call_region(r, req, unpack, true).await?;
                }
                let cmd = CommandV1::CollectTombstones { dataset: dataset.clone(), keys: keep };
                match self.deps.proposer.propose_if_leader(cmd).await.map_err(LocalError::into_node_error)? {
                    CommandResult::Collected { removed } => total += u64::from(removed),
                    other => return Err(NodeError::Internal(format!("unexpected answer to a collection: {other:?}"))),
                }
            }
        }
        Ok(total)
    }

    /// Another region's collection of tombstones it originated: removed here through this
    /// region's group, each only if the stored object is still exactly the one named.
    pub(crate) async fn serve_collect(
        &self,
        source: &str,
        dataset: String,
        keys: Vec<(String, StoredObject)>,
    ) -> Result<CommandResult, PeerError> {
        self.lead_or_refuse()?;
        let source = Self::peer_region(source, "a tombstone collection")?;
        if keys.len() > FETCH_KEYS_MAX {
            return Err(PeerError::Protocol(format!(
                "a collection names {} keys; at most {FETCH_KEYS_MAX}",
                keys.len()
            )));
        }
        // Only the origin of a tombstone decides its collection.
        let keys: Vec<(String, StoredObject)> = keys.into_iter().filter(|(_, o)| o.version.region == source).collect();
        let cmd = CommandV1::CollectTombstones { dataset, keys };
        self.deps.proposer.propose_if_leader(cmd).await.map_err(LocalError::into_peer_error)
    }

    /// Remove the copies the active placement no longer lets this region hold, each once a
    /// region that may hold it has it. Copies removed.
    pub(crate) async fn purge_pass(&self) -> Result<u64, NodeError> {
        self.deps.policy.refresh()?;
        let Some(active) = self.deps.policy.active() else { return Ok(0) };
        let here = self.here.clone();
        let mut candidates: Vec<(String, String, StoredObject)> = Vec::new();
        self.for_each_object(None, |ds, key, obj| {
            if !self.deps.policy.placement_allows(Some(&active), &here, ds, key, obj) {
                candidates.push((ds.to_owned(), key.to_owned(), obj.clone()));
            }
        })?;
        if candidates.is_empty() {
            self.deps.metrics.purge_held.set(0);
            return Ok(0);
        }
        // What every other region has merged from each origin.
        let mut merged: BTreeMap<RegionId, BTreeMap<String, u64>> = BTreeMap::new();
        for (region, state) in self.links.replication_view().await {
            if let (Ok(state), false) = (state, region == here) {
                merged.insert(region, state.merged.into_iter().collect());
            }
        }
        let mut by_dataset: BTreeMap<String, Vec<(String, Version)>> = BTreeMap::new();
        let mut held = 0i64;
        for (ds, key, obj) in candidates {
            let origin = &obj.version.region;
            let safe = self.topology.regions().iter().map(|r| &r.name).filter(|r| **r != here).any(|r| {
                self.deps.policy.placement_allows(Some(&active), r, &ds, &key, &obj)
                    && (r == origin
                        || merged.get(r).and_then(|m| m.get(origin.as_str())).is_some_and(|&m| m >= obj.version.seq))
            });
            if safe {
                by_dataset.entry(ds).or_default().push((key, obj.version));
            } else {
                held += 1;
            }
        }
        self.deps.metrics.purge_held.set(held);
        if held > 0 {
            tracing::warn!(
                held,
                "copies this region may no longer hold are kept until a region that may hold them has them"
            );
        }
        let mut total = 0u64;
        for (dataset, keys) in by_dataset {
            let mut removed = 0u64;
            for chunk in keys.chunks(FETCH_KEYS_MAX) {
                let cmd = CommandV1::Purge { dataset: dataset.clone(), keys: chunk.to_vec() };
                match self.deps.proposer.propose_if_leader(cmd).await.map_err(LocalError::into_node_error)? {
                    CommandResult::Purged { removed: n } => removed += u64::from(n),
                    other => return Err(NodeError::Internal(format!("unexpected answer to a purge: {other:?}"))),
                }
            }
            if removed == 0 {
                continue;
            }
            total += removed;
            self.deps.metrics.purged.get_or_create(&DatasetLabels { dataset: dataset.clone() }).inc_by(removed);
            tracing::warn!(
                dataset = %dataset, removed, epoch = active.entry.epoch, policy = %active.entry.version,
                "purged copies the active policy no longer lets this region hold"
            );
            self.audit_purge(&dataset, removed, &active).await;
        }
        Ok(total)
    }

    /// Record a purge in the region's audit namespace. A failure is logged, not fatal: the
    /// purge itself is in the Raft log and the metrics either way.
    async fn audit_purge(&self, dataset: &str, removed: u64, active: &ActivePolicy) {
        let at_ms = self.deps.clock.now_ms();
        let record = serde_json::json!({
            "event": "purge",
            "region": self.here.as_str(),
            "dataset": dataset,
            "removed": removed,
            "policy_epoch": active.entry.epoch,
            "policy_version": active.entry.version,
            "at_ms": at_ms,
        });
        let req = WriteRequest {
            dataset: AUDIT_NAMESPACE.into(),
            key: format!("purge/{at_ms:020}-{dataset}"),
            value: Some(record.to_string().into_bytes()),
            condition: meridian_raft::Condition::Always,
            effect: crate::peer::WriteEffect::Replace,
        };
        if let Err(e) = self.gateway.write_local(WriteOp::One(req)).await {
            tracing::error!(error = %e, dataset, removed, "could not record a purge in the audit namespace");
        }
    }
}

/// Per-dataset comparison of two digests of the same pair (each side's view).
fn compare(a: &RegionDigest, b: &RegionDigest, only: Option<&str>) -> Vec<DatasetVerdict> {
    let index = |d: &RegionDigest| -> BTreeMap<String, DatasetDigest> {
        d.datasets.iter().map(|x| (x.dataset.clone(), x.clone())).collect()
    };
    let (ia, ib) = (index(a), index(b));
    let names: BTreeSet<&String> =
        ia.keys().chain(ib.keys()).filter(|n| only.is_none_or(|o| o == n.as_str())).collect();
    names
        .into_iter()
        .map(|name| {
            let (x, y) = (ia.get(name), ib.get(name));
            DatasetVerdict {
                dataset: name.clone(),
                count_a: x.map_or(0, |d| d.count),
                count_b: y.map_or(0, |d| d.count),
                equal: x.map(|d| &d.buckets) == y.map(|d| &d.buckets),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::HlcTimestamp;

    fn digest(entries: &[(&str, u64)]) -> RegionDigest {
        let mut d = DatasetDigest { dataset: "d".into(), count: 0, buckets: vec![0; DIGEST_BUCKETS] };
        for (key, seq) in entries {
            let v = Version { hlc: HlcTimestamp::new(*seq, 0), region: RegionId::new("r1").unwrap(), seq: *seq };
            let h = object_hash("d", key, &v, &meridian_core::VersionVector::new());
            d.count += 1;
            let b = (h >> 56) as usize;
            d.buckets[b] = d.buckets[b].wrapping_add(h);
        }
        RegionDigest { epoch: 1, datasets: vec![d] }
    }

    #[test]
    fn digests_ignore_order_and_see_any_difference() {
        assert!(compare(&digest(&[("a", 1), ("b", 2)]), &digest(&[("b", 2), ("a", 1)]), None)[0].equal);
        assert!(!compare(&digest(&[("a", 1), ("b", 2)]), &digest(&[("a", 1), ("b", 3)]), None)[0].equal);
        assert!(!compare(&digest(&[("a", 1)]), &digest(&[("a", 1), ("b", 2)]), None)[0].equal);
        let empty = RegionDigest { epoch: 1, datasets: vec![] };
        let v = compare(&digest(&[("a", 1)]), &empty, None);
        assert_eq!((v[0].count_a, v[0].count_b, v[0].equal), (1, 0, false));
    }
}
