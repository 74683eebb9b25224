//! Policies inside a running cluster: immutable versions, the history, the active pointer, and
//! the gateway's use of them.
//!
//! Storage. Policy metadata lives in every region's Raft group under the reserved namespace
//! [`NAMESPACE`] (not a valid dataset name, so no client key can collide with it):
//! `version/<id>` holds a document as written, `history/<epoch>` one history entry, and
//! `active` the newest entry. The first region of the topology is the *authority*: an apply
//! or rollback commits there as one atomic Raft command (version, history entry and a
//! compare-and-set of `active`), so a failed or concurrent apply changes nothing. The other
//! regions hold copies, written right after the commit and, if a region was unreachable,
//! pulled from the authority by that region's leader every [`crate::limits::POLICY_SYNC_INTERVAL`].
//!
//! Use. Every node caches the active entry of its own region's copy and parses the versions
//! it names once. A client write is routed to a home region of its key under the version that
//! governs the key (see [`ActivePolicy::governing`]); the receiving leader checks its own
//! copy again before proposing, so a gateway with a stale copy cannot make a region store
//! what its policy forbids there. Until the first policy is applied, a cluster stores writes
//! in the region that takes them, as it did before policies existed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use meridian_core::crdt::CrdtKind;
use meridian_core::{DatasetName, Key, RegionId, Topology, Version};
use meridian_policy::placement::Link;
use meridian_policy::{
    evaluate, ConflictRule, Format, Kind, Mode, ObjectAttributes, Placement, PlacementError, Policy, PolicyId, Report,
    Rollout,
};
use meridian_raft::command::MergeRule;
use meridian_raft::{CommandResult, Condition, StoredObject};
use serde::{Deserialize, Serialize};

use crate::error::{LocalError, NodeError};
use crate::gateway::Gateway;
use crate::limits::{
    HISTORY_ENTRIES_MAX, HISTORY_PAGES_MAX, HISTORY_PAGE_ENTRIES, PARSED_VERSIONS_MAX, POLICY_INSTALL_ATTEMPTS_MAX,
    POLICY_INSTALL_TIMEOUT, POLICY_SYNC_INTERVAL, POLICY_SYNC_JITTER_MAX,
};
use crate::metrics::Metrics;
use crate::peer::{WriteOp, WriteRequest};
use crate::region::RegionGroup;

/// The reserved namespace of policy metadata in every region.
pub const NAMESPACE: &str = "_policy";
pub(crate) const ACTIVE_KEY: &str = "active";
const HISTORY_PREFIX: &str = "history/";
const VERSION_PREFIX: &str = "version/";

/// A stored policy version: the document exactly as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: String,
    /// `toml` or `yaml`.
    pub format: String,
    pub file: String,
    pub text: String,
}

/// One history entry; the newest is the active pointer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    pub epoch: u64,
    pub version: String,
    /// `apply` or `rollback`.
    pub action: String,
    pub mode: Mode,
    pub percent: u8,
    /// The fully enforced version governing keys outside this entry's rollout.
    pub base: Option<String>,
    pub at_ms: u64,
    pub datasets: Vec<String>,
}

impl HistoryRecord {
    fn rollout(&self) -> Rollout {
        Rollout { mode: self.mode, percent: self.percent }
    }

    /// The version fully enforced once this entry is active: itself at 100% enforce, otherwise
    /// what was fully enforced before it.
    fn fully_enforced(&self) -> Option<String> {
        if self.mode == Mode::Enforce && self.percent == Rollout::FULL {
            Some(self.version.clone())
        } else {
            self.base.clone()
        }
    }
}

/// Failures of the policy admin operations, shaped by what the caller does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyOpError {
    #[error("{0}")]
    Invalid(Report),
    #[error("{0}")]
    VersionNotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the cluster has no active policy yet")]
    NoPolicy,
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// The active entry of this node's region, with its versions parsed.
pub struct ActivePolicy {
    pub entry: HistoryRecord,
    pub current: Arc<Policy>,
    pub base: Option<Arc<Policy>>,
    /// The version of the `active` record this was loaded from.
    stored_as: Version,
}

impl ActivePolicy {
    /// The version that governs `key`, and whether it is this entry's new version (rather than
    /// the fully enforced base). `None`: no version is enforced for this key yet.
    pub fn governing(&self, dataset: &DatasetName, key: &Key) -> Option<(&Arc<Policy>, bool)> {
        if self.entry.rollout().enforces(dataset, key) {
            Some((&self.current, true))
        } else {
            self.base.as_ref().map(|b| (b, false))
        }
    }

    /// Under a shadow rollout: the version evaluated beside the governing one for `key`.
    pub fn shadow(&self, dataset: &DatasetName, key: &Key) -> Option<&Arc<Policy>> {
        let r = self.entry.rollout();
        (r.mode == Mode::Shadow && r.covers(dataset, key)).then_some(&self.current)
    }
}

/// The policy store: this node's cached view of its region's policy copy, the placements it
/// gives, and the admin operations on the cluster's policy. Operations that reach other
/// regions take the [`Gateway`] they go through as an argument (the gateway routes by this
/// store, so neither owns the other).
pub struct PolicyStore {
    here: RegionId,
    topology: Arc<Topology>,
    reader: meridian_raft::StateMachineReader,
    metrics: Arc<Metrics>,
    active: RwLock<Option<Arc<ActivePolicy>>>,
    parsed: Mutex<BTreeMap<String, Arc<Policy>>>,
    /// The Raft term in which this node, as leader, last caught its state machine up with the
    /// commit index (so its policy copy is at least as new as anything committed before).
    barrier_term: AtomicU64,
    /// When the authority last answered that it has no policy at all.
    authority_empty_at: Mutex<Option<tokio::time::Instant>>,
}

