//! The production peer transport: HTTP/1.1 with postcard bodies, one connection pool per
//! node, a deadline on every call, and the simulated WAN delay between regions.
//!
//! The WAN delay is applied here, in the sender, once on the way out and once on the way
//! back, so a cross-region call costs one simulated round trip. Calls inside a region are
//! never delayed. Fault injection (`chaos.rs`: cuts, loss, extra delay and jitter per region
//! pair) is applied here too, because this is the one place every byte between nodes passes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_core::{NodeId, RegionId, Topology};
use meridian_raft::network::{PeerRpc, RaftReply, RaftRequest, RpcFailure};

use crate::chaos::{Fate, FaultTable};
use crate::metrics::Metrics;
use crate::peer::{PeerRequest, PeerRequestV1, PeerResponse, PeerResponseV1, PEER_PATH};

/// Cross-region message bodies at least this long are compressed (zstd, level 1: see
/// ARCHITECTURE.md for the measurements behind the choice). Calls inside a region never are.
pub const COMPRESS_MIN_BYTES: usize = 256;
/// The `content-encoding` of a compressed peer body.
pub const ZSTD: &str = "zstd";
const ZSTD_LEVEL: i32 = 1;

thread_local! {
    /// One compression context per thread, reused: creating one per message costs more than
    /// compressing a small batch.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Compress a peer body (a zstd frame that records its content size).
pub fn compress_body(raw: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
        }
        c.as_mut().expect("made above").compress(raw)
    })
}

/// Decompress a peer body, refusing one that claims (or turns out) to be larger than `max`
/// bytes, so a hostile or corrupt frame cannot make the node allocate without bound.
pub fn decompress_body(compressed: &[u8], max: usize) -> Result<Vec<u8>, String> {
    let size = match zstd::zstd_safe::get_frame_content_size(compressed) {
        Ok(Some(n)) => n,
        Ok(None) => return Err("a compressed peer body without its content size".into()),
        Err(e) => return Err(format!("not a zstd frame: {e:?}")),
    };
    if size > max as u64 {
        return Err(format!("a compressed peer body of {size} bytes exceeds the limit of {max}"));
    }
    let out = zstd::bulk::decompress(compressed, size as usize).map_err(|e| format!("corrupt zstd body: {e}"))?;
    if out.len() as u64 != size {
        return Err("a compressed peer body shorter than its frame says".into());
    }
    Ok(out)
}

#[derive(Clone)]
pub struct HttpTransport {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    topology: Arc<Topology>,
    region: RegionId,
    metrics: Arc<Metrics>,
    faults: Arc<FaultTable>,
    capture: Option<WireCapture>,
}

/// A record of every byte this node sends to or receives from another region, for residency
/// audits (`--wire-capture DIR`). Each message body is appended to `DIR/node-ID.wire` after a
/// header line `#MWIRE src=REGION dst=REGION kind=request|reply len=N`; `dst` is the region
/// the bytes travel to. Bodies are recorded as encoded for the wire. It costs a file write per
/// cross-region message: for drills and audits, not for production traffic.
pub struct WireCapture {
    file: Mutex<std::fs::File>,
    pub path: PathBuf,
}

impl WireCapture {
    pub fn open(dir: &Path, node: NodeId) -> std::io::Result<WireCapture> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("node-{node}.wire"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(WireCapture { file: Mutex::new(file), path })
    }

    fn record(&self, src: &RegionId, dst: &RegionId, kind: &str, bytes: &[u8]) {
        let mut f = self.file.lock().expect("capture lock");
        let header = format!("\n#MWIRE src={src} dst={dst} kind={kind} len={}\n", bytes.len());
        if let Err(e) = f.write_all(header.as_bytes()).and_then(|_| f.write_all(bytes)) {
            tracing::error!(error = %e, "wire capture write failed");
        }
    }
}

impl HttpTransport {
    pub fn new(topology: Arc<Topology>, region: RegionId, metrics: Arc<Metrics>) -> Self {
        Self::with_capture(topology, region, metrics, None)
    }

