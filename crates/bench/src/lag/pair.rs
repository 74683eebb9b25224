//! The two systems under test, each as a source and a destination region on loopback:
//! starting them, waiting until they mirror, and stopping them.
//!
//! Where the delay sits. Meridian: in the sending node's peer transport (`[[wan]]
//! one_way_ms`), before a request goes out and again before its reply is handed back; a
//! shipped batch crosses it once on its way to the destination. etcd: in a
//! [`DelayProxy`] between the source member and `etcdctl make-mirror`, each direction; the
//! mirror's watch stream crosses it once on its way to the mirror, which then writes to the
//! destination member directly (the mirror stands in the destination region). Writers and
//! pollers talk to each region directly, without delay, as clients in that region would.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use reqwest::Client;

use super::measure::{key_for, Destination};
use super::{http_url, LagOptions, LagPorts};
use crate::delay_proxy::DelayProxy;
use crate::etcd::EtcdCluster;
use crate::load::{self, Payload, Target};
use crate::meridian::MeridianCluster;
use crate::ports::loopback;
use crate::procs::ProcessGuard;
use crate::{System, STARTUP_TIMEOUT};

/// Meridian's source region (the dataset's home).
pub const SOURCE_REGION: &str = "us-east";
/// Meridian's destination region (a mirror).
pub const DEST_REGION: &str = "eu-west";
/// The policy that mirrors the `bench` dataset from its home to every region allowed.
pub const POLICY: &str = "format = 1\n\n[[dataset]]\nname = \"bench\"\nlocality = \"global\"\n\
    classification = \"public\"\nhome = [\"us-east\"]\nmirrors = \"all-allowed\"\n";
/// The prefix make-mirror copies; every etcd key the benchmark writes carries it.
pub const ETCD_PREFIX: &str = "bench/";
/// What to tell the user when etcdctl is missing.
pub const ETCDCTL_INSTALL_HINT: &str = "install Debian's etcd-client (`apt-get install etcd-client`)";

/// Renders the two-region, one-node-per-region configuration with `one_way_ms` between them.
/// Replication settings stay at their defaults.
pub fn render_meridian_config(ports: &LagPorts, one_way_ms: u64) -> String {
    let mut s = String::new();
    for region in [SOURCE_REGION, DEST_REGION] {
        let _ = writeln!(s, "[[regions]]\nname = \"{region}\"\n");
    }
    let nodes = [
        (1, SOURCE_REGION, ports.meridian_source_api, ports.meridian_source_peer),
        (2, DEST_REGION, ports.meridian_dest_api, ports.meridian_dest_peer),
    ];
    for (id, region, api, peer) in nodes {
        let _ = writeln!(
            s,
            "[[nodes]]\nid = {id}\nregion = \"{region}\"\nzone = \"a\"\n\
             api_addr = \"127.0.0.1:{api}\"\npeer_addr = \"127.0.0.1:{peer}\"\n"
        );
    }
    let _ = writeln!(s, "[[wan]]\nregions = [\"{SOURCE_REGION}\", \"{DEST_REGION}\"]\none_way_ms = {one_way_ms}");
    s
}

/// The `etcdctl` arguments: read the source through `proxy`, write the destination directly.
pub fn make_mirror_args(proxy: u16, dest_client: u16) -> Vec<String> {
    vec![
        format!("--endpoints={}", loopback(proxy)),
        "make-mirror".into(),
        format!("--prefix={ETCD_PREFIX}"),
        http_url(dest_client),
    ]
}

/// Fails with an installation hint if `etcdctl` does not exist.
pub fn check_etcdctl(bin: &Path) -> anyhow::Result<()> {
    if !bin.is_file() {
        bail!("etcdctl not found at {}: {ETCDCTL_INSTALL_HINT}, or point --etcdctl-bin at etcdctl 3.4", bin.display());
    }
    Ok(())
}

/// A running source and destination; dropping it stops every process it started.
#[derive(Debug)]
pub enum Pair {
    /// Two Meridian regions of one node each.
    Meridian {
        /// Both nodes.
        cluster: MeridianCluster,
        /// `us-east`'s API.
        source: String,
        /// `eu-west`'s API.
        dest: String,
    },
    /// Two single-member etcd clusters and a mirror between them.
    Etcd {
        /// Written to.
        source: EtcdCluster,
        /// Mirrored to.
        dest: EtcdCluster,
        /// Between the source and the mirror.
        proxy: DelayProxy,
        /// `etcdctl make-mirror`.
        mirror: ProcessGuard,
    },
}

impl Pair {
    /// Starts `system` with `one_way` between its regions, data and logs under `dir`.
    pub async fn start(
        opts: &LagOptions,
        system: System,
        one_way: Duration,
        ports: &LagPorts,
        dir: &Path,
        http: &Client,
    ) -> anyhow::Result<Self> {
        match system {
            System::Meridian => {
                let config = render_meridian_config(ports, one_way.as_millis() as u64);
                let api = [ports.meridian_source_api, ports.meridian_dest_api];
                let cluster =
                    MeridianCluster::start_config(&opts.meridian_exe, dir, &config, &api, http, STARTUP_TIMEOUT)
                        .await?;
                let (source, dest) = (http_url(ports.meridian_source_api), http_url(ports.meridian_dest_api));
                apply_policy(&opts.meridian_exe, dir, &source, STARTUP_TIMEOUT).await?;
                Ok(Pair::Meridian { cluster, source, dest })
            }
            System::Etcd => {
                check_etcdctl(&opts.etcdctl_bin)?;
                let (bin, t) = (&opts.etcd_bin, STARTUP_TIMEOUT);
                let source = EtcdCluster::start_single(
                    bin,
                    dir,
                    "src",
                    ports.etcd_source_client,
                    ports.etcd_source_peer,
                    http,
                    t,
                )
                .await?;
                let dest =
                    EtcdCluster::start_single(bin, dir, "dst", ports.etcd_dest_client, ports.etcd_dest_peer, http, t)
                        .await?;
                let proxy =
                    DelayProxy::start(loopback(ports.proxy), loopback(ports.etcd_source_client), one_way).await?;
                let mut mirror = ProcessGuard::new();
                let mut cmd = Command::new(&opts.etcdctl_bin);
                cmd.args(make_mirror_args(ports.proxy, ports.etcd_dest_client)).env("ETCDCTL_API", "3");
                mirror.spawn("etcdctl make-mirror", cmd, &dir.join("make-mirror.log"))?;
                Ok(Pair::Etcd { source, dest, proxy, mirror })
            }
        }
    }