/// The placement of (dataset, key) under `policy`: the one place the node turns a policy into
/// a placement. `home` is the user-locality attribute (a key written without a region prefix
/// lives where it was written, its `origin`).
pub(crate) fn place(
    policy: &Policy,
    topology: &Topology,
    dataset: &DatasetName,
    key: &Key,
    home: Option<&RegionId>,
    origin: Option<&RegionId>,
) -> Result<Placement, PlacementError> {
    let attrs = ObjectAttributes { home: home.cloned(), origin: origin.cloned(), ..ObjectAttributes::default() };
    evaluate(policy, topology, dataset, key, &attrs)
}

/// How the leader writes a key: the dataset's kind and conflict rule under the policy copy
/// that governs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriteRules {
    pub kind: Kind,
    pub conflict: ConflictRule,
}

impl WriteRules {
    /// The conflict-free kind whose operations the dataset takes, if its rule is `crdt`.
    pub(crate) fn crdt_kind(self) -> Option<CrdtKind> {
        if self.conflict != ConflictRule::Crdt {
            return None;
        }
        match self.kind {
            Kind::Counter => Some(CrdtKind::Counter),
            Kind::Set => Some(CrdtKind::Set),
            Kind::Map => Some(CrdtKind::Map),
            Kind::Document => None,
        }
    }
}

/// The state machine's rule for a policy's `conflict`.
pub(crate) fn merge_rule(rule: ConflictRule) -> MergeRule {
    match rule {
        ConflictRule::Lww => MergeRule::Lww,
        ConflictRule::Siblings => MergeRule::Siblings,
        ConflictRule::Crdt => MergeRule::Crdt,
    }
}

/// A placement refusal as the request path reports it.
fn placement_error(e: PlacementError) -> NodeError {
    match e {
        e @ PlacementError::DatasetNotInPolicy { .. } => NodeError::DatasetNotInPolicy(e.to_string()),
        e => NodeError::HomeUnknown(e.to_string()),
    }
}

/// A policy document as the operator sent it: its text, format and file name.
#[derive(Debug, Clone, Copy)]
pub struct Document<'a> {
    pub text: &'a str,
    pub format: Format,
    pub file: &'a str,
}

/// What an apply or rollback did.
#[derive(Debug, Clone)]
pub struct ApplyOutcome {
    pub entry: HistoryRecord,
    pub propagated: Vec<RegionId>,
    pub pending: Vec<RegionId>,
}

/// How one region's copy stands.
pub struct RegionCopy {
    pub region: RegionId,
    pub epoch: Result<Option<u64>, String>,
}

/// What a plan found for one dataset.
#[derive(Debug, Clone, Default)]
pub struct DatasetPlan {
    pub dataset: String,
    pub change: &'static str,
    /// (region, keys, bytes) to copy there.
    pub gaining: Vec<(RegionId, u64, u64)>,
    /// (region, keys, bytes) to purge there.
    pub losing: Vec<(RegionId, u64, u64)>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub current: Option<String>,
    pub proposed: String,
    pub datasets: Vec<DatasetPlan>,
    pub links_opened: Vec<(String, RegionId, RegionId)>,
    pub links_closed: Vec<(String, RegionId, RegionId)>,
    pub unreachable: Vec<RegionId>,
}

/// What `explain` found for one key.
pub struct Explained {
    pub version: PolicyId,
    /// `enforced`, `rollout` (a partial rollout's new version covers the key) or
    /// `nothing_enforced` (only a shadow version exists).
    pub governed_by: &'static str,
    pub placement: Placement,
    pub shadow: Option<Placement>,
}

fn put(key: String, value: &impl Serialize, condition: Condition) -> WriteRequest {
    WriteRequest {
        dataset: NAMESPACE.into(),
        key,
        value: Some(serde_json::to_vec(value).expect("policy records serialize")),
        condition,
        effect: crate::peer::WriteEffect::Replace,
    }
}

fn decode_record<T: for<'de> Deserialize<'de>>(obj: &StoredObject, what: &str) -> Result<T, NodeError> {
    let bytes = obj.value.as_deref().ok_or_else(|| NodeError::Storage(format!("{what} is a tombstone")))?;
    serde_json::from_slice(bytes).map_err(|e| NodeError::Storage(format!("{what} does not decode: {e}")))
}

fn history_key(epoch: u64) -> String {
    format!("{HISTORY_PREFIX}{epoch:020}")
}

fn format_name(format: Format) -> &'static str {
    match format {
        Format::Toml => "toml",
        Format::Yaml => "yaml",
    }
}

impl PolicyStore {
    pub(crate) fn new(region: &RegionGroup, metrics: Arc<Metrics>) -> PolicyStore {
        PolicyStore {
            here: region.spec().region.clone(),
            topology: region.topology().clone(),
            reader: region.reader().clone(),
            metrics,
            active: RwLock::new(None),
            parsed: Mutex::new(BTreeMap::new()),
            barrier_term: AtomicU64::new(0),
            authority_empty_at: Mutex::new(None),
        }
    }

    /// The region whose Raft group decides the policy history.
    pub fn authority(&self) -> RegionId {
        self.topology.regions()[0].name.clone()
    }

    /// This node's cached active policy, if its region holds one.
    pub fn active(&self) -> Option<Arc<ActivePolicy>> {
        self.active.read().expect("policy cache lock").clone()
    }

    fn parse_record(&self, rec: &VersionRecord) -> Result<Arc<Policy>, NodeError> {
        if let Some(p) = self.parsed.lock().expect("parsed lock").get(&rec.version) {
            return Ok(p.clone());
        }
        let format = if rec.format == "yaml" { Format::Yaml } else { Format::Toml };
        // A stored version was valid against the topology when applied; if the topology has
        // since lost a region, its rules still hold for the regions that remain.
        let policy = Policy::parse(&rec.text, format, &rec.file, Some(&self.topology))
            .or_else(|_| Policy::parse(&rec.text, format, &rec.file, None))
            .map_err(|r| NodeError::Storage(format!("stored policy version {} no longer parses: {r}", rec.version)))?;
        if policy.id().to_hex() != rec.version {
            return Err(NodeError::Storage(format!("stored policy version {} hashes differently", rec.version)));
        }
        let policy = Arc::new(policy);
        let mut parsed = self.parsed.lock().expect("parsed lock");
        if parsed.len() >= PARSED_VERSIONS_MAX {
            parsed.clear();
        }
        parsed.insert(rec.version.clone(), policy.clone());
        Ok(policy)
    }

