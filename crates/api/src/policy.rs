//! Bodies of the policy API under `/v1/policy`: apply, plan, history, rollback, explain.
//! Policy documents travel as their text, so the server reports problems at the lines the
//! operator wrote.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// A policy document sent for planning or applying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocumentBody {
    /// The document's text (TOML, or YAML with `format = "yaml"`).
    pub text: String,
    /// `toml` (default) or `yaml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// The file name problems are reported under (default `policy.toml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// `POST /v1/policy`: validate and activate a policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyApplyRequest {
    #[serde(flatten)]
    pub document: PolicyDocumentBody,
    /// `enforce` (default) or `shadow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Share of keys (by a stable hash of dataset and key) the rollout covers: 1 to 100
    /// (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
}

/// `POST /v1/policy/rollback`: activate an earlier version again, as a new history entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyRollbackRequest {
    /// A version id, or a unique prefix of at least 8 hex characters.
    pub version: String,
}

/// One entry of the policy history. The last entry is the active pointer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyEntry {
    /// Position in the history, from 1.
    pub epoch: u64,
    /// The version this entry activates (64 hex characters).
    pub version: String,
    /// `apply` or `rollback`.
    pub action: String,
    /// `enforce` or `shadow`.
    pub mode: String,
    /// Share of keys covered, 1 to 100.
    pub percent: u8,
    /// The fully enforced version that governs the keys this entry does not (a shadow rollout,
    /// or the keys outside the percentage); none before the first full enforcement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// When the entry was made, milliseconds since the Unix epoch (the gateway's clock).
    pub at_ms: u64,
    /// The datasets the version names.
    pub datasets: Vec<String>,
}

/// Where one region's copy of the policy metadata stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RegionPolicy {
    pub region: String,
    /// The epoch of the region's active pointer; absent if the region holds none yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Why the region could not be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v1/policy`: the active entry, and each region's copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyStatus {
    /// The authority region's active entry (none before the first apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<PolicyEntry>,
    /// The region whose Raft group decides the history; the others hold copies.
    pub authority: String,
    pub regions: Vec<RegionPolicy>,
}

/// The answer to an apply or a rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyApplyResponse {
    pub entry: PolicyEntry,
    /// Regions whose copy already holds the entry.
    pub propagated: Vec<String>,
    /// Regions not reached yet; their leaders catch up from the authority in the background.
    pub pending: Vec<String>,
}

/// `GET /v1/policy/versions`: the history, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyHistory {
    pub entries: Vec<PolicyEntry>,
}

/// `GET /v1/policy/versions/{version}`: one stored version, as it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyVersionBody {
    pub version: String,
    pub format: String,
    pub file: String,
    pub text: String,
    pub datasets: Vec<String>,
}

/// A region's bytes and keys of one dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RegionBytes {
    pub region: String,
    pub keys: u64,
    pub bytes: u64,
}

/// What a plan would change for one dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DatasetPlan {
    pub dataset: String,
    /// `added`, `removed`, `changed` or `unchanged`.
    pub change: String,
    /// Regions that would start holding copies, with the bytes to copy there (estimated from
    /// the dataset's size in its homes today).
    pub gaining: Vec<RegionBytes>,
    /// Regions that would stop holding copies, with the bytes to purge there.
    pub losing: Vec<RegionBytes>,
    /// Rule changes that move no data (conflict rule, schedule, consistency...).
    pub notes: Vec<String>,
}

/// A directed replication channel of one dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LinkBody {
    pub dataset: String,
    pub from: String,
    pub to: String,
}

/// `POST /v1/policy/plan`: what applying a document would change. Changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyPlan {
    /// The active version, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// The version the document would become.
    pub proposed: String,
    /// True when the document is the active version already.
    pub same_version: bool,
    pub datasets: Vec<DatasetPlan>,
    pub links_opened: Vec<LinkBody>,
    pub links_closed: Vec<LinkBody>,
    /// Regions whose sizes could not be read; their byte figures are missing.
    pub unreachable: Vec<String>,
}

/// `GET /v1/policy/explain` query.
#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ExplainQuery {
    pub dataset: String,
    pub key: String,
    /// For user-homed datasets whose keys carry no `region/` prefix: the key's home.
    pub home: Option<String>,
}

/// One region's part for a key, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RegionDecisionBody {
    pub region: String,
    /// `home`, `mirror` or `none`.
    pub role: String,
    /// A stable code (`home_listed`, `not_in_allowed`, ...).
    pub reason_code: String,
    /// The same, in a sentence.
    pub reason: String,
}

/// A link of one key's placement, with its schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlacedLink {
    pub from: String,
    pub to: String,
    /// `continuous`, `interval 30s (+5s jitter, phase 2.1s)` or `window 01:00-05:00 UTC`.
    pub schedule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag: Option<String>,
}

/// `GET /v1/policy/explain`: where a key's copies live and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Explanation {
    pub dataset: String,
    pub key: String,
    /// The version whose rules govern this key.
    pub version: String,
    /// `enforced`; `rollout` when a partial rollout's new version covers the key;
    /// `nothing_enforced` when only a shadow version exists (its rules are shown).
    pub governed_by: String,
    /// `named` (a `[[dataset]]` entry) or `default`.
    pub rules: String,
    pub locality: String,
    pub classification: String,
    pub kind: String,
    pub homes: Vec<String>,
    pub mirrors: Vec<String>,
    pub allowed: Vec<String>,
    pub regions: Vec<RegionDecisionBody>,
    pub links: Vec<PlacedLink>,
    pub conflict: String,
    pub consistency: String,
    pub failover: Vec<String>,
    pub retention: String,
    pub encryption_at_rest: bool,
    /// `not_held`, `held` or `released`.
    pub quarantine: String,
    /// Under a shadow rollout: where the shadow version would place the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(no_recursion)]
    pub shadow: Option<Box<Explanation>>,
}

/// A problem in a policy document (in `problems` of a `policy_invalid` error).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyProblem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
    /// The rule broken (docs/policy.md lists them).
    pub rule: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}
