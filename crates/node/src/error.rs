//! The node's per-request failures, and their mapping to and from the peer protocol.
//!
//! Errors cross the wire as typed variants ([`PeerError`]), never as strings to parse; the
//! two mappings here are the only places that translate, and the property both keep is that
//! an unknown outcome stays unknown on every hop (a client must never retry blindly a write
//! that may have been applied).

use meridian_core::{NodeId, RegionId};

use crate::peer::PeerError;

/// Per-request failures, shaped by what the caller does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    #[error("the region has no leader right now")]
    NoLeader,
    /// Nothing was applied: the node could not be reached, or refused before applying.
    /// (Invariant: every path that yields it proves the request was never applied, so a
    /// gateway may send a write on to another home.)
    #[error("node {node} could not be reached: {reason}")]
    Unavailable { node: NodeId, reason: String },
    /// No region that may serve the request could: each was tried (or known down) and failed
    /// for the reason given. Nothing was applied.
    #[error("{message}; {}", tried_text(tried))]
    NoRegion { message: String, tried: Vec<Skip> },
    #[error("the write reached the leader but its outcome is unknown: {0}")]
    OutcomeUnknown(String),
    #[error("{0}")]
    ClockSkew(String),
    #[error("storage failure: {0}")]
    Storage(String),
    /// The active policy neither names the dataset nor has a default.
    #[error("{0}")]
    DatasetNotInPolicy(String),
    /// A user-homed key whose home cannot be found, or is not allowed.
    #[error("{0}")]
    HomeUnknown(String),
    /// The region asked is not a home for the key under its own active policy.
    #[error("{0}")]
    PolicyRefused(String),
    /// The region asked is a failover target of the key's dataset but holds no active
    /// promotion for it: nothing was applied.
    #[error("{0}")]
    NotPromoted(String),
    /// A promotion the checks do not allow (a home answers, the lag is over the rpo, not a
    /// target): nothing changed.
    #[error("{0}")]
    PromotionRefused(String),
    /// A user-homed key already lives in another region than the home asked for.
    #[error("{0}")]
    HomeImmutable(String),
    /// Serving the request here would bring the key's bytes into a region its policy does not
    /// allow: the first field explains, the second names the regions that may serve it.
    #[error("{0}")]
    ResidencyRefused(String, Vec<RegionId>),
    /// A bounded-staleness read of a dataset that has no `max_staleness`, without one given.
    #[error("{0} has no max_staleness to bound the read by")]
    NoStalenessBound(String),
    /// The dataset's kind or conflict rule does not take this write (a PUT on a counter, set
    /// or map; an operation of another kind; a causal context where the rule is not
    /// `siblings`): nothing was written.
    #[error("{0}")]
    WrongOperation(String),
    /// The write would make the key's value larger than the value limit: nothing was written.
    #[error("{0}")]
    TooLarge(String),
    /// No conflict record with this id in this region.
    #[error("{0}")]
    ConflictNotFound(String),
    /// A resolution that does not fit its conflict (a version it does not name, a value of
    /// the wrong shape for the kind): nothing was written.
    #[error("{0}")]
    InvalidResolution(String),
    #[error("internal failure: {0}")]
    Internal(String),
}

/// A region a request passed over or tried without an answer, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub region: RegionId,
    pub cause: SkipCause,
    /// The failure as it was seen (empty for a region passed over as down).
    pub detail: String,
}

/// Why a region did not serve a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipCause {
    /// Marked down by this node's probes, and not tried because another region answered.
    Down,
    /// Tried: no node answered in its share of the request's time.
    Unreachable,
    /// Tried: no leader to serve a write or strong read.
    NoLeader,
    /// Tried: its copy was staler than the read allows.
    Stale,
    /// Tried: under its own policy it holds no copy of the key (a policy change in flight).
    NoCopy,
    /// Tried: its copy had not yet applied everything the session token names.
    Behind,
    /// Tried: a failover target holding no active promotion for the dataset.
    NotPromoted,
}

impl SkipCause {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipCause::Down => "down",
            SkipCause::Unreachable => "unreachable",
            SkipCause::NoLeader => "no-leader",
            SkipCause::Stale => "stale",
            SkipCause::NoCopy => "no-copy",
            SkipCause::Behind => "behind",
            SkipCause::NotPromoted => "not-promoted",
        }
    }
}

fn tried_text(tried: &[Skip]) -> String {
    if tried.is_empty() {
        return "no region was tried".into();
    }
    let each: Vec<String> = tried
        .iter()
        .map(|s| match s.detail.is_empty() {
            true => format!("{} ({})", s.region, s.cause.as_str()),
            false => format!("{} ({}: {})", s.region, s.cause.as_str(), s.detail),
        })
        .collect();
    format!("tried {}", each.join("; "))
}

