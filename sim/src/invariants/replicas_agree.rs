//! After the heal, once every node has applied the same log prefix, every node holds the same
//! value for every key.

use std::collections::BTreeMap;

use super::Violation;
use crate::node::DATASET;
use crate::world::Live;

/// The applied index of every node, if they are all equal and at least `at_least`.
pub fn settled(live: &BTreeMap<u64, Live>, nodes: usize) -> Option<u64> {
    if live.len() < nodes {
        return None;
    }
    let applied: Vec<Option<u64>> =
        live.values().map(|n| n.raft.metrics().borrow().last_applied.map(|l| l.index)).collect();
    let first = applied[0]?;
    applied.iter().all(|a| *a == Some(first)).then_some(first)
}

pub fn check(live: &BTreeMap<u64, Live>, keys: &[String]) -> Result<usize, Violation> {
    for key in keys {
        let mut seen: Option<(u64, Option<Vec<u8>>)> = None;
        for (&id, node) in live {
            let v = node
                .reader
                .get(DATASET, key)
                .map_err(|e| Violation {
                    invariant: "replicas agree".into(),
                    detail: format!("node {id} read {key}: {e}"),
                })?
                .and_then(|o| o.value);
            match &seen {
                None => seen = Some((id, v)),
                Some((other, w)) if *w != v => {
                    return Err(Violation {
                        invariant: "replicas agree".into(),
                        detail: format!(
                            "key {key}: node {other} holds {:?}, node {id} holds {:?}",
                            w.as_deref().map(String::from_utf8_lossy),
                            v.as_deref().map(String::from_utf8_lossy)
                        ),
                    })
                }
                Some(_) => {}
            }
        }
    }
    Ok(keys.len())
}
