//! The receiver's decisions, free of I/O: whether a batch from another region is accepted at
//! all, which of its changes this region may hold, and whether it may be queued for the log
//! now or must wait for the batch ahead of it. The driver in `links/mod.rs` reads the policy
//! and the merged marks, proposes, and waits; it decides with these functions.
//!
//! Invariants kept here:
//! - a batch is accepted only from another region of this cluster, filtered under the same
//!   policy epoch as this region's copy (a change withheld under one entry is never counted as
//!   merged under the next);
//! - a change is kept only if it is the source's own version and this region's copy of the
//!   policy lets it hold it, whatever the sender decided;
//! - batches reach the log in range order: one that starts past what is merged or queued
//!   waits (bounded) for the one ahead of it.

use meridian_core::{RegionId, Topology};
use meridian_raft::command::{Change, MergeRule};

use crate::peer::PeerError;

/// The batch's source region, if it is another region of this cluster.
pub(crate) fn check_source(source: &str, topology: &Topology, here: &RegionId) -> Result<RegionId, PeerError> {
    let Ok(source) = RegionId::new(source) else {
        return Err(PeerError::Protocol(format!("batch from an invalid region name {source:?}")));
    };
    if topology.regions().iter().all(|r| r.name != source) || source == *here {
        return Err(PeerError::Protocol(format!("batch from {source}, which is not another region of this cluster")));
    }
    Ok(source)
}

/// Both ends must filter under the same policy entry.
pub(crate) fn check_epoch(batch_epoch: u64, ours: u64) -> Result<(), PeerError> {
    if batch_epoch == ours {
        return Ok(());
    }
    Err(PeerError::Unavailable(format!(
        "the batch was filtered under policy epoch {batch_epoch} and this region's copy has epoch {ours}; \
         retry once both copies agree"
    )))
}

/// Keep the changes that carry a write of `source` (a link ships its region's writes, with
/// whatever they were merged with) and that `rule_here` (this region's copy of the policy)
/// lets this region hold, each set to merge by the rule that copy gives. Returns how many
/// were refused.
pub(crate) fn keep_allowed(
    changes: &mut Vec<Change>,
    source: &RegionId,
    rule_here: impl Fn(&Change) -> Option<MergeRule>,
) -> u64 {
    let before = changes.len();
    changes.retain_mut(|c| {
        if c.object.vv.get(source) == 0 {
            return false;
        }
        match rule_here(c) {
            Some(rule) => {
                c.rule = rule;
                true
            }
            None => false,
        }
    });
    (before - changes.len()) as u64
}

/// Whether a batch may be queued for the log now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// Queue it. `held`: it had waited, and whether the one ahead arrived (`in_order`) or the
    /// wait ran out (then the merge answers with the gap and the source resends).
    Go { held: Option<&'static str> },
    /// Wait for the batch ahead of it.
    Hold,
}

/// A batch starting at `from_seq`, with the source's changes merged up to `merged` and queued
/// for the log up to `queued`. `waited`: it has held already; `out_of_time`: its wait is over.
pub(crate) fn order(from_seq: u64, merged: u64, queued: u64, waited: bool, out_of_time: bool) -> Order {
    let in_order = from_seq <= merged.max(queued) + 1;
    if in_order || out_of_time {
        let held = waited.then_some(if in_order { "in_order" } else { "timed_out" });
        Order::Go { held }
    } else {
        Order::Hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::{HlcTimestamp, Version};

    fn topology() -> Topology {
        let text = "[[regions]]\nname = \"a\"\n[[regions]]\nname = \"b\"\n\
                    [[nodes]]\nid = 1\nregion = \"a\"\nzone = \"z\"\napi_addr = \"127.0.0.1:1\"\npeer_addr = \"127.0.0.1:2\"\n\
                    [[nodes]]\nid = 2\nregion = \"b\"\nzone = \"z\"\napi_addr = \"127.0.0.1:3\"\npeer_addr = \"127.0.0.1:4\"\n";
        crate::config::ClusterConfig::parse(text, "test").expect("config").topology
    }

    fn r(s: &str) -> RegionId {
        RegionId::new(s).expect("region")
    }

    fn change(region: &str, key: &str) -> Change {
        let version = Version { hlc: HlcTimestamp::new(1, 0), region: r(region), seq: 1 };
        let object = meridian_raft::StoredObject::plain(version, None);
        Change { dataset: "d".into(), key: key.into(), object, rule: MergeRule::Lww }
    }

    #[test]
    fn only_another_region_of_the_cluster_may_send() {
        let t = topology();
        assert_eq!(check_source("a", &t, &r("b")), Ok(r("a")));
        assert!(matches!(check_source("b", &t, &r("b")), Err(PeerError::Protocol(_))), "not from itself");
        assert!(matches!(check_source("mars", &t, &r("b")), Err(PeerError::Protocol(_))), "not from outside");
        assert!(matches!(check_source("Not A Name!", &t, &r("b")), Err(PeerError::Protocol(_))));
    }

    #[test]
    fn a_batch_filtered_under_another_epoch_is_refused_for_now() {
        assert_eq!(check_epoch(4, 4), Ok(()));
        assert!(matches!(check_epoch(3, 4), Err(PeerError::Unavailable(m)) if m.contains("epoch 3")));
        assert!(check_epoch(5, 4).is_err());
    }

    #[test]
    fn changes_are_kept_only_if_the_source_wrote_them_and_this_region_may_hold_them() {
        let mut changes = vec![change("a", "ok"), change("b", "relayed"), change("a", "forbidden"), change("a", "ok2")];
        let refused = keep_allowed(&mut changes, &r("a"), |c| (c.key != "forbidden").then_some(MergeRule::Crdt));
        assert_eq!(refused, 2);
        let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, vec!["ok", "ok2"]);
        assert!(changes.iter().all(|c| c.rule == MergeRule::Crdt), "each merges by this region's rule");
    }

    #[test]
    fn a_batch_waits_for_the_one_ahead_of_it_but_not_forever() {
        assert_eq!(order(11, 10, 0, false, false), Order::Go { held: None }, "joins what is merged");
        assert_eq!(order(21, 10, 20, false, false), Order::Go { held: None }, "joins what is queued");
        assert_eq!(order(5, 10, 0, false, false), Order::Go { held: None }, "an old range is a no-op merge");
        assert_eq!(order(31, 10, 20, false, false), Order::Hold);
        assert_eq!(order(31, 10, 30, true, false), Order::Go { held: Some("in_order") });
        assert_eq!(order(31, 10, 20, true, true), Order::Go { held: Some("timed_out") });
    }
}