    fn local_record<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<(T, Version)>, NodeError> {
        match self.reader.get(NAMESPACE, key).map_err(|e| NodeError::Storage(e.to_string()))? {
            Some(obj) if obj.is_live() => Ok(Some((decode_record(&obj, key)?, obj.version))),
            _ => Ok(None),
        }
    }

    /// Reload the cache from this node's copy if the active entry changed. Cheap when it did
    /// not (one local read, no decoding), so the request path calls it every time.
    pub fn refresh(&self) -> Result<(), NodeError> {
        let obj = self.reader.get(NAMESPACE, ACTIVE_KEY).map_err(|e| NodeError::Storage(e.to_string()))?;
        let Some(obj) = obj.filter(StoredObject::is_live) else {
            *self.active.write().expect("policy cache lock") = None;
            self.metrics.policy_epoch.set(0);
            return Ok(());
        };
        // Only forward: a slower refresh that read an older record must not undo a newer one
        // (records in one region carry strictly increasing sequences).
        if self.active().is_some_and(|a| a.stored_as.seq >= obj.version.seq) {
            return Ok(());
        }
        let entry: HistoryRecord = decode_record(&obj, ACTIVE_KEY)?;
        let active = self.load_entry(entry, obj.version)?;
        self.metrics.policy_epoch.set(active.entry.epoch as i64);
        *self.active.write().expect("policy cache lock") = Some(Arc::new(active));
        Ok(())
    }

    /// `entry` with its versions parsed from this region's copy.
    fn load_entry(&self, entry: HistoryRecord, stored_as: Version) -> Result<ActivePolicy, NodeError> {
        let load = |id: &str| -> Result<Arc<Policy>, NodeError> {
            let (rec, _) = self
                .local_record::<VersionRecord>(&format!("{VERSION_PREFIX}{id}"))?
                .ok_or_else(|| NodeError::Storage(format!("policy version {id} is missing from this region's copy")))?;
            self.parse_record(&rec)
        };
        let current = load(&entry.version)?;
        let base = entry.base.as_deref().map(load).transpose()?;
        Ok(ActivePolicy { entry, current, base, stored_as })
    }

    /// The history entry with this epoch as this region's copy has it (what was active then),
    /// or `None` if the copy does not hold it.
    pub(crate) fn entry_at_epoch(&self, epoch: u64) -> Result<Option<ActivePolicy>, NodeError> {
        match self.local_record::<HistoryRecord>(&history_key(epoch))? {
            Some((entry, version)) => Ok(Some(self.load_entry(entry, version)?)),
            None => Ok(None),
        }
    }

    /// Keep this node's cache fresh, and (on a region leader outside the authority) pull the
    /// authority's newer entries into this region's copy (the supervisor cancels it when the
    /// node stops).
    pub(crate) async fn run_sync(self: Arc<Self>, region: Arc<RegionGroup>, gw: Arc<Gateway>) {
        loop {
            let jitter = POLICY_SYNC_JITTER_MAX.mul_f64(meridian_raft::rt::random_f64());
            tokio::time::sleep(POLICY_SYNC_INTERVAL + jitter).await;
            if let Err(e) = self.refresh() {
                tracing::warn!(error = %e, "refresh the policy cache");
            }
            if region.is_leader() && self.here != self.authority() {
                if let Err(e) = self.pull_from_authority(&gw).await {
                    tracing::debug!(error = %e, "policy copy not refreshed from the authority this round");
                }
            }
        }
    }

    async fn pull_from_authority(&self, gw: &Gateway) -> Result<(), NodeError> {
        let authority = self.authority();
        let Some(obj) = gw.read_in(&authority, NAMESPACE, ACTIVE_KEY).await?.0.filter(StoredObject::is_live) else {
            return Ok(());
        };
        let entry: HistoryRecord = decode_record(&obj, ACTIVE_KEY)?;
        let local = self.local_record::<HistoryRecord>(ACTIVE_KEY)?.map(|(e, _)| e.epoch);
        if local >= Some(entry.epoch) {
            return Ok(());
        }
        let mut records = Vec::new();
        for id in std::iter::once(&entry.version).chain(entry.base.iter()) {
            let key = format!("{VERSION_PREFIX}{id}");
            let rec = gw.read_in(&authority, NAMESPACE, &key).await?.0.filter(StoredObject::is_live);
            let rec = rec.ok_or_else(|| NodeError::Storage(format!("the authority lacks policy version {id}")))?;
            records.push(decode_record::<VersionRecord>(&rec, &key)?);
        }
        let region = self.here.clone();
        self.install_copy(gw, &region, &entry, &records).await?;
        self.refresh()
    }

    /// Write `entry` (and the versions it names) into `region`'s copy unless it already
    /// holds that epoch or a later one.
    async fn install_copy(
        &self,
        gw: &Gateway,
        region: &RegionId,
        entry: &HistoryRecord,
        records: &[VersionRecord],
    ) -> Result<(), NodeError> {
        for _ in 0..POLICY_INSTALL_ATTEMPTS_MAX {
            let current = gw.read_in(region, NAMESPACE, ACTIVE_KEY).await?.0.filter(StoredObject::is_live);
            let condition = match &current {
                Some(obj) => {
                    if decode_record::<HistoryRecord>(obj, ACTIVE_KEY)?.epoch >= entry.epoch {
                        return Ok(());
                    }
                    Condition::IfMatch(obj.version.clone())
                }
                None => Condition::IfAbsent,
            };
            let mut ops: Vec<WriteRequest> =
                records.iter().map(|r| put(format!("{VERSION_PREFIX}{}", r.version), r, Condition::Always)).collect();
            ops.push(put(history_key(entry.epoch), entry, Condition::Always));
            ops.push(put(ACTIVE_KEY.into(), entry, condition));
            match gw.write_in(region, WriteOp::Atomic(ops)).await?.0 {
                CommandResult::Batch(_) => return Ok(()),
                // Someone installed something meanwhile: look again.
                CommandResult::AtomicFailed { .. } => continue,
                other => return Err(NodeError::Internal(format!("unexpected answer to a policy install: {other:?}"))),
            }
        }
        Err(NodeError::Internal(format!("region {region}'s policy copy kept changing during the install")))
    }

