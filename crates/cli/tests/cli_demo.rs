//! End to end: the CLI against a running `meridian demo`, as a user would drive it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::cli;

#[test]
fn cli_against_a_running_demo() {
    let (mut demo, base, banner) = common::start_demo(None);
    assert!(banner.iter().any(|l| l.contains("us-east") && l.contains(&format!("127.0.0.1:{base}"))), "{banner:?}");
    let us = format!("http://127.0.0.1:{base}");
    let eu = format!("http://127.0.0.1:{}", base + 4);

    let (ok, out, err) = cli(&us, &["put", "catalog", "u1", r#"{"name":"Ada"}"#]);
    assert!(ok, "{err}");
    assert!(out.starts_with("created catalog/u1 version "), "{out}");

    let (ok, out, err) = cli(&us, &["get", "catalog", "u1"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), r#"{"name":"Ada"}"#);

    let (ok, out, _) = cli(&us, &["get", "catalog", "u1", "--json", "--consistency", "local"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["value"]["name"], "Ada");
    let etag = v["version"]["etag"].as_str().unwrap().to_owned();

    // Conditional writes and their errors, code first in the message.
    let (ok, _, err) = cli(&us, &["put", "catalog", "u1", "1", "--if-match", "not-a-version"]);
    assert!(!ok && err.contains("invalid_version"), "{err}");
    let (ok, _, err) = cli(&us, &["put", "catalog", "u1", "1", "--create-only"]);
    assert!(!ok && err.contains("precondition_failed") && err.contains(&etag), "{err}");
    let (ok, out, err) = cli(&us, &["put", "catalog", "u1", r#"{"name":"Bob"}"#, "--if-match", &etag]);
    assert!(ok && out.starts_with("updated"), "{out}{err}");
    let (ok, _, err) = cli(&us, &["put", "catalog", "u2", "not json"]);
    assert!(!ok && err.contains("malformed_json"), "{err}");
    let (ok, _, err) = cli(&us, &["put", "Users", "u2", "1"]);
    assert!(!ok && err.contains("invalid_dataset_name"), "{err}");

    // Any node routes to the key's home: eu-west answers from us-east, the catalog's home.
    let (ok, out, err) = cli(&eu, &["get", "catalog", "u1", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["served_by"]["region"].as_str(), v["served_by"]["reason"].as_str()),
        (Some("us-east"), Some("forwarded-to-home"))
    );
    // A dataset the demo policy does not name is refused, with the code first.
    let (ok, _, err) = cli(&us, &["put", "users", "u1", "1"]);
    assert!(!ok && err.contains("dataset_not_in_policy"), "{err}");

    let (ok, out, _) = cli(&us, &["list", "catalog"]);
    assert!(ok && out.contains("u1") && out.contains("1 keys"), "{out}");

    let (ok, out, _) = cli(&eu, &["cluster", "status", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let regions = v["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 3);
    for r in regions {
        assert_eq!(r["reachable"], true, "{r}");
        assert!(r["leader"].as_u64().is_some(), "{r}");
    }
    let (ok, out, _) = cli(&eu, &["cluster", "status"]);
    assert!(ok && out.contains("leader") && out.contains("ap-south"), "{out}");

    // Piped into a reader that goes away (`| head`): the CLI stops quietly, no panic.
    let mut child = Command::new(common::BIN)
        .args(["replication", "status", "--endpoint", &eu])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");

    let (ok, _, _) = cli(&us, &["delete", "catalog", "u1"]);
    assert!(ok);
    let (ok, _, err) = cli(&us, &["get", "catalog", "u1"]);
    assert!(!ok && err.contains("key_not_found"), "{err}");

    // A node that is not there: a clear transport error, non-zero exit.
    let (ok, _, err) = cli("http://127.0.0.1:1", &["get", "catalog", "u1"]);
    assert!(!ok && err.contains("could not reach"), "{err}");

    // Ctrl-C stops the demo cleanly.
    Command::new("kill").args(["-INT", &demo.id().to_string()]).status().unwrap();
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = demo.try_wait().unwrap() {
            assert!(status.success(), "demo exited with {status}");
            break;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = demo.kill();
            panic!("the demo did not stop on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
