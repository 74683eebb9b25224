//! The composition root of one Meridian node: it opens storage, starts the region's Raft
//! group, owns the HLC, the peer transport and the metrics registry, and routes every client
//! request to the node that must serve it.
//!
//! Any node takes any request (every node is a gateway). Writes and strong reads are served
//! by the region's leader: a follower forwards them over the peer transport and retries
//! only when the answer proves nothing was applied. Local reads are served from the node's
//! own state machine.
//!
//! It knows nothing of HTTP routes or JSON: the server crate maps requests onto [`Node`]'s
//! methods and [`NodeError`] onto status codes.

pub mod chaos;
pub mod clock;
pub mod config;
pub mod links;
pub mod metrics;
pub mod peer;
pub mod policy;
pub mod repair;
pub mod traffic;
pub mod transport;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_core::{Hlc, NodeId, NodeSpec, RegionId, Topology};
use meridian_raft::command::CommandV1;
use meridian_raft::network::{serve_raft_rpc, NetworkFactory, RpcFailure};
use meridian_raft::{Command, CommandResult, LogStore, Raft, StateMachineReader, StateMachineStore, StoredObject};
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ServerState};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::config::ClusterConfig;
use crate::metrics::{KindLabels, Metrics};
use crate::peer::{
    PeerError, PeerRequest, PeerRequestV1, PeerResponse, PeerResponseV1, RegionReport, WriteOp, WriteRequest,
};
use crate::transport::PeerTransport;

/// How long a write or strong read may take end to end, forwarding included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most attempts to reach a leader for one request (each after proof nothing was applied).
pub const LEADER_ATTEMPTS_MAX: u32 = 20;
/// Deadline of a status call to another node.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Per-request failures, shaped by what the caller does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    #[error("the region has no leader right now")]
    NoLeader,
    #[error("node {node} could not be reached: {reason}")]
    Unavailable { node: NodeId, reason: String },
    #[error("the write reached the leader but its outcome is unknown: {0}")]
    OutcomeUnknown(String),
    #[error("{0}")]
    ClockSkew(String),
    #[error("storage failure: {0}")]
    Storage(String),
    /// The active policy neither names the dataset nor has a default.
    #[error("{0}")]
    DatasetNotInPolicy(String),
    /// A user-homed key whose home cannot be found, or is not allowed.
    #[error("{0}")]
    HomeUnknown(String),
    /// The region asked is not a home for the key under its own active policy.
    #[error("{0}")]
    PolicyRefused(String),
    /// A user-homed key already lives in another region than the home asked for.
    #[error("{0}")]
    HomeImmutable(String),
    /// Serving the request here would bring the key's bytes into a region its policy does not
    /// allow: the first field explains, the second names the regions that may serve it.
    #[error("{0}")]
    ResidencyRefused(String, Vec<RegionId>),
    #[error("internal failure: {0}")]
    Internal(String),
}

/// Why a node served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    Leader,
    Local,
    ForwardedToLeader,
    /// Sent to a home region of the key (another region's leader).
    ForwardedToHome,
}

impl RouteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::Leader => "leader",
            RouteReason::Local => "local",
            RouteReason::ForwardedToLeader => "forwarded-to-leader",
            RouteReason::ForwardedToHome => "forwarded-to-home",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub node: NodeId,
    pub reason: RouteReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadConsistency {
    /// Linearizable: the leader confirms its leadership with a quorum (read index), waits
    /// until it has applied that far, then reads.
    Strong,
    /// Whatever this node has applied.
    Local,
}

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

pub struct Node {
    spec: NodeSpec,
    config: ClusterConfig,
    topology: Arc<Topology>,
    raft: Raft,
    reader: StateMachineReader,
    hlc: Mutex<Hlc>,
    clock: Arc<dyn Clock>,
    transport: PeerTransport,
    metrics: Arc<Metrics>,
    log_stats: Arc<meridian_raft::log_store::LogStoreStats>,
    log_durability: meridian_raft::log_store::LogDurability,
    /// Counter values already exported: fsyncs, entries, acked at submit, commits held back.
    log_stats_seen: Mutex<[u64; 5]>,
    proposals: tokio::sync::mpsc::Sender<Proposal>,
    policy: policy::PolicyCache,
    link_signals: links::LinkSignals,
    /// The log index through which the state machine is durable.
    durable: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Debug, Clone)]
pub(crate) enum LocalError {
    NotLeader(Option<NodeId>),
    Other(NodeError),
}

/// Most proposals in flight at once (submitted to Raft, not yet applied). While they are,
/// new writes wait in the queue and leave together as the next batch.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 4;
/// Most writes in one proposed batch.
pub const BATCH_WRITES_MAX: usize = 256;
/// A batch stops growing once it holds this many bytes of values (one large value may exceed it).
pub const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Most writes waiting to be proposed; writers wait when it is full.
pub const PROPOSAL_QUEUE_MAX: usize = 4096;

struct Proposal {
    cmd: CommandV1,
    bytes: usize,
    reply: tokio::sync::oneshot::Sender<Result<CommandResult, LocalError>>,
}

