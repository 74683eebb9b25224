//! Launching Meridian nodes (`meridian server`) on loopback from a generated
//! `cluster.toml` (a three-zone region for the write benchmark, or any
//! configuration the caller renders), waiting for them to be healthy, and finding
//! the region leader's API address from `GET /v1/cluster`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reqwest::Client;
use serde_json::Value;

use crate::ports::PortPlan;
use crate::procs::ProcessGuard;

/// The region (and dataset) name used by the benchmark.
pub const REGION: &str = "bench";
/// Zones of nodes 1, 2 and 3.
pub const ZONES: [&str; 3] = ["a", "b", "c"];

/// Renders `cluster.toml` for one region of three nodes on the plan's ports.
pub fn render_config(plan: &PortPlan) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "[[regions]]\nname = \"{REGION}\"");
    for (i, zone) in ZONES.iter().enumerate() {
        let _ = write!(
            s,
            "\n[[nodes]]\nid = {id}\nregion = \"{REGION}\"\nzone = \"{zone}\"\n\
             api_addr = \"127.0.0.1:{api}\"\npeer_addr = \"127.0.0.1:{peer}\"\n",
            id = i + 1,
            api = plan.meridian_api[i],
            peer = plan.meridian_peer[i],
        );
    }
    s
}

/// Checks that the Meridian executable exists when given as a path
/// (a bare name is left to `PATH` lookup at spawn time).
pub fn check_executable(exe: &Path) -> anyhow::Result<()> {
    if exe.components().count() > 1 && !exe.is_file() {
        bail!("meridian executable not found at {}", exe.display());
    }
    Ok(())
}

/// A running Meridian region; dropping it kills the nodes.
#[derive(Debug)]
pub struct MeridianCluster {
    guard: ProcessGuard,
    api_urls: Vec<String>,
}

impl MeridianCluster {
    /// Writes `DIR/cluster.toml`, starts nodes 1..=3 (`DIR/nN` data,
    /// `DIR/nN.log` output) and waits until each answers `GET /v1/health`
    /// with 200, or `timeout` passes.
    pub async fn start(
        exe: &Path,
        dir: &Path,
        plan: &PortPlan,
        http: &Client,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let api_ports: Vec<u16> = plan.meridian_api.to_vec();
        Self::start_config(exe, dir, &render_config(plan), &api_ports, http, timeout).await
    }

    /// Writes `config_text` to `DIR/cluster.toml`, starts nodes `1..=api_ports.len()`
    /// (node N's API on `api_ports[N-1]`, data in `DIR/nN`, output in `DIR/nN.log`) and
    /// waits until each answers `GET /v1/health` with 200, or `timeout` passes.
    pub async fn start_config(
        exe: &Path,
        dir: &Path,
        config_text: &str,
        api_ports: &[u16],
        http: &Client,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        check_executable(exe)?;
        let config = dir.join("cluster.toml");
        std::fs::write(&config, config_text).with_context(|| format!("writing {}", config.display()))?;
        let mut guard = ProcessGuard::new();
        for n in 1..=api_ports.len() {
            let mut cmd = Command::new(exe);
            cmd.arg("server")
                .arg("--config")
                .arg(&config)
                .arg("--node")
                .arg(n.to_string())
                .arg("--data-dir")
                .arg(dir.join(format!("n{n}")));
            guard.spawn(&format!("meridian node {n}"), cmd, &dir.join(format!("n{n}.log")))?;
        }
        let mut cluster = Self { guard, api_urls: api_ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect() };
        cluster.wait_healthy(http, timeout).await?;
        Ok(cluster)
    }

    /// API base URLs of the nodes, node 1 first.
    pub fn api_urls(&self) -> &[String] {
        &self.api_urls
    }

    async fn wait_healthy(&mut self, http: &Client, timeout: Duration) -> anyhow::Result<()> {
        let urls = self.api_urls.clone();
        let probe = |base: String| async move {
            let r = http.get(format!("{base}/v1/health")).timeout(Duration::from_secs(2)).send().await?;
            if r.status() != reqwest::StatusCode::OK {
                bail!("/v1/health returned {}", r.status());
            }
            Ok(())
        };
        self.guard.wait_healthy("meridian region", &urls, timeout, probe).await
    }

