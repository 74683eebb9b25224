//! The cluster's shape: regions, their zones, and one node per zone, plus the simulated WAN
//! delay between region pairs.
//!
//! Architecture invariant: a validated [`Topology`] has unique node ids (never 0), unique
//! addresses, exactly one node per (region, zone), and every node's region declared. Every
//! other crate may rely on that without checking again.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, RegionId, ZoneId};
use crate::limits::{NODES_MAX, REGIONS_MAX, WAN_ONE_WAY_MS_MAX};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpec {
    pub name: RegionId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub id: NodeId,
    pub region: RegionId,
    pub zone: ZoneId,
    /// Where clients reach this node's public HTTP API.
    pub api_addr: SocketAddr,
    /// Where the other nodes reach it (Raft and forwarding).
    pub peer_addr: SocketAddr,
}

/// Simulated one-way delay between two regions, applied by the node-to-node transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WanSpec {
    pub regions: [RegionId; 2],
    pub one_way_ms: u64,
}

/// One problem in a topology; validation reports all of them at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("no regions are declared; add at least one [[regions]] table")]
    NoRegions,
    #[error("{count} regions are declared; at most {max} are supported")]
    TooManyRegions { count: usize, max: usize },
    #[error("{count} nodes are declared; at most {max} are supported")]
    TooManyNodes { count: usize, max: usize },
    #[error("region {0} is declared twice")]
    DuplicateRegion(RegionId),
    #[error("region {0} has no nodes; give it one node per zone")]
    EmptyRegion(RegionId),
    #[error("node id 0 is reserved; number nodes from 1")]
    ZeroNodeId,
    #[error("node id {0} is used twice")]
    DuplicateNodeId(NodeId),
    #[error("node {node} names region {region}, which is not declared in [[regions]]")]
    UnknownRegion { node: NodeId, region: RegionId },
    #[error("zone {zone} of region {region} has two nodes ({first} and {second}); a zone holds one node")]
    DuplicateZone { region: RegionId, zone: ZoneId, first: NodeId, second: NodeId },
    #[error("address {addr} is used by more than one node or listener")]
    DuplicateAddress { addr: SocketAddr },
    #[error("WAN delay names region {0}, which is not declared")]
    WanUnknownRegion(RegionId),
    #[error("WAN delay between {0} and itself; delays are between two different regions")]
    WanSelf(RegionId),
    #[error("WAN delay between {a} and {b} is given twice")]
    WanDuplicate { a: RegionId, b: RegionId },
    #[error("WAN delay of {ms} ms is over the {max} ms limit")]
    WanTooLong { ms: u64, max: u64 },
}

/// A validated topology. Build it with [`Topology::new`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    regions: Vec<RegionSpec>,
    nodes: Vec<NodeSpec>,
    wan: BTreeMap<(RegionId, RegionId), u64>,
}

