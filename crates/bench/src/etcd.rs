//! Launching etcd 3.4 on loopback (a three-member cluster for the write
//! benchmark, single-member clusters for the lag benchmark), waiting for it to be
//! healthy, finding its leader's client URL, and reading one key locally.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reqwest::Client;
use serde_json::Value;

use crate::ports::PortPlan;
use crate::procs::ProcessGuard;

/// What to tell the user when the etcd binary is missing.
pub const INSTALL_HINT: &str = "install Debian's etcd-server (`apt-get install etcd-server`)";

/// A running etcd cluster; dropping it kills the members.
#[derive(Debug)]
pub struct EtcdCluster {
    guard: ProcessGuard,
    client_urls: Vec<String>,
}

/// `http://127.0.0.1:port`.
fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The `--initial-cluster` value: `e1=http://127.0.0.1:P1,e2=...,e3=...`.
pub fn initial_cluster(plan: &PortPlan) -> String {
    (0..3).map(|i| format!("e{}={}", i + 1, url(plan.etcd_peer[i]))).collect::<Vec<_>>().join(",")
}

/// Command-line arguments for member `i` (0-based) with data under `dir`.
/// Election timing is left at etcd's defaults (heartbeat 100 ms, election 1000 ms).
pub fn member_args(dir: &Path, plan: &PortPlan, i: usize) -> Vec<String> {
    let name = format!("e{}", i + 1);
    let client = url(plan.etcd_client[i]);
    let peer = url(plan.etcd_peer[i]);
    vec![
        "--name".into(),
        name.clone(),
        "--data-dir".into(),
        dir.join(&name).display().to_string(),
        "--listen-client-urls".into(),
        client.clone(),
        "--advertise-client-urls".into(),
        client,
        "--listen-peer-urls".into(),
        peer.clone(),
        "--initial-advertise-peer-urls".into(),
        peer,
        "--initial-cluster".into(),
        initial_cluster(plan),
        "--initial-cluster-state".into(),
        "new".into(),
        "--initial-cluster-token".into(),
        "bench".into(),
    ]
}

/// Command-line arguments for a single-member cluster named `name`, with data in
/// `DIR/name` and its own cluster token (so two single-member clusters never mistake each
/// other for peers). Election timing is left at etcd's defaults.
pub fn single_member_args(dir: &Path, name: &str, client_port: u16, peer_port: u16) -> Vec<String> {
    let client = url(client_port);
    let peer = url(peer_port);
    vec![
        "--name".into(),
        name.into(),
        "--data-dir".into(),
        dir.join(name).display().to_string(),
        "--listen-client-urls".into(),
        client.clone(),
        "--advertise-client-urls".into(),
        client,
        "--listen-peer-urls".into(),
        peer.clone(),
        "--initial-advertise-peer-urls".into(),
        peer.clone(),
        "--initial-cluster".into(),
        format!("{name}={peer}"),
        "--initial-cluster-state".into(),
        "new".into(),
        "--initial-cluster-token".into(),
        format!("bench-{name}"),
    ]
}

/// Fails with an installation hint if `etcd_bin` does not exist.
pub fn check_binary(etcd_bin: &Path) -> anyhow::Result<()> {
    if !etcd_bin.is_file() {
        bail!(
            "etcd binary not found at {}: {INSTALL_HINT}, or point --etcd-bin at an etcd 3.4 binary",
            etcd_bin.display()
        );
    }
    Ok(())
}

/// The first line of `etcd --version`, if it can be run.
pub fn version(etcd_bin: &Path) -> Option<String> {
    let out = Command::new(etcd_bin).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next().map(|l| l.trim().to_string())
}

impl EtcdCluster {
    /// Starts members e1..e3 with data and logs (`DIR/eN.log`) under `dir`,
    /// then waits until every member reports healthy or `timeout` passes.
    pub async fn start(
        etcd_bin: &Path,
        dir: &Path,
        plan: &PortPlan,
        http: &Client,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        Self::start_with(etcd_bin, dir, plan, http, timeout, &[]).await
    }

