//! Shared by the policy crate's integration tests.

use std::net::SocketAddr;

use meridian_core::topology::{NodeSpec, RegionSpec};
use meridian_core::{RegionId, Topology, ZoneId};

/// The regions the corpus and property tests use: two in Europe, so residency rules have room.
pub const REGIONS: [&str; 4] = ["us-east", "eu-west", "eu-central", "ap-south"];

/// A topology of `regions`, one node each (placement only looks at regions).
pub fn topology_of(regions: &[&str]) -> Topology {
    let nodes = regions
        .iter()
        .enumerate()
        .map(|(i, r)| NodeSpec {
            id: i as u64 + 1,
            region: RegionId::new(*r).unwrap(),
            zone: ZoneId::new("a").unwrap(),
            api_addr: SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16)),
            peer_addr: SocketAddr::from(([127, 0, 0, 1], 9100 + i as u16)),
        })
        .collect();
    let regions = regions.iter().map(|r| RegionSpec { name: RegionId::new(*r).unwrap() }).collect();
    Topology::new(regions, nodes, Vec::new()).unwrap()
}
