//! The composition root of one Meridian node. [`Node::start`] opens storage, starts the
//! region's Raft group, and builds and wires the node's components, each in its own module
//! with a narrow interface:
//!
//! - [`region::RegionGroup`]: the Raft handle, the state machine's reader, leadership, the
//!   read index;
//! - [`proposer::Proposer`]: the leader's batching proposer;
//! - [`policy::PolicyStore`]: the cached policy copy, placements, and the policy operations;
//! - [`gateway::Gateway`]: the one client API (`put`/`get`/`delete`/`list`), routing and
//!   forwarding;
//! - [`links::Links`]: cross-region shippers and the receiver;
//! - [`repair::Repair`]: anti-entropy, purge, verify;
//! - [`transport::PeerTransport`]: every byte between nodes;
//! - [`supervisor::Supervisor`]: every background task, by name, with its handle.
//!
//! No component reads another's fields. The node dispatches each peer request to the
//! component that owns it ([`Node::handle_peer`]) and stops them all ([`Node::shutdown`]).
//! It knows nothing of HTTP routes or JSON: the server crate maps requests onto the gateway
//! and the policy operations, and [`NodeError`] onto status codes.

pub mod chaos;
pub mod clock;
pub mod config;
pub mod error;
pub mod failover;
pub mod gateway;
pub mod health;
pub mod limits;
pub mod links;
pub mod metrics;
pub mod peer;
pub mod policy;
pub(crate) mod proposer;
pub mod region;
pub mod repair;
pub mod resolve;
pub mod session;
pub mod supervisor;
pub mod traffic;
pub mod transport;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meridian_core::{DatasetName, Key, NodeId, NodeSpec, RegionId, Topology};
use meridian_policy::{Format, Rollout};
use meridian_raft::network::{serve_raft_rpc, NetworkFactory};
use meridian_raft::{LogStore, Raft, StateMachineReader, StateMachineStore};

use crate::clock::Clock;
use crate::config::ClusterConfig;
use crate::gateway::Gateway;
use crate::links::{CommitBell, Links};
use crate::metrics::Metrics;
use crate::peer::{PeerRequest, PeerRequestV1, PeerResponse, PeerResponseV1, RegionReport, WriteOp};
use crate::policy::{
    ApplyOutcome, Explained, HistoryRecord, Plan, PolicyOpError, PolicyStore, RegionCopy, VersionRecord,
};
use crate::proposer::Proposer;
use crate::region::{RegionGroup, RegionParts};
use crate::repair::{PairVerdict, Repair};
use crate::supervisor::Supervisor;
use crate::transport::PeerTransport;

pub use crate::error::NodeError;
pub use crate::error::{Skip, SkipCause};
pub use crate::gateway::{Consistency, Object, Page, Precondition, ReadAt, RouteReason, Served, WriteOutcome};
pub use crate::limits::{LEADER_ATTEMPTS_MAX, REQUEST_TIMEOUT, STATUS_TIMEOUT};
pub use meridian_raft::conflicts::{ConflictLogState, ConflictQuery, ConflictRecord, ConflictState};

/// One region's status as seen from some node.
#[derive(Debug, Clone)]
pub struct RegionView {
    pub region: RegionId,
    pub report: Result<RegionReport, String>,
}

/// Which node of the topology this is, where it keeps its state, and its seams: the wall
/// clock, the wire under the peer transport, the storage.
pub struct NodeOptions {
    pub config: ClusterConfig,
    pub node_id: NodeId,
    pub storage: NodeStorage,
    /// The wall clock the HLC reads (the simulator passes its own).
    pub clock: Arc<dyn Clock>,
    /// What carries peer messages (production: HTTP; the simulator passes its own).
    pub wire: Arc<dyn transport::Wire>,
    /// Record every cross-region message body under this directory (residency audits).
    pub wire_capture: Option<PathBuf>,
}

/// Where a node's state lives.
pub enum NodeStorage {
    /// Files under a data directory: the Raft log's `raft.wal.0` and `raft.wal.1`, the state
    /// machine's `state.redb` and the snapshot (production).
    Dir(PathBuf),
    /// Files the caller opened (the simulator's disks), and the snapshot file's path.
    /// The log is written by a task, not a thread, so that a single-threaded simulation stays
    /// deterministic; each of its group commits takes what `log_sync_time` returns (the fsync).
    Opened {
        log: meridian_raft::wal::LogFiles,
        log_options: meridian_raft::wal::WalOptions,
        state: redb::Database,
        snapshot_path: PathBuf,
        log_sync_time: meridian_raft::log_store::SyncTime,
    },
}

#[cfg(feature = "http")]
impl NodeOptions {
    /// Options for a production node: files under `data_dir`, the system clock, HTTP.
    pub fn new(config: ClusterConfig, node_id: NodeId, data_dir: PathBuf) -> Self {
        NodeOptions {
            config,
            node_id,
            storage: NodeStorage::Dir(data_dir),
            clock: Arc::new(crate::clock::SystemClock),
            wire: Arc::new(transport::HttpWire::new()),
            wire_capture: None,
        }
    }
}

/// The handles every component that acts on the region is built from: shared, cloned, and
/// holding no state of their own.
#[derive(Clone)]
pub(crate) struct Deps {
    pub(crate) region: Arc<RegionGroup>,
    pub(crate) proposer: Arc<Proposer>,
    pub(crate) policy: Arc<PolicyStore>,
    pub(crate) transport: PeerTransport,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) clock: Arc<dyn Clock>,
    /// This node's probes of the other regions: which are up, and how far.
    pub(crate) health: Arc<health::Health>,
}

