//! After the heal, once every node of a region has applied the same log prefix, every node of
//! that region holds the same value for every key.

use std::collections::BTreeMap;

use super::Violation;
use crate::world::Live;

/// The applied index of the nodes `ids`, if they all run and have applied the same prefix.
pub fn settled(live: &BTreeMap<u64, Live>, ids: &[u64]) -> Option<u64> {
    let mut applied = ids.iter().map(|id| live.get(id).and_then(|n| n.node.raft().metrics().borrow().last_applied));
    let first = applied.next()??.index;
    applied.all(|a| a.map(|l| l.index) == Some(first)).then_some(first)
}

/// Every node of `ids` holds the same value for each key ("dataset/key").
pub fn check(live: &BTreeMap<u64, Live>, ids: &[u64], keys: &[String]) -> Result<(), Violation> {
    for full in keys {
        let (dataset, key) = full.split_once('/').expect("keys are dataset/key");
        let mut seen: Option<(u64, Option<Vec<u8>>)> = None;
        for id in ids {
            let Some(node) = live.get(id) else { continue };
            let v = node
                .node
                .reader()
                .get(dataset, key)
                .map_err(|e| Violation {
                    invariant: "replicas agree".into(),
                    detail: format!("node {id} read {full}: {e}"),
                })?
                .and_then(|o| o.value);
            match &seen {
                None => seen = Some((*id, v)),
                Some((other, w)) if *w != v => {
                    return Err(Violation {
                        invariant: "replicas agree".into(),
                        detail: format!(
                            "key {full}: node {other} holds {:?}, node {id} holds {:?}",
                            w.as_deref().map(String::from_utf8_lossy),
                            v.as_deref().map(String::from_utf8_lossy)
                        ),
                    })
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}
