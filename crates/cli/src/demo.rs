//! `meridian demo`: the whole planet in one process. Nine nodes (three regions of three
//! zones) each with its own Raft log, state and listeners on loopback, talking over the same
//! HTTP transport as a real cluster, with simulated WAN delay between regions.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_node::config::ClusterConfig;
use meridian_node::Node;

use crate::run::start_node;

/// How long the demo waits for every region to elect a leader before it gives up.
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);

pub async fn run(base_port: u16, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let config = ClusterConfig::demo(base_port);
    // A temporary directory unless the user asked to keep the data.
    let (_tmp, root) = match data_dir {
        Some(d) => (None, d),
        None => {
            let t = tempfile::Builder::new()
                .prefix("meridian-demo-")
                .tempdir()
                .context("create a temporary data directory")?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut nodes: Vec<Arc<Node>> = Vec::new();
    let mut servers = Vec::new();
    // Region by region: start its voters, then form its group as soon as all of them listen,
    // so that no first election knocks on a door that is not open yet.
    for region in config.topology.regions() {
        let first = nodes.len();
        for spec in config.topology.region_nodes(&region.name) {
            let mut rx = stop_rx.clone();
            let dir = root.join(format!("node-{}", spec.id));
            let (node, serving) = start_node(config.clone(), spec.id, dir, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .with_context(|| format!("start demo node {} (is another demo running? try --base-port)", spec.id))?;
            nodes.push(node);
            servers.push(serving);
        }
        // One voter forms the group; the others learn the membership from its first
        // AppendEntries. (Initializing all three also works, but whichever voted before its
        // own turn makes openraft log a harmless refusal that would alarm a demo user.)
        nodes[first].bootstrap().await?;
    }
    wait_for_leaders(&nodes).await?;
    print_banner(&config, &root, base_port);

    tokio::signal::ctrl_c().await.context("wait for Ctrl-C")?;
    eprintln!("\nstopping the demo...");
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    for n in &nodes {
        n.shutdown().await;
    }
    eprintln!("stopped");
    Ok(())
}

async fn wait_for_leaders(nodes: &[Arc<Node>]) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let missing: Vec<String> =
            nodes.iter().filter(|n| n.region_report().leader.is_none()).map(|n| format!("node {}", n.id())).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if start.elapsed() > STARTUP_DEADLINE {
            anyhow::bail!("no leader known after {:?} on: {}", STARTUP_DEADLINE, missing.join(", "));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_banner(config: &ClusterConfig, root: &std::path::Path, base_port: u16) {
    let t = &config.topology;
    println!("Meridian demo: {} regions, {} nodes, data in {}", t.regions().len(), t.nodes().len(), root.display());
    println!();
    for r in t.regions() {
        let nodes: Vec<String> = t
            .region_nodes(&r.name)
            .iter()
            .map(|n| format!("zone {} http://{} (node {})", n.zone, n.api_addr, n.id))
            .collect();
        println!("  {:<9} {}", r.name.as_str(), nodes.join(", "));
    }
    println!();
    for (a, b, ms) in t.wan() {
        println!("  simulated WAN delay {a} <-> {b}: {ms} ms one way");
    }
    let ep = format!("http://127.0.0.1:{base_port}");
    let eu = format!("http://127.0.0.1:{}", base_port + 3);
    println!();
    println!("Try (any node takes any request; followers forward to their region's leader):");
    println!(
        "  curl -s -X PUT -H 'content-type: application/json' -d '{{\"name\":\"Ada\"}}' {ep}/v1/datasets/users/keys/u1"
    );
    println!("  curl -s {ep}/v1/datasets/users/keys/u1");
    println!("  cargo run --release -- get users u1 --endpoint {ep}");
    println!("  cargo run --release -- list users --endpoint {ep}");
    println!("  cargo run --release -- cluster status --endpoint {eu}");
    println!("  curl -s {ep}/metrics | grep meridian_raft");
    println!("  curl -s {ep}/v1/openapi.json");
    println!();
    println!("Each region is its own Raft group for now: a key written in us-east lives in us-east.");
    println!("Press Ctrl-C to stop.");
}
