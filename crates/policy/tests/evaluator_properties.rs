//! Property tests of the evaluator over generated policies: determinism, and the residency
//! invariants every consumer of a placement relies on.

mod support;

use meridian_core::{DatasetName, Key, RegionId};
use meridian_policy::{
    evaluate, Classification, Format, ObjectAttributes, Placement, PlacementError, Policy, QuarantineState,
    QuarantineTag, Role,
};
use proptest::prelude::*;

/// One generated dataset, rendered both as TOML and as JSON (which is YAML).
#[derive(Debug, Clone)]
struct Spec {
    locality: &'static str,
    classification: &'static str,
    kind: &'static str,
    home: Vec<&'static str>,
    allowed: Option<Vec<&'static str>>,
    mirrors: Option<Result<Vec<&'static str>, ()>>,
    conflict: Option<&'static str>,
    failover: Option<Vec<&'static str>>,
    hold: bool,
}

fn subset() -> impl Strategy<Value = Vec<&'static str>> {
    proptest::sample::subsequence(support::REGIONS.to_vec(), 0..=support::REGIONS.len()).prop_shuffle()
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::sample::select(vec!["global", "regional", "user"]),
        prop::sample::select(vec!["public", "internal", "confidential", "restricted"]),
        prop::sample::select(vec!["document", "counter", "set", "map"]),
        subset(),
        prop::option::of(subset()),
        prop::option::of(prop_oneof![subset().prop_map(Ok), Just(Err(()))]),
        prop::option::of(prop::sample::select(vec!["lww", "crdt", "siblings"])),
        prop::option::of(subset()),
        any::<bool>(),
    )
        .prop_map(|(locality, classification, kind, home, allowed, mirrors, conflict, failover, hold)| Spec {
            locality,
            classification,
            kind,
            // User-homed datasets must not name homes; the others usually do.
            home: if locality == "user" { Vec::new() } else { home },
            allowed,
            mirrors,
            conflict,
            failover: failover.filter(|f| !f.is_empty()),
            hold,
        })
}

fn list(v: &[&str]) -> String {
    format!("[{}]", v.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", "))
}

impl Spec {
    /// `(key, value)` pairs in a fixed order; values are already TOML/JSON literals.
    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("name", "\"ds\"".to_string()),
            ("locality", format!("\"{}\"", self.locality)),
            ("classification", format!("\"{}\"", self.classification)),
            ("kind", format!("\"{}\"", self.kind)),
        ];
        if !self.home.is_empty() {
            f.push(("home", list(&self.home)));
        }
        if let Some(a) = &self.allowed {
            f.push(("allowed", list(a)));
        }
        match &self.mirrors {
            Some(Ok(m)) => f.push(("mirrors", list(m))),
            Some(Err(())) => f.push(("mirrors", "\"all-allowed\"".into())),
            None => {}
        }
        if let Some(c) = self.conflict {
            f.push(("conflict", format!("\"{c}\"")));
        }
        f
    }

    fn toml(&self) -> String {
        let mut s = String::from("[[dataset]]\n");
        for (k, v) in self.fields() {
            s.push_str(&format!("{k} = {v}\n"));
        }
        if let Some(order) = &self.failover {
            s.push_str(&format!("failover = {{ order = {} }}\n", list(order)));
        }
        s.push_str(&format!("quarantine = {{ hold = {} }}\n", self.hold));
        s
    }

    /// The same document as JSON, read through the YAML parser, fields in reverse order.
    fn yaml(&self) -> String {
        let mut parts: Vec<String> = self.fields().into_iter().rev().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        if let Some(order) = &self.failover {
            parts.push(format!("\"failover\": {{\"order\": {}}}", list(order)));
        }
        parts.push(format!("\"quarantine\": {{\"hold\": {}}}", self.hold));
        format!("{{\"dataset\": [{{{}}}]}}", parts.join(", "))
    }
}

