//! A typed client for Meridian's public HTTP API, used by the CLI and the tests.
//!
//! Errors keep the server's stable code, so callers branch on [`ErrorCode`], never on text.

use std::time::Duration;

use meridian_api::{
    ClusterResponse, DeleteResponse, ErrorBody, ErrorCode, GetResponse, HealthResponse, ListResponse, PutResponse,
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
        Client { endpoint: endpoint.trim_end_matches('/').to_owned(), http }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn key_url(&self, dataset: &str, key: &str) -> String {
        format!("{}/v1/datasets/{}/keys/{}", self.endpoint, encode_segment(dataset), encode_segment(key))
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Transport { endpoint: self.endpoint.clone(), message: e.to_string() })?;
        let status = resp.status().as_u16();
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
            url.push_str(&format!("?consistency={}", encode_query(c)));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("eu-west/u:1 ü"), "eu-west%2Fu%3A1%20%C3%BC");
        assert_eq!(encode_segment("plain_key.1~"), "plain_key.1~");
    }
}
