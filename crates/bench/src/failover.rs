//! `meridian bench failover`: in-region failover against etcd. Each trial starts a fresh
//! three-member cluster on loopback (Meridian: three `meridian server` processes with their
//! default Raft timing, heartbeat 100 ms and election timeout 400–800 ms; etcd 3.4 with
//! `--election-timeout 400`, which it also randomizes up to twice that, and
//! `--heartbeat-interval 80`, since it wants at least five heartbeats per election timeout),
//! keeps one client writing through a member that is not the leader, kills the leader
//! with SIGKILL, and times from the kill to the end of the first write that was sent after
//! it and succeeded. Trials alternate etcd and Meridian; the report gives each system's
//! times, their medians and the ratio of the medians.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::etcd::EtcdCluster;
use crate::load::{http_client, write_once, Payload, Target};
use crate::meridian::MeridianCluster;
use crate::ports::{ensure_free, PortPlan};

/// Most trials per system.
const TRIALS_MAX: usize = 100;
/// How long a cluster has to start and elect.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a write may take before the client gives up on it and sends the next.
const WRITE_TIMEOUT: Duration = Duration::from_millis(2_000);
/// How long a trial waits for a write to succeed after the kill.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Successful writes through the follower before the kill.
const WARM_WRITES: usize = 50;

