//! `/v1/datasets/{dataset}/keys...`: put, get, delete and list.

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use meridian_api::{
    DeleteResponse, ErrorCode, GetResponse, ListItem, ListQuery, ListResponse, OpRequest, PutResponse, ReadQuery,
    ServedBy, SkippedRegion, VersionInfo, WriteQuery, HEADER_CONTEXT, HEADER_ROUTE_REASON, HEADER_ROUTE_SKIPPED,
    HEADER_SERVED_BY, HEADER_SESSION,
};
use meridian_core::crdt::CrdtOp;
use meridian_core::limits::{KEY_BYTES_MAX, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX};
use meridian_core::{DatasetName, Key, Version, VersionVector};
use meridian_node::session::SessionKey;
use meridian_node::{Consistency, Precondition, ReadAt, Served, Skip, WriteOutcome};

use crate::error::{dataset_error, key_error, ApiError};
use crate::AppState;

pub(crate) fn served_by(state: &AppState, served: Served) -> ServedBy {
    let (region, zone) = match state.node.topology().node(served.node) {
        Some(n) => (n.region.to_string(), n.zone.to_string()),
        None => (String::from("?"), String::from("?")),
    };
    let skipped = served.skipped.iter().map(skipped_region).collect();
    ServedBy { region, zone, node: served.node, reason: served.reason.as_str().to_owned(), skipped }
}

pub(crate) fn skipped_region(s: &Skip) -> SkippedRegion {
    SkippedRegion { region: s.region.to_string(), cause: s.cause.as_str().to_owned(), detail: s.detail.clone() }
}

fn with_headers(mut resp: Response, served: &ServedBy, etag: Option<&str>) -> Response {
    let h = resp.headers_mut();
    let by = format!("{}/{}/node-{}", served.region, served.zone, served.node);
    if let Ok(v) = HeaderValue::from_str(&by) {
        h.insert(HEADER_SERVED_BY, v);
    }
    if let Ok(v) = HeaderValue::from_str(&served.reason) {
        h.insert(HEADER_ROUTE_REASON, v);
    }
    if !served.skipped.is_empty() {
        let each: Vec<String> = served.skipped.iter().map(|s| format!("{}={}", s.region, s.cause)).collect();
        if let Ok(v) = HeaderValue::from_str(&each.join(", ")) {
            h.insert(HEADER_ROUTE_SKIPPED, v);
        }
    }
    if let Some(etag) = etag {
        if let Ok(v) = HeaderValue::from_str(&format!("\"{etag}\"")) {
            h.insert("etag", v);
        }
    }
    resp
}

fn path_error(e: PathRejection) -> ApiError {
    ApiError::new(ErrorCode::InvalidKey, format!("the path could not be decoded: {e}"))
        .hint("percent-encode the dataset and key as UTF-8")
}

pub(crate) fn query_error(e: QueryRejection) -> ApiError {
    ApiError::new(ErrorCode::InvalidQuery, e.body_text())
}

fn parse_names(dataset: String, key: String) -> Result<(DatasetName, Key), ApiError> {
    let dataset = DatasetName::new(dataset).map_err(dataset_error)?;
    let key = Key::new(key).map_err(key_error)?;
    Ok((dataset, key))
}

fn parse_consistency(c: Option<&str>, max_staleness: Option<&str>) -> Result<Consistency, ApiError> {
    let level = match c {
        None => Consistency::DatasetDefault,
        Some("strong") => Consistency::Strong,
        Some("local") => Consistency::Local,
        Some("eventual") => Consistency::Eventual,
        Some("bounded") => Consistency::Bounded(None),
        Some("session") => Consistency::Session,
        Some(other) => {
            return Err(ApiError::new(ErrorCode::InvalidConsistency, format!("unknown consistency {other:?}"))
                .hint("use consistency=strong, bounded, session, local or eventual"))
        }
    };
    match (level, max_staleness) {
        (_, None) => Ok(level),
        (Consistency::DatasetDefault, Some(_)) => {
            Err(ApiError::new(ErrorCode::InvalidQuery, "max_staleness applies only to consistency=bounded")
                .hint("add consistency=bounded"))
        }
        (Consistency::Bounded(_), Some(m)) => {
            let d = meridian_policy::units::Dur::parse(m).map_err(|e| {
                ApiError::new(ErrorCode::InvalidQuery, format!("max_staleness={m:?}: {e}"))
                    .hint("write it like 500ms or 2s")
            })?;
            Ok(Consistency::Bounded(Some(d.ms())))
        }
        (_, Some(_)) => {
            Err(ApiError::new(ErrorCode::InvalidQuery, "max_staleness applies only to consistency=bounded"))
        }
    }
}

