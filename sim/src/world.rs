//! What the harness and the simulated hosts share: the cluster's configuration, each node's
//! disks and clock offset, the handles of the nodes now running, the message faults, the
//! residency log, the clients' history and the event trace.
//!
//! Everything runs on one thread, so the locks here never contend; they exist because the
//! hosts' futures must be `Send` for tokio.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use meridian_core::{NodeSpec, RegionId};
use meridian_node::config::ClusterConfig;
use meridian_node::peer::PeerRequestV1;
use meridian_node::Node;
use meridian_testkit::History;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::disk::Disk;
use crate::invariants::multi_primary;
use crate::net::MessageFaults;
use crate::workload::NOTES;

/// Simulated wall-clock time starts here (2026-01-01T00:00:00Z).
pub const EPOCH_MS: u64 = 1_767_225_600_000;
/// Most trace lines kept; later ones are counted, not stored.
pub const TRACE_LINES_MAX: usize = 200_000;
/// Every value of the restricted dataset starts with this, then 16 random hex digits: bytes
/// that can be looked for in every message and on every disk.
pub const CANARY_PREFIX: &str = "CANARY-";

/// Simulated time since the run started, read inside a host.
pub fn sim_elapsed() -> std::time::Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// The simulated wall clock (without any node's skew), in ms since the Unix epoch.
pub fn sim_now_ms() -> u64 {
    EPOCH_MS + sim_elapsed().as_millis() as u64
}

#[derive(Debug, Clone, Default)]
pub struct NodeDisks {
    /// The Raft log's two files.
    pub log: [Disk; 2],
    pub state: Disk,
}

/// A running node's handle, registered when it starts and dropped when it crashes.
#[derive(Clone)]
pub struct Live {
    pub node: Arc<Node>,
}

impl Live {
    pub fn region(&self) -> &RegionId {
        &self.node.spec().region
    }
}

#[derive(Debug, Default)]
pub struct Trace {
    pub lines: Vec<String>,
    pub dropped: u64,
}

impl Trace {
    pub fn push(&mut self, at: std::time::Duration, line: String) {
        if self.lines.len() < TRACE_LINES_MAX {
            self.lines.push(format!("[{:>9.3}s] {line}", at.as_secs_f64()));
        } else {
            self.dropped += 1;
        }
    }
}

/// What the residency check saw: every cross-region message, and the breaches.
#[derive(Debug, Default)]
pub struct Residency {
    /// Cross-region messages inspected, by kind of request.
    pub inspected: BTreeMap<String, u64>,
    /// Messages (or answers) that carried a canary into a region the restricted dataset may
    /// not reach.
    pub breaches: Vec<String>,
    /// Reads of the restricted dataset that a gateway outside its region refused, as it must.
    pub refused: u64,
}

pub struct World {
    pub seed: u64,
    pub config: ClusterConfig,
    disks: BTreeMap<u64, NodeDisks>,
    snapshots: tempfile::TempDir,
    bootstrapped: Mutex<BTreeSet<RegionId>>,
    pub live: Mutex<BTreeMap<u64, Live>>,
    pub faults: Arc<Mutex<MessageFaults>>,
    /// Each node's clock offset from simulated time, in ms (the clock-skew nemesis).
    pub skew: Mutex<BTreeMap<u64, i64>>,
    /// The regions the restricted dataset may reach (its policy's allowed regions).
    pub restricted_allowed: BTreeSet<RegionId>,
    /// The clients apply a policy that lets the restricted dataset out (to prove the check).
    pub leaky_policy: bool,
    pub residency: Mutex<Residency>,
    pub history: Mutex<History>,
    pub trace: Mutex<Trace>,
    /// Set once the clients' policy is active.
    pub policy_active: AtomicBool,
    /// The policy the nemesis wants applied now (`None`: the first one).
    pub policy_wanted: Mutex<Option<crate::workload::Policy>>,
    /// Set by the harness when the faults are over: clients then read every key once more.
    pub healed: AtomicBool,
    /// Every key any client wrote ("dataset/key"), in order of first write.
    pub keys: Mutex<Vec<String>>,
    /// Reads at `consistency=local` that the gateway answered with a value.
    pub local_reads: std::sync::atomic::AtomicU64,
    /// Every (key, value) a client tried to write, recorded before the call.
    pub attempted: Mutex<BTreeSet<(String, String)>>,
    /// Every (key, value) a local read returned.
    pub local_answers: Mutex<Vec<(String, String)>>,
    /// The multi-primary workload's acknowledged writes, and the histories of `notes`' versions
    /// seen on the way.
    pub multi: Mutex<multi_primary::Record>,
}

