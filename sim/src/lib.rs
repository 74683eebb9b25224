//! Meridian's deterministic simulator.
//!
//! One run is one seed: three regions of three zones run Meridian's real node code (each
//! region's Raft group, the links between regions, the policy, routing and anti-entropy) on
//! turmoil's simulated hosts and network, with simulated clocks and simulated disks that lose
//! unsynced writes on a crash, while clients write and read through any node and the nemesis
//! injects faults. Everything that varies (election timeouts, the scheduler, message latencies,
//! faults, clock skew, the workload) is drawn from the seed, so a seed replays exactly. See
//! `sim/README.md`.

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

/// Segments a simulated socket may queue (turmoil's limit; overflowing it fails the run).
pub const TCP_QUEUE_MAX: usize = 1 << 16;
/// Simulated time for the heal, the final reads, settling and convergence, beyond the faulty
/// part.
pub const TAIL_ALLOWANCE: Duration = Duration::from_secs(300);

/// The simulated cluster: the demo's topology (us-east, eu-west, ap-south, three zones each,
/// 40 to 110 ms apart), with Raft's timers and snapshots scaled down so that runs elect,
/// snapshot and purge often, and anti-entropy every few seconds.
pub fn cluster_config() -> meridian_node::config::ClusterConfig {
    let mut c = meridian_node::config::ClusterConfig::demo(net::PORT);
    c.raft.heartbeat_ms = 50;
    c.raft.election_timeout_min_ms = 200;
    c.raft.election_timeout_max_ms = 400;
    c.raft.snapshot_every_entries = 300;
    c.raft.log_entries_kept_after_snapshot = 50;
    c.replication.anti_entropy_interval_ms = 5_000;
    // Small, so that a long partition overflows it and the link catches up by a scan.
    c.replication.outbox_entries_max = 16;
    c
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub seed: u64,
    /// Simulated time under faults, before the heal.
    pub duration: Duration,
    /// Disks that acknowledge syncs without making anything durable (to prove the checks).
    pub lying_disks: bool,
    /// A policy that mirrors the restricted dataset everywhere (to prove the residency check).
    pub leaky_policy: bool,
    /// Merge changes from other regions by the newest version alone, with no version vectors
    /// and no conflict records (to prove the multi-primary check).
    pub plain_lww: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunReport {
    pub seed: u64,
    pub simulated: Duration,
    pub real: Duration,
    pub coverage: Coverage,
    pub violations: Vec<Violation>,
    pub trace: Vec<String>,
    /// From the heal until every allowed copy of the mirrored dataset was identical.
    pub converged_after: Option<Duration>,
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
                converged_after: None,
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
    meridian_raft::merge::PLAIN_LWW_FOR_NEGATIVE_CONTROL.store(cfg.plain_lww, Ordering::SeqCst);
    let allowed = [meridian_core::RegionId::new(workload::RESTRICTED_REGION).expect("a valid region")].into();
    let world = World::new(cfg.seed, cluster_config(), allowed, cfg.lying_disks, cfg.leaky_policy)
        .expect("a temporary directory for snapshots");
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
    let mut nemesis = Nemesis::new(cfg.seed, &world);
    let mut agree = invariants::applied_entries_agree::AppliedEntriesAgree::default();
    let mut healed_at: Option<Duration> = None;
    loop {
        let now = sim.elapsed();
        if healed_at.is_none() && now >= cfg.duration {
            nemesis.heal(&mut sim, &world, now);
            world.healed.store(true, Ordering::SeqCst);
            healed_at = Some(now);
        }
        if healed_at.is_none() && world.policy_active.load(Ordering::SeqCst) {
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

    let mut converged_after = None;
    if violations.is_empty() {
        // Let every region apply one log on all its nodes and every allowed copy converge,
        // then compare.
        let keys = world.keys.lock().expect("keys lock").clone();
        let multi_keys = world.multi.lock().expect("multi lock").keys.clone();
        let regions: Vec<Vec<u64>> = world.regions().iter().map(|r| world.region_ids(r)).collect();
        let all = world.node_ids();
        let deadline = sim.elapsed() + invariants::convergence::CONVERGE_DEADLINE;
        let outcome = loop {
            let live = world.live();
            let settled = regions.iter().all(|ids| invariants::replicas_agree::settled(&live, ids).is_some());
            let difference = invariants::convergence::difference(&live, &all, workload::MIRRORED, &keys)
                .or_else(|| invariants::convergence::whole_difference(&live, &all, &multi_keys));
            if settled && difference.is_none() {
                break Ok(());
            }
            if sim.elapsed() > deadline || sim.step().is_err() {
                break Err((settled, difference));
            }
        };
        match outcome {
            Err((false, _)) => violations.push(Violation {
                invariant: "replicas agree".into(),
                detail: format!(
                    "some region's nodes did not apply the same log within {:?} of the final reads",
                    invariants::convergence::CONVERGE_DEADLINE
                ),
            }),
            Err((true, difference)) => violations.push(invariants::convergence::violation(format!(
                "not identical within {:?} of the final reads: {}",
                invariants::convergence::CONVERGE_DEADLINE,
                difference.unwrap_or_default()
            ))),
            Ok(()) => {
                let at = sim.elapsed();
                converged_after = healed_at.map(|h| at.saturating_sub(h));
                world.event_at(
                    at,
                    "every region applied one log on all its nodes; every allowed copy is identical".into(),
                );
                let live = world.live();
                for ids in &regions {
                    if let Err(v) = invariants::replicas_agree::check(&live, ids, &keys) {
                        violations.push(v);
                    }
                }
                let mut multi = world.multi.lock().expect("multi lock");
                match invariants::multi_primary::check(&mut multi, &live) {
                    Ok(stats) => {
                        cov.hit_n("set add found in every copy", stats.adds);
                        cov.hit_n("lww write kept", stats.kept);
                        cov.hit_n("lww write in a conflict record", stats.recorded);
                        cov.hit_n("lww write superseded in its region", stats.superseded_here);
                        cov.hit_n("lww write superseded by another region", stats.superseded_elsewhere);
                    }
                    Err(broken) => violations.extend(broken),
                }
                drop(multi);
                // Conflicts each region recorded, by dataset and rule (one node per region:
                // its nodes agree).
                for ids in &regions {
                    let Some(node) = ids.iter().find_map(|id| live.get(id)) else { continue };
                    if let Ok(log) = node.node.reader().conflict_log() {
                        let n = |d: &str, r: &str| log.recorded.get(d).and_then(|m| m.get(r)).copied().unwrap_or(0);
                        cov.hit_n("concurrent set adds merged", n(workload::CARTS, "crdt"));
                        cov.hit_n("lww conflict recorded", n(workload::NOTES, "lww"));
                    }
                }
            }
        }
    }
    if let Err(v) = invariants::residency::check_messages(&world) {
        violations.push(v);
    }
    if let Err(v) = invariants::residency::check_stored(&world, &world.live()) {
        violations.push(v);
    }
    if let Err(v) = invariants::local_reads::check(&world) {
        violations.push(v);
    }
    {
        let r = world.residency.lock().expect("residency lock");
        for (kind, n) in &r.inspected {
            cov.hit_n(&format!("crossing: {kind}"), *n);
        }
        cov.hit_n("restricted read refused outside its region", r.refused);
    }
    cov.hit_n("local read answered by the gateway", world.local_reads.load(std::sync::atomic::Ordering::Relaxed));
    let checked = world.local_answers.lock().expect("local answers lock").len();
    cov.hit_n("local read value checked against the writes", checked as u64);

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
    {
        let multi = world.multi.lock().expect("multi lock");
        cov.hit_n("multi-primary call refused", multi.refused);
        cov.hit_n("multi-primary call with unknown outcome", multi.unknown);
    }
    if let Some(healed) = healed_at {
        if let Err(v) = invariants::acknowledged_writes::check(&history, healed.as_nanos() as u64) {
            violations.push(v);
        }
    }
    let (verdicts, broken) = invariants::linearizable::check_history(&history);
    let ops_checked = verdicts.stats.map_or(0, |s| s.ops_checked);
    violations.extend(broken);
    cov.hit_n("key linearizable for stateright too", verdicts.reference_agreed);
    cov.hit_n("key stateright could not decide in its budget", verdicts.reference_undecided);
    for live in world.live().values() {
        cov.count_node(&live.node);
    }
    let snapshots: u64 =
        world.live().values().filter(|n| n.node.raft().metrics().borrow().snapshot.is_some()).count() as u64;
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
    {
        let multi = world.multi.lock().expect("multi lock");
        for add in &multi.adds {
            fnv(&mut fingerprint, format!("{add:?}").as_bytes());
        }
        for put in &multi.puts {
            fnv(&mut fingerprint, format!("{put:?}").as_bytes());
        }
    }
    RunReport {
        seed: cfg.seed,
        simulated,
        real: started.elapsed(),
        coverage: cov,
        violations,
        trace,
        converged_after,
        ops,
        ops_checked,
        fingerprint,
    }
}