/// A request's session: the token it carried, checked, and what its answer adds to it. A
/// node without a session key neither reads nor issues tokens.
pub(crate) struct Session {
    key: Option<SessionKey>,
    seen: VersionVector,
}

impl Session {
    pub(crate) fn of(state: &AppState, headers: &HeaderMap) -> Result<Session, ApiError> {
        let key = state.node.config().session_key.clone();
        let mut seen = VersionVector::new();
        if let (Some(k), Some(v)) = (&key, headers.get(HEADER_SESSION)) {
            let text = v
                .to_str()
                .map_err(|_| ApiError::new(ErrorCode::InvalidSession, format!("{HEADER_SESSION} is not ASCII text")))?;
            seen = meridian_node::session::decode(k, text).map_err(|e| {
                ApiError::new(ErrorCode::InvalidSession, e.to_string())
                    .hint("send back a Meridian-Session header exactly as this cluster returned it, or none")
            })?;
        }
        Ok(Session { key, seen })
    }

    /// What a read at `level` may go by; an explicit `session` read needs a key.
    fn for_read(&self, level: Consistency) -> Result<Option<&VersionVector>, ApiError> {
        match (&self.key, level) {
            (None, Consistency::Session) => Err(ApiError::new(
                ErrorCode::InvalidConsistency,
                "consistency=session needs session tokens, and this node has no session key",
            )
            .hint("set [session] key in the cluster configuration (docs/configuration.md), or read at another level")),
            (None, _) => Ok(None),
            (Some(_), _) => Ok(Some(&self.seen)),
        }
    }

    fn saw(&mut self, version: &Version) {
        self.seen.add(&meridian_core::Dot { region: version.region.clone(), counter: version.seq });
    }

    /// Put the session, with what this answer showed, on the answer.
    fn stamp(&self, mut resp: Response) -> Response {
        if let Some(k) = &self.key {
            if let Ok(v) = HeaderValue::from_str(&meridian_node::session::encode(k, &self.seen)) {
                resp.headers_mut().insert(HEADER_SESSION, v);
            }
        }
        resp
    }
}

/// Read an `If-Match` / `If-None-Match` pair into a write precondition.
fn parse_condition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    let text = |name: &str| -> Result<Option<String>, ApiError> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.trim().trim_matches('"').to_owned()))
                .map_err(|_| ApiError::new(ErrorCode::InvalidPrecondition, format!("{name} is not ASCII text"))),
        }
    };
    match (text("if-match")?, text("if-none-match")?) {
        (Some(_), Some(_)) => {
            Err(ApiError::new(ErrorCode::InvalidPrecondition, "If-Match and If-None-Match cannot be combined"))
        }
        (Some(v), None) => {
            let version: Version = v.parse().map_err(|e: meridian_core::VersionParseError| {
                ApiError::new(ErrorCode::InvalidVersion, e.to_string()).hint("send the ETag of a previous answer")
            })?;
            Ok(Precondition::IfMatch(version))
        }
        (None, Some(v)) if v == "*" => Ok(Precondition::IfAbsent),
        (None, Some(_)) => {
            Err(ApiError::new(ErrorCode::InvalidPrecondition, "If-None-Match supports only \"*\" (create-only)"))
        }
        (None, None) => Ok(Precondition::None),
    }
}

/// The `Meridian-Context` header, if sent: the causal context a read returned.
fn parse_context(headers: &HeaderMap) -> Result<Option<VersionVector>, ApiError> {
    let Some(v) = headers.get(HEADER_CONTEXT) else { return Ok(None) };
    let text = v
        .to_str()
        .map_err(|_| ApiError::new(ErrorCode::InvalidContext, format!("{HEADER_CONTEXT} is not ASCII text")))?;
    text.parse::<VersionVector>().map(Some).map_err(|e| {
        ApiError::new(ErrorCode::InvalidContext, e.to_string()).hint("send back the context a GET of the key returned")
    })
}

