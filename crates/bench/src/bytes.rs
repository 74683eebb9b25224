//! `meridian bench bytes`: what a selective policy saves on the wire. The same workload runs
//! twice on fresh two-region clusters: once under a policy that mirrors everything to the
//! other region (allow-all), once under a policy that mirrors only a fraction `f` of the
//! changes (one dataset mirrored, the other kept at home). It prints the ratio of bytes on the
//! wire between the regions (selective / allow-all; target <= f + 0.02), and the link's wire
//! bytes per replicated change against the change's key plus value (target <= 1.1).
//!
//! Every message body between the regions counts, in both directions and of every kind (link
//! batches and their answers, heartbeats, policy sync), as each node's
//! `meridian_peer_cross_region_bytes_total{encoding="wire"}` reports it: what left the
//! process after compression. HTTP framing is not counted.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use reqwest::Client;
use serde::Serialize;

use crate::meridian::MeridianCluster;

const SOURCE: &str = "us-east";
const DEST: &str = "eu-west";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest workload accepted (every key is kept in memory by the generator).
const WRITES_MAX: usize = 1_000_000;

/// Measure cross-region bytes under a selective policy against an allow-all policy.
///
/// For each fraction f, starts two fresh clusters on 127.0.0.1 (two regions of one node each)
/// and runs the same writes on both: keys split between a dataset mirrored to the other region
/// (a share f of the writes) and one that the selective policy keeps at home and the
/// allow-all policy mirrors too. Prints the ratio of cross-region wire bytes (target: at most
/// f + 0.02) and the link's wire bytes per replicated change over key plus value (target: at
/// most 1.1).
#[derive(Args, Debug, Clone)]
pub struct BytesArgs {
    /// Shares of the writes the selective policy sends to the other region, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.25,0.5")]
    pub fractions: Vec<f64>,
    /// Writes per run.
    #[arg(long, default_value_t = 4000)]
    pub writes: usize,
    /// Bytes of each value (a JSON string of random letters and digits).
    #[arg(long, default_value_t = 256)]
    pub value_bytes: usize,
    /// Concurrent writers.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// First port of the range the clusters use (four ports).
    #[arg(long, default_value_t = 26000)]
    pub base_port: u16,
    /// The meridian executable to run the nodes with (default: this one).
    #[arg(long)]
    pub meridian_exe: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Which policy a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    AllowAll,
    Selective,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunBytes {
    pub policy: PolicyKind,
    /// Changes the destination merged through the link.
    pub replicated: u64,
    /// Every cross-region message body, both directions, both nodes, on the wire.
    pub wire_bytes: u64,
    /// The link's batches and their answers only, on the wire and as encoded.
    pub link_wire_bytes: u64,
    pub link_raw_bytes: u64,
}

/// One fraction's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct FractionReport {
    pub fraction: f64,
    pub allow_all: RunBytes,
    pub selective: RunBytes,
    pub ratio: f64,
    pub target: f64,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct BytesReport {
    pub writes: usize,
    pub key_bytes: usize,
    pub value_bytes: usize,
    pub fractions: Vec<FractionReport>,
    /// Link wire bytes per replicated change over key plus value, under allow-all (every
    /// change replicated), the worst over the runs.
    pub per_change_ratio: f64,
    pub per_change_met: bool,
}

/// The key of write `i` and whether it goes to the mirrored dataset: writes are spread so
/// that the first `f` of every 1000 are mirrored.
fn assignment(i: usize, f: f64) -> (String, bool) {
    (format!("k{i:06}"), ((i % 1000) as f64) < f * 1000.0)
}

/// A JSON string of `len` bytes (quotes included) of letters and digits, deterministic in `i`.
fn value(i: usize, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut s = String::with_capacity(len);
    s.push('"');
    for _ in 0..len.saturating_sub(2) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push(ALPHABET[(x % ALPHABET.len() as u64) as usize] as char);
    }
    s.push('"');
    s
}

fn policy(kind: PolicyKind) -> String {
    let home = "locality = \"global\"\nclassification = \"public\"\nhome = [\"us-east\"]\n";
    let local_mirrors = match kind {
        PolicyKind::AllowAll => "mirrors = \"all-allowed\"\n",
        PolicyKind::Selective => "allowed = [\"us-east\"]\n",
    };
    format!(
        "format = 1\n[[dataset]]\nname = \"shared\"\n{home}mirrors = \"all-allowed\"\n\n\
         [[dataset]]\nname = \"local\"\n{home}{local_mirrors}"
    )
}

