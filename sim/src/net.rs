//! The simulated network: the node's [`Wire`] seam and the clients' calls over turmoil's TCP,
//! one request per connection (simulated TCP never retransmits; the node's transport puts a
//! deadline on every call), and message loss and duplication drawn from the run's seed.
//!
//! Partitions, one-way cuts and latency come from turmoil itself; loss and duplication are
//! applied here because turmoil's TCP is reliable. Every cross-region message passes the
//! residency check here, at the send (see `invariants/residency.rs`).

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use meridian_core::crdt::CrdtOp;
use meridian_core::{NodeSpec, Version};
use meridian_node::peer::{PeerRequest, PeerRequestV1};
use meridian_node::transport::{decompress_body, Wire, WireReply};
use meridian_raft::network::RpcFailure;
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::world::World;

/// Every node listens here.
pub const PORT: u16 = 7000;
/// The host the clients run on.
pub const CLIENT_HOST: &str = "client";
/// Largest frame either side accepts.
pub const FRAME_BYTES_MAX: u32 = 64 << 20;

/// A client's call, answered by the node it reaches as Meridian's HTTP API would: the node is
/// the gateway, and routes the call to the key's home region.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Write a JSON value (as text).
    Put { dataset: String, key: String, value: String },
    /// An operation on a counter, set or map key (a multi-primary dataset's is applied in the
    /// gateway's own region when it is a home).
    Op { dataset: String, key: String, op: CrdtOp },
    /// A strong read (linearizable, served by the key's home region's leader), or with
    /// `local` a read of the nearest copy the policy allows.
    Get { dataset: String, key: String, local: bool },
    /// Make a policy (TOML) the active one.
    ApplyPolicy { text: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ClientReply {
    /// Applied; the version it was given.
    Written {
        version: Version,
    },
    Value(Option<String>),
    Applied {
        epoch: u64,
    },
    /// Refused, and nothing was applied; the text says why.
    Refused(String),
    /// Refused because serving it there would bring restricted bytes into a region its
    /// policy keeps them out of.
    ResidencyRefused(String),
    /// Maybe applied, maybe not.
    Unknown(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// A peer message body as the node's transport encoded it.
    Peer {
        body: Vec<u8>,
        compressed: bool,
    },
    Client(ClientRequest),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Peer { status: u16, body: Vec<u8>, compressed: bool },
    Client(ClientReply),
}

/// Loss and duplication of peer messages, drawn from the run's seed.
#[derive(Debug)]
pub struct MessageFaults {
    pub rng: StdRng,
    /// Chance that a request is lost before delivery.
    pub loss: f64,
    /// Chance that a request is delivered, its reply lost.
    pub reply_loss: f64,
    /// Chance that a request is delivered twice (only requests the protocol declares safe to
    /// repeat; see [`repeatable`]).
    pub duplicate: f64,
    pub lost: u64,
    pub replies_lost: u64,
    pub duplicated: u64,
}

impl MessageFaults {
    pub fn new(rng: StdRng) -> Self {
        MessageFaults { rng, loss: 0.0, reply_loss: 0.0, duplicate: 0.0, lost: 0, replies_lost: 0, duplicated: 0 }
    }

    pub fn clear(&mut self) {
        self.loss = 0.0;
        self.reply_loss = 0.0;
        self.duplicate = 0.0;
    }
}

pub fn host_name(id: u64) -> String {
    format!("n{id}")
}

async fn write_frame<W: AsyncWriteExt + Unpin, T: Serialize>(w: &mut W, msg: &T) -> std::io::Result<()> {
    let body = postcard::to_stdvec(msg).map_err(std::io::Error::other)?;
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await
}

async fn read_frame<R: AsyncReadExt + Unpin, T: for<'de> Deserialize<'de>>(r: &mut R) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len);
    if len > FRAME_BYTES_MAX {
        return Err(std::io::Error::other(format!("a frame of {len} bytes exceeds {FRAME_BYTES_MAX}")));
    }
    let mut body = vec![0; len as usize];
    r.read_exact(&mut body).await?;
    postcard::from_bytes(&body).map_err(std::io::Error::other)
}

/// One call: connect, send, await the reply. A connection never made is `Unreachable` (the
/// request was not delivered); anything after that is `Interrupted`.
pub async fn exchange(target: u64, req: &Request) -> Result<Reply, RpcFailure> {
    let mut s = turmoil::net::TcpStream::connect((host_name(target), PORT))
        .await
        .map_err(|e| RpcFailure::Unreachable(format!("connect to node {target}: {e}")))?;
    write_frame(&mut s, req).await.map_err(|e| RpcFailure::Interrupted(format!("send to node {target}: {e}")))?;
    read_frame(&mut s).await.map_err(|e| RpcFailure::Interrupted(format!("reply from node {target}: {e}")))
}

