//! Meridian's deterministic simulator.
//!
//! One run is one seed: three nodes of one region run Meridian's real Raft group (openraft
//! with Meridian's log store and state machine over redb) on turmoil's simulated hosts and
//! network, with simulated disks that lose unsynced writes on a crash, while clients write and
//! read and the nemesis injects faults. Everything that varies (election timeouts, the
//! scheduler, message latencies, faults, the workload) is drawn from the seed, so a seed
//! replays exactly. See `sim/README.md`.

pub mod coverage;
pub mod disk;
pub mod invariants;
pub mod nemesis;
pub mod net;
pub mod node;
pub mod workload;
pub mod world;

#[cfg(not(tokio_unstable))]
compile_error!(
    "the simulator needs `--cfg tokio_unstable` to seed tokio; build it from the sim/ directory, \
     whose .cargo/config.toml sets the flag"
);

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use coverage::Coverage;
use invariants::Violation;
use nemesis::Nemesis;
use net::host_name;
use world::World;

/// Nodes in the simulated region (one per zone).
pub const NODES: u64 = 3;
/// After the heal, how long the nodes may take to apply the same log.
pub const SETTLE_DEADLINE: Duration = Duration::from_secs(30);
/// Segments a simulated socket may queue (turmoil's limit; overflowing it fails the run).
pub const TCP_QUEUE_MAX: usize = 1 << 16;
/// Simulated time for the heal, the final reads and settling, beyond the faulty part.
pub const TAIL_ALLOWANCE: Duration = Duration::from_secs(180);

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub seed: u64,
    /// Simulated time under faults, before the heal.
    pub duration: Duration,
    /// Disks that acknowledge syncs without making anything durable (to prove the checks).
    pub lying_disks: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunReport {
    pub seed: u64,
    pub simulated: Duration,
    pub real: Duration,
    pub coverage: Coverage,
    pub violations: Vec<Violation>,
    pub trace: Vec<String>,
    /// Client calls recorded, and how many the linearizability check placed.
    pub ops: usize,
    pub ops_checked: usize,
    /// A digest of the trace and the history: equal for two runs of one seed.
    pub fingerprint: u64,
}

impl RunReport {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// FNV-1a, for the run's fingerprint.
fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= *b as u64;
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

/// Stack of the thread a seed runs on (openraft's futures are large).
const RUN_STACK_BYTES: usize = 32 << 20;

/// Run one seed to the end and check every invariant, on a thread of its own.
///
/// A seed's outcome is a function of the seed only in a fresh process: runs of other seeds
/// earlier in the same process have been seen to change it (some library keeps process-wide
/// state). The command line therefore runs every seed of a batch in a child process.
pub fn run_seed(cfg: &RunConfig) -> RunReport {
    let started = Instant::now();
    let outcome = std::thread::scope(|s| {
        std::thread::Builder::new()
            .name(format!("seed-{}", cfg.seed))
            .stack_size(RUN_STACK_BYTES)
            .spawn_scoped(s, || run_on_this_thread(cfg))
            .expect("spawn a thread for the run")
            .join()
    });
    match outcome {
        Ok(report) => report,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".into());
            RunReport {
                seed: cfg.seed,
                simulated: Duration::ZERO,
                real: started.elapsed(),
                coverage: Coverage::default(),
                violations: vec![Violation {
                    invariant: "the run completes".into(),
                    detail: format!("panicked: {why}"),
                }],
                trace: Vec::new(),
                ops: 0,
                ops_checked: 0,
                fingerprint: 0,
            }
        }
    }
}

