//! Bodies of the fault-injection API under `/v1/admin/chaos` (admin only).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The faults on the link between two regions (both directions).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkFaultBody {
    /// The two regions, in any order.
    pub regions: [String; 2],
    /// No message crosses; calls fail at once as unreachable.
    #[serde(default)]
    pub cut: bool,
    /// Replaces the configured one-way delay, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Up to this much extra one-way delay per message, in milliseconds.
    #[serde(default)]
    pub jitter_ms: u64,
    /// Share of messages lost, 0 to 100.
    #[serde(default)]
    pub loss_percent: u8,
}

/// `GET /v1/admin/chaos` and the answer to every change: the table the node now holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ChaosStatus {
    pub links: Vec<LinkFaultBody>,
    /// Nodes the change could not reach (they keep their previous table).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreached_nodes: Vec<u64>,
}

/// One link from the region it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LinkStatus {
    pub destination: String,
    /// The destination has acknowledged this region's changes up to this sequence.
    pub acknowledged_seq: u64,
    /// Writes this region originated that the link has not had acknowledged yet (withheld ones
    /// included: they are acknowledged as part of a range).
    pub lag_changes: u64,
    /// The policy epoch whose backfill this link has completed, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfilled_epoch: Option<u64>,
    /// What the shipper on the region's leader reports; absent when no leader answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipper: Option<LinkShipper>,
}

/// A link's shipper, as the leader running it reports it (in memory: counts restart with
/// leadership).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LinkShipper {
    /// `ok`, `backoff` (failing; retrying with backoff), or `congested` (round trips degraded;
    /// loose-budget datasets deferred).
    pub state: String,
    pub batches_in_flight: u32,
    /// Failed attempts in a row.
    pub failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub goodput_bytes_per_sec: Option<u64>,
    pub batches: u64,
    pub errors: u64,
    /// Bytes of its batches and scans as encoded, and on the wire after compression.
    pub sent_bytes_raw: u64,
    pub sent_bytes_wire: u64,
    /// Changes held back in the window last read, by reason (`schedule`, `rate`, `congestion`).
    pub deferred: Vec<(String, u64)>,
    /// The age of the oldest waiting change, in seconds (0: none waits).
    pub lag_seconds: f64,
    pub queued_changes: u64,
    pub queued_bytes: u64,
    pub datasets: Vec<LinkDatasetStatus>,
}

/// One dataset on one link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LinkDatasetStatus {
    pub dataset: String,
    /// Changes waiting in the window of the outbox the link last read (one batch), their key
    /// and value bytes, and the age of the oldest.
    pub queued_changes: u64,
    pub queued_bytes: u64,
    pub lag_seconds: f64,
    /// Changes sent in batches, and their key and value bytes.
    pub sent_changes: u64,
    pub sent_bytes: u64,
}

/// One region's replication state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegionReplicationStatus {
    pub region: String,
    pub reachable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_by: Option<u64>,
    /// Sequence of the last write the region originated.
    pub region_seq: u64,
    pub links: Vec<LinkStatus>,
    /// Source region → everything it originated up to this sequence is merged here.
    pub merged: Vec<(String, u64)>,
    /// Source region → changes merged through its link, each sequence counted once.
    #[serde(default)]
    pub received: Vec<(String, u64)>,
    /// Sending region → changes applied here by catch-up, backfill or anti-entropy repair.
    #[serde(default)]
    pub repaired: Vec<(String, u64)>,
    /// Copies removed here because the policy no longer lets the region hold them.
    #[serde(default)]
    pub purged: u64,
    /// Outbox entries up to this sequence were trimmed (links behind it catch up by a scan).
    #[serde(default)]
    pub outbox_trimmed: u64,
    /// The policy epoch this region's copy has active (0: none).
    #[serde(default)]
    pub policy_epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One dataset of one region pair, compared by digest over what both regions may hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DatasetVerification {
    pub dataset: String,
    /// Objects (tombstones too) each side holds that both may hold.
    pub count_a: u64,
    pub count_b: u64,
    pub equal: bool,
}

/// One region pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PairVerification {
    pub a: String,
    pub b: String,
    pub datasets: Vec<DatasetVerification>,
    /// Why the pair could not be compared (unreachable, or policy copies at different epochs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Query of `GET /v1/replication/verify`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct VerifyQuery {
    /// Compare only this dataset.
    pub dataset: Option<String>,
}

/// `GET /v1/replication/verify`: every pair of regions compared by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VerifyReport {
    /// Every pair was compared and every dataset's copies are equal.
    pub converged: bool,
    pub pairs: Vec<PairVerification>,
}

/// `GET /v1/replication`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReplicationStatus {
    pub regions: Vec<RegionReplicationStatus>,
}

/// `POST /v1/admin/chaos/partition` and `/heal`: a region pair (`heal` with none heals all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegionPair {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<[String; 2]>,
}
