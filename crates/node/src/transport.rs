//! The peer transport: how one node calls another. Postcard bodies, a deadline on every
//! call, zstd for large cross-region bodies, the simulated WAN delay between regions, fault
//! injection, the wire capture and the cross-region byte counters, all here, over a [`Wire`]
//! that only moves bytes.
//!
//! Production's wire is HTTP/1.1 with one connection pool per node ([`HttpWire`]); the
//! simulator plugs in its own, so it runs this file (and everything above it) unchanged.
//! [`serve_peer_body`] is the receiving half every wire shares.
//!
//! The WAN delay is applied here, in the sender, once on the way out and once on the way
//! back, so a cross-region call costs one simulated round trip. Calls inside a region are
//! never delayed. Fault injection (`chaos.rs`: cuts, loss, extra delay and jitter per region
//! pair) is applied here too, because this is the one place every byte between nodes passes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use meridian_core::{NodeId, NodeSpec, RegionId, Topology};
use meridian_raft::network::{PeerRpc, RaftReply, RaftRequest, RpcFailure};

use crate::chaos::{Fate, FaultTable};
use crate::error::{peer_error, NodeError};
use crate::limits::{LEADER_ATTEMPTS_MAX, LEADER_BACKOFF_MAX, REQUEST_TIMEOUT};
use crate::metrics::Metrics;
use crate::peer::{PeerError, PeerRequest, PeerRequestV1, PeerResponse, PeerResponseV1};

/// Cross-region message bodies at least this long are compressed (zstd, level 1: see
/// docs/design.md#compression-zstd-level-1 for the measurements behind the choice). Calls inside a region never are.
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

/// What a wire brings back from one exchange.
#[derive(Debug, Clone)]
pub struct WireReply {
    /// The HTTP status code of the answer (a wire without HTTP uses the same codes: 200, or
    /// 400/413/500 with a text body).
    pub status: u16,
    pub body: bytes::Bytes,
    /// The body is a zstd frame ([`decompress_body`]).
    pub compressed: bool,
}

/// The seam under the peer transport: deliver one encoded request body to a node and bring
/// back its answer. It adds no deadline, fault or delay of its own (the transport does), and
/// must report a connection that was never made as [`RpcFailure::Unreachable`] (the caller
/// may then retry a write), anything later as [`RpcFailure::Interrupted`].
pub trait Wire: Send + Sync + 'static {
    /// `compressed`: the body is a zstd frame, and the answer may be one too.
    fn exchange<'a>(
        &'a self,
        target: &'a NodeSpec,
        body: Vec<u8>,
        compressed: bool,
    ) -> BoxFuture<'a, Result<WireReply, RpcFailure>>;
}

/// Production's wire: HTTP/1.1 to the target's peer address, with a connection pool.
#[cfg(feature = "http")]
pub struct HttpWire {
    client: reqwest::Client,
}

#[cfg(feature = "http")]
impl HttpWire {
    pub fn new() -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .no_proxy()
            .build()
            .expect("build HTTP client");
        HttpWire { client }
    }
}

#[cfg(feature = "http")]
impl Default for HttpWire {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "http")]
impl Wire for HttpWire {
    fn exchange<'a>(
        &'a self,
        target: &'a NodeSpec,
        body: Vec<u8>,
        compressed: bool,
    ) -> BoxFuture<'a, Result<WireReply, RpcFailure>> {
        Box::pin(async move {
            let url = format!("http://{}{}", target.peer_addr, crate::peer::PEER_PATH);
            let mut request = self.client.post(url).header("content-type", "application/x-meridian-peer");
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
            let status = resp.status().as_u16();
            let compressed = resp.headers().get("content-encoding").is_some_and(|v| v.as_bytes() == ZSTD.as_bytes());
            let body = resp.bytes().await.map_err(|e| RpcFailure::Interrupted(e.to_string()))?;
            Ok(WireReply { status, body, compressed })
        })
    }
}

