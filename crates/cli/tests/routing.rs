//! Routing through the real binary: a read that names no level reads at its dataset's; a
//! write taken in a region that is not a home goes to the nearest home that region's probes
//! find up, and to another home once that one is cut off.

mod common;

use std::time::{Duration, Instant};

use common::{cli, cli_json, Stop};

/// Two homes, listed farther first as seen from eu-west (ap-south 75 ms one way, us-east 40).
const POLICY: &str = r#"format = 1

[[dataset]]
name = "notes"
locality = "global"
classification = "internal"
home = ["ap-south", "us-east"]
conflict = "lww"

[[dataset]]
name = "feed"
locality = "global"
classification = "public"
home = ["us-east"]
mirrors = "all-allowed"
consistency = "local"
"#;

fn wait_for(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The reachability of `region` as the node at `endpoint` sees it.
fn seen(endpoint: &str, region: &str) -> String {
    let s = cli_json(endpoint, &["cluster", "status"]);
    let r = s["regions"].as_array().unwrap().iter().find(|r| r["name"] == region).unwrap().clone();
    r["health"]["reachability"].as_str().unwrap_or("").to_owned()
}

#[test]
fn reads_take_their_datasets_level_and_writes_go_to_the_nearest_home_up() {
    let (demo, base, _) = common::start_demo(None);
    let _stop = Stop(demo);
    let us = format!("http://127.0.0.1:{base}");
    let eu = format!("http://127.0.0.1:{}", base + 4);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, POLICY).unwrap();
    let applied = cli_json(&us, &["policy", "apply", file.to_str().unwrap()]);
    assert_eq!(applied["pending"], serde_json::json!([]), "every region holds the policy: {applied}");

    // A read that names no level reads at the dataset's: feed's is local, so a mirror serves
    // it; notes names none, so strong, from a home's leader.
    let ap = format!("http://127.0.0.1:{}", base + 7);
    let (ok, _, err) = cli(&us, &["put", "feed", "f1", "\"hello\""]);
    assert!(ok, "{err}");
    wait_for(
        || {
            let (ok, _, err) = cli(&ap, &["get", "feed", "f1"]);
            ok && err.contains("served by ap-south/") && err.contains(", local)")
        },
        "feed/f1 served by ap-south's copy at the dataset's default level",
    );
    let (ok, _, err) = cli(&ap, &["get", "feed", "f1", "--consistency", "strong"]);
    assert!(ok && err.contains("served by us-east/"), "a level named wins over the default: {err}");
    let (ok, out, err) = cli(&us, &["get", "feed", "f1", "--consistency", "session"]);
    assert!(!ok && err.contains("invalid_consistency"), "{out}{err}");

    wait_for(|| seen(&eu, "us-east") == "up" && seen(&eu, "ap-south") == "up", "eu-west to find both homes up");
    // Both up: the nearer home takes it, not the first listed.
    wait_for(
        || {
            let (ok, out, _) = cli(&eu, &["put", "notes", "n1", "1"]);
            ok && out.contains("served by us-east/")
        },
        "a write through eu-west served in us-east (policy applied there, nearest home)",
    );

    // Cut eu-west from us-east: once eu-west's probes mark us-east down, its writes go to
    // ap-south instead of failing.
    let (ok, out, err) = cli(&eu, &["chaos", "partition", "eu-west", "us-east"]);
    assert!(ok, "{out}{err}");
    wait_for(|| seen(&eu, "us-east") == "down", "eu-west to find us-east down");
    let (ok, out, err) = cli(&eu, &["put", "notes", "n2", "2"]);
    assert!(ok && out.contains("served by ap-south/") && out.contains("forwarded-to-home"), "{out}{err}");
    // ap-south, not cut from us-east, still sends its own writes nowhere else: it is a home.
    let (ok, out, err) = cli(&ap, &["put", "notes", "n3", "3"]);
    assert!(ok && out.contains("served by ap-south/"), "{out}{err}");

    // Healed: back to the nearer home once the probes say it is up again.
    let (ok, _, err) = cli(&eu, &["chaos", "heal"]);
    assert!(ok, "{err}");
    wait_for(|| seen(&eu, "us-east") == "up", "eu-west to find us-east up again");
    let (ok, out, err) = cli(&eu, &["put", "notes", "n4", "4"]);
    assert!(ok && out.contains("served by us-east/"), "{out}{err}");
    let (ok, _, err) = cli(&eu, &["get", "notes", "n4"]);
    assert!(ok && err.contains("served by us-east/") && err.contains("forwarded-to-home"), "strong by default: {err}");
    // Every write reached both homes.
    for key in ["n1", "n2", "n3", "n4"] {
        for home in [&us, &ap] {
            wait_for(
                || cli(home, &["get", "notes", key, "--consistency", "local"]).0,
                &format!("{key} in the home at {home}"),
            );
        }
    }
}