    pub fn with_capture(
        topology: Arc<Topology>,
        region: RegionId,
        metrics: Arc<Metrics>,
        capture: Option<WireCapture>,
    ) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .no_proxy()
            .build()
            .expect("build HTTP client");
        let faults = Arc::new(FaultTable::default());
        HttpTransport { inner: Arc::new(Inner { client, topology, region, metrics, faults, capture }) }
    }

    /// The fault table this transport obeys.
    pub fn faults(&self) -> &FaultTable {
        &self.inner.faults
    }

    /// The fate of one message to `region`; chaos control messages are exempt.
    fn fate(&self, to: &RegionId, exempt: bool) -> Fate {
        let configured = self.inner.topology.one_way_ms(&self.inner.region, to);
        if exempt {
            return Fate::Deliver { one_way: Duration::from_millis(configured) };
        }
        self.inner.faults.fate(&self.inner.region, to, configured, rand::random::<f64>())
    }

    /// Send one request to `target` and wait for its answer, at most `timeout` in all.
    pub async fn call(
        &self,
        target: NodeId,
        req: PeerRequestV1,
        timeout: Duration,
    ) -> Result<PeerResponseV1, RpcFailure> {
        let result = tokio::time::timeout(timeout, self.call_inner(target, req)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(RpcFailure::Timeout(timeout)),
        };
        if let Err(e) = &result {
            let kind = match e {
                RpcFailure::Unreachable(_) => "unreachable",
                RpcFailure::Timeout(_) => "timeout",
                RpcFailure::Interrupted(_) => "interrupted",
                RpcFailure::Protocol(_) => "protocol",
            };
            self.inner.metrics.peer_rpc_errors(kind);
        }
        result
    }

    async fn call_inner(&self, target: NodeId, req: PeerRequestV1) -> Result<PeerResponseV1, RpcFailure> {
        let inner = &self.inner;
        let spec = inner
            .topology
            .node(target)
            .ok_or_else(|| RpcFailure::Unreachable(format!("node {target} is not in the topology")))?;
        let exempt = matches!(req, PeerRequestV1::SetFaults(_));
        let delay = match self.fate(&spec.region, exempt) {
            Fate::Deliver { one_way } => one_way,
            Fate::Cut => {
                inner.metrics.chaos_dropped.get_or_create(&crate::metrics::KindLabels { kind: "cut".into() }).inc();
                return Err(RpcFailure::Unreachable(format!(
                    "the link {} <-> {} is cut (fault injection)",
                    inner.region, spec.region
                )));
            }
            Fate::Lose => {
                // Lost on the way out: the caller hears nothing until its deadline.
                inner.metrics.chaos_dropped.get_or_create(&crate::metrics::KindLabels { kind: "loss".into() }).inc();
                std::future::pending::<()>().await;
                unreachable!("a pending future never completes");
            }
        };
        let kind = kind_of(&req);
        let body = postcard::to_stdvec(&PeerRequest::V1(req)).map_err(|e| RpcFailure::Protocol(e.to_string()))?;
        let crossing = spec.region != inner.region;
        let mut compressed = false;
        let body = if crossing {
            if let Some(c) = &inner.capture {
                c.record(&inner.region, &spec.region, "request", &body);
            }
            let raw_len = body.len();
            let body = if raw_len >= COMPRESS_MIN_BYTES {
                compressed = true;
                compress_body(&body).map_err(|e| RpcFailure::Protocol(format!("compress a peer body: {e}")))?
            } else {
                body
            };
            self.count_crossing(&spec.region, "sent", kind, raw_len, body.len());
            body
        } else {
            body
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let url = format!("http://{}{}", spec.peer_addr, PEER_PATH);
        let mut request = inner.client.post(url).header("content-type", "application/x-meridian-peer");
        if compressed {
            // The answer may come back compressed too.
            request = request.header("content-encoding", ZSTD).header("accept-encoding", ZSTD);
        }
        let resp = request.body(body).send().await.map_err(|e| {
            if e.is_connect() {
                RpcFailure::Unreachable(e.to_string())
            } else {
                RpcFailure::Interrupted(e.to_string())
            }
        })?;
        let status = resp.status();
        let reply_compressed = resp.headers().get("content-encoding").is_some_and(|v| v.as_bytes() == ZSTD.as_bytes());
        let bytes = resp.bytes().await.map_err(|e| RpcFailure::Interrupted(e.to_string()))?;
        let bytes = if reply_compressed && status.is_success() {
            let raw = decompress_body(&bytes, crate::peer::PEER_BODY_BYTES_MAX).map_err(RpcFailure::Protocol)?;
            if crossing {
                self.count_crossing(&spec.region, "received", kind, raw.len(), bytes.len());
            }
            bytes::Bytes::from(raw)
        } else {
            if crossing {
                self.count_crossing(&spec.region, "received", kind, bytes.len(), bytes.len());
            }
            bytes
        };
        if crossing {
            if let Some(c) = &inner.capture {
                c.record(&spec.region, &inner.region, "reply", &bytes);
            }
        }
        if !status.is_success() {
            return Err(RpcFailure::Protocol(format!(
                "peer {target} answered {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(256)])
            )));
        }
        let PeerResponse::V1(reply) = postcard::from_bytes(&bytes).map_err(|e| RpcFailure::Protocol(e.to_string()))?;
        // The reply crosses the same link: it may be lost (the request was applied) or delayed.
        let back = match self.fate(&spec.region, exempt) {
            Fate::Deliver { one_way } => one_way,
            Fate::Cut | Fate::Lose => {
                inner.metrics.chaos_dropped.get_or_create(&crate::metrics::KindLabels { kind: "reply".into() }).inc();
                std::future::pending::<()>().await;
                unreachable!("a pending future never completes");
            }
        };
        if !back.is_zero() {
            tokio::time::sleep(back).await;
        }
        Ok(reply)
    }
}

