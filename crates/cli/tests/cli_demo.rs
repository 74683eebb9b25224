//! End to end: the CLI against a running `meridian demo`, as a user would drive it.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::BIN;

/// A base port whose 9 API ports and 9 peer ports (+100) are all free.
fn free_base_port() -> u16 {
    for attempt in 0..50u16 {
        let base = 20_000 + (std::process::id() as u16 % 200) * 50 + attempt * 211 % 9000;
        let ok = (0..9).all(|i| {
            TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && TcpListener::bind(("127.0.0.1", base + 100 + i)).is_ok()
        });
        if ok {
            return base;
        }
    }
    panic!("no free port range for the demo");
}

fn cli(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).args(["--endpoint", endpoint]).output().expect("run the CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_against_a_running_demo() {
    let base = free_base_port();
    let mut demo = Command::new(BIN)
        .args(["demo", "--base-port", &base.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let stdout = demo.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut banner = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                let done = line.contains("Press Ctrl-C");
                banner.push(line);
                if done {
                    break;
                }
            }
            Err(_) => {
                let _ = demo.kill();
                panic!("the demo did not come up; it printed: {banner:?}");
            }
        }
    }
    assert!(banner.iter().any(|l| l.contains("us-east") && l.contains(&format!("127.0.0.1:{base}"))), "{banner:?}");
    let us = format!("http://127.0.0.1:{base}");
    let eu = format!("http://127.0.0.1:{}", base + 4);

    let (ok, out, err) = cli(&us, &["put", "users", "u1", r#"{"name":"Ada"}"#]);
    assert!(ok, "{err}");
    assert!(out.starts_with("created users/u1 version "), "{out}");

    let (ok, out, err) = cli(&us, &["get", "users", "u1"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), r#"{"name":"Ada"}"#);

    let (ok, out, _) = cli(&us, &["get", "users", "u1", "--json", "--consistency", "local"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["value"]["name"], "Ada");
    let etag = v["version"]["etag"].as_str().unwrap().to_owned();

    // Conditional writes and their errors, code first in the message.
    let (ok, _, err) = cli(&us, &["put", "users", "u1", "1", "--if-match", "not-a-version"]);
    assert!(!ok && err.contains("invalid_version"), "{err}");
    let (ok, _, err) = cli(&us, &["put", "users", "u1", "1", "--create-only"]);
    assert!(!ok && err.contains("precondition_failed") && err.contains(&etag), "{err}");
    let (ok, out, err) = cli(&us, &["put", "users", "u1", r#"{"name":"Bob"}"#, "--if-match", &etag]);
    assert!(ok && out.starts_with("updated"), "{out}{err}");
    let (ok, _, err) = cli(&us, &["put", "users", "u2", "not json"]);
    assert!(!ok && err.contains("malformed_json"), "{err}");
    let (ok, _, err) = cli(&us, &["put", "Users", "u2", "1"]);
    assert!(!ok && err.contains("invalid_dataset_name"), "{err}");

    // Regions are separate groups: eu-west does not hold us-east's key.
    let (ok, _, err) = cli(&eu, &["get", "users", "u1"]);
    assert!(!ok && err.contains("key_not_found"), "{err}");

    let (ok, out, _) = cli(&us, &["list", "users"]);
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

    let (ok, _, _) = cli(&us, &["delete", "users", "u1"]);
    assert!(ok);
    let (ok, _, err) = cli(&us, &["get", "users", "u1"]);
    assert!(!ok && err.contains("key_not_found"), "{err}");

    // A node that is not there: a clear transport error, non-zero exit.
    let (ok, _, err) = cli("http://127.0.0.1:1", &["get", "users", "u1"]);
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