/// Members one set operation takes at most, and fields one map operation.
pub const OP_ITEMS_MAX: usize = 1000;
/// The largest amount one counter operation takes: what a JSON number holds exactly.
pub const OP_AMOUNT_MAX: u64 = (1 << 53) - 1;

/// Turn `POST .../{op}` and its body into an operation, checking every bound.
fn parse_op(op: &str, body: &[u8]) -> Result<CrdtOp, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidOperation, m);
    let req: OpRequest = if body.iter().all(u8::is_ascii_whitespace) {
        OpRequest::default()
    } else {
        serde_json::from_slice(body).map_err(|e| bad(format!("the body does not fit the operation: {e}")))?
    };
    let only = |allowed: &[&str]| -> Result<(), ApiError> {
        let given =
            [("amount", req.amount.is_some()), ("members", req.members.is_some()), ("fields", req.fields.is_some())];
        match given.iter().find(|(name, set)| *set && !allowed.contains(name)) {
            Some((name, _)) => Err(bad(format!("`{op}` takes no `{name}`"))),
            None => Ok(()),
        }
    };
    let names = |list: Vec<String>, what: &str| -> Result<Vec<String>, ApiError> {
        if list.is_empty() || list.len() > OP_ITEMS_MAX {
            return Err(bad(format!("`{op}` needs 1 to {OP_ITEMS_MAX} {what}")));
        }
        if let Some(m) = list.iter().find(|m| m.len() > KEY_BYTES_MAX) {
            return Err(bad(format!("a {what:.6} of {} bytes is longer than {KEY_BYTES_MAX}", m.len())));
        }
        Ok(list)
    };
    let amount = || -> Result<u64, ApiError> {
        match req.amount {
            None => Ok(1),
            Some(n) if (1..=OP_AMOUNT_MAX).contains(&n) => Ok(n),
            Some(n) => Err(bad(format!("amount {n} is not from 1 to {OP_AMOUNT_MAX}"))),
        }
    };
    match op {
        "increment" | "decrement" => {
            only(&["amount"])?;
            let n = amount()?;
            Ok(if op == "increment" { CrdtOp::Increment(n) } else { CrdtOp::Decrement(n) })
        }
        "add" | "remove" => {
            only(&["members"])?;
            let members = names(req.members.clone().unwrap_or_default(), "members")?;
            Ok(if op == "add" { CrdtOp::Add(members) } else { CrdtOp::Remove(members) })
        }
        "set" => {
            only(&["fields"])?;
            let Some(serde_json::Value::Object(fields)) = req.fields.clone() else {
                return Err(bad("`set` needs fields: an object of field names to JSON values".into()));
            };
            let fields: Vec<(String, Vec<u8>)> =
                fields.into_iter().map(|(k, v)| (k, v.to_string().into_bytes())).collect();
            names(fields.iter().map(|(k, _)| k.clone()).collect(), "fields")?;
            Ok(CrdtOp::SetFields(fields))
        }
        "delete" => {
            only(&["fields"])?;
            let Some(serde_json::Value::Array(list)) = req.fields.clone() else {
                return Err(bad("`delete` needs fields: a list of field names".into()));
            };
            let list: Option<Vec<String>> = list.into_iter().map(|v| v.as_str().map(str::to_owned)).collect();
            let list = list.ok_or_else(|| bad("`delete` needs fields: a list of field names".into()))?;
            Ok(CrdtOp::DeleteFields(names(list, "fields")?))
        }
        other => Err(ApiError::new(ErrorCode::InvalidOperation, format!("{other:?} is not an operation"))
            .hint("counters take increment|decrement, sets add|remove, maps set|delete")),
    }
}

/// Read a JSON body: the content type must be JSON, the size within the node's limit, and
/// the text valid JSON. Returns the text exactly as sent (it is stored verbatim).
/// A JSON request body of at most `max` bytes, decoded into `T` (an admin or policy body).
pub(crate) async fn read_json<T: serde::de::DeserializeOwned>(
    max: usize,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let bytes = read_json_body(max, headers, body).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(ErrorCode::MalformedJson, format!("the body does not fit: {e}")))
}