/// A client call with a deadline.
pub async fn call(target: u64, req: &Request, timeout: std::time::Duration) -> Result<Reply, RpcFailure> {
    match tokio::time::timeout(timeout, exchange(target, req)).await {
        Ok(r) => r,
        Err(_) => Err(RpcFailure::Timeout(timeout)),
    }
}

/// Requests a network may deliver twice without the protocol promising anything false:
/// Raft's messages, links' batches and repairs (sequenced or newer-only merges), and reads.
/// A client write forwarded to a leader is not: HTTP over TCP never repeats one, and the
/// gateway never retries one whose outcome it does not know.
pub fn repeatable(req: &PeerRequestV1) -> bool {
    !matches!(req, PeerRequestV1::Write(_) | PeerRequestV1::WriteAtomic(_) | PeerRequestV1::SetFaults(_))
}

/// The node's wire in the simulation: loss, reply loss and duplication from the seed, and the
/// residency check on every cross-region message.
pub struct SimWire {
    pub node: NodeSpec,
    pub world: Arc<World>,
    pub faults: Arc<Mutex<MessageFaults>>,
}

enum Fate {
    Deliver,
    Lose,
    LoseReply,
    Duplicate,
}

impl SimWire {
    fn fate(&self, repeatable: bool) -> Fate {
        let mut f = self.faults.lock().expect("faults lock");
        let (loss, reply_loss, dup) = (f.loss, f.reply_loss, f.duplicate);
        let roll: f64 = f.rng.random();
        if roll < loss {
            f.lost += 1;
            Fate::Lose
        } else if roll < loss + reply_loss {
            f.replies_lost += 1;
            Fate::LoseReply
        } else if roll < loss + reply_loss + dup && repeatable {
            f.duplicated += 1;
            Fate::Duplicate
        } else {
            Fate::Deliver
        }
    }
}

/// The bytes a body carries (decompressed), for inspection.
fn plain(body: &[u8], compressed: bool) -> Result<Vec<u8>, RpcFailure> {
    if compressed {
        decompress_body(body, FRAME_BYTES_MAX as usize).map_err(RpcFailure::Protocol)
    } else {
        Ok(body.to_vec())
    }
}

impl Wire for SimWire {
    fn exchange<'a>(
        &'a self,
        target: &'a NodeSpec,
        body: Vec<u8>,
        compressed: bool,
    ) -> BoxFuture<'a, Result<WireReply, RpcFailure>> {
        Box::pin(async move {
            let raw = plain(&body, compressed)?;
            let PeerRequest::V1(decoded) =
                postcard::from_bytes::<PeerRequest>(&raw).map_err(|e| RpcFailure::Protocol(e.to_string()))?;
            let crossing = target.region != self.node.region;
            if crossing {
                self.world.inspect_crossing(&self.node, target, "request", &raw, Some(&decoded));
                self.world.observe_changes(&decoded);
            }
            let req = Request::Peer { body, compressed };
            let result = match self.fate(repeatable(&decoded)) {
                Fate::Deliver => exchange(target.id, &req).await,
                Fate::Lose => std::future::pending().await,
                Fate::LoseReply => {
                    let _ = exchange(target.id, &req).await;
                    std::future::pending().await
                }
                Fate::Duplicate => {
                    let first = exchange(target.id, &req).await;
                    // The copy arrives after the original was answered: late and repeated.
                    let _ = exchange(target.id, &req).await;
                    first
                }
            };
            match result? {
                Reply::Peer { status, body, compressed } => {
                    if crossing {
                        let raw = plain(&body, compressed)?;
                        self.world.inspect_crossing(target, &self.node, "reply", &raw, None);
                    }
                    Ok(WireReply { status, body: body.into(), compressed })
                }
                Reply::Client(_) => Err(RpcFailure::Protocol("a client reply to a peer request".into())),
            }
        })
    }
}

/// Serve one connection: read a request, answer it with `handle`.
pub async fn serve_connection<F, Fut>(mut s: turmoil::net::TcpStream, handle: F)
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Reply>,
{
    let Ok(req) = read_frame::<_, Request>(&mut s).await else { return };
    let reply = handle(req).await;
    let _ = write_frame(&mut s, &reply).await;
}
