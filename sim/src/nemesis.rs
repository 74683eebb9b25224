//! The nemesis: faults drawn from the run's seed, each undone after a while, and all undone
//! at the heal.
//!
//! Faults: a node cut off from the others, a region cut off from the others, a one-way cut
//! between two nodes, slow links (latency with jitter), lost requests, lost replies,
//! duplicated (and so reordered) requests, a pause, a crash that loses every unsynced write
//! (followed later by a restart), clock skew (small, large, or strobing: jumping back and
//! forth), and a policy change in flight (catalog's mirrors narrowed, so a region purges its
//! copies, then widened again, so it backfills them).
//!
//! A pause holds every message to and from the node and delivers them all late, which is what
//! its peers and clients see of a stopped process. Its own timers keep running: turmoil cannot
//! stop one host's clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::coverage::Coverage;
use crate::net::host_name;
use crate::world::World;

/// No fault before the group has formed.
pub const QUIET_START: Duration = Duration::from_secs(2);
/// Link latency outside a slow-link fault: nodes of one region sit in nearby zones.
pub const BASE_LATENCY_MAX: Duration = Duration::from_millis(5);

/// Every kind of fault, in report order.
pub const FAULTS: [&str; 13] = [
    "partition-node",
    "partition-region",
    "one-way-cut",
    "slow-link",
    "request-loss",
    "reply-loss",
    "duplication",
    "pause",
    "crash-restart",
    "clock-skew-small",
    "clock-skew-large",
    "clock-skew-strobe",
    "policy-change",
];

#[derive(Debug)]
enum Undo {
    Repair(String, String),
    RepairOneWay(String, String),
    Latency(String, String),
    Release(String, String),
    MessageFaults,
    Restart(u64),
    Unskew(u64),
    RestorePolicy,
}

/// A clock jumping between `+amplitude` and `-amplitude` ms every `period`.
#[derive(Debug)]
struct Strobe {
    node: u64,
    amplitude: i64,
    period: Duration,
    next_flip: Duration,
}

pub struct Nemesis {
    rng: StdRng,
    next_at: Duration,
    active: Vec<(Duration, Undo)>,
    down: BTreeSet<u64>,
    nodes: Vec<u64>,
    /// Each node's region's nodes (itself included).
    region_of: BTreeMap<u64, Vec<u64>>,
    strobes: Vec<Strobe>,
}

