//! `docs/policy.schema.json` is generated from the document types; this keeps the published
//! file in step. To regenerate: `MERIDIAN_BLESS=1 cargo test -p meridian-policy --test schema`.

use std::path::Path;

#[test]
fn the_published_schema_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/policy.schema.json");
    let current = format!("{}\n", serde_json::to_string_pretty(&meridian_policy::json_schema()).unwrap());
    if std::env::var_os("MERIDIAN_BLESS").is_some() {
        std::fs::write(&path, &current).unwrap();
    }
    let published = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(published == current, "docs/policy.schema.json is stale; regenerate it with MERIDIAN_BLESS=1");
}

#[test]
fn the_schema_describes_every_dataset_field() {
    let schema = meridian_policy::json_schema();
    let rules = &schema["$defs"]["DatasetSpec"];
    let text = rules.to_string();
    for field in [
        "name",
        "locality",
        "classification",
        "kind",
        "home",
        "allowed",
        "mirrors",
        "sync",
        "conflict",
        "consistency",
        "max_staleness",
        "failover",
        "retention",
        "quarantine",
        "encryption_at_rest",
        "description",
    ] {
        assert!(text.contains(&format!("\"{field}\"")), "the schema's dataset has no {field}: {text}");
    }
    assert_eq!(schema["additionalProperties"], serde_json::Value::Bool(false));
}
