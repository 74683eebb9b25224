//! A typed client for Meridian's public HTTP API, used by the CLI and the tests.
//!
//! Errors keep the server's stable code, so callers branch on [`ErrorCode`], never on text.
//! A client carries its session: every answer's `Meridian-Session` token goes back with the
//! next request, so `consistency=session` reads see what this client wrote and read before,
//! in whichever region they are served.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_api::{
    ClusterResponse, DeleteResponse, ErrorBody, ErrorCode, Explanation, GetResponse, HealthResponse, ListResponse,
    PolicyApplyRequest, PolicyApplyResponse, PolicyDocumentBody, PolicyHistory, PolicyPlan, PolicyRollbackRequest,
    PolicyStatus, PolicyVersionBody, PutResponse, HEADER_SESSION,
};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("{body} (HTTP {status})")]
    Api { status: u16, body: ErrorBody },
    /// No answer: connection refused, reset, timed out.
    #[error("could not reach {endpoint}: {message}")]
    Transport { endpoint: String, message: String },
    /// An answer that is not what the API promises.
    #[error("unexpected answer from {endpoint} (HTTP {status}): {message}")]
    Decode { endpoint: String, status: u16, message: String },
}

impl ClientError {
    /// The stable error code, when the server sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { body, .. } => Some(body.code),
            _ => None,
        }
    }
}

/// Preconditions on a write.
#[derive(Debug, Clone, Default)]
pub enum Precondition {
    #[default]
    None,
    IfMatch(String),
    IfAbsent,
}

#[derive(Clone)]
pub struct Client {
    endpoint: String,
    http: reqwest::Client,
    /// The `home` parameter sent with key requests (user-homed datasets).
    home: Option<String>,
    /// The session token of the newest answer, sent with every request (clones share it: a
    /// clone is the same session).
    session: Arc<Mutex<Option<String>>>,
}

/// Whether session token `a` has seen at least everything `b` has: each of `b`'s slots
/// (`ms1.region=seq,....tag`) is at most `a`'s. Tokens that cannot be read cover nothing.
fn covers(a: &str, b: &str) -> bool {
    fn slots(t: &str) -> Option<std::collections::BTreeMap<&str, u64>> {
        let body = t.strip_prefix("ms1.")?;
        let (slots, _) = body.rsplit_once('.')?;
        slots
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.split_once('=').and_then(|(r, n)| Some((r, n.parse().ok()?))))
            .collect()
    }
    match (slots(a), slots(b)) {
        (Some(a), Some(b)) => b.iter().all(|(r, n)| a.get(r).is_some_and(|m| m >= n)),
        _ => false,
    }
}

/// Percent-encode one path segment (everything but unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn encode_query(s: &str) -> String {
    encode_segment(s)
}

/// The path and query of `GET /v1/policy/explain` for one key.
fn explain_path(dataset: &str, key: &str, home: Option<&str>) -> String {
    let mut path = format!("/v1/policy/explain?dataset={}&key={}", encode_query(dataset), encode_query(key));
    if let Some(h) = home {
        path.push_str(&format!("&home={}", encode_query(h)));
    }
    path
}