    /// The authority's active entry and the version of its record (for compare-and-set).
    async fn authority_active(&self, gw: &Gateway) -> Result<Option<(HistoryRecord, Version)>, NodeError> {
        let authority = self.authority();
        match gw.read_in(&authority, NAMESPACE, ACTIVE_KEY).await?.0 {
            Some(obj) if obj.is_live() => Ok(Some((decode_record(&obj, ACTIVE_KEY)?, obj.version))),
            _ => Ok(None),
        }
    }

    /// Validate `text` and make it the active version (see the module docs for the commit
    /// point). Fails with nothing changed on any problem up to and including the commit.
    pub async fn apply(
        &self,
        gw: &Gateway,
        doc: Document<'_>,
        rollout: Rollout,
        action: &str,
        now_ms: u64,
    ) -> Result<ApplyOutcome, PolicyOpError> {
        let Document { text, format, file } = doc;
        let policy = Policy::parse(text, format, file, Some(&self.topology)).map_err(PolicyOpError::Invalid)?;
        let record = VersionRecord {
            version: policy.id().to_hex(),
            format: format_name(format).into(),
            file: file.into(),
            text: text.into(),
        };
        let previous = self.authority_active(gw).await?;
        // A partial enforce governs some keys by its version and the rest by its base; a new
        // shadow or partial rollout of another version on top would silently hand the first
        // group back to the base. Finish (100%) or roll back the running rollout first.
        if let Some((prev, _)) = &previous {
            let partial = prev.mode == Mode::Enforce && prev.percent < Rollout::FULL;
            let full = rollout.mode == Mode::Enforce && rollout.percent == Rollout::FULL;
            if partial && !full && prev.version != record.version {
                return Err(PolicyOpError::Conflict(format!(
                    "version {} is enforced for {}% of keys; enforce it fully, roll it back, or enforce another version fully before starting a new rollout",
                    &prev.version[..PolicyId::SHORT_LEN],
                    prev.percent
                )));
            }
        }
        let (epoch, base, condition) = match &previous {
            // At 100% enforce no key is outside the rollout, so there is no base to name.
            Some((prev, v)) if rollout.mode == Mode::Enforce && rollout.percent == Rollout::FULL => {
                (prev.epoch + 1, None, Condition::IfMatch(v.clone()))
            }
            Some((prev, v)) => (prev.epoch + 1, prev.fully_enforced(), Condition::IfMatch(v.clone())),
            None => (1, None, Condition::IfAbsent),
        };
        let entry = HistoryRecord {
            epoch,
            version: record.version.clone(),
            action: action.into(),
            mode: rollout.mode,
            percent: rollout.percent,
            base,
            at_ms: now_ms,
            datasets: policy.datasets().map(|(n, _)| n.to_string()).collect(),
        };
        let authority = self.authority();
        // A version record is written once: re-applying the same content (in another file
        // name or format) keeps the text that was first stored under the id.
        let version_key = format!("{VERSION_PREFIX}{}", record.version);
        let stored = gw.read_in(&authority, NAMESPACE, &version_key).await?.0.filter(StoredObject::is_live);
        let mut ops = Vec::new();
        if stored.is_none() {
            ops.push(put(version_key.clone(), &record, Condition::IfAbsent));
        }
        ops.push(put(history_key(epoch), &entry, Condition::IfAbsent));
        ops.push(put(ACTIVE_KEY.into(), &entry, condition));
        let record = match &stored {
            Some(obj) => decode_record(obj, &version_key)?,
            None => record,
        };
        match gw.write_in(&authority, WriteOp::Atomic(ops)).await?.0 {
            CommandResult::Batch(_) => {}
            CommandResult::AtomicFailed { .. } => {
                return Err(PolicyOpError::Conflict(
                    "another policy change was committed at the same time; nothing was changed".into(),
                ))
            }
            other => return Err(NodeError::Internal(format!("unexpected answer to a policy apply: {other:?}")).into()),
        }
        // Committed: from here on nothing may turn the answer into a failure (a client would
        // retry and make a second entry). Copies follow; a region not reached is `pending`
        // and catches up from the authority.
        let mut records = vec![record];
        if let Some(base) = &entry.base {
            let key = format!("{VERSION_PREFIX}{base}");
            match gw.read_in(&authority, NAMESPACE, &key).await {
                Ok((Some(obj), _)) if obj.is_live() => match decode_record(&obj, &key) {
                    Ok(rec) => records.push(rec),
                    Err(e) => tracing::warn!(error = %e, "read the base version for the copies"),
                },
                other => tracing::warn!(answer = ?other.map(|_| ()), "read the base version for the copies"),
            }
        }
        let others: Vec<RegionId> =
            self.topology.regions().iter().map(|r| r.name.clone()).filter(|r| *r != authority).collect();
        let installs = others.iter().map(|r| async {
            let done = tokio::time::timeout(POLICY_INSTALL_TIMEOUT, self.install_copy(gw, r, &entry, &records)).await;
            (r.clone(), matches!(done, Ok(Ok(()))))
        });
        let mut propagated = vec![authority];
        let mut pending = Vec::new();
        for (region, ok) in futures::future::join_all(installs).await {
            if ok {
                propagated.push(region);
            } else {
                pending.push(region);
            }
        }
        if let Err(e) = self.refresh() {
            tracing::warn!(error = %e, "refresh the policy cache after an apply");
        }
        Ok(ApplyOutcome { entry, propagated, pending })
    }