fn config(base: u16) -> String {
    let mut s = String::new();
    for region in [SOURCE, DEST] {
        let _ = writeln!(s, "[[regions]]\nname = \"{region}\"\n");
    }
    for (id, region) in [(1u16, SOURCE), (2, DEST)] {
        let (api, peer) = (base + 2 * (id - 1), base + 2 * (id - 1) + 1);
        let _ = writeln!(
            s,
            "[[nodes]]\nid = {id}\nregion = \"{region}\"\nzone = \"a\"\n\
             api_addr = \"127.0.0.1:{api}\"\npeer_addr = \"127.0.0.1:{peer}\"\n"
        );
    }
    // No anti-entropy round inside a run: its digests would be noise in both runs alike.
    s.push_str("[replication]\nanti_entropy_interval_ms = 86400000\n");
    s
}

/// Sum of `meridian_peer_cross_region_bytes_total` samples whose labels contain every one of
/// `labels`.
async fn cross_region_bytes(http: &Client, api: &str, labels: &[&str]) -> anyhow::Result<u64> {
    let text = http.get(format!("{api}/metrics")).send().await?.error_for_status()?.text().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("meridian_peer_cross_region_bytes_total{") && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// Changes the destination merged from the source through the link.
async fn received(http: &Client, api: &str) -> anyhow::Result<u64> {
    let v: serde_json::Value = http.get(format!("{api}/v1/replication")).send().await?.json().await?;
    let regions = v["regions"].as_array().context("no regions in /v1/replication")?;
    let dest = regions.iter().find(|r| r["region"] == DEST).context("no destination region")?;
    Ok(dest["received"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p[0] == SOURCE))
        .and_then(|p| p[1].as_u64())
        .unwrap_or(0))
}

