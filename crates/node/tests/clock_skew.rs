//! A node whose wall clock jumps backwards past the HLC's maximum offset refuses writes with
//! a clock error, counts the refusal, and accepts writes again once its clock catches up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_core::{DatasetName, Key};
use meridian_node::clock::Clock;
use meridian_node::config::ClusterConfig;
use meridian_node::{Node, NodeError, NodeOptions, Precondition, WriteOutcome};

struct ManualClock(AtomicU64);

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Two distinct free ports: both held while chosen, so the OS cannot hand out one twice.
fn two_free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

#[tokio::test]
async fn backwards_clock_is_refused_and_counted() {
    let (api_port, peer_port) = two_free_ports();
    let text = format!(
        "[[regions]]\nname = \"r\"\n[[nodes]]\nid = 1\nregion = \"r\"\nzone = \"a\"\napi_addr = \"127.0.0.1:{}\"\npeer_addr = \"127.0.0.1:{}\"\n[clock]\nmax_offset_ms = 500\n",
        api_port, peer_port
    );
    let config = ClusterConfig::parse(&text, "test").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock(AtomicU64::new(1_000_000)));
    let mut opts = NodeOptions::new(config, 1, dir.path().to_path_buf());
    opts.clock = clock.clone();
    let node: Arc<Node> = Node::start(opts).await.unwrap();
    node.bootstrap().await.unwrap();
    let start = Instant::now();
    while node.region_report().leader != Some(1) {
        assert!(start.elapsed() < Duration::from_secs(10), "single voter did not become leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (dataset, key) = (DatasetName::new("d").unwrap(), Key::new("k").unwrap());
    let write = || node.gateway().put(&dataset, &key, b"1".to_vec(), Precondition::None, None);

    let (r, _) = write().await.unwrap();
    let WriteOutcome::Written { version, .. } = r else { panic!("{r:?}") };
    assert_eq!(version.hlc.wall_ms(), 1_000_000);

    clock.0.store(1_000_000 - 501, Ordering::SeqCst);
    let err = write().await.unwrap_err();
    assert!(matches!(err, NodeError::ClockSkew(_)), "{err:?}");
    assert_eq!(node.metrics().hlc_refusals.get(), 1);

    // Within the offset the HLC keeps ticking logically ahead of the wall clock.
    clock.0.store(1_000_000 - 400, Ordering::SeqCst);
    let (r, _) = write().await.unwrap();
    let WriteOutcome::Written { version: v2, .. } = r else { panic!("{r:?}") };
    assert!(v2 > version);
    node.shutdown().await;
}
