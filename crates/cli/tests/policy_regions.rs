//! A region that missed a policy apply: it must store nothing while it cannot learn the policy,
//! and follow it once it has pulled its copy from the authority. Two `meridian server`
//! processes, one single-zone region each (us-east is the authority: it is listed first).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_ports, wait_until, BIN};

struct Node {
    id: u64,
    api: String,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self, dir: &Path) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("n{}.log", self.id))).unwrap();
        let child = Command::new(BIN)
            .args(["server", "--config"])
            .arg(dir.join("cluster.toml"))
            .args(["--node", &self.id.to_string(), "--data-dir"])
            .arg(dir.join(format!("n{}", self.id)))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn put(http: &reqwest::Client, api: &str, path: &str) -> (u16, serde_json::Value) {
    let resp = http
        .put(format!("{api}/v1/datasets/{path}"))
        .header("content-type", "application/json")
        .body("1")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_without_the_policy_stores_nothing_until_it_has_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("[[regions]]\nname = \"us-east\"\n\n[[regions]]\nname = \"eu-west\"\n\n");
    let mut nodes = Vec::new();
    let ports = free_ports(4);
    for (id, region) in [(1u64, "us-east"), (2, "eu-west")] {
        let (a, p) = (ports[2 * id as usize - 2], ports[2 * id as usize - 1]);
        text.push_str(&format!(
            "[[nodes]]\nid = {id}\nregion = \"{region}\"\nzone = \"a\"\napi_addr = \"127.0.0.1:{a}\"\npeer_addr = \"127.0.0.1:{p}\"\n\n"
        ));
        nodes.push(Node { id, api: format!("http://127.0.0.1:{a}"), child: None });
    }
    std::fs::write(dir.path().join("cluster.toml"), text).unwrap();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    for n in &mut nodes {
        n.spawn(dir.path());
    }
    let health = |api: String| {
        let http = http.clone();
        async move { http.get(format!("{api}/v1/health")).send().await.is_ok_and(|r| r.status().is_success()) }
    };
    for n in &nodes {
        wait_until("a leader in each region", Duration::from_secs(30), || health(n.api.clone())).await;
    }
    let (us, eu) = (nodes[0].api.clone(), nodes[1].api.clone());

    // Without any policy, each region stores what it takes.
    let (status, body) = put(&http, &eu, "notes/keys/before").await;
    assert_eq!(status, 201, "{body}");

    // eu-west goes away; the authority (us-east) gets a policy that homes `notes` in us-east.
    nodes[1].kill();
    let policy =
        "[[dataset]]\nname = \"notes\"\nlocality = \"regional\"\nclassification = \"internal\"\nhome = [\"us-east\"]\n";
    let resp = http.post(format!("{us}/v1/policy")).json(&serde_json::json!({ "text": policy })).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let applied: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(applied["pending"], serde_json::json!(["eu-west"]), "{applied}");

    // Now the authority is down and eu-west comes back without a copy: it must refuse.
    nodes[0].kill();
    nodes[1].spawn(dir.path());
    wait_until("eu-west has a leader", Duration::from_secs(30), || health(eu.clone())).await;
    let (status, body) = put(&http, &eu, "notes/keys/during").await;
    assert!(status == 503, "a region that cannot learn the policy must not store: {status} {body}");
    let code = body["code"].as_str().unwrap_or_default().to_string();
    assert!(["unavailable", "policy_refused", "no_leader"].contains(&code.as_str()), "{body}");
    let listed: serde_json::Value =
        http.get(format!("{eu}/v1/datasets/notes/keys?consistency=local")).send().await.unwrap().json().await.unwrap();
    let keys: Vec<&str> =
        listed["items"].as_array().map(|a| a.iter().filter_map(|i| i["key"].as_str()).collect()).unwrap_or_default();
    assert!(!keys.contains(&"during"), "the refused write was stored: {listed}");

    // The authority returns: eu-west's leader pulls the policy, and follows it.
    nodes[0].spawn(dir.path());
    wait_until("us-east has a leader", Duration::from_secs(30), || health(us.clone())).await;
    wait_until("eu-west pulls the policy", Duration::from_secs(30), || {
        let http = http.clone();
        let us = us.clone();
        async move {
            let status: serde_json::Value = match http.get(format!("{us}/v1/policy")).send().await {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => return false,
            };
            status["regions"].as_array().is_some_and(|rs| rs.iter().all(|r| r["epoch"] == 1))
        }
    })
    .await;
    let (status, body) = put(&http, &eu, "notes/keys/after").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["served_by"]["region"], "us-east", "notes is homed in us-east now: {body}");
}