async fn apply_policy(exe: &std::path::Path, dir: &std::path::Path, api: &str, kind: PolicyKind) -> anyhow::Result<()> {
    let file = dir.join("policy.toml");
    std::fs::write(&file, policy(kind))?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["policy", "apply"]).arg(&file).args(["--endpoint", api]);
        let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("meridian policy apply failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn put(http: &Client, api: &str, dataset: &str, key: &str, body: String) -> anyhow::Result<()> {
    for attempt in 0..20 {
        let r = http
            .put(format!("{api}/v1/datasets/{dataset}/keys/{key}"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => return Ok(()),
            // Policy copies converge for a moment after an apply; anything else is a failure.
            Ok(r) if r.status().as_u16() == 503 && attempt < 19 => {}
            Ok(r) => bail!("PUT {dataset}/{key}: {}", r.status()),
            Err(_) if attempt < 19 => {}
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("PUT {dataset}/{key} kept failing")
}

/// One run: a fresh cluster under `kind`, the workload, and the bytes it cost.
async fn run_once(args: &BytesArgs, exe: &std::path::Path, f: f64, kind: PolicyKind) -> anyhow::Result<RunBytes> {
    let dir = tempfile::Builder::new().prefix("meridian-bench-bytes-").tempdir()?;
    let http = Client::builder().timeout(Duration::from_secs(30)).build()?;
    let ports = [args.base_port, args.base_port + 2];
    let cluster =
        MeridianCluster::start_config(exe, dir.path(), &config(args.base_port), &ports, &http, STARTUP_TIMEOUT)
            .await
            .context("start the cluster")?;
    let (src, dst) = (cluster.api_urls()[0].clone(), cluster.api_urls()[1].clone());
    apply_policy(exe, dir.path(), &src, kind).await?;
    // A probe through the link, so the measurement starts with both policy copies in place.
    put(&http, &src, "shared", "probe", "1".into()).await?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    while received(&http, &src).await.unwrap_or(0) < 1 {
        if Instant::now() > deadline {
            bail!("the probe never reached {DEST}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before_received = received(&http, &src).await?;
    let total = |http: Client, a: String, b: String| async move {
        Ok::<u64, anyhow::Error>(
            cross_region_bytes(&http, &a, &["encoding=\"wire\""]).await?
                + cross_region_bytes(&http, &b, &["encoding=\"wire\""]).await?,
        )
    };
    let link = |http: Client, a: String, enc: &'static str| async move {
        cross_region_bytes(&http, &a, &[enc, "kind=\"ship\""]).await
    };
    let before = total(http.clone(), src.clone(), dst.clone()).await?;
    let before_link = link(http.clone(), src.clone(), "encoding=\"wire\"").await?;
    let before_raw = link(http.clone(), src.clone(), "encoding=\"raw\"").await?;

    // The workload: the same keys and values whatever the policy.
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (http, src, next, n, len) = (http.clone(), src.clone(), next.clone(), args.writes, args.value_bytes);
        writers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                let (key, mirrored) = assignment(i, f);
                put(&http, &src, if mirrored { "shared" } else { "local" }, &key, value(i, len)).await?;
            }
        }));
    }
    for w in writers {
        w.await??;
    }
    let expected = match kind {
        PolicyKind::AllowAll => args.writes as u64,
        PolicyKind::Selective => (0..args.writes).filter(|i| assignment(*i, f).1).count() as u64,
    };
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        let got = received(&http, &src).await? - before_received;
        if got >= expected {
            break;
        }
        if Instant::now() > deadline {
            bail!("{DEST} merged {got} of {expected} changes within {DRAIN_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = total(http.clone(), src.clone(), dst.clone()).await?;
    let run = RunBytes {
        policy: kind,
        replicated: received(&http, &src).await? - before_received,
        wire_bytes: after - before,
        link_wire_bytes: link(http.clone(), src.clone(), "encoding=\"wire\"").await? - before_link,
        link_raw_bytes: link(http.clone(), src.clone(), "encoding=\"raw\"").await? - before_raw,
    };
    cluster.stop();
    Ok(run)
}

pub async fn run(args: &BytesArgs) -> anyhow::Result<BytesReport> {
    if args.writes == 0 || args.writes > WRITES_MAX {
        bail!("--writes must be between 1 and {WRITES_MAX}");
    }
    if args.value_bytes < 2 || args.value_bytes > 1 << 20 {
        bail!("--value-bytes must be between 2 and 1048576");
    }
    if args.fractions.iter().any(|f| !(0.0..=1.0).contains(f)) || args.fractions.is_empty() {
        bail!("--fractions must be between 0 and 1");
    }
    if args.concurrency == 0 || args.concurrency > 256 {
        bail!("--concurrency must be between 1 and 256");
    }
    let exe = match &args.meridian_exe {
        Some(e) => e.clone(),
        None => std::env::current_exe().context("find this executable")?,
    };
    let key_bytes = assignment(0, 0.0).0.len();
    let mut fractions = Vec::new();
    let mut per_change_ratio: f64 = 0.0;
    for &f in &args.fractions {
        let allow_all = run_once(args, &exe, f, PolicyKind::AllowAll).await?;
        let selective = run_once(args, &exe, f, PolicyKind::Selective).await?;
        let ratio = selective.wire_bytes as f64 / allow_all.wire_bytes.max(1) as f64;
        per_change_ratio = per_change_ratio.max(
            allow_all.link_wire_bytes as f64
                / allow_all.replicated.max(1) as f64
                / (key_bytes + args.value_bytes) as f64,
        );
        let target = f + 0.02;
        fractions.push(FractionReport { fraction: f, allow_all, selective, ratio, target, met: ratio <= target });
    }
    Ok(BytesReport {
        writes: args.writes,
        key_bytes,
        value_bytes: args.value_bytes,
        fractions,
        per_change_met: per_change_ratio <= 1.1,
        per_change_ratio,
    })
}

pub fn render(r: &BytesReport) -> String {
    let mut t = comfy_table::Table::new();
    t.set_header(vec!["f", "allow-all wire bytes", "selective wire bytes", "ratio", "target (f + 0.02)", "met"]);
    for f in &r.fractions {
        t.add_row(vec![
            format!("{:.2}", f.fraction),
            f.allow_all.wire_bytes.to_string(),
            f.selective.wire_bytes.to_string(),
            format!("{:.3}", f.ratio),
            format!("{:.2}", f.target),
            if f.met { "yes" } else { "no" }.into(),
        ]);
    }
    let mut out = format!("{t}\n");
    let _ = writeln!(
        out,
        "link wire bytes per replicated change / (key + value) = {:.3} ({} writes of {} + {} bytes; target 1.1: {})",
        r.per_change_ratio,
        r.writes,
        r.key_bytes,
        r.value_bytes,
        if r.per_change_met { "met" } else { "not met" }
    );
    out
}

pub async fn run_cli(args: BytesArgs) -> anyhow::Result<()> {
    let report = run(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirrored_share_is_the_fraction_and_values_have_their_size() {
        let n = 4000;
        let mirrored = (0..n).filter(|i| assignment(*i, 0.25).1).count();
        assert_eq!(mirrored, 1000);
        assert_eq!((0..n).filter(|i| assignment(*i, 1.0).1).count(), n);
        assert_eq!(value(7, 256).len(), 256);
        assert_eq!(value(7, 256), value(7, 256));
        assert_ne!(value(7, 256), value(8, 256));
        assert!(serde_json::from_str::<String>(&value(3, 64)).is_ok());
    }
}
