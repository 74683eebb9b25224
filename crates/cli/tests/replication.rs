//! Cross-region links against `meridian demo`: mirrors receive what the policy lets them hold
//! (and serve it to `local` reads), multi-home datasets reach every home, restricted and
//! regional data never leaves its region, and a cut link catches up after the heal.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{files_contain, post_json, wait_until, Stop, BIN};

use common::put_ok as put;

/// `(key, etag)` of every key in a local listing at `api`.
async fn local_listing(http: &reqwest::Client, api: &str, dataset: &str) -> Vec<(String, String)> {
    let v: serde_json::Value = http
        .get(format!("{api}/v1/datasets/{dataset}/keys?consistency=local&limit=1000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| (i["key"].as_str().unwrap().to_owned(), i["version"]["etag"].as_str().unwrap().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn cli_ok(endpoint: &str, args: &[&str]) {
    let out = Command::new(BIN).args(args).args(["--endpoint", endpoint]).output().unwrap();
    assert!(out.status.success(), "meridian {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_ship_what_the_policy_allows_and_nothing_else() {
    let data = tempfile::tempdir().unwrap();
    let (demo, base, _) = common::start_demo(Some(data.path()));
    let _stop = Stop(demo);
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let us = format!("http://127.0.0.1:{base}");
    let eu = format!("http://127.0.0.1:{}", base + 4);
    let ap = format!("http://127.0.0.1:{}", base + 7);

    // catalog: home us-east, mirrored everywhere; a local read in ap-south is served there.
    let written = put(&http, &us, "catalog/keys/sku-1", "{\"name\":\"Lamp\"}").await;
    let etag = written["version"]["etag"].as_str().unwrap().to_owned();
    wait_until("the catalog reaches ap-south", Duration::from_secs(20), || {
        let (http, ap, etag) = (http.clone(), ap.clone(), etag.clone());
        async move {
            let Ok(r) = http.get(format!("{ap}/v1/datasets/catalog/keys/sku-1?consistency=local")).send().await else {
                return false;
            };
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            v["version"]["etag"] == etag.as_str()
                && v["served_by"]["region"] == "ap-south"
                && v["served_by"]["reason"] == "local"
        }
    })
    .await;

    // Restricted and regional data with canaries, written through other regions.
    let canary = format!("canary-{:016x}", rand::random::<u64>());
    put(&http, &us, &format!("profiles/keys/eu-west%2F{canary}"), &format!("{{\"c\":\"{canary}\"}}")).await;
    let orders_canary = format!("orders-{:016x}", rand::random::<u64>());
    put(&http, &ap, &format!("orders/keys/{orders_canary}"), &format!("{{\"c\":\"{orders_canary}\"}}")).await;
    // carts has three homes: a write in eu-west reaches the other two.
    let (s, b) = post_json(&http, &eu, "carts/keys/cart-1/add", r#"{"members":["apple"]}"#).await;
    assert_eq!(s, 201, "{b}");
    for api in [&us, &ap] {
        wait_until("carts reach every home", Duration::from_secs(20), || {
            let (http, api) = (http.clone(), api.to_string());
            async move { local_listing(&http, &api, "carts").await.iter().any(|(k, _)| k == "cart-1") }
        })
        .await;
    }
    // eu-west's links go past the canaries (withheld) in the same batches that carry the cart;
    // the metrics count them once each batch is acknowledged.
    wait_until("both links withhold both canaries", Duration::from_secs(20), || {
        let http = http.clone();
        async move {
            let mut withheld = 0.0;
            for port in [base + 3, base + 4, base + 5] {
                let Ok(r) = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await else { return false };
                let text = r.text().await.unwrap_or_default();
                for line in text.lines().filter(|l| l.starts_with("meridian_replication_withheld_changes_total{")) {
                    withheld += line.rsplit(' ').next().unwrap().parse::<f64>().unwrap_or(0.0);
                }
            }
            withheld >= 4.0
        }
    })
    .await;
    for id in (1..=3).chain(7..=9) {
        let dir = data.path().join(format!("node-{id}"));
        assert!(!files_contain(&dir, canary.as_bytes()), "restricted bytes on node {id}, outside eu-west");
        assert!(!files_contain(&dir, orders_canary.as_bytes()), "eu-only orders on node {id}, outside eu-west");
    }
    assert!((4..=6).any(|id| files_contain(&data.path().join(format!("node-{id}")), canary.as_bytes())));

    // Cut ap-south off, keep writing, heal: ap-south converges on us-east's copy.
    cli_ok(&us, &["chaos", "partition", "us-east", "ap-south"]);
    for i in 0..20 {
        put(&http, &us, &format!("catalog/keys/item-{i:02}"), &format!("{{\"i\":{i}}}")).await;
    }
    let during = local_listing(&http, &ap, "catalog").await;
    assert!(!during.iter().any(|(k, _)| k.starts_with("item-")), "writes crossed a cut link: {during:?}");
    let lag = |status: &serde_json::Value, from: &str, to: &str| -> u64 {
        let region = status["regions"].as_array().unwrap().iter().find(|r| r["region"] == from).unwrap().clone();
        let link = region["links"].as_array().unwrap().iter().find(|l| l["destination"] == to).unwrap().clone();
        link["lag_changes"].as_u64().unwrap()
    };
    let status: serde_json::Value =
        http.get(format!("{us}/v1/replication")).send().await.unwrap().json().await.unwrap();
    assert!(lag(&status, "us-east", "ap-south") >= 20, "the cut link is behind: {status}");
    cli_ok(&us, &["chaos", "heal"]);
    // The node asked may be a follower a few milliseconds behind: wait for all 21 keys.
    wait_until("us-east's node has applied every write", Duration::from_secs(10), || {
        let (http, us) = (http.clone(), us.clone());
        async move { local_listing(&http, &us, "catalog").await.len() == 21 }
    })
    .await;
    let source = local_listing(&http, &us, "catalog").await;
    wait_until("ap-south converges after the heal", Duration::from_secs(30), || {
        let (http, ap, source) = (http.clone(), ap.clone(), source.clone());
        async move { local_listing(&http, &ap, "catalog").await == source }
    })
    .await;
    wait_until("eu-west holds the same copy", Duration::from_secs(30), || {
        let (http, eu, source) = (http.clone(), eu.clone(), source.clone());
        async move { local_listing(&http, &eu, "catalog").await == source }
    })
    .await;
    // Once idle, every link is acknowledged up to its region's last write.
    wait_until("every link drains", Duration::from_secs(30), || {
        let (http, us) = (http.clone(), us.clone());
        async move {
            let Ok(r) = http.get(format!("{us}/v1/replication")).send().await else { return false };
            let status: serde_json::Value = r.json().await.unwrap_or_default();
            let regions = status["regions"].as_array().cloned().unwrap_or_default();
            regions.len() == 3
                && regions.iter().all(|r| {
                    r["reachable"] == true
                        && r["links"]
                            .as_array()
                            .is_some_and(|ls| ls.len() == 2 && ls.iter().all(|l| l["lag_changes"] == 0))
                })
        }
    })
    .await;
    let out = Command::new(BIN).args(["replication", "status", "--endpoint", &us]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && table.contains("us-east -> ap-south") && table.contains("lag"), "{table}");
}
