//! Stable error codes. A code, once published, keeps its meaning; docs/errors.md lists them
//! all, and a test keeps that page and this enum in step.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

macro_rules! codes {
    ($($variant:ident => $code:literal : $doc:literal,)*) => {
        /// Every error the API can answer with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $(#[doc = $doc] $variant,)*
        }
        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }
            pub fn describe(self) -> &'static str {
                match self { $(ErrorCode::$variant => $doc,)* }
            }
            pub fn parse(s: &str) -> Option<ErrorCode> {
                match s { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

codes! {
    InvalidDatasetName => "invalid_dataset_name": "The dataset name is empty, too long, or has characters outside a-z, 0-9, '-' and '_'.",
    InvalidKey => "invalid_key": "The key is empty or contains control characters.",
    KeyTooLong => "key_too_long": "The key is longer than 1024 bytes of UTF-8.",
    ValueTooLarge => "value_too_large": "The request body is larger than the node's value limit.",
    MalformedJson => "malformed_json": "The request body is not valid JSON.",
    UnsupportedMediaType => "unsupported_media_type": "The request body must be sent with Content-Type: application/json.",
    MethodNotAllowed => "method_not_allowed": "The resource exists but does not accept this HTTP method.",
    RouteNotFound => "route_not_found": "No resource lives at this path.",
    KeyNotFound => "key_not_found": "The key holds no value (never written, or deleted).",
    PreconditionFailed => "precondition_failed": "If-Match or If-None-Match did not hold; nothing was written. The body carries the current version.",
    InvalidVersion => "invalid_version": "An If-Match header is not a version (WALL.LOGICAL@REGION:SEQ).",
    InvalidPrecondition => "invalid_precondition": "A precondition header is malformed or combined in a way the API does not support.",
    InvalidConsistency => "invalid_consistency": "The consistency parameter is not one of the supported levels.",
    InvalidQuery => "invalid_query": "A query parameter is unknown or malformed.",
    InvalidCursor => "invalid_cursor": "The listing cursor was not produced by this API.",
    NoLeader => "no_leader": "The region has no elected leader at the moment (an election is under way or a quorum is lost). Retry after the Retry-After delay.",
    Unavailable => "unavailable": "The node that must serve this request cannot be reached. Retry after the Retry-After delay.",
    RegionUnavailable => "region_unavailable": "No region that may serve this request could: each was down, unreachable, without a leader or (for a bounded read) too stale. `regions_tried` names each with its cause; nothing was applied. Retry after the Retry-After delay.",
    PromotionRefused => "promotion_refused": "The region cannot be promoted for this dataset now: a home still answers, the region's lag is over the dataset's rpo, or it is not one of the dataset's failover targets (the message says which). Nothing changed; force promotes despite the first two.",
    OutcomeUnknown => "outcome_unknown": "The write was sent to the leader but no answer came back in time; it may or may not have been applied. Read the key before retrying a non-idempotent write.",
    ClockSkew => "clock_skew": "The node's hybrid clock would run too far ahead of its wall clock; the node's clock needs attention.",
    PolicyInvalid => "policy_invalid": "The policy document breaks one or more rules; `problems` lists each with its line, column, rule and hint. Nothing was changed.",
    PolicyVersionNotFound => "policy_version_not_found": "No stored policy version has this id (or the prefix is shorter than 8 characters or matches several).",
    PolicyConflict => "policy_conflict": "Another policy change was made at the same time; nothing was changed. Look at the history and retry.",
    NoPolicy => "no_policy": "The cluster has no active policy yet, so there is nothing to explain or roll back.",
    DatasetNotInPolicy => "dataset_not_in_policy": "The active policy does not name this dataset and has no [default]; nothing was written.",
    HomeUnknown => "home_unknown": "The dataset is user-homed and the key has neither a `region/` prefix nor a `home` parameter, or they disagree, or that home is not allowed.",
    HomeImmutable => "home_immutable": "The user-homed key already lives in another region; its home cannot change. Nothing was written.",
    ResidencyRefused => "residency_refused": "The key's policy does not allow its bytes in the region of the node asked, so the node will not bring the value there. Read it through a node of an allowed region (the hint names them).",
    PolicyRefused => "policy_refused": "The region that received the write is not a home for this key under its active policy; nothing was written. Retry: the gateway routes by the newest policy.",
    WrongOperation => "wrong_operation": "The dataset's kind or conflict rule does not take this write: a PUT on a counter, set or map dataset (use its operations), an operation of another kind, or a causal context on a dataset whose rule is not `siblings`. Nothing was written.",
    InvalidOperation => "invalid_operation": "The operation is unknown for this path, or its body lacks or misuses a field (amount, members, fields).",
    InvalidSession => "invalid_session": "The Meridian-Session header is not a session token this cluster signed: edited, made by another cluster, malformed or longer than 4096 bytes. Nothing was done; send the token back exactly as it came, or none.",
    InvalidContext => "invalid_context": "The Meridian-Context header is not a causal context as a read returned it (REGION:N[,REGION:N...]).",
    ConflictNotFound => "conflict_not_found": "This region holds no conflict record with this id (ids are per region, and old records expire).",
    Internal => "internal": "An unexpected failure inside the node. It is logged with details; the request may be retried.",
}

/// The JSON body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// A stable snake_case code; branch on this, not on the message.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
    /// What to do about it, when there is something to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// For `precondition_failed`: the key's current version, if it has a live value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// For `policy_invalid`: every problem in the document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problems: Option<Vec<crate::policy::PolicyProblem>>,
    /// For `region_unavailable`: each region tried (or known down), in order, with why it
    /// did not serve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions_tried: Option<Vec<crate::types::SkippedRegion>>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            hint: None,
            current_version: None,
            problems: None,
            regions_tried: None,
        }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_json_and_text() {
        for &c in ErrorCode::ALL {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
        }
    }
}
