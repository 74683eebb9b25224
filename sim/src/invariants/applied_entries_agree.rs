//! State-machine safety: no two nodes of a region ever apply different entries at the same
//! log index. Checked after every simulation step on every running node's last applied entry.
//!
//! This is what "at most one leader per term" exists to guarantee. Openraft, as Meridian
//! configures it (without its `single-term-leader` feature; docs/design.md#dependencies says
//! why), names a leadership by (term, node id): a voter that granted (8, node 1) may later
//! grant the greater (8, node 3), so two nodes can lead the same numeric term one after the
//! other, and entries carry the leader's (term, node id). The simulator saw exactly that
//! (seeds 38 and 89); what must never happen is two different entries applied at one index,
//! and that is what is checked here. The leaderships seen are still traced and counted.

use std::collections::BTreeMap;
use std::time::Duration;

use meridian_raft::LogId;
use openraft::ServerState;

use super::Violation;
use crate::coverage::Coverage;
use crate::world::{Live, World};

/// Most applied log ids remembered; older indexes are forgotten (they were compared while new).
pub const REMEMBERED_MAX: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct AppliedEntriesAgree {
    /// (Region, log index) -> the entry (leader id and index) first seen applied there, and by
    /// whom.
    applied: BTreeMap<(String, u64), (LogId, u64)>,
    /// Leaderships seen, as (term, node).
    leaderships: BTreeMap<(u64, u64), ()>,
    /// Each region's last leader seen.
    last_leader: BTreeMap<String, u64>,
}

impl AppliedEntriesAgree {
    pub fn observe(
        &mut self,
        live: &BTreeMap<u64, Live>,
        now: Duration,
        world: &World,
        cov: &mut Coverage,
    ) -> Result<(), Violation> {
        for (&id, node) in live {
            let region = node.region().to_string();
            let m = node.node.raft().metrics().borrow().clone();
            if m.state == ServerState::Leader && self.leaderships.insert((m.current_term, id), ()).is_none() {
                world.event_at(now, format!("raft: node {id} leads {region} in term {}", m.current_term));
                cov.hit("leader elected");
                if self.last_leader.get(&region).is_some_and(|&l| l != id) {
                    cov.hit("leader changed");
                }
                self.last_leader.insert(region.clone(), id);
            }
            let Some(applied) = m.last_applied else { continue };
            let at = (region, applied.index);
            match self.applied.get(&at) {
                Some((seen, by)) if *seen != applied => {
                    return Err(Violation {
                        invariant: "applied entries agree".into(),
                        detail: format!(
                            "in {} at log index {}: node {by} applied {seen}, node {id} applied {applied}",
                            at.0, applied.index
                        ),
                    });
                }
                Some(_) => {}
                None => {
                    self.applied.insert(at, (applied, id));
                    if self.applied.len() > REMEMBERED_MAX {
                        self.applied.pop_first();
                    }
                }
            }
        }
        Ok(())
    }
}
