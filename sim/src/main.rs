//! `meridian-sim`: run seeds of the deterministic simulation, or replay one with its trace.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use meridian_sim::coverage::Coverage;
use meridian_sim::invariants::Violation;
use meridian_sim::{run_seed, RunConfig, RunReport};

/// Most seeds one invocation runs.
const SEEDS_MAX: u64 = 100_000;
/// Longest simulated run under faults.
const DURATION_MAX_SECS: u64 = 3_600;

/// Run Meridian's real node code (three regions of three zones: Raft, links, policy, routing,
/// anti-entropy) on a simulated network, clocks and disks under seeded faults, and check its
/// invariants: no restricted byte sent to or stored in a forbidden region, no two nodes of a
/// region apply different entries at one log index, no acknowledged write lost, per-key
/// linearizability, replicas of a region that agree, allowed copies that converge after the
/// heal, and no acknowledged multi-primary write that vanishes without a trace.
///
/// Each seed replays exactly: a failing seed prints the command that reproduces it with a
/// readable trace of events.
#[derive(Parser, Debug)]
#[command(name = "meridian-sim", version)]
struct Args {
    /// Run this many seeds, starting at --first-seed.
    #[arg(long, default_value_t = 10, conflicts_with = "seed")]
    seeds: u64,

    /// The first seed of a batch.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,

    /// Also run this many seeds drawn at random (their numbers are printed, so a failure can
    /// be replayed).
    #[arg(long, default_value_t = 0, conflicts_with = "seed")]
    fresh: u64,

    /// Replay one seed and print its event trace.
    #[arg(long)]
    seed: Option<u64>,

    /// Simulated seconds of faults per seed, before the heal and the final checks.
    #[arg(long, default_value_t = 60)]
    duration_secs: u64,

    /// Seeds run at once, each on its own thread (default: the machine's cores).
    #[arg(long)]
    jobs: Option<usize>,

    /// Use disks that acknowledge syncs without making anything durable. The invariants
    /// should then fail on some seeds: this proves they can.
    #[arg(long)]
    lying_disks: bool,

    /// Apply a policy that mirrors the restricted dataset to every region, while the residency
    /// check still expects it in eu-west only. Runs should then fail: this proves the check
    /// can.
    #[arg(long)]
    leaky_policy: bool,

    /// Merge changes from other regions by the newest version alone, with no version vectors
    /// and no conflict records (what merging was before multi-primary datasets). The
    /// multi-primary check should then fail: this proves it can.
    #[arg(long)]
    plain_lww: bool,

    /// Write each seed's event trace to DIR/seed-N.trace (a batch prints none).
    #[arg(long, value_name = "DIR")]
    trace_dir: Option<std::path::PathBuf>,

    /// Internal: run --seed and print its report as JSON (how a batch runs each seed in a
    /// fresh process).
    #[arg(long, hide = true, requires = "seed")]
    child: bool,