fn key_and_attrs() -> impl Strategy<Value = (String, ObjectAttributes)> {
    let region = prop::sample::select(support::REGIONS.to_vec());
    (
        prop::option::of(region.clone()),
        "[a-z0-9]{1,8}",
        prop::option::of(region.clone()),
        prop::option::of(region),
        prop::sample::select(vec![QuarantineTag::None, QuarantineTag::Held, QuarantineTag::Released]),
    )
        .prop_map(|(prefix, rest, home, origin, quarantine)| {
            let key = match prefix {
                Some(p) => format!("{p}/{rest}"),
                None => rest,
            };
            let r = |s: &str| RegionId::new(s).unwrap();
            (key, ObjectAttributes { home: home.map(r), origin: origin.map(r), quarantine })
        })
}

/// The invariants every placement keeps.
fn check_invariants(p: &Placement, topology_regions: &[RegionId]) -> Result<(), TestCaseError> {
    prop_assert!(!p.homes.is_empty(), "a placement always has a home");
    for h in &p.homes {
        prop_assert!(p.allowed.contains(h), "home {h} is not allowed: {p:?}");
    }
    for m in &p.mirrors {
        prop_assert!(p.allowed.contains(m), "mirror {m} is not allowed: {p:?}");
        prop_assert!(!p.homes.contains(m), "mirror {m} is also a home");
    }
    for f in &p.failover {
        prop_assert!(p.allowed.contains(f) && p.holds_copy(f), "failover {f} is not an allowed copy");
    }
    for l in &p.links {
        prop_assert!(p.homes.contains(&l.from), "link from a region that is not a home: {l:?}");
        prop_assert!(p.allowed.contains(&l.to) && p.holds_copy(&l.to), "link to {} which may not hold a copy", l.to);
        prop_assert!(l.from != l.to);
    }
    for r in &p.allowed {
        prop_assert!(topology_regions.contains(r));
    }
    if p.classification == Classification::Restricted {
        prop_assert!(p.mirrors.is_empty(), "restricted data has a mirror: {p:?}");
        prop_assert!(p.links.is_empty(), "restricted data has a link: {p:?}");
        prop_assert_eq!(p.homes.len(), 1);
        prop_assert_eq!(&p.allowed, &p.homes, "restricted data is allowed beyond its home");
    }
    if let QuarantineState::Held { .. } = p.quarantine {
        prop_assert!(p.mirrors.is_empty() && p.homes.len() == 1, "a held object left its origin: {p:?}");
    }
    prop_assert_eq!(p.regions.len(), topology_regions.len());
    for d in &p.regions {
        let expected = if p.homes.contains(&d.region) {
            Role::Home
        } else if p.mirrors.contains(&d.region) {
            Role::Mirror
        } else {
            Role::None
        };
        prop_assert_eq!(d.role, expected, "explain disagrees with the placement for {}", d.region);
    }
    Ok(())
}