/// Answer one peer request body as it came off a wire: decompress, decode, let the node
/// handle it, encode the answer (compressed if the caller accepts it and it is large). Bad
/// bodies get a 4xx answer with a text that says why; nothing is applied.
pub async fn serve_peer_body(node: &crate::Node, body: &[u8], compressed: bool, accept_compressed: bool) -> WireReply {
    let text = |status: u16, msg: String| WireReply { status, body: bytes::Bytes::from(msg), compressed: false };
    let raw;
    let body = if compressed {
        match decompress_body(body, crate::peer::PEER_BODY_BYTES_MAX) {
            Ok(r) => {
                raw = r;
                &raw[..]
            }
            Err(e) => return text(400, e),
        }
    } else {
        body
    };
    let req: PeerRequest = match postcard::from_bytes(body) {
        Ok(r) => r,
        Err(e) => return text(400, format!("undecodable peer message (protocol version skew?): {e}")),
    };
    let reply = node.handle_peer(req).await;
    match postcard::to_stdvec(&reply) {
        Ok(b) if accept_compressed && b.len() >= COMPRESS_MIN_BYTES => match compress_body(&b) {
            Ok(c) => WireReply { status: 200, body: c.into(), compressed: true },
            Err(_) => WireReply { status: 200, body: b.into(), compressed: false },
        },
        Ok(b) => WireReply { status: 200, body: b.into(), compressed: false },
        Err(e) => text(500, format!("encode peer reply: {e}")),
    }
}

/// The pause before attempt `attempt + 1` to reach a leader: doubling from 50 ms, at most
/// [`LEADER_BACKOFF_MAX`].
pub(crate) fn leader_backoff(attempt: u32) -> Duration {
    Duration::from_millis((25u64 << attempt.min(4)).min(LEADER_BACKOFF_MAX.as_millis() as u64))
}

#[derive(Clone)]
pub struct PeerTransport {
    inner: Arc<Inner>,
}

struct Inner {
    wire: Arc<dyn Wire>,
    topology: Arc<Topology>,
    region: RegionId,
    metrics: Arc<Metrics>,
    faults: Arc<FaultTable>,
    capture: Option<WireCapture>,
    /// Where [`PeerTransport::call_any`] starts in a region's nodes, turning each call.
    rotation: std::sync::atomic::AtomicUsize,
}

/// Why no node of a region answered [`PeerTransport::call_any`] with a value.
#[derive(Debug, Clone)]
pub enum AnyFailure {
    /// The node answered with a refusal.
    Refused(PeerError),
    /// No answer: not reachable, timed out, or an answer the caller cannot read.
    Unreachable(String),
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

impl PeerTransport {
    pub fn new(
        wire: Arc<dyn Wire>,
        topology: Arc<Topology>,
        region: RegionId,
        metrics: Arc<Metrics>,
        capture: Option<WireCapture>,
    ) -> Self {
        let faults = Arc::new(FaultTable::default());
        let rotation = std::sync::atomic::AtomicUsize::new(0);
        PeerTransport { inner: Arc::new(Inner { wire, topology, region, metrics, faults, capture, rotation }) }
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
        self.inner.faults.fate(&self.inner.region, to, configured, meridian_raft::rt::random_f64())
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

    /// Send a request to the leader of `region`: any of its nodes first, then the leader it
    /// names, with the attempt and deadline bounds of a client request. A request that may have
    /// been applied is retried only if `idempotent`; otherwise a failure after sending is an
    /// unknown outcome. Returns the answer and the node that gave it.
    pub async fn call_region<T>(
        &self,
        region: &RegionId,
        request: impl Fn() -> PeerRequestV1,
        unpack: impl Fn(PeerResponseV1) -> Option<Result<T, PeerError>>,
        idempotent: bool,
    ) -> Result<(T, NodeId), NodeError> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        self.call_region_until(region, deadline, request, unpack, idempotent).await
    }

