//! Convergence: after the heal, every copy the policy allows of the mirrored dataset becomes
//! identical, value and version, in every region, within [`CONVERGE_DEADLINE`].

use std::collections::BTreeMap;
use std::time::Duration;

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

pub fn violation(detail: String) -> Violation {
    Violation { invariant: "allowed copies converge".into(), detail }
}
