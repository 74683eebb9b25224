//! The node-to-node protocol: what one node asks another, and the answers.
//!
//! Bodies are postcard. The outer enums are the protocol version: a node that receives a
//! version it does not know answers with an error rather than guessing. Errors cross the
//! wire as typed variants, never as Rust `Display` strings to be parsed.

use meridian_core::RegionId;
use meridian_raft::network::{RaftReply, RaftRequest};
use meridian_raft::{CommandResult, Condition, StoredObject};
use serde::{Deserialize, Serialize};

/// Path of the peer endpoint on every node's peer listener.
pub const PEER_PATH: &str = "/peer/v1";
/// Largest peer message body accepted, in bytes (Raft batches of large values).
pub const PEER_BODY_BYTES_MAX: usize = 256 * 1024 * 1024;

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    V1(PeerRequestV1),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequestV1 {
    Raft(RaftRequest),
    /// A client write forwarded to the region's leader.
    Write(WriteRequest),
    /// A strong read forwarded to the region's leader.
    Read {
        dataset: String,
        key: String,
    },
    /// A strong listing forwarded to the region's leader.
    List {
        dataset: String,
        prefix: String,
        after: Option<String>,
        limit: u32,
    },
    /// This node's view of its region's Raft group.
    Status,
    /// Writes that apply together or not at all, forwarded to a region's leader.
    WriteAtomic(Vec<WriteRequest>),
    /// Live keys and bytes per dataset in the answering node's state machine (a planning
    /// estimate; any node of the region may answer).
    DatasetSizes,
    /// Replace the node's fault-injection table (exempt from the faults it sets).
    SetFaults(Vec<crate::chaos::FaultEntry>),
    /// A link's batch, to the destination region's leader.
    ShipBatch(ShipBatch),
    /// The answering node's view of its region's replication state.
    ReplicationState,
    /// Changes outside the sequenced link (catch-up, backfill), to the destination's leader.
    Repair(RepairBatch),
    /// Per-dataset digests of what the answering region holds that region `with` may hold too.
    Digest {
        with: String,
    },
    /// Keys and versions in some digest buckets of one dataset (anti-entropy's second step).
    DigestEntries {
        with: String,
        dataset: String,
        buckets: Vec<u8>,
        limit: u32,
    },
    /// Objects for anti-entropy repair; the answer leaves out whatever `with` may not hold.
    FetchObjects {
        with: String,
        dataset: String,
        keys: Vec<String>,
    },
    /// A read of the answering node's own copy, for the levels that need no leader (`local`,
    /// `eventual`, `bounded`): served only if the node's region holds a copy of the key under
    /// its own policy, region `to` (the asking gateway's) may hold the key's bytes, and the
    /// copy meets `need`; refused otherwise (`NoCopy`, `Stale`). Any node of the region may
    /// answer. `home`: the user-locality attribute, for a user-homed key without a prefix.
    ReadCopy {
        dataset: String,
        key: String,
        home: Option<String>,
        to: String,
        need: CopyNeed,
    },
    /// A listing of the answering node's own copy, on the terms of `ReadCopy` (placed by the
    /// prefix, as the gateway places a listing).
    ListCopy {
        dataset: String,
        prefix: String,
        after: Option<String>,
        limit: u32,
        home: Option<String>,
        to: String,
        need: CopyNeed,
    },
    /// This region's failover records: its promotions and the newest `events` entries of its
    /// history (any node of the region may answer).
    Failover {
        events: u32,
    },
    /// Promote the answering region for `dataset` (to its leader), as an operator asked.
    Promote {
        dataset: String,
        force: bool,
    },
    /// End the answering region's promotion for `dataset` (to its leader), as an operator
    /// asked.
    EndPromotion {
        dataset: String,
    },
    /// Tombstones their origin region `source` found held alike everywhere: the answering
    /// region's leader removes each that is still exactly the given object.
    CollectTombstones {
        source: String,
        dataset: String,
        keys: Vec<(String, StoredObject)>,
    },
}

/// What a copy must meet to serve a read (`ReadCopy`, `ListCopy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyNeed {
    /// At most this stale, in milliseconds (`None`: any copy will do). A home's copy is never
    /// stale; a mirror's staleness is the time since the moment as of which it has merged
    /// everything every home committed.
    pub max_staleness_ms: Option<u64>,
    /// Source region → sequence the copy must have applied (a `session` read: its own
    /// region's writes by its region sequence, another's by what it has merged from it).
    pub applied: Vec<(RegionId, u64)>,
}

