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

/// The sample policy the demo applies on first start (one dataset of each kind of rule).
pub const DEMO_POLICY: &str = include_str!("demo-policy.toml");

/// The largest clock skew a drill may give a region: a minute either way.
pub const CLOCK_SKEW_MS_MAX: i64 = 60_000;

/// Parse `REGION=MS` (MS may be negative) for `--clock-skew`.
pub fn parse_skew(s: &str) -> Result<(String, i64), String> {
    let (region, ms) = s.split_once('=').ok_or_else(|| format!("{s:?} is not REGION=MS, e.g. us-east=5000"))?;
    let ms: i64 = ms.trim_start_matches('+').parse().map_err(|_| format!("{ms:?} is not a number of milliseconds"))?;
    if ms.abs() > CLOCK_SKEW_MS_MAX {
        return Err(format!("{ms} ms is beyond the drill's bound of ±{CLOCK_SKEW_MS_MAX} ms"));
    }
    Ok((region.to_owned(), ms))
}

pub async fn run(
    base_port: u16,
    data_dir: Option<PathBuf>,
    wire_capture: Option<PathBuf>,
    clock_skew: Vec<(String, i64)>,
) -> anyhow::Result<()> {
    let mut config = ClusterConfig::demo(base_port);
    for (region, _) in &clock_skew {
        if !config.topology.regions().iter().any(|r| r.name.as_str() == region) {
            anyhow::bail!("--clock-skew names {region:?}, which is not a demo region (us-east, eu-west, ap-south)");
        }
    }
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
    config.session_key = Some(session_key(&root)?);
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
            let skew = clock_skew.iter().filter(|(r, _)| r == region.name.as_str()).map(|(_, ms)| *ms).sum();
            let (node, serving) = start_node(config.clone(), spec.id, dir, wire_capture.clone(), skew, async move {
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
    let policy = apply_demo_policy(&nodes[0]).await?;
    print_banner(&config, &root, base_port, &policy);

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

/// Apply the sample policy unless the cluster already has one (a reused --data-dir).
async fn apply_demo_policy(node: &Node) -> anyhow::Result<String> {
    let (active, _) = node.policy_status().await;
    if let Some(entry) = active.context("read the active policy")? {
        return Ok(format!("policy {} (epoch {}, kept from the data directory)", &entry.version[..12], entry.epoch));
    }
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let full =
        meridian_policy::Rollout { mode: meridian_policy::Mode::Enforce, percent: meridian_policy::Rollout::FULL };
    let outcome = node
        .policy_apply(DEMO_POLICY, meridian_policy::Format::Toml, "demo-policy.toml", full, "apply", now_ms)
        .await
        .map_err(|e| anyhow::anyhow!("apply the demo policy: {e}"))?;
    Ok(format!(
        "policy {} (epoch {}): {}",
        &outcome.entry.version[..12],
        outcome.entry.epoch,
        outcome.entry.datasets.join(", ")
    ))
}

fn print_banner(config: &ClusterConfig, root: &std::path::Path, base_port: u16, policy: &str) {
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
    println!("Active {policy}");
    println!();
    println!("Try (any node takes any request and routes it to a home region of the key):");
    println!(
        "  curl -s -X PUT -H 'content-type: application/json' -d '{{\"name\":\"Lamp\"}}' {eu}/v1/datasets/catalog/keys/sku-1"
    );
    println!("  cargo run --release -- get catalog sku-1 --endpoint {ep}");
    println!("  cargo run --release -- put profiles eu-west/alice '{{\"name\":\"Alice\"}}' --endpoint {ep}");
    println!("  cargo run --release -- policy explain profiles eu-west/alice --endpoint {ep}");
    println!("  cargo run --release -- policy history --endpoint {ep}");
    println!("  cargo run --release -- put users u1 1 --endpoint {ep}    # refused: not in the policy");
    println!("  cargo run --release -- cluster status --endpoint {eu}");
    println!("  curl -s {ep}/metrics | grep meridian_raft");
    println!("  curl -s {ep}/v1/openapi.json");
    println!();
    println!("Links ship each write to the regions its policy lets hold a copy: a catalog write in us-east");
    println!("is readable with --consistency local from any region a moment later; profiles never leave home.");
    println!("Press Ctrl-C to stop.");
}

/// The demo's session key: kept in its data directory, so that tokens stay valid when a kept
/// demo (`--data-dir`) starts again.
fn session_key(root: &std::path::Path) -> anyhow::Result<meridian_node::session::SessionKey> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = root.join("session.key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return meridian_node::session::SessionKey::from_hex(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    }
    std::fs::create_dir_all(root).with_context(|| format!("create {}", root.display()))?;
    let key = meridian_node::session::SessionKey::random().context("read the system's random source")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("create {}", path.display()))?;
    std::io::Write::write_all(&mut f, key.to_hex().as_bytes()).with_context(|| format!("write {}", path.display()))?;
    Ok(key)
}
