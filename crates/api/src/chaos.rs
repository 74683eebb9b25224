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

/// `POST /v1/admin/chaos/partition` and `/heal`: a region pair (`heal` with none heals all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegionPair {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<[String; 2]>,
}
