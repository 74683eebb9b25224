//! `/v1/conflicts`: the conflict records of the region of the node asked.

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use meridian_api::{
    ConflictInfo, ConflictList, ConflictQuery, ErrorCode, ResolveRequest, ResolveResponse, SiblingInfo, VersionInfo,
};
use meridian_node::resolve::Resolution;
use meridian_node::WriteOutcome;
use meridian_node::{ConflictQuery as Filter, ConflictRecord, ConflictState};

use crate::error::ApiError;
use crate::keys::query_error;
use crate::AppState;

/// Records one page lists at most.
pub const CONFLICT_PAGE_MAX: usize = 1000;
const CONFLICT_PAGE_DEFAULT: usize = 100;

/// A stored version as the API shows it.
pub(crate) fn sibling_info(version: &meridian_core::Version, value: Option<&[u8]>) -> SiblingInfo {
    SiblingInfo {
        version: VersionInfo::from(version),
        value: value.and_then(|v| serde_json::from_slice(v).ok()).unwrap_or(serde_json::Value::Null),
        deleted: value.is_none(),
    }
}

fn info(region: &str, rec: ConflictRecord, state: ConflictState) -> ConflictInfo {
    ConflictInfo {
        id: rec.id,
        region: region.to_owned(),
        dataset: rec.dataset,
        key: rec.key,
        rule: rec.rule.name().to_owned(),
        state: state.name().to_owned(),
        source: rec.source,
        versions: rec.versions.iter().map(|s| sibling_info(&s.version, s.value.as_deref())).collect(),
        outcome: sibling_info(&rec.outcome.version, rec.outcome.value.as_deref()),
        at_ms: rec.at_ms,
    }
}

#[utoipa::path(
    get, path = "/v1/conflicts", params(ConflictQuery),
    responses((status = 200, body = ConflictList), (status = 400, body = meridian_api::ErrorBody))
)]
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ConflictQuery>, QueryRejection>,
) -> Result<Json<ConflictList>, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    if q.key.is_some() && q.dataset.is_none() {
        return Err(ApiError::new(ErrorCode::InvalidQuery, "key needs dataset").hint("pass dataset=NAME&key=KEY"));
    }
    let wanted = match q.state.as_deref() {
        None => None,
        Some(s) => Some(ConflictState::parse(s).ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidQuery, format!("state={s:?} is not a conflict state"))
                .hint("use open, resolved or superseded")
        })?),
    };
    let limit = q.limit.unwrap_or(CONFLICT_PAGE_DEFAULT);
    if !(1..=CONFLICT_PAGE_MAX).contains(&limit) {
        return Err(ApiError::new(
            ErrorCode::InvalidQuery,
            format!("limit={limit} is not from 1 to {CONFLICT_PAGE_MAX}"),
        ));
    }
    let node = &state.node;
    let query = Filter { dataset: q.dataset.as_deref(), key: q.key.as_deref(), state: wanted, before: q.before, limit };
    let (items, log) = node.conflicts(&query)?;
    let next_before = if items.len() == limit { items.last().map(|(r, _)| r.id) } else { None };
    let region = node.spec().region.to_string();
    let items = items.into_iter().map(|(r, s)| info(&region, r, s)).collect();
    Ok(Json(ConflictList { region, items, next_before, held: log.held, expired: log.expired }))
}

#[utoipa::path(
    get, path = "/v1/conflicts/{id}", params(("id" = u64, Path)),
    responses((status = 200, body = ConflictInfo), (status = 404, body = meridian_api::ErrorBody))
)]
pub async fn show(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ConflictInfo>, ApiError> {
    let id = parse_id(path)?;
    let region = state.node.spec().region.to_string();
    match state.node.conflict(id)? {
        Some((rec, st)) => Ok(Json(info(&region, rec, st))),
        None => Err(ApiError::new(ErrorCode::ConflictNotFound, format!("region {region} holds no conflict {id}"))
            .hint("ids are per region: ask a node of the region that listed it")),
    }
}

fn parse_id(path: Result<Path<String>, PathRejection>) -> Result<u64, ApiError> {
    let Path(id) = path.map_err(|e| ApiError::new(ErrorCode::InvalidQuery, e.to_string()))?;
    id.parse().map_err(|_| {
        ApiError::new(ErrorCode::ConflictNotFound, format!("{id:?} is not a conflict id"))
            .hint("ids are numbers, as `meridian conflicts list` shows them")
    })
}

#[utoipa::path(
    post, path = "/v1/conflicts/{id}/resolve", params(("id" = u64, Path)),
    request_body(content = ResolveRequest, content_type = "application/json"),
    responses((status = 200, body = ResolveResponse), (status = 400, body = meridian_api::ErrorBody),
              (status = 404, body = meridian_api::ErrorBody), (status = 409, body = meridian_api::ErrorBody),
              (status = 503, body = meridian_api::ErrorBody))
)]
pub async fn resolve(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ResolveResponse>, ApiError> {
    let id = parse_id(path)?;
    let max = state.node.config().limits.value_bytes_max;
    let bytes = crate::keys::read_json_body(max, &headers, body).await?;
    let req: ResolveRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(ErrorCode::InvalidOperation, format!("the body is not a resolution: {e}"))
            .hint(r#"send {"choose":"ETAG"}, {"value":JSON} or {"delete":true}"#)
    })?;
    let resolution = match (req.choose, req.value, req.delete) {
        (Some(etag), None, false) => {
            Resolution::Choose(etag.trim_matches('"').parse().map_err(|e: meridian_core::VersionParseError| {
                ApiError::new(ErrorCode::InvalidVersion, e.to_string())
            })?)
        }
        (None, Some(v), false) => Resolution::Value(v.to_string().into_bytes()),
        (None, None, true) => Resolution::Delete,
        _ => {
            return Err(ApiError::new(
                ErrorCode::InvalidOperation,
                "a resolution is exactly one of choose, value or delete",
            )
            .hint(r#"send {"choose":"ETAG"}, {"value":JSON} or {"delete":true}"#))
        }
    };
    // Named in the answer; the node looks the record up again (and answers 404 if it went).
    let (record, _) = state.node.conflict(id)?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::ConflictNotFound,
            format!("region {} holds no conflict {id}", state.node.spec().region),
        )
    })?;
    let (outcome, served) = state.node.resolve_conflict(id, resolution).await?;
    let version = match outcome {
        WriteOutcome::Written { version, .. } | WriteOutcome::Deleted { version } => version,
        WriteOutcome::NotFound => {
            return Err(ApiError::new(ErrorCode::KeyNotFound, "the key holds nothing to delete any more"))
        }
        WriteOutcome::PreconditionFailed { .. } => {
            return Err(ApiError::new(ErrorCode::Internal, "a resolution carries no precondition"))
        }
    };
    Ok(Json(ResolveResponse {
        id,
        dataset: record.dataset,
        key: record.key,
        version: VersionInfo::from(&version),
        served_by: crate::keys::served_by(&state, served),
    }))
}
