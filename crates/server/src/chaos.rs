//! `/v1/admin/chaos...`: fault injection between regions, for drills and tests. Admin only:
//! until access control arrives, keep the API port off untrusted networks.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use meridian_api::{ChaosStatus, ErrorCode, LinkFaultBody, RegionPair};
use meridian_core::RegionId;
use meridian_node::chaos::{FaultEntry, LinkFault};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::keys::read_json;
use crate::AppState;

/// Chaos bodies are a few fields.
const CHAOS_BODY_BYTES_MAX: usize = 16 * 1024;

async fn json_body<T: DeserializeOwned>(headers: &HeaderMap, body: Body) -> Result<T, ApiError> {
    read_json(CHAOS_BODY_BYTES_MAX, headers, body).await
}

fn regions(state: &AppState, names: &[String; 2]) -> Result<[RegionId; 2], ApiError> {
    let known: Vec<&RegionId> = state.node.topology().regions().iter().map(|r| &r.name).collect();
    let one = |n: &str| -> Result<RegionId, ApiError> {
        match RegionId::new(n) {
            Ok(r) if known.contains(&&r) => Ok(r),
            _ => Err(ApiError::new(ErrorCode::InvalidQuery, format!("{n:?} is not a region of this cluster"))),
        }
    };
    let pair = [one(&names[0])?, one(&names[1])?];
    if pair[0] == pair[1] {
        return Err(ApiError::new(ErrorCode::InvalidQuery, "faults apply between two different regions"));
    }
    Ok(pair)
}

fn body(entries: Vec<FaultEntry>, unreached: Vec<u64>) -> ChaosStatus {
    ChaosStatus {
        links: entries
            .into_iter()
            .map(|e| LinkFaultBody {
                regions: [e.regions[0].to_string(), e.regions[1].to_string()],
                cut: e.fault.cut,
                delay_ms: e.fault.delay_ms,
                jitter_ms: e.fault.jitter_ms,
                loss_percent: e.fault.loss_percent,
            })
            .collect(),
        unreached_nodes: unreached,
    }
}

/// Set (or clear, with an all-default fault) one pair's faults cluster-wide.
async fn set_pair(state: &AppState, pair: [RegionId; 2], fault: LinkFault) -> Result<Json<ChaosStatus>, ApiError> {
    fault.validate().map_err(|e| ApiError::new(ErrorCode::InvalidQuery, e))?;
    let mut entries: Vec<FaultEntry> = state
        .node
        .faults()
        .into_iter()
        .filter(|e| !(e.regions.contains(&pair[0]) && e.regions.contains(&pair[1])))
        .collect();
    entries.push(FaultEntry { regions: pair, fault });
    let unreached = state.node.set_faults(entries).await;
    Ok(Json(body(state.node.faults(), unreached)))
}

#[utoipa::path(get, path = "/v1/admin/chaos", responses((status = 200, body = ChaosStatus)))]
pub async fn status(State(state): State<AppState>) -> Json<ChaosStatus> {
    Json(body(state.node.faults(), Vec::new()))
}

#[utoipa::path(post, path = "/v1/admin/chaos/partition", request_body = RegionPair,
    responses((status = 200, body = ChaosStatus), (status = 400, body = meridian_api::ErrorBody)))]
pub async fn partition(
    State(state): State<AppState>,
    headers: HeaderMap,
    b: Body,
) -> Result<Json<ChaosStatus>, ApiError> {
    let req: RegionPair = json_body(&headers, b).await?;
    let names =
        req.regions.ok_or_else(|| ApiError::new(ErrorCode::InvalidQuery, "name the two regions to cut apart"))?;
    let pair = regions(&state, &names)?;
    set_pair(&state, pair, LinkFault { cut: true, ..LinkFault::default() }).await
}

#[utoipa::path(post, path = "/v1/admin/chaos/heal", request_body = RegionPair,
    responses((status = 200, body = ChaosStatus), (status = 400, body = meridian_api::ErrorBody)))]
pub async fn heal(State(state): State<AppState>, headers: HeaderMap, b: Body) -> Result<Json<ChaosStatus>, ApiError> {
    let req: RegionPair = json_body(&headers, b).await?;
    match req.regions {
        Some(names) => {
            let pair = regions(&state, &names)?;
            set_pair(&state, pair, LinkFault::default()).await
        }
        None => {
            let unreached = state.node.set_faults(Vec::new()).await;
            Ok(Json(body(state.node.faults(), unreached)))
        }
    }
}

#[utoipa::path(post, path = "/v1/admin/chaos/delay", request_body = LinkFaultBody,
    responses((status = 200, body = ChaosStatus), (status = 400, body = meridian_api::ErrorBody)))]
pub async fn delay(State(state): State<AppState>, headers: HeaderMap, b: Body) -> Result<Json<ChaosStatus>, ApiError> {
    let req: LinkFaultBody = json_body(&headers, b).await?;
    let pair = regions(&state, &req.regions)?;
    let fault =
        LinkFault { cut: req.cut, delay_ms: req.delay_ms, jitter_ms: req.jitter_ms, loss_percent: req.loss_percent };
    set_pair(&state, pair, fault).await
}