    /// Find a stored version by id or unique prefix (at least [`PolicyId::PREFIX_MIN`] hex
    /// characters), in the authority's copy.
    pub async fn version(&self, gw: &Gateway, prefix: &str) -> Result<VersionRecord, PolicyOpError> {
        let ok = (PolicyId::PREFIX_MIN..=64).contains(&prefix.len())
            && prefix.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(PolicyOpError::VersionNotFound(format!(
                "{prefix:?} is not a version id: use at least {} lowercase hex characters",
                PolicyId::PREFIX_MIN
            )));
        }
        let authority = self.authority();
        let (found, _) = gw.list_in(&authority, NAMESPACE, &format!("{VERSION_PREFIX}{prefix}"), None, 2).await?;
        match found.as_slice() {
            [(key, obj)] => Ok(decode_record(obj, key)?),
            [] => Err(PolicyOpError::VersionNotFound(format!("no stored policy version starts with {prefix}"))),
            _ => {
                Err(PolicyOpError::VersionNotFound(format!("{prefix} matches several versions; give more characters")))
            }
        }
    }

    /// Re-activate an earlier version, fully enforced, as a new history entry.
    pub async fn rollback(&self, gw: &Gateway, prefix: &str, now_ms: u64) -> Result<ApplyOutcome, PolicyOpError> {
        let rec = self.version(gw, prefix).await?;
        let format = if rec.format == "yaml" { Format::Yaml } else { Format::Toml };
        let full = Rollout { mode: Mode::Enforce, percent: Rollout::FULL };
        let doc = Document { text: &rec.text, format, file: &rec.file };
        self.apply(gw, doc, full, "rollback", now_ms).await
    }

    /// The authority's history, newest first.
    pub async fn history(&self, gw: &Gateway) -> Result<Vec<HistoryRecord>, NodeError> {
        let authority = self.authority();
        // Pages come oldest first; keep the newest HISTORY_ENTRIES_MAX.
        let mut out: std::collections::VecDeque<HistoryRecord> = std::collections::VecDeque::new();
        let mut after: Option<String> = None;
        for _ in 0..HISTORY_PAGES_MAX {
            let (page, _) =
                gw.list_in(&authority, NAMESPACE, HISTORY_PREFIX, after.as_deref(), HISTORY_PAGE_ENTRIES).await?;
            let last = page.last().map(|(k, _)| k.clone());
            for (key, obj) in &page {
                out.push_back(decode_record::<HistoryRecord>(obj, key)?);
                if out.len() > HISTORY_ENTRIES_MAX {
                    out.pop_front();
                }
            }
            if page.len() < HISTORY_PAGE_ENTRIES {
                break;
            }
            after = last;
        }
        Ok(out.into_iter().rev().collect())
    }

    /// The authority's active entry, and where each region's copy stands.
    pub async fn status(&self, gw: &Gateway) -> (Result<Option<HistoryRecord>, NodeError>, Vec<RegionCopy>) {
        let active = self.authority_active(gw).await.map(|a| a.map(|(e, _)| e));
        let regions: Vec<RegionId> = self.topology.regions().iter().map(|r| r.name.clone()).collect();
        let copies = regions.into_iter().map(|region| async move {
            let epoch = match gw.read_in(&region, NAMESPACE, ACTIVE_KEY).await {
                Ok((Some(obj), _)) if obj.is_live() => {
                    decode_record::<HistoryRecord>(&obj, ACTIVE_KEY).map(|e| Some(e.epoch)).map_err(|e| e.to_string())
                }
                Ok(_) => Ok(None),
                Err(e) => Err(e.to_string()),
            };
            RegionCopy { region, epoch }
        });
        (active, futures::future::join_all(copies).await)
    }

    // ---- placements ------------------------------------------------------------------------

    /// The placement of (dataset, key) under the version that governs it here: `None` if no
    /// version is enforced for it yet (before the first policy, or under a first shadow).
    /// `home` is the user-locality attribute, if the request named one.
    pub fn placement(
        &self,
        dataset: &DatasetName,
        key: &Key,
        home: Option<&RegionId>,
    ) -> Result<Option<Placement>, NodeError> {
        match self.active() {
            None => Ok(None),
            Some(active) => self.placement_under(&active, dataset, key, home),
        }
    }

    fn placement_under(
        &self,
        active: &ActivePolicy,
        dataset: &DatasetName,
        key: &Key,
        home: Option<&RegionId>,
    ) -> Result<Option<Placement>, NodeError> {
        let Some((policy, _)) = active.governing(dataset, key) else { return Ok(None) };
        place(policy, &self.topology, dataset, key, home, None).map(Some).map_err(placement_error)
    }

    /// Under a shadow rollout, the placement the shadow version would give (dataset, key);
    /// `None` when no shadow covers it or the shadow refuses it.
    pub(crate) fn shadow_placement(
        &self,
        active: &ActivePolicy,
        dataset: &DatasetName,
        key: &Key,
        home: Option<&RegionId>,
        origin: Option<&RegionId>,
    ) -> Option<Placement> {
        let shadow = active.shadow(dataset, key)?;
        place(shadow, &self.topology, dataset, key, home, origin).ok()
    }

    /// The placement of a stored object under the version of `active` that governs it. A
    /// user-homed key without a region prefix lives where it was written: its origin region.
    pub(crate) fn placement_of_object(
        &self,
        active: Option<&ActivePolicy>,
        dataset: &str,
        key: &str,
        obj: &StoredObject,
    ) -> Option<Placement> {
        let active = active?;
        let (Ok(ds), Ok(k)) = (DatasetName::new(dataset), Key::new(key)) else { return None };
        let (policy, _) = active.governing(&ds, &k)?;
        let origin = &obj.version.region;
        place(policy, &self.topology, &ds, &k, Some(origin), Some(origin)).ok()
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
        self.merge_rule_if_allowed(active, region, dataset, key, obj).is_some()
    }

    /// Before the leader judges a write by its copy of the policy: once per term, catch the
    /// state machine up with the commit index, so that a leader fresh from a restart never
    /// judges by a copy older than what was committed; then reload the copy if it changed.
    pub(crate) async fn catch_up_for_writes(&self, region: &RegionGroup) -> Result<(), LocalError> {
        let term = region.term();
        if self.barrier_term.load(Ordering::Acquire) != term {
            region.read_index().await?;
            self.barrier_term.store(term, Ordering::Release);
        }
        self.refresh().map_err(LocalError::Other)
    }

    /// The leader's own check before proposing client writes: this region must be a home of
    /// each key under this region's copy of the policy. Returns the condition that pins that
    /// copy: the write is proposed in one atomic group with it, so a policy change committed
    /// between this check and the write makes the write fail instead of slipping through.
    /// With the condition, each request's [`WriteRules`] under that copy (`None`: no dataset
    /// policy governs the key, so it is a plain JSON value).
    pub(crate) async fn guard(
        &self,
        gw: &Gateway,
        reqs: &[WriteRequest],
    ) -> Result<(Condition, Vec<Option<WriteRules>>, Vec<(String, Condition)>), NodeError> {
        let here = self.here.clone();
        let refuse = |message: String| {
            self.metrics
                .policy_refusals
                .get_or_create(&crate::metrics::KindLabels { kind: "policy_refused".into() })
                .inc();
            NodeError::PolicyRefused(message)
        };
        let Some(active) = self.active() else {
            // No copy here. That is the truth only in the authority's region, or when the
            // authority says it has no policy either; a region that missed the first apply
            // must store nothing until its copy has caught up.
            if here != self.authority() && !self.authority_has_no_policy(gw).await? {
                return Err(refuse(format!(
                    "region {here} holds no copy of the cluster's policy yet; it is catching up from the authority"
                )));
            }
            return Ok((Condition::IfAbsent, vec![None; reqs.len()], Vec::new()));
        };
        let mut rules = Vec::with_capacity(reqs.len());
        // Promotions a write here stands on, pinned like the policy copy.
        let mut promotions: Vec<(String, Condition)> = Vec::new();
        for r in reqs {
            let (Ok(ds), Ok(key)) = (DatasetName::new(r.dataset.as_str()), Key::new(r.key.as_str())) else {
                return Err(NodeError::Internal(format!(
                    "unchecked name {:?}/{:?} reached the policy",
                    r.dataset, r.key
                )));
            };
            match self.placement_under(&active, &ds, &key, Some(&here)) {
                Ok(None) => rules.push(None),
                Ok(Some(p)) if p.homes.contains(&here) => {
                    rules.push(Some(WriteRules { kind: p.kind, conflict: p.conflict }))
                }
                // A failover target takes the dataset's writes only while it holds an active
                // promotion, and only with that record unchanged when the write applies.
                Ok(Some(p)) if p.failover.contains(&here) => {
                    match crate::failover::guard_check(&self.reader, &r.dataset)? {
                        Some((key, condition, _)) => {
                            if !promotions.iter().any(|(k, _)| *k == key) {
                                promotions.push((key, condition));
                            }
                            rules.push(Some(WriteRules { kind: p.kind, conflict: p.conflict }))
                        }
                        None => {
                            return Err(NodeError::NotPromoted(format!(
                            "region {here} is a failover target of {} but holds no active promotion; its homes are {}",
                            r.dataset,
                            join(&p.homes)
                        )))
                        }
                    }
                }
                Ok(Some(p)) => {
                    return Err(refuse(format!(
                        "region {here} is not a home of {}/{} under policy {}; its homes are {}",
                        r.dataset,
                        r.key,
                        p.policy.short(),
                        join(&p.homes)
                    )))
                }
                Err(NodeError::HomeUnknown(m)) => return Err(refuse(m)),
                Err(e) => return Err(e),
            }
        }
        Ok((Condition::IfMatch(active.stored_as.clone()), rules, promotions))
    }

    /// The rule a change of (dataset, key) merges by here, if `active` lets `region` hold the
    /// object: the dataset's `conflict` under the version that governs the key.
    pub(crate) fn merge_rule_if_allowed(
        &self,
        active: Option<&ActivePolicy>,
        region: &RegionId,
        dataset: &str,
        key: &str,
        obj: &StoredObject,
    ) -> Option<MergeRule> {
        let p = self.placement_of_object(active, dataset, key, obj)?;
        p.holds_copy(region).then(|| merge_rule(p.conflict))
    }

    /// Whether the authority has no policy, asked at most once per [`POLICY_SYNC_INTERVAL`].
    async fn authority_has_no_policy(&self, gw: &Gateway) -> Result<bool, NodeError> {
        if let Some(at) = *self.authority_empty_at.lock().expect("policy lock") {
            if at.elapsed() < POLICY_SYNC_INTERVAL {
                return Ok(true);
            }
        }
        let empty = self.authority_active(gw).await?.is_none();
        *self.authority_empty_at.lock().expect("policy lock") = empty.then(tokio::time::Instant::now);
        Ok(empty)
    }

    /// Where (dataset, key) lives under the active policy, and why.
    pub fn explain(&self, dataset: &DatasetName, key: &Key, home: Option<&str>) -> Result<Explained, PolicyOpError> {
        let active = self.active().ok_or(PolicyOpError::NoPolicy)?;
        let home =
            home.map(|h| RegionId::new(h).map_err(|e| PolicyOpError::BadRequest(format!("home: {e}")))).transpose()?;
        let partial = active.entry.percent < Rollout::FULL;
        let (policy, governed_by) = match active.governing(dataset, key) {
            Some((p, true)) if partial => (p.clone(), "rollout"),
            Some((p, _)) => (p.clone(), "enforced"),
            // Nothing enforced for this key yet (a first policy in shadow): explain that one.
            None => (active.current.clone(), "nothing_enforced"),
        };
        let eval = |p: &Policy| {
            place(p, &self.topology, dataset, key, home.as_ref(), None)
                .map_err(|e| PolicyOpError::Node(placement_error(e)))
        };
        let placement = eval(&policy)?;
        let shadow = active.shadow(dataset, key).map(|p| eval(p)).transpose().ok().flatten();
        Ok(Explained { version: policy.id(), governed_by, placement, shadow })
    }

    // ---- plan ----------------------------------------------------------------------------

    /// What applying `text` would change: datasets gaining or losing regions with the bytes to
    /// copy or purge, and links opened or closed. Changes nothing.
    pub async fn plan(&self, gw: &Gateway, text: &str, format: Format, file: &str) -> Result<Plan, PolicyOpError> {
        let proposed = Policy::parse(text, format, file, Some(&self.topology)).map_err(PolicyOpError::Invalid)?;
        let current = match self.authority_active(gw).await? {
            None => None,
            Some((entry, _)) => {
                let rec = self.version(gw, &entry.version).await?;
                Some(self.parse_record(&rec)?)
            }
        };
        let regions: Vec<RegionId> = self.topology.regions().iter().map(|r| r.name.clone()).collect();
        let sizes = futures::future::join_all(regions.iter().map(|r| gw.dataset_sizes_in(r))).await;
        let mut size_of: BTreeMap<(RegionId, String), (u64, u64)> = BTreeMap::new();
        let mut unreachable = Vec::new();
        for (region, s) in regions.iter().zip(sizes) {
            match s {
                Ok(list) => {
                    for (ds, keys, bytes) in list {
                        size_of.insert((region.clone(), ds), (keys, bytes));
                    }
                }
                Err(_) => unreachable.push(region.clone()),
            }
        }
        let mut names: BTreeSet<String> = proposed.datasets().map(|(n, _)| n.to_string()).collect();
        if let Some(c) = &current {
            names.extend(c.datasets().map(|(n, _)| n.to_string()));
        }
        // Datasets stored but named by neither version fall to the defaults; plan them too.
        names.extend(size_of.keys().map(|(_, d)| d.clone()).filter(|d| d != NAMESPACE));
        let mut plan = Plan {
            current: current.as_ref().map(|c| c.id().to_hex()),
            proposed: proposed.id().to_hex(),
            unreachable,
            ..Plan::default()
        };
        for name in names {
            let Ok(ds) = DatasetName::new(name.clone()) else { continue };
            let before = current.as_ref().map(|c| Footprint::of(c, &self.topology, &ds));
            let after = Footprint::of(&proposed, &self.topology, &ds);
            let before_copies = before.as_ref().map_or_else(BTreeSet::new, |f| f.copies.clone());
            let stored: BTreeSet<RegionId> =
                regions.iter().filter(|r| size_of.contains_key(&((*r).clone(), name.clone()))).cloned().collect();
            // Without a current version, the data is wherever it was written.
            let holding = if current.is_some() { before_copies.clone() } else { stored.clone() };
            let full_copy = holding.iter().filter_map(|r| size_of.get(&(r.clone(), name.clone()))).max().copied();
            let mut dp = DatasetPlan { dataset: name.clone(), ..DatasetPlan::default() };
            for r in after.copies.difference(&holding) {
                let (k, b) = full_copy.unwrap_or((0, 0));
                dp.gaining.push((r.clone(), k, b));
            }
            for r in holding.difference(&after.copies) {
                let (k, b) = size_of.get(&(r.clone(), name.clone())).copied().unwrap_or((0, 0));
                dp.losing.push((r.clone(), k, b));
            }
            if let Some(b) = &before {
                dp.notes = b.rule_changes(&after);
            }
            if after.refused && !before.as_ref().is_some_and(|b| b.refused) {
                dp.notes.push("writes will be refused: the proposed policy neither names it nor has a default".into());
            }
            dp.change = match (before.as_ref().map(|b| b.refused), after.refused) {
                (None | Some(true), false) => "added",
                (Some(false), true) => "removed",
                _ if dp.gaining.is_empty() && dp.losing.is_empty() && dp.notes.is_empty() => "unchanged",
                _ => "changed",
            };
            let before_links = before.as_ref().map_or_else(BTreeSet::new, |f| f.links.clone());
            for (from, to) in after.links.difference(&before_links) {
                plan.links_opened.push((name.clone(), from.clone(), to.clone()));
            }
            for (from, to) in before_links.difference(&after.links) {
                plan.links_closed.push((name.clone(), from.clone(), to.clone()));
            }
            plan.datasets.push(dp);
        }
        Ok(plan)
    }
}

