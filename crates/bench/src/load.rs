//! The closed-loop load generator: N concurrent clients, each issuing one
//! write at a time against a [`Target`], recording latencies of the writes
//! started inside the measurement window into an HDR histogram (µs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hdrhistogram::Histogram;
use reqwest::header::CONTENT_TYPE;
use reqwest::Client;

use crate::base64;

/// Largest latency the histograms track, in microseconds (60 s); larger
/// samples are clamped. Requests time out well before this.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// Where writes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `PUT {base}/v1/datasets/bench/keys/{key}` with a JSON string body.
    Meridian {
        /// `http://host:port` of the node receiving the writes.
        base: String,
    },
    /// `POST {base}/v3/kv/put` with base64 key and value.
    Etcd {
        /// `http://host:port` of the member receiving the writes.
        base: String,
    },
}

impl Target {
    /// The base URL the writes are sent to.
    pub fn base(&self) -> &str {
        match self {
            Target::Meridian { base } | Target::Etcd { base } => base,
        }
    }
}

/// A client's fixed write payload, precomputed once per client.
#[derive(Debug, Clone)]
pub struct Payload {
    /// Meridian body: the value as a JSON string (`value_bytes + 2` bytes).
    meridian_body: String,
    /// The value, base64-encoded for etcd.
    etcd_value_b64: String,
}

impl Payload {
    /// Builds a payload of `value_bytes` alphanumeric characters derived from `seed`.
    pub fn new(value_bytes: usize, seed: u64) -> Self {
        let value = pseudo_random_alnum(value_bytes, seed);
        Self { meridian_body: format!("\"{value}\""), etcd_value_b64: base64::encode(value.as_bytes()) }
    }
}

/// `len` characters from `[0-9A-Za-z]`, deterministic in `seed` (xorshift64*).
/// Only printable, JSON-safe characters, so the value needs no escaping.
pub fn pseudo_random_alnum(len: usize, seed: u64) -> String {
    const CHARS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
            CHARS[(r >> 58) as usize % CHARS.len()] as char
        })
        .collect()
}

/// The key a client uses for its `seq`-th write: distinct per client and write.
pub fn key_for(client: usize, seq: u64) -> String {
    format!("c{client:03}-{seq:010}")
}

/// The etcd `/v3/kv/put` JSON body for `key` and a pre-encoded value.
pub fn etcd_put_body(key: &str, value_b64: &str) -> String {
    format!("{{\"key\":\"{}\",\"value\":\"{}\"}}", base64::encode(key.as_bytes()), value_b64)
}

/// Builds the HTTP client shared by all load clients: HTTP/1.1 keep-alive,
/// a pool of `pool` idle connections, no proxy, and `timeout` per request.
pub fn http_client(pool: usize, timeout: Duration) -> anyhow::Result<Client> {
    Client::builder()
        .http1_only()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(pool.max(1))
        .pool_idle_timeout(Duration::from_secs(90))
        .connect_timeout(timeout)
        .timeout(timeout)
        .build()
        .context("building HTTP client")
}

/// Sends one write and consumes the response so the connection is reused.
/// `Ok` only for a 2xx status.
pub async fn write_once(http: &Client, target: &Target, key: &str, payload: &Payload) -> anyhow::Result<()> {
    let req = match target {
        Target::Meridian { base } => http
            .put(format!("{base}/v1/datasets/bench/keys/{key}"))
            .header(CONTENT_TYPE, "application/json")
            .body(payload.meridian_body.clone()),
        Target::Etcd { base } => http
            .post(format!("{base}/v3/kv/put"))
            .header(CONTENT_TYPE, "application/json")
            .body(etcd_put_body(key, &payload.etcd_value_b64)),
    };
    let resp = req.send().await.map_err(|e| anyhow!("request failed: {e}"))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| anyhow!("reading response body failed (status {status}): {e}"))?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        bail!("HTTP {status}: {text}");
    }
    Ok(())
}

/// Repeats a single write until one succeeds or `timeout` passes, so the
/// measured load does not start while the cluster is still settling.
pub async fn wait_writable(http: &Client, target: &Target, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let payload = Payload::new(16, 0);
    let mut attempt = 0u64;
    loop {
        let key = format!("probe-{attempt:06}");
        match write_once(http, target, &key, &payload).await {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{} did not accept a write within {timeout:?}", target.base())))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
        attempt += 1;
    }
}

/// Parameters of one load run.
#[derive(Debug, Clone)]
pub struct LoadParams {
    /// Number of concurrent clients.
    pub concurrency: usize,
    /// Time to drive load before recording starts.
    pub warmup: Duration,
    /// Length of the measurement window.
    pub duration: Duration,
    /// Size of each written value in bytes.
    pub value_bytes: usize,
    /// Per-request timeout.
    pub request_timeout: Duration,
}

/// What one load run measured.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Successful writes started in the measurement window.
    pub ops: u64,
    /// Failed writes (non-2xx, timeouts, connection errors) started in the window.
    pub errors: u64,
    /// From the start of the window until the last write started in it completed
    /// (never less than the configured duration).
    pub elapsed: Duration,
    /// Latencies of the successful writes, in microseconds.
    pub hist: Histogram<u64>,
    /// The first error seen in the window, if any.
    pub first_error: Option<String>,
}

