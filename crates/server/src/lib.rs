//! Meridian's HTTP surface. Two listeners per node:
//! - the public API under `/v1` (JSON), plus `/metrics`;
//! - the peer endpoint (`POST /peer/v1`, postcard) that the other nodes call.
//!
//! This is the only crate that knows HTTP status codes; `error.rs` holds the one mapping.
//! Handlers validate input, call [`meridian_node::Node`], and shape answers; they hold no
//! state of their own.

pub mod chaos;
pub mod conflicts;
pub mod error;
pub mod failover;
pub mod keys;
pub mod policy;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use meridian_api::{ClusterResponse, ErrorCode, HealthResponse, NodeInfo, RegionStatus};
use meridian_node::metrics::{HttpLabels, RouteLabels};
use meridian_node::peer::PEER_BODY_BYTES_MAX;
use meridian_node::Node;
use tokio::net::TcpListener;
use utoipa::OpenApi;

use crate::error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Meridian", description = "Geo-distributed data store with differential replication."),
    paths(
        keys::put_key,
        keys::get_key,
        keys::delete_key,
        keys::op_key,
        conflicts::list,
        conflicts::show,
        conflicts::resolve,
        keys::list_keys,
        cluster,
        health,
        failover::status,
        failover::promote,
        failover::end,
        policy::status,
        policy::apply,
        policy::plan,
        policy::history,
        policy::version,
        policy::rollback,
        policy::explain,
        policy::schema,
        chaos::status,
        chaos::partition,
        chaos::heal,
        chaos::delay,
        replication,
        verify
    ),
    components(schemas(meridian_api::ErrorBody, meridian_api::ErrorCode, meridian_api::PolicyProblem))
)]
pub struct ApiDoc;

/// The public API router.
pub fn api_router(node: Arc<Node>) -> Router {
    let state = AppState { node };
    Router::new()
        .route("/v1/datasets/{dataset}/keys/{key}", get(keys::get_key).put(keys::put_key).delete(keys::delete_key))
        .route("/v1/datasets/{dataset}/keys", get(keys::list_keys))
        .route("/v1/datasets/{dataset}/keys/{key}/{op}", post(keys::op_key))
        .route("/v1/conflicts", get(conflicts::list))
        .route("/v1/conflicts/{id}", get(conflicts::show))
        .route("/v1/conflicts/{id}/resolve", post(conflicts::resolve))
        .route("/v1/policy", get(policy::status).post(policy::apply))
        .route("/v1/policy/plan", post(policy::plan))
        .route("/v1/policy/versions", get(policy::history))
        .route("/v1/policy/versions/{version}", get(policy::version))
        .route("/v1/policy/rollback", post(policy::rollback))
        .route("/v1/policy/explain", get(policy::explain))
        .route("/v1/policy/schema", get(policy::schema))
        .route("/v1/admin/chaos", get(chaos::status))
        .route("/v1/admin/chaos/partition", post(chaos::partition))
        .route("/v1/admin/chaos/heal", post(chaos::heal))
        .route("/v1/admin/chaos/delay", post(chaos::delay))
        .route("/v1/failover", get(failover::status))
        .route("/v1/failover/promote", post(failover::promote))
        .route("/v1/failover/end", post(failover::end))
        .route("/v1/replication", get(replication))
        .route("/v1/replication/verify", get(verify))
        .route("/v1/cluster", get(cluster))
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics))
        .with_state(state)
}

/// The peer router: one endpoint carrying every node-to-node message.
pub fn peer_router(node: Arc<Node>) -> Router {
    Router::new().route(meridian_node::peer::PEER_PATH, post(peer)).with_state(AppState { node })
}

/// Serve both listeners until `shutdown` resolves.
pub async fn serve(
    node: Arc<Node>,
    api: TcpListener,
    peer_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut peer_stop = stop_rx.clone();
    let mut api_stop = stop_rx;
    // Small request/response messages: never let Nagle's algorithm hold one back.
    let nodelay = |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "set TCP_NODELAY");
        }
    };
    let peer_listener = peer_listener.tap_io(nodelay);
    let api = api.tap_io(nodelay);
    let peer_srv = axum::serve(peer_listener, peer_router(node.clone())).with_graceful_shutdown(async move {
        let _ = peer_stop.wait_for(|s| *s).await;
    });
    let api_srv = axum::serve(api, api_router(node)).with_graceful_shutdown(async move {
        let _ = api_stop.wait_for(|s| *s).await;
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let (a, b) =
        tokio::join!(std::future::IntoFuture::into_future(api_srv), std::future::IntoFuture::into_future(peer_srv));
    a?;
    b?;
    Ok(())
}

async fn record_metrics(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().as_str().to_owned();
    let start = Instant::now();
    let resp = next.run(req).await;
    let m = state.node.metrics();
    m.http_requests.get_or_create(&HttpLabels { route: route.clone(), method, status: resp.status().as_u16() }).inc();
    m.http_duration.get_or_create(&RouteLabels { route }).observe(start.elapsed().as_secs_f64());
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::RouteNotFound, "no resource lives at this path").hint("see /v1/openapi.json for the API")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "this resource does not accept that method")
        .hint("see /v1/openapi.json for the methods each resource takes")
}

