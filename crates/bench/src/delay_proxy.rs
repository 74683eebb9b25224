//! A TCP proxy that holds every byte for a fixed one-way delay in each direction, to put a
//! simulated WAN between two processes that have no delay setting of their own. The lag
//! benchmark puts it between a source etcd cluster and `etcdctl make-mirror`, so that etcd's
//! replication path crosses the same one-way delay as Meridian's (whose delay sits in its own
//! node-to-node transport).
//!
//! Each direction of each connection is a reader and a writer joined by a bounded queue: the
//! reader stamps every chunk with `time read + one_way`, and the writer holds the chunk until
//! then. Chunks leave in the order they arrived, so the byte stream is unchanged; only time
//! moves. A half-close (end of stream) travels the same way, after the same delay.
//!
//! It deliberately models nothing else: no bandwidth limit, loss or jitter. Timers are tokio's,
//! which round a deadline up to the next millisecond, the same timers Meridian's transport uses
//! for its simulated delay.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Largest chunk read at once.
pub const CHUNK_BYTES_MAX: usize = 64 * 1024;
/// Chunks held per direction of a connection; a reader waits when this many are in flight
/// (at most 64 MiB per direction).
pub const CHUNKS_QUEUED_MAX: usize = 1024;
/// Connections relayed at once; further ones are closed at once.
pub const CONNECTIONS_MAX: usize = 256;

/// A running proxy; dropping it closes the listener and every relayed connection.
#[derive(Debug)]
pub struct DelayProxy {
    local: SocketAddr,
    one_way: Duration,
    accept: JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on `listen` and relays each accepted connection to `upstream`, holding every
    /// chunk for `one_way` in each direction.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr, one_way: Duration) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(listen).await.with_context(|| format!("bind the delay proxy on {listen}"))?;
        let local = listener.local_addr().context("read the delay proxy's address")?;
        let accept = tokio::spawn(accept_loop(listener, upstream, one_way));
        Ok(Self { local, one_way, accept })
    }

    /// The address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The delay applied in each direction.
    pub fn one_way(&self) -> Duration {
        self.one_way
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        // The relays live in the accept task's JoinSet, so aborting it aborts them too.
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, one_way: Duration) {
    let mut relays = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) if relays.len() < CONNECTIONS_MAX => {
                    relays.spawn(relay(client, upstream, one_way));
                }
                Ok((client, _)) => drop(client),
                // Out of descriptors or similar: back off briefly instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = relays.join_next(), if !relays.is_empty() => {}
        }
    }
}

/// Relays one connection: both directions run in this task, so aborting it ends both.
async fn relay(client: TcpStream, upstream: SocketAddr, one_way: Duration) {
    // An unreachable upstream closes the client's connection, as a refused connect would.
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    // Small writes must not wait for Nagle: the delay is the only one intended.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(delayed_copy(client_read, server_write, one_way), delayed_copy(server_read, client_write, one_way));
}

/// Copies `from` to `to`, each chunk written `one_way` after it was read, in order; the end of
/// `from` (or a read error) becomes a shutdown of `to`, after the same delay.
pub async fn delayed_copy<R, W>(mut from: R, mut to: W, one_way: Duration)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // `None` marks the end of the stream.
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(CHUNKS_QUEUED_MAX);
    let read = async move {
        let mut buf = vec![0u8; CHUNK_BYTES_MAX];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let due = Instant::now() + one_way;
            let chunk = (n > 0).then(|| buf[..n].to_vec());
            let end = chunk.is_none();
            // A closed queue means the writer gave up (its peer went away).
            if tx.send((due, chunk)).await.is_err() || end {
                return;
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            match chunk {
                Some(bytes) => {
                    if to.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = to.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::loopback;

    /// An upstream that echoes every byte back and closes its side when the client does.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind(loopback(0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    /// Numbered messages of varying sizes, so a reordering, loss or duplication of any chunk
    /// changes the stream.
    fn messages() -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0u32..2000 {
            out.extend_from_slice(&i.to_be_bytes());
            out.extend(std::iter::repeat_n((i % 251) as u8, (i as usize * 37) % 700));
        }
        out
    }

    #[tokio::test]
    async fn preserves_bytes_and_order_both_ways() {
        let upstream = echo_server().await;
        let proxy = DelayProxy::start(loopback(0), upstream, Duration::from_millis(5)).await.unwrap();
        let sent = messages();
        let stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let to_send = sent.clone();
        let writer = tokio::spawn(async move {
            // Many small writes, so the proxy sees many chunks.
            for piece in to_send.chunks(997) {
                w.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            w.shutdown().await.unwrap();
        });
        let mut received = Vec::new();
        // The echo server closes after our half-close has crossed the proxy, so EOF arrives.
        r.read_to_end(&mut received).await.unwrap();
        writer.await.unwrap();
        assert_eq!(received.len(), sent.len());
        assert!(received == sent, "the stream through the proxy differs from the one sent");
    }

    /// In paused time the clock moves only when every task waits, so this checks the schedule
    /// the proxy keeps, not how fast this machine is.
    #[tokio::test(start_paused = true)]
    async fn holds_each_chunk_for_the_delay_in_order() {
        let one_way = Duration::from_millis(50);
        let (mut client, proxy_in) = tokio::io::duplex(4096);
        let (proxy_out, mut server) = tokio::io::duplex(4096);
        tokio::spawn(delayed_copy(proxy_in, proxy_out, one_way));
        let t0 = Instant::now();
        client.write_all(b"first").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(b"second").await.unwrap();
        drop(client);

        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"first");
        assert!(t0.elapsed() >= one_way, "first chunk left after {:?}", t0.elapsed());
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"second");
        // The second chunk was read 20 ms later, so it leaves 20 ms later; the end of the
        // stream follows it.
        assert!(t0.elapsed() >= one_way + Duration::from_millis(20), "second chunk left after {:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn several_connections_stay_separate() {
        let upstream = echo_server().await;
        let proxy = DelayProxy::start(loopback(0), upstream, Duration::from_millis(2)).await.unwrap();
        let mut tasks = JoinSet::new();
        for c in 0u8..8 {
            let addr = proxy.local_addr();
            tasks.spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let payload: Vec<u8> = (0..10_000u32).map(|i| c.wrapping_add(i as u8)).collect();
                s.write_all(&payload).await.unwrap();
                s.shutdown().await.unwrap();
                let mut back = Vec::new();
                s.read_to_end(&mut back).await.unwrap();
                (payload, back)
            });
        }
        while let Some(r) = tasks.join_next().await {
            let (payload, back) = r.unwrap();
            assert!(payload == back, "a connection received another's bytes or lost some");
        }
    }

    #[tokio::test]
    async fn unreachable_upstream_closes_the_client() {
        // Bind then drop: nothing listens on this port any more.
        let dead = std::net::TcpListener::bind(loopback(0)).unwrap().local_addr().unwrap();
        let proxy = DelayProxy::start(loopback(0), dead, Duration::from_millis(1)).await.unwrap();
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let mut buf = Vec::new();
        // Either a clean EOF or a reset: the point is that it ends.
        let _ = s.read_to_end(&mut buf).await;
        assert!(buf.is_empty());
    }
}
