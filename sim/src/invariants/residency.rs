//! Residency: no byte of the restricted dataset is ever sent to, or stored in, a region its
//! policy does not allow.
//!
//! Every value of the restricted dataset carries a canary. The simulated wire inspects every
//! cross-region message, request and reply, at the send (`World::inspect_crossing`), and a
//! gateway outside the allowed region that answers a read of the dataset with a value is a
//! breach too. After the run, every disk of every node outside the allowed region is scanned
//! for the canary's bytes, freed pages and unsynced writes included, and every such node's
//! state machine must hold no key of the dataset.

use std::collections::BTreeMap;

use super::Violation;
use crate::workload::RESTRICTED;
use crate::world::{Live, World, CANARY_PREFIX};

fn violation(detail: String) -> Violation {
    Violation { invariant: "residency".into(), detail }
}

/// Breaches seen while the run went on.
pub fn check_messages(world: &World) -> Result<(), Violation> {
    let r = world.residency.lock().expect("residency lock");
    match r.breaches.first() {
        Some(first) => Err(violation(format!("{} breaches; the first: {first}", r.breaches.len()))),
        None => Ok(()),
    }
}

/// What is stored outside the allowed regions, at the end of the run.
pub fn check_stored(world: &World, live: &BTreeMap<u64, Live>) -> Result<(), Violation> {
    for id in world.node_ids() {
        let spec = world.spec(id);
        if world.restricted_allowed.contains(&spec.region) {
            continue;
        }
        let disks = world.disks(id);
        for (name, disk) in [("log", &disks.log[0]), ("log", &disks.log[1]), ("state", &disks.state)] {
            if disk.contains(CANARY_PREFIX.as_bytes()) {
                return Err(violation(format!("node {id} ({}) holds a canary on its {name} disk", spec.region)));
            }
        }
        if let Ok(bytes) = std::fs::read(world.snapshot_path(id)) {
            if crate::world::find(&bytes, CANARY_PREFIX.as_bytes()).is_some() {
                return Err(violation(format!("node {id} ({}) holds a canary in its snapshot", spec.region)));
            }
        }
        if let Some(n) = live.get(&id) {
            let held = n
                .node
                .reader()
                .list(RESTRICTED, "", None, 1)
                .map_err(|e| violation(format!("node {id} could not list {RESTRICTED}: {e}")))?;
            if let Some((key, _)) = held.first() {
                return Err(violation(format!("node {id} ({}) holds {RESTRICTED}/{key}", spec.region)));
            }
        }
    }
    Ok(())
}