fn node_info(spec: &meridian_core::NodeSpec) -> NodeInfo {
    NodeInfo {
        id: spec.id,
        region: spec.region.to_string(),
        zone: spec.zone.to_string(),
        api_addr: spec.api_addr.to_string(),
        peer_addr: spec.peer_addr.to_string(),
    }
}

#[utoipa::path(get, path = "/v1/replication", responses((status = 200, body = meridian_api::ReplicationStatus)))]
pub async fn replication(State(state): State<AppState>) -> Json<meridian_api::ReplicationStatus> {
    let node = &state.node;
    let destinations = |own: &str| -> Vec<String> {
        node.topology().regions().iter().map(|r| r.name.to_string()).filter(|r| r != own).collect()
    };
    let regions = node
        .replication_view()
        .await
        .into_iter()
        .map(|(region, r)| match r {
            Ok(r) => {
                let links = destinations(region.as_str())
                    .into_iter()
                    .map(|d| {
                        let acked = r.cursors.iter().find(|(c, _)| *c == d).map_or(0, |(_, s)| *s);
                        meridian_api::LinkStatus {
                            backfilled_epoch: r.backfilled.iter().find(|(b, _)| *b == d).map(|(_, e)| *e),
                            shipper: r.links.iter().find(|l| l.destination == d).map(shipper_status),
                            destination: d,
                            acknowledged_seq: acked,
                            lag_changes: r.region_seq.saturating_sub(acked),
                        }
                    })
                    .collect();
                meridian_api::RegionReplicationStatus {
                    region: region.to_string(),
                    reachable: true,
                    reported_by: Some(r.node),
                    region_seq: r.region_seq,
                    links,
                    merged: r.merged,
                    received: r.received,
                    repaired: r.repaired,
                    purged: r.purged,
                    outbox_trimmed: r.outbox_trimmed,
                    policy_epoch: r.epoch,
                    error: None,
                }
            }
            Err(e) => meridian_api::RegionReplicationStatus {
                region: region.to_string(),
                reachable: false,
                reported_by: None,
                region_seq: 0,
                links: Vec::new(),
                merged: Vec::new(),
                received: Vec::new(),
                repaired: Vec::new(),
                purged: 0,
                outbox_trimmed: 0,
                policy_epoch: 0,
                error: Some(e),
            },
        })
        .collect();
    Json(meridian_api::ReplicationStatus { regions })
}

fn shipper_status(l: &meridian_node::peer::LinkReport) -> meridian_api::LinkShipper {
    let datasets: Vec<meridian_api::LinkDatasetStatus> = l
        .datasets
        .iter()
        .map(|d| meridian_api::LinkDatasetStatus {
            dataset: d.dataset.clone(),
            queued_changes: d.queued_changes,
            queued_bytes: d.queued_bytes,
            lag_seconds: d.lag_ms as f64 / 1000.0,
            sent_changes: d.sent_changes,
            sent_bytes: d.sent_bytes,
        })
        .collect();
    let state = if l.failures > 0 {
        "backoff"
    } else if l.congested {
        "congested"
    } else {
        "ok"
    };
    meridian_api::LinkShipper {
        state: state.into(),
        batches_in_flight: l.batches_in_flight,
        failures: l.failures,
        last_error: l.last_error.clone(),
        rtt_ms: l.rtt_us.map(|u| u as f64 / 1000.0),
        goodput_bytes_per_sec: l.goodput_bytes_per_sec,
        batches: l.batches,
        errors: l.errors,
        sent_bytes_raw: l.sent_bytes_raw,
        sent_bytes_wire: l.sent_bytes_wire,
        deferred: l.deferred.clone(),
        lag_seconds: datasets.iter().map(|d| d.lag_seconds).fold(0.0, f64::max),
        queued_changes: datasets.iter().map(|d| d.queued_changes).sum(),
        queued_bytes: datasets.iter().map(|d| d.queued_bytes).sum(),
        datasets,
    }
}

