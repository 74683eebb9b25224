//! Acting on a conflict record: a person chooses one of its versions, or writes a value of
//! their own, and the write goes through the gateway like any other.
//!
//! - `siblings`: the write carries the record's versions as its causal context, so it
//!   supersedes exactly them (a sibling the record does not name stays).
//! - `lww`: a plain write, which supersedes everything the home region holds, the versions
//!   kept out of sight included.
//! - `crdt`: a conflict-free value cannot be replaced wholesale without losing what other
//!   regions do concurrently, so the chosen value is reached by operations from the current
//!   one (members added and removed, the counter moved by the difference, fields set and
//!   deleted). Operations made elsewhere meanwhile still merge in.

use std::collections::{BTreeMap, BTreeSet};

use meridian_core::crdt::CrdtOp;
use meridian_core::{DatasetName, Key, Version, VersionVector};
use meridian_policy::Kind;
use meridian_raft::command::{dot_of, MergeRule};

use crate::gateway::{Consistency, Precondition, Served, WriteOutcome};
use crate::{Node, NodeError};

/// What a person decided for a conflict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Keep this one of the record's versions (a delete, if that version was one).
    Choose(Version),
    /// Write this JSON value instead.
    Value(Vec<u8>),
    /// Delete the key.
    Delete,
}

impl Node {
    /// Resolve conflict `id` of this node's region as `resolution` says: the outcome of the
    /// last write it took (several for a counter, set or map), or why not.
    pub async fn resolve_conflict(&self, id: u64, resolution: Resolution) -> Result<(WriteOutcome, Served), NodeError> {
        let Some((record, _)) = self.conflict(id)? else {
            return Err(NodeError::ConflictNotFound(format!(
                "region {} holds no conflict {id} (ids are per region, and old records expire)",
                self.spec().region
            )));
        };
        let (dataset, key) = match (DatasetName::new(record.dataset.as_str()), Key::new(record.key.as_str())) {
            (Ok(d), Ok(k)) => (d, k),
            _ => return Err(NodeError::Internal(format!("conflict {id} names an invalid key"))),
        };
        let value = match resolution {
            Resolution::Value(v) => Some(v),
            Resolution::Delete => None,
            Resolution::Choose(v) => match record.versions.iter().find(|s| s.version == v) {
                Some(s) => s.value.clone(),
                None => {
                    let known: Vec<String> = record.versions.iter().map(|s| s.version.to_string()).collect();
                    return Err(NodeError::InvalidResolution(format!(
                        "{v} is not one of conflict {id}'s versions ({})",
                        known.join(", ")
                    )));
                }
            },
        };
        let gw = self.gateway();
        match record.rule {
            MergeRule::Siblings => {
                let context: VersionVector =
                    record.versions.iter().map(|s| dot_of(&s.version)).map(|d| (d.region, d.counter)).collect();
                gw.put_in_context(&dataset, &key, value, context, Precondition::None, None).await
            }
            MergeRule::Lww => match value {
                Some(v) => gw.put(&dataset, &key, v, Precondition::None, None).await,
                None => gw.delete(&dataset, &key, Precondition::None, None).await,
            },
            MergeRule::Crdt => {
                let Some(target) = value else {
                    return gw.delete(&dataset, &key, Precondition::None, None).await;
                };
                let kind = self
                    .policy()
                    .placement(&dataset, &key, None)?
                    .map(|p| p.kind)
                    .ok_or_else(|| NodeError::WrongOperation(format!("no policy governs {dataset} any more")))?;
                let (current, _) = gw.get(&dataset, &key, Consistency::Strong.into(), None).await?;
                let current = current.and_then(|o| o.value);
                let ops = ops_towards(kind, current.as_deref(), &target)?;
                let mut last = None;
                for op in ops {
                    last = Some(gw.op(&dataset, &key, op, Precondition::None, None).await?);
                }
                match last {
                    Some(outcome) => Ok(outcome),
                    // Already the chosen value: nothing to write.
                    None => Err(NodeError::InvalidResolution(format!(
                        "{dataset}/{key} already holds the chosen value; nothing to write"
                    ))),
                }
            }
        }
    }
}

fn json(bytes: &[u8], what: &str) -> Result<serde_json::Value, NodeError> {
    serde_json::from_slice(bytes).map_err(|e| NodeError::InvalidResolution(format!("{what} is not JSON: {e}")))
}

