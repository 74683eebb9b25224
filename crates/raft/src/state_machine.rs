//! The region's state machine over redb: the objects, the applied log position, the region's
//! write sequence and HLC high-water mark, and snapshots.
//!
//! Durability: the state machine commits without fsync, because the Raft log is the
//! write-ahead log and openraft re-applies committed entries after a restart. Two rules keep
//! that safe, both asserted in code paths below:
//! - a snapshot is built only after an fsync'd commit, so the state it describes is on disk
//!   before openraft may purge the log entries it covers;
//! - every [`SYNC_EVERY_ENTRIES`] applied entries we fsync anyway, bounding re-apply work.
//!
//! It deliberately does not check names, sizes or policy: the node validates a command
//! before proposing it, and applying must stay a pure function of the log.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use meridian_core::{HlcTimestamp, RegionId, Version};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, StorageIOError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use meridian_core::crdt::{CrdtObject, CrdtOp, Stamp};
use meridian_core::VersionVector;

use crate::command::{
    decode_object, decode_object_vv, dot_of, encode_object, object_key, split_object_key, Change, Command,
    CommandResult, CommandV1, Condition, MergeRule, OutboxEntry, RemoteChange, Sibling, StoredObject,
};
use crate::conflicts::{ConflictLimits, ConflictLogState, ConflictQuery, ConflictRecord, ConflictState};
use crate::log_store::LogDurability;
use crate::merge::{self, Merge, Shortcut};
use crate::{decode, encode, Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const META_APPLIED: &str = "applied";
/// The first replication record (merged and cursors only); read, never written.
const META_REPLICATION_V1: &str = "replication";
const META_REPLICATION: &str = "replication.v2";
/// Snapshots since the replication record's second form start with these bytes (the older
/// forms start with an option tag, 0 or 1).
const SNAPSHOT_MAGIC: &[u8] = b"MSNAP3\0";
/// Locally originated writes by region sequence: what the links ship.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Conflict records by id, oldest first.
const CONFLICTS: TableDefinition<u64, &[u8]> = TableDefinition::new("conflicts");
/// Conflict ids by key: [`conflict_index_key`] → id.
const CONFLICTS_BY_KEY: TableDefinition<&[u8], u64> = TableDefinition::new("conflicts_by_key");
/// The conflict log's bookkeeping ([`ConflictLogState`]).
const META_CONFLICTS: &str = "conflicts";
/// Tombstones collected in this region, ever (a `u64`).
const META_TOMBSTONES_COLLECTED: &str = "tombstones_collected";
/// Snapshots since the conflict log start with these bytes.
const SNAPSHOT_MAGIC_V4: &[u8] = b"MSNAP4\0";

/// Outbox entries kept at most by default: older ones are dropped as new ones arrive (a link
/// that falls further behind catches up by a filtered scan). Entries hold a key, not a value.
pub const OUTBOX_ENTRIES_MAX: u64 = 200_000;

/// Applied entries between two fsyncs of the state machine.
pub const SYNC_EVERY_ENTRIES: u64 = 4096;

/// The state machine's own bookkeeping, kept beside the objects in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedState {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    /// Sequence of the last write this region originated.
    pub region_seq: u64,
    /// Highest HLC stamped on a write so far; the next is strictly greater.
    pub last_hlc: HlcTimestamp,
}

/// What this region has merged from each other region, and how far each link from it has been
/// acknowledged: both in outbox sequences of the region that originated the changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationState {
    /// Source region → every change it originated up to this sequence is merged here.
    pub merged: std::collections::BTreeMap<String, u64>,
    /// Destination region → its link has been acknowledged up to this sequence.
    pub cursors: std::collections::BTreeMap<String, u64>,
    /// Destination region → the policy epoch whose backfill its link completed.
    pub backfilled: std::collections::BTreeMap<String, u64>,
    /// Source region → changes merged through its link, each counted once by its sequence
    /// (a resend cannot count twice: that is what the exactly-once tests check).
    pub received: std::collections::BTreeMap<String, u64>,
    /// Sending region → changes applied by catch-up, backfill or anti-entropy repair.
    pub repaired: std::collections::BTreeMap<String, u64>,
    /// Copies removed here because the policy no longer lets this region hold them.
    pub purged: u64,
    /// Source region → its wall-clock time as of which everything it committed (that this
    /// region may hold and its link does not hold back) is merged here.
    pub fresh: std::collections::BTreeMap<String, u64>,
    /// Every outbox entry at or below this sequence has been trimmed: a link whose cursor is
    /// below it must catch up by a scan (reserved writes leave gaps in the outbox too, so the
    /// first entry alone cannot tell).
    pub outbox_trimmed: u64,
}

/// The first form of [`ReplicationState`]; still read.
#[derive(Deserialize)]
struct ReplicationStateV1 {
    merged: std::collections::BTreeMap<String, u64>,
    cursors: std::collections::BTreeMap<String, u64>,
}

impl From<ReplicationStateV1> for ReplicationState {
    fn from(v1: ReplicationStateV1) -> Self {
        ReplicationState { merged: v1.merged, cursors: v1.cursors, ..ReplicationState::default() }
    }
}

