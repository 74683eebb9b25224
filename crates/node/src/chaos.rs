//! Fault injection between regions: extra delay, jitter, message loss and full cuts, per region
//! pair, changed at runtime (`/v1/admin/chaos`, `meridian chaos`). The transport consults it on
//! every call that crosses regions; calls inside a region are never touched.
//!
//! The table is in memory on each node; the node that takes an admin request sends the new
//! table to every node. Those control messages are exempt from faults (a heal must get through
//! the cut it heals). A restarted node starts with no faults.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::Duration;

use meridian_core::limits::WAN_ONE_WAY_MS_MAX;
use meridian_core::RegionId;
use serde::{Deserialize, Serialize};

/// The faults on the link between two regions (both directions).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkFault {
    /// No message crosses: calls fail at once as unreachable (nothing was sent).
    pub cut: bool,
    /// Replaces the configured one-way delay, in milliseconds.
    pub delay_ms: Option<u64>,
    /// Up to this much extra one-way delay, uniformly drawn per message.
    pub jitter_ms: u64,
    /// Share of messages lost, 0 to 100. A lost request or reply leaves the caller waiting
    /// until its deadline, as on a real network.
    pub loss_percent: u8,
}

impl LinkFault {
    pub fn validate(&self) -> Result<(), String> {
        if self.loss_percent > 100 {
            return Err(format!("loss_percent {} is over 100", self.loss_percent));
        }
        if self.delay_ms.unwrap_or(0) > WAN_ONE_WAY_MS_MAX || self.jitter_ms > WAN_ONE_WAY_MS_MAX {
            return Err(format!("delays are limited to {WAN_ONE_WAY_MS_MAX} ms"));
        }
        Ok(())
    }

    pub fn is_clear(&self) -> bool {
        *self == LinkFault::default()
    }
}

/// One row of the table: the pair (in name order) and its faults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultEntry {
    pub regions: [RegionId; 2],
    pub fault: LinkFault,
}

/// What happens to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Deliver { one_way: Duration },
    Cut,
    Lose,
}

/// The table of link faults on one node.
#[derive(Default)]
pub struct FaultTable {
    links: RwLock<BTreeMap<(RegionId, RegionId), LinkFault>>,
}

fn pair(a: &RegionId, b: &RegionId) -> (RegionId, RegionId) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

impl FaultTable {
    /// Replace the whole table (what an admin change sends to every node).
    pub fn replace(&self, entries: &[FaultEntry]) {
        let mut links = self.links.write().expect("fault table lock");
        links.clear();
        for e in entries.iter().filter(|e| !e.fault.is_clear()) {
            links.insert(pair(&e.regions[0], &e.regions[1]), e.fault.clone());
        }
    }

    pub fn entries(&self) -> Vec<FaultEntry> {
        let links = self.links.read().expect("fault table lock");
        links.iter().map(|((a, b), f)| FaultEntry { regions: [a.clone(), b.clone()], fault: f.clone() }).collect()
    }

    /// The fate of one message from `from` to `to`, given the configured one-way delay and a
    /// uniform random draw `roll` in [0, 1).
    pub fn fate(&self, from: &RegionId, to: &RegionId, configured_ms: u64, roll: f64) -> Fate {
        if from == to {
            return Fate::Deliver { one_way: Duration::from_millis(configured_ms) };
        }
        let links = self.links.read().expect("fault table lock");
        let Some(f) = links.get(&pair(from, to)) else {
            return Fate::Deliver { one_way: Duration::from_millis(configured_ms) };
        };
        if f.cut {
            return Fate::Cut;
        }
        if roll * 100.0 < f64::from(f.loss_percent) {
            return Fate::Lose;
        }
        // Reuse the draw for the jitter, rescaled past the loss band so both stay uniform.
        let loss = f64::from(f.loss_percent) / 100.0;
        let jitter_roll = if loss < 1.0 { (roll - loss) / (1.0 - loss) } else { 0.0 };
        let jitter = (jitter_roll * f.jitter_ms as f64) as u64;
        Fate::Deliver { one_way: Duration::from_millis(f.delay_ms.unwrap_or(configured_ms) + jitter) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> RegionId {
        RegionId::new(s).unwrap()
    }

    #[test]
    fn faults_apply_to_both_directions_of_a_pair_and_never_inside_a_region() {
        let t = FaultTable::default();
        let cut = LinkFault { cut: true, ..LinkFault::default() };
        t.replace(&[FaultEntry { regions: [r("us-east"), r("eu-west")], fault: cut }]);
        assert_eq!(t.fate(&r("eu-west"), &r("us-east"), 40, 0.5), Fate::Cut);
        assert_eq!(t.fate(&r("us-east"), &r("eu-west"), 40, 0.5), Fate::Cut);
        assert_eq!(
            t.fate(&r("us-east"), &r("ap-south"), 110, 0.5),
            Fate::Deliver { one_way: Duration::from_millis(110) }
        );
        assert_eq!(t.fate(&r("us-east"), &r("us-east"), 0, 0.0), Fate::Deliver { one_way: Duration::ZERO });
        t.replace(&[]);
        assert!(t.entries().is_empty());
        assert_eq!(t.fate(&r("eu-west"), &r("us-east"), 40, 0.5), Fate::Deliver { one_way: Duration::from_millis(40) });
    }

    #[test]
    fn loss_and_jitter_follow_the_draw() {
        let t = FaultTable::default();
        let f = LinkFault { delay_ms: Some(100), jitter_ms: 50, loss_percent: 20, ..LinkFault::default() };
        t.replace(&[FaultEntry { regions: [r("a"), r("b")], fault: f }]);
        assert_eq!(t.fate(&r("a"), &r("b"), 40, 0.1), Fate::Lose);
        assert_eq!(t.fate(&r("a"), &r("b"), 40, 0.2), Fate::Deliver { one_way: Duration::from_millis(100) });
        assert_eq!(t.fate(&r("a"), &r("b"), 40, 0.61), Fate::Deliver { one_way: Duration::from_millis(125) });
        let lost = (0..1000).filter(|i| t.fate(&r("a"), &r("b"), 40, f64::from(*i) / 1000.0) == Fate::Lose).count();
        assert_eq!(lost, 200);
        assert!(LinkFault { loss_percent: 101, ..LinkFault::default() }.validate().is_err());
        assert!(LinkFault { delay_ms: Some(WAN_ONE_WAY_MS_MAX + 1), ..LinkFault::default() }.validate().is_err());
    }
}
