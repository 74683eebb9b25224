//! `meridian policy check` as a user runs it: offline, on files, with and without a topology.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_meridian");

fn corpus(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/tests/corpus").join(name).display().to_string()
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run meridian");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_valid_policy_prints_its_version() {
    let (code, out, _) = run(&["policy", "check", &corpus("00-valid-sample.toml")]);
    assert_eq!(code, 0);
    assert!(out.contains("5 dataset(s) and a default, version "), "{out}");
    assert!(out.contains("checked for form only"), "without --config the output says what was not checked: {out}");
    let (code, yaml_out, _) = run(&["policy", "check", &corpus("00-valid-sample-same-content.yaml")]);
    assert_eq!(code, 0);
    let version = |s: &str| s.split("version ").nth(1).unwrap().lines().next().unwrap().to_string();
    assert_eq!(version(&out), version(&yaml_out), "TOML and YAML of one policy are one version");
}

#[test]
fn every_problem_is_reported_with_position_rule_and_hint() {
    let (code, out, err) = run(&["policy", "check", &corpus("41-many-mistakes-at-once.yaml")]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "problems go to stderr: {out}");
    assert!(err.contains("41-many-mistakes-at-once.yaml:8:25: error[encryption_required]"), "{err}");
    assert!(err.contains("41-many-mistakes-at-once.yaml:13:5: error[unknown_field]"), "{err}");
    assert!(err.contains("6 problems found"), "{err}");
    assert!(err.contains("error: policy_invalid:"), "the last line carries the stable code: {err}");

    let (code, out, _) = run(&["policy", "check", "--json", &corpus("10-duplicate-region.toml")]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["problems"][0]["rule"], "duplicate_region");
    assert_eq!((v["problems"][0]["line"].as_u64(), v["problems"][0]["column"].as_u64()), (Some(6), Some(35)));
    assert!(v["problems"][0]["hint"].as_str().unwrap().contains("6:12"));
}

#[test]
fn with_a_cluster_configuration_region_names_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, meridian_node::config::ClusterConfig::demo(7000).to_toml()).unwrap();
    // The sample names eu-central, which the demo topology does not have.
    let (code, _, err) =
        run(&["policy", "check", "--config", config.to_str().unwrap(), &corpus("00-valid-sample.toml")]);
    assert_eq!(code, 1);
    assert!(err.contains("error[unknown_region]: allowed names \"eu-central\""), "{err}");
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, "[[dataset]]\nname = \"catalog\"\nlocality = \"global\"\nclassification = \"public\"\nhome = [\"us-east\"]\nmirrors = \"all-allowed\"\n").unwrap();
    let (code, out, err) = run(&["policy", "check", "--config", config.to_str().unwrap(), policy.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("form only"), "{out}");
}

#[test]
fn unreadable_and_oversized_files_are_clear_errors() {
    let (code, _, err) = run(&["policy", "check", "/nonexistent/policy.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("open policy file /nonexistent/policy.toml"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.toml");
    std::fs::write(&big, "#".repeat(600 * 1024)).unwrap();
    let (code, _, err) = run(&["policy", "check", big.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("document_too_large"), "{err}");
}
