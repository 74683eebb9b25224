//! Request and response bodies of the public API.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// The version of one write. `etag` is its text form, usable in `If-Match`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VersionInfo {
    /// `WALL.LOGICAL@REGION:SEQ`, also sent as the `ETag` header.
    pub etag: String,
    /// HLC wall-clock part, milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// HLC logical counter.
    pub logical: u16,
    /// Region where the write originated.
    pub region: String,
    /// The origin region's write sequence.
    pub seq: u64,
}

impl From<&meridian_core::Version> for VersionInfo {
    fn from(v: &meridian_core::Version) -> Self {
        VersionInfo {
            etag: v.to_string(),
            wall_ms: v.hlc.wall_ms(),
            logical: v.hlc.logical(),
            region: v.region.to_string(),
            seq: v.seq,
        }
    }
}

/// Who served a request and why; also sent as the `Meridian-Served-By` and
/// `Meridian-Route-Reason` headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServedBy {
    pub region: String,
    pub zone: String,
    pub node: u64,
    /// `leader`, `local`, `forwarded-to-leader`, `forwarded-to-home`, `nearest-copy` or
    /// `fresh-copy` (docs/requests.md says when each is given).
    pub reason: String,
    /// The regions passed over on the way, in the order they were considered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedRegion>,
}

/// A region a request did not get an answer from, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SkippedRegion {
    pub region: String,
    /// `down` (marked down by the node's probes, not tried), `unreachable`, `no-leader`,
    /// `stale` (a bounded read's copy was staler than the bound) or `no-copy`.
    pub cause: String,
    /// The failure as the gateway saw it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PutResponse {
    pub dataset: String,
    pub key: String,
    pub version: VersionInfo,
    /// True when the key held no live value before this write.
    pub created: bool,
    pub served_by: ServedBy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GetResponse {
    pub dataset: String,
    pub key: String,
    /// The stored JSON value.
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
    pub version: VersionInfo,
    /// The key's causal context (`REGION:N,...`): send it back in the `Meridian-Context`
    /// header of a PUT or DELETE to supersede exactly the versions this read saw (datasets
    /// whose conflict rule is `siblings`). Also sent as the `Meridian-Context` header.
    pub context: String,
    /// For a `siblings` dataset holding concurrent versions: every one of them (the first is
    /// `value`); empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub siblings: Vec<SiblingInfo>,
    pub served_by: ServedBy,
}

/// One of several concurrent versions of a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SiblingInfo {
    pub version: VersionInfo,
    /// The JSON value; `null` with `deleted` for a concurrent delete.
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// The body of `POST /v1/datasets/{dataset}/keys/{key}/{op}`: the fields the operation takes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpRequest {
    /// `increment` and `decrement`: by how much (default 1, at most 2^53 - 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<u64>,
    /// `add` and `remove`: the set members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<String>>,
    /// `set`: field → JSON value; `delete`: a list of field names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub fields: Option<serde_json::Value>,
}

/// One conflict record: concurrent versions of a key that met in this region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConflictInfo {
    /// The region's number for it: ids are per region.
    pub id: u64,
    pub region: String,
    pub dataset: String,
    pub key: String,
    /// `lww`, `siblings` or `crdt`.
    pub rule: String,
    /// `open` (siblings wait for a choice), `resolved` (by the rule) or `superseded` (a
    /// later write replaced the versions).
    pub state: String,
    /// The region whose change met this region's copy.
    pub source: String,
    pub versions: Vec<SiblingInfo>,
    /// What a read answered with after the merge.
    pub outcome: SiblingInfo,
    /// HLC wall time of the merge, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConflictList {
    pub region: String,
    pub items: Vec<ConflictInfo>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<u64>,
    /// Records this region holds, and how many its bounds have dropped.
    pub held: u64,
    pub expired: u64,
}