/// The replication record in `meta`, in whichever form it was written.
fn read_replication(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<ReplicationState, redb::Error> {
    if let Some(v) = meta.get(META_REPLICATION)? {
        return decode(v.value()).map_err(corrupt);
    }
    match meta.get(META_REPLICATION_V1)? {
        Some(v) => Ok(decode::<ReplicationStateV1>(v.value()).map_err(corrupt)?.into()),
        None => Ok(ReplicationState::default()),
    }
}

/// The first snapshot format (before replication); still read.
#[derive(Serialize, Deserialize)]
struct SnapshotDataV1 {
    applied: AppliedState,
    #[serde(with = "meridian_core::byte_strings::pairs")]
    objects: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The second snapshot format (replication record in its first form); still read.
#[derive(Deserialize)]
struct SnapshotDataV2 {
    applied: AppliedState,
    #[serde(with = "meridian_core::byte_strings::pairs")]
    objects: Vec<(Vec<u8>, Vec<u8>)>,
    replication: ReplicationStateV1,
    #[serde(with = "meridian_core::byte_strings::numbered")]
    outbox: Vec<(u64, Vec<u8>)>,
}

/// The third snapshot format (before the conflict log), written after [`SNAPSHOT_MAGIC`];
/// still read.
#[derive(Deserialize)]
struct SnapshotDataV3 {
    applied: AppliedState,
    #[serde(with = "meridian_core::byte_strings::pairs")]
    objects: Vec<(Vec<u8>, Vec<u8>)>,
    replication: ReplicationState,
    #[serde(with = "meridian_core::byte_strings::numbered")]
    outbox: Vec<(u64, Vec<u8>)>,
}

/// The current snapshot format, written after [`SNAPSHOT_MAGIC_V4`].
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    applied: AppliedState,
    #[serde(with = "meridian_core::byte_strings::pairs")]
    objects: Vec<(Vec<u8>, Vec<u8>)>,
    replication: ReplicationState,
    #[serde(with = "meridian_core::byte_strings::numbered")]
    outbox: Vec<(u64, Vec<u8>)>,
    conflict_log: ConflictLogState,
    #[serde(with = "meridian_core::byte_strings::numbered")]
    conflicts: Vec<(u64, Vec<u8>)>,
    tombstones_collected: u64,
}

impl SnapshotData {
    fn encode(&self) -> Vec<u8> {
        let mut out = SNAPSHOT_MAGIC_V4.to_vec();
        out.extend_from_slice(&encode(self));
        out
    }

    fn decode_any(bytes: &[u8]) -> Result<SnapshotData, crate::DecodeError> {
        if let Some(rest) = bytes.strip_prefix(SNAPSHOT_MAGIC_V4) {
            return decode::<SnapshotData>(rest);
        }
        if let Some(rest) = bytes.strip_prefix(SNAPSHOT_MAGIC) {
            let v3 = decode::<SnapshotDataV3>(rest)?;
            return Ok(SnapshotData {
                applied: v3.applied,
                objects: v3.objects,
                replication: v3.replication,
                outbox: v3.outbox,
                conflict_log: ConflictLogState::default(),
                conflicts: Vec::new(),
                tombstones_collected: 0,
            });
        }
        match decode::<SnapshotDataV2>(bytes) {
            Ok(v2) => Ok(SnapshotData {
                applied: v2.applied,
                objects: v2.objects,
                replication: v2.replication.into(),
                outbox: v2.outbox,
                conflict_log: ConflictLogState::default(),
                conflicts: Vec::new(),
                tombstones_collected: 0,
            }),
            Err(_) => {
                let v1: SnapshotDataV1 = decode(bytes)?;
                Ok(SnapshotData {
                    applied: v1.applied,
                    objects: v1.objects,
                    replication: ReplicationState::default(),
                    outbox: Vec::new(),
                    conflict_log: ConflictLogState::default(),
                    conflicts: Vec::new(),
                    tombstones_collected: 0,
                })
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    #[serde(with = "meridian_core::byte_strings::bytes")]
    data: Vec<u8>,
}

struct Shared {
    db: Database,
    region: RegionId,
    snapshot_path: PathBuf,
    /// Serialises snapshot building and installing against each other.
    snapshot_lock: Mutex<u64>,
    /// Highest log index whose effects are durably on disk here; the log store never drops
    /// entries above it.
    durable: Arc<AtomicU64>,
}

/// The state machine handed to openraft.
pub struct StateMachineStore {
    shared: Arc<Shared>,
    applied: AppliedState,
    replication: ReplicationState,
    conflict_log: ConflictLogState,
    conflict_limits: ConflictLimits,
    values_max: usize,
    unsynced_entries: u64,
    outbox_max: u64,
    /// When set, nothing is applied before the log holds it durably (see
    /// [`crate::log_store`]: a leader's own entries may commit before its fsync ends).
    log_durability: Option<LogDurability>,
}

fn index_of(l: Option<LogId>) -> u64 {
    l.map_or(0, |l| l.index)
}

/// A read-only handle for the request path: point reads and listings, never writes.
#[derive(Clone)]
pub struct StateMachineReader {
    shared: Arc<Shared>,
}

fn sm_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> redb::Error {
    redb::Error::Corrupted(e.to_string())
}

impl StateMachineStore {
    /// Open (or create) the state machine in `dir` (`state.redb` and `snapshot.bin`).
    pub fn open(dir: &Path, region: RegionId) -> Result<Self, StorageError> {
        let db =
            Database::create(dir.join("state.redb")).map_err(|e| StorageIOError::read_state_machine(&sm_err(e)))?;
        Self::with_database(db, dir.join("snapshot.bin"), region)
    }

    pub fn with_database(db: Database, snapshot_path: PathBuf, region: RegionId) -> Result<Self, StorageError> {
        let load = || -> Result<(AppliedState, ReplicationState, ConflictLogState), redb::Error> {
            let txn = db.begin_write()?;
            {
                txn.open_table(OBJECTS)?;
                txn.open_table(META)?;
                txn.open_table(OUTBOX)?;
                txn.open_table(CONFLICTS)?;
                txn.open_table(CONFLICTS_BY_KEY)?;
            }
            txn.commit()?;
            let r = db.begin_read()?;
            let meta = r.open_table(META)?;
            let applied = match meta.get(META_APPLIED)? {
                Some(v) => decode(v.value()).map_err(corrupt)?,
                None => AppliedState::default(),
            };
            let replication = read_replication(&meta)?;
            let conflict_log = read_conflict_log(&meta)?;
            Ok((applied, replication, conflict_log))
        };
        let (applied, replication, conflict_log) =
            load().map_err(|e| StorageIOError::read_state_machine(&sm_err(e)))?;
        // What was loaded from disk is durable by definition.
        let durable = Arc::new(AtomicU64::new(index_of(applied.last_applied)));
        let shared = Arc::new(Shared { db, region, snapshot_path, snapshot_lock: Mutex::new(0), durable });
        Ok(StateMachineStore {
            shared,
            applied,
            replication,
            conflict_log,
            conflict_limits: ConflictLimits::default(),
            values_max: meridian_core::limits::VALUE_BYTES_MAX_DEFAULT,
            unsynced_entries: 0,
            outbox_max: OUTBOX_ENTRIES_MAX,
            log_durability: None,
        })
    }

    /// Keep at most `entries` outbox entries (every voter of a region must use the same
    /// bound: the cluster configuration sets it). At least 1.
    pub fn set_outbox_limit(&mut self, entries: u64) {
        self.outbox_max = entries.max(1);
    }

    /// Bound the conflict log (every voter of a region must use the same bounds: the cluster
    /// configuration sets them). At least one record, kept at least a second.
    pub fn set_conflict_limits(&mut self, limits: ConflictLimits) {
        self.conflict_limits = ConflictLimits { records: limits.records.max(1), age_ms: limits.age_ms.max(1000) };
    }

    /// The value limit, which also bounds the values one object keeps together (siblings):
    /// every voter of a region must use the same (the cluster configuration sets it).
    pub fn set_value_limit(&mut self, bytes: usize) {
        self.values_max = bytes.max(1);
    }

    /// Apply nothing before the log holds it durably. Required when the log store reports a
    /// leader's own entries written at submit ([`crate::LogStore::ack_own_entries_at_submit`]).
    pub fn wait_for_log(&mut self, durability: LogDurability) {
        self.log_durability = Some(durability);
    }

    /// The durable point to hand to [`crate::LogStore::open_with_purge_limit`].
    pub fn durable_point(&self) -> Arc<AtomicU64> {
        self.shared.durable.clone()
    }

    pub fn reader(&self) -> StateMachineReader {
        StateMachineReader { shared: self.shared.clone() }
    }

    fn apply_batch(&mut self, entries: Vec<Entry>) -> Result<Vec<CommandResult>, redb::Error> {
        let mut results = Vec::with_capacity(entries.len());
        let mut txn = self.shared.db.begin_write()?;
        self.unsynced_entries += entries.len() as u64;
        let sync = self.unsynced_entries >= SYNC_EVERY_ENTRIES;
        if !sync {
            txn.set_durability(Durability::None).map_err(redb::Error::from)?;
        }
        let mut applied = self.applied.clone();
        let mut replication = self.replication.clone();
        let mut conflict_log = self.conflict_log.clone();
        {
            let mut objects = txn.open_table(OBJECTS)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut conflicts = txn.open_table(CONFLICTS)?;
            let mut conflicts_by_key = txn.open_table(CONFLICTS_BY_KEY)?;
            let mut meta = txn.open_table(META)?;
            for entry in entries {
                assert!(
                    applied.last_applied.is_none_or(|l| l.index < entry.log_id.index),
                    "entries must be applied in order"
                );
                applied.last_applied = Some(entry.log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => CommandResult::Nothing,
                    EntryPayload::Membership(m) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), m);
                        CommandResult::Nothing
                    }
                    EntryPayload::Normal(Command::V1(cmd)) => {
                        let mut t = Tables {
                            objects: &mut objects,
                            outbox: &mut outbox,
                            replication: &mut replication,
                            outbox_max: self.outbox_max,
                            conflicts: &mut conflicts,
                            conflicts_by_key: &mut conflicts_by_key,
                            conflict_log: &mut conflict_log,
                            conflict_limits: self.conflict_limits,
                            values_max: self.values_max,
                            meta: &mut meta,
                        };
                        apply_command(&mut t, &mut applied, &self.shared.region, cmd)?
                    }
                };
                results.push(result);
            }
            // Records past their age go even when no new conflict arrives: one look at the
            // oldest per batch.
            if conflict_log.held > 0 {
                let now_ms = applied.last_hlc.wall_ms();
                trim_conflicts(&mut conflicts, &mut conflicts_by_key, &mut conflict_log, self.conflict_limits, now_ms)?;
            }
            meta.insert(META_APPLIED, encode(&applied).as_slice())?;
            if replication != self.replication {
                meta.insert(META_REPLICATION, encode(&replication).as_slice())?;
            }
            if conflict_log != self.conflict_log {
                meta.insert(META_CONFLICTS, encode(&conflict_log).as_slice())?;
            }
        }
        txn.commit()?;
        if sync {
            self.unsynced_entries = 0;
            self.shared.durable.fetch_max(index_of(applied.last_applied), Ordering::SeqCst);
        }
        self.applied = applied;
        self.replication = replication;
        self.conflict_log = conflict_log;
        Ok(results)
    }
}

/// The tables one command may touch, inside the batch's transaction.
struct Tables<'a, 't> {
    objects: &'a mut redb::Table<'t, &'static [u8], &'static [u8]>,
    outbox: &'a mut redb::Table<'t, u64, &'static [u8]>,
    replication: &'a mut ReplicationState,
    outbox_max: u64,
    conflicts: &'a mut redb::Table<'t, u64, &'static [u8]>,
    conflicts_by_key: &'a mut redb::Table<'t, &'static [u8], u64>,
    conflict_log: &'a mut ConflictLogState,
    conflict_limits: ConflictLimits,
    values_max: usize,
    /// Counters that change rarely (tombstones collected).
    meta: &'a mut redb::Table<'t, &'static str, &'static [u8]>,
}

/// The conflict log's bookkeeping in `meta`, or a fresh one.
fn read_conflict_log(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<ConflictLogState, redb::Error> {
    match meta.get(META_CONFLICTS)? {
        Some(v) => decode(v.value()).map_err(corrupt),
        None => Ok(ConflictLogState::default()),
    }
}

/// The index key of conflict `id` of (dataset, key): the storage key's length, the storage
/// key, then the id, so one key's records are contiguous and in id order.
fn conflict_index_key(dataset: &str, key: &str, id: u64) -> Vec<u8> {
    let k = object_key(dataset, key);
    let mut out = Vec::with_capacity(4 + k.len() + 8);
    out.extend_from_slice(&(k.len() as u32).to_be_bytes());
    out.extend_from_slice(&k);
    out.extend_from_slice(&id.to_be_bytes());
    out
}

/// Write one conflict record, then trim the log to its count bound.
fn record_conflict(t: &mut Tables<'_, '_>, mut record: ConflictRecord) -> Result<(), redb::Error> {
    let log = &mut *t.conflict_log;
    record.id = log.next_id;
    log.next_id += 1;
    log.held += 1;
    // Counted without allocating once the (dataset, rule) pair is known.
    match log.recorded.get_mut(&record.dataset).and_then(|by_rule| by_rule.get_mut(record.rule.name())) {
        Some(n) => *n += 1,
        None => {
            *log.recorded
                .entry(record.dataset.clone())
                .or_default()
                .entry(record.rule.name().to_owned())
                .or_default() += 1
        }
    }
    let values: usize =
        record.versions.iter().chain([&record.outcome]).map(|s| s.value.as_ref().map_or(0, Vec::len)).sum();
    t.conflicts
        .insert(record.id, crate::encode_sized(&record, values + 64 * (2 + record.versions.len())).as_slice())?;
    t.conflicts_by_key.insert(conflict_index_key(&record.dataset, &record.key, record.id).as_slice(), record.id)?;
    // Over the count bound: trim now. The age bound is looked at once per batch (in
    // `apply_batch`), not after every record.
    if t.conflict_log.held > t.conflict_limits.records {
        trim_conflicts(t.conflicts, t.conflicts_by_key, t.conflict_log, t.conflict_limits, record.at_ms)?;
    }
    Ok(())
}

/// Drop the oldest records while more are held than the bound, or they are older than the
/// age bound as of `now_ms` (HLC time, so every voter trims alike).
fn trim_conflicts(
    conflicts: &mut redb::Table<'_, u64, &'static [u8]>,
    by_key: &mut redb::Table<'_, &'static [u8], u64>,
    log: &mut ConflictLogState,
    limits: ConflictLimits,
    now_ms: u64,
) -> Result<(), redb::Error> {
    loop {
        let oldest = match conflicts.first()? {
            Some((k, v)) => (k.value(), decode::<ConflictRecord>(v.value()).map_err(corrupt)?),
            None => break,
        };
        let (id, rec) = oldest;
        if log.held <= limits.records && rec.at_ms.saturating_add(limits.age_ms) >= now_ms {
            break;
        }
        conflicts.remove(id)?;
        by_key.remove(conflict_index_key(&rec.dataset, &rec.key, id).as_slice())?;
        log.held = log.held.saturating_sub(1);
        log.expired += 1;
    }
    Ok(())
}

/// Remove every conflict record of (dataset, key): its copy left this region. How many.
fn remove_conflicts_of(t: &mut Tables<'_, '_>, dataset: &str, key: &str) -> Result<u64, redb::Error> {
    let from = conflict_index_key(dataset, key, 0);
    let to = conflict_index_key(dataset, key, u64::MAX);
    let mut ids = Vec::new();
    for item in t.conflicts_by_key.range(from.as_slice()..=to.as_slice())? {
        ids.push(item?.1.value());
    }
    for &id in &ids {
        t.conflicts.remove(id)?;
        t.conflicts_by_key.remove(conflict_index_key(dataset, key, id).as_slice())?;
    }
    t.conflict_log.held = t.conflict_log.held.saturating_sub(ids.len() as u64);
    Ok(ids.len() as u64)
}

/// The object stored under a storage key.
fn get_object(
    objects: &impl ReadableTable<&'static [u8], &'static [u8]>,
    k: &[u8],
) -> Result<Option<StoredObject>, redb::Error> {
    match objects.get(k)? {
        Some(v) => Ok(Some(decode_object(v.value()).map_err(corrupt)?)),
        None => Ok(None),
    }
}

/// What a local write does to the key's copy.
enum LocalWrite {
    /// Replace every version held (`None`: a delete).
    Replace(Option<Vec<u8>>),
    /// Replace the versions the context saw; keep the others as siblings.
    InContext(Option<Vec<u8>>, VersionVector),
    /// Apply an operation to the conflict-free state.
    Op(CrdtOp, meridian_core::crdt::CrdtKind),
}

fn apply_command(
    t: &mut Tables<'_, '_>,
    applied: &mut AppliedState,
    region: &RegionId,
    cmd: CommandV1,
) -> Result<CommandResult, redb::Error> {
    let (dataset, key, hlc, condition, write) = match cmd {
        CommandV1::Put { dataset, key, value, hlc, condition } => {
            (dataset, key, hlc, condition, LocalWrite::Replace(Some(value)))
        }
        CommandV1::Delete { dataset, key, hlc, condition } => (dataset, key, hlc, condition, LocalWrite::Replace(None)),
        CommandV1::PutInContext { dataset, key, value, hlc, condition, context } => {
            (dataset, key, hlc, condition, LocalWrite::InContext(value, context))
        }
        CommandV1::Op { dataset, key, op, kind, hlc, condition } => {
            (dataset, key, hlc, condition, LocalWrite::Op(op, kind))
        }
        CommandV1::Batch(cmds) => {
            let results =
                cmds.into_iter().map(|c| apply_command(t, applied, region, c)).collect::<Result<Vec<_>, _>>()?;
            return Ok(CommandResult::Batch(results));
        }
        CommandV1::Atomic(cmds) => {
            // All conditions against the state before any write; then every write. The
            // gateway refuses duplicate keys, so no write can change another's condition.
            for (index, c) in cmds.iter().enumerate() {
                let (dataset, key, condition) = match c {
                    CommandV1::Put { dataset, key, condition, .. }
                    | CommandV1::Delete { dataset, key, condition, .. }
                    | CommandV1::PutInContext { dataset, key, condition, .. }
                    | CommandV1::Op { dataset, key, condition, .. }
                    | CommandV1::Check { dataset, key, condition } => (dataset, key, condition),
                    // Nested groups are refused before proposing; applying one would be a bug.
                    CommandV1::Batch(_)
                    | CommandV1::Atomic(_)
                    | CommandV1::ApplyRemote { .. }
                    | CommandV1::ApplyRemoteAt { .. }
                    | CommandV1::ApplyChanges { .. }
                    | CommandV1::SetCursor { .. }
                    | CommandV1::Repair { .. }
                    | CommandV1::RepairChanges { .. }
                    | CommandV1::CollectTombstones { .. }
                    | CommandV1::Purge { .. }
                    | CommandV1::SetBackfilled { .. } => {
                        return Ok(CommandResult::AtomicFailed { index: index as u32, current: None })
                    }
                };
                let live = live_version(t.objects, dataset, key)?;
                if !condition_holds(condition, live.as_ref()) {
                    return Ok(CommandResult::AtomicFailed { index: index as u32, current: live });
                }
            }
            let results =
                cmds.into_iter().map(|c| apply_command(t, applied, region, c)).collect::<Result<Vec<_>, _>>()?;
            return Ok(CommandResult::Batch(results));
        }
        CommandV1::ApplyRemote { source, from_seq, upto_seq, changes } => {
            return apply_remote(t, applied, source, from_seq, upto_seq, legacy_changes(changes));
        }
        CommandV1::ApplyRemoteAt { source, from_seq, upto_seq, fresh_ms, changes } => {
            return apply_remote_at(t, applied, source, from_seq, upto_seq, fresh_ms, legacy_changes(changes));
        }
        CommandV1::ApplyChanges { source, from_seq, upto_seq, fresh_ms, changes } => {
            return apply_remote_at(t, applied, source, from_seq, upto_seq, fresh_ms, changes);
        }
        CommandV1::SetCursor { destination, upto_seq } => {
            t.replication.cursors.insert(destination, upto_seq);
            return Ok(CommandResult::Nothing);
        }
        CommandV1::SetBackfilled { destination, epoch } => {
            t.replication.backfilled.insert(destination, epoch);
            return Ok(CommandResult::Nothing);
        }
        CommandV1::Repair { source, changes } => return apply_repair(t, applied, source, legacy_changes(changes)),
        CommandV1::RepairChanges { source, changes } => return apply_repair(t, applied, source, changes),
        CommandV1::Purge { dataset, keys } => {
            let mut removed = 0u32;
            for (key, version) in keys {
                let k = object_key(&dataset, &key);
                let current = get_object(t.objects, &k)?;
                if dataset.starts_with('_') || current.is_none_or(|o| o.version != version) {
                    continue;
                }
                t.objects.remove(k.as_slice())?;
                // Its conflict records hold its values: they leave with it.
                remove_conflicts_of(t, &dataset, &key)?;
                removed += 1;
            }
            t.replication.purged += u64::from(removed);
            return Ok(CommandResult::Purged { removed });
        }
        CommandV1::CollectTombstones { dataset, keys } => {
            let mut removed = 0u32;
            for (key, expected) in keys {
                let k = object_key(&dataset, &key);
                let current = get_object(t.objects, &k)?;
                if dataset.starts_with('_') || !expected.is_bare_tombstone() || current.as_ref() != Some(&expected) {
                    continue;
                }
                t.objects.remove(k.as_slice())?;
                removed += 1;
            }
            if removed > 0 {
                let meta = &mut *t.meta;
                let before: u64 = match meta.get(META_TOMBSTONES_COLLECTED)? {
                    Some(v) => decode(v.value()).map_err(corrupt)?,
                    None => 0,
                };
                meta.insert(META_TOMBSTONES_COLLECTED, encode(&(before + u64::from(removed))).as_slice())?;
            }
            return Ok(CommandResult::Collected { removed });
        }
        CommandV1::Check { dataset, key, condition } => {
            let live = live_version(t.objects, &dataset, &key)?;
            return Ok(if condition_holds(&condition, live.as_ref()) {
                CommandResult::Nothing
            } else {
                CommandResult::PreconditionFailed { current: live }
            });
        }
    };
    let k = object_key(&dataset, &key);
    let old = get_object(t.objects, &k)?;
    let live = old.as_ref().filter(|o| o.is_live()).map(|o| o.version.clone());
    if !condition_holds(&condition, live.as_ref()) {
        return Ok(CommandResult::PreconditionFailed { current: live });
    }
    let deletes =
        matches!(&write, LocalWrite::Replace(None) | LocalWrite::InContext(None, _) | LocalWrite::Op(CrdtOp::Clear, _));
    if deletes && live.is_none() {
        return Ok(CommandResult::NotFound);
    }
    // The state an operation applies to, checked before anything is stamped: an operation of
    // another kind than the key holds writes nothing.
    let mut state = None;
    if let LocalWrite::Op(op, kind) = &write {
        let current = match old.as_ref() {
            Some(o) => match &o.crdt {
                Some(c) => c.clone(),
                None if !o.is_live() => CrdtObject::new(*kind),
                None => return Ok(CommandResult::KindMismatch { held: None }),
            },
            None => CrdtObject::new(*kind),
        };
        if let Some(wanted) = op.kind() {
            if wanted != current.state.kind() {
                return Ok(CommandResult::KindMismatch { held: Some(current.state.kind()) });
            }
        }
        state = Some(current);
    }
    // Pure function of the log: the stamp is the leader's reading, pushed past every stamp
    // applied before it, so versions in a region strictly increase even across leaders
    // whose clocks disagree.
    let hlc = hlc.max(applied.last_hlc.successor());
    applied.last_hlc = hlc;
    applied.region_seq += 1;
    let version = Version { hlc, region: region.clone(), seq: applied.region_seq };
    // The new version has seen everything this region holds of the key.
    let mut vv = old.as_ref().map(|o| o.vv.clone()).unwrap_or_default();
    vv.add(&dot_of(&version));
    let obj = match write {
        LocalWrite::Replace(value) => {
            StoredObject { version: version.clone(), value, vv, siblings: Vec::new(), crdt: None }
        }
        LocalWrite::InContext(value, context) => {
            let mut kept: Vec<Sibling> = match old.as_ref() {
                Some(o) => {
                    merge::siblings_of(o).into_iter().filter(|s| !context.contains(&dot_of(&s.version))).collect()
                }
                None => Vec::new(),
            };
            kept.push(Sibling { version: version.clone(), value });
            vv.merge(&context);
            merge::assemble(kept, vv, MergeRule::Siblings, t.values_max)
        }
        LocalWrite::Op(op, _) => {
            let mut c = state.expect("taken above");
            c.apply(&op, region, &Stamp { hlc, region: region.clone() }).expect("the kind was checked above");
            StoredObject { version: version.clone(), value: merge::render(&c), vv, siblings: Vec::new(), crdt: Some(c) }
        }
    };
    let deleted = !obj.is_live();
    t.objects.insert(k.as_slice(), encode_object(&obj).as_slice())?;
    // The outbox records the key under the write's sequence, for the links. Reserved
    // namespaces (`_...`, never a dataset name) are not shipped by links.
    if !dataset.starts_with('_') {
        let seq = applied.region_seq;
        t.outbox.insert(seq, encode(&OutboxEntry { dataset: dataset.clone(), key: key.clone() }).as_slice())?;
        // Trim to the bound. The bound may have shrunk since the last write, so drop every
        // entry at or below the cut, not just one.
        if seq > t.outbox_max {
            let cut = seq - t.outbox_max;
            t.replication.outbox_trimmed = t.replication.outbox_trimmed.max(cut);
            loop {
                let first = t.outbox.first()?.map(|(k, _)| k.value());
                match first {
                    Some(first) if first <= cut => {
                        t.outbox.remove(first)?;
                    }
                    _ => break,
                }
            }
        }
    }
    Ok(if deleted {
        CommandResult::Deleted { version }
    } else {
        CommandResult::Written { version, created: live.is_none() }
    })
}

/// Changes in the form before version vectors: each is its version alone, merged by the
/// winner by time (what every dataset merged by then).
fn legacy_changes(changes: Vec<RemoteChange>) -> Vec<Change> {
    changes
        .into_iter()
        .map(|c| Change {
            dataset: c.dataset,
            key: c.key,
            object: StoredObject::plain(c.version, c.value),
            rule: MergeRule::Lww,
        })
        .collect()
}

/// [`apply_remote`], recording how fresh the range is when it joined up.
fn apply_remote_at(
    t: &mut Tables<'_, '_>,
    applied: &mut AppliedState,
    source: String,
    from_seq: u64,
    upto_seq: u64,
    fresh_ms: u64,
    changes: Vec<Change>,
) -> Result<CommandResult, redb::Error> {
    let result = apply_remote(t, applied, source.clone(), from_seq, upto_seq, changes)?;
    // Only a range that joined up with what is merged says anything about freshness.
    if matches!(result, CommandResult::Remote { .. }) {
        let f = t.replication.fresh.entry(source).or_default();
        *f = (*f).max(fresh_ms);
    }
    Ok(result)
}

/// Changes sent outside the sequenced link (catch-up, backfill, repair): each merged by
/// causality; the merged ranges do not move.
fn apply_repair(
    t: &mut Tables<'_, '_>,
    applied: &mut AppliedState,
    source: String,
    changes: Vec<Change>,
) -> Result<CommandResult, redb::Error> {
    let mut applied_n = 0u32;
    for c in changes {
        applied_n += u32::from(merge_change(t, applied, &source, c)?);
    }
    *t.replication.repaired.entry(source).or_default() += u64::from(applied_n);
    Ok(CommandResult::Repaired { applied: applied_n })
}

/// Merge a batch another region shipped: exactly once per source sequence range, each change
/// merged by causality (the same change arriving twice is a no-op), and the HLC pushed past
/// every version merged so later local writes order after.
fn apply_remote(
    t: &mut Tables<'_, '_>,
    applied: &mut AppliedState,
    source: String,
    from_seq: u64,
    upto_seq: u64,
    changes: Vec<Change>,
) -> Result<CommandResult, redb::Error> {
    let merged = t.replication.merged.get(&source).copied().unwrap_or(0);
    if from_seq > merged + 1 {
        return Ok(CommandResult::RemoteGap { merged_upto: merged });
    }
    if upto_seq <= merged {
        return Ok(CommandResult::Remote { merged_upto: merged, applied: 0 });
    }
    let source_region = RegionId::new(source.as_str()).ok();
    let mut applied_n = 0u32;
    let mut received = 0u64;
    for c in changes {
        // The source's write a change carries is its newest dot of the source: a batch that
        // overlaps what is merged carries writes merged (and counted) before.
        let seq = source_region.as_ref().map_or(0, |r| c.object.vv.get(r));
        if seq <= merged || seq > upto_seq {
            continue;
        }
        received += 1;
        applied_n += u32::from(merge_change(t, applied, &source, c)?);
    }
    *t.replication.received.entry(source.clone()).or_default() += received;
    t.replication.merged.insert(source, upto_seq);
    Ok(CommandResult::Remote { merged_upto: upto_seq, applied: applied_n })
}

/// Merge `c` into the local copy by causality and, for concurrent versions, the change's
/// rule; record a conflict in the same transaction when versions from both sides survive.
/// The HLC is pushed past every version merged so later local writes order after. Whether
/// the copy changed. Reserved namespaces never arrive from another region.
fn merge_change(
    t: &mut Tables<'_, '_>,
    applied: &mut AppliedState,
    source: &str,
    c: Change,
) -> Result<bool, redb::Error> {
    if c.dataset.starts_with('_') {
        return Ok(false);
    }
    let k = object_key(&c.dataset, &c.key);
    // Most changes are decided by the copy's vector alone: read only that, and decode the rest
    // of the copy from the same lookup only when the full merge needs it.
    let current = {
        let held = t.objects.get(k.as_slice())?;
        let held = held.as_ref().map(|g| g.value());
        let local_vv = held.map(decode_object_vv).transpose().map_err(corrupt)?;
        match merge::shortcut(local_vv.as_ref(), &c.object) {
            Some(Shortcut::Seen) => return Ok(false),
            Some(Shortcut::Replace) => None,
            None => Some(held.map(decode_object).transpose().map_err(corrupt)?),
        }
    };
    let Some(current) = current else {
        witness(applied, &c.object);
        t.objects.insert(k.as_slice(), encode_object(&c.object).as_slice())?;
        return Ok(true);
    };
    let newest = c.object.versions().map(|(v, _)| v.hlc).max().expect("an object has a version");
    let (object, met) = match merge::merge(current, c.object, c.rule, t.values_max) {
        Merge::Seen => return Ok(false),
        Merge::Changed { object, met } => (object, met),
    };
    applied.last_hlc = applied.last_hlc.max(newest);
    t.objects.insert(k.as_slice(), encode_object(&object).as_slice())?;
    if !met.is_empty() {
        let record = ConflictRecord {
            id: 0,
            dataset: c.dataset,
            key: c.key,
            rule: c.rule,
            source: source.to_owned(),
            versions: met,
            outcome: Sibling { version: object.version.clone(), value: object.value.clone() },
            at_ms: applied.last_hlc.wall_ms(),
        };
        record_conflict(t, record)?;
    }
    Ok(true)
}

/// Push the HLC past every version `obj` carries, so later local writes order after.
fn witness(applied: &mut AppliedState, obj: &StoredObject) {
    for (v, _) in obj.versions() {
        applied.last_hlc = applied.last_hlc.max(v.hlc);
    }
}

/// The version of the live value under (dataset, key), if there is one.
fn live_version(objects: &redb::Table<&[u8], &[u8]>, dataset: &str, key: &str) -> Result<Option<Version>, redb::Error> {
    let current = get_object(objects, &object_key(dataset, key))?;
    Ok(current.filter(StoredObject::is_live).map(|o| o.version))
}

fn condition_holds(condition: &Condition, live: Option<&Version>) -> bool {
    match condition {
        Condition::Always => true,
        Condition::IfMatch(v) => live == Some(v),
        Condition::IfAbsent => live.is_none(),
    }
}

impl StateMachineReader {
    /// The stored object (live or tombstone) under (dataset, key).
    pub fn get(&self, dataset: &str, key: &str) -> Result<Option<StoredObject>, redb::Error> {
        let txn = self.shared.db.begin_read()?;
        let objects = txn.open_table(OBJECTS)?;
        match objects.get(object_key(dataset, key).as_slice())? {
            Some(v) => Ok(Some(decode_object(v.value()).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    /// The conflict log's bookkeeping: records held, expired, and recorded per dataset and rule.
    pub fn conflict_log(&self) -> Result<ConflictLogState, redb::Error> {
        let txn = self.shared.db.begin_read()?;
        let meta = txn.open_table(META)?;
        read_conflict_log(&meta)
    }

    /// One conflict record and where it stands now.
    pub fn conflict(&self, id: u64) -> Result<Option<(ConflictRecord, ConflictState)>, redb::Error> {
        let txn = self.shared.db.begin_read()?;
        let conflicts = txn.open_table(CONFLICTS)?;
        let objects = txn.open_table(OBJECTS)?;
        let Some(v) = conflicts.get(id)? else { return Ok(None) };
        let rec: ConflictRecord = decode(v.value()).map_err(corrupt)?;
        let current = get_object(&objects, &object_key(&rec.dataset, &rec.key))?;
        let state = rec.state(current.as_ref());
        Ok(Some((rec, state)))
    }

    /// Up to `limit` conflict records newest first, with ids below `before`, that match the
    /// filter, each with where it stands now. A key narrows the scan to that key's records;
    /// otherwise the scan walks the log (bounded by its size limit).
    pub fn conflicts(&self, q: &ConflictQuery<'_>) -> Result<Vec<(ConflictRecord, ConflictState)>, redb::Error> {
        let ConflictQuery { dataset, key, state, before, limit } = *q;
        let txn = self.shared.db.begin_read()?;
        let conflicts = txn.open_table(CONFLICTS)?;
        let objects = txn.open_table(OBJECTS)?;
        let before = before.unwrap_or(u64::MAX);
        let mut out = Vec::new();
        let consider = |v: &[u8], out: &mut Vec<(ConflictRecord, ConflictState)>| -> Result<bool, redb::Error> {
            let rec: ConflictRecord = decode(v).map_err(corrupt)?;
            if dataset.is_some_and(|d| d != rec.dataset) || key.is_some_and(|k| k != rec.key) {
                return Ok(false);
            }
            let current = get_object(&objects, &object_key(&rec.dataset, &rec.key))?;
            let st = rec.state(current.as_ref());
            if state.is_none_or(|s| s == st) {
                out.push((rec, st));
            }
            Ok(out.len() >= limit)
        };
        match (dataset, key) {
            (Some(d), Some(k)) => {
                let by_key = txn.open_table(CONFLICTS_BY_KEY)?;
                let from = conflict_index_key(d, k, 0);
                let to = conflict_index_key(d, k, before.saturating_sub(1));
                if before > 0 {
                    for item in by_key.range(from.as_slice()..=to.as_slice())?.rev() {
                        let id = item?.1.value();
                        if let Some(v) = conflicts.get(id)? {
                            if consider(v.value(), &mut out)? {
                                break;
                            }
                        }
                    }
                }
            }
            _ => {
                for item in conflicts.range(..before)?.rev() {
                    let (_, v) = item?;
                    if consider(v.value(), &mut out)? {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Up to `limit` outbox entries after sequence `after`, in order.
    pub fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, OutboxEntry)>, redb::Error> {
        let txn = self.shared.db.begin_read()?;
        let outbox = txn.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for item in outbox.range(after.saturating_add(1)..)? {
            let (k, v) = item?;
            out.push((k.value(), decode(v.value()).map_err(corrupt)?));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// What this region has merged from the others, and how far its links are acknowledged;
    /// with the sequence of the last write it originated.
    pub fn replication(&self) -> Result<(ReplicationState, u64), redb::Error> {
        let txn = self.shared.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let replication = read_replication(&meta)?;
        let applied: AppliedState = match meta.get(META_APPLIED)? {
            Some(v) => decode(v.value()).map_err(corrupt)?,
            None => AppliedState::default(),
        };
        Ok((replication, applied.region_seq))
    }

    /// Tombstones this region has collected, ever.
    pub fn tombstones_collected(&self) -> Result<u64, redb::Error> {
        let txn = self.shared.db.begin_read()?;
        let meta = txn.open_table(META)?;
        match meta.get(META_TOMBSTONES_COLLECTED)? {
            Some(v) => decode(v.value()).map_err(corrupt),
            None => Ok(0),
        }
    }

    /// The highest HLC stamp this region has applied (its own writes' and every merged
    /// change's): the region's timestamps never go below it.
    pub fn last_hlc(&self) -> Result<HlcTimestamp, redb::Error> {
        let txn = self.shared.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let applied: AppliedState = match meta.get(META_APPLIED)? {
            Some(v) => decode(v.value()).map_err(corrupt)?,
            None => AppliedState::default(),
        };
        Ok(applied.last_hlc)
    }

    /// Live keys and their bytes (key plus value) per dataset, by a full scan: a planning
    /// estimate for policy changes, never on a request path.
    pub fn dataset_sizes(&self) -> Result<std::collections::BTreeMap<String, (u64, u64)>, redb::Error> {
        let txn = self.shared.db.begin_read()?;
        let objects = txn.open_table(OBJECTS)?;
        let mut sizes: std::collections::BTreeMap<String, (u64, u64)> = std::collections::BTreeMap::new();
        for item in objects.iter()? {
            let (k, v) = item?;
            let Some((ds, key)) = split_object_key(k.value()) else {
                return Err(corrupt("object key without dataset"));
            };
            let obj = decode_object(v.value()).map_err(corrupt)?;
            if let Some(value) = &obj.value {
                let entry = sizes.entry(ds.to_owned()).or_default();
                entry.0 += 1;
                entry.1 += (key.len() + value.len()) as u64;
            }
        }
        Ok(sizes)
    }

    /// Up to `limit` stored objects (tombstones too) after `after` in (dataset, key) order,
    /// across every dataset, skipping reserved namespaces; `dataset` narrows the scan to one.
    /// For catch-up, backfill, purge and digests: never on a request path.
    pub fn scan(
        &self,
        dataset: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> Result<Vec<(String, String, StoredObject)>, redb::Error> {
        let txn = self.shared.db.begin_read()?;
        let objects = txn.open_table(OBJECTS)?;
        let start = match (after, dataset) {
            (Some((ds, key)), _) => {
                let mut s = object_key(ds, key);
                s.push(0); // the smallest key strictly after it
                s
            }
            (None, Some(ds)) => object_key(ds, ""),
            (None, None) => Vec::new(),
        };
        let mut out = Vec::new();
        for item in objects.range(start.as_slice()..)? {
            let (k, v) = item?;
            let Some((ds, key)) = split_object_key(k.value()) else {
                return Err(corrupt("object key without dataset"));
            };
            if dataset.is_some_and(|d| d != ds) {
                break;
            }
            if ds.starts_with('_') {
                continue;
            }
            out.push((ds.to_owned(), key.to_owned(), decode_object(v.value()).map_err(corrupt)?));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Up to `limit` live objects of `dataset` whose keys start with `prefix` and sort after
    /// `after`, in key order.
    pub fn list(
        &self,
        dataset: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, StoredObject)>, redb::Error> {
        let txn = self.shared.db.begin_read()?;
        let objects = txn.open_table(OBJECTS)?;
        let start = match after {
            Some(a) if a >= prefix => {
                let mut s = object_key(dataset, a);
                s.push(0); // the smallest key strictly after `a`
                s
            }
            _ => object_key(dataset, prefix),
        };
        let mut out = Vec::new();
        for item in objects.range(start.as_slice()..)? {
            let (k, v) = item?;
            let Some((ds, key)) = split_object_key(k.value()) else {
                return Err(corrupt("object key without dataset"));
            };
            if ds != dataset || !key.starts_with(prefix) {
                break;
            }
            let obj = decode_object(v.value()).map_err(corrupt)?;
            if obj.is_live() {
                out.push((key.to_owned(), obj));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}

/// Builds snapshots from a consistent read of the state machine.
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let build = || -> Result<(SnapshotMeta, Vec<u8>), redb::Error> {
            let mut counter = self.shared.snapshot_lock.lock().expect("snapshot lock");
            // Take the read view first, then make everything committed so far durable: the
            // state the snapshot describes is then on disk before openraft may purge the log
            // up to it (applies keep running concurrently; anything they commit after the
            // read is not described).
            let r = self.shared.db.begin_read()?;
            let txn = self.shared.db.begin_write()?;
            txn.commit()?;
            let meta_t = r.open_table(META)?;
            let applied: AppliedState = match meta_t.get(META_APPLIED)? {
                Some(v) => decode(v.value()).map_err(corrupt)?,
                None => AppliedState::default(),
            };
            let objects_t = r.open_table(OBJECTS)?;
            let mut objects = Vec::new();
            for item in objects_t.iter()? {
                let (k, v) = item?;
                objects.push((k.value().to_vec(), v.value().to_vec()));
            }
            let replication = read_replication(&meta_t)?;
            let outbox_t = r.open_table(OUTBOX)?;
            let mut outbox = Vec::new();
            for item in outbox_t.iter()? {
                let (k, v) = item?;
                outbox.push((k.value(), v.value().to_vec()));
            }
            // The commit above made at least the state read here durable.
            self.shared.durable.fetch_max(index_of(applied.last_applied), Ordering::SeqCst);
            *counter += 1;
            let last = applied.last_applied;
            let snapshot_id = match last {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, *counter),
                None => format!("none-{}", *counter),
            };
            let meta = SnapshotMeta { last_log_id: last, last_membership: applied.membership.clone(), snapshot_id };
            let conflict_log = read_conflict_log(&meta_t)?;
            let conflicts_t = r.open_table(CONFLICTS)?;
            let mut conflicts = Vec::new();
            for item in conflicts_t.iter()? {
                let (k, v) = item?;
                conflicts.push((k.value(), v.value().to_vec()));
            }
            let tombstones_collected: u64 = match meta_t.get(META_TOMBSTONES_COLLECTED)? {
                Some(v) => decode(v.value()).map_err(corrupt)?,
                None => 0,
            };
            let data =
                SnapshotData { applied, objects, replication, outbox, conflict_log, conflicts, tombstones_collected }
                    .encode();
            write_snapshot_file(&self.shared.snapshot_path, &meta, &data).map_err(redb::Error::Io)?;
            Ok((meta, data))
        };
        let (meta, data) = build().map_err(|e| StorageIOError::write_snapshot(None, &sm_err(e)))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

/// Write the current snapshot atomically: a temporary file, fsync, rename, fsync the folder.
fn write_snapshot_file(path: &Path, meta: &SnapshotMeta, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode(&SnapshotFile { meta: meta.clone(), data: data.to_vec() }))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let last = entries.last().map(|e| e.log_id);
        if let (Some(durability), Some(last)) = (&self.log_durability, last) {
            durability.wait_through(last.index).await.map_err(|e| StorageIOError::apply(last, &e))?;
        }
        self.apply_batch(entries).map_err(|e| match last {
            Some(l) => StorageIOError::apply(l, &sm_err(e)).into(),
            None => StorageIOError::write_state_machine(&sm_err(e)).into(),
        })
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { shared: self.shared.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let install = || -> Result<(AppliedState, ReplicationState, ConflictLogState), redb::Error> {
            let _guard = self.shared.snapshot_lock.lock().expect("snapshot lock");
            let snap = SnapshotData::decode_any(&data).map_err(corrupt)?;
            if snap.applied.last_applied != meta.last_log_id {
                return Err(corrupt(format!(
                    "snapshot data ends at {:?} but its meta says {:?}",
                    snap.applied.last_applied, meta.last_log_id
                )));
            }
            let txn = self.shared.db.begin_write()?;
            {
                let mut objects = txn.open_table(OBJECTS)?;
                objects.retain(|_, _| false)?;
                for (k, v) in &snap.objects {
                    objects.insert(k.as_slice(), v.as_slice())?;
                }
                let mut outbox = txn.open_table(OUTBOX)?;
                outbox.retain(|_, _| false)?;
                for (k, v) in &snap.outbox {
                    outbox.insert(*k, v.as_slice())?;
                }
                // The conflict log, with its index rebuilt from the records.
                let mut conflicts = txn.open_table(CONFLICTS)?;
                conflicts.retain(|_, _| false)?;
                let mut by_key = txn.open_table(CONFLICTS_BY_KEY)?;
                by_key.retain(|_, _| false)?;
                for (id, v) in &snap.conflicts {
                    let rec: ConflictRecord = decode(v).map_err(corrupt)?;
                    conflicts.insert(*id, v.as_slice())?;
                    by_key.insert(conflict_index_key(&rec.dataset, &rec.key, *id).as_slice(), *id)?;
                }
                let mut meta_t = txn.open_table(META)?;
                meta_t.insert(META_CONFLICTS, encode(&snap.conflict_log).as_slice())?;
                meta_t.insert(META_TOMBSTONES_COLLECTED, encode(&snap.tombstones_collected).as_slice())?;
                meta_t.insert(META_APPLIED, encode(&snap.applied).as_slice())?;
                meta_t.insert(META_REPLICATION, encode(&snap.replication).as_slice())?;
                meta_t.remove(META_REPLICATION_V1)?;
            }
            txn.commit()?;
            self.shared.durable.store(index_of(snap.applied.last_applied), Ordering::SeqCst);
            write_snapshot_file(&self.shared.snapshot_path, meta, &data).map_err(redb::Error::Io)?;
            Ok((snap.applied, snap.replication, snap.conflict_log))
        };
        let (applied, replication, conflict_log) =
            install().map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &sm_err(e)))?;
        self.applied = applied;
        self.replication = replication;
        self.conflict_log = conflict_log;
        self.unsynced_entries = 0;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let bytes = match std::fs::read(&self.shared.snapshot_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageIOError::read_snapshot(None, &e).into()),
        };
        let file: SnapshotFile = decode(&bytes).map_err(|e| StorageIOError::read_snapshot(None, &sm_err(e)))?;
        Ok(Some(Snapshot { meta: file.meta, snapshot: Box::new(Cursor::new(file.data)) }))
    }
}