    /// [`EtcdCluster::start`] with `extra` arguments for every member (election timing, say).
    pub async fn start_with(
        etcd_bin: &Path,
        dir: &Path,
        plan: &PortPlan,
        http: &Client,
        timeout: Duration,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        check_binary(etcd_bin)?;
        let mut guard = ProcessGuard::new();
        for i in 0..3 {
            let mut cmd = Command::new(etcd_bin);
            cmd.args(member_args(dir, plan, i)).args(extra);
            let log: PathBuf = dir.join(format!("e{}.log", i + 1));
            guard.spawn(&format!("etcd member e{}", i + 1), cmd, &log)?;
        }
        let mut cluster = Self { guard, client_urls: plan.etcd_client.iter().map(|p| url(*p)).collect() };
        cluster.wait_healthy(http, timeout).await?;
        Ok(cluster)
    }

    /// Starts a single-member cluster named `name` (data in `DIR/name`, log in
    /// `DIR/name.log`) and waits until it reports healthy or `timeout` passes.
    pub async fn start_single(
        etcd_bin: &Path,
        dir: &Path,
        name: &str,
        client_port: u16,
        peer_port: u16,
        http: &Client,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        check_binary(etcd_bin)?;
        let mut guard = ProcessGuard::new();
        let mut cmd = Command::new(etcd_bin);
        cmd.args(single_member_args(dir, name, client_port, peer_port));
        guard.spawn(&format!("etcd member {name}"), cmd, &dir.join(format!("{name}.log")))?;
        let mut cluster = Self { guard, client_urls: vec![url(client_port)] };
        cluster.wait_healthy(http, timeout).await?;
        Ok(cluster)
    }

    /// Client URLs of the members, in start order.
    pub fn client_urls(&self) -> &[String] {
        &self.client_urls
    }

    async fn wait_healthy(&mut self, http: &Client, timeout: Duration) -> anyhow::Result<()> {
        let urls = self.client_urls.clone();
        self.guard.wait_healthy("etcd cluster", &urls, timeout, |base| async move { health(http, &base).await }).await
    }