impl Topology {
    pub fn new(regions: Vec<RegionSpec>, nodes: Vec<NodeSpec>, wan: Vec<WanSpec>) -> Result<Self, Vec<TopologyError>> {
        let mut errors = Vec::new();
        if regions.is_empty() {
            errors.push(TopologyError::NoRegions);
        }
        if regions.len() > REGIONS_MAX {
            errors.push(TopologyError::TooManyRegions { count: regions.len(), max: REGIONS_MAX });
        }
        if nodes.len() > NODES_MAX {
            errors.push(TopologyError::TooManyNodes { count: nodes.len(), max: NODES_MAX });
        }
        let mut region_names = BTreeSet::new();
        for r in &regions {
            if !region_names.insert(r.name.clone()) {
                errors.push(TopologyError::DuplicateRegion(r.name.clone()));
            }
        }
        let mut ids = BTreeSet::new();
        let mut zones: BTreeMap<(RegionId, ZoneId), NodeId> = BTreeMap::new();
        let mut addrs = BTreeSet::new();
        for n in &nodes {
            if n.id == 0 {
                errors.push(TopologyError::ZeroNodeId);
            } else if !ids.insert(n.id) {
                errors.push(TopologyError::DuplicateNodeId(n.id));
            }
            if !region_names.contains(&n.region) {
                errors.push(TopologyError::UnknownRegion { node: n.id, region: n.region.clone() });
            }
            if let Some(first) = zones.insert((n.region.clone(), n.zone.clone()), n.id) {
                errors.push(TopologyError::DuplicateZone {
                    region: n.region.clone(),
                    zone: n.zone.clone(),
                    first,
                    second: n.id,
                });
            }
            for addr in [n.api_addr, n.peer_addr] {
                if !addrs.insert(addr) {
                    errors.push(TopologyError::DuplicateAddress { addr });
                }
            }
        }
        for r in &regions {
            if !nodes.iter().any(|n| n.region == r.name) {
                errors.push(TopologyError::EmptyRegion(r.name.clone()));
            }
        }
        let mut wan_map = BTreeMap::new();
        for w in wan {
            let [a, b] = w.regions;
            for r in [&a, &b] {
                if !region_names.contains(r) {
                    errors.push(TopologyError::WanUnknownRegion(r.clone()));
                }
            }
            if a == b {
                errors.push(TopologyError::WanSelf(a));
                continue;
            }
            if w.one_way_ms > WAN_ONE_WAY_MS_MAX {
                errors.push(TopologyError::WanTooLong { ms: w.one_way_ms, max: WAN_ONE_WAY_MS_MAX });
            }
            let pair = if a < b { (a, b) } else { (b, a) };
            if wan_map.insert(pair.clone(), w.one_way_ms).is_some() {
                errors.push(TopologyError::WanDuplicate { a: pair.0, b: pair.1 });
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Topology { regions, nodes, wan: wan_map })
    }

    /// The built-in demo: three regions of three zones, nine nodes. Node `i` (from 1) serves
    /// its API on `base_port + i - 1` and its peer endpoint on `base_port + 100 + i - 1`.
    pub fn demo(base_port: u16) -> Self {
        let regions = ["us-east", "eu-west", "ap-south"];
        let zones = ["a", "b", "c"];
        let mut nodes = Vec::new();
        for (ri, r) in regions.iter().enumerate() {
            for (zi, z) in zones.iter().enumerate() {
                let i = (ri * zones.len() + zi) as u16;
                nodes.push(NodeSpec {
                    id: u64::from(i) + 1,
                    region: RegionId::new(*r).expect("valid demo region"),
                    zone: ZoneId::new(*z).expect("valid demo zone"),
                    api_addr: SocketAddr::from(([127, 0, 0, 1], base_port + i)),
                    peer_addr: SocketAddr::from(([127, 0, 0, 1], base_port + 100 + i)),
                });
            }
        }
        let wan = |a: &str, b: &str, ms| WanSpec {
            regions: [RegionId::new(a).expect("valid"), RegionId::new(b).expect("valid")],
            one_way_ms: ms,
        };
        Topology::new(
            regions.iter().map(|r| RegionSpec { name: RegionId::new(*r).expect("valid") }).collect(),
            nodes,
            vec![wan("us-east", "eu-west", 40), wan("us-east", "ap-south", 110), wan("eu-west", "ap-south", 75)],
        )
        .expect("the demo topology is valid")
    }

    pub fn regions(&self) -> &[RegionSpec] {
        &self.regions
    }
    pub fn nodes(&self) -> &[NodeSpec] {
        &self.nodes
    }
    pub fn node(&self, id: NodeId) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.id == id)
    }
    /// The voters of a region: its zone nodes, in id order.
    pub fn region_nodes(&self, region: &RegionId) -> Vec<&NodeSpec> {
        let mut v: Vec<_> = self.nodes.iter().filter(|n| &n.region == region).collect();
        v.sort_by_key(|n| n.id);
        v
    }
    /// Simulated one-way delay between two regions; zero inside a region or when unset.
    pub fn one_way_ms(&self, a: &RegionId, b: &RegionId) -> u64 {
        if a == b {
            return 0;
        }
        let pair = if a < b { (a.clone(), b.clone()) } else { (b.clone(), a.clone()) };
        self.wan.get(&pair).copied().unwrap_or(0)
    }
    pub fn wan(&self) -> impl Iterator<Item = (&RegionId, &RegionId, u64)> {
        self.wan.iter().map(|((a, b), ms)| (a, b, *ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, region: &str, zone: &str, port: u16) -> NodeSpec {
        NodeSpec {
            id,
            region: RegionId::new(region).unwrap(),
            zone: ZoneId::new(zone).unwrap(),
            api_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            peer_addr: SocketAddr::from(([127, 0, 0, 1], port + 1000)),
        }
    }

    #[test]
    fn demo_is_valid() {
        let t = Topology::demo(7000);
        assert_eq!(t.nodes().len(), 9);
        assert_eq!(t.region_nodes(&RegionId::new("eu-west").unwrap()).len(), 3);
        let (us, eu) = (RegionId::new("us-east").unwrap(), RegionId::new("eu-west").unwrap());
        assert_eq!(t.one_way_ms(&eu, &us), 40);
        assert_eq!(t.one_way_ms(&us, &us), 0);
    }

    #[test]
    fn reports_every_problem() {
        let regions = vec![
            RegionSpec { name: RegionId::new("r").unwrap() },
            RegionSpec { name: RegionId::new("r").unwrap() },
            RegionSpec { name: RegionId::new("empty").unwrap() },
        ];
        let nodes = vec![node(1, "r", "a", 1), node(1, "r", "a", 1), node(0, "x", "b", 3)];
        let errs = Topology::new(regions, nodes, vec![]).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(errs.contains(&TopologyError::DuplicateRegion(RegionId::new("r").unwrap())), "{text:?}");
        assert!(errs.contains(&TopologyError::DuplicateNodeId(1)));
        assert!(errs.contains(&TopologyError::ZeroNodeId));
        assert!(errs.iter().any(|e| matches!(e, TopologyError::DuplicateZone { .. })));
        assert!(errs.iter().any(|e| matches!(e, TopologyError::DuplicateAddress { .. })));
        assert!(errs.iter().any(|e| matches!(e, TopologyError::UnknownRegion { .. })));
        assert!(errs.contains(&TopologyError::EmptyRegion(RegionId::new("empty").unwrap())));
    }
}