pub(crate) async fn read_json_body(max: usize, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime != "application/json" {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            if ct.is_empty() {
                "the request has no Content-Type".to_owned()
            } else {
                format!("Content-Type {ct:?} is not JSON")
            },
        )
        .hint("send the value as JSON with Content-Type: application/json"));
    }
    let too_large = |len: Option<u64>| {
        let size = len.map(|l| format!("{l} bytes")).unwrap_or_else(|| "more bytes".into());
        ApiError::new(ErrorCode::ValueTooLarge, format!("the value is {size}; the limit is {max} bytes"))
            .hint("store large objects elsewhere and keep a reference here, or raise limits.value_bytes_max")
    };
    if let Some(len) = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()) {
        if len > max as u64 {
            return Err(too_large(Some(len)));
        }
    }
    let bytes = axum::body::to_bytes(body, max).await.map_err(|_| too_large(None))?;
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
        return Err(ApiError::new(ErrorCode::MalformedJson, format!("the body is not valid JSON: {e}"))
            .hint("a string value must be quoted: '\"text\"'"));
    }
    Ok(bytes.to_vec())
}

#[utoipa::path(
    put, path = "/v1/datasets/{dataset}/keys/{key}",
    params(("dataset" = String, Path), ("key" = String, Path, description = "percent-encoded UTF-8"), WriteQuery,
           ("If-Match" = Option<String>, Header, description = "write only if the current version is this ETag"),
           ("If-None-Match" = Option<String>, Header, description = "\"*\": write only if the key holds no value")),
    request_body(content = Object, content_type = "application/json", description = "any JSON value"),
    responses((status = 200, body = PutResponse, description = "replaced an existing value"),
              (status = 201, body = PutResponse, description = "created"),
              (status = 400, body = meridian_api::ErrorBody), (status = 412, body = meridian_api::ErrorBody),
              (status = 413, body = meridian_api::ErrorBody), (status = 415, body = meridian_api::ErrorBody),
              (status = 503, body = meridian_api::ErrorBody))
)]
pub async fn put_key(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<WriteQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path((dataset, key)) = path.map_err(path_error)?;
    let (dataset, key) = parse_names(dataset, key)?;
    let condition = parse_condition(&headers)?;
    let Query(q) = query.map_err(query_error)?;
    let context = parse_context(&headers)?;
    let mut session = Session::of(&state, &headers)?;
    let value = read_json_body(state.node.config().limits.value_bytes_max, &headers, body).await?;
    let gw = state.node.gateway();
    let home = q.home.as_deref();
    let (result, served) = match context {
        None => gw.put(&dataset, &key, value, condition, home).await?,
        Some(context) => gw.put_in_context(&dataset, &key, Some(value), context, condition, home).await?,
    };
    let served = served_by(&state, served);
    match result {
        WriteOutcome::Written { version, created } => {
            session.saw(&version);
            Ok(session.stamp(written(&dataset, &key, &version, created, served)))
        }
        other => Err(write_refusal(other)),
    }
}

/// The answer to a write that stored a value: 201 if it created the key, else 200.
fn written(dataset: &DatasetName, key: &Key, version: &Version, created: bool, served: ServedBy) -> Response {
    let info = VersionInfo::from(version);
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    let etag = info.etag.clone();
    let body = PutResponse {
        dataset: dataset.to_string(),
        key: key.to_string(),
        version: info,
        created,
        served_by: served.clone(),
    };
    with_headers((status, Json(body)).into_response(), &served, Some(&etag))
}

fn write_refusal(result: WriteOutcome) -> ApiError {
    match result {
        WriteOutcome::PreconditionFailed { current } => {
            let mut e = ApiError::new(
                ErrorCode::PreconditionFailed,
                match &current {
                    Some(v) => format!("the precondition did not hold; the current version is {v}"),
                    None => "the precondition did not hold; the key holds no value".to_owned(),
                },
            );
            e.body.current_version = current.map(|v| v.to_string());
            e
        }
        WriteOutcome::NotFound => ApiError::new(ErrorCode::KeyNotFound, "the key holds no value"),
        other => ApiError::new(ErrorCode::Internal, format!("unexpected write result {other:?}")),
    }
}

