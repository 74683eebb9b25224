//! `/v1/failover...`: promotions of failover regions, and each region's failover history.

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use meridian_api::{
    EndPromotionRequest, ErrorCode, FailoverEventInfo, FailoverStatus, PromoteRequest, PromotionInfo,
    PromotionResponse, RegionFailover,
};
use meridian_core::{DatasetName, RegionId};
use meridian_node::failover::{FailoverEvent, Promotion, EVENTS_MAX};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{dataset_error, ApiError};
use crate::keys::{query_error, read_json};
use crate::AppState;

/// Failover bodies are a few fields.
const BODY_BYTES_MAX: usize = 16 * 1024;
/// History entries per region a status shows unless asked for more.
const EVENTS_DEFAULT: usize = 20;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FailoverQuery {
    /// History entries per region, newest (default 20, at most 1000).
    pub events: Option<usize>,
}

fn promotion_info(p: Promotion) -> PromotionInfo {
    PromotionInfo {
        dataset: p.dataset,
        region: p.region,
        epoch: p.epoch,
        since_ms: p.since_ms,
        homes: p.homes,
        lag_ms: p.lag_ms,
        manual: p.manual,
        forced: p.forced,
        ended_ms: p.ended_ms,
        reason: p.reason,
    }
}

fn event_info(e: FailoverEvent) -> FailoverEventInfo {
    FailoverEventInfo {
        at_ms: e.at_ms,
        dataset: e.dataset,
        region: e.region,
        epoch: e.epoch,
        kind: e.kind,
        detail: e.detail,
    }
}

#[utoipa::path(get, path = "/v1/failover", params(FailoverQuery), responses((status = 200, body = FailoverStatus)))]
pub async fn status(
    State(state): State<AppState>,
    query: Result<Query<FailoverQuery>, QueryRejection>,
) -> Result<Json<FailoverStatus>, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let events = match q.events {
        None => EVENTS_DEFAULT,
        Some(n) if n <= EVENTS_MAX => n,
        Some(n) => {
            return Err(ApiError::new(ErrorCode::InvalidQuery, format!("events={n} is more than {EVENTS_MAX}"))
                .hint(format!("ask for at most {EVENTS_MAX} entries per region")))
        }
    };
    let regions = state
        .node
        .failover_status(events)
        .await
        .into_iter()
        .map(|(region, answer)| match answer {
            Ok((promotions, history)) => RegionFailover {
                region: region.to_string(),
                promotions: promotions.into_iter().map(promotion_info).collect(),
                events: history.into_iter().map(event_info).collect(),
                error: None,
            },
            Err(e) => RegionFailover {
                region: region.to_string(),
                promotions: Vec::new(),
                events: Vec::new(),
                error: Some(e.to_string()),
            },
        })
        .collect();
    Ok(Json(FailoverStatus { regions }))
}

async fn json_body<T: DeserializeOwned>(headers: &HeaderMap, body: Body) -> Result<T, ApiError> {
    read_json(BODY_BYTES_MAX, headers, body).await
}

fn names(state: &AppState, dataset: &str, region: &str) -> Result<(DatasetName, RegionId), ApiError> {
    let dataset = DatasetName::new(dataset).map_err(dataset_error)?;
    let known = state.node.topology().regions().iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    match RegionId::new(region) {
        Ok(r) if known.contains(&r) => Ok((dataset, r)),
        _ => Err(ApiError::new(ErrorCode::InvalidQuery, format!("{region:?} is not a region of this cluster"))
            .hint(format!("name one of {}", known.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")))),
    }
}

#[utoipa::path(post, path = "/v1/failover/promote", request_body = PromoteRequest,
    responses((status = 200, body = PromotionResponse), (status = 409, body = meridian_api::ErrorBody)))]
pub async fn promote(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PromotionResponse>, ApiError> {
    let req: PromoteRequest = json_body(&headers, body).await?;
    let (dataset, region) = names(&state, &req.dataset, &req.region)?;
    let p = state.node.promote(dataset.as_str(), &region, req.force).await?;
    Ok(Json(PromotionResponse { promotion: Some(promotion_info(p)) }))
}

#[utoipa::path(post, path = "/v1/failover/end", request_body = EndPromotionRequest,
    responses((status = 200, body = PromotionResponse)))]
pub async fn end(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PromotionResponse>, ApiError> {
    let req: EndPromotionRequest = json_body(&headers, body).await?;
    let (dataset, region) = names(&state, &req.dataset, &req.region)?;
    let p = state.node.end_promotion(dataset.as_str(), &region).await?;
    Ok(Json(PromotionResponse { promotion: p.map(promotion_info) }))
}