impl RunResult {
    /// An empty result.
    pub fn empty() -> Self {
        Self { ops: 0, errors: 0, elapsed: Duration::ZERO, hist: new_histogram(), first_error: None }
    }

    /// Successful writes per second over `elapsed`.
    pub fn ops_per_sec(&self) -> f64 {
        throughput(self.ops, self.elapsed)
    }
}

/// A histogram for latencies in µs, 1 µs ..= [`MAX_LATENCY_US`], 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// `ops / elapsed` in ops per second; 0 for an empty interval.
pub fn throughput(ops: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        ops as f64 / secs
    } else {
        0.0
    }
}

struct ClientOutcome {
    ops: u64,
    errors: u64,
    last_done: Option<Instant>,
    hist: Histogram<u64>,
    first_error: Option<String>,
}

/// Drives `params.concurrency` clients against `target` for warmup + duration.
/// Fails only if no write in the measurement window succeeded.
pub async fn generate(target: &Target, params: &LoadParams) -> anyhow::Result<RunResult> {
    if params.concurrency == 0 {
        bail!("concurrency must be at least 1");
    }
    let http = http_client(params.concurrency, params.request_timeout)?;
    let target = Arc::new(target.clone());
    let start = Instant::now();
    let measure_start = start + params.warmup;
    let end = measure_start + params.duration;

    // A JoinSet aborts the clients if this future is dropped (e.g. on Ctrl-C).
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..params.concurrency {
        let http = http.clone();
        let target = Arc::clone(&target);
        let payload = Payload::new(params.value_bytes, id as u64 + 1);
        tasks.spawn(async move {
            let mut out =
                ClientOutcome { ops: 0, errors: 0, last_done: None, hist: new_histogram(), first_error: None };
            let mut seq = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let key = key_for(id, seq);
                seq += 1;
                let res = write_once(&http, &target, &key, &payload).await;
                let t1 = Instant::now();
                if t0 < measure_start {
                    continue;
                }
                out.last_done = Some(t1);
                match res {
                    Ok(()) => {
                        let us = (t1 - t0).as_micros().clamp(1, u128::from(MAX_LATENCY_US)) as u64;
                        out.hist.saturating_record(us);
                        out.ops += 1;
                    }
                    Err(e) => {
                        out.errors += 1;
                        if out.first_error.is_none() {
                            out.first_error = Some(format!("{e:#}"));
                        }
                    }
                }
            }
            out
        });
    }

    let mut result = RunResult::empty();
    let mut last_done = measure_start + params.duration;
    while let Some(joined) = tasks.join_next().await {
        let out = joined.context("load client task panicked")?;
        result.ops += out.ops;
        result.errors += out.errors;
        result.hist.add(&out.hist).map_err(|e| anyhow!("merging histograms: {e:?}"))?;
        if result.first_error.is_none() {
            result.first_error = out.first_error;
        }
        if let Some(t) = out.last_done {
            last_done = last_done.max(t);
        }
    }
    result.elapsed = last_done - measure_start;
    if result.ops == 0 {
        bail!(
            "all {} writes to {} in the measurement window failed; first error: {}",
            result.errors,
            target.base(),
            result.first_error.as_deref().unwrap_or("none (no write was issued)")
        );
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_sizes() {
        let p = Payload::new(256, 7);
        assert_eq!(p.meridian_body.len(), 258);
        assert!(p.meridian_body.starts_with('"') && p.meridian_body.ends_with('"'));
        let inner = &p.meridian_body[1..257];
        assert!(inner.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(p.etcd_value_b64, base64::encode(inner.as_bytes()));
        // The body is a valid JSON string of the right length.
        let v: serde_json::Value = serde_json::from_str(&p.meridian_body).unwrap();
        assert_eq!(v.as_str().unwrap().len(), 256);
    }

    #[test]
    fn payload_zero_bytes() {
        let p = Payload::new(0, 1);
        assert_eq!(p.meridian_body, "\"\"");
        assert_eq!(p.etcd_value_b64, "");
    }

    #[test]
    fn values_differ_by_seed_and_are_deterministic() {
        assert_eq!(pseudo_random_alnum(32, 3), pseudo_random_alnum(32, 3));
        assert_ne!(pseudo_random_alnum(32, 3), pseudo_random_alnum(32, 4));
    }

    #[test]
    fn keys_are_distinct_and_url_safe() {
        let a = key_for(1, 5);
        assert_eq!(a, "c001-0000000005");
        assert_ne!(key_for(1, 5), key_for(2, 5));
        assert_ne!(key_for(1, 5), key_for(1, 6));
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    }

    #[test]
    fn etcd_body_shape() {
        let body = etcd_put_body("foo", "YmFy");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["key"], "Zm9v");
        assert_eq!(v["value"], "YmFy");
    }

    #[test]
    fn throughput_maths() {
        assert_eq!(throughput(1000, Duration::from_secs(2)), 500.0);
        assert_eq!(throughput(5, Duration::ZERO), 0.0);
    }
}