#[utoipa::path(
    get, path = "/v1/datasets/{dataset}/keys/{key}",
    params(("dataset" = String, Path), ("key" = String, Path), ReadQuery),
    responses((status = 200, body = GetResponse), (status = 404, body = meridian_api::ErrorBody),
              (status = 400, body = meridian_api::ErrorBody), (status = 503, body = meridian_api::ErrorBody))
)]
pub async fn get_key(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path((dataset, key)) = path.map_err(path_error)?;
    let (dataset, key) = parse_names(dataset, key)?;
    let Query(q) = query.map_err(query_error)?;
    let level = parse_consistency(q.consistency.as_deref(), q.max_staleness.as_deref())?;
    let mut session = Session::of(&state, &headers)?;
    let seen = session.for_read(level)?;
    let (obj, served) = state
        .node
        .gateway()
        .get(&dataset, &key, ReadAt { consistency: level, session: seen }, q.home.as_deref())
        .await?;
    let served = served_by(&state, served);
    // A tombstone read is seen too: a later session read must not bring the value back.
    if let Some(o) = &obj {
        session.seen.merge(&o.context);
    }
    let (obj, value) = match obj {
        Some(o) => match o.value.clone() {
            Some(v) => (o, v),
            None => return Err(ApiError::new(ErrorCode::KeyNotFound, format!("{dataset}/{key} was deleted"))),
        },
        None => return Err(ApiError::new(ErrorCode::KeyNotFound, format!("{dataset}/{key} holds no value"))),
    };
    let value: serde_json::Value = serde_json::from_slice(&value)
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("stored value is not JSON: {e}")))?;
    let info = VersionInfo::from(&obj.version);
    let siblings = if obj.siblings.is_empty() {
        Vec::new()
    } else {
        std::iter::once(crate::conflicts::sibling_info(&obj.version, obj.value.as_deref()))
            .chain(obj.siblings.iter().map(|(v, value)| crate::conflicts::sibling_info(v, value.as_deref())))
            .collect()
    };
    let context = obj.context.to_string();
    let body = GetResponse {
        dataset: dataset.to_string(),
        key: key.to_string(),
        value,
        version: info.clone(),
        context: context.clone(),
        siblings,
        served_by: served.clone(),
    };
    let mut resp = with_headers(Json(body).into_response(), &served, Some(&info.etag));
    if let Ok(v) = HeaderValue::from_str(&context) {
        resp.headers_mut().insert(HEADER_CONTEXT, v);
    }
    Ok(session.stamp(resp))
}

#[utoipa::path(
    delete, path = "/v1/datasets/{dataset}/keys/{key}",
    params(("dataset" = String, Path), ("key" = String, Path), WriteQuery,
           ("If-Match" = Option<String>, Header, description = "delete only if the current version is this ETag")),
    responses((status = 200, body = DeleteResponse), (status = 404, body = meridian_api::ErrorBody),
              (status = 412, body = meridian_api::ErrorBody), (status = 503, body = meridian_api::ErrorBody))
)]
pub async fn delete_key(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<WriteQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path((dataset, key)) = path.map_err(path_error)?;
    let (dataset, key) = parse_names(dataset, key)?;
    let condition = parse_condition(&headers)?;
    let Query(q) = query.map_err(query_error)?;
    let context = parse_context(&headers)?;
    let mut session = Session::of(&state, &headers)?;
    let gw = state.node.gateway();
    let home = q.home.as_deref();
    let (result, served) = match context {
        None => gw.delete(&dataset, &key, condition, home).await?,
        Some(context) => gw.put_in_context(&dataset, &key, None, context, condition, home).await?,
    };
    let served = served_by(&state, served);
    match result {
        WriteOutcome::Deleted { version } => {
            let info = VersionInfo::from(&version);
            let body = DeleteResponse {
                dataset: dataset.to_string(),
                key: key.to_string(),
                version: info.clone(),
                served_by: served.clone(),
            };
            session.saw(&version);
            Ok(session.stamp(with_headers(Json(body).into_response(), &served, Some(&info.etag))))
        }
        other => Err(write_refusal(other)),
    }
}