impl Nemesis {
    pub fn new(seed: u64, world: &World) -> Self {
        let region_of = world.node_ids().into_iter().map(|id| (id, world.region_ids(&world.spec(id).region))).collect();
        Nemesis {
            rng: StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7300),
            next_at: QUIET_START,
            active: Vec::new(),
            down: BTreeSet::new(),
            nodes: world.node_ids(),
            region_of,
            strobes: Vec::new(),
        }
    }

    fn flip_strobes(&mut self, world: &World, now: Duration) {
        for s in &mut self.strobes {
            if now >= s.next_flip {
                s.amplitude = -s.amplitude;
                s.next_flip = now + s.period;
                world.skew.lock().expect("skew lock").insert(s.node, s.amplitude);
            }
        }
    }

    /// Undo what has run its course, then maybe start a new fault.
    pub fn tick(&mut self, sim: &mut turmoil::Sim<'_>, world: &World, cov: &mut Coverage, now: Duration) {
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.active).into_iter().partition(|(t, _)| *t <= now);
        self.active = keep;
        for (_, undo) in due {
            self.undo(sim, world, now, undo);
        }
        self.flip_strobes(world, now);
        if now < self.next_at {
            return;
        }
        self.next_at = now + Duration::from_millis(self.rng.random_range(300..3_000));
        let lasts = Duration::from_millis(self.rng.random_range(500..6_000));
        let kind = FAULTS[self.rng.random_range(0..FAULTS.len())];
        let a = self.nodes[self.rng.random_range(0..self.nodes.len())];
        let b = loop {
            let b = self.nodes[self.rng.random_range(0..self.nodes.len())];
            if b != a {
                break b;
            }
        };
        let (ha, hb) = (host_name(a), host_name(b));
        let undo = match kind {
            "partition-node" => {
                for &other in self.nodes.iter().filter(|&&o| o != a) {
                    sim.partition(ha.as_str(), host_name(other).as_str());
                }
                world.event_at(now, format!("nemesis: node {a} cut off from the other nodes for {lasts:?}"));
                self.nodes.iter().filter(|&&o| o != a).map(|&o| Undo::Repair(ha.clone(), host_name(o))).collect()
            }
            "partition-region" => {
                let inside = self.region_of[&a].clone();
                let mut undo = Vec::new();
                for &i in &inside {
                    for &o in self.nodes.iter().filter(|o| !inside.contains(o)) {
                        sim.partition(host_name(i).as_str(), host_name(o).as_str());
                        undo.push(Undo::Repair(host_name(i), host_name(o)));
                    }
                }
                let region = world.spec(a).region;
                world.event_at(now, format!("nemesis: region {region} cut off from the other regions for {lasts:?}"));
                undo
            }
            "policy-change" => {
                let mut wanted = world.policy_wanted.lock().expect("policy lock");
                if wanted.is_some() || world.leaky_policy {
                    return;
                }
                *wanted = Some(crate::workload::Policy::Narrow);
                world
                    .event_at(now, format!("nemesis: the operator narrows catalog's mirrors to eu-west for {lasts:?}"));
                vec![Undo::RestorePolicy]
            }
            "clock-skew-small" | "clock-skew-large" | "clock-skew-strobe" => {
                if world.skew.lock().expect("skew lock").contains_key(&a) {
                    return;
                }
                let sign = if self.rng.random_bool(0.5) { 1 } else { -1 };
                let ms: i64 = match kind {
                    "clock-skew-small" => self.rng.random_range(1..50),
                    "clock-skew-large" => self.rng.random_range(500..5_000),
                    _ => self.rng.random_range(50..2_000),
                } * sign;
                world.skew.lock().expect("skew lock").insert(a, ms);
                if kind == "clock-skew-strobe" {
                    let period = Duration::from_millis(self.rng.random_range(50..500));
                    self.strobes.push(Strobe { node: a, amplitude: ms, period, next_flip: now + period });
                    world.event_at(
                        now,
                        format!("nemesis: node {a}'s clock jumps between {ms:+} ms and {:+} ms every {period:?} for {lasts:?}", -ms),
                    );
                } else {
                    world.event_at(now, format!("nemesis: node {a}'s clock off by {ms:+} ms for {lasts:?}"));
                }
                vec![Undo::Unskew(a)]
            }
            "one-way-cut" => {
                sim.partition_oneway(ha.as_str(), hb.as_str());
                world.event_at(now, format!("nemesis: messages from node {a} to node {b} dropped for {lasts:?}"));
                vec![Undo::RepairOneWay(ha, hb)]
            }
            "slow-link" => {
                let max = Duration::from_millis(self.rng.random_range(50..400));
                sim.set_link_max_message_latency(ha.as_str(), hb.as_str(), max);
                world.event_at(now, format!("nemesis: link {a}-{b} latency up to {max:?} for {lasts:?}"));
                vec![Undo::Latency(ha, hb)]
            }
            "pause" => {
                let others: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|&&o| o != a)
                    .map(|&o| host_name(o))
                    .chain([crate::net::CLIENT_HOST.to_string()])
                    .collect();
                for o in &others {
                    sim.hold(ha.as_str(), o.as_str());
                }
                world.event_at(
                    now,
                    format!("nemesis: node {a} paused (every message to or from it held) for {lasts:?}"),
                );
                others.into_iter().map(|o| Undo::Release(ha.clone(), o)).collect()
            }
            "request-loss" | "reply-loss" | "duplication" => {
                let p = self.rng.random_range(0.05..0.3);
                let mut f = world.faults.lock().expect("faults lock");
                match kind {
                    "request-loss" => f.loss = p,
                    "reply-loss" => f.reply_loss = p,
                    _ => f.duplicate = p,
                }
                world.event_at(now, format!("nemesis: {kind} of {:.0}% of peer messages for {lasts:?}", p * 100.0));
                vec![Undo::MessageFaults]
            }
            _ => {
                let region_down = self.region_of[&a].iter().filter(|n| self.down.contains(n)).count();
                if self.down.contains(&a) || region_down + 1 >= self.region_of[&a].len() {
                    // Keep one node of each region up: a crash of the last one proves nothing new.
                    return;
                }
                let disks = world.disks(a);
                let lost =
                    disks.log.iter().map(|d| d.crash().operations).sum::<usize>() + disks.state.crash().operations;
                // Applied but not yet durable in the state machine: replayed from the log.
                let replay = world.node_crashed(a).map_or(0, |live| {
                    cov.count_node(&live.node);
                    let applied = live.node.raft().metrics().borrow().last_applied.map_or(0, |l| l.index);
                    applied.saturating_sub(live.node.durable_point().load(std::sync::atomic::Ordering::SeqCst))
                });
                sim.crash(ha.as_str());
                self.down.insert(a);
                world.event_at(
                    now,
                    format!(
                        "nemesis: node {a} crashed: {lost} unsynced disk writes lost, {replay} applied entries \
                         not yet durable in its state machine; restart in {lasts:?}"
                    ),
                );
                if lost > 0 || replay > 0 {
                    cov.hit("crash lost unsynced writes");
                }
                vec![Undo::Restart(a)]
            }
        };
        cov.fault(kind);
        self.active.extend(undo.into_iter().map(|u| (now + lasts, u)));
    }

    fn undo(&mut self, sim: &mut turmoil::Sim<'_>, world: &World, now: Duration, undo: Undo) {
        match undo {
            Undo::Repair(a, b) => sim.repair(a.as_str(), b.as_str()),
            Undo::RepairOneWay(a, b) => sim.repair_oneway(a.as_str(), b.as_str()),
            Undo::Latency(a, b) => sim.set_link_max_message_latency(a.as_str(), b.as_str(), BASE_LATENCY_MAX),
            Undo::Release(a, b) => sim.release(a.as_str(), b.as_str()),
            Undo::MessageFaults => world.faults.lock().expect("faults lock").clear(),
            Undo::RestorePolicy => {
                *world.policy_wanted.lock().expect("policy lock") = None;
                world.event_at(now, "nemesis: the operator restores the first policy".into());
            }
            Undo::Unskew(id) => {
                self.strobes.retain(|s| s.node != id);
                world.skew.lock().expect("skew lock").remove(&id);
            }
            Undo::Restart(id) => {
                self.down.remove(&id);
                world.event_at(now, format!("nemesis: node {id} restarting"));
                sim.bounce(host_name(id).as_str());
            }
        }
    }

    /// End every fault now.
    pub fn heal(&mut self, sim: &mut turmoil::Sim<'_>, world: &World, now: Duration) {
        for (_, undo) in std::mem::take(&mut self.active) {
            self.undo(sim, world, now, undo);
        }
        world.event_at(now, "nemesis: healed; no more faults".into());
    }
}
