//! Policies in a running cluster, end to end through the CLI and the API against `meridian
//! demo`: residency of restricted data on disk, plan, apply, shadow, history, rollback and
//! explain, and a failed apply that changes nothing.

mod common;

use std::process::Command;

use common::{cli, cli_json, files_contain, Stop, BIN};

use common::put_json as put;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_writes_are_forwarded_home_and_leave_no_bytes_elsewhere() {
    let data = tempfile::tempdir().unwrap();
    let (demo, base, _) = common::start_demo(Some(data.path()));
    let _stop = Stop(demo);
    let us = format!("http://127.0.0.1:{base}");
    let http = reqwest::Client::new();

    // A marker no other byte sequence on disk could contain by chance.
    let marker = format!("restricted-{:016x}", rand::random::<u64>());
    let (status, body) =
        put(&http, &us, &format!("profiles/keys/eu-west%2F{marker}"), &format!("{{\"ssn\":\"{marker}\"}}")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["served_by"]["region"], "eu-west", "{body}");
    assert_eq!(body["served_by"]["reason"], "forwarded-to-home");

    // A key without a prefix takes its home from the `home` parameter; without one it is refused.
    let (status, body) = put(&http, &us, "profiles/keys/bob?home=ap-south", "{\"n\":1}").await;
    assert_eq!((status, body["served_by"]["region"].as_str()), (201, Some("ap-south")), "{body}");
    let (status, body) = put(&http, &us, "profiles/keys/bob?home=ap-south", "{\"n\":2}").await;
    assert_eq!(status, 200, "the same home again is an ordinary update: {body}");
    let (status, body) = put(&http, &us, "profiles/keys/bob?home=us-east", "{\"n\":3}").await;
    assert_eq!((status, body["code"].as_str()), (409, Some("home_immutable")), "a home never changes: {body}");
    // A tombstone is not a home: delete bob, re-create him in eu-west, and ap-south's
    // tombstone must not let a write make him live in two regions.
    let resp = http.delete(format!("{us}/v1/datasets/profiles/keys/bob?home=ap-south")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (status, body) = put(&http, &us, "profiles/keys/bob?home=eu-west", "{\"n\":4}").await;
    assert_eq!((status, body["served_by"]["region"].as_str()), (201, Some("eu-west")), "{body}");
    let (status, body) = put(&http, &us, "profiles/keys/bob?home=ap-south", "{\"n\":5}").await;
    assert_eq!((status, body["code"].as_str()), (409, Some("home_immutable")), "{body}");
    let (status, body) = put(&http, &us, "profiles/keys/carol", "{}").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("home_unknown")), "{body}");
    let (status, body) = put(&http, &us, "profiles/keys/eu-west%2Fdave?home=us-east", "{}").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("home_unknown")), "prefix and attribute disagree: {body}");

    // Read back through a third region: refused, the value would have to come to ap-south;
    // through a node of its home it is served.
    let ap = format!("http://127.0.0.1:{}", base + 6);
    let resp = http.get(format!("{ap}/v1/datasets/profiles/keys/eu-west%2F{marker}")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "residency_refused", "{body}");
    assert!(body["hint"].as_str().unwrap().contains("eu-west"), "{body}");
    let eu = format!("http://127.0.0.1:{}", base + 3);
    let got: serde_json::Value = http
        .get(format!("{eu}/v1/datasets/profiles/keys/eu-west%2F{marker}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["value"]["ssn"], marker.as_str(), "{got}");

    // Nodes 1-3 are us-east, 4-6 eu-west, 7-9 ap-south.
    let needle = marker.as_bytes();
    let holders: Vec<u64> =
        (4..=6).filter(|id| files_contain(&data.path().join(format!("node-{id}")), needle)).collect();
    assert!(holders.len() >= 2, "a majority of eu-west's zones must hold the write durably; found it on {holders:?}");
    for id in (1..=3).chain(7..=9) {
        assert!(
            !files_contain(&data.path().join(format!("node-{id}")), needle),
            "restricted bytes found in node {id}'s data directory, outside eu-west"
        );
    }
}

const NEW_POLICY: &str = r#"
[[dataset]]
name = "catalog"
locality = "global"
classification = "public"
home = ["us-east"]
mirrors = ["eu-west"]

[[dataset]]
name = "orders"
locality = "regional"
classification = "confidential"
home = ["eu-west"]
retention = "400d"

[[dataset]]
name = "profiles"
locality = "user"
classification = "restricted"

[[dataset]]
name = "users"
locality = "regional"
classification = "internal"
home = ["ap-south"]
"#;

#[test]
fn plan_apply_shadow_history_rollback_and_explain() {
    let dir = tempfile::tempdir().unwrap();
    let (demo, base, banner) = common::start_demo(None);
    let _stop = Stop(demo);
    let us = format!("http://127.0.0.1:{base}");
    let eu = format!("http://127.0.0.1:{}", base + 3);
    let first = banner.iter().find_map(|l| l.strip_prefix("Active policy ")).expect("the banner names the policy");
    let first_short = first.split_whitespace().next().unwrap().to_string();

    let history = cli_json(&us, &["policy", "history"]);
    assert_eq!(history["entries"].as_array().unwrap().len(), 1);
    let first_id = history["entries"][0]["version"].as_str().unwrap().to_string();
    assert!(first_id.starts_with(&first_short));

    // Plan: nothing changes, and the plan says what would.
    let file = dir.path().join("new.toml");
    std::fs::write(&file, NEW_POLICY).unwrap();
    let plan = cli_json(&us, &["policy", "plan", file.to_str().unwrap()]);
    assert_eq!(plan["current"], first_id.as_str());
    assert_eq!(plan["same_version"], false);
    let ds = |name: &str| plan["datasets"].as_array().unwrap().iter().find(|d| d["dataset"] == name).cloned().unwrap();
    assert_eq!(ds("users")["change"], "added");
    assert_eq!(ds("carts")["change"], "removed");
    let catalog = ds("catalog");
    assert_eq!(catalog["losing"][0]["region"], "ap-south", "{catalog}");
    let closed = plan["links_closed"].as_array().unwrap();
    assert!(
        closed.iter().any(|l| l["dataset"] == "catalog" && l["from"] == "us-east" && l["to"] == "ap-south"),
        "{plan}"
    );
    let (ok, out, _) = cli(&us, &["policy", "plan", file.to_str().unwrap()]);
    assert!(ok && out.contains("users") && out.contains("added"), "{out}");
    assert_eq!(cli_json(&us, &["policy", "history"])["entries"].as_array().unwrap().len(), 1, "plan changed something");
    let (ok, _, err) = cli(&us, &["put", "users", "u1", "1"]);
    assert!(!ok && err.contains("dataset_not_in_policy"), "{err}");

    // A broken document: every problem reported, nothing changed.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[dataset]]\nname = \"x\"\nlocality = \"global\"\nclassification = \"restricted\"\nhome = [\"us-east\", \"eu-west\"]\nmirrors = \"all-allowed\"\n").unwrap();
    let (ok, _, err) = cli(&us, &["policy", "apply", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("policy_invalid"), "{err}");
    assert!(err.contains("error[restricted_single_home]") && err.contains("error[restricted_mirrors]"), "{err}");
    assert_eq!(
        cli_json(&us, &["policy", "history"])["entries"].as_array().unwrap().len(),
        1,
        "a failed apply changed something"
    );

    // Apply, from a node of another region: every region's copy follows.
    let applied = cli_json(&eu, &["policy", "apply", file.to_str().unwrap()]);
    let second_id = applied["entry"]["version"].as_str().unwrap().to_string();
    assert_eq!(applied["entry"]["epoch"], 2);
    assert_eq!(applied["pending"].as_array().unwrap().len(), 0, "{applied}");
    let status = cli_json(&us, &["policy", "status"]);
    for r in status["regions"].as_array().unwrap() {
        assert_eq!(r["epoch"], 2, "{status}");
    }
    let (ok, out, err) = cli(&us, &["put", "users", "u1", "1", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["served_by"]["region"], "ap-south", "users is homed in ap-south now: {v}");
    let (ok, _, err) = cli(&us, &["put", "carts", "c1", "[]"]);
    assert!(!ok && err.contains("dataset_not_in_policy"), "carts left the policy: {err}");

    // Explain: where copies live, and why not elsewhere.
    let e = cli_json(&us, &["policy", "explain", "catalog", "sku-1"]);
    assert_eq!(e["version"], second_id.as_str());
    assert_eq!(e["governed_by"], "enforced");
    let role = |e: &serde_json::Value, r: &str| {
        e["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["region"] == r)
            .map(|d| (d["role"].clone(), d["reason_code"].clone()))
            .unwrap()
    };
    assert_eq!(role(&e, "us-east").0, "home");
    assert_eq!(role(&e, "eu-west").0, "mirror");
    assert_eq!(role(&e, "ap-south").1, "not_a_mirror");
    let e = cli_json(&us, &["policy", "explain", "orders", "o-1"]);
    assert_eq!(role(&e, "us-east").1, "regional_stays_home", "{e}");
    let (ok, out, _) = cli(&us, &["policy", "explain", "profiles", "eu-west/alice"]);
    assert!(ok && out.contains("restricted data stays in its home region"), "{out}");

    // Shadow: a third version evaluated beside the enforced one, acting on nothing.
    let shadow_file = dir.path().join("shadow.toml");
    std::fs::write(&shadow_file, NEW_POLICY.replace("home = [\"ap-south\"]", "home = [\"us-east\"]")).unwrap();
    let applied = cli_json(&us, &["policy", "apply", shadow_file.to_str().unwrap(), "--shadow"]);
    assert_eq!(
        (applied["entry"]["mode"].as_str(), applied["entry"]["base"].as_str()),
        (Some("shadow"), Some(second_id.as_str()))
    );
    let e = cli_json(&us, &["policy", "explain", "users", "u1"]);
    assert_eq!(e["version"], second_id.as_str(), "the enforced version still governs: {e}");
    assert_eq!(e["homes"][0], "ap-south");
    assert_eq!(e["shadow"]["homes"][0], "us-east", "{e}");
    let (ok, out, _) = cli(&us, &["put", "users", "u2", "2", "--json"]);
    assert!(ok && out.contains("ap-south"), "shadow acts on nothing: {out}");
    let metrics = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { reqwest::get(format!("{us}/metrics")).await.unwrap().text().await.unwrap() });
    assert!(metrics.contains("meridian_policy_epoch 3"), "{metrics}");
    assert!(
        metrics.contains("meridian_policy_shadow_reroutes_total 1"),
        "the shadow's other choice is counted: {metrics}"
    );
    assert!(metrics.contains("meridian_policy_refusals_total{kind=\"dataset_not_in_policy\"}"), "{metrics}");

    // Enforce the third version for half the keys: each key is governed by one version.
    let partial = cli_json(&us, &["policy", "apply", shadow_file.to_str().unwrap(), "--percent", "50"]);
    assert_eq!(
        (partial["entry"]["percent"].as_u64(), partial["entry"]["base"].as_str()),
        (Some(50), Some(second_id.as_str()))
    );
    let (mut moved, mut stayed) = (0, 0);
    for i in 0..40 {
        let e = cli_json(&us, &["policy", "explain", "users", &format!("k{i}")]);
        match (e["governed_by"].as_str(), e["homes"][0].as_str()) {
            (Some("rollout"), Some("us-east")) => moved += 1,
            (Some("enforced"), Some("ap-south")) => stayed += 1,
            other => panic!("a key is governed by exactly one version: {other:?} {e}"),
        }
    }
    assert!(moved > 5 && stayed > 5, "50% splits the keys: {moved} moved, {stayed} stayed");
    // Starting another rollout on top would hand the covered half back silently: refused.
    let (ok, _, err) = cli(&us, &["policy", "apply", file.to_str().unwrap(), "--shadow"]);
    assert!(!ok && err.contains("policy_conflict") && err.contains("50%"), "{err}");

    // Rollback to the demo's first version: a new entry pointing at it.
    let short = &first_id[..10];
    let rolled = cli_json(&us, &["policy", "rollback", short]);
    assert_eq!((rolled["entry"]["epoch"].as_u64(), rolled["entry"]["action"].as_str()), (Some(5), Some("rollback")));
    assert_eq!(rolled["entry"]["version"], first_id.as_str());
    let history = cli_json(&us, &["policy", "history"]);
    let epochs: Vec<u64> =
        history["entries"].as_array().unwrap().iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs, [5, 4, 3, 2, 1], "newest first, nothing rewritten");
    let (ok, _, err) = cli(&us, &["put", "users", "u3", "1"]);
    assert!(!ok && err.contains("dataset_not_in_policy"), "{err}");
    let (ok, out, _) = cli(&us, &["policy", "show", short]);
    assert!(ok && out.contains("name = \"carts\""), "show prints the stored text: {out}");
    let (ok, _, err) = cli(&us, &["policy", "rollback", "deadbeef00"]);
    assert!(!ok && err.contains("policy_version_not_found"), "{err}");
    let (ok, out, _) = cli(&us, &["policy", "history"]);
    assert!(ok && out.contains("rollback") && out.contains("shadow"), "{out}");
}

#[test]
fn concurrent_applies_each_commit_whole_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let (demo, base, _) = common::start_demo(None);
    let _stop = Stop(demo);
    // Six applies at once, through nodes of all three regions, each a distinct version.
    let handles: Vec<_> = (0..6u16)
        .map(|i| {
            let file = dir.path().join(format!("p{i}.toml"));
            let text = NEW_POLICY.replacen(
                "name = \"catalog\"",
                &format!("name = \"catalog\"\ndescription = \"writer {i}\""),
                1,
            );
            std::fs::write(&file, text).unwrap();
            let endpoint = format!("http://127.0.0.1:{}", base + (i * 4) % 9);
            let check = Command::new(BIN).args(["policy", "check", "--json", file.to_str().unwrap()]).output().unwrap();
            let version = serde_json::from_slice::<serde_json::Value>(&check.stdout).unwrap()["version"]
                .as_str()
                .unwrap()
                .to_string();
            std::thread::spawn(move || {
                (version, cli(&endpoint, &["policy", "apply", file.to_str().unwrap(), "--json"]))
            })
        })
        .collect();
    let mut won = Vec::new();
    let mut lost = Vec::new();
    for h in handles {
        let (version, (ok, out, err)) = h.join().unwrap();
        if ok {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["entry"]["version"], version.as_str());
            won.push((v["entry"]["epoch"].as_u64().unwrap(), version));
        } else {
            assert!(err.contains("policy_conflict"), "a losing apply must say policy_conflict: {err}");
            lost.push(version);
        }
    }
    assert!(!won.is_empty(), "at least one apply commits");
    won.sort();
    let mut epochs_won: Vec<u64> = won.iter().map(|(e, _)| *e).collect();
    epochs_won.dedup();
    assert_eq!(epochs_won.len(), won.len(), "two applies reported the same epoch: {won:?}");
    let us = format!("http://127.0.0.1:{base}");
    let history = cli_json(&us, &["policy", "history"]);
    let epochs: Vec<u64> =
        history["entries"].as_array().unwrap().iter().map(|e| e["epoch"].as_u64().unwrap()).collect();
    let expected: Vec<u64> = (1..=won.len() as u64 + 1).rev().collect();
    assert_eq!(epochs, expected, "every committed apply is one entry, no gaps, no duplicates (winners: {won:?})");
    let versions: Vec<&str> =
        history["entries"].as_array().unwrap().iter().map(|e| e["version"].as_str().unwrap()).collect();
    for (epoch, version) in &won {
        assert_eq!(versions[versions.len() - *epoch as usize], version.as_str(), "epoch {epoch} holds another version");
    }
    for version in &lost {
        assert!(!versions.contains(&version.as_str()), "a failed apply left its version in the history");
    }
    // Every region converges on the last entry.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let status = cli_json(&us, &["policy", "status"]);
        let last = status["active"]["epoch"].as_u64().unwrap();
        let converged = status["regions"].as_array().unwrap().iter().all(|r| r["epoch"].as_u64() == Some(last));
        if converged {
            // Same epoch is the same entry: every region routes a users key the same way.
            let homes: Vec<serde_json::Value> = (0..3)
                .map(|r| {
                    cli_json(&format!("http://127.0.0.1:{}", base + 3 * r), &["policy", "explain", "users", "k"])
                        ["version"]
                        .clone()
                })
                .collect();
            assert!(homes.iter().all(|v| *v == homes[0]), "regions at one epoch explain different versions: {homes:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "regions did not converge: {status}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn the_policy_survives_a_restart_of_every_node() {
    let data = tempfile::tempdir().unwrap();
    let (demo, base, _) = common::start_demo(Some(data.path()));
    let mut stop = Stop(demo);
    let us = format!("http://127.0.0.1:{base}");
    let file = data.path().join("new.toml");
    std::fs::write(&file, NEW_POLICY).unwrap();
    let applied = cli_json(&us, &["policy", "apply", file.to_str().unwrap()]);
    let version = applied["entry"]["version"].as_str().unwrap().to_string();
    // Stop the whole demo (all nine nodes) and start it again on the same data.
    Command::new("kill").args(["-INT", &stop.0.id().to_string()]).status().unwrap();
    let status = stop.0.wait().unwrap();
    assert!(status.success(), "the demo exited with {status}");
    let (demo, base, banner) = common::start_demo(Some(data.path()));
    let _stop = Stop(demo);
    let us = format!("http://127.0.0.1:{base}");
    assert!(
        banner.iter().any(|l| l.contains("kept from the data directory") && l.contains(&version[..12])),
        "{banner:?}"
    );
    let history = cli_json(&us, &["policy", "history"]);
    assert_eq!(history["entries"].as_array().unwrap().len(), 2);
    // Every node routes by the restored copy: users is homed in ap-south, carts is refused.
    for node in 0..9 {
        let endpoint = format!("http://127.0.0.1:{}", base + node);
        let (ok, out, err) = cli(&endpoint, &["put", "users", &format!("u{node}"), "1", "--json"]);
        assert!(ok && out.contains("ap-south"), "node {node}: {out}{err}");
        let (ok, _, err) = cli(&endpoint, &["put", "carts", "c1", "[]"]);
        assert!(!ok && err.contains("dataset_not_in_policy"), "node {node}: {err}");
    }
}