impl World {
    pub fn new(
        seed: u64,
        config: ClusterConfig,
        restricted_allowed: BTreeSet<RegionId>,
        lying_disks: bool,
        leaky_policy: bool,
    ) -> std::io::Result<Arc<World>> {
        let disk = || if lying_disks { Disk::lying() } else { Disk::new() };
        let disks = config
            .topology
            .nodes()
            .iter()
            .map(|n| (n.id, NodeDisks { log: [disk(), disk()], state: disk() }))
            .collect();
        Ok(Arc::new(World {
            seed,
            config,
            disks,
            snapshots: tempfile::Builder::new().prefix("meridian-sim-").tempdir()?,
            bootstrapped: Mutex::new(BTreeSet::new()),
            live: Mutex::new(BTreeMap::new()),
            faults: Arc::new(Mutex::new(MessageFaults::new(StdRng::seed_from_u64(seed ^ 0x6d65_7373_6167_6573)))),
            skew: Mutex::new(BTreeMap::new()),
            restricted_allowed,
            leaky_policy,
            residency: Mutex::new(Residency::default()),
            history: Mutex::new(History::new()),
            trace: Mutex::new(Trace::default()),
            policy_active: AtomicBool::new(false),
            policy_wanted: Mutex::new(None),
            healed: AtomicBool::new(false),
            keys: Mutex::new(Vec::new()),
            local_reads: std::sync::atomic::AtomicU64::new(0),
            attempted: Mutex::new(BTreeSet::new()),
            local_answers: Mutex::new(Vec::new()),
            multi: Mutex::new(multi_primary::Record::default()),
        }))
    }

    pub fn node_ids(&self) -> Vec<u64> {
        self.config.topology.nodes().iter().map(|n| n.id).collect()
    }

    pub fn spec(&self, id: u64) -> NodeSpec {
        self.config.topology.node(id).cloned().expect("a node of the simulation")
    }

    pub fn regions(&self) -> Vec<RegionId> {
        self.config.topology.regions().iter().map(|r| r.name.clone()).collect()
    }

    /// The node ids of one region, in id order.
    pub fn region_ids(&self, region: &RegionId) -> Vec<u64> {
        self.config.topology.region_nodes(region).iter().map(|n| n.id).collect()
    }

    pub fn disks(&self, id: u64) -> NodeDisks {
        self.disks.get(&id).cloned().expect("a node of the simulation")
    }

    /// Where node `id` keeps its snapshot file (a real file: snapshots are written and synced
    /// whole, so a crash cannot leave half of one).
    pub fn snapshot_path(&self, id: u64) -> PathBuf {
        self.snapshots.path().join(format!("snapshot-{id}.bin"))
    }

    /// True if `region`'s group was already formed; the first caller forms it.
    pub fn take_bootstrap(&self, region: &RegionId) -> bool {
        !self.bootstrapped.lock().expect("bootstrap lock").insert(region.clone())
    }

    /// Node `id`'s wall clock: simulated time plus its skew.
    pub fn clock_ms(&self, id: u64) -> u64 {
        let skew = self.skew.lock().expect("skew lock").get(&id).copied().unwrap_or(0);
        sim_now_ms().saturating_add_signed(skew)
    }

    pub fn node_started(&self, id: u64, live: Live) {
        self.live.lock().expect("live lock").insert(id, live);
        self.event(format!("node {id} started"));
    }

    /// Forget a crashed node's handles; returns them if it was running.
    pub fn node_crashed(&self, id: u64) -> Option<Live> {
        self.live.lock().expect("live lock").remove(&id)
    }

    pub fn live(&self) -> BTreeMap<u64, Live> {
        self.live.lock().expect("live lock").clone()
    }

