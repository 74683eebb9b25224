//! `RegionGroup`: this node's seat in its region's Raft group. It owns the Raft handle and the
//! state machine's reader, and answers the questions every other component asks of the group:
//! does this node lead, who does, has the state machine caught up with the commit index (the
//! read index), and how do the group and its log stand.
//!
//! It does not propose (that is the [`crate::proposer::Proposer`]'s job) and knows nothing of
//! policies, links or clients.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use meridian_core::{NodeId, NodeSpec, Topology};
use meridian_raft::log_store::{LogDurability, LogStoreStats};
use meridian_raft::{Raft, StateMachineReader};
use openraft::error::{CheckIsLeaderError, InitializeError, RaftError};
use openraft::{BasicNode, ServerState};

use crate::error::{LocalError, NodeError};
use crate::metrics::Metrics;
use crate::peer::RegionReport;

pub struct RegionGroup {
    spec: NodeSpec,
    topology: Arc<Topology>,
    raft: Raft,
    reader: StateMachineReader,
    metrics: Arc<Metrics>,
    log_stats: Arc<LogStoreStats>,
    log_durability: LogDurability,
    /// Counter values already exported: fsyncs, entries, acked at submit, commits held back,
    /// compactions.
    log_stats_seen: Mutex<[u64; 5]>,
    /// The log index through which the state machine is durable.
    durable: Arc<AtomicU64>,
}

/// What the region group is built from (the node opens storage and starts Raft).
pub(crate) struct RegionParts {
    pub spec: NodeSpec,
    pub topology: Arc<Topology>,
    pub raft: Raft,
    pub reader: StateMachineReader,
    pub metrics: Arc<Metrics>,
    pub log_stats: Arc<LogStoreStats>,
    pub log_durability: LogDurability,
    pub durable: Arc<AtomicU64>,
}

impl RegionGroup {
    pub(crate) fn new(p: RegionParts) -> Self {
        RegionGroup {
            spec: p.spec,
            topology: p.topology,
            raft: p.raft,
            reader: p.reader,
            metrics: p.metrics,
            log_stats: p.log_stats,
            log_durability: p.log_durability,
            log_stats_seen: Mutex::new([0; 5]),
            durable: p.durable,
        }
    }

    pub fn spec(&self) -> &NodeSpec {
        &self.spec
    }
    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }
    /// The region's Raft handle (for tests and the simulator's invariants).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }
    /// A reader of this node's state machine.
    pub fn reader(&self) -> &StateMachineReader {
        &self.reader
    }
    /// The log index through which this node's state machine is durable (it commits without
    /// fsync between syncs; the log is the write-ahead log).
    pub fn durable_point(&self) -> Arc<AtomicU64> {
        self.durable.clone()
    }
    /// How far this node's Raft log is on disk.
    pub fn log_durability(&self) -> &LogDurability {
        &self.log_durability
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    /// Wait at most `max` for this node to learn of a leader other than `from` (the winner of
    /// a new election; any leader when `from` is `None`).
    pub(crate) async fn await_leader_change(&self, from: Option<NodeId>, max: std::time::Duration) {
        let mut metrics = self.raft.metrics();
        let changed = metrics.wait_for(|m| m.current_leader.is_some() && m.current_leader != from);
        let _ = tokio::time::timeout(max, changed).await;
    }

    pub fn leader_hint(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn term(&self) -> u64 {
        self.raft.metrics().borrow().current_term
    }

    /// Refuse with the leader's id unless this node leads.
    pub(crate) fn lead_or_refuse(&self) -> Result<(), LocalError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(LocalError::NotLeader(self.leader_hint()))
        }
    }

    /// Raft read index (Raft thesis §6.4): confirm leadership with a quorum, then wait until
    /// the state machine has applied up to the commit index seen at that moment.
    pub(crate) async fn read_index(&self) -> Result<(), LocalError> {
        self.lead_or_refuse()?;
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(LocalError::NotLeader(f.leader_id)),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => {
                Err(LocalError::Other(NodeError::NoLeader))
            }
            Err(RaftError::Fatal(e)) => {
                Err(LocalError::Other(NodeError::Unavailable { node: self.spec.id, reason: e.to_string() }))
            }
        }
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

    /// This node's view of its own region's group.
    pub fn report(&self) -> RegionReport {
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

    /// Stop the Raft core (flushes nothing extra: the log is already durable).
    pub(crate) async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

/// When the network held a commit back because the leader's own log was not yet on disk,
/// send a heartbeat as soon as the disk catches up, so followers learn the commit (and apply,
/// and serve local reads) without waiting for the next write or the heartbeat interval.
pub(crate) async fn announce_held_back_commits(
    raft: Raft,
    durability: LogDurability,
    stop: crate::supervisor::StopSignal,
) {
    loop {
        tokio::select! {
            biased;
            _ = stop.raised() => return,
            _ = durability.held_back_commit_ready() => {}
        }
        if raft.trigger().heartbeat().await.is_err() {
            return;
        }
    }
}