/// Changes sent outside a link's sequenced range: each applies only if newer than the copy
/// held, and the merged ranges do not move.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairBatch {
    pub source: String,
    /// The policy epoch the sender filtered by; the receiver refuses a batch under another.
    pub epoch: u64,
    pub changes: Vec<meridian_raft::command::Change>,
}

/// Per-dataset digests of a region's copies, restricted to what two regions may both hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDigest {
    /// The policy epoch the filter used; digests under different epochs are not compared.
    pub epoch: u64,
    pub datasets: Vec<DatasetDigest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetDigest {
    pub dataset: String,
    /// Objects (tombstones too) counted.
    pub count: u64,
    /// [`crate::repair::DIGEST_BUCKETS`] sums of the objects' hashes, by the hash's first byte.
    pub buckets: Vec<u64>,
}

/// The changes a source region's link ships: its outbox range `from_seq..=upto_seq`, with the
/// changes its filter let through (the others are simply absent).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShipBatch {
    pub source: String,
    pub from_seq: u64,
    pub upto_seq: u64,
    /// The epoch of the policy entry the source filtered by (its history entry names the
    /// versions, for audit); the destination refuses a batch
    /// filtered under another entry than its own, so neither side's stale copy loses data.
    pub epoch: u64,
    /// Everything the source committed before this instant (its wall clock, ms) is at or below
    /// `upto_seq`; 0 when the range does not reach that far (a change waits, or more follow).
    pub fresh_ms: u64,
    pub changes: Vec<meridian_raft::command::Change>,
    /// Changes past `upto_seq` sent ahead of the range (behind a change that waits for its
    /// schedule or its rate limit): merged if newer, without moving the range.
    pub early: Vec<meridian_raft::command::Change>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    V1(PeerResponseV1),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponseV1 {
    Raft(RaftReply),
    Write(Result<CommandResult, PeerError>),
    Read(Result<Option<StoredObject>, PeerError>),
    List(Result<Vec<(String, StoredObject)>, PeerError>),
    Status(RegionReport),
    /// The request itself could not be handled (e.g. an unknown protocol version).
    Refused(PeerError),
    DatasetSizes(Result<Vec<(String, u64, u64)>, PeerError>),
    FaultsSet,
    Shipped(Result<CommandResult, PeerError>),
    ReplicationState(Result<RegionReplication, PeerError>),
    Repaired(Result<CommandResult, PeerError>),
    Digest(Result<RegionDigest, PeerError>),
    /// Keys and the version vectors of their copies.
    DigestEntries(Result<Vec<(String, meridian_core::VersionVector)>, PeerError>),
    Objects(Result<Vec<(String, StoredObject)>, PeerError>),
    Collected(Result<CommandResult, PeerError>),
    Failover(Result<(Vec<crate::failover::Promotion>, Vec<crate::failover::FailoverEvent>), PeerError>),
    Promotion(Result<Option<crate::failover::Promotion>, PeerError>),
}

/// One region's replication state as one of its nodes has applied it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionReplication {
    /// The node that answered.
    pub node: u64,
    /// Sequence of the last write the region originated.
    pub region_seq: u64,
    /// Destination region → acknowledged up to this sequence.
    pub cursors: Vec<(String, u64)>,
    /// Source region → merged up to this sequence.
    pub merged: Vec<(String, u64)>,
    /// Source region → changes merged through its link (each sequence counted once).
    pub received: Vec<(String, u64)>,
    /// Sending region → changes applied by catch-up, backfill or repair.
    pub repaired: Vec<(String, u64)>,
    /// Destination region → the policy epoch its link has backfilled.
    pub backfilled: Vec<(String, u64)>,
    /// Copies removed because the policy no longer lets this region hold them.
    pub purged: u64,
    /// Outbox entries up to here were trimmed.
    pub outbox_trimmed: u64,
    /// The policy epoch this node's copy has active (0: none).
    pub epoch: u64,
    /// The links this node runs (only a region's leader runs them).
    pub links: Vec<LinkReport>,
}

