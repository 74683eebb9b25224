//! The one place where errors become HTTP answers. Every error body is
//! `{"code", "message", "hint"?}` with a stable code from `meridian_api::ErrorCode`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use meridian_api::{ErrorBody, ErrorCode};
use meridian_core::NameError;
use meridian_node::NodeError;

#[derive(Debug)]
pub struct ApiError {
    /// Boxed: every handler returns `Result<_, ApiError>`, and the body is large.
    pub body: Box<ErrorBody>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { body: Box::new(ErrorBody::new(code, message)) }
    }
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.body.hint = Some(hint.into());
        self
    }
}

/// The status of each code; the only such table in the product.
pub fn status_of(code: ErrorCode) -> StatusCode {
    use ErrorCode::*;
    match code {
        InvalidDatasetName | InvalidKey | KeyTooLong | MalformedJson | InvalidVersion | InvalidPrecondition
        | InvalidConsistency | InvalidQuery | InvalidCursor | InvalidOperation | InvalidContext | InvalidSession => {
            StatusCode::BAD_REQUEST
        }
        WrongOperation | PromotionRefused => StatusCode::CONFLICT,
        ConflictNotFound => StatusCode::NOT_FOUND,
        ValueTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        RouteNotFound | KeyNotFound => StatusCode::NOT_FOUND,
        PreconditionFailed => StatusCode::PRECONDITION_FAILED,
        NoLeader | Unavailable | RegionUnavailable | ClockSkew => StatusCode::SERVICE_UNAVAILABLE,
        OutcomeUnknown => StatusCode::GATEWAY_TIMEOUT,
        PolicyInvalid | HomeUnknown => StatusCode::BAD_REQUEST,
        PolicyVersionNotFound | NoPolicy => StatusCode::NOT_FOUND,
        PolicyConflict | HomeImmutable => StatusCode::CONFLICT,
        DatasetNotInPolicy | ResidencyRefused => StatusCode::FORBIDDEN,
        PolicyRefused => StatusCode::SERVICE_UNAVAILABLE,
        Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(self.body.code);
        let retry = status == StatusCode::SERVICE_UNAVAILABLE;
        let mut resp = (status, Json(*self.body)).into_response();
        if retry {
            resp.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match &e {
            NodeError::NoLeader => ApiError::new(ErrorCode::NoLeader, e.to_string())
                .hint("an election is under way or a majority of the region's zones is down; retry shortly"),
            NodeError::Unavailable { .. } => ApiError::new(ErrorCode::Unavailable, e.to_string()),
            NodeError::NoRegion { tried, .. } => {
                let mut err = ApiError::new(ErrorCode::RegionUnavailable, e.to_string()).hint(
                    "every region that may serve this key was tried; `meridian cluster status` shows which are down",
                );
                err.body.regions_tried = Some(tried.iter().map(crate::keys::skipped_region).collect());
                err
            }
            NodeError::OutcomeUnknown(_) => ApiError::new(ErrorCode::OutcomeUnknown, e.to_string())
                .hint("read the key to learn whether the write took effect before retrying it"),
            NodeError::ClockSkew(_) => ApiError::new(ErrorCode::ClockSkew, e.to_string())
                .hint("check NTP on this node; meridian_hlc_refusals_total counts these refusals"),
            NodeError::DatasetNotInPolicy(_) => ApiError::new(ErrorCode::DatasetNotInPolicy, e.to_string())
                .hint("add the dataset to the policy (or give the policy a [default]) and apply it"),
            NodeError::NoStalenessBound(_) => ApiError::new(ErrorCode::InvalidQuery, e.to_string())
                .hint("pass max_staleness (e.g. 2s), or set consistency.max_staleness in the policy"),
            NodeError::HomeUnknown(_) => ApiError::new(ErrorCode::HomeUnknown, e.to_string())
                .hint("user-homed keys start with their home region (`eu-west/alice`) or pass ?home=REGION"),
            NodeError::HomeImmutable(_) => ApiError::new(ErrorCode::HomeImmutable, e.to_string())
                .hint("write the key with the home it already has; moving a user's data is a relocation"),
            NodeError::ResidencyRefused(_, allowed) => {
                let regions: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
                ApiError::new(ErrorCode::ResidencyRefused, e.to_string()).hint(format!(
                    "send the request to a node in {} (`meridian ... --endpoint` of that region)",
                    regions.join(" or ")
                ))
            }
            NodeError::NotPromoted(_) => ApiError::new(ErrorCode::PolicyRefused, e.to_string())
                .hint("the key's homes are unreachable and no failover target is promoted yet; retry shortly"),
            NodeError::PromotionRefused(_) => ApiError::new(ErrorCode::PromotionRefused, e.to_string())
                .hint("`meridian failover status` shows the history; --force promotes despite the checks"),
            NodeError::PolicyRefused(_) => ApiError::new(ErrorCode::PolicyRefused, e.to_string())
                .hint("the regions' policy copies are converging after a change; retry shortly"),
            NodeError::WrongOperation(_) => ApiError::new(ErrorCode::WrongOperation, e.to_string())
                .hint("`meridian policy explain DATASET KEY` shows the dataset's kind and conflict rule"),
            NodeError::ConflictNotFound(_) => ApiError::new(ErrorCode::ConflictNotFound, e.to_string())
                .hint("`meridian conflicts list` shows this region's records"),
            NodeError::InvalidResolution(_) => ApiError::new(ErrorCode::InvalidOperation, e.to_string())
                .hint("choose one of the conflict's versions (`meridian conflicts show ID`) or give a value"),
            NodeError::TooLarge(_) => ApiError::new(ErrorCode::ValueTooLarge, e.to_string())
                .hint("split the value over several keys, or raise limits.value_bytes_max"),
            NodeError::Storage(_) | NodeError::Internal(_) => {
                tracing::error!(error = %e, "request failed inside the node");
                ApiError::new(ErrorCode::Internal, e.to_string())
            }
        }
    }
}

impl From<meridian_node::policy::PolicyOpError> for ApiError {
    fn from(e: meridian_node::policy::PolicyOpError) -> Self {
        use meridian_node::policy::PolicyOpError;
        match e {
            PolicyOpError::Invalid(report) => {
                let problems = report
                    .diagnostics
                    .iter()
                    .map(|d| meridian_api::PolicyProblem {
                        line: d.pos.map(|p| p.line),
                        column: d.pos.map(|p| p.column),
                        rule: d.rule.code().to_string(),
                        message: d.message.clone(),
                        hint: d.hint.clone(),
                    })
                    .collect();
                let mut err = ApiError::new(
                    ErrorCode::PolicyInvalid,
                    format!("{} has {} problem(s); nothing was changed", report.file, report.diagnostics.len()),
                )
                .hint("`meridian policy check FILE` shows the same problems offline");
                err.body.problems = Some(problems);
                err
            }
            PolicyOpError::VersionNotFound(m) => {
                ApiError::new(ErrorCode::PolicyVersionNotFound, m).hint("`meridian policy history` lists the versions")
            }
            PolicyOpError::Conflict(m) => ApiError::new(ErrorCode::PolicyConflict, m),
            PolicyOpError::NoPolicy => {
                ApiError::new(ErrorCode::NoPolicy, e.to_string()).hint("apply one with `meridian policy apply FILE`")
            }
            PolicyOpError::BadRequest(m) => ApiError::new(ErrorCode::InvalidQuery, m),
            PolicyOpError::Node(n) => n.into(),
        }
    }
}

/// A refused dataset name.
pub fn dataset_error(e: NameError) -> ApiError {
    ApiError::new(ErrorCode::InvalidDatasetName, e.to_string())
        .hint("dataset names are 1-64 characters of a-z, 0-9, '-' and '_', starting with a letter")
}

/// A refused key.
pub fn key_error(e: NameError) -> ApiError {
    match e {
        NameError::TooLong { .. } => ApiError::new(ErrorCode::KeyTooLong, e.to_string()),
        _ => ApiError::new(ErrorCode::InvalidKey, e.to_string())
            .hint("keys are 1-1024 bytes of UTF-8 without control characters; percent-encode '/' as %2F in paths"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/errors.md lists every code with the status this table gives it.
    #[test]
    fn errors_page_matches_the_codes() {
        let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/errors.md")).unwrap();
        for &code in ErrorCode::ALL {
            let row = format!("| `{}` | {} |", code.as_str(), status_of(code).as_u16());
            assert!(page.contains(&row), "docs/errors.md lacks the row {row}");
        }
        let rows = page.lines().filter(|l| l.starts_with("| `")).count();
        assert_eq!(rows, ErrorCode::ALL.len(), "docs/errors.md lists codes that do not exist");
    }
}

#[cfg(test)]
mod mapping_tests {
    use super::*;

    #[test]
    fn unknown_outcome_is_a_gateway_timeout_not_a_retryable_503() {
        let e = ApiError::from(NodeError::OutcomeUnknown("lost".into()));
        assert_eq!(e.body.code, ErrorCode::OutcomeUnknown);
        let resp = e.into_response();
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(resp.headers().get("retry-after").is_none());
        let resp = ApiError::from(NodeError::NoLeader).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()["retry-after"], "1");
    }
}
