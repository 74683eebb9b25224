//! `meridian chaos` against a running demo: cuts, heals and delays between regions, applied on
//! every node, touching only cross-region messages.

mod common;

use std::time::{Duration, Instant};

use common::{cli, cli_json, wait_for, Stop};

#[test]
fn partition_heal_and_delay_between_regions() {
    let (demo, base, _) = common::start_demo(None);
    let _stop = Stop(demo);
    // Nodes: us-east base+0..2, eu-west base+3..5, ap-south base+6..8.
    let us = format!("http://127.0.0.1:{base}");
    let eu = format!("http://127.0.0.1:{}", base + 4);
    let ap = format!("http://127.0.0.1:{}", base + 7);

    let (ok, out, _) = cli(&us, &["chaos", "status"]);
    assert!(ok && out.contains("no faults"), "{out}");
    let spec = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { reqwest::get(format!("{us}/v1/openapi.json")).await.unwrap().text().await.unwrap() });
    for path in ["/v1/admin/chaos/partition", "/v1/admin/chaos/heal", "/v1/admin/chaos/delay", "/v1/replication"] {
        assert!(spec.contains(path), "the OpenAPI spec lacks {path}");
    }

    // Cut us-east from eu-west: every node learns it, whichever took the command.
    let (ok, out, err) = cli(&ap, &["chaos", "partition", "us-east", "eu-west"]);
    assert!(ok && out.contains("eu-west <-> us-east") && out.contains("yes"), "{out}{err}");
    for port in [base, base + 4, base + 8] {
        let s = cli_json(&format!("http://127.0.0.1:{port}"), &["chaos", "status"]);
        assert_eq!(s["links"][0]["cut"], true, "node at {port}: {s}");
    }

    // Region health: eu-west's probes find us-east down (after three failed probes in a row,
    // not one); ap-south's still find it up; each node's own region is "here".
    let us_seen_from = |endpoint: &str| -> serde_json::Value {
        let s = cli_json(endpoint, &["cluster", "status"]);
        s["regions"].as_array().unwrap().iter().find(|r| r["name"] == "us-east").unwrap()["health"].clone()
    };
    wait_for(|| us_seen_from(&eu)["reachability"] == "down", "eu-west to find us-east down");
    let h = us_seen_from(&eu);
    assert!(h["consecutive_failures"].as_u64().unwrap() >= 3, "{h}");
    assert!(h["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{h}");
    let h = us_seen_from(&ap);
    assert_eq!(h["reachability"], "up", "ap-south is not cut from us-east: {h}");
    assert!(h["rtt_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{h}");
    let own = cli_json(&us, &["cluster", "status"]);
    let own = own["regions"].as_array().unwrap().iter().find(|r| r["name"] == "us-east").unwrap().clone();
    assert!(own.get("health").is_none(), "a node does not probe its own region: {own}");
    let (ok, out, _) = cli(&eu, &["cluster", "status"]);
    assert!(ok && out.contains("health") && out.contains("region us-east is down to this node"), "{out}");
    let metrics = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { reqwest::get(format!("{eu}/metrics")).await.unwrap().text().await.unwrap() });
    assert!(metrics.contains("meridian_region_reachable{region=\"us-east\"} 0"), "{metrics}");
    assert!(metrics.contains("meridian_region_reachable{region=\"ap-south\"} 1"), "{metrics}");

    // The catalog lives in us-east: eu-west cannot reach it, ap-south can; eu-west's own data
    // (orders) is untouched, since faults never touch messages inside a region.
    let (ok, _, err) = cli(&eu, &["put", "catalog", "c1", "1"]);
    assert!(!ok && err.contains("unavailable"), "a write across the cut must fail: {err}");
    let (ok, _, err) = cli(&ap, &["put", "catalog", "c1", "1"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&eu, &["put", "orders", "o1", "1"]);
    assert!(ok, "{err}");

    // A policy applied during the cut reaches eu-west after the heal.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[[dataset]]\nname = \"catalog\"\nlocality = \"global\"\nclassification = \"public\"\nhome = [\"us-east\"]\n\n[[dataset]]\nname = \"orders\"\nlocality = \"regional\"\nclassification = \"confidential\"\nhome = [\"eu-west\"]\n").unwrap();
    let applied = cli_json(&us, &["policy", "apply", file.to_str().unwrap()]);
    assert_eq!(applied["pending"], serde_json::json!(["eu-west"]), "{applied}");

    let (ok, out, err) = cli(&eu, &["chaos", "heal"]);
    assert!(ok && out.contains("no faults"), "{out}{err}");
    let (ok, _, err) = cli(&eu, &["put", "catalog", "c2", "2"]);
    assert!(ok, "healed: {err}");
    wait_for(|| us_seen_from(&eu)["reachability"] == "up", "eu-west to find us-east up after the heal");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = cli_json(&us, &["policy", "status"]);
        if s["regions"].as_array().unwrap().iter().all(|r| r["epoch"] == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "eu-west did not catch up after the heal: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Delay and loss settings, shown everywhere; writes still succeed with no loss.
    let s = cli_json(&us, &["chaos", "delay", "us-east", "eu-west", "--ms", "60", "--jitter-ms", "20"]);
    assert_eq!((s["links"][0]["delay_ms"].as_u64(), s["links"][0]["jitter_ms"].as_u64()), (Some(60), Some(20)));
    let (ok, _, err) = cli(&eu, &["put", "catalog", "c3", "3"]);
    assert!(ok, "{err}");
    let metrics = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { reqwest::get(format!("{eu}/metrics")).await.unwrap().text().await.unwrap() });
    assert!(metrics.contains("meridian_chaos_dropped_messages_total{kind=\"cut\"}"), "{metrics}");

    // Bad input: clear errors, nothing changed.
    let (ok, _, err) = cli(&us, &["chaos", "partition", "us-east", "us-east"]);
    assert!(!ok && err.contains("invalid_query"), "{err}");
    let (ok, _, err) = cli(&us, &["chaos", "partition", "us-east", "mars"]);
    assert!(!ok && err.contains("invalid_query") && err.contains("mars"), "{err}");
    let (ok, _, err) = cli(&us, &["chaos", "delay", "us-east", "eu-west", "--loss-percent", "101"]);
    assert!(!ok && err.contains("101"), "{err}");
    let s = cli_json(&us, &["chaos", "status"]);
    assert_eq!(s["links"].as_array().unwrap().len(), 1, "a refused change changed the table: {s}");
    let (ok, out, _) = cli(&us, &["chaos", "heal", "us-east", "eu-west"]);
    assert!(ok && out.contains("no faults"), "{out}");
}