/// When the network held a commit back because the leader's own log was not yet on disk,
/// send a heartbeat as soon as the disk catches up, so followers learn the commit (and apply,
/// and serve local reads) without waiting for the next write or the heartbeat interval.
async fn announce_held_back_commits(raft: Raft, durability: meridian_raft::log_store::LogDurability) {
    loop {
        durability.held_back_commit_ready().await;
        if raft.trigger().heartbeat().await.is_err() {
            return;
        }
    }
}

/// The leader's proposer: it turns the writes that queue up while earlier proposals are in
/// flight into one Raft entry, so that one log append (one fsync) and one replication round
/// serve them all. Openraft 0.9's core waits for each append to be durable before taking the
/// next message, so without this every client write would cost one fsync in sequence.
///
/// Commands reach the log in the order they were queued: each entry is handed to the core
/// from this loop, and only the waits for outcomes run concurrently. (Handing entries over
/// from concurrent tasks let them overtake each other, and a destination merging pipelined
/// link batches then found a gap and made the source resend a round trip's worth.)
async fn run_proposer(raft: Raft, mut rx: tokio::sync::mpsc::Receiver<Proposal>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else { return };
        let Some(first) = rx.recv().await else { return };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < BATCH_WRITES_MAX && bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (mut cmds, replies): (Vec<CommandV1>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
        let single = cmds.len() == 1;
        let cmd = if single { cmds.pop().expect("one command") } else { CommandV1::Batch(cmds) };
        // Handed to the core here, in queue order (only the wait for the outcome runs
        // concurrently): a destination relies on merges reaching the log in the order their
        // batches were queued.
        let submitted = raft.client_write_ff(Command::V1(cmd)).await;
        tokio::spawn(async move {
            let outcome = match submitted {
                Ok(rx) => match rx.await {
                    Ok(result) => result.map_err(|e| write_error(RaftError::APIError(e))),
                    Err(_) => Err(LocalError::Other(NodeError::OutcomeUnknown(
                        "the Raft core stopped before answering".into(),
                    ))),
                },
                Err(fatal) => Err(write_error(RaftError::Fatal(fatal))),
            };
            drop(permit);
            let results: Vec<Result<CommandResult, LocalError>> = match outcome {
                Ok(resp) => match resp.data {
                    CommandResult::Batch(results) if !single => {
                        assert_eq!(results.len(), replies.len(), "a batch answers once per write");
                        results.into_iter().map(Ok).collect()
                    }
                    result if single => vec![Ok(result)],
                    other => {
                        let e = LocalError::Other(NodeError::Internal(format!("unexpected result {other:?}")));
                        vec![Err(e); replies.len()]
                    }
                },
                Err(e) => vec![Err(e); replies.len()],
            };
            for (reply, result) in replies.into_iter().zip(results) {
                // The writer may have given up (its request was cancelled); nothing to do.
                let _ = reply.send(result);
            }
        });
    }
}