/// Where one dataset's copies may be under one version, over every possible key home.
struct Footprint {
    refused: bool,
    copies: BTreeSet<RegionId>,
    links: BTreeSet<(RegionId, RegionId)>,
    rules: Vec<(&'static str, String)>,
}

impl Footprint {
    fn of(policy: &Policy, topology: &meridian_core::Topology, ds: &DatasetName) -> Footprint {
        let mut f = Footprint { refused: true, copies: BTreeSet::new(), links: BTreeSet::new(), rules: Vec::new() };
        let key = Key::new("k").expect("a valid key");
        // A user-homed key may be homed in any region: take the union over all of them.
        let homes: Vec<Option<RegionId>> =
            std::iter::once(None).chain(topology.regions().iter().map(|r| Some(r.name.clone()))).collect();
        for home in homes {
            let Ok(p) = place(policy, topology, ds, &key, home.as_ref(), None) else { continue };
            if f.refused {
                f.rules = vec![
                    ("kind", p.kind.to_string()),
                    ("conflict", p.conflict.to_string()),
                    ("consistency", p.consistency.to_string()),
                    ("classification", p.classification.to_string()),
                    ("schedule", p.links.first().map_or("-".into(), schedule_text)),
                    ("retention", format!("{:?}", p.retention)),
                    ("encryption_at_rest", p.encryption_at_rest.to_string()),
                ];
            }
            f.refused = false;
            f.copies.extend(p.homes.iter().cloned());
            f.copies.extend(p.mirrors.iter().cloned());
            f.links.extend(p.links.iter().map(|l| (l.from.clone(), l.to.clone())));
        }
        f
    }