#[utoipa::path(
    post, path = "/v1/datasets/{dataset}/keys/{key}/{op}",
    params(("dataset" = String, Path), ("key" = String, Path),
           ("op" = String, Path, description = "increment|decrement (counter), add|remove (set), set|delete (map)"),
           WriteQuery),
    request_body(content = OpRequest, content_type = "application/json"),
    responses((status = 200, body = PutResponse), (status = 201, body = PutResponse, description = "created"),
              (status = 400, body = meridian_api::ErrorBody), (status = 409, body = meridian_api::ErrorBody),
              (status = 413, body = meridian_api::ErrorBody), (status = 503, body = meridian_api::ErrorBody))
)]
pub async fn op_key(
    State(state): State<AppState>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    query: Result<Query<WriteQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path((dataset, key, op)) = path.map_err(path_error)?;
    let (dataset, key) = parse_names(dataset, key)?;
    let condition = parse_condition(&headers)?;
    let Query(q) = query.map_err(query_error)?;
    let mut session = Session::of(&state, &headers)?;
    let max = state.node.config().limits.value_bytes_max;
    let bytes = axum::body::to_bytes(body, max).await.map_err(|_| {
        ApiError::new(ErrorCode::ValueTooLarge, format!("the operation's body is larger than {max} bytes"))
    })?;
    let op = parse_op(&op, &bytes)?;
    let (result, served) = state.node.gateway().op(&dataset, &key, op, condition, q.home.as_deref()).await?;
    let served = served_by(&state, served);
    let (version, created) = match result {
        WriteOutcome::Written { version, created } => (version, created),
        // A `clear` that removed the key's last trace.
        WriteOutcome::Deleted { version } => (version, false),
        other => return Err(write_refusal(other)),
    };
    session.saw(&version);
    Ok(session.stamp(written(&dataset, &key, &version, created, served)))
}

fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) || s.len() > 2 * meridian_core::limits::KEY_BYTES_MAX {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

#[utoipa::path(
    get, path = "/v1/datasets/{dataset}/keys",
    params(("dataset" = String, Path), ListQuery),
    responses((status = 200, body = ListResponse), (status = 400, body = meridian_api::ErrorBody),
              (status = 503, body = meridian_api::ErrorBody))
)]
pub async fn list_keys(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ListQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(dataset) = path.map_err(path_error)?;
    let dataset = DatasetName::new(dataset).map_err(dataset_error)?;
    let Query(q) = query.map_err(query_error)?;
    let level = parse_consistency(q.consistency.as_deref(), q.max_staleness.as_deref())?;
    let limit = match q.limit.as_deref() {
        None => LIST_LIMIT_DEFAULT,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=LIST_LIMIT_MAX).contains(&n) => n,
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidQuery,
                    format!("limit={l:?} is not a number from 1 to {LIST_LIMIT_MAX}"),
                ))
            }
        },
    };
    let prefix = q.prefix.unwrap_or_default();
    if prefix.len() > meridian_core::limits::KEY_BYTES_MAX {
        return Err(ApiError::new(ErrorCode::KeyTooLong, "the prefix is longer than the longest key"));
    }
    // A prefix no key could start with (control characters, say) is refused, not searched for.
    if !prefix.is_empty() {
        Key::new(prefix.as_str()).map_err(|_| {
            ApiError::new(ErrorCode::InvalidKey, "the prefix holds a control character, which no key may hold")
                .hint("a prefix is the start of a key: UTF-8 without control characters")
        })?;
    }
    let after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(hex_decode(c).ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidCursor, "the cursor was not produced by this API")
                .hint("pass next_cursor back unchanged")
        })?),
    };
    let mut session = Session::of(&state, &headers)?;
    let seen = session.for_read(level)?;
    let (page, served) = state
        .node
        .gateway()
        .list(
            &dataset,
            &prefix,
            after.as_deref(),
            limit,
            ReadAt { consistency: level, session: seen },
            q.home.as_deref(),
        )
        .await?;
    let served = served_by(&state, served);
    let items = page.items;
    for (_, version) in &items {
        session.saw(version);
    }
    let next_cursor = if items.len() == limit { items.last().map(|(k, _)| hex_encode(k)) } else { None };
    let items =
        items.into_iter().map(|(key, version)| ListItem { key, version: VersionInfo::from(&version) }).collect();
    let body = ListResponse { dataset: dataset.to_string(), items, next_cursor, served_by: served.clone() };
    Ok(session.stamp(with_headers(Json(body).into_response(), &served, None)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip() {
        for k in ["", "a", "eu-west/ü", "x y"] {
            assert_eq!(hex_decode(&hex_encode(k)).as_deref(), Some(k));
        }
        assert_eq!(hex_decode("zz"), None);
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("ff"), None); // not UTF-8
    }
}