/// The operations that take a counter, set or map from `current` (its JSON; `None`: absent)
/// to `target`.
pub(crate) fn ops_towards(kind: Kind, current: Option<&[u8]>, target: &[u8]) -> Result<Vec<CrdtOp>, NodeError> {
    let target = json(target, "the chosen value")?;
    let current = match current {
        Some(c) => Some(json(c, "the current value")?),
        None => None,
    };
    let wrong = |want: &str| NodeError::InvalidResolution(format!("a {kind} takes {want}, not {target}"));
    Ok(match kind {
        Kind::Counter => {
            let t = target.as_i64().ok_or_else(|| wrong("an integer"))?;
            let c = current.as_ref().and_then(serde_json::Value::as_i64).unwrap_or(0);
            match t.cmp(&c) {
                std::cmp::Ordering::Greater => vec![CrdtOp::Increment(t.abs_diff(c))],
                std::cmp::Ordering::Less => vec![CrdtOp::Decrement(t.abs_diff(c))],
                std::cmp::Ordering::Equal => Vec::new(),
            }
        }
        Kind::Set => {
            let members = |v: &serde_json::Value| -> Option<BTreeSet<String>> {
                v.as_array()?.iter().map(|m| m.as_str().map(str::to_owned)).collect()
            };
            let t = members(&target).ok_or_else(|| wrong("an array of strings"))?;
            let c = current.as_ref().and_then(members).unwrap_or_default();
            let mut ops = Vec::new();
            let gone: Vec<String> = c.difference(&t).cloned().collect();
            let new: Vec<String> = t.difference(&c).cloned().collect();
            if !gone.is_empty() {
                ops.push(CrdtOp::Remove(gone));
            }
            if !new.is_empty() {
                ops.push(CrdtOp::Add(new));
            }
            ops
        }
        Kind::Map => {
            let fields = |v: &serde_json::Value| -> Option<BTreeMap<String, serde_json::Value>> {
                Some(v.as_object()?.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            };
            let t = fields(&target).ok_or_else(|| wrong("an object"))?;
            let c = current.as_ref().and_then(fields).unwrap_or_default();
            let mut ops = Vec::new();
            let gone: Vec<String> = c.keys().filter(|k| !t.contains_key(*k)).cloned().collect();
            let set: Vec<(String, Vec<u8>)> = t
                .iter()
                .filter(|(k, v)| c.get(*k) != Some(v))
                .map(|(k, v)| (k.clone(), v.to_string().into_bytes()))
                .collect();
            if !gone.is_empty() {
                ops.push(CrdtOp::DeleteFields(gone));
            }
            if !set.is_empty() {
                ops.push(CrdtOp::SetFields(set));
            }
            ops
        }
        Kind::Document => return Err(NodeError::WrongOperation("a document is not merged by operations".into())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chosen_value_is_reached_by_the_operations_that_lead_to_it() {
        let ops = ops_towards(Kind::Set, Some(br#"["a","b"]"#), br#"["b","c"]"#).unwrap();
        assert_eq!(ops, vec![CrdtOp::Remove(vec!["a".into()]), CrdtOp::Add(vec!["c".into()])]);
        assert_eq!(ops_towards(Kind::Counter, Some(b"7"), b"3").unwrap(), vec![CrdtOp::Decrement(4)]);
        assert_eq!(ops_towards(Kind::Counter, None, b"-2").unwrap(), vec![CrdtOp::Decrement(2)]);
        assert_eq!(ops_towards(Kind::Counter, Some(b"5"), b"5").unwrap(), vec![]);
        let ops = ops_towards(Kind::Map, Some(br#"{"a":1,"b":2}"#), br#"{"b":2,"c":"x"}"#).unwrap();
        assert_eq!(
            ops,
            vec![CrdtOp::DeleteFields(vec!["a".into()]), CrdtOp::SetFields(vec![("c".into(), br#""x""#.to_vec())])]
        );
        assert!(matches!(ops_towards(Kind::Set, None, b"3"), Err(NodeError::InvalidResolution(_))));
        assert!(matches!(ops_towards(Kind::Counter, None, b"\"x\""), Err(NodeError::InvalidResolution(_))));
    }
}