/// Compare every pair of regions' copies by digest, over what both may hold. `converged` is
/// true only when every pair was compared and every dataset matched.
#[utoipa::path(
    get,
    path = "/v1/replication/verify",
    params(meridian_api::VerifyQuery),
    responses((status = 200, body = meridian_api::VerifyReport), (status = 400, body = meridian_api::ErrorBody))
)]
pub async fn verify(
    State(state): State<AppState>,
    query: Result<axum::extract::Query<meridian_api::VerifyQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<meridian_api::VerifyReport>, ApiError> {
    let axum::extract::Query(q) = query.map_err(keys::query_error)?;
    if let Some(d) = &q.dataset {
        meridian_core::DatasetName::new(d.clone()).map_err(error::dataset_error)?;
    }
    let pairs: Vec<meridian_api::PairVerification> = state
        .node
        .verify(q.dataset.as_deref())
        .await
        .into_iter()
        .map(|p| match p.result {
            Ok(ds) => meridian_api::PairVerification {
                a: p.a,
                b: p.b,
                datasets: ds
                    .into_iter()
                    .map(|d| meridian_api::DatasetVerification {
                        dataset: d.dataset,
                        count_a: d.count_a,
                        count_b: d.count_b,
                        equal: d.equal,
                    })
                    .collect(),
                error: None,
            },
            Err(e) => meridian_api::PairVerification { a: p.a, b: p.b, datasets: Vec::new(), error: Some(e) },
        })
        .collect();
    let converged = pairs.iter().all(|p| p.error.is_none() && p.datasets.iter().all(|d| d.equal));
    Ok(Json(meridian_api::VerifyReport { converged, pairs }))
}

#[utoipa::path(get, path = "/v1/cluster", responses((status = 200, body = ClusterResponse)))]
pub async fn cluster(State(state): State<AppState>) -> Json<ClusterResponse> {
    let node = &state.node;
    let views = node.cluster_view().await;
    let (probed, now_ms) = node.region_health();
    let regions = views
        .into_iter()
        .map(|v| {
            let nodes = node.topology().region_nodes(&v.region).into_iter().map(node_info).collect();
            let health = probed.get(&v.region).map(|h| region_health(h, now_ms));
            let mut status = match v.report {
                Ok(r) => RegionStatus {
                    name: v.region.to_string(),
                    reachable: true,
                    reported_by: Some(r.node),
                    leader: r.leader,
                    term: r.term,
                    last_log_index: r.last_log_index,
                    applied_index: r.applied_index,
                    nodes,
                    error: None,
                    health: None,
                },
                Err(e) => RegionStatus {
                    name: v.region.to_string(),
                    reachable: false,
                    reported_by: None,
                    leader: None,
                    term: 0,
                    last_log_index: None,
                    applied_index: None,
                    nodes,
                    error: Some(e),
                    health: None,
                },
            };
            status.health = health;
            status
        })
        .collect();
    Json(ClusterResponse { node: node_info(node.spec()), regions })
}

fn region_health(h: &meridian_node::health::RegionHealth, now_ms: u64) -> meridian_api::RegionHealth {
    meridian_api::RegionHealth {
        reachability: h.reachability.name().to_owned(),
        rtt_ms: h.rtt_ms,
        last_rtt_ms: h.last_rtt_ms,
        last_ok_ms_ago: h.last_ok_at_ms.map(|t| now_ms.saturating_sub(t)),
        since_ms_ago: h.since_ms.map(|t| now_ms.saturating_sub(t)),
        consecutive_failures: h.consecutive_failed,
        probes: h.probes,
        failures: h.failures,
        last_error: h.last_error.clone(),
    }
}

#[utoipa::path(get, path = "/v1/health", responses(
    (status = 200, body = HealthResponse, description = "the node's region has a leader"),
    (status = 503, body = HealthResponse, description = "no leader is known")))]
pub async fn health(State(state): State<AppState>) -> Response {
    let r = state.node.region_report();
    let ok = r.leader.is_some();
    let body = HealthResponse {
        status: if ok { "ok" } else { "no_leader" }.to_owned(),
        node: node_info(state.node.spec()),
        leader: r.leader,
        term: r.term,
        applied_index: r.applied_index,
        snapshot_index: r.snapshot_index,
        purged_index: r.purged_index,
    };
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn metrics(State(state): State<AppState>) -> Response {
    state.node.refresh_metrics();
    let mut resp = state.node.metrics().encode().into_response();
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    resp
}

async fn peer(State(state): State<AppState>, headers: axum::http::HeaderMap, body: Body) -> Response {
    use meridian_node::transport::{serve_peer_body, ZSTD};
    let bytes = match axum::body::to_bytes(body, PEER_BODY_BYTES_MAX).await {
        Ok(b) => b,
        Err(e) => {
            return (StatusCode::PAYLOAD_TOO_LARGE, format!("peer message too large or broken: {e}")).into_response()
        }
    };
    let is = |name: &str| headers.get(name).is_some_and(|v| v.as_bytes() == ZSTD.as_bytes());
    let reply = serve_peer_body(&state.node, &bytes, is("content-encoding"), is("accept-encoding")).await;
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if reply.compressed {
        (status, [("content-encoding", ZSTD)], reply.body).into_response()
    } else {
        (status, reply.body).into_response()
    }
}