pub struct Node {
    spec: NodeSpec,
    config: ClusterConfig,
    region: Arc<RegionGroup>,
    /// Used by the node's own tests; every other user holds its own handle.
    #[cfg_attr(not(test), allow(dead_code))]
    proposer: Arc<Proposer>,
    policy: Arc<PolicyStore>,
    gateway: Arc<Gateway>,
    links: Arc<Links>,
    repair: Arc<Repair>,
    health: Arc<health::Health>,
    failover: Arc<failover::Failover>,
    transport: PeerTransport,
    metrics: Arc<Metrics>,
    supervisor: Arc<Supervisor>,
}

impl Node {
    /// Open storage, start the Raft group, and build and start the components. The caller
    /// serves the peer endpoint (so other voters can reach this one) and then calls
    /// [`Node::bootstrap`].
    pub async fn start(opts: NodeOptions) -> anyhow::Result<Arc<Node>> {
        let NodeOptions { config, node_id, storage, clock, wire, wire_capture } = opts;
        limits::check(&config).map_err(|e| anyhow::anyhow!("check the configuration's limits: {e}"))?;
        let topology = Arc::new(config.topology.clone());
        let spec =
            topology.node(node_id).cloned().ok_or_else(|| anyhow::anyhow!("node {node_id} is not in the topology"))?;
        let (mut sm, log) = open_storage(storage, &spec)?;
        // The leader's fsync overlaps its replication: its own entries are reported written
        // when queued (see `meridian_raft::log_store`). The two bounds below keep that safe.
        let log = log.ack_own_entries_at_submit(node_id);
        sm.set_outbox_limit(config.replication.outbox_entries_max);
        sm.set_value_limit(config.limits.value_bytes_max);
        sm.set_conflict_limits(config.replication.conflict_limits());
        // Nothing is applied, and no follower is told of a commit, past what this node's log
        // holds durably.
        let log_durability = log.durability();
        sm.wait_for_log(log_durability.clone());
        let log_stats = log.stats();
        let reader = sm.reader();
        let durable = sm.durable_point();
        let metrics = Arc::new(Metrics::new());
        let capture = match &wire_capture {
            Some(dir) => Some(
                transport::WireCapture::open(dir, node_id)
                    .map_err(|e| anyhow::anyhow!("open the wire capture under {}: {e}", dir.display()))?,
            ),
            None => None,
        };
        let transport = PeerTransport::new(wire, topology.clone(), spec.region.clone(), metrics.clone(), capture);
        let r = &config.raft;
        let raft_config = openraft::Config {
            cluster_name: format!("meridian-{}", spec.region),
            heartbeat_interval: r.heartbeat_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            max_payload_entries: limits::raft_payload_entries_max(config.limits.value_bytes_max),
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_every_entries),
            max_in_snapshot_log_to_keep: r.log_entries_kept_after_snapshot,
            ..Default::default()
        }
        .validate()?;
        let network = NetworkFactory::new(node_id, transport.clone()).bound_commit_by(log_durability.clone());
        let raft = Raft::new(node_id, Arc::new(raft_config), network, log, sm).await?;

        let supervisor = Arc::new(Supervisor::new());
        let region = Arc::new(RegionGroup::new(RegionParts {
            spec: spec.clone(),
            topology: topology.clone(),
            raft: raft.clone(),
            reader,
            metrics: metrics.clone(),
            log_stats,
            log_durability: log_durability.clone(),
            durable,
        }));
        let (proposer, proposer_worker) = Proposer::new(region.clone());
        let proposer = Arc::new(proposer);
        let policy = Arc::new(PolicyStore::new(&region, metrics.clone()));
        let health = Arc::new(health::Health::new(
            spec.region.clone(),
            topology.clone(),
            transport.clone(),
            clock.clone(),
            metrics.clone(),
            config.health.clone(),
        ));
        let deps = Deps {
            region: region.clone(),
            proposer: proposer.clone(),
            policy: policy.clone(),
            transport: transport.clone(),
            metrics: metrics.clone(),
            clock,
            health: health.clone(),
        };
        let commits = Arc::new(CommitBell::default());
        let gateway = Arc::new(Gateway::new(
            deps.clone(),
            config.clock.max_offset_ms,
            config.limits.value_bytes_max,
            commits.clone(),
        ));
        let link_rate = config.replication.link_rate_bytes_per_sec;
        let links = Arc::new(Links::new(deps.clone(), supervisor.clone(), commits, link_rate));
        let interval = Duration::from_millis(config.replication.anti_entropy_interval_ms);
        let failover = Arc::new(failover::Failover::new(deps.clone(), gateway.clone(), config.failover.clone()));
        let repair = Arc::new(Repair::new(
            deps,
            links.clone(),
            gateway.clone(),
            interval,
            config.replication.tombstone_grace_ms,
        ));