    /// The region leader's API base URL, polling `GET /v1/cluster` on each node
    /// until one names a leader or `timeout` passes. `None` if none was found
    /// (callers fall back to node 1, which forwards writes).
    pub async fn leader_url(&self, http: &Client, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            for base in &self.api_urls {
                let Ok(resp) = http.get(format!("{base}/v1/cluster")).timeout(Duration::from_secs(2)).send().await
                else {
                    continue;
                };
                let Ok(v) = resp.json::<Value>().await else {
                    continue;
                };
                if let Some(addr) = leader_api_addr(&v, REGION) {
                    return Some(addr);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills node `i + 1` (SIGKILL), as a crash would.
    pub fn kill_member(&mut self, i: usize) -> anyhow::Result<()> {
        self.guard.kill_one(i)
    }

    /// Fails if a node has exited, naming its log.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.guard.ensure_running()
    }

    /// Kills the nodes now (also done on drop).
    pub fn stop(mut self) {
        self.guard.kill_all();
    }
}

/// Normalises an id (number or string) for comparison.
fn id_key(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// `http://` + `addr` unless it already has a scheme.
fn as_base_url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.trim_end_matches('/').to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Reads the leader's API base URL for `region` out of a `/v1/cluster`
/// document, defensively: looks at `regions[*]` (an array, or an object keyed
/// by region name), picks the region named `region` (or the only one), reads
/// its `leader` (an id, or an object with `id`/`api_addr`) and finds that id in
/// the region's `nodes[*]` (falling back to the top-level `nodes[*]`).
pub fn leader_api_addr(doc: &Value, region: &str) -> Option<String> {
    let regions: Vec<(Option<&str>, &Value)> = match doc.get("regions")? {
        Value::Array(a) => a.iter().map(|r| (r.get("name").and_then(Value::as_str), r)).collect(),
        Value::Object(m) => m.iter().map(|(k, r)| (Some(k.as_str()), r)).collect(),
        _ => return None,
    };
    let chosen = regions
        .iter()
        .find(|(name, _)| *name == Some(region))
        .or_else(|| (regions.len() == 1).then(|| &regions[0]))
        .map(|(_, r)| *r)?;

    let leader = chosen.get("leader")?;
    let leader_id = match leader {
        Value::Object(o) => {
            if let Some(addr) = o.get("api_addr").and_then(Value::as_str) {
                return Some(as_base_url(addr));
            }
            o.get("id").and_then(id_key)?
        }
        other => id_key(other)?,
    };

    let nodes = chosen
        .get("nodes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .chain(doc.get("nodes").and_then(Value::as_array).into_iter().flatten());
    for node in nodes {
        if node.get("id").and_then(id_key).as_deref() == Some(leader_id.as_str()) {
            if let Some(addr) = node.get("api_addr").and_then(Value::as_str) {
                return Some(as_base_url(addr));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_rendering() {
        let plan = PortPlan::new(24000).unwrap();
        let expected = "\
[[regions]]
name = \"bench\"

[[nodes]]
id = 1
region = \"bench\"
zone = \"a\"
api_addr = \"127.0.0.1:24020\"
peer_addr = \"127.0.0.1:24030\"

[[nodes]]
id = 2
region = \"bench\"
zone = \"b\"
api_addr = \"127.0.0.1:24021\"
peer_addr = \"127.0.0.1:24031\"

[[nodes]]
id = 3
region = \"bench\"
zone = \"c\"
api_addr = \"127.0.0.1:24022\"
peer_addr = \"127.0.0.1:24032\"
";
        assert_eq!(render_config(&plan), expected);
    }

    #[test]
    fn leader_from_region_nodes() {
        let doc = json!({
            "regions": [
                {"name": "other", "leader": 1, "nodes": [{"id": 1, "api_addr": "127.0.0.1:1"}]},
                {"name": "bench", "leader": 2, "nodes": [
                    {"id": 1, "api_addr": "127.0.0.1:24020"},
                    {"id": 2, "api_addr": "127.0.0.1:24021"},
                    {"id": 3, "api_addr": "127.0.0.1:24022"}
                ]}
            ]
        });
        assert_eq!(leader_api_addr(&doc, "bench").as_deref(), Some("http://127.0.0.1:24021"));
    }

    #[test]
    fn leader_string_ids_and_top_level_nodes() {
        let doc = json!({
            "regions": [{"name": "bench", "leader": "3"}],
            "nodes": [
                {"id": "1", "api_addr": "127.0.0.1:1"},
                {"id": "3", "api_addr": "http://127.0.0.1:3/"}
            ]
        });
        assert_eq!(leader_api_addr(&doc, "bench").as_deref(), Some("http://127.0.0.1:3"));
    }

    #[test]
    fn leader_mixed_number_and_string() {
        let doc = json!({"regions": [{"name": "bench", "leader": "2",
            "nodes": [{"id": 2, "api_addr": "127.0.0.1:9"}]}]});
        assert_eq!(leader_api_addr(&doc, "bench").as_deref(), Some("http://127.0.0.1:9"));
    }

    #[test]
    fn leader_as_object_and_regions_as_map() {
        let doc = json!({"regions": {"bench": {"leader": {"id": 1, "api_addr": "127.0.0.1:7"}}}});
        assert_eq!(leader_api_addr(&doc, "bench").as_deref(), Some("http://127.0.0.1:7"));
        let doc = json!({"regions": {"bench": {"leader": {"id": 1},
            "nodes": [{"id": 1, "api_addr": "127.0.0.1:8"}]}}});
        assert_eq!(leader_api_addr(&doc, "bench").as_deref(), Some("http://127.0.0.1:8"));
    }

    #[test]
    fn single_unnamed_region_is_used() {
        let doc = json!({"regions": [{"leader": 1, "nodes": [{"id": 1, "api_addr": "127.0.0.1:5"}]}]});
        assert_eq!(leader_api_addr(&doc, "bench").as_deref(), Some("http://127.0.0.1:5"));
    }

    #[test]
    fn no_leader_yields_none() {
        for doc in [
            json!({}),
            json!({"regions": []}),
            json!({"regions": [{"name": "bench", "leader": null, "nodes": []}]}),
            json!({"regions": [{"name": "bench", "leader": 4,
                "nodes": [{"id": 1, "api_addr": "127.0.0.1:1"}]}]}),
            json!({"regions": [{"name": "x", "leader": 1}, {"name": "y", "leader": 1}]}),
        ] {
            assert_eq!(leader_api_addr(&doc, "bench"), None, "{doc}");
        }
    }

    #[test]
    fn executable_check() {
        assert!(check_executable(Path::new("meridian")).is_ok());
        assert!(check_executable(Path::new("/nonexistent/meridian")).is_err());
    }
}
