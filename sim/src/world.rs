//! What the harness and the simulated hosts share: each node's disks, the handles of the
//! nodes now running, the message faults, the clients' history and the event trace.
//!
//! Everything runs on one thread, so the locks here never contend; they exist because the
//! hosts' futures must be `Send` for tokio.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use meridian_raft::{Raft, StateMachineReader};
use meridian_testkit::History;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::disk::Disk;
use crate::net::MessageFaults;

/// Simulated wall-clock time starts here (2026-01-01T00:00:00Z).
pub const EPOCH_MS: u64 = 1_767_225_600_000;
/// Most trace lines kept; later ones are counted, not stored.
pub const TRACE_LINES_MAX: usize = 200_000;

/// Simulated time since the run started, read inside a host.
pub fn sim_elapsed() -> std::time::Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

/// The simulated wall clock, in ms since the Unix epoch.
pub fn sim_now_ms() -> u64 {
    EPOCH_MS + sim_elapsed().as_millis() as u64
}

#[derive(Debug, Clone, Default)]
pub struct NodeDisks {
    pub log: Disk,
    pub state: Disk,
}

/// A running node's handles, registered when it starts and dropped when it crashes.
#[derive(Clone)]
pub struct Live {
    pub raft: Raft,
    pub reader: StateMachineReader,
    /// The log index through which the state machine is durable (it commits without fsync
    /// between syncs; the log is the write-ahead log).
    pub durable: Arc<AtomicU64>,
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

pub struct World {
    pub seed: u64,
    node_ids: Vec<u64>,
    disks: BTreeMap<u64, NodeDisks>,
    snapshots: tempfile::TempDir,
    bootstrapped: AtomicBool,
    pub live: Mutex<BTreeMap<u64, Live>>,
    pub faults: Arc<Mutex<MessageFaults>>,
    pub history: Mutex<History>,
    pub trace: Mutex<Trace>,
    /// Set by the harness when the faults are over: clients then read every key once more.
    pub healed: AtomicBool,
    /// Every key any client wrote, in order of first write.
    pub keys: Mutex<Vec<String>>,
}

impl World {
    pub fn new(seed: u64, nodes: u64, lying_disks: bool) -> std::io::Result<Arc<World>> {
        let node_ids: Vec<u64> = (1..=nodes).collect();
        let disk = || if lying_disks { Disk::lying() } else { Disk::new() };
        let disks = node_ids.iter().map(|&id| (id, NodeDisks { log: disk(), state: disk() })).collect();
        Ok(Arc::new(World {
            seed,
            node_ids,
            disks,
            snapshots: tempfile::Builder::new().prefix("meridian-sim-").tempdir()?,
            bootstrapped: AtomicBool::new(false),
            live: Mutex::new(BTreeMap::new()),
            faults: Arc::new(Mutex::new(MessageFaults::new(StdRng::seed_from_u64(seed ^ 0x6d65_7373_6167_6573)))),
            history: Mutex::new(History::new()),
            trace: Mutex::new(Trace::default()),
            healed: AtomicBool::new(false),
            keys: Mutex::new(Vec::new()),
        }))
    }

    pub fn node_ids(&self) -> Vec<u64> {
        self.node_ids.clone()
    }

    pub fn disks(&self, id: u64) -> NodeDisks {
        self.disks.get(&id).cloned().expect("a node of the simulation")
    }

    /// Where node `id` keeps its snapshot file (a real file: snapshots are written and synced
    /// whole, so a crash cannot leave half of one).
    pub fn snapshot_path(&self, id: u64) -> PathBuf {
        self.snapshots.path().join(format!("snapshot-{id}.bin"))
    }

    /// True if the group was already formed; the first caller forms it.
    pub fn take_bootstrap(&self) -> bool {
        self.bootstrapped.swap(true, Ordering::SeqCst)
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

    /// Record an event at the current simulated time (inside a host).
    pub fn event(&self, line: String) {
        self.trace.lock().expect("trace lock").push(sim_elapsed(), line);
    }

    /// Record an event at a time the harness read from the simulation.
    pub fn event_at(&self, at: std::time::Duration, line: String) {
        self.trace.lock().expect("trace lock").push(at, line);
    }
}