    /// The client URL of the current leader, from `POST /v3/maintenance/status`
    /// on each member (the member whose `header.member_id` equals `leader`).
    pub async fn leader_url(&self, http: &Client, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            for base in &self.client_urls {
                if let Ok(v) = status(http, base).await {
                    if is_leader_status(&v) {
                        return Ok(base.clone());
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!("no etcd member reported itself leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Fails if a member has exited, naming its log.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.guard.ensure_running()
    }

    /// Kills member `i` (SIGKILL), as a crash would.
    pub fn kill_member(&mut self, i: usize) -> anyhow::Result<()> {
        self.guard.kill_one(i)
    }

    /// Kills the members now (also done on drop).
    pub fn stop(mut self) {
        self.guard.kill_all();
    }
}

async fn health(http: &Client, base: &str) -> anyhow::Result<()> {
    let resp = http.get(format!("{base}/health")).timeout(Duration::from_secs(2)).send().await?;
    let status = resp.status();
    let v: Value = resp.json().await.context("parsing /health")?;
    if status.is_success() && is_healthy(&v) {
        Ok(())
    } else {
        bail!("/health returned {status}: {v}")
    }
}

async fn status(http: &Client, base: &str) -> anyhow::Result<Value> {
    let resp = http
        .post(format!("{base}/v3/maintenance/status"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body("{}")
        .timeout(Duration::from_secs(2))
        .send()
        .await?
        .error_for_status()?;
    Ok(resp.json().await?)
}

/// Whether `key` holds a value on the member at `base`, read with `serializable: true`
/// (the member's own copy, without a round through the leader).
pub async fn key_exists_local(http: &Client, base: &str, key: &str) -> anyhow::Result<bool> {
    let body = format!("{{\"key\":\"{}\",\"serializable\":true}}", crate::base64::encode(key.as_bytes()));
    let resp = http
        .post(format!("{base}/v3/kv/range"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        bail!("/v3/kv/range returned {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(200)]));
    }
    let v: Value = serde_json::from_slice(&bytes).context("parsing /v3/kv/range")?;
    Ok(range_has_kvs(&v))
}

/// Whether a range response carries at least one key (the gateway omits `kvs` when empty).
pub fn range_has_kvs(v: &Value) -> bool {
    v.get("kvs").and_then(Value::as_array).is_some_and(|kvs| !kvs.is_empty())
}

/// `{"health":"true"}` (etcd 3.4 reports a string; accept a bool too).
pub fn is_healthy(v: &Value) -> bool {
    matches!(v.get("health"), Some(Value::String(s)) if s == "true") || v.get("health") == Some(&Value::Bool(true))
}

/// Whether a maintenance status response comes from the leader. The gateway
/// encodes uint64 ids as strings; numbers are accepted too.
pub fn is_leader_status(v: &Value) -> bool {
    let id = |x: Option<&Value>| match x {
        Some(Value::String(s)) => s.parse::<u64>().ok(),
        Some(Value::Number(n)) => n.as_u64(),
        _ => None,
    };
    match (id(v.pointer("/header/member_id")), id(v.get("leader"))) {
        (Some(me), Some(leader)) => me != 0 && me == leader,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn args_for_member_two() {
        let plan = PortPlan::new(30000).unwrap();
        let args = member_args(Path::new("/d"), &plan, 1);
        let get = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].clone()
        };
        assert_eq!(get("--name"), "e2");
        assert_eq!(get("--data-dir"), "/d/e2");
        assert_eq!(get("--listen-client-urls"), "http://127.0.0.1:30001");
        assert_eq!(get("--advertise-client-urls"), "http://127.0.0.1:30001");
        assert_eq!(get("--listen-peer-urls"), "http://127.0.0.1:30011");
        assert_eq!(get("--initial-advertise-peer-urls"), "http://127.0.0.1:30011");
        assert_eq!(
            get("--initial-cluster"),
            "e1=http://127.0.0.1:30010,e2=http://127.0.0.1:30011,e3=http://127.0.0.1:30012"
        );
        assert_eq!(get("--initial-cluster-state"), "new");
        assert_eq!(get("--initial-cluster-token"), "bench");
        assert!(!args.iter().any(|a| a.contains("election") || a.contains("heartbeat")));
    }

    #[test]
    fn single_member_args_name_only_itself() {
        let args = single_member_args(Path::new("/d"), "src", 24100, 24101);
        let get = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].clone()
        };
        assert_eq!(get("--name"), "src");
        assert_eq!(get("--data-dir"), "/d/src");
        assert_eq!(get("--listen-client-urls"), "http://127.0.0.1:24100");
        assert_eq!(get("--initial-cluster"), "src=http://127.0.0.1:24101");
        assert_eq!(get("--initial-cluster-token"), "bench-src");
    }

    #[test]
    fn range_parsing() {
        assert!(range_has_kvs(&json!({"header": {}, "kvs": [{"key": "YQ=="}], "count": "1"})));
        assert!(!range_has_kvs(&json!({"header": {}})));
        assert!(!range_has_kvs(&json!({"header": {}, "kvs": []})));
    }

    #[test]
    fn health_parsing() {
        assert!(is_healthy(&json!({"health": "true"})));
        assert!(is_healthy(&json!({"health": "true", "reason": ""})));
        assert!(!is_healthy(&json!({"health": "false"})));
        assert!(!is_healthy(&json!({})));
    }

    #[test]
    fn leader_status_parsing() {
        let leader = json!({"header": {"member_id": "123"}, "leader": "123"});
        let follower = json!({"header": {"member_id": "124"}, "leader": "123"});
        let none = json!({"header": {"member_id": "124"}, "leader": "0"});
        assert!(is_leader_status(&leader));
        assert!(!is_leader_status(&follower));
        assert!(!is_leader_status(&none));
        assert!(!is_leader_status(&json!({})));
        assert!(is_leader_status(&json!({"header": {"member_id": 9}, "leader": 9})));
    }

    #[test]
    fn missing_binary_mentions_package() {
        let err = check_binary(Path::new("/nonexistent/etcd")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("apt-get install etcd-server"), "{msg}");
        assert!(msg.contains("/nonexistent/etcd"), "{msg}");
    }
}