/// The body of `POST /v1/conflicts/{id}/resolve`: exactly one of the three.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// Keep this one of the conflict's versions (its etag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub choose: Option<String>,
    /// Write this JSON value instead (for a counter, set or map: reached by operations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub value: Option<serde_json::Value>,
    /// Delete the key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delete: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResolveResponse {
    pub id: u64,
    pub dataset: String,
    pub key: String,
    /// The version the resolving write got.
    pub version: VersionInfo,
    pub served_by: ServedBy,
}

/// Query parameters of a conflict listing.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConflictQuery {
    pub dataset: Option<String>,
    /// Only with `dataset`.
    pub key: Option<String>,
    /// `open`, `resolved` or `superseded`.
    pub state: Option<String>,
    /// Records with ids below this (the previous page's `next_before`).
    pub before: Option<u64>,
    /// At most this many (1 to 1000, default 100).
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeleteResponse {
    pub dataset: String,
    pub key: String,
    /// The version of the tombstone.
    pub version: VersionInfo,
    pub served_by: ServedBy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ListItem {
    pub key: String,
    pub version: VersionInfo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ListResponse {
    pub dataset: String,
    pub items: Vec<ListItem>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    pub served_by: ServedBy,
}

/// Query parameters of a key read.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    /// `strong` (linearizable, served by a home region's leader), `local` or `eventual`
    /// (served by the node asked when its region holds a copy), or `bounded` (served by the
    /// node asked when its region's copy is at most `max_staleness` behind every home, else by
    /// a home). Default: the dataset's `consistency` in the policy (itself `strong` by
    /// default).
    pub consistency: Option<String>,
    /// With `consistency=bounded`: how stale the answer may be (`500ms`, `2s`); default: the
    /// dataset's `max_staleness`.
    pub max_staleness: Option<String>,
    /// For user-homed datasets whose keys carry no `region/` prefix: the key's home region.
    pub home: Option<String>,
}

/// Query parameters of a write (PUT or DELETE).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WriteQuery {
    /// For user-homed datasets whose keys carry no `region/` prefix: the key's home region.
    pub home: Option<String>,
}

/// Query parameters of a key listing.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only keys starting with this prefix.
    pub prefix: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// `strong`, `local`, `eventual` or `bounded` (as for a read); default: the dataset's
    /// `consistency` in the policy.
    pub consistency: Option<String>,
    /// With `consistency=bounded`: how stale the listing may be.
    pub max_staleness: Option<String>,
    /// For user-homed datasets: list the keys homed in this region.
    pub home: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NodeInfo {
    pub id: u64,
    pub region: String,
    pub zone: String,
    pub api_addr: String,
    pub peer_addr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegionStatus {
    pub name: String,
    /// False when no node of the region answered.
    pub reachable: bool,
    /// The node that answered for this region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_by: Option<u64>,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub nodes: Vec<NodeInfo>,
    /// Why the region could not be reached, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The answering node's probes of this region (absent for the node's own region).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<RegionHealth>,
}

/// How one node's probes find another region: reachable or not (with hysteresis), and how far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RegionHealth {
    /// `up`, `down`, or `unknown` before the first verdict.
    pub reachability: String,
    /// Smoothed round-trip time of the successful probes, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// The last successful probe's round trip, in milliseconds.
    pub last_rtt_ms: Option<f64>,
    /// Milliseconds since a probe last succeeded.
    pub last_ok_ms_ago: Option<u64>,
    /// Milliseconds since the verdict last changed.
    pub since_ms_ago: Option<u64>,
    /// Probes in a row that failed.
    pub consecutive_failures: u32,
    pub probes: u64,
    pub failures: u64,
    /// Why the last failed probe failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClusterResponse {
    /// The node that answered.
    pub node: NodeInfo,
    pub regions: Vec<RegionStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok` when the node's region has a leader, `no_leader` otherwise.
    pub status: String,
    pub node: NodeInfo,
    pub leader: Option<u64>,
    pub term: u64,
    pub applied_index: Option<u64>,
    /// Last log index covered by this node's latest snapshot.
    pub snapshot_index: Option<u64>,
    /// This node's log was compacted up to here.
    pub purged_index: Option<u64>,
}