    /// Fail unless every fault and path in the coverage report happened at least once.
    #[arg(long)]
    require_coverage: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.duration_secs == 0 || args.duration_secs > DURATION_MAX_SECS {
        eprintln!("error: --duration-secs must be between 1 and {DURATION_MAX_SECS}");
        return ExitCode::from(2);
    }
    if args.seeds + args.fresh > SEEDS_MAX {
        eprintln!("error: at most {SEEDS_MAX} seeds per invocation");
        return ExitCode::from(2);
    }
    let duration = Duration::from_secs(args.duration_secs);
    if let Some(seed) = args.seed {
        let report = run_seed(&RunConfig {
            seed,
            duration,
            lying_disks: args.lying_disks,
            leaky_policy: args.leaky_policy,
            plain_lww: args.plain_lww,
        });
        if args.child {
            return match serde_json::to_string(&report) {
                Ok(json) => {
                    println!("{json}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: encode the report: {e}");
                    ExitCode::from(2)
                }
            };
        }
        for line in &report.trace {
            println!("{line}");
        }
        print_run(&report);
        print!("{}", report.coverage.render());
        return if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    let mut seeds: Vec<u64> = (args.first_seed..args.first_seed.saturating_add(args.seeds)).collect();
    let fresh: Vec<u64> = (0..args.fresh).map(|_| rand::random::<u32>() as u64 + 1_000_000).collect();
    if !fresh.is_empty() {
        println!("fresh seeds: {fresh:?}");
    }
    seeds.extend(fresh);
    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let started = Instant::now();
    if let Some(dir) = &args.trace_dir {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("error: create {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    }
    let mut flags = Vec::new();
    if args.lying_disks {
        flags.push("--lying-disks");
    }
    if args.leaky_policy {
        flags.push("--leaky-policy");
    }
    if args.plain_lww {
        flags.push("--plain-lww");
    }
    let reports = match run_batch(&seeds, args.duration_secs, &flags, jobs) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = &args.trace_dir {
        for r in &reports {
            let path = dir.join(format!("seed-{}.trace", r.seed));
            if let Err(e) = std::fs::write(&path, r.trace.join("\n") + "\n") {
                eprintln!("error: write {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    let wall = started.elapsed();

    let mut coverage = Coverage::default();
    let mut failed = Vec::new();
    let (mut simulated, mut busy) = (Duration::ZERO, Duration::ZERO);
    for r in &reports {
        coverage.merge(&r.coverage);
        simulated += r.simulated;
        busy += r.real;
        if !r.passed() {
            failed.push(r);
        }
    }
    println!(
        "{} seeds: {} passed, {} failed; {:.0} simulated s in {:.1} s of wall time on {jobs} threads \
         ({:.1} simulated s per real s per thread)",
        reports.len(),
        reports.len() - failed.len(),
        failed.len(),
        simulated.as_secs_f64(),
        wall.as_secs_f64(),
        simulated.as_secs_f64() / busy.as_secs_f64().max(1e-9),
    );
    if let Some(slowest) = reports.iter().filter_map(|r| r.converged_after).max() {
        println!("allowed copies converged at most {:.1} simulated s after the heal", slowest.as_secs_f64());
    }
    print!("{}", coverage.render());
    for r in &failed {
        print_run(r);
        println!(
            "  replay: (cd sim && cargo run --release -- --seed {} --duration-secs {}{}{})",
            r.seed,
            args.duration_secs,
            if flags.is_empty() { "" } else { " " },
            flags.join(" ")
        );
    }
    let missing = coverage.missing();
    if args.require_coverage && !missing.is_empty() {
        println!("coverage lost: never happened in these seeds: {}", missing.join(", "));
        return ExitCode::FAILURE;
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_run(r: &RunReport) {
    println!(
        "seed {}: {} — {:.1} simulated s in {:.2} s, {} client calls ({} checked for linearizability), fingerprint {:016x}",
        r.seed,
        if r.passed() { "passed" } else { "FAILED" },
        r.simulated.as_secs_f64(),
        r.real.as_secs_f64(),
        r.ops,
        r.ops_checked,
        r.fingerprint
    );
    if let Some(c) = r.converged_after {
        println!("  allowed copies converged {:.1} simulated s after the heal", c.as_secs_f64());
    }
    for v in &r.violations {
        println!("  violated: {v}");
    }
}

/// Run seeds `jobs` at a time, each in a child process of this binary (a seed's outcome is a
/// function of the seed only in a fresh process); reports come back in seed order.
fn run_batch(seeds: &[u64], duration_secs: u64, flags: &[&str], jobs: usize) -> Result<Vec<RunReport>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("find this program: {e}"))?;
    let exe = exe.as_path();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.min(seeds.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(&seed) = seeds.get(i) else { break };
                let r = run_child(exe, seed, duration_secs, flags).unwrap_or_else(|why| RunReport {
                    seed,
                    simulated: Duration::ZERO,
                    real: Duration::ZERO,
                    coverage: Coverage::default(),
                    violations: vec![Violation { invariant: "the run completes".into(), detail: why }],
                    trace: Vec::new(),
                    converged_after: None,
                    ops: 0,
                    ops_checked: 0,
                    fingerprint: 0,
                });
                eprintln!(
                    "seed {seed}: {} ({:.2} s, fingerprint {:016x})",
                    if r.passed() { "passed" } else { "FAILED" },
                    r.real.as_secs_f64(),
                    r.fingerprint
                );
                results.lock().expect("results lock").push((i, r));
            });
        }
    });
    let mut results = results.into_inner().expect("results lock");
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

fn run_child(exe: &std::path::Path, seed: u64, duration_secs: u64, flags: &[&str]) -> Result<RunReport, String> {
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--child", "--seed", &seed.to_string(), "--duration-secs", &duration_secs.to_string()]);
    cmd.args(flags);
    let out = cmd.stderr(std::process::Stdio::inherit()).output().map_err(|e| format!("run seed {seed}: {e}"))?;
    if !out.status.success() {
        return Err(format!("seed {seed}: the run's process exited with {}", out.status));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("seed {seed}: unreadable report: {e}"))
}