impl Client {
    /// A client for the node at `endpoint` (e.g. `http://127.0.0.1:7000`), with a
    /// per-request deadline.
    pub fn new(endpoint: &str, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(3))
            .no_proxy()
            .build()
            .expect("build HTTP client");
        Client {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            http,
            home: None,
            session: Arc::new(Mutex::new(None)),
        }
    }

    /// Start from this session token (`Meridian-Session` as an earlier answer gave it), for a
    /// session that moves between clients or processes.
    pub fn with_session(self, token: Option<String>) -> Self {
        *self.session.lock().expect("session lock") = token;
        self
    }

    /// The session token to carry on: the newest answer's, or the one held if that one has
    /// seen more (answers to concurrent requests can arrive out of order).
    pub fn session(&self) -> Option<String> {
        self.session.lock().expect("session lock").clone()
    }

    fn keep_session(&self, token: &str) {
        let mut held = self.session.lock().expect("session lock");
        let keep_held = held.as_deref().is_some_and(|h| covers(h, token) && !covers(token, h));
        if !keep_held {
            *held = Some(token.to_owned());
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.endpoint)
    }

    /// Send `home=REGION` with every key request: the home of keys of user-homed datasets that
    /// carry no `region/` prefix.
    pub fn with_home(mut self, home: Option<String>) -> Self {
        self.home = home;
        self
    }

    fn key_url(&self, dataset: &str, key: &str) -> String {
        let mut url = format!("{}/v1/datasets/{}/keys/{}", self.endpoint, encode_segment(dataset), encode_segment(key));
        if let Some(h) = &self.home {
            url.push_str(&format!("?home={}", encode_query(h)));
        }
        url
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let req = match self.session() {
            Some(token) => req.header(HEADER_SESSION, token),
            None => req,
        };
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Transport { endpoint: self.endpoint.clone(), message: e.to_string() })?;
        let status = resp.status().as_u16();
        if let Some(token) = resp.headers().get(HEADER_SESSION).and_then(|v| v.to_str().ok()) {
            self.keep_session(token);
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Transport { endpoint: self.endpoint.clone(), message: e.to_string() })?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
                endpoint: self.endpoint.clone(),
                status,
                message: e.to_string(),
            });
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api { status, body }),
            Err(_) => Err(ClientError::Decode {
                endpoint: self.endpoint.clone(),
                status,
                message: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
            }),
        }
    }

    /// Store `json` (JSON text, sent verbatim) under (dataset, key).
    pub async fn put_raw(
        &self,
        dataset: &str,
        key: &str,
        json: impl Into<String>,
        pre: &Precondition,
    ) -> Result<PutResponse, ClientError> {
        let mut req =
            self.http.put(self.key_url(dataset, key)).header("content-type", "application/json").body(json.into());
        req = match pre {
            Precondition::None => req,
            Precondition::IfMatch(v) => req.header("if-match", format!("\"{v}\"")),
            Precondition::IfAbsent => req.header("if-none-match", "*"),
        };
        self.send(req).await
    }

    pub async fn put(&self, dataset: &str, key: &str, value: &serde_json::Value) -> Result<PutResponse, ClientError> {
        self.put_raw(dataset, key, value.to_string(), &Precondition::None).await
    }

    pub async fn get(&self, dataset: &str, key: &str, consistency: Option<&str>) -> Result<GetResponse, ClientError> {
        let mut url = self.key_url(dataset, key);
        if let Some(c) = consistency {
            let sep = if url.contains('?') { '&' } else { '?' };
            url.push_str(&format!("{sep}consistency={}", encode_query(c)));
        }
        self.send(self.http.get(url)).await
    }

    pub async fn delete(
        &self,
        dataset: &str,
        key: &str,
        if_match: Option<&str>,
    ) -> Result<DeleteResponse, ClientError> {
        let mut req = self.http.delete(self.key_url(dataset, key));
        if let Some(v) = if_match {
            req = req.header("if-match", format!("\"{v}\""));
        }
        self.send(req).await
    }

    pub async fn list(
        &self,
        dataset: &str,
        prefix: Option<&str>,
        limit: Option<usize>,
        cursor: Option<&str>,
        consistency: Option<&str>,
    ) -> Result<ListResponse, ClientError> {
        let mut params = Vec::new();
        if let Some(p) = prefix {
            params.push(format!("prefix={}", encode_query(p)));
        }
        if let Some(l) = limit {
            params.push(format!("limit={l}"));
        }
        if let Some(c) = cursor {
            params.push(format!("cursor={}", encode_query(c)));
        }
        if let Some(c) = consistency {
            params.push(format!("consistency={}", encode_query(c)));
        }
        if let Some(h) = &self.home {
            params.push(format!("home={}", encode_query(h)));
        }
        let mut url = format!("{}/v1/datasets/{}/keys", self.endpoint, encode_segment(dataset));
        if !params.is_empty() {
            url.push('?');
            url.push_str(&params.join("&"));
        }
        self.send(self.http.get(url)).await
    }

    pub async fn cluster(&self) -> Result<ClusterResponse, ClientError> {
        self.send(self.http.get(format!("{}/v1/cluster", self.endpoint))).await
    }

    /// The node's health. A 503 (no leader) still carries a health body, returned as Ok.
    pub async fn health(&self) -> Result<HealthResponse, ClientError> {
        let resp = self
            .http
            .get(format!("{}/v1/health", self.endpoint))
            .send()
            .await
            .map_err(|e| ClientError::Transport { endpoint: self.endpoint.clone(), message: e.to_string() })?;
        let status = resp.status().as_u16();
        resp.json().await.map_err(|e| ClientError::Decode {
            endpoint: self.endpoint.clone(),
            status,
            message: e.to_string(),
        })
    }

    /// `POST /v1/datasets/{dataset}/keys/{key}/{op}`: an operation on a counter, set or map.
    pub async fn op(
        &self,
        dataset: &str,
        key: &str,
        op: &str,
        body: &meridian_api::OpRequest,
    ) -> Result<PutResponse, ClientError> {
        let url = self.key_url(dataset, key);
        let (path, query) = url.split_once('?').map_or((url.as_str(), None), |(p, q)| (p, Some(q)));
        let mut url = format!("{path}/{}", encode_segment(op));
        if let Some(q) = query {
            url.push('?');
            url.push_str(q);
        }
        self.send(self.http.post(url).json(body)).await
    }

    /// `GET /v1/conflicts`: the conflict records of the region of the node asked, newest first.
    pub async fn conflicts(
        &self,
        dataset: Option<&str>,
        key: Option<&str>,
        state: Option<&str>,
        before: Option<u64>,
        limit: Option<usize>,
    ) -> Result<meridian_api::ConflictList, ClientError> {
        let mut params = Vec::new();
        for (name, v) in [("dataset", dataset), ("key", key), ("state", state)] {
            if let Some(v) = v {
                params.push(format!("{name}={}", encode_query(v)));
            }
        }
        if let Some(b) = before {
            params.push(format!("before={b}"));
        }
        if let Some(l) = limit {
            params.push(format!("limit={l}"));
        }
        let mut path = "/v1/conflicts".to_owned();
        if !params.is_empty() {
            path.push('?');
            path.push_str(&params.join("&"));
        }
        self.send(self.http.get(self.url(&path))).await
    }

    /// `GET /v1/conflicts/{id}`.
    pub async fn conflict(&self, id: u64) -> Result<meridian_api::ConflictInfo, ClientError> {
        self.send(self.http.get(self.url(&format!("/v1/conflicts/{id}")))).await
    }

    /// `POST /v1/conflicts/{id}/resolve`.
    pub async fn resolve(
        &self,
        id: u64,
        req: &meridian_api::ResolveRequest,
    ) -> Result<meridian_api::ResolveResponse, ClientError> {
        self.send(self.http.post(self.url(&format!("/v1/conflicts/{id}/resolve"))).json(req)).await
    }

    /// `GET /v1/policy`: the active policy entry and each region's copy of it.
    pub async fn policy_status(&self) -> Result<PolicyStatus, ClientError> {
        self.send(self.http.get(self.url("/v1/policy"))).await
    }

    /// `POST /v1/policy`: validate a policy document and activate it (enforced or shadow, for a
    /// share of keys). A document that breaks rules fails with `policy_invalid`, its `problems`
    /// listing each one.
    pub async fn policy_apply(&self, req: &PolicyApplyRequest) -> Result<PolicyApplyResponse, ClientError> {
        self.send(self.http.post(self.url("/v1/policy")).json(req)).await
    }

    /// `GET /v1/replication`: every region's links and how far behind they are.
    pub async fn replication_status(&self) -> Result<meridian_api::ReplicationStatus, ClientError> {
        self.send(self.http.get(self.url("/v1/replication"))).await
    }

    /// `GET /v1/replication/verify`: every pair of regions' copies compared by digest.
    pub async fn replication_verify(&self, dataset: Option<&str>) -> Result<meridian_api::VerifyReport, ClientError> {
        let path = match dataset {
            Some(d) => format!("/v1/replication/verify?dataset={}", encode_query(d)),
            None => "/v1/replication/verify".to_owned(),
        };
        self.send(self.http.get(self.url(&path))).await
    }

    /// `GET /v1/admin/chaos`: the fault-injection table of the node asked.
    /// Every region's failover promotions and the newest `events` entries of its history.
    pub async fn failover_status(&self, events: Option<usize>) -> Result<meridian_api::FailoverStatus, ClientError> {
        let path = match events {
            Some(n) => format!("/v1/failover?events={n}"),
            None => "/v1/failover".to_owned(),
        };
        self.send(self.http.get(self.url(&path))).await
    }

    pub async fn failover_promote(
        &self,
        req: &meridian_api::PromoteRequest,
    ) -> Result<meridian_api::PromotionResponse, ClientError> {
        self.send(self.http.post(self.url("/v1/failover/promote")).json(req)).await
    }

    pub async fn failover_end(
        &self,
        req: &meridian_api::EndPromotionRequest,
    ) -> Result<meridian_api::PromotionResponse, ClientError> {
        self.send(self.http.post(self.url("/v1/failover/end")).json(req)).await
    }

    pub async fn chaos_status(&self) -> Result<meridian_api::ChaosStatus, ClientError> {
        self.send(self.http.get(self.url("/v1/admin/chaos"))).await
    }

    /// `POST /v1/admin/chaos/partition`: cut every message between two regions, cluster-wide.
    pub async fn chaos_partition(&self, a: &str, b: &str) -> Result<meridian_api::ChaosStatus, ClientError> {
        let body = meridian_api::RegionPair { regions: Some([a.to_owned(), b.to_owned()]) };
        self.send(self.http.post(self.url("/v1/admin/chaos/partition")).json(&body)).await
    }

    /// `POST /v1/admin/chaos/heal`: clear one pair's faults, or every fault with `None`.
    pub async fn chaos_heal(&self, pair: Option<(&str, &str)>) -> Result<meridian_api::ChaosStatus, ClientError> {
        let body = meridian_api::RegionPair { regions: pair.map(|(a, b)| [a.to_owned(), b.to_owned()]) };
        self.send(self.http.post(self.url("/v1/admin/chaos/heal")).json(&body)).await
    }

    /// `POST /v1/admin/chaos/delay`: set one pair's delay, jitter and loss (replacing its faults).
    pub async fn chaos_delay(
        &self,
        fault: &meridian_api::LinkFaultBody,
    ) -> Result<meridian_api::ChaosStatus, ClientError> {
        self.send(self.http.post(self.url("/v1/admin/chaos/delay")).json(fault)).await
    }

    /// `POST /v1/policy/plan`: what applying a document would change. Changes nothing.
    pub async fn policy_plan(&self, doc: &PolicyDocumentBody) -> Result<PolicyPlan, ClientError> {
        self.send(self.http.post(self.url("/v1/policy/plan")).json(doc)).await
    }

    /// `GET /v1/policy/versions`: the policy history, newest first.
    pub async fn policy_history(&self) -> Result<PolicyHistory, ClientError> {
        self.send(self.http.get(self.url("/v1/policy/versions"))).await
    }

    /// `GET /v1/policy/versions/{version}`: one stored version as it was written. `version` is a
    /// full id or a unique prefix of at least 8 hex characters.
    pub async fn policy_version(&self, version: &str) -> Result<PolicyVersionBody, ClientError> {
        self.send(self.http.get(self.url(&format!("/v1/policy/versions/{}", encode_segment(version))))).await
    }

    /// `POST /v1/policy/rollback`: activate an earlier version again, as a new history entry.
    pub async fn policy_rollback(&self, version: &str) -> Result<PolicyApplyResponse, ClientError> {
        let req = PolicyRollbackRequest { version: version.to_owned() };
        self.send(self.http.post(self.url("/v1/policy/rollback")).json(&req)).await
    }

    /// `GET /v1/policy/explain`: where a key's copies live under the active policy, and why.
    /// `home` names the key's home for user-homed datasets whose keys carry no `region/` prefix.
    pub async fn policy_explain(
        &self,
        dataset: &str,
        key: &str,
        home: Option<&str>,
    ) -> Result<Explanation, ClientError> {
        self.send(self.http.get(self.url(&explain_path(dataset, key, home)))).await
    }

    /// `GET /v1/policy/schema`: the JSON Schema of a policy document.
    pub async fn policy_schema(&self) -> Result<serde_json::Value, ClientError> {
        self.send(self.http.get(self.url("/v1/policy/schema"))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_covers_another_when_each_of_its_slots_is_as_far() {
        let (a, b) = ("ms1.eu-west=3,us-east=9.ff", "ms1.us-east=7.00");
        assert!(covers(a, b) && !covers(b, a));
        assert!(covers(a, "ms1..00"), "every token covers the empty session");
        assert!(!covers("ms1.eu-west=3.ff", "ms1.us-east=1.ff"), "neither covers the other");
        assert!(!covers("garbage", b) && !covers(a, "garbage"));
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("eu-west/u:1 ü"), "eu-west%2Fu%3A1%20%C3%BC");
        assert_eq!(encode_segment("plain_key.1~"), "plain_key.1~");
    }

    #[test]
    fn explain_queries_are_encoded() {
        assert_eq!(explain_path("users", "eu-west/u 1", None), "/v1/policy/explain?dataset=users&key=eu-west%2Fu%201");
        assert_eq!(
            explain_path("users", "a&b=c", Some("us-east")),
            "/v1/policy/explain?dataset=users&key=a%26b%3Dc&home=us-east"
        );
    }
}