/// What a link's shipper knows about itself (kept in memory on the leader that runs it).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LinkReport {
    pub destination: String,
    pub batches_in_flight: u32,
    /// Failed attempts in a row; while above 0 the link backs off.
    pub failures: u32,
    pub last_error: Option<String>,
    /// Smoothed round trip of its batches, in microseconds.
    pub rtt_us: Option<u64>,
    /// Smoothed goodput of its batches, in bytes per second.
    pub goodput_bytes_per_sec: Option<u64>,
    pub congested: bool,
    /// Acknowledged batches and failed attempts since this node started leading.
    pub batches: u64,
    pub errors: u64,
    /// Message bytes of its batches and scans: encoded, and on the wire after compression.
    pub sent_bytes_raw: u64,
    pub sent_bytes_wire: u64,
    /// Changes waiting this round, by reason: schedule, rate, congestion.
    pub deferred: Vec<(String, u64)>,
    pub datasets: Vec<LinkDatasetReport>,
}

/// One dataset on one link.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LinkDatasetReport {
    pub dataset: String,
    /// Changes waiting in the window of the outbox the link last read, their key and value
    /// bytes, and the age of the oldest, in milliseconds.
    pub queued_changes: u64,
    pub queued_bytes: u64,
    pub lag_ms: u64,
    /// Changes sent (in batches, ahead of the range, or by scans are not included) and their
    /// key and value bytes, since this node started leading.
    pub sent_changes: u64,
    pub sent_bytes: u64,
}

/// One write or an all-or-nothing group, as proposed to a region's Raft group.
#[derive(Debug, Clone)]
pub enum WriteOp {
    One(WriteRequest),
    Atomic(Vec<WriteRequest>),
}

impl WriteOp {
    pub fn requests(&self) -> &[WriteRequest] {
        match self {
            WriteOp::One(r) => std::slice::from_ref(r),
            WriteOp::Atomic(rs) => rs,
        }
    }
}

/// A client write, already validated by the gateway that took it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteRequest {
    pub dataset: String,
    pub key: String,
    /// The JSON text, or `None` to delete.
    #[serde(with = "meridian_core::byte_strings::option_bytes")]
    pub value: Option<Vec<u8>>,
    pub condition: Condition,
    /// What the write does to the versions the key holds.
    pub effect: WriteEffect,
}

/// What a client write does to the versions a key holds. The leader turns it into a command
/// by the dataset's kind and conflict rule under its own copy of the policy, and refuses the
/// combinations that would have no meaning (`NodeError::WrongOperation`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteEffect {
    /// Replace whatever the region holds (a delete of a counter, set or map key removes what
    /// the region has seen of it).
    Replace,
    /// Replace exactly the versions this causal context saw (`siblings` datasets).
    InContext(meridian_core::VersionVector),
    /// An operation on a counter, set or map.
    Op(meridian_core::crdt::CrdtOp),
}

/// Errors a peer answers with; each tells the caller what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PeerError {
    /// Not the leader (the request was not applied): retry at `leader`, or wait for one.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// The write reached the leader but nobody knows whether it was applied: never retry it
    /// blindly.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    #[error("clock refused: {0}")]
    ClockSkew(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error("protocol: {0}")]
    Protocol(String),
    /// This region is not a home for the key under its active policy: nothing was written.
    #[error("refused by policy: {0}")]
    PolicyRefused(String),
    /// The dataset's kind or rule does not take this write: nothing was written.
    #[error("{0}")]
    WrongOperation(String),
    /// The write would make the key's value larger than the value limit: nothing was written.
    #[error("{0}")]
    TooLarge(String),
    /// A copy read asked of a region that holds no copy of the key (or may not send it to the
    /// asking region) under its own policy.
    #[error("no copy here: {0}")]
    NoCopy(String),
    /// A failover target holding no active promotion for the write's dataset: nothing applied.
    #[error("not promoted: {0}")]
    NotPromoted(String),
    /// A promotion the checks do not allow: nothing changed.
    #[error("promotion refused: {0}")]
    PromotionRefused(String),
    /// A session read whose copy here has not yet applied everything the session has seen.
    #[error("the copy here is behind the session: {0}")]
    Behind(String),
    /// A copy read whose copy here is staler than the read allows.
    #[error("{}", stale_text(*staleness_ms, *bound_ms))]
    Stale { staleness_ms: u64, bound_ms: u64 },
}

fn stale_text(staleness_ms: u64, bound_ms: u64) -> String {
    match staleness_ms {
        u64::MAX => format!("the copy here has not yet heard from every home (the bound is {bound_ms} ms)"),
        s => format!("the copy here is {s} ms stale (the bound is {bound_ms} ms)"),
    }
}

/// One node's view of its region's Raft group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionReport {
    pub node: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// Last entry covered by this node's latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Entries up to here were compacted away from this node's log.
    pub purged_index: Option<u64>,
}
