//! Region failover through the real binary: when its only home is cut off from every other
//! region, a dataset with a failover list takes writes in its first target once the home has
//! been down long enough, the promotion shows in status with its epoch and history, and ends
//! when the home returns; the stand-in's writes reach the home. An operator's promotion is
//! refused while a home answers, unless forced.

mod common;

use std::time::Duration;

use common::{cli, cli_json, wait_for, PolicyDemo};

const POLICY: &str = r#"format = 1

[[dataset]]
name = "orders"
locality = "global"
classification = "internal"
home = ["us-east"]
mirrors = "all-allowed"
failover = { order = ["eu-west", "ap-south"], rpo = "30s" }

[[dataset]]
name = "ledger"
locality = "global"
classification = "internal"
home = ["us-east"]
mirrors = ["eu-west"]
failover = { order = ["eu-west"] }
"#;

/// `region`'s promotion record for `dataset`, as `meridian failover status` shows it.
fn promotion(endpoint: &str, region: &str, dataset: &str) -> Option<serde_json::Value> {
    let s = cli_json(endpoint, &["failover", "status", "--events", "50"]);
    let r = s["regions"].as_array().unwrap().iter().find(|r| r["region"] == region)?.clone();
    r["promotions"].as_array().unwrap().iter().find(|p| p["dataset"] == dataset).cloned()
}

fn events(endpoint: &str, region: &str) -> Vec<serde_json::Value> {
    let s = cli_json(endpoint, &["failover", "status", "--events", "50"]);
    let r = s["regions"].as_array().unwrap().iter().find(|r| r["region"] == region).unwrap().clone();
    r["events"].as_array().unwrap().clone()
}

#[test]
fn a_cut_off_home_fails_over_to_its_first_target_and_takes_its_writes_back_on_return() {
    let demo = PolicyDemo::start(POLICY);
    let (us, eu, ap) = (demo.us.clone(), demo.eu.clone(), demo.ap.clone());

    // An operator's promotion while the home answers is refused, unless forced; forced, it
    // stays until ended, and writes still go to the home while it answers.
    let (ok, out, err) = cli(&us, &["failover", "promote", "ledger", "eu-west"]);
    assert!(!ok && err.contains("promotion_refused") && err.contains("not marked down"), "{out}{err}");
    let (ok, out, err) = cli(&us, &["failover", "promote", "ledger", "ap-south", "--force"]);
    assert!(!ok && err.contains("promotion_refused") && err.contains("failover.order"), "{out}{err}");
    let (ok, out, err) = cli(&us, &["failover", "promote", "ledger", "eu-west", "--force"]);
    assert!(ok && out.contains("epoch 1") && out.contains("forced"), "{out}{err}");
    let (ok, out, err) = cli(&ap, &["put", "ledger", "l1", "1"]);
    assert!(ok && out.contains("served by us-east/"), "the home answers, so it takes the write: {out}{err}");
    let (ok, out, err) = cli(&ap, &["failover", "end", "ledger", "eu-west"]);
    assert!(ok && out.contains("ended"), "{out}{err}");
    assert!(promotion(&us, "eu-west", "ledger").unwrap()["ended_ms"].is_u64());

    let (ok, out, err) = cli(&us, &["put", "orders", "o1", "\"before\""]);
    assert!(ok, "{out}{err}");
    for at in [&eu, &ap] {
        wait_for(|| cli(at, &["get", "orders", "o1", "--consistency", "local"]).0, "o1 in every mirror");
    }

    // us-east cut off from both other regions: once eu-west's probes have had it down for
    // promote_after_ms, eu-west (first in the failover order) promotes itself.
    for other in ["eu-west", "ap-south"] {
        let (ok, out, err) = cli(&eu, &["chaos", "partition", "us-east", other]);
        assert!(ok, "{out}{err}");
    }
    wait_for(
        || promotion(&eu, "eu-west", "orders").is_some_and(|p| p["ended_ms"].is_null()),
        "eu-west promoted for orders",
    );
    let p = promotion(&eu, "eu-west", "orders").unwrap();
    assert_eq!((p["epoch"].as_u64(), p["manual"].as_bool()), (Some(1), Some(false)), "{p}");
    assert!(p["lag_ms"].as_u64().is_some_and(|l| l <= 30_000), "promoted within the rpo: {p}");
    assert!(events(&eu, "eu-west").iter().any(|e| e["kind"] == "promoted" && e["dataset"] == "orders"));
    assert!(promotion(&eu, "ap-south", "orders").is_none(), "only the first target up promotes");

    // Writes from anywhere but the cut-off home go to the stand-in, and say so.
    let (ok, out, err) = cli(&ap, &["put", "orders", "o2", "\"during\""]);
    assert!(ok && out.contains("served by eu-west/") && out.contains("promoted"), "{out}{err}");
    assert!(out.contains("passed over us-east ("), "{out}");
    let (ok, out, err) = cli(&eu, &["put", "orders", "o1", "\"changed during\""]);
    assert!(ok && out.contains("served by eu-west/"), "{out}{err}");
    // ledger (no rpo) failed over to eu-west too; an operator who ends that promotion while
    // the home is still away is not overruled by the next round.
    wait_for(
        || promotion(&eu, "eu-west", "ledger").is_some_and(|p| p["ended_ms"].is_null() && p["epoch"] == 2),
        "eu-west promoted for ledger (epoch 2, after the operator's epoch 1)",
    );
    let (ok, out, err) = cli(&eu, &["failover", "end", "ledger", "eu-west"]);
    assert!(ok && out.contains("ended"), "{out}{err}");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        promotion(&eu, "eu-west", "ledger").unwrap()["ended_ms"].is_u64(),
        "promoted again after an operator's end"
    );
    let (ok, out, err) = cli(&ap, &["put", "ledger", "l2", "2"]);
    assert!(!ok && err.contains("region_unavailable") && err.contains("not-promoted"), "{out}{err}");
    // Reads keep working from the copies.
    let (ok, out, err) = cli(&ap, &["get", "orders", "o2", "--consistency", "eventual"]);
    assert!(ok || err.contains("key_not_found"), "{out}{err}");

    // The home returns: the stand-in ends its promotion, and writes go home again.
    let (ok, _, err) = cli(&eu, &["chaos", "heal"]);
    assert!(ok, "{err}");
    wait_for(
        || promotion(&eu, "eu-west", "orders").is_some_and(|p| p["ended_ms"].is_u64()),
        "eu-west's promotion for orders ended",
    );
    assert!(events(&eu, "eu-west").iter().any(|e| e["kind"] == "ended" && e["dataset"] == "orders"));
    wait_for(
        || {
            let (ok, out, _) = cli(&ap, &["put", "orders", "o3", "\"after\""]);
            ok && out.contains("served by us-east/")
        },
        "writes to orders served by us-east again",
    );
    // What the stand-in took reaches the home.
    wait_for(
        || {
            let (ok, out, _) = cli(&us, &["get", "orders", "o2", "--consistency", "local"]);
            ok && out.trim() == "\"during\""
        },
        "o2, written during the outage, in us-east",
    );
    wait_for(
        || {
            let (ok, out, _) = cli(&us, &["get", "orders", "o1", "--consistency", "local"]);
            ok && out.trim() == "\"changed during\""
        },
        "o1's change from the outage in us-east",
    );
}