fn run_on_this_thread(cfg: &RunConfig) -> RunReport {
    let started = Instant::now();
    meridian_raft::rt::seed_thread_rng(cfg.seed);
    let world = World::new(cfg.seed, NODES, cfg.lying_disks).expect("a temporary directory for snapshots");
    let mut sim = turmoil::Builder::new()
        .rng_seed(cfg.seed)
        .simulation_duration(cfg.duration + TAIL_ALLOWANCE)
        .tick_duration(Duration::from_millis(1))
        .min_message_latency(Duration::from_micros(200))
        .max_message_latency(nemesis::BASE_LATENCY_MAX)
        // A pause releases every connection attempt made during it at once; turmoil fails
        // the run if a listener's queue overflows.
        .tcp_capacity(TCP_QUEUE_MAX)
        .build();
    for id in world.node_ids() {
        let w = world.clone();
        sim.host(host_name(id), move || node::run(id, w.clone()));
    }
    sim.client(net::CLIENT_HOST, workload::run(world.clone()));

    let mut cov = Coverage::default();
    let mut violations = Vec::new();
    let mut nemesis = Nemesis::new(cfg.seed, world.node_ids());
    let mut agree = invariants::applied_entries_agree::AppliedEntriesAgree::default();
    let mut healed_at: Option<Duration> = None;
    loop {
        let now = sim.elapsed();
        if healed_at.is_none() && now >= cfg.duration {
            nemesis.heal(&mut sim, &world, now);
            world.healed.store(true, Ordering::SeqCst);
            healed_at = Some(now);
        }
        if healed_at.is_none() {
            nemesis.tick(&mut sim, &world, &mut cov, now);
        }
        let finished = match sim.step() {
            Ok(f) => f,
            Err(e) => {
                violations.push(Violation { invariant: "the run completes".into(), detail: e.to_string() });
                break;
            }
        };
        if let Err(v) = agree.observe(&world.live(), sim.elapsed(), &world, &mut cov) {
            violations.push(v);
            break;
        }
        if finished {
            break;
        }
    }

    if violations.is_empty() {
        // Let every node apply the same log, then compare them.
        let deadline = sim.elapsed() + SETTLE_DEADLINE;
        let settled = loop {
            if let Some(index) = invariants::replicas_agree::settled(&world.live(), NODES as usize) {
                break Some(index);
            }
            if sim.elapsed() > deadline || sim.step().is_err() {
                break None;
            }
        };
        match settled {
            None => violations.push(Violation {
                invariant: "replicas agree".into(),
                detail: format!("the nodes did not apply the same log within {SETTLE_DEADLINE:?} of the final reads"),
            }),
            Some(index) => {
                world.event_at(sim.elapsed(), format!("every node applied the log through index {index}"));
                let keys = world.keys.lock().expect("keys lock").clone();
                if let Err(v) = invariants::replicas_agree::check(&world.live(), &keys) {
                    violations.push(v);
                }
            }
        }
    }

    let history = world.history.lock().expect("history lock").clone();
    let ops = history.len();
    let acked = history
        .ops()
        .iter()
        .filter(|o| {
            o.outcome == meridian_testkit::Outcome::Ok && matches!(o.kind, meridian_testkit::OpKind::Write { .. })
        })
        .count();
    cov.hit_n("acknowledged write", acked as u64);
    let mut ops_checked = 0;
    if let Some(healed) = healed_at {
        if let Err(v) = invariants::acknowledged_writes::check(&history, healed.as_nanos() as u64) {
            violations.push(v);
        }
    }
    match invariants::linearizable::check_history(&history) {
        Ok(stats) => ops_checked = stats.ops_checked,
        Err(v) => violations.push(v),
    }
    let snapshots: u64 = world.live().values().filter(|n| n.raft.metrics().borrow().snapshot.is_some()).count() as u64;
    cov.hit_n("snapshot built", snapshots);

    let simulated = sim.elapsed();
    drop(sim);
    let trace = std::mem::take(&mut world.trace.lock().expect("trace lock").lines);
    let mut fingerprint = 0xcbf2_9ce4_8422_2325u64;
    for line in &trace {
        fnv(&mut fingerprint, line.as_bytes());
    }
    for op in history.ops() {
        fnv(&mut fingerprint, format!("{op:?}").as_bytes());
    }
    RunReport {
        seed: cfg.seed,
        simulated,
        real: started.elapsed(),
        coverage: cov,
        violations,
        trace,
        ops,
        ops_checked,
        fingerprint,
    }
}