    fn rule_changes(&self, after: &Footprint) -> Vec<String> {
        if self.refused || after.refused {
            return Vec::new();
        }
        self.rules
            .iter()
            .zip(&after.rules)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| format!("{}: {} -> {}", a.0, a.1, b.1))
            .collect()
    }
}

/// A link's schedule in words, as `explain` and `plan` print it.
pub fn schedule_text(l: &Link) -> String {
    use meridian_policy::Schedule;
    match l.schedule {
        Schedule::Continuous => "continuous".into(),
        Schedule::Interval { every, jitter } if jitter.ms() == 0 => format!("every {every}"),
        Schedule::Interval { every, jitter } => format!("every {every} (+{jitter} jitter, this link at +{})", l.phase),
        Schedule::Window(w) => format!("daily {w} UTC"),
    }
}

pub(crate) fn join(regions: &[RegionId]) -> String {
    format!("[{}]", regions.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        crate::config::ClusterConfig::demo(30_000).topology
    }

    fn parse(text: &str) -> Arc<Policy> {
        Arc::new(Policy::parse(text, Format::Toml, "t.toml", Some(&topology())).expect("a valid policy"))
    }

    const FIRST: &str = "format = 1\n[[dataset]]\nname = \"catalog\"\nlocality = \"global\"\n\
                         classification = \"public\"\nhome = [\"us-east\"]\nmirrors = \"all-allowed\"\n\
                         [[dataset]]\nname = \"profiles\"\nlocality = \"user\"\nclassification = \"restricted\"\n";
    const NARROW: &str = "format = 1\n[[dataset]]\nname = \"catalog\"\nlocality = \"global\"\n\
                          classification = \"internal\"\nhome = [\"us-east\"]\nmirrors = [\"eu-west\"]\n";

    fn entry(version: &str, mode: Mode, percent: u8, base: Option<&str>) -> HistoryRecord {
        HistoryRecord {
            epoch: 2,
            version: version.into(),
            action: "apply".into(),
            mode,
            percent,
            base: base.map(str::to_owned),
            at_ms: 0,
            datasets: Vec::new(),
        }
    }

    fn r(s: &str) -> RegionId {
        RegionId::new(s).expect("region")
    }

    #[test]
    fn the_fully_enforced_version_is_the_entry_at_full_enforce_and_its_base_otherwise() {
        assert_eq!(entry("v2", Mode::Enforce, 100, Some("v1")).fully_enforced().as_deref(), Some("v2"));
        assert_eq!(entry("v2", Mode::Enforce, 30, Some("v1")).fully_enforced().as_deref(), Some("v1"));
        assert_eq!(entry("v2", Mode::Shadow, 100, None).fully_enforced(), None);
    }

    #[test]
    fn a_partial_rollout_governs_its_keys_by_the_new_version_and_the_rest_by_the_base() {
        let (first, narrow) = (parse(FIRST), parse(NARROW));
        let active = ActivePolicy {
            entry: entry(&narrow.id().to_hex(), Mode::Enforce, 50, Some(&first.id().to_hex())),
            current: narrow.clone(),
            base: Some(first.clone()),
            stored_as: Version { hlc: meridian_core::HlcTimestamp::new(1, 0), region: r("us-east"), seq: 1 },
        };
        let ds = DatasetName::new("catalog").expect("name");
        let (mut new, mut old) = (0, 0);
        for i in 0..200 {
            let key = Key::new(format!("k{i}")).expect("key");
            let (p, is_new) = active.governing(&ds, &key).expect("every key is governed");
            let placement = place(p, &topology(), &ds, &key, None, None).expect("placed");
            if is_new {
                new += 1;
                assert_eq!(placement.mirrors, vec![r("eu-west")], "the new version's placement");
            } else {
                old += 1;
                assert!(placement.holds_copy(&r("ap-south")), "the base's placement");
            }
            assert!(active.shadow(&ds, &key).is_none(), "an enforce rollout shadows nothing");
        }
        assert!(new > 50 && old > 50, "about half of the keys each way: {new} new, {old} old");
    }

    #[test]
    fn placement_refusals_keep_their_meaning_on_the_request_path() {
        let first = parse(FIRST);
        let t = topology();
        let missing = DatasetName::new("users").expect("name");
        let key = Key::new("k").expect("key");
        let e = place(&first, &t, &missing, &key, None, None).expect_err("not in the policy");
        assert!(matches!(placement_error(e), NodeError::DatasetNotInPolicy(_)));
        // A user-homed key with neither a prefix nor a home attribute has no home.
        let profiles = DatasetName::new("profiles").expect("name");
        let e = place(&first, &t, &profiles, &key, None, None).expect_err("no home");
        assert!(matches!(placement_error(e), NodeError::HomeUnknown(_)));
        // With the attribute, it lives there and nowhere else.
        let p = place(&first, &t, &profiles, &key, Some(&r("eu-west")), None).expect("placed");
        assert_eq!((p.homes.clone(), p.allowed.clone()), (vec![r("eu-west")], vec![r("eu-west")]));
    }

    #[test]
    fn a_plan_names_the_rules_that_change_and_the_regions_that_stop_holding_copies() {
        let t = topology();
        let ds = DatasetName::new("catalog").expect("name");
        let before = Footprint::of(&parse(FIRST), &t, &ds);
        let after = Footprint::of(&parse(NARROW), &t, &ds);
        assert!(before.copies.contains(&r("ap-south")) && !after.copies.contains(&r("ap-south")));
        assert_eq!(after.links, [(r("us-east"), r("eu-west"))].into_iter().collect());
        let changes = before.rule_changes(&after);
        assert!(changes.iter().any(|c| c == "classification: public -> internal"), "{changes:?}");
        // A dataset a version does not name is refused there, and has no rules to compare.
        let gone = Footprint::of(&parse(NARROW), &t, &DatasetName::new("profiles").expect("name"));
        assert!(gone.refused && before.rule_changes(&gone).is_empty());
    }
}