impl HttpTransport {
    fn count_crossing(&self, peer: &RegionId, direction: &str, kind: &str, raw: usize, wire: usize) {
        let labels = |encoding: &str| crate::metrics::CrossRegionLabels {
            peer_region: peer.to_string(),
            direction: direction.into(),
            kind: kind.into(),
            encoding: encoding.into(),
        };
        self.inner.metrics.cross_region_bytes.get_or_create(&labels("raw")).inc_by(raw as u64);
        self.inner.metrics.cross_region_bytes.get_or_create(&labels("wire")).inc_by(wire as u64);
    }
}

/// The metric label of a request: links' batches and scans apart from everything else.
fn kind_of(req: &PeerRequestV1) -> &'static str {
    match req {
        PeerRequestV1::ShipBatch(_) => "ship",
        PeerRequestV1::Repair(_) => "repair",
        PeerRequestV1::Digest { .. } | PeerRequestV1::DigestEntries { .. } | PeerRequestV1::FetchObjects { .. } => {
            "anti_entropy"
        }
        PeerRequestV1::Raft(_) => "raft",
        _ => "other",
    }
}

impl PeerRpc for HttpTransport {
    async fn raft_rpc(&self, target: u64, req: RaftRequest, timeout: Duration) -> Result<RaftReply, RpcFailure> {
        match self.call(target, PeerRequestV1::Raft(req), timeout).await? {
            PeerResponseV1::Raft(reply) => Ok(reply),
            PeerResponseV1::Refused(e) => Err(RpcFailure::Protocol(e.to_string())),
            _ => Err(RpcFailure::Protocol("reply does not match a raft request".into())),
        }
    }
}

#[cfg(test)]
mod codec_tests {
    use super::*;

    #[test]
    fn bodies_round_trip_and_oversized_or_corrupt_frames_are_refused() {
        let raw: Vec<u8> = (0..10_000u32).flat_map(|i| format!("{{\"sku\":{i}}}").into_bytes()).collect();
        let c = compress_body(&raw).unwrap();
        assert!(c.len() < raw.len() / 3, "{} -> {}", raw.len(), c.len());
        assert_eq!(decompress_body(&c, raw.len()).unwrap(), raw);
        assert!(decompress_body(&c, raw.len() - 1).unwrap_err().contains("exceeds"));
        assert!(decompress_body(b"not zstd at all", 1_000).is_err());
        let mut cut = c.clone();
        cut.truncate(c.len() / 2);
        assert!(decompress_body(&cut, raw.len()).is_err());
    }
}