impl NodeError {
    pub(crate) fn storage(e: impl std::fmt::Display) -> NodeError {
        NodeError::Storage(e.to_string())
    }
}

/// A failure on the leader's own path: not the leader (with a hint), or anything else.
#[derive(Debug, Clone)]
pub(crate) enum LocalError {
    NotLeader(Option<NodeId>),
    Other(NodeError),
}

impl LocalError {
    /// For callers that do not forward: "not the leader" is simply "no leader here".
    pub(crate) fn into_node_error(self) -> NodeError {
        match self {
            LocalError::NotLeader(_) => NodeError::NoLeader,
            LocalError::Other(e) => e,
        }
    }

    /// For answers to a peer: the leader hint travels with the refusal.
    pub(crate) fn into_peer_error(self) -> PeerError {
        match self {
            LocalError::NotLeader(leader) => PeerError::NotLeader { leader },
            LocalError::Other(e) => to_peer_error(e),
        }
    }
}

impl From<NodeError> for LocalError {
    fn from(e: NodeError) -> Self {
        LocalError::Other(e)
    }
}

pub(crate) fn to_peer_error(e: NodeError) -> PeerError {
    match e {
        NodeError::NoLeader => PeerError::NotLeader { leader: None },
        NodeError::ClockSkew(m) => PeerError::ClockSkew(m),
        NodeError::Unavailable { reason, .. } => PeerError::Unavailable(reason),
        e @ NodeError::NoRegion { .. } => PeerError::Unavailable(e.to_string()),
        NodeError::OutcomeUnknown(m) => PeerError::OutcomeUnknown(m),
        NodeError::NotPromoted(m) => PeerError::NotPromoted(m),
        NodeError::PromotionRefused(m) => PeerError::PromotionRefused(m),
        NodeError::PolicyRefused(m)
        | NodeError::DatasetNotInPolicy(m)
        | NodeError::HomeUnknown(m)
        | NodeError::HomeImmutable(m)
        | NodeError::ResidencyRefused(m, _) => PeerError::PolicyRefused(m),
        e @ NodeError::NoStalenessBound(_) => PeerError::Protocol(e.to_string()),
        NodeError::WrongOperation(m) => PeerError::WrongOperation(m),
        NodeError::TooLarge(m) => PeerError::TooLarge(m),
        // Answered by the node asked, never sent on.
        e @ (NodeError::ConflictNotFound(_) | NodeError::InvalidResolution(_)) => PeerError::Protocol(e.to_string()),
        NodeError::Storage(m) | NodeError::Internal(m) => PeerError::Internal(m),
    }
}

pub(crate) fn peer_error(node: NodeId, e: PeerError) -> NodeError {
    match e {
        PeerError::NotLeader { .. } => NodeError::NoLeader,
        PeerError::ClockSkew(m) => NodeError::ClockSkew(m),
        PeerError::OutcomeUnknown(m) => NodeError::OutcomeUnknown(m),
        PeerError::Unavailable(reason) => NodeError::Unavailable { node, reason },
        PeerError::PolicyRefused(m) => NodeError::PolicyRefused(m),
        PeerError::WrongOperation(m) => NodeError::WrongOperation(m),
        PeerError::TooLarge(m) => NodeError::TooLarge(m),
        PeerError::NotPromoted(m) => NodeError::NotPromoted(m),
        PeerError::PromotionRefused(m) => NodeError::PromotionRefused(m),
        PeerError::Internal(m) | PeerError::Protocol(m) => NodeError::Internal(format!("node {node}: {m}")),
        // Copy reads: the gateway tries the next region; alone, each is a region unable to serve.
        e @ (PeerError::NoCopy(_) | PeerError::Stale { .. } | PeerError::Behind(_)) => {
            NodeError::Unavailable { node, reason: e.to_string() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unknown outcome must survive the trip between nodes: turning it into anything a
    /// client may retry blindly could apply a write twice.
    #[test]
    fn unknown_outcomes_stay_unknown_across_the_peer_protocol() {
        let e = to_peer_error(NodeError::OutcomeUnknown("x".into()));
        assert_eq!(e, PeerError::OutcomeUnknown("x".into()));
        assert!(matches!(peer_error(3, e), NodeError::OutcomeUnknown(_)));
        // Only a refusal before proposing is retryable.
        assert!(matches!(peer_error(3, PeerError::NotLeader { leader: Some(2) }), NodeError::NoLeader));
        assert!(matches!(LocalError::NotLeader(Some(2)).into_peer_error(), PeerError::NotLeader { leader: Some(2) }));
    }
}