    /// Where writes go.
    pub fn source(&self) -> Target {
        match self {
            Pair::Meridian { source, .. } => Target::Meridian { base: source.clone() },
            Pair::Etcd { source, .. } => Target::Etcd { base: source.client_urls()[0].clone() },
        }
    }

    /// Where samples are looked for.
    pub fn destination(&self) -> Destination {
        match self {
            Pair::Meridian { dest, .. } => Destination::Meridian { base: dest.clone() },
            Pair::Etcd { dest, .. } => Destination::Etcd { base: dest.client_urls()[0].clone() },
        }
    }

    /// Writes a probe key at the source and waits until the destination shows it, so the
    /// measurement starts only once the policy (Meridian) or the mirror (etcd) is in effect.
    pub async fn wait_mirroring(&mut self, http: &Client, timeout: Duration) -> anyhow::Result<()> {
        let source = self.source();
        let dest = self.destination();
        load::wait_writable(http, &source, timeout).await?;
        let key = key_for(&source, "probe-mirrored");
        let payload = Payload::new(16, 0);
        let deadline = Instant::now() + timeout;
        let mut last = String::from("not polled yet");
        loop {
            self.ensure_running()?;
            // Rewrite the probe each round: a change withheld before the policy arrived is
            // shipped by the backfill anyway, but a fresh write does not depend on it.
            if let Err(e) = load::write_once(http, &source, &key, &payload).await {
                last = format!("write at the source: {e:#}");
            }
            for _ in 0..10 {
                match dest.is_visible(http, &key).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => last = "not visible at the destination".to_string(),
                    Err(e) => last = format!("read at the destination: {e:#}"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if Instant::now() >= deadline {
                bail!("the destination did not show a key written at the source within {timeout:?}: {last}");
            }
        }
    }

    /// Fails if any process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self {
            Pair::Meridian { cluster, .. } => cluster.ensure_running(),
            Pair::Etcd { source, dest, mirror, .. } => {
                source.ensure_running()?;
                dest.ensure_running()?;
                mirror.ensure_running()
            }
        }
    }

    /// Stops everything now (also done on drop).
    pub fn stop(self) {
        match self {
            Pair::Meridian { cluster, .. } => cluster.stop(),
            Pair::Etcd { source, dest, proxy, mut mirror } => {
                mirror.kill_all();
                drop(proxy);
                source.stop();
                dest.stop();
            }
        }
    }
}

/// `meridian policy apply DIR/policy.toml --endpoint SOURCE`, repeated until it succeeds or
/// `timeout` passes (the authority region may still be electing its leader).
async fn apply_policy(exe: &Path, dir: &Path, source: &str, timeout: Duration) -> anyhow::Result<()> {
    let file = dir.join("policy.toml");
    std::fs::write(&file, POLICY).with_context(|| format!("write {}", file.display()))?;
    let deadline = Instant::now() + timeout;
    loop {
        let mut cmd = Command::new(exe);
        cmd.arg("policy").arg("apply").arg(&file).arg("--endpoint").arg(source).arg("--timeout-secs").arg("10");
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .context("join the policy apply command")?
            .context("run meridian policy apply")?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "meridian policy apply did not succeed within {timeout:?}: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meridian_config_and_policy_are_accepted_as_written() {
        let ports = LagPorts::new(24100).unwrap();
        let text = render_meridian_config(&ports, 50);
        let config = meridian_node::config::ClusterConfig::parse(&text, "lag.toml").unwrap();
        let t = &config.topology;
        let names: Vec<String> = t.regions().iter().map(|r| r.name.to_string()).collect();
        assert_eq!(names, [SOURCE_REGION, DEST_REGION]);
        assert_eq!(t.nodes().len(), 2);
        let wan: Vec<u64> = t.wan().map(|(_, _, ms)| ms).collect();
        assert_eq!(wan, [50]);
        assert!(text.contains("api_addr = \"127.0.0.1:24105\"") && text.contains("peer_addr = \"127.0.0.1:24108\""));
        // The policy validates against that topology, as `meridian policy apply` will check it.
        meridian_policy::Policy::parse(POLICY, meridian_policy::Format::Toml, "policy.toml", Some(t)).unwrap();
    }

    #[test]
    fn mirror_reads_through_the_proxy_and_writes_directly() {
        let args = make_mirror_args(24104, 24102);
        assert_eq!(args, ["--endpoints=127.0.0.1:24104", "make-mirror", "--prefix=bench/", "http://127.0.0.1:24102"]);
    }

    #[test]
    fn missing_etcdctl_mentions_package() {
        let msg = check_etcdctl(Path::new("/nonexistent/etcdctl")).unwrap_err().to_string();
        assert!(msg.contains("apt-get install etcd-client"), "{msg}");
    }
}
