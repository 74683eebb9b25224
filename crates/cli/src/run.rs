//! `meridian server`: one node of a real cluster.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use meridian_node::config::ClusterConfig;
use meridian_node::{Node, NodeOptions};
use tokio::net::TcpListener;

/// Start a node: open storage, bind both listeners and serve. The caller then forms the
/// region's group with [`Node::bootstrap`], once the region's other voters are reachable if it
/// can arrange that. Returns the node and a handle that finishes when serving stops.
pub async fn start_node(
    config: ClusterConfig,
    node_id: u64,
    data_dir: PathBuf,
    wire_capture: Option<PathBuf>,
    clock_offset_ms: i64,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(Arc<Node>, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let spec = config
        .topology
        .node(node_id)
        .cloned()
        .with_context(|| format!("node {node_id} is not in the configuration"))?;
    let api = TcpListener::bind(spec.api_addr)
        .await
        .with_context(|| format!("bind the API listener of node {node_id} on {}", spec.api_addr))?;
    let peer = TcpListener::bind(spec.peer_addr)
        .await
        .with_context(|| format!("bind the peer listener of node {node_id} on {}", spec.peer_addr))?;
    let mut opts = NodeOptions::new(config, node_id, data_dir);
    opts.wire_capture = wire_capture;
    if clock_offset_ms != 0 {
        opts.clock = Arc::new(meridian_node::clock::OffsetClock { offset_ms: clock_offset_ms });
    }
    let node = Node::start(opts).await.with_context(|| format!("start node {node_id}"))?;
    let serving = tokio::spawn(meridian_server::serve(node.clone(), api, peer, shutdown));
    Ok((node, serving))
}

pub async fn server(
    config: PathBuf,
    node_id: u64,
    data_dir: Option<PathBuf>,
    wire_capture: Option<PathBuf>,
) -> anyhow::Result<()> {
    let config = ClusterConfig::load(&config).context("load the cluster configuration")?;
    let data_dir = data_dir.unwrap_or_else(|| PathBuf::from(format!("data/node-{node_id}")));
    let (node, serving) = start_node(config, node_id, data_dir.clone(), wire_capture, 0, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    node.bootstrap().await?;
    let spec = node.spec();
    tracing::info!(node = spec.id, region = %spec.region, zone = %spec.zone, api = %spec.api_addr, peer = %spec.peer_addr,
        data_dir = %data_dir.display(), "node serving");
    let served = serving.await.context("server task")?;
    node.shutdown().await;
    served
}