        if let Err(e) = policy.refresh() {
            tracing::warn!(error = %e, "load the policy copy");
        }
        let announcer = |stop| region::announce_held_back_commits(raft, log_durability, stop);
        supervisor.spawn_late_worker("commit-announcer", announcer);
        supervisor.spawn_late_worker("proposer", |stop| proposer_worker.run(stop));
        supervisor.spawn_worker("policy-sync", policy.clone().run_sync(region.clone(), gateway.clone()));
        links.start();
        supervisor.spawn_worker("anti-entropy", repair.clone().run());
        supervisor.spawn_worker("region-health", health.clone().run());
        let round = Duration::from_millis(config.health.probe_interval_ms);
        supervisor.spawn_worker("failover", failover.clone().run(round));
        Ok(Arc::new(Node {
            spec,
            config,
            region,
            proposer,
            policy,
            gateway,
            links,
            repair,
            health,
            failover,
            transport,
            metrics,
            supervisor,
        }))
    }

    /// Form the region's group on first start (see [`RegionGroup::bootstrap`]).
    pub async fn bootstrap(&self) -> anyhow::Result<()> {
        self.region.bootstrap().await
    }

    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }
    pub fn id(&self) -> NodeId {
        self.spec.id
    }
    pub fn topology(&self) -> &Topology {
        self.region.topology()
    }
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The client API: every read and write a client makes goes through it.
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }
    /// This node's seat in its region's Raft group (for status, tests and the simulator's
    /// invariants).
    pub fn region(&self) -> &RegionGroup {
        &self.region
    }
    /// The cached policy copy and its placements.
    pub fn policy(&self) -> &PolicyStore {
        &self.policy
    }

    /// The region's Raft handle (for tests and the simulator's invariants).
    pub fn raft(&self) -> &Raft {
        self.region.raft()
    }
    /// A reader of this node's state machine (for tests and the simulator's invariants).
    pub fn reader(&self) -> &StateMachineReader {
        self.region.reader()
    }
    /// The log index through which this node's state machine is durable.
    pub fn durable_point(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.region.durable_point()
    }
    /// How far this node's Raft log is on disk (for tests and the simulator's invariants).
    pub fn log_durability(&self) -> &meridian_raft::log_store::LogDurability {
        self.region.log_durability()
    }
    /// This node's view of its own region's group.
    pub fn region_report(&self) -> RegionReport {
        self.region.report()
    }
    /// Bring the Raft gauges and log counters up to date (called before each scrape).
    pub fn refresh_metrics(&self) {
        self.region.refresh_metrics();
        self.gateway.refresh_clock_metrics();
        if let Ok(n) = self.reader().tombstones_collected() {
            self.metrics().tombstones_collected.set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        match self.reader().conflict_log() {
            Ok(log) => {
                let m = self.metrics();
                m.conflict_records_held.set(log.held as i64);
                m.conflict_records_expired.set(log.expired as i64);
                for (dataset, rules) in &log.recorded {
                    for (rule, n) in rules {
                        let labels = metrics::ConflictLabels { dataset: dataset.clone(), rule: rule.clone() };
                        m.conflicts_recorded.get_or_create(&labels).set(*n as i64);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the conflict log for metrics"),
        }
    }

    // ---- policy operations (the policy store, reaching other regions through the gateway) --

    pub fn policy_authority(&self) -> RegionId {
        self.policy.authority()
    }
    pub fn refresh_policy(&self) -> Result<(), NodeError> {
        self.policy.refresh()
    }
    pub async fn policy_apply(
        &self,
        text: &str,
        format: Format,
        file: &str,
        rollout: Rollout,
        action: &str,
        now_ms: u64,
    ) -> Result<ApplyOutcome, PolicyOpError> {
        let doc = policy::Document { text, format, file };
        self.policy.apply(&self.gateway, doc, rollout, action, now_ms).await
    }
    pub async fn policy_plan(&self, text: &str, format: Format, file: &str) -> Result<Plan, PolicyOpError> {
        self.policy.plan(&self.gateway, text, format, file).await
    }
    pub async fn policy_rollback(&self, prefix: &str, now_ms: u64) -> Result<ApplyOutcome, PolicyOpError> {
        self.policy.rollback(&self.gateway, prefix, now_ms).await
    }
    pub async fn policy_version(&self, prefix: &str) -> Result<VersionRecord, PolicyOpError> {
        self.policy.version(&self.gateway, prefix).await
    }
    pub async fn policy_history(&self) -> Result<Vec<HistoryRecord>, NodeError> {
        self.policy.history(&self.gateway).await
    }
    pub async fn policy_status(&self) -> (Result<Option<HistoryRecord>, NodeError>, Vec<RegionCopy>) {
        self.policy.status(&self.gateway).await
    }
    pub fn policy_explain(
        &self,
        dataset: &DatasetName,
        key: &Key,
        home: Option<&str>,
    ) -> Result<Explained, PolicyOpError> {
        self.policy.explain(dataset, key, home)
    }

    // ---- replication -----------------------------------------------------------------------

    /// This region's conflict records (as this node has applied them), newest first, with
    /// the log's bookkeeping. See [`meridian_raft::StateMachineReader::conflicts`].
    pub fn conflicts(
        &self,
        query: &ConflictQuery<'_>,
    ) -> Result<(Vec<(ConflictRecord, ConflictState)>, ConflictLogState), NodeError> {
        let reader = self.reader();
        let items = reader.conflicts(query).map_err(NodeError::storage)?;
        Ok((items, reader.conflict_log().map_err(NodeError::storage)?))
    }

    /// One of this region's conflict records and where it stands.
    pub fn conflict(&self, id: u64) -> Result<Option<(ConflictRecord, ConflictState)>, NodeError> {
        self.reader().conflict(id).map_err(NodeError::storage)
    }

    /// Every region's replication state (links, cursors, merged marks).
    pub async fn replication_view(&self) -> Vec<(RegionId, Result<peer::RegionReplication, String>)> {
        self.links.replication_view().await
    }
    /// Compare every pair of regions' copies by digest (optionally one dataset).
    pub async fn verify(&self, dataset: Option<&str>) -> Vec<PairVerdict> {
        self.repair.verify(dataset).await
    }

    // ---- failover ------------------------------------------------------------------------

    /// Every region's promotions and newest `events` history entries (this region's from this
    /// node; each other's from any node there that answers).
    pub async fn failover_status(
        &self,
        events: usize,
    ) -> Vec<(RegionId, Result<(Vec<failover::Promotion>, Vec<failover::FailoverEvent>), NodeError>)> {
        let events = events.min(failover::EVENTS_MAX);
        let regions: Vec<RegionId> = self.topology().regions().iter().map(|r| r.name.clone()).collect();
        let asks = regions.iter().map(|r| async move {
            if *r == self.spec.region {
                return self.local_failover(events).map_err(|e| error::peer_error(self.spec.id, e));
            }
            let unpack = |reply| match reply {
                PeerResponseV1::Failover(r) => Some(r),
                _ => None,
            };
            let deadline = tokio::time::Instant::now() + limits::STATUS_TIMEOUT;
            let request = || PeerRequestV1::Failover { events: events as u32 };
            match self.transport.call_any(r, deadline, request, unpack).await {
                Ok((v, _)) => Ok(v),
                Err((node, transport::AnyFailure::Refused(e))) => Err(error::peer_error(node, e)),
                Err((node, transport::AnyFailure::Unreachable(reason))) => Err(NodeError::Unavailable { node, reason }),
            }
        });
        let answers = futures::future::join_all(asks).await;
        regions.into_iter().zip(answers).collect()
    }

    fn local_failover(
        &self,
        events: usize,
    ) -> Result<(Vec<failover::Promotion>, Vec<failover::FailoverEvent>), peer::PeerError> {
        let promotions = self.failover.promotions().map_err(error::to_peer_error)?;
        let mut history = self.failover.events().map_err(error::to_peer_error)?;
        let skip = history.len().saturating_sub(events.min(failover::EVENTS_MAX));
        history.drain(..skip);
        Ok((promotions, history))
    }

    /// Promote `region` for `dataset`, as an operator asked: at that region's leader.
    pub async fn promote(
        &self,
        dataset: &str,
        region: &RegionId,
        force: bool,
    ) -> Result<failover::Promotion, NodeError> {
        let request = || PeerRequestV1::Promote { dataset: dataset.to_owned(), force };
        let unpack = |reply| match reply {
            PeerResponseV1::Promotion(r) => Some(r),
            _ => None,
        };
        let (p, _) = self.transport.call_region(region, request, unpack, false).await?;
        p.ok_or_else(|| NodeError::Internal("a promotion answered with none".into()))
    }

    /// End `region`'s promotion for `dataset`, as an operator asked (`None`: there was none).
    pub async fn end_promotion(
        &self,
        dataset: &str,
        region: &RegionId,
    ) -> Result<Option<failover::Promotion>, NodeError> {
        let request = || PeerRequestV1::EndPromotion { dataset: dataset.to_owned() };
        let unpack = |reply| match reply {
            PeerResponseV1::Promotion(r) => Some(r),
            _ => None,
        };
        Ok(self.transport.call_region(region, request, unpack, false).await?.0)
    }

    async fn promote_here(&self, dataset: &str, force: bool) -> Result<failover::Promotion, peer::PeerError> {
        self.region.lead_or_refuse().map_err(error::LocalError::into_peer_error)?;
        let ds = DatasetName::new(dataset).map_err(|e| peer::PeerError::PromotionRefused(e.to_string()))?;
        match self.failover.promote(&ds, force, true).await {
            Ok(p) => Ok(p),
            Err(failover::PromoteError::Refused(r)) => Err(peer::PeerError::PromotionRefused(format!(
                "{} cannot be promoted for {dataset}: {r}",
                self.spec.region
            ))),
            Err(failover::PromoteError::Node(e)) => Err(error::to_peer_error(e)),
        }
    }

    async fn end_here(&self, dataset: &str) -> Result<Option<failover::Promotion>, peer::PeerError> {
        self.region.lead_or_refuse().map_err(error::LocalError::into_peer_error)?;
        self.failover.end(dataset, "an operator ended it").await.map_err(error::to_peer_error)
    }

    // ---- peer endpoint ---------------------------------------------------------------------

    /// Answer a request from another node: each goes to the component that owns it.
    pub async fn handle_peer(&self, req: PeerRequest) -> PeerResponse {
        let PeerRequest::V1(req) = req;
        let reply = match req {
            PeerRequestV1::Raft(r) => PeerResponseV1::Raft(serve_raft_rpc(self.region.raft(), r).await),
            PeerRequestV1::Write(w) => PeerResponseV1::Write(self.gateway.serve_write(WriteOp::One(w)).await),
            PeerRequestV1::WriteAtomic(ws) => {
                PeerResponseV1::Write(self.gateway.serve_write(WriteOp::Atomic(ws)).await)
            }
            PeerRequestV1::Read { dataset, key } => PeerResponseV1::Read(self.gateway.serve_read(&dataset, &key).await),
            PeerRequestV1::List { dataset, prefix, after, limit } => {
                PeerResponseV1::List(self.gateway.serve_list(&dataset, &prefix, after.as_deref(), limit).await)
            }
            PeerRequestV1::ReadCopy { dataset, key, home, to, need } => {
                PeerResponseV1::Read(self.gateway.serve_read_copy(&dataset, &key, home.as_deref(), &to, need))
            }
            PeerRequestV1::ListCopy { dataset, prefix, after, limit, home, to, need } => PeerResponseV1::List(
                self.gateway.serve_list_copy(&dataset, &prefix, after.as_deref(), limit, home.as_deref(), &to, need),
            ),
            PeerRequestV1::Status => PeerResponseV1::Status(self.region.report()),
            PeerRequestV1::Failover { events } => PeerResponseV1::Failover(self.local_failover(events as usize)),
            PeerRequestV1::Promote { dataset, force } => {
                PeerResponseV1::Promotion(self.promote_here(&dataset, force).await.map(Some))
            }
            PeerRequestV1::EndPromotion { dataset } => PeerResponseV1::Promotion(self.end_here(&dataset).await),
            PeerRequestV1::DatasetSizes => {
                PeerResponseV1::DatasetSizes(self.gateway.local_dataset_sizes().map_err(error::to_peer_error))
            }
            PeerRequestV1::ShipBatch(batch) => PeerResponseV1::Shipped(self.links.receive_batch(batch).await),
            PeerRequestV1::Repair(batch) => PeerResponseV1::Repaired(self.links.receive_repair(batch).await),
            PeerRequestV1::Digest { with } => PeerResponseV1::Digest(self.repair.serve_digest(&with)),
            PeerRequestV1::DigestEntries { with, dataset, buckets, limit } => {
                PeerResponseV1::DigestEntries(self.repair.serve_digest_entries(&with, &dataset, &buckets, limit))
            }
            PeerRequestV1::FetchObjects { with, dataset, keys } => {
                PeerResponseV1::Objects(self.repair.serve_fetch(&with, &dataset, &keys))
            }
            PeerRequestV1::CollectTombstones { source, dataset, keys } => {
                PeerResponseV1::Collected(self.repair.serve_collect(&source, dataset, keys).await)
            }
            PeerRequestV1::ReplicationState => {
                PeerResponseV1::ReplicationState(self.links.local_replication().map_err(error::to_peer_error))
            }
            PeerRequestV1::SetFaults(entries) => {
                self.transport.faults().replace(&entries);
                tracing::warn!(faults = ?entries, "fault injection table replaced");
                PeerResponseV1::FaultsSet
            }
        };
        PeerResponse::V1(reply)
    }

    // ---- fault injection ----------------------------------------------------------------

    /// This node's fault-injection table.
    pub fn faults(&self) -> Vec<chaos::FaultEntry> {
        self.transport.faults().entries()
    }

    /// Send `entries` as the fault table to every node of the cluster (this one included).
    /// Returns the nodes that could not be reached; they keep their previous table.
    pub async fn set_faults(&self, entries: Vec<chaos::FaultEntry>) -> Vec<NodeId> {
        self.transport.faults().replace(&entries);
        let others: Vec<NodeId> =
            self.topology().nodes().iter().map(|n| n.id).filter(|&id| id != self.spec.id).collect();
        let calls = others.iter().map(|&id| {
            let req = PeerRequestV1::SetFaults(entries.clone());
            async move { (id, self.transport.call(id, req, STATUS_TIMEOUT).await) }
        });
        futures::future::join_all(calls)
            .await
            .into_iter()
            .filter(|(_, r)| !matches!(r, Ok(PeerResponseV1::FaultsSet)))
            .map(|(id, _)| id)
            .collect()
    }

    // ---- cluster status -----------------------------------------------------------------

    /// This node's probes of every other region (see [`health`]), and the wall-clock time
    /// they are read at (what their times compare with).
    pub fn region_health(&self) -> (std::collections::BTreeMap<RegionId, health::RegionHealth>, u64) {
        (self.health.regions(), self.health.now_ms())
    }

    /// Every region's status: this node's own view for its region, and for each other region
    /// the answer of the first of its nodes that replies.
    pub async fn cluster_view(&self) -> Vec<RegionView> {
        let mut views = Vec::new();
        let regions: Vec<RegionId> = self.topology().regions().iter().map(|r| r.name.clone()).collect();
        let futures = regions.into_iter().map(|region| async move {
            if region == self.spec.region {
                return RegionView { region, report: Ok(self.region.report()) };
            }
            let mut last_err = String::from("no nodes");
            for n in self.topology().region_nodes(&region) {
                match self.transport.call(n.id, PeerRequestV1::Status, STATUS_TIMEOUT).await {
                    Ok(PeerResponseV1::Status(r)) => return RegionView { region, report: Ok(r) },
                    Ok(_) => last_err = format!("node {} sent an unexpected reply", n.id),
                    Err(e) => last_err = format!("node {}: {e}", n.id),
                }
            }
            RegionView { region, report: Err(last_err) }
        });
        views.extend(futures::future::join_all(futures).await);
        views
    }

    /// Stop the node: signal every task it started and wait for them (at most
    /// [`limits::SHUTDOWN_TIMEOUT`], then abort the rest), then stop the Raft core (flushes
    /// nothing extra: the log is already durable). Once it returns, no task of the node runs.
    pub async fn shutdown(&self) {
        self.supervisor.shutdown(limits::SHUTDOWN_TIMEOUT).await;
        self.region.shutdown().await;
    }

    /// The node's tasks still running (for tests and status).
    pub fn running(&self) -> supervisor::Running {
        self.supervisor.running()
    }
}

/// Open the Raft log and the state machine where `storage` says.
impl Drop for Node {
    /// A node dropped without [`Node::shutdown`] still stops its tasks (unwaited); the Raft
    /// core stops when its last handle goes.
    fn drop(&mut self) {
        self.supervisor.abandon();
    }
}

fn open_storage(storage: NodeStorage, spec: &NodeSpec) -> anyhow::Result<(StateMachineStore, LogStore)> {
    match storage {
        NodeStorage::Dir(data_dir) => {
            std::fs::create_dir_all(&data_dir)
                .map_err(|e| anyhow::anyhow!("create data directory {}: {e}", data_dir.display()))?;
            if data_dir.join("log.redb").exists() {
                anyhow::bail!(
                    "{} holds a Raft log in the earlier redb format (log.redb), which this build does not \
                     read; start this node on an empty data directory and it will catch up from its region",
                    data_dir.display()
                );
            }
            let sm = StateMachineStore::open(&data_dir, spec.region.clone())
                .map_err(|e| anyhow::anyhow!("open the state machine in {}: {e}", data_dir.display()))?;
            let log = LogStore::open_with_purge_limit(&data_dir.join("raft.wal"), sm.durable_point())
                .map_err(|e| anyhow::anyhow!("open the Raft log in {}: {e}", data_dir.display()))?;
            Ok((sm, log))
        }
        NodeStorage::Opened { log, log_options, state, snapshot_path, log_sync_time } => {
            let sm = StateMachineStore::with_database(state, snapshot_path, spec.region.clone())
                .map_err(|e| anyhow::anyhow!("open the state machine: {e}"))?;
            let log = LogStore::with_files_in_task(log, sm.durable_point(), log_options, log_sync_time)
                .map_err(|e| anyhow::anyhow!("open the Raft log: {e}"))?;
            Ok((sm, log))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::WriteRequest;
    use meridian_raft::command::CommandV1;
    use meridian_raft::network::RpcFailure;
    use meridian_raft::CommandResult;
    use std::collections::BTreeMap;

    /// A one-node region on loopback ports, elected leader.
    async fn single_node_region() -> (Arc<Node>, tempfile::TempDir) {
        let ports: Vec<std::net::TcpListener> =
            (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
        let port = |i: usize| ports[i].local_addr().expect("addr").port();
        let text = format!(
            "[[regions]]\nname = \"r\"\n\
             [[nodes]]\nid = 1\nregion = \"r\"\nzone = \"a\"\napi_addr = \"127.0.0.1:{}\"\npeer_addr = \"127.0.0.1:{}\"\n",
            port(0),
            port(1)
        );
        let config = ClusterConfig::parse(&text, "test").expect("config");
        drop(ports);
        let dir = tempfile::tempdir().expect("tempdir");
        let node = Node::start(NodeOptions::new(config, 1, dir.path().to_path_buf())).await.expect("start");
        node.bootstrap().await.expect("bootstrap");
        let start = std::time::Instant::now();
        while node.region_report().leader != Some(1) {
            assert!(start.elapsed() < Duration::from_secs(10), "a single voter did not become leader");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (node, dir)
    }

    #[tokio::test]
    async fn a_data_directory_with_the_earlier_redb_log_is_refused_with_a_reason() {
        let text = "[[regions]]\nname = \"r\"\n[[nodes]]\nid = 1\nregion = \"r\"\nzone = \"a\"\n\
                    api_addr = \"127.0.0.1:1\"\npeer_addr = \"127.0.0.1:2\"\n";
        let config = ClusterConfig::parse(text, "test").expect("config");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("log.redb"), b"old").expect("write");
        let err = match Node::start(NodeOptions::new(config, 1, dir.path().to_path_buf())).await {
            Ok(_) => panic!("a node started over a log it cannot read"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("earlier redb format") && err.contains("empty data directory"), "{err}");
        assert!(!dir.path().join("raft.wal.0").exists(), "nothing is created beside the old log");
        assert!(!dir.path().join("state.redb").exists(), "nothing is created beside the old log");
    }

    /// Options for node `id` on in-memory disks, over `wire`, whose log syncs take `sync`.
    fn in_memory(
        config: &ClusterConfig,
        id: NodeId,
        dir: &std::path::Path,
        wire: Arc<LocalWire>,
        sync: meridian_raft::log_store::SyncTime,
    ) -> NodeOptions {
        let state =
            redb::Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).expect("state db");
        NodeOptions {
            config: config.clone(),
            node_id: id,
            storage: NodeStorage::Opened {
                log: meridian_raft::wal::MemLogFile::pair(),
                log_options: Default::default(),
                state,
                snapshot_path: dir.join(format!("snapshot-{id}.bin")),
                log_sync_time: sync,
            },
            clock: Arc::new(crate::clock::SystemClock),
            wire,
            wire_capture: None,
        }
    }

    /// A wire that hands each body straight to the target node, in this process.
    #[derive(Default)]
    struct LocalWire(std::sync::Mutex<BTreeMap<NodeId, std::sync::Weak<Node>>>);

    impl transport::Wire for LocalWire {
        fn exchange<'a>(
            &'a self,
            target: &'a NodeSpec,
            body: Vec<u8>,
            compressed: bool,
        ) -> futures::future::BoxFuture<'a, Result<transport::WireReply, RpcFailure>> {
            Box::pin(async move {
                let node = self.0.lock().expect("wire lock").get(&target.id).and_then(std::sync::Weak::upgrade);
                match node {
                    Some(n) => Ok(transport::serve_peer_body(&n, &body, compressed, compressed).await),
                    None => Err(RpcFailure::Unreachable(format!("node {} not started", target.id))),
                }
            })
        }
    }

    /// The leader's own entries go to the followers before its fsync ends, but nothing is
    /// acknowledged, applied, or made known to a follower as committed before the leader's copy
    /// is on disk. Node 1 leads with a log whose every sync then takes 1.5 s; the followers'
    /// take none, so they hold the entry long before the leader does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_acknowledged_or_applied_before_the_leaders_copy_is_on_disk() {
        let mut text = String::from("[[regions]]\nname = \"r\"\n");
        for (id, zone) in [(1, "a"), (2, "b"), (3, "c")] {
            text += &format!(
                "[[nodes]]\nid = {id}\nregion = \"r\"\nzone = \"{zone}\"\n\
                 api_addr = \"127.0.0.1:{}\"\npeer_addr = \"127.0.0.1:{}\"\n",
                20_000 + id,
                21_000 + id
            );
        }
        let config = ClusterConfig::parse(&text, "test").expect("config");
        let dir = tempfile::tempdir().expect("tempdir");
        let wire = Arc::new(LocalWire(std::sync::Mutex::new(BTreeMap::new())));
        // Node 1's syncs become slow once it leads (a slow vote would keep it from winning).
        let leader_sync_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut nodes = BTreeMap::new();
        for id in 1..=3u64 {
            let ms = leader_sync_ms.clone();
            let sync = move || {
                if id == 1 {
                    Duration::from_millis(ms.load(std::sync::atomic::Ordering::Relaxed))
                } else {
                    Duration::ZERO
                }
            };
            let opts = in_memory(&config, id, dir.path(), wire.clone(), Arc::new(sync));
            let node = Node::start(opts).await.expect("start");
            wire.0.lock().expect("wire lock").insert(id, Arc::downgrade(&node));
            nodes.insert(id, node);
        }
        let (leader, followers) = (&nodes[&1], [&nodes[&2], &nodes[&3]]);
        leader.bootstrap().await.expect("bootstrap");
        let start = std::time::Instant::now();
        while leader.region_report().leader != Some(1) {
            assert!(start.elapsed() < Duration::from_secs(60), "node 1 did not become leader");
            let _ = leader.raft().trigger().elect().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        leader_sync_ms.store(1500, std::sync::atomic::Ordering::Relaxed);

        // The write's entry is at `target` or later.
        let index = |n: &Node| n.raft().metrics().borrow().last_log_index.unwrap_or(0);
        let applied = |n: &Node| n.raft().metrics().borrow().last_applied.map_or(0, |l| l.index);
        let target = index(leader) + 1;
        let write = {
            let leader = leader.clone();
            tokio::spawn(async move {
                let req = WriteRequest {
                    dataset: "d".into(),
                    key: "k".into(),
                    value: Some(b"v".to_vec()),
                    condition: meridian_raft::Condition::Always,
                    effect: crate::peer::WriteEffect::Replace,
                };
                let r = leader.gateway().write_local(WriteOp::One(req)).await;
                (r, leader.log_durability().through())
            })
        };
        let mut saw_window = false;
        while !write.is_finished() {
            for f in followers {
                let f_applied = applied(f);
                let f_has = index(f) >= target;
                let leader_durable = leader.log_durability().through().map_or(0, |l| l.index);
                assert!(
                    f_applied <= leader_durable,
                    "follower {} applied {f_applied} while the leader's log is durable through {leader_durable}",
                    f.id()
                );
                saw_window |= f_has && leader_durable < target;
            }
            assert!(applied(leader) <= leader.log_durability().through().map_or(0, |l| l.index));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (result, durable_at_ack) = write.await.expect("write task");
        result.expect("the write succeeds");
        assert!(durable_at_ack.is_some_and(|d| d.index >= target), "acknowledged before the leader's copy was durable");
        assert!(saw_window, "the followers never held the entry before the leader did: nothing was overlapped");
        // The followers learn the commit once the leader's disk catches up.
        let start = std::time::Instant::now();
        while followers.iter().any(|f| applied(f) < target) {
            assert!(start.elapsed() < Duration::from_secs(30), "the followers never applied the write");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for n in nodes.values() {
            n.shutdown().await;
        }
    }

    /// Every wire hands its bytes to `serve_peer_body`: bodies that do not decode get a 400
    /// that says why, and a good body an encoded answer, compressed only when asked for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peer_bodies_are_decoded_once_for_every_wire() {
        use crate::transport::{compress_body, decompress_body, serve_peer_body};
        let (node, _dir) = single_node_region().await;
        let garbage = serve_peer_body(&node, b"\xff\xff\xff not postcard", false, false).await;
        assert_eq!(garbage.status, 400);
        assert!(String::from_utf8_lossy(&garbage.body).contains("undecodable peer message"));
        let not_zstd = serve_peer_body(&node, b"plain bytes", true, true).await;
        assert_eq!(not_zstd.status, 400);
        assert!(String::from_utf8_lossy(&not_zstd.body).contains("zstd"));

        let status = postcard::to_stdvec(&PeerRequest::V1(PeerRequestV1::Status)).expect("encode");
        let plain = serve_peer_body(&node, &status, false, false).await;
        assert_eq!((plain.status, plain.compressed), (200, false));
        let PeerResponse::V1(PeerResponseV1::Status(report)) = postcard::from_bytes(&plain.body).expect("decode")
        else {
            panic!("a status request answered with something else")
        };
        assert_eq!(report.node, 1);
        // A compressed request is answered compressed only when the answer is large enough.
        let sizes = postcard::to_stdvec(&PeerRequest::V1(PeerRequestV1::DatasetSizes)).expect("encode");
        let packed = compress_body(&sizes).expect("compress");
        let answer = serve_peer_body(&node, &packed, true, true).await;
        assert_eq!(answer.status, 200);
        let raw = if answer.compressed {
            decompress_body(&answer.body, 1 << 20).expect("zstd")
        } else {
            answer.body.to_vec()
        };
        assert!(matches!(
            postcard::from_bytes(&raw).expect("decode"),
            PeerResponse::V1(PeerResponseV1::DatasetSizes(_))
        ));
        node.shutdown().await;
    }

    /// Commands reach the log in the order they were queued, however many are in flight: a
    /// destination queues pipelined link batches back to back and merges each only if it
    /// joins up with the one before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proposals_reach_the_log_in_queue_order() {
        let (node, _dir) = single_node_region().await;
        const N: u64 = 2000;
        let mut answers = Vec::new();
        for seq in 1..=N {
            let cmd = CommandV1::ApplyRemoteAt {
                source: "s".into(),
                from_seq: seq,
                upto_seq: seq,
                fresh_ms: 0,
                changes: Vec::new(),
            };
            answers.push(node.proposer.enqueue(cmd).await.expect("queued"));
            if seq % 64 == 0 {
                // Let the proposer's in-flight tasks run between bursts.
                tokio::task::yield_now().await;
            }
        }
        for (i, answer) in answers.into_iter().enumerate() {
            let result = answer.wait().await.expect("applied");
            assert!(
                matches!(result, CommandResult::Remote { merged_upto, .. } if merged_upto == i as u64 + 1),
                "range {} was applied out of queue order: {result:?}",
                i + 1
            );
        }
        node.shutdown().await;
    }

    /// Two regions of one node each, in memory, with a policy that mirrors a dataset between
    /// them, so every kind of worker runs (the proposer, the policy sync, a link's shipper,
    /// anti-entropy) and jobs run (batches in flight). After shutdown, none of the node's
    /// tasks is left, and the runtime counts none alive at all.
    #[test]
    fn after_shutdown_no_task_of_the_node_is_alive() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async {
            let mut text = String::from("[[regions]]\nname = \"a\"\n[[regions]]\nname = \"b\"\n");
            for (id, region) in [(1, "a"), (2, "b")] {
                text += &format!(
                    "[[nodes]]\nid = {id}\nregion = \"{region}\"\nzone = \"z\"\n\
                     api_addr = \"127.0.0.1:{}\"\npeer_addr = \"127.0.0.1:{}\"\n",
                    22_000 + id,
                    23_000 + id
                );
            }
            text += "[replication]\nanti_entropy_interval_ms = 200\n";
            let config = ClusterConfig::parse(&text, "test").expect("config");
            let dir = tempfile::tempdir().expect("tempdir");
            let wire = Arc::new(LocalWire::default());
            let mut nodes = Vec::new();
            for id in 1..=2u64 {
                let opts = in_memory(&config, id, dir.path(), wire.clone(), Arc::new(|| Duration::ZERO));
                let node = Node::start(opts).await.expect("start");
                wire.0.lock().expect("wire lock").insert(id, Arc::downgrade(&node));
                node.bootstrap().await.expect("bootstrap");
                nodes.push(node);
            }
            let start = std::time::Instant::now();
            while nodes.iter().any(|n| n.region_report().leader != Some(n.id())) {
                assert!(start.elapsed() < Duration::from_secs(30), "a single voter did not become leader");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let policy = "[[dataset]]\nname = \"d\"\nlocality = \"global\"\nclassification = \"public\"\n\
                          home = [\"a\"]\nmirrors = [\"b\"]\n";
            let full = Rollout { mode: meridian_policy::Mode::Enforce, percent: Rollout::FULL };
            nodes[0].policy_apply(policy, Format::Toml, "p.toml", full, "apply", 1).await.expect("apply");
            let (ds, key) = (DatasetName::new("d").expect("name"), Key::new("k").expect("key"));
            nodes[0].gateway().put(&ds, &key, b"1".to_vec(), Precondition::None, None).await.expect("put");
            // The mirror has it: the link shipped it.
            let start = std::time::Instant::now();
            loop {
                let (obj, _) = nodes[1].gateway().get(&ds, &key, Consistency::Local.into(), None).await.expect("get");
                if obj.is_some() {
                    break;
                }
                assert!(start.elapsed() < Duration::from_secs(30), "the mirror never received the write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for n in &nodes {
                let running = n.running();
                for worker in ["commit-announcer", "proposer", "policy-sync", "link-shipper", "anti-entropy"] {
                    assert!(running.workers.contains(&worker), "{worker} is not running: {running:?}");
                }
            }
            for n in &nodes {
                n.shutdown().await;
                assert_eq!(n.running(), supervisor::Running::default(), "node {} left tasks", n.id());
            }
            // Openraft's own tasks end with its core; give aborted ones a moment to be reaped.
            let metrics = tokio::runtime::Handle::current().metrics();
            let start = std::time::Instant::now();
            while metrics.num_alive_tasks() > 0 {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{} tasks are still alive after every node shut down",
                    metrics.num_alive_tasks()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
}
