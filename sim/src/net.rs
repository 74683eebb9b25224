//! The simulated network: Raft's [`PeerRpc`] seam and the clients' calls over turmoil's TCP,
//! one request per connection, a deadline on every call (simulated TCP never retransmits),
//! and message loss and duplication drawn from the run's seed.
//!
//! Partitions, one-way cuts and latency come from turmoil itself; loss and duplication are
//! applied here because turmoil's TCP is reliable.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_raft::network::{PeerRpc, RaftReply, RaftRequest, RpcFailure};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every node listens here.
pub const PORT: u16 = 7000;
/// The host the clients run on.
pub const CLIENT_HOST: &str = "client";
/// Largest frame either side accepts.
pub const FRAME_BYTES_MAX: u32 = 16 << 20;

/// A client's call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ClientRequest {
    Put {
        key: String,
        value: String,
    },
    /// A linearizable read (the leader confirms its leadership with a quorum first).
    Get {
        key: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ClientReply {
    Written,
    Value(Option<String>),
    /// Not the leader, and nothing was proposed; the hint names the leader if known.
    NotLeader(Option<u64>),
    /// Refused before anything was proposed.
    Refused(String),
    /// Proposed (or maybe proposed), outcome unknown.
    Unknown(String),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Raft(RaftRequest),
    Client(ClientRequest),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Raft(RaftReply),
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
    /// Chance that a request is delivered twice.
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

/// One call: connect, send, await the reply.
async fn exchange(target: u64, req: &Request) -> Result<Reply, RpcFailure> {
    let mut s = turmoil::net::TcpStream::connect((host_name(target), PORT))
        .await
        .map_err(|e| RpcFailure::Unreachable(format!("connect to node {target}: {e}")))?;
    write_frame(&mut s, req).await.map_err(|e| RpcFailure::Interrupted(format!("send to node {target}: {e}")))?;
    read_frame(&mut s).await.map_err(|e| RpcFailure::Interrupted(format!("reply from node {target}: {e}")))
}

/// A call with a deadline.
pub async fn call(target: u64, req: &Request, timeout: Duration) -> Result<Reply, RpcFailure> {
    match tokio::time::timeout(timeout, exchange(target, req)).await {
        Ok(r) => r,
        Err(_) => Err(RpcFailure::Timeout(timeout)),
    }
}

/// Raft's transport in the simulation.
#[derive(Clone)]
pub struct SimRpc {
    pub faults: Arc<Mutex<MessageFaults>>,
}

enum Fate {
    Deliver,
    Lose,
    LoseReply,
    Duplicate,
}

impl SimRpc {
    fn fate(&self) -> Fate {
        let mut f = self.faults.lock().expect("faults lock");
        let (loss, reply_loss, dup) = (f.loss, f.reply_loss, f.duplicate);
        let roll: f64 = f.rng.random();
        if roll < loss {
            f.lost += 1;
            Fate::Lose
        } else if roll < loss + reply_loss {
            f.replies_lost += 1;
            Fate::LoseReply
        } else if roll < loss + reply_loss + dup {
            f.duplicated += 1;
            Fate::Duplicate
        } else {
            Fate::Deliver
        }
    }
}

impl PeerRpc for SimRpc {
    async fn raft_rpc(&self, target: u64, req: RaftRequest, timeout: Duration) -> Result<RaftReply, RpcFailure> {
        let req = Request::Raft(req);
        let result = match self.fate() {
            Fate::Deliver => call(target, &req, timeout).await,
            Fate::Lose => {
                tokio::time::sleep(timeout).await;
                Err(RpcFailure::Timeout(timeout))
            }
            Fate::LoseReply => {
                let _ = call(target, &req, timeout).await;
                Err(RpcFailure::Timeout(timeout))
            }
            Fate::Duplicate => {
                let first = call(target, &req, timeout).await;
                // The copy arrives after the original was answered: a late, repeated message.
                let _ = call(target, &req, timeout).await;
                first
            }
        };
        match result? {
            Reply::Raft(r) => Ok(r),
            Reply::Client(_) => Err(RpcFailure::Protocol("a client reply to a Raft request".into())),
        }
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
