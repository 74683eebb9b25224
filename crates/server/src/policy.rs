//! `/v1/policy...`: apply, plan, history, versions, rollback, explain and the schema.

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use meridian_api::{
    DatasetPlan, ErrorCode, ExplainQuery, Explanation, LinkBody, PlacedLink, PolicyApplyRequest, PolicyApplyResponse,
    PolicyDocumentBody, PolicyEntry, PolicyHistory, PolicyPlan, PolicyRollbackRequest, PolicyStatus, PolicyVersionBody,
    RegionBytes, RegionDecisionBody, RegionPolicy,
};
use meridian_core::{DatasetName, Key};
use meridian_node::policy::{schedule_text, ApplyOutcome, HistoryRecord};
use meridian_policy::limits::POLICY_BYTES_MAX;
use meridian_policy::{Format, Mode, Placement, QuarantineState, Retention, Role, Rollout};
use serde::de::DeserializeOwned;

use crate::error::{dataset_error, key_error, ApiError};
use crate::keys::{query_error, read_json};
use crate::AppState;

/// Policy request bodies carry the document text: the document limit plus room for JSON
/// escaping and the other fields.
const POLICY_BODY_BYTES_MAX: usize = 2 * POLICY_BYTES_MAX + 4096;

async fn json_body<T: DeserializeOwned>(headers: &HeaderMap, body: Body) -> Result<T, ApiError> {
    read_json(POLICY_BODY_BYTES_MAX, headers, body).await
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn document(d: &PolicyDocumentBody) -> Result<(Format, String), ApiError> {
    let format = match d.format.as_deref() {
        None | Some("toml") => Format::Toml,
        Some("yaml") => Format::Yaml,
        Some(other) => {
            return Err(ApiError::new(ErrorCode::InvalidQuery, format!("format {other:?} is neither toml nor yaml")))
        }
    };
    let file =
        d.file.clone().unwrap_or_else(|| if format == Format::Yaml { "policy.yaml" } else { "policy.toml" }.into());
    if file.len() > 256 {
        return Err(ApiError::new(ErrorCode::InvalidQuery, "the file name is longer than 256 bytes"));
    }
    Ok((format, file))
}

fn entry_body(e: &HistoryRecord) -> PolicyEntry {
    PolicyEntry {
        epoch: e.epoch,
        version: e.version.clone(),
        action: e.action.clone(),
        mode: match e.mode {
            Mode::Shadow => "shadow",
            Mode::Enforce => "enforce",
        }
        .into(),
        percent: e.percent,
        base: e.base.clone(),
        at_ms: e.at_ms,
        datasets: e.datasets.clone(),
    }
}

fn apply_body(o: ApplyOutcome) -> PolicyApplyResponse {
    PolicyApplyResponse {
        entry: entry_body(&o.entry),
        propagated: o.propagated.iter().map(ToString::to_string).collect(),
        pending: o.pending.iter().map(ToString::to_string).collect(),
    }
}

#[utoipa::path(get, path = "/v1/policy", responses((status = 200, body = PolicyStatus)))]
pub async fn status(State(state): State<AppState>) -> Result<Json<PolicyStatus>, ApiError> {
    let (active, copies) = state.node.policy_status().await;
    let active = active?;
    Ok(Json(PolicyStatus {
        active: active.as_ref().map(entry_body),
        authority: state.node.policy_authority().to_string(),
        regions: copies
            .into_iter()
            .map(|c| RegionPolicy {
                region: c.region.to_string(),
                epoch: c.epoch.as_ref().ok().copied().flatten(),
                error: c.epoch.err(),
            })
            .collect(),
    }))
}

#[utoipa::path(post, path = "/v1/policy", request_body = PolicyApplyRequest,
    responses((status = 200, body = PolicyApplyResponse), (status = 400, body = meridian_api::ErrorBody),
              (status = 409, body = meridian_api::ErrorBody), (status = 503, body = meridian_api::ErrorBody)))]
pub async fn apply(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PolicyApplyResponse>, ApiError> {
    let req: PolicyApplyRequest = json_body(&headers, body).await?;
    let (format, file) = document(&req.document)?;
    let mode = match req.mode.as_deref() {
        None | Some("enforce") => Mode::Enforce,
        Some("shadow") => Mode::Shadow,
        Some(other) => {
            return Err(ApiError::new(ErrorCode::InvalidQuery, format!("mode {other:?} is neither enforce nor shadow")))
        }
    };
    let rollout = Rollout::new(mode, req.percent.unwrap_or(Rollout::FULL))
        .map_err(|e| ApiError::new(ErrorCode::InvalidQuery, e))?;
    let outcome = state.node.policy_apply(&req.document.text, format, &file, rollout, "apply", now_ms()).await?;
    Ok(Json(apply_body(outcome)))
}

#[utoipa::path(post, path = "/v1/policy/rollback", request_body = PolicyRollbackRequest,
    responses((status = 200, body = PolicyApplyResponse), (status = 404, body = meridian_api::ErrorBody)))]
pub async fn rollback(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<PolicyApplyResponse>, ApiError> {
    let req: PolicyRollbackRequest = json_body(&headers, body).await?;
    Ok(Json(apply_body(state.node.policy_rollback(&req.version, now_ms()).await?)))
}

#[utoipa::path(get, path = "/v1/policy/versions", responses((status = 200, body = PolicyHistory)))]
pub async fn history(State(state): State<AppState>) -> Result<Json<PolicyHistory>, ApiError> {
    let entries = state.node.policy_history().await?;
    Ok(Json(PolicyHistory { entries: entries.iter().map(entry_body).collect() }))
}

#[utoipa::path(get, path = "/v1/policy/versions/{version}", params(("version" = String, Path)),
    responses((status = 200, body = PolicyVersionBody), (status = 404, body = meridian_api::ErrorBody)))]