fn write_error(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> LocalError {
    match e {
        // Openraft answers ForwardToLeader when it refused the entry (not leader) but also when
        // a new leader truncated it from this node's log; in a group of more than three voters
        // a truncated entry can survive on another voter and commit later (Raft paper, figure
        // 8). The two cannot be told apart here, so the outcome is unknown: never retried
        // blindly. The gateway checks leadership before proposing, so this stays rare.
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => LocalError::Other(NodeError::OutcomeUnknown(
            format!("leadership moved while the write was in flight (new leader: {:?})", f.leader_id),
        )),
        RaftError::APIError(e) => LocalError::Other(NodeError::Internal(e.to_string())),
        RaftError::Fatal(e) => LocalError::Other(NodeError::OutcomeUnknown(e.to_string())),
    }
}

impl Node {
    /// Open storage and start the Raft group. The caller serves the peer endpoint (so other
    /// voters can reach this one) and then calls [`Node::bootstrap`].
    pub async fn start(opts: NodeOptions) -> anyhow::Result<Arc<Node>> {
        let NodeOptions { config, node_id, storage, clock, wire, wire_capture } = opts;
        let topology = Arc::new(config.topology.clone());
        let spec =
            topology.node(node_id).cloned().ok_or_else(|| anyhow::anyhow!("node {node_id} is not in the topology"))?;
        let (mut sm, log) = match storage {
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
                (sm, log)
            }
            NodeStorage::Opened { log, log_options, state, snapshot_path, log_sync_time } => {
                let sm = StateMachineStore::with_database(state, snapshot_path, spec.region.clone())
                    .map_err(|e| anyhow::anyhow!("open the state machine: {e}"))?;
                let log = LogStore::with_files_in_task(log, sm.durable_point(), log_options, log_sync_time)
                    .map_err(|e| anyhow::anyhow!("open the Raft log: {e}"))?;
                (sm, log)
            }
        };
        // The leader's fsync overlaps its replication: its own entries are reported written
        // when queued (see `meridian_raft::log_store`). The two bounds below keep that safe.
        let log = log.ack_own_entries_at_submit(node_id);
        sm.set_outbox_limit(config.replication.outbox_entries_max);
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
            max_payload_entries: 256,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_every_entries),
            max_in_snapshot_log_to_keep: r.log_entries_kept_after_snapshot,
            ..Default::default()
        }
        .validate()?;
        let network = NetworkFactory::new(node_id, transport.clone()).bound_commit_by(log_durability.clone());
        let raft = Raft::new(node_id, Arc::new(raft_config), network, log, sm).await?;
        tokio::spawn(announce_held_back_commits(raft.clone(), log_durability.clone()));
        let (proposals, proposal_rx) = tokio::sync::mpsc::channel(PROPOSAL_QUEUE_MAX);
        tokio::spawn(run_proposer(raft.clone(), proposal_rx));
        let node = Arc::new(Node {
            hlc: Mutex::new(Hlc::new(config.clock.max_offset_ms)),
            spec,
            config,
            topology,
            raft,
            reader,
            clock,
            transport,
            metrics,
            log_stats,
            log_durability: log_durability.clone(),
            log_stats_seen: Mutex::new([0; 5]),
            proposals,
            policy: policy::PolicyCache::default(),
            link_signals: links::LinkSignals::default(),
            durable,
        });
        if let Err(e) = node.refresh_policy() {
            tracing::warn!(error = %e, "load the policy copy");
        }
        node.spawn_policy_sync();
        node.spawn_links();
        node.spawn_anti_entropy();
        Ok(node)
    }

    /// Form the region's group on first start. Every voter calls this with the same
    /// membership (the region's zone nodes), which openraft documents as safe; a node that
    /// already holds a log skips it.
    pub async fn bootstrap(&self) -> anyhow::Result<()> {
        if self.raft.is_initialized().await? {
            return Ok(());
        }
        let members: BTreeMap<u64, BasicNode> = self
            .topology
            .region_nodes(&self.spec.region)
            .into_iter()
            .map(|n| (n.id, BasicNode::new(n.peer_addr.to_string())))
            .collect();
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(anyhow::anyhow!("initialize region {}: {e}", self.spec.region)),
        }
    }

    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }
    pub fn topology(&self) -> &Topology {
        &self.topology
    }
    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    pub fn id(&self) -> NodeId {
        self.spec.id
    }
    /// The region's Raft handle (for tests and the simulator's invariants).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }
    /// A reader of this node's state machine (for tests and the simulator's invariants).
    pub fn reader(&self) -> &StateMachineReader {
        &self.reader
    }
    /// The log index through which this node's state machine is durable (it commits without
    /// fsync between syncs; the log is the write-ahead log).
    pub fn durable_point(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.durable.clone()
    }

    /// How far this node's Raft log is on disk (for tests and the simulator's invariants).
    pub fn log_durability(&self) -> &meridian_raft::log_store::LogDurability {
        &self.log_durability
    }

    /// This node's view of its own region's group.
    pub fn region_report(&self) -> RegionReport {
        let m = self.raft.metrics().borrow().clone();
        RegionReport {
            node: self.spec.id,
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
        }
    }

    /// Bring the Raft gauges and log counters up to date (called before each scrape).
    pub fn refresh_metrics(&self) {
        let m = self.raft.metrics().borrow().clone();
        self.metrics.raft_term.set(m.current_term as i64);
        self.metrics.raft_is_leader.set(i64::from(m.state == ServerState::Leader));
        self.metrics.raft_last_log_index.set(m.last_log_index.unwrap_or(0) as i64);
        self.metrics.raft_applied_index.set(m.last_applied.map_or(0, |l| l.index) as i64);
        use std::sync::atomic::Ordering::Relaxed;
        let now = [
            self.log_stats.fsyncs_total.load(Relaxed),
            self.log_stats.entries_written_total.load(Relaxed),
            self.log_stats.acked_at_submit_total.load(Relaxed),
            self.log_durability.held_back_total(),
            self.log_stats.compactions_total.load(Relaxed),
        ];
        let mut seen = self.log_stats_seen.lock().expect("log stats lock");
        let m = &self.metrics;
        for (i, counter) in [
            &m.raft_log_fsyncs,
            &m.raft_log_entries_written,
            &m.raft_log_acked_at_submit,
            &m.raft_commits_held_back,
            &m.raft_log_compactions,
        ]
        .into_iter()
        .enumerate()
        {
            counter.inc_by(now[i] - seen[i]);
        }
        *seen = now;
    }

    fn leader_hint(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    // ---- writes -------------------------------------------------------------------------

    /// Apply a write in this node's region, forwarding it to the leader if this node is not it.
    pub async fn write(&self, req: WriteRequest) -> Result<(CommandResult, Served), NodeError> {
        self.write_local(WriteOp::One(req)).await
    }

    /// Apply a write in `region`: here (through this region's leader), or at another region's
    /// leader over the peer transport.
    pub async fn write_in(&self, region: &RegionId, op: WriteOp) -> Result<(CommandResult, Served), NodeError> {
        if *region == self.spec.region {
            return self.write_local(op).await;
        }
        let request = || match &op {
            WriteOp::One(r) => PeerRequestV1::Write(r.clone()),
            WriteOp::Atomic(rs) => PeerRequestV1::WriteAtomic(rs.clone()),
        };
        let unpack = |r| match r {
            PeerResponseV1::Write(r) => Some(r),
            _ => None,
        };
        let (result, node) = self.call_region(region, request, unpack, false).await?;
        Ok((result, Served { node, reason: RouteReason::ForwardedToHome }))
    }

    async fn write_local(&self, op: WriteOp) -> Result<(CommandResult, Served), NodeError> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let leader = match self.write_here(&op).await {
                Ok(result) => return Ok((result, Served { node: self.spec.id, reason: RouteReason::Leader })),
                Err(LocalError::Other(e)) => return Err(e),
                Err(LocalError::NotLeader(leader)) => leader,
            };
            if let Some(leader) = leader.filter(|&l| l != self.spec.id) {
                self.metrics.forwarded.get_or_create(&KindLabels { kind: "write".into() }).inc();
                let remaining = deadline.saturating_duration_since(Instant::now());
                let request = match &op {
                    WriteOp::One(r) => PeerRequestV1::Write(r.clone()),
                    WriteOp::Atomic(rs) => PeerRequestV1::WriteAtomic(rs.clone()),
                };
                match self.transport.call(leader, request, remaining).await {
                    Ok(PeerResponseV1::Write(Ok(result))) => {
                        return Ok((result, Served { node: leader, reason: RouteReason::ForwardedToLeader }))
                    }
                    // Not applied: leadership moved. Retry below.
                    Ok(PeerResponseV1::Write(Err(PeerError::NotLeader { .. }))) => {}
                    Ok(PeerResponseV1::Write(Err(e))) => return Err(peer_error(leader, e)),
                    Ok(other) => return Err(NodeError::Internal(format!("unexpected reply to a write: {other:?}"))),
                    // Never delivered: safe to retry.
                    Err(RpcFailure::Unreachable(_)) => {}
                    Err(e @ (RpcFailure::Timeout(_) | RpcFailure::Interrupted(_) | RpcFailure::Protocol(_))) => {
                        return Err(NodeError::OutcomeUnknown(e.to_string()))
                    }
                }
            }
            if attempt >= LEADER_ATTEMPTS_MAX || Instant::now() >= deadline {
                return Err(NodeError::NoLeader);
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// Send a request to the leader of another region: any of its nodes first, then the
    /// leader it names. A request that may have been applied is retried only if `idempotent`.
    async fn call_region<T>(
        &self,
        region: &RegionId,
        request: impl Fn() -> PeerRequestV1,
        unpack: impl Fn(PeerResponseV1) -> Option<Result<T, PeerError>>,
        idempotent: bool,
    ) -> Result<(T, NodeId), NodeError> {
        let nodes: Vec<NodeId> = self.topology.region_nodes(region).iter().map(|n| n.id).collect();
        if nodes.is_empty() {
            return Err(NodeError::Internal(format!("region {region} has no nodes")));
        }
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut next = 0usize;
        let mut hint: Option<NodeId> = None;
        let mut last_error = String::from("no answer");
        for attempt in 1..=LEADER_ATTEMPTS_MAX {
            let target = hint.take().filter(|h| nodes.contains(h)).unwrap_or_else(|| {
                next += 1;
                nodes[(next - 1) % nodes.len()]
            });
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            match self.transport.call(target, request(), remaining).await {
                Ok(reply) => match unpack(reply) {
                    Some(Ok(v)) => return Ok((v, target)),
                    Some(Err(PeerError::NotLeader { leader })) => {
                        last_error = format!("node {target} is not the leader");
                        if leader.is_some() && leader != Some(target) {
                            hint = leader;
                            continue;
                        }
                    }
                    Some(Err(e)) => return Err(peer_error(target, e)),
                    None => return Err(NodeError::Internal(format!("node {target} sent an unexpected reply"))),
                },
                Err(RpcFailure::Unreachable(e)) => last_error = format!("node {target}: {e}"),
                Err(e) if idempotent => last_error = format!("node {target}: {e}"),
                Err(e) => return Err(NodeError::OutcomeUnknown(e.to_string())),
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
        Err(NodeError::Unavailable { node: nodes[0], reason: format!("region {region}: {last_error}") })
    }

    /// Hand one command to the leader's proposer and wait for its result.
    async fn propose(&self, cmd: CommandV1, bytes: usize) -> Result<CommandResult, LocalError> {
        let answer = self.enqueue(cmd, bytes).await?;
        Self::answer_of(answer).await
    }

    /// Queue one command for the proposer (commands reach the log in the order they are
    /// queued); the returned receiver yields its result.
    pub(crate) async fn enqueue(
        &self,
        cmd: CommandV1,
        bytes: usize,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<CommandResult, LocalError>>, LocalError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.proposals.send(Proposal { cmd, bytes, reply }).await.map_err(|_| {
            LocalError::Other(NodeError::Unavailable { node: self.spec.id, reason: "the proposer has stopped".into() })
        })?;
        Ok(answer)
    }

    pub(crate) async fn answer_of(
        answer: tokio::sync::oneshot::Receiver<Result<CommandResult, LocalError>>,
    ) -> Result<CommandResult, LocalError> {
        match answer.await {
            Ok(result) => result,
            Err(_) => Err(LocalError::Other(NodeError::OutcomeUnknown("the proposal was dropped".into()))),
        }
    }

    /// Propose a replication command (a merged batch, a cursor) if this node leads its region.
    pub(crate) async fn propose_replication(&self, cmd: CommandV1) -> Result<CommandResult, LocalError> {
        if self.raft.metrics().borrow().state != ServerState::Leader {
            return Err(LocalError::NotLeader(self.leader_hint()));
        }
        self.propose(cmd, 0).await
    }

    /// Propose a write to the local Raft group if this node leads it.
    async fn write_here(&self, op: &WriteOp) -> Result<CommandResult, LocalError> {
        if self.raft.metrics().borrow().state != ServerState::Leader {
            return Err(LocalError::NotLeader(self.leader_hint()));
        }
        let reqs = op.requests();
        if let WriteOp::Atomic(rs) = op {
            let mut keys = std::collections::BTreeSet::new();
            if rs.is_empty() || !rs.iter().all(|r| keys.insert((&r.dataset, &r.key))) {
                return Err(LocalError::Other(NodeError::Internal(
                    "an atomic group is empty or names a key twice".into(),
                )));
            }
        }
        // The leader checks placement with its own copy of the policy, so a gateway holding
        // an older one can never make this region store what its policy forbids here. Once
        // per term it first catches its state machine up with the commit index: a leader
        // fresh from a restart must not judge by a copy older than what was committed.
        // Reserved namespaces (`_policy`, `_audit`) are the cluster's own records: no dataset
        // policy governs them.
        let guard = if reqs.iter().any(|r| !r.dataset.starts_with('_')) {
            let term = self.raft.metrics().borrow().current_term;
            if self.policy.barrier_term.load(std::sync::atomic::Ordering::Acquire) != term {
                self.linearizable_barrier().await?;
                self.policy.barrier_term.store(term, std::sync::atomic::Ordering::Release);
            }
            self.refresh_policy().map_err(LocalError::Other)?;
            Some(self.policy_guard(reqs).await.map_err(LocalError::Other)?)
        } else {
            None
        };
        let hlc = {
            let mut hlc = self.hlc.lock().expect("hlc lock");
            match hlc.now(self.clock.now_ms()) {
                Ok(t) => t,
                Err(e) => {
                    self.metrics.hlc_refusals.inc();
                    return Err(LocalError::Other(NodeError::ClockSkew(e.to_string())));
                }
            }
        };
        let command = |req: &WriteRequest| match &req.value {
            Some(value) => CommandV1::Put {
                dataset: req.dataset.clone(),
                key: req.key.clone(),
                value: value.clone(),
                hlc,
                condition: req.condition.clone(),
            },
            None => CommandV1::Delete {
                dataset: req.dataset.clone(),
                key: req.key.clone(),
                hlc,
                condition: req.condition.clone(),
            },
        };
        let mut cmds: Vec<CommandV1> = Vec::new();
        if let Some(condition) = &guard {
            cmds.push(CommandV1::Check {
                dataset: policy::NAMESPACE.into(),
                key: policy::ACTIVE_KEY.into(),
                condition: condition.clone(),
            });
        }
        let cmd = match (op, guard.is_some()) {
            (WriteOp::One(r), false) => command(r),
            (WriteOp::One(r), true) => {
                cmds.push(command(r));
                CommandV1::Atomic(cmds)
            }
            (WriteOp::Atomic(rs), _) => {
                cmds.extend(rs.iter().map(command));
                CommandV1::Atomic(cmds)
            }
        };
        let bytes = reqs.iter().map(|r| r.value.as_ref().map_or(0, Vec::len) + r.key.len()).sum();
        let result = self.propose(cmd, bytes).await?;
        // Committed and applied here: the links may have something to ship.
        self.wake_links();
        if guard.is_none() {
            return Ok(result);
        }
        // Unwrap the guard: its own failure means the policy moved under the write.
        let policy_moved = || {
            LocalError::Other(NodeError::PolicyRefused(
                "the policy changed while the write was in flight; nothing was written, retry".into(),
            ))
        };
        match (op, result) {
            (_, CommandResult::AtomicFailed { index: 0, .. }) => Err(policy_moved()),
            (WriteOp::One(_), CommandResult::AtomicFailed { current, .. }) => {
                Ok(CommandResult::PreconditionFailed { current })
            }
            (WriteOp::One(_), CommandResult::Batch(mut results)) if results.len() == 2 => Ok(results.remove(1)),
            (WriteOp::Atomic(_), CommandResult::AtomicFailed { index, current }) => {
                Ok(CommandResult::AtomicFailed { index: index - 1, current })
            }
            (WriteOp::Atomic(_), CommandResult::Batch(mut results)) if !results.is_empty() => {
                results.remove(0);
                Ok(CommandResult::Batch(results))
            }
            (_, other) => {
                Err(LocalError::Other(NodeError::Internal(format!("unexpected guarded write result {other:?}"))))
            }
        }
    }

    // ---- reads --------------------------------------------------------------------------

    pub async fn read(
        &self,
        dataset: &str,
        key: &str,
        consistency: ReadConsistency,
    ) -> Result<(Option<StoredObject>, Served), NodeError> {
        let local = || self.reader.get(dataset, key).map_err(|e| NodeError::Storage(e.to_string()));
        self.route_read(
            consistency,
            local,
            || PeerRequestV1::Read { dataset: dataset.into(), key: key.into() },
            |r| match r {
                PeerResponseV1::Read(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    pub async fn list(
        &self,
        dataset: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        consistency: ReadConsistency,
    ) -> Result<(Vec<(String, StoredObject)>, Served), NodeError> {
        let local = || self.reader.list(dataset, prefix, after, limit).map_err(|e| NodeError::Storage(e.to_string()));
        let req = || PeerRequestV1::List {
            dataset: dataset.into(),
            prefix: prefix.into(),
            after: after.map(str::to_owned),
            limit: limit as u32,
        };
        self.route_read(consistency, local, req, |r| match r {
            PeerResponseV1::List(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// A strong read in `region`: this region's leader, or another region's.
    pub async fn read_in(
        &self,
        region: &RegionId,
        dataset: &str,
        key: &str,
    ) -> Result<(Option<StoredObject>, Served), NodeError> {
        if *region == self.spec.region {
            return self.read(dataset, key, ReadConsistency::Strong).await;
        }
        let request = || PeerRequestV1::Read { dataset: dataset.into(), key: key.into() };
        let unpack = |r| match r {
            PeerResponseV1::Read(r) => Some(r),
            _ => None,
        };
        let (v, node) = self.call_region(region, request, unpack, true).await?;
        Ok((v, Served { node, reason: RouteReason::ForwardedToHome }))
    }

    /// A strong listing in `region`.
    pub async fn list_in(
        &self,
        region: &RegionId,
        dataset: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(String, StoredObject)>, Served), NodeError> {
        if *region == self.spec.region {
            return self.list(dataset, prefix, after, limit, ReadConsistency::Strong).await;
        }
        let request = || PeerRequestV1::List {
            dataset: dataset.into(),
            prefix: prefix.into(),
            after: after.map(str::to_owned),
            limit: limit as u32,
        };
        let unpack = |r| match r {
            PeerResponseV1::List(r) => Some(r),
            _ => None,
        };
        let (v, node) = self.call_region(region, request, unpack, true).await?;
        Ok((v, Served { node, reason: RouteReason::ForwardedToHome }))
    }

    /// Live keys and bytes per dataset as one node of `region` holds them.
    pub async fn dataset_sizes_in(&self, region: &RegionId) -> Result<Vec<(String, u64, u64)>, NodeError> {
        if *region == self.spec.region {
            return self.local_dataset_sizes();
        }
        let unpack = |r| match r {
            PeerResponseV1::DatasetSizes(r) => Some(r),
            _ => None,
        };
        Ok(self.call_region(region, || PeerRequestV1::DatasetSizes, unpack, true).await?.0)
    }

    fn local_dataset_sizes(&self) -> Result<Vec<(String, u64, u64)>, NodeError> {
        let sizes = self.reader.dataset_sizes().map_err(|e| NodeError::Storage(e.to_string()))?;
        Ok(sizes.into_iter().map(|(d, (k, b))| (d, k, b)).collect())
    }

    /// Serve a read here (local, or strong when this node leads), or forward it to the leader.
    async fn route_read<T>(
        &self,
        consistency: ReadConsistency,
        local: impl Fn() -> Result<T, NodeError>,
        request: impl Fn() -> PeerRequestV1,
        unpack: impl Fn(PeerResponseV1) -> Option<Result<T, PeerError>>,
    ) -> Result<(T, Served), NodeError> {
        if consistency == ReadConsistency::Local {
            return Ok((local()?, Served { node: self.spec.id, reason: RouteReason::Local }));
        }
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let leader = match self.linearizable_barrier().await {
                Ok(()) => return Ok((local()?, Served { node: self.spec.id, reason: RouteReason::Leader })),
                Err(LocalError::Other(e)) => return Err(e),
                Err(LocalError::NotLeader(l)) => l,
            };
            if let Some(leader) = leader.filter(|&l| l != self.spec.id) {
                self.metrics.forwarded.get_or_create(&KindLabels { kind: "read".into() }).inc();
                let remaining = deadline.saturating_duration_since(Instant::now());
                // Reads change nothing: any transport failure may be retried.
                if let Ok(reply) = self.transport.call(leader, request(), remaining).await {
                    match unpack(reply) {
                        Some(Ok(v)) => return Ok((v, Served { node: leader, reason: RouteReason::ForwardedToLeader })),
                        Some(Err(PeerError::NotLeader { .. })) => {}
                        Some(Err(e)) => return Err(peer_error(leader, e)),
                        None => return Err(NodeError::Internal("unexpected reply to a read".into())),
                    }
                }
            }
            if attempt >= LEADER_ATTEMPTS_MAX || Instant::now() >= deadline {
                return Err(NodeError::NoLeader);
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    /// Raft read index (Raft thesis §6.4): confirm leadership with a quorum, then wait until
    /// the state machine has applied up to the commit index seen at that moment.
    async fn linearizable_barrier(&self) -> Result<(), LocalError> {
        if self.raft.metrics().borrow().state != ServerState::Leader {
            return Err(LocalError::NotLeader(self.leader_hint()));
        }
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(LocalError::NotLeader(f.leader_id))
            }
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::QuorumNotEnough(_))) => {
                Err(LocalError::Other(NodeError::NoLeader))
            }
            Err(RaftError::Fatal(e)) => {
                Err(LocalError::Other(NodeError::Unavailable { node: self.spec.id, reason: e.to_string() }))
            }
        }
    }

    // ---- peer endpoint ------------------------------------------------------------------

    /// Answer a request from another node.
    pub async fn handle_peer(&self, req: PeerRequest) -> PeerResponse {
        let PeerRequest::V1(req) = req;
        let reply = match req {
            PeerRequestV1::Raft(r) => PeerResponseV1::Raft(serve_raft_rpc(&self.raft, r).await),
            PeerRequestV1::Write(w) => PeerResponseV1::Write(match self.write_here(&WriteOp::One(w)).await {
                Ok(r) => Ok(r),
                Err(LocalError::NotLeader(leader)) => Err(PeerError::NotLeader { leader }),
                Err(LocalError::Other(e)) => Err(to_peer_error(e)),
            }),
            PeerRequestV1::Read { dataset, key } => PeerResponseV1::Read(
                self.serve_strong(|| self.reader.get(&dataset, &key).map_err(|e| NodeError::Storage(e.to_string())))
                    .await,
            ),
            PeerRequestV1::List { dataset, prefix, after, limit } => {
                let limit = (limit as usize).min(meridian_core::limits::LIST_LIMIT_MAX);
                PeerResponseV1::List(
                    self.serve_strong(|| {
                        self.reader
                            .list(&dataset, &prefix, after.as_deref(), limit)
                            .map_err(|e| NodeError::Storage(e.to_string()))
                    })
                    .await,
                )
            }
            PeerRequestV1::Status => PeerResponseV1::Status(self.region_report()),
            PeerRequestV1::WriteAtomic(ws) => {
                PeerResponseV1::Write(match self.write_here(&WriteOp::Atomic(ws)).await {
                    Ok(r) => Ok(r),
                    Err(LocalError::NotLeader(leader)) => Err(PeerError::NotLeader { leader }),
                    Err(LocalError::Other(e)) => Err(to_peer_error(e)),
                })
            }
            PeerRequestV1::DatasetSizes => {
                PeerResponseV1::DatasetSizes(self.local_dataset_sizes().map_err(to_peer_error))
            }
            PeerRequestV1::ShipBatch(batch) => PeerResponseV1::Shipped(self.receive_batch(batch).await),
            PeerRequestV1::Repair(batch) => PeerResponseV1::Repaired(self.receive_repair(batch).await),
            PeerRequestV1::Digest { with } => PeerResponseV1::Digest(self.serve_digest(&with)),
            PeerRequestV1::DigestEntries { with, dataset, buckets, limit } => {
                PeerResponseV1::DigestEntries(self.serve_digest_entries(&with, &dataset, &buckets, limit))
            }
            PeerRequestV1::FetchObjects { with, dataset, keys } => {
                PeerResponseV1::Objects(self.serve_fetch(&with, &dataset, &keys))
            }
            PeerRequestV1::ReplicationState => {
                PeerResponseV1::ReplicationState(self.local_replication().map_err(to_peer_error))
            }
            PeerRequestV1::SetFaults(entries) => {
                self.transport.faults().replace(&entries);
                tracing::warn!(faults = ?entries, "fault injection table replaced");
                PeerResponseV1::FaultsSet
            }
        };
        PeerResponse::V1(reply)
    }

    async fn serve_strong<T>(&self, read: impl Fn() -> Result<T, NodeError>) -> Result<T, PeerError> {
        match self.linearizable_barrier().await {
            Ok(()) => read().map_err(to_peer_error),
            Err(LocalError::NotLeader(leader)) => Err(PeerError::NotLeader { leader }),
            Err(LocalError::Other(e)) => Err(to_peer_error(e)),
        }
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
        let others: Vec<NodeId> = self.topology.nodes().iter().map(|n| n.id).filter(|&id| id != self.spec.id).collect();
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

    /// Every region's status: this node's own view for its region, and for each other region
    /// the answer of the first of its nodes that replies.
    pub async fn cluster_view(&self) -> Vec<RegionView> {
        let mut views = Vec::new();
        let regions: Vec<RegionId> = self.topology.regions().iter().map(|r| r.name.clone()).collect();
        let futures = regions.into_iter().map(|region| async move {
            if region == self.spec.region {
                return RegionView { region, report: Ok(self.region_report()) };
            }
            let mut last_err = String::from("no nodes");
            for n in self.topology.region_nodes(&region) {
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

    /// Stop the Raft group (flushes nothing extra: the log is already durable).
    pub async fn shutdown(&self) {
        self.stop_policy_sync();
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((25u64 << attempt.min(4)).min(400))
}

pub(crate) fn to_peer_error(e: NodeError) -> PeerError {
    match e {
        NodeError::NoLeader => PeerError::NotLeader { leader: None },
        NodeError::ClockSkew(m) => PeerError::ClockSkew(m),
        NodeError::Unavailable { reason, .. } => PeerError::Unavailable(reason),
        NodeError::OutcomeUnknown(m) => PeerError::OutcomeUnknown(m),
        NodeError::PolicyRefused(m)
        | NodeError::DatasetNotInPolicy(m)
        | NodeError::HomeUnknown(m)
        | NodeError::HomeImmutable(m)
        | NodeError::ResidencyRefused(m, _) => PeerError::PolicyRefused(m),
        NodeError::Storage(m) | NodeError::Internal(m) => PeerError::Internal(m),
    }
}

fn peer_error(node: NodeId, e: PeerError) -> NodeError {
    match e {
        PeerError::NotLeader { .. } => NodeError::NoLeader,
        PeerError::ClockSkew(m) => NodeError::ClockSkew(m),
        PeerError::OutcomeUnknown(m) => NodeError::OutcomeUnknown(m),
        PeerError::Unavailable(reason) => NodeError::Unavailable { node, reason },
        PeerError::PolicyRefused(m) => NodeError::PolicyRefused(m),
        PeerError::Internal(m) | PeerError::Protocol(m) => NodeError::Internal(format!("node {node}: {m}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unknown outcome must survive the trip between nodes: turning it into anything a
    /// client may retry blindly could apply a write twice.
    #[test]
    fn unknown_outcomes_stay_unknown_across_the_peer_protocol() {
        let e = to_peer_error(NodeError::OutcomeUnknown("x".into()));
        assert_eq!(e, PeerError::OutcomeUnknown("x".into()));
        assert!(matches!(peer_error(3, e), NodeError::OutcomeUnknown(_)));
        // Only a refusal before proposing is retryable.
        assert!(matches!(peer_error(3, PeerError::NotLeader { leader: Some(2) }), NodeError::NoLeader));
    }

    #[test]
    fn forward_to_leader_after_proposing_is_an_unknown_outcome() {
        let e = RaftError::APIError(ClientWriteError::ForwardToLeader(openraft::error::ForwardToLeader {
            leader_id: Some(2),
            leader_node: None,
        }));
        assert!(matches!(write_error(e), LocalError::Other(NodeError::OutcomeUnknown(_))));
    }

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

    /// A wire that hands each body straight to the target node, in this process.
    struct LocalWire(std::sync::Mutex<BTreeMap<NodeId, Arc<Node>>>);

    impl transport::Wire for LocalWire {
        fn exchange<'a>(
            &'a self,
            target: &'a NodeSpec,
            body: Vec<u8>,
            compressed: bool,
        ) -> futures::future::BoxFuture<'a, Result<transport::WireReply, RpcFailure>> {
            Box::pin(async move {
                let node = self.0.lock().expect("wire lock").get(&target.id).cloned();
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
            let db = || redb::Database::builder().create_with_backend(redb::backends::InMemoryBackend::new());
            let ms = leader_sync_ms.clone();
            let sync = move || {
                if id == 1 {
                    Duration::from_millis(ms.load(std::sync::atomic::Ordering::Relaxed))
                } else {
                    Duration::ZERO
                }
            };
            let opts = NodeOptions {
                config: config.clone(),
                node_id: id,
                storage: NodeStorage::Opened {
                    log: meridian_raft::wal::MemLogFile::pair(),
                    log_options: Default::default(),
                    state: db().expect("state db"),
                    snapshot_path: dir.path().join(format!("snapshot-{id}.bin")),
                    log_sync_time: Arc::new(sync),
                },
                clock: Arc::new(crate::clock::SystemClock),
                wire: wire.clone(),
                wire_capture: None,
            };
            let node = Node::start(opts).await.expect("start");
            wire.0.lock().expect("wire lock").insert(id, node.clone());
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
                };
                let r = leader.write(req).await;
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
            answers.push(node.enqueue(cmd, 0).await.expect("queued"));
            if seq % 64 == 0 {
                // Let the proposer's in-flight tasks run between bursts.
                tokio::task::yield_now().await;
            }
        }
        for (i, answer) in answers.into_iter().enumerate() {
            let result = Node::answer_of(answer).await.expect("applied");
            assert!(
                matches!(result, CommandResult::Remote { merged_upto, .. } if merged_upto == i as u64 + 1),
                "range {} was applied out of queue order: {result:?}",
                i + 1
            );
        }
        node.shutdown().await;
    }
}
