//! Convergence: after the heal, every copy the policy allows of the mirrored dataset becomes
//! identical, value and version, in every region, within [`CONVERGE_DEADLINE`]; and every
//! copy of the multi-primary datasets becomes identical whole (versions kept, version vector,
//! conflict-free state), whatever order each region merged the others' writes in.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use meridian_raft::command::StoredObject;

use super::Violation;
use crate::world::Live;

/// How long after the final reads every allowed copy may take to become identical.
pub const CONVERGE_DEADLINE: Duration = Duration::from_secs(60);

/// The first difference among the nodes `ids` for the keys of `dataset`, if any.
pub fn difference(live: &BTreeMap<u64, Live>, ids: &[u64], dataset: &str, keys: &[String]) -> Option<String> {
    for full in keys {
        let Some((d, key)) = full.split_once('/') else { continue };
        if d != dataset {
            continue;
        }
        let mut seen: Option<(u64, String)> = None;
        for id in ids {
            let Some(node) = live.get(id) else { return Some(format!("node {id} is not running")) };
            let held = match node.node.reader().get(d, key) {
                Ok(Some(o)) => format!("{:?} at {}", o.value.as_deref().map(String::from_utf8_lossy), o.version),
                Ok(None) => "nothing".to_owned(),
                Err(e) => return Some(format!("node {id} read {full}: {e}")),
            };
            match &seen {
                None => seen = Some((*id, held)),
                Some((other, h)) if *h != held => {
                    return Some(format!(
                        "{full}: node {other} ({}) holds {h}, node {id} ({}) holds {held}",
                        live.get(other).map(|n| n.region().to_string()).unwrap_or_default(),
                        node.region()
                    ))
                }
                Some(_) => {}
            }
        }
    }
    None
}

/// The first difference among the nodes `ids` for the multi-primary keys `keys` (dataset,
/// key), comparing whole objects, if any.
pub fn whole_difference(live: &BTreeMap<u64, Live>, ids: &[u64], keys: &BTreeSet<(String, String)>) -> Option<String> {
    for (dataset, key) in keys {
        let mut seen: Option<(u64, Option<StoredObject>)> = None;
        for id in ids {
            let Some(node) = live.get(id) else { return Some(format!("node {id} is not running")) };
            let held = match node.node.reader().get(dataset, key) {
                Ok(o) => o,
                Err(e) => return Some(format!("node {id} read {dataset}/{key}: {e}")),
            };
            match &seen {
                None => seen = Some((*id, held)),
                Some((other, h)) if *h != held => {
                    let show = |o: &Option<StoredObject>| match o {
                        Some(o) => format!(
                            "{:?} at {} (vector {}, {} out of sight)",
                            o.value.as_deref().map(String::from_utf8_lossy),
                            o.version,
                            super::multi_primary::show(&o.vv),
                            o.siblings.len()
                        ),
                        None => "nothing".to_owned(),
                    };
                    return Some(format!(
                        "{dataset}/{key}: node {other} ({}) holds {}, node {id} ({}) holds {}",
                        live.get(other).map(|n| n.region().to_string()).unwrap_or_default(),
                        show(h),
                        node.region(),
                        show(&held)
                    ));
                }
                Some(_) => {}
            }
        }
    }
    None
}

pub fn violation(detail: String) -> Violation {
    Violation { invariant: "allowed copies converge".into(), detail }
}