/// The placement's `allowed` is no wider than what the document wrote, or than its default.
fn check_against_written(p: &Placement, spec: &Spec) -> Result<(), TestCaseError> {
    let names: Vec<&str> = p.allowed.iter().map(|r| r.as_str()).collect();
    if let Some(list) = &spec.allowed {
        for r in &names {
            prop_assert!(list.contains(r), "{r} is allowed but not in the written list {list:?}");
        }
    }
    let confined = spec.classification == "restricted" || (spec.locality == "regional" && spec.allowed.is_none());
    if confined {
        for r in &names {
            if spec.locality == "user" {
                prop_assert!(p.homes.iter().any(|h| h.as_str() == *r), "{r} is allowed beyond the key's home");
            } else {
                prop_assert!(spec.home.contains(r), "{r} is allowed beyond the written homes of confined data");
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn placements_are_deterministic_and_keep_residency(spec in spec(), keys in prop::collection::vec(key_and_attrs(), 1..6)) {
        let topology = support::topology_of(&support::REGIONS);
        let regions: Vec<RegionId> = topology.regions().iter().map(|r| r.name.clone()).collect();
        let toml = spec.toml();
        let Ok(policy) = Policy::parse(&toml, Format::Toml, "gen.toml", Some(&topology)) else {
            // Invalid specs are the validator's business (see the corpus); the share of valid
            // ones is checked by `enough_generated_policies_are_valid`.
            return Ok(());
        };
        // The same content in YAML is the same version.
        let again = Policy::parse(&spec.yaml(), Format::Yaml, "gen.yaml", Some(&topology));
        prop_assert!(again.is_ok(), "YAML form refused: {:?}\n{}", again.err(), spec.yaml());
        let again = again.unwrap();
        prop_assert_eq!(again.id(), policy.id(), "TOML and YAML of one policy differ:\n{}\n{}", policy.canonical(), again.canonical());

        let ds = DatasetName::new("ds").unwrap();
        for (key, attrs) in &keys {
            let key = Key::new(key.clone()).unwrap();
            let first = evaluate(&policy, &topology, &ds, &key, attrs);
            prop_assert_eq!(&first, &evaluate(&policy, &topology, &ds, &key, attrs), "evaluation is not deterministic");
            prop_assert_eq!(&first, &evaluate(&again, &topology, &ds, &key, attrs), "evaluation depends on the text form");
            match first {
                Ok(p) => {
                    check_invariants(&p, &regions)?;
                    check_against_written(&p, &spec)?;
                }
                Err(PlacementError::HomeUnknown { .. } | PlacementError::HomeMismatch { .. } | PlacementError::HomeNotAllowed { .. }) => {
                    prop_assert_eq!(spec.locality, "user", "only user-homed keys can lack a usable home");
                }
                Err(e) => prop_assert!(false, "unexpected evaluation error {e}"),
            }
        }
    }
}

#[test]
fn enough_generated_policies_are_valid() {
    // Without this, a validator that refused everything would pass the property above.
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let topology = support::topology_of(&support::REGIONS);
    let mut runner = TestRunner::deterministic();
    let strategy = spec();
    let mut valid_by_class = std::collections::BTreeMap::<&str, usize>::new();
    for _ in 0..2000 {
        let s = strategy.new_tree(&mut runner).unwrap().current();
        if Policy::parse(&s.toml(), Format::Toml, "gen.toml", Some(&topology)).is_ok() {
            *valid_by_class.entry(s.classification).or_default() += 1;
        }
    }
    for class in ["public", "internal", "confidential", "restricted"] {
        let n = valid_by_class.get(class).copied().unwrap_or(0);
        assert!(n >= 20, "only {n} of 2000 generated policies were valid {class} ones: {valid_by_class:?}");
    }
}

#[test]
fn user_homes_come_from_the_prefix_or_the_attribute() {
    let topology = support::topology_of(&support::REGIONS);
    let text =
        "[[dataset]]\nname = \"profiles\"\nlocality = \"user\"\nclassification = \"restricted\"\nkind = \"map\"\n";
    let policy = Policy::parse(text, Format::Toml, "p.toml", Some(&topology)).unwrap();
    let ds = DatasetName::new("profiles").unwrap();
    let r = |s: &str| RegionId::new(s).unwrap();
    let eval = |key: &str, home: Option<&str>| {
        let attrs = ObjectAttributes { home: home.map(r), ..Default::default() };
        evaluate(&policy, &topology, &ds, &Key::new(key).unwrap(), &attrs)
    };
    let p = eval("eu-west/alice", None).unwrap();
    assert_eq!((p.homes.clone(), p.allowed.clone(), p.mirrors.len()), (vec![r("eu-west")], vec![r("eu-west")], 0));
    assert_eq!(eval("alice", Some("ap-south")).unwrap().homes, vec![r("ap-south")]);
    assert_eq!(eval("eu-west/alice", Some("eu-west")).unwrap().homes, vec![r("eu-west")]);
    assert!(matches!(eval("eu-west/alice", Some("us-east")), Err(PlacementError::HomeMismatch { .. })));
    assert!(matches!(eval("alice", None), Err(PlacementError::HomeUnknown { .. })));
    // A prefix that is not a region is just part of the key.
    assert!(matches!(eval("mars/alice", None), Err(PlacementError::HomeUnknown { .. })));
    let reasons: Vec<&str> = p.regions.iter().map(|d| d.reason.code()).collect();
    assert_eq!(
        reasons,
        ["restricted_stays_home", "home_from_key_prefix", "restricted_stays_home", "restricted_stays_home"]
    );
}

#[test]
fn the_sample_policy_places_each_dataset_as_documented() {
    let topology = support::topology_of(&support::REGIONS);
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/00-valid-sample.toml")).unwrap();
    let policy = Policy::parse(&text, Format::Toml, "sample.toml", Some(&topology)).unwrap();
    let r = |s: &str| RegionId::new(s).unwrap();
    let eval = |ds: &str, key: &str| {
        evaluate(
            &policy,
            &topology,
            &DatasetName::new(ds).unwrap(),
            &Key::new(key).unwrap(),
            &ObjectAttributes::default(),
        )
        .unwrap()
    };
    let catalog = eval("catalog", "sku-1");
    assert_eq!(catalog.homes, vec![r("us-east")]);
    assert_eq!(catalog.mirrors, vec![r("eu-west"), r("eu-central"), r("ap-south")]);
    let orders = eval("orders", "o-1");
    assert_eq!(
        (orders.allowed.clone(), orders.mirrors.clone()),
        (vec![r("eu-west"), r("eu-central")], vec![r("eu-central")])
    );
    assert_eq!(orders.failover, vec![r("eu-central")]);
    let us = orders.regions.iter().find(|d| d.region == r("us-east")).unwrap();
    assert_eq!((us.role, us.reason.code()), (Role::None, "not_in_allowed"));
    assert!(orders.encryption_at_rest);
    let carts = eval("carts", "c-1");
    assert_eq!(carts.homes.len(), 3);
    assert_eq!(carts.links.len(), 6, "three homes replicate to each other");
    let reports = eval("reports", "r-1");
    assert!(matches!(reports.quarantine, QuarantineState::Held { .. }));
    assert!(reports.mirrors.is_empty() && reports.links.is_empty(), "held objects do not ship");
    // Undeclared datasets take the default rules.
    let other = eval("anything", "k");
    assert_eq!((other.homes.clone(), other.allowed.clone()), (vec![r("us-east")], vec![r("us-east")]));
    assert_eq!(other.rules, meridian_policy::RuleSource::Default);
}

#[test]
fn interval_links_get_distinct_fixed_phases_inside_the_jitter() {
    let topology = support::topology_of(&support::REGIONS);
    let text = "[[dataset]]\nname = \"logs\"\nlocality = \"global\"\nclassification = \"internal\"\nhome = [\"us-east\"]\nmirrors = \"all-allowed\"\nsync = { mode = \"interval\", every = \"1m\", jitter = \"20s\" }\n";
    let policy = Policy::parse(text, Format::Toml, "p.toml", Some(&topology)).unwrap();
    let p = evaluate(
        &policy,
        &topology,
        &DatasetName::new("logs").unwrap(),
        &Key::new("k").unwrap(),
        &ObjectAttributes::default(),
    )
    .unwrap();
    let phases: Vec<u64> = p.links.iter().map(|l| l.phase.ms()).collect();
    assert_eq!(phases.len(), 3);
    assert!(phases.iter().all(|&ms| ms < 20_000), "{phases:?}");
    let mut distinct = phases.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() > 1, "links of one dataset should not all fire together: {phases:?}");
}