#[derive(Debug, Clone, Args)]
pub struct FailoverArgs {
    /// Trials per system (1-100), alternating etcd and Meridian.
    #[arg(long, default_value_t = 10)]
    pub trials: usize,
    /// The etcd binary (Debian's etcd-server).
    #[arg(long, default_value = "/usr/bin/etcd")]
    pub etcd_bin: PathBuf,
    /// First port of the range the clusters use.
    #[arg(long, default_value_t = 24100)]
    pub base_port: u16,
    /// Meridian's election timeout window, MIN-MAX in milliseconds (default: the node's own
    /// default, 400-800). openraft's leader lease is the maximum, so a narrower window fails
    /// over sooner; etcd keeps `--election-timeout 400` either way.
    #[arg(long, value_parser = parse_window)]
    pub meridian_election_ms: Option<(u64, u64)>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum System {
    Etcd,
    Meridian,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Trial {
    system: System,
    /// From the kill to the end of the first successful write sent after it, in ms.
    recovery_ms: f64,
    /// Writes sent after the kill that failed before that one.
    failed_writes: u64,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    trials: Vec<Trial>,
    etcd_median_ms: f64,
    meridian_median_ms: f64,
    /// Meridian's median over etcd's: at most 1.0 is as fast or faster.
    ratio: f64,
}

pub async fn run_cli(args: FailoverArgs) -> anyhow::Result<()> {
    if !(1..=TRIALS_MAX).contains(&args.trials) {
        bail!("--trials must be between 1 and {TRIALS_MAX}");
    }
    crate::etcd::check_binary(&args.etcd_bin)?;
    let exe = std::env::current_exe().context("find the meridian executable")?;
    crate::meridian::check_executable(&exe)?;
    let plan = PortPlan::new(args.base_port)?;
    let mut trials = Vec::new();
    for i in 0..args.trials {
        for system in [System::Etcd, System::Meridian] {
            let t = trial(system, &args, &exe, &plan).await.with_context(|| format!("{system:?} trial {}", i + 1))?;
            if !args.json {
                eprintln!(
                    "{:?} trial {}: {:.0} ms ({} failed writes)",
                    t.system,
                    i + 1,
                    t.recovery_ms,
                    t.failed_writes
                );
            }
            trials.push(t);
        }
    }
    let median = |s: System| {
        let mut v: Vec<f64> = trials.iter().filter(|t| t.system == s).map(|t| t.recovery_ms).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let (e, m) = (median(System::Etcd), median(System::Meridian));
    let report = Report { trials, etcd_median_ms: e, meridian_median_ms: m, ratio: m / e };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let each = |s: System| {
            report.trials.iter().filter(|t| t.system == s).map(|t| format!("{:.0}", t.recovery_ms)).collect::<Vec<_>>()
        };
        println!("kill -9 the leader -> first successful write through a follower (ms)");
        println!("  etcd:     median {e:.0}  [{}]", each(System::Etcd).join(" "));
        println!("  meridian: median {m:.0}  [{}]", each(System::Meridian).join(" "));
        println!(
            "  ratio (meridian / etcd, medians): {:.2}{}",
            report.ratio,
            if report.ratio <= 1.0 { "" } else { "  (target: at most 1.0)" }
        );
    }
    Ok(())
}

/// One trial: a fresh cluster, a writer through a follower, the leader killed.
async fn trial(system: System, args: &FailoverArgs, exe: &std::path::Path, plan: &PortPlan) -> anyhow::Result<Trial> {
    let dir = tempfile::Builder::new().prefix("meridian-bench-failover-").tempdir()?;
    let http = http_client(4, WRITE_TIMEOUT)?;
    match system {
        System::Etcd => {
            ensure_free(&plan.etcd_ports())?;
            // etcd wants its election timeout at least five heartbeats.
            let extra = ["--heartbeat-interval", "80", "--election-timeout", "400"].map(String::from);
            let mut c = EtcdCluster::start_with(&args.etcd_bin, dir.path(), plan, &http, START_TIMEOUT, &extra).await?;
            let leader = c.leader_url(&http, START_TIMEOUT).await?;
            let urls = c.client_urls().to_vec();
            let (li, fi) = pick(&urls, &leader)?;
            let target = Target::Etcd { base: urls[fi].clone() };
            let t = measure(system, &http, &target, || c.kill_member(li)).await;
            c.stop();
            t
        }
        System::Meridian => {
            ensure_free(&plan.meridian_ports())?;
            let mut config = crate::meridian::render_config(plan);
            if let Some((min, max)) = args.meridian_election_ms {
                config.push_str(&format!(
                    "\n[raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = {min}\nelection_timeout_max_ms = {max}\n"
                ));
            }
            let ports = plan.meridian_api.to_vec();
            let mut c = MeridianCluster::start_config(exe, dir.path(), &config, &ports, &http, START_TIMEOUT).await?;
            let leader = c.leader_url(&http, START_TIMEOUT).await.context("no Meridian leader")?;
            let urls = c.api_urls().to_vec();
            let (li, fi) = pick(&urls, &leader)?;
            let target = Target::Meridian { base: urls[fi].clone() };
            let t = measure(system, &http, &target, || c.kill_member(li)).await;
            c.stop();
            t
        }
    }
}

fn parse_window(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?} is not MIN-MAX, e.g. 400-450"))?;
    let parse = |x: &str| x.trim().parse::<u64>().map_err(|_| format!("{x:?} is not a number of milliseconds"));
    let (min, max) = (parse(a)?, parse(b)?);
    if !(201..=60_000).contains(&min) || max <= min || max > 60_000 {
        return Err(format!(
            "{s}: the minimum must be 201 to 60000 ms (more than two 100 ms heartbeats) and below the maximum"
        ));
    }
    Ok((min, max))
}

/// The leader's index and a follower's.
fn pick(urls: &[String], leader: &str) -> anyhow::Result<(usize, usize)> {
    let li = urls.iter().position(|u| u == leader).with_context(|| format!("the leader {leader} is not a member"))?;
    Ok((li, (li + 1) % urls.len()))
}

/// Write through `target` until warm, kill the leader, and time the first success after.
async fn measure(
    system: System,
    http: &reqwest::Client,
    target: &Target,
    kill: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Trial> {
    let payload = Payload::new(64, 7);
    crate::load::wait_writable(http, target, START_TIMEOUT).await?;
    for i in 0..WARM_WRITES {
        write_once(http, target, &format!("warm-{i:04}"), &payload).await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let writer = {
        let (http, target, payload, stop, killed_at) =
            (http.clone(), target.clone(), payload.clone(), stop.clone(), killed_at.clone());
        tokio::spawn(async move {
            let mut failed = 0u64;
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let sent = Instant::now();
                let ok = write_once(&http, &target, &format!("k-{seq:08}"), &payload).await.is_ok();
                let after_kill = killed_at.lock().expect("lock").is_some_and(|k| sent >= k);
                match (ok, after_kill) {
                    (true, true) => return Some((Instant::now(), failed)),
                    (false, true) => failed += 1,
                    (false, false) => tokio::time::sleep(Duration::from_millis(5)).await,
                    (true, false) => {}
                }
            }
            None
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The clock starts once the leader is dead and reaped: a write sent after that cannot
    // have been taken by it.
    kill()?;
    let at = Instant::now();
    *killed_at.lock().expect("lock") = Some(at);
    let outcome = tokio::time::timeout(RECOVERY_TIMEOUT, writer).await;
    stop.store(true, Ordering::Relaxed);
    match outcome {
        Ok(Ok(Some((done, failed_writes)))) => {
            let recovery_ms = done.duration_since(at).as_secs_f64() * 1000.0;
            Ok(Trial { system, recovery_ms, failed_writes })
        }
        Ok(Ok(None)) | Ok(Err(_)) => bail!("the writer stopped without a result"),
        Err(_) => bail!("no write succeeded within {RECOVERY_TIMEOUT:?} of killing the leader"),
    }
}