pub async fn version(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<PolicyVersionBody>, ApiError> {
    let Path(v) = path.map_err(|e| ApiError::new(ErrorCode::InvalidQuery, e.body_text()))?;
    let rec = state.node.policy_version(&v).await?;
    let format = if rec.format == "yaml" { Format::Yaml } else { Format::Toml };
    let datasets = meridian_policy::Policy::parse(&rec.text, format, &rec.file, None)
        .map(|p| p.datasets().map(|(n, _)| n.to_string()).collect())
        .unwrap_or_default();
    Ok(Json(PolicyVersionBody { version: rec.version, format: rec.format, file: rec.file, text: rec.text, datasets }))
}

#[utoipa::path(post, path = "/v1/policy/plan", request_body = PolicyDocumentBody,
    responses((status = 200, body = PolicyPlan), (status = 400, body = meridian_api::ErrorBody)))]
pub async fn plan(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Json<PolicyPlan>, ApiError> {
    let req: PolicyDocumentBody = json_body(&headers, body).await?;
    let (format, file) = document(&req)?;
    let p = state.node.policy_plan(&req.text, format, &file).await?;
    let bytes = |v: &[(meridian_core::RegionId, u64, u64)]| {
        v.iter().map(|(r, keys, bytes)| RegionBytes { region: r.to_string(), keys: *keys, bytes: *bytes }).collect()
    };
    let links = |v: &[(String, meridian_core::RegionId, meridian_core::RegionId)]| {
        v.iter().map(|(d, f, t)| LinkBody { dataset: d.clone(), from: f.to_string(), to: t.to_string() }).collect()
    };
    Ok(Json(PolicyPlan {
        same_version: p.current.as_deref() == Some(p.proposed.as_str()),
        current: p.current.clone(),
        proposed: p.proposed.clone(),
        datasets: p
            .datasets
            .iter()
            .map(|d| DatasetPlan {
                dataset: d.dataset.clone(),
                change: d.change.into(),
                gaining: bytes(&d.gaining),
                losing: bytes(&d.losing),
                notes: d.notes.clone(),
            })
            .collect(),
        links_opened: links(&p.links_opened),
        links_closed: links(&p.links_closed),
        unreachable: p.unreachable.iter().map(ToString::to_string).collect(),
    }))
}

fn explanation(dataset: &str, key: &str, version: String, governed: &str, p: &Placement) -> Explanation {
    let names = |v: &[meridian_core::RegionId]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    Explanation {
        dataset: dataset.into(),
        key: key.into(),
        version,
        governed_by: governed.into(),
        rules: match p.rules {
            meridian_policy::RuleSource::Named => "named",
            meridian_policy::RuleSource::Default => "default",
        }
        .into(),
        locality: p.locality.to_string(),
        classification: p.classification.to_string(),
        kind: p.kind.to_string(),
        homes: names(&p.homes),
        mirrors: names(&p.mirrors),
        allowed: names(&p.allowed),
        regions: p
            .regions
            .iter()
            .map(|d| RegionDecisionBody {
                region: d.region.to_string(),
                role: match d.role {
                    Role::Home => "home",
                    Role::Mirror => "mirror",
                    Role::None => "none",
                }
                .into(),
                reason_code: d.reason.code().into(),
                reason: d.reason.to_string(),
            })
            .collect(),
        links: p
            .links
            .iter()
            .map(|l| PlacedLink {
                from: l.from.to_string(),
                to: l.to.to_string(),
                schedule: schedule_text(l),
                rate: l.rate.map(|r| r.to_string()),
                max_lag: l.max_lag.map(|d| d.to_string()),
            })
            .collect(),
        conflict: p.conflict.to_string(),
        consistency: p.consistency.to_string(),
        failover: names(&p.failover),
        retention: match p.retention {
            Retention::Forever => "forever".into(),
            Retention::For(d) => d.to_string(),
        },
        encryption_at_rest: p.encryption_at_rest,
        quarantine: match p.quarantine {
            QuarantineState::NotHeld => "not_held",
            QuarantineState::Held { .. } => "held",
            QuarantineState::Released => "released",
        }
        .into(),
        shadow: None,
    }
}

#[utoipa::path(get, path = "/v1/policy/explain", params(ExplainQuery),
    responses((status = 200, body = Explanation), (status = 400, body = meridian_api::ErrorBody),
              (status = 403, body = meridian_api::ErrorBody), (status = 404, body = meridian_api::ErrorBody)))]
pub async fn explain(
    State(state): State<AppState>,
    query: Result<Query<ExplainQuery>, QueryRejection>,
) -> Result<Json<Explanation>, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let dataset = DatasetName::new(q.dataset.clone()).map_err(dataset_error)?;
    let key = Key::new(q.key.clone()).map_err(key_error)?;
    // Fresh from this node's copy, so an explain right after an apply sees it.
    state.node.refresh_policy()?;
    let e = state.node.policy_explain(&dataset, &key, q.home.as_deref())?;
    let mut body = explanation(&q.dataset, &q.key, e.version.to_hex(), e.governed_by, &e.placement);
    if let Some(shadow) = &e.shadow {
        body.shadow = Some(Box::new(explanation(&q.dataset, &q.key, shadow.policy.to_hex(), "shadow", shadow)));
    }
    Ok(Json(body))
}

#[utoipa::path(get, path = "/v1/policy/schema", responses((status = 200, description = "the policy JSON Schema")))]
pub async fn schema() -> Json<serde_json::Value> {
    Json(meridian_policy::json_schema())
}
