//! `/v1/failover`: promotions of failover regions and each region's failover history.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One promotion of a region to take a dataset's writes while its homes are unreachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PromotionInfo {
    pub dataset: String,
    /// The region standing in for the homes.
    pub region: String,
    /// One more than the highest epoch for the dataset that the reachable regions knew.
    pub epoch: u64,
    /// When it was promoted, in milliseconds since the epoch.
    pub since_ms: u64,
    /// The homes it stands in for.
    pub homes: Vec<String>,
    /// How much of the homes' history it may lack, in milliseconds, when promoted (absent:
    /// unknown, forced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<u64>,
    /// Made by an operator: only an operator ends it.
    pub manual: bool,
    /// Made despite the checks (`force`).
    pub forced: bool,
    /// When it ended (absent: it is active).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    pub reason: String,
}

/// One entry of a region's failover history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FailoverEventInfo {
    pub at_ms: u64,
    pub dataset: String,
    pub region: String,
    pub epoch: u64,
    /// `promoted`, `refused` (the checks did not allow a promotion) or `ended`.
    pub kind: String,
    pub detail: String,
}

/// One region's promotion records and the newest entries of its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RegionFailover {
    pub region: String,
    pub promotions: Vec<PromotionInfo>,
    /// Newest last.
    pub events: Vec<FailoverEventInfo>,
    /// Why this region's records could not be read (it is unreachable, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FailoverStatus {
    pub regions: Vec<RegionFailover>,
}

/// `POST /v1/failover/promote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PromoteRequest {
    pub dataset: String,
    /// The failover target to promote (one of the dataset's `failover.order`).
    pub region: String,
    /// Promote even if a home still answers or the lag is over the rpo.
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/failover/end`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EndPromotionRequest {
    pub dataset: String,
    pub region: String,
}

/// The answer to a promote or an end: the promotion as it now stands (absent for an end
/// with nothing to end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PromotionResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<PromotionInfo>,
}