    /// Check one message crossing from `from`'s region to `to`'s: if it carries a canary of
    /// the restricted dataset into a region outside its allowed ones, that is a breach.
    /// `raw` is the body as encoded, before compression.
    pub fn inspect_crossing(
        &self,
        from: &NodeSpec,
        to: &NodeSpec,
        direction: &str,
        raw: &[u8],
        req: Option<&PeerRequestV1>,
    ) {
        let kind = req.map_or("reply", kind_of);
        let mut r = self.residency.lock().expect("residency lock");
        *r.inspected.entry(kind.to_owned()).or_default() += 1;
        if self.restricted_allowed.contains(&to.region) {
            return;
        }
        if let Some(at) = find(raw, CANARY_PREFIX.as_bytes()) {
            let end = (at + CANARY_PREFIX.len() + 16).min(raw.len());
            let line = format!(
                "a {direction} ({kind}) from node {} ({}) to node {} ({}) carried {}",
                from.id,
                from.region,
                to.id,
                to.region,
                String::from_utf8_lossy(&raw[at..end])
            );
            drop(r);
            self.event(format!("residency breach: {line}"));
            self.residency.lock().expect("residency lock").breaches.push(line);
        }
    }

    /// Note every object of `notes` a cross-region request carries (a link batch, a repair):
    /// what it holds is what its sender's copy held when it was read.
    pub fn observe_changes(&self, req: &PeerRequestV1) {
        let changes = match req {
            PeerRequestV1::ShipBatch(b) => b.changes.iter().chain(b.early.iter()),
            PeerRequestV1::Repair(r) => r.changes.iter().chain([].iter()),
            _ => return,
        };
        let mut multi = None;
        for c in changes.filter(|c| c.dataset == NOTES) {
            multi.get_or_insert_with(|| self.multi.lock().expect("multi lock")).observe(&c.key, &c.object);
        }
    }

    /// Note the copies of `notes/key` every running node of `region` holds now.
    pub fn observe_region(&self, region: &RegionId, key: &str) {
        for live in self.live().values().filter(|l| l.region() == region) {
            if let Ok(Some(obj)) = live.node.reader().get(NOTES, key) {
                self.multi.lock().expect("multi lock").observe(key, &obj);
            }
        }
    }

    /// Record an event at the current simulated time (inside a host).
    pub fn event(&self, line: String) {
        self.trace.lock().expect("trace lock").push(sim_elapsed(), line);
    }

    /// Record an event at a time the harness read from the simulation.
    pub fn event_at(&self, at: std::time::Duration, line: String) {
        self.trace.lock().expect("trace lock").push(at, line);
    }

    pub fn healed(&self) -> bool {
        self.healed.load(Ordering::SeqCst)
    }
}

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A request's name in the residency counts.
fn kind_of(req: &PeerRequestV1) -> &'static str {
    match req {
        PeerRequestV1::Raft(_) => "raft",
        PeerRequestV1::Write(_) | PeerRequestV1::WriteAtomic(_) => "forwarded write",
        PeerRequestV1::Read { .. } | PeerRequestV1::List { .. } => "forwarded read",
        PeerRequestV1::ReadCopy { .. } | PeerRequestV1::ListCopy { .. } => "copy read",
        PeerRequestV1::Failover { .. } | PeerRequestV1::Promote { .. } | PeerRequestV1::EndPromotion { .. } => {
            "failover"
        }
        PeerRequestV1::ShipBatch(_) => "link batch",
        PeerRequestV1::Repair(_) => "repair",
        PeerRequestV1::Digest { .. } | PeerRequestV1::DigestEntries { .. } | PeerRequestV1::FetchObjects { .. } => {
            "anti-entropy"
        }
        PeerRequestV1::Status | PeerRequestV1::ReplicationState | PeerRequestV1::DatasetSizes => "status",
        PeerRequestV1::SetFaults(_) => "faults",
        PeerRequestV1::CollectTombstones { .. } => "tombstone collection",
    }
}

/// The clock a simulated node reads: simulated time plus the node's skew.
pub struct SimClock {
    pub id: u64,
    pub world: Arc<World>,
}

impl meridian_node::clock::Clock for SimClock {
    fn now_ms(&self) -> u64 {
        self.world.clock_ms(self.id)
    }
}
