//! Snapshot tests of the validator: every file in `tests/corpus/` is checked against the
//! four-region test topology and its report compared with the `.expected` file beside it.
//!
//! To accept new output after a deliberate change: `MERIDIAN_BLESS=1 cargo test -p
//! meridian-policy --test validator_corpus`, then read the diff before committing it.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use meridian_policy::{Format, Policy, Rule};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn inputs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("toml" | "yaml" | "yml")))
        .collect();
    files.sort();
    files
}

/// What the validator says about one file, as `meridian policy check` prints it.
fn render(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path.file_name().unwrap().to_str().unwrap();
    let topology = support::topology_of(&support::REGIONS);
    match Policy::parse(&text, Format::from_file_name(name), name, Some(&topology)) {
        Ok(p) => format!("ok: {} dataset(s), version {}\n", p.datasets().count(), p.id().short()),
        Err(report) => format!("{report}\n"),
    }
}

#[test]
fn every_corpus_file_matches_its_snapshot() {
    let bless = std::env::var_os("MERIDIAN_BLESS").is_some();
    let mut mismatches = Vec::new();
    for input in inputs() {
        let expected_path = input.with_extension(format!("{}.expected", input.extension().unwrap().to_str().unwrap()));
        let actual = render(&input);
        if bless {
            std::fs::write(&expected_path, &actual).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} has no snapshot; run with MERIDIAN_BLESS=1", input.display()));
        if expected != actual {
            mismatches.push(format!("--- {}\nexpected:\n{expected}actual:\n{actual}", input.display()));
        }
    }
    assert!(mismatches.is_empty(), "{} snapshot(s) differ:\n{}", mismatches.len(), mismatches.join("\n"));
}

#[test]
fn the_corpus_covers_at_least_25_distinct_mistakes() {
    let topology = support::topology_of(&support::REGIONS);
    let mut rules = BTreeSet::new();
    let mut failing_files = 0;
    for input in inputs() {
        let text = std::fs::read_to_string(&input).unwrap();
        let name = input.file_name().unwrap().to_str().unwrap();
        if let Err(report) = Policy::parse(&text, Format::from_file_name(name), name, Some(&topology)) {
            failing_files += 1;
            for d in &report.diagnostics {
                assert!(d.pos.is_some() || d.rule == Rule::DocumentTooLarge, "{name}: {d:?} has no position");
                rules.insert(d.rule);
            }
        }
    }
    assert!(failing_files >= 25, "only {failing_files} corpus files have mistakes");
    assert!(rules.len() >= 25, "the corpus exercises only {} rules: {rules:?}", rules.len());
}

#[test]
fn every_rule_code_is_documented() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/policy.md")).unwrap();
    let missing: Vec<&str> = Rule::ALL.iter().map(|r| r.code()).filter(|c| !doc.contains(&format!("`{c}`"))).collect();
    assert!(missing.is_empty(), "docs/policy.md does not list: {missing:?}");
}