    /// [`PeerTransport::call_region`], giving up at `deadline` (a gateway trying several
    /// regions in turn gives each a share of the request's time).
    pub async fn call_region_until<T>(
        &self,
        region: &RegionId,
        deadline: tokio::time::Instant,
        request: impl Fn() -> PeerRequestV1,
        unpack: impl Fn(PeerResponseV1) -> Option<Result<T, PeerError>>,
        idempotent: bool,
    ) -> Result<(T, NodeId), NodeError> {
        let nodes: Vec<NodeId> = self.inner.topology.region_nodes(region).iter().map(|n| n.id).collect();
        if nodes.is_empty() {
            return Err(NodeError::Internal(format!("region {region} has no nodes")));
        }
        let mut next = 0usize;
        let mut hint: Option<NodeId> = None;
        let mut last_error = String::from("no answer");
        for attempt in 1..=LEADER_ATTEMPTS_MAX {
            let target = hint.take().filter(|h| nodes.contains(h)).unwrap_or_else(|| {
                next += 1;
                nodes[(next - 1) % nodes.len()]
            });
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                break;
            }
            match self.call(target, request(), remaining).await {
                Ok(reply) => match unpack(reply) {
                    Some(Ok(v)) => return Ok((v, target)),
                    Some(Err(PeerError::NotLeader { leader })) => {
                        last_error = format!("node {target} is not the leader");
                        if leader.is_some() && leader != Some(target) {
                            hint = leader;
                            continue;
                        }
                    }
                    Some(Err(e)) => return Err(peer_error(target, e)),
                    None => return Err(NodeError::Internal(format!("node {target} sent an unexpected reply"))),
                },
                Err(RpcFailure::Unreachable(e)) => last_error = format!("node {target}: {e}"),
                Err(e) if idempotent => last_error = format!("node {target}: {e}"),
                Err(e) => return Err(NodeError::OutcomeUnknown(e.to_string())),
            }
            tokio::time::sleep(leader_backoff(attempt)).await;
        }
        Err(NodeError::Unavailable { node: nodes[0], reason: format!("region {region}: {last_error}") })
    }

    /// Send a request that any node of `region` may answer from its own state (a read of its
    /// copy): each node once, starting at a different one each call, until one answers with a
    /// value, by `deadline`. A node that refuses (its copy is too stale, say) passes the
    /// request to the next; the last refusal or failure is the error, with the node it came
    /// from.
    pub async fn call_any<T>(
        &self,
        region: &RegionId,
        deadline: tokio::time::Instant,
        request: impl Fn() -> PeerRequestV1,
        unpack: impl Fn(PeerResponseV1) -> Option<Result<T, PeerError>>,
    ) -> Result<(T, NodeId), (NodeId, AnyFailure)> {
        let nodes: Vec<NodeId> = self.inner.topology.region_nodes(region).iter().map(|n| n.id).collect();
        let start = self.inner.rotation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut last = (0, AnyFailure::Unreachable(format!("region {region} has no nodes")));
        for i in 0..nodes.len() {
            let target = nodes[(start + i) % nodes.len()];
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                last = (target, AnyFailure::Unreachable(format!("no time left to ask node {target}")));
                break;
            }
            last = match self.call(target, request(), remaining).await {
                Ok(reply) => match unpack(reply) {
                    Some(Ok(v)) => return Ok((v, target)),
                    Some(Err(e)) => (target, AnyFailure::Refused(e)),
                    None => (target, AnyFailure::Unreachable(format!("node {target} sent an unexpected reply"))),
                },
                Err(e) => (target, AnyFailure::Unreachable(format!("node {target}: {e}"))),
            };
        }
        Err(last)
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
        let reply = inner.wire.exchange(spec, body, compressed).await?;
        let status = reply.status;
        let bytes = if reply.compressed && (200..300).contains(&status) {
            let raw = decompress_body(&reply.body, crate::peer::PEER_BODY_BYTES_MAX).map_err(RpcFailure::Protocol)?;
            if crossing {
                self.count_crossing(&spec.region, "received", kind, raw.len(), reply.body.len());
            }
            bytes::Bytes::from(raw)
        } else {
            if crossing {
                self.count_crossing(&spec.region, "received", kind, reply.body.len(), reply.body.len());
            }
            reply.body
        };
        if crossing {
            if let Some(c) = &inner.capture {
                c.record(&spec.region, &inner.region, "reply", &bytes);
            }
        }
        if !(200..300).contains(&status) {
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

impl PeerTransport {
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
        PeerRequestV1::Digest { .. }
        | PeerRequestV1::DigestEntries { .. }
        | PeerRequestV1::FetchObjects { .. }
        | PeerRequestV1::CollectTombstones { .. } => "anti_entropy",
        PeerRequestV1::Raft(_) => "raft",
        _ => "other",
    }
}

impl PeerRpc for PeerTransport {
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
