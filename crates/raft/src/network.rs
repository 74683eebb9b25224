//! Openraft's network, over the node's peer transport.
//!
//! [`PeerRpc`] is the seam: production sends over HTTP with postcard bodies, the simulator
//! over its own network. This module only maps Raft's three RPCs onto it, and maps transport
//! failures onto openraft's error kinds so that openraft backs off correctly.

use std::future::Future;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};

use crate::log_store::LogDurability;
use crate::{LogId, Raft, TypeConfig};

#[derive(Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
}

/// How a peer call failed before any answer came back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcFailure {
    /// Could not connect, or the path is cut: back off before retrying.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// No answer within the deadline.
    #[error("peer did not answer within {0:?}")]
    Timeout(Duration),
    /// The call failed after it may have been delivered: the peer may have acted on it.
    #[error("peer call interrupted: {0}")]
    Interrupted(String),
    /// The peer answered with something we could not understand (version skew, corruption).
    #[error("peer protocol error: {0}")]
    Protocol(String),
}

/// The transport seam used by Raft.
pub trait PeerRpc: Clone + Send + Sync + 'static {
    fn raft_rpc(
        &self,
        target: u64,
        req: RaftRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<RaftReply, RpcFailure>> + Send;
}

/// Serve one Raft RPC on the receiving node.
pub async fn serve_raft_rpc(raft: &Raft, req: RaftRequest) -> RaftReply {
    match req {
        RaftRequest::AppendEntries(r) => RaftReply::AppendEntries(raft.append_entries(r).await),
        RaftRequest::Vote(r) => RaftReply::Vote(raft.vote(r).await),
        RaftRequest::InstallSnapshot(r) => RaftReply::InstallSnapshot(raft.install_snapshot(r).await),
    }
}

pub struct NetworkFactory<P> {
    self_id: u64,
    rpc: P,
    commit_bound: Option<LogDurability>,
}

impl<P: PeerRpc> NetworkFactory<P> {
    pub fn new(self_id: u64, rpc: P) -> Self {
        NetworkFactory { self_id, rpc, commit_bound: None }
    }

    /// Never tell a follower of a commit past what this node's own log holds durably.
    /// Required when the log store reports a leader's own entries written at submit
    /// ([`crate::LogStore::ack_own_entries_at_submit`]): such an entry can commit in the
    /// leader's view (its own copy counted, one follower's on disk) while it is on one disk
    /// only, and a follower that applied it could see it overwritten by a new leader after the
    /// old one crashed. Held back, it reaches followers once the leader's fsync ends.
    pub fn bound_commit_by(mut self, durability: LogDurability) -> Self {
        self.commit_bound = Some(durability);
        self
    }
}

impl<P: PeerRpc> RaftNetworkFactory<TypeConfig> for NetworkFactory<P> {
    type Network = Network<P>;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> Self::Network {
        Network { self_id: self.self_id, target, rpc: self.rpc.clone(), commit_bound: self.commit_bound.clone() }
    }
}

pub struct Network<P> {
    self_id: u64,
    target: u64,
    rpc: P,
    commit_bound: Option<LogDurability>,
}

/// The commit to send: `leader_commit`, or the last entry durable here if that is earlier.
/// That entry is in the leader's log before its commit point, so it is committed too; a
/// follower only ever moves its commit forward, so an earlier one costs nothing but time.
fn bounded_commit(leader_commit: Option<LogId>, durable: Option<LogId>) -> (Option<LogId>, bool) {
    match leader_commit {
        Some(c) if durable.is_none_or(|d| d.index < c.index) => (durable, true),
        c => (c, false),
    }
}

type RpcResult<T, E = openraft::error::Infallible> = Result<T, RPCError<u64, BasicNode, RaftError<u64, E>>>;

impl<P: PeerRpc> Network<P> {
    fn failure<E: std::error::Error>(
        &self,
        action: RPCTypes,
        f: RpcFailure,
    ) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
        match f {
            RpcFailure::Timeout(timeout) => {
                RPCError::Timeout(Timeout { action, id: self.self_id, target: self.target, timeout })
            }
            RpcFailure::Unreachable(_) => RPCError::Unreachable(Unreachable::new(&f)),
            RpcFailure::Protocol(_) | RpcFailure::Interrupted(_) => RPCError::Network(NetworkError::new(&f)),
        }
    }

    fn mismatch<E: std::error::Error>(&self) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
        RPCError::Network(NetworkError::new(&RpcFailure::Protocol("reply does not match the request".into())))
    }
}

impl<P: PeerRpc> RaftNetwork<TypeConfig> for Network<P> {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        if let Some(bound) = &self.commit_bound {
            let (commit, held) = bounded_commit(rpc.leader_commit, bound.through());
            if let (true, Some(wanted)) = (held, rpc.leader_commit) {
                bound.note_held_back(wanted.index);
                rpc.leader_commit = commit;
            }
        }
        match self.rpc.raft_rpc(self.target, RaftRequest::AppendEntries(rpc), option.hard_ttl()).await {
            Ok(RaftReply::AppendEntries(r)) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(_) => Err(self.mismatch()),
            Err(f) => Err(self.failure(RPCTypes::AppendEntries, f)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, InstallSnapshotError> {
        match self.rpc.raft_rpc(self.target, RaftRequest::InstallSnapshot(rpc), option.hard_ttl()).await {
            Ok(RaftReply::InstallSnapshot(r)) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(_) => Err(self.mismatch()),
            Err(f) => Err(self.failure(RPCTypes::InstallSnapshot, f)),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> RpcResult<VoteResponse<u64>> {
        match self.rpc.raft_rpc(self.target, RaftRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(RaftReply::Vote(r)) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(_) => Err(self.mismatch()),
            Err(f) => Err(self.failure(RPCTypes::Vote, f)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(openraft::CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn a_commit_past_the_durable_end_is_held_back_to_it() {
        assert_eq!(bounded_commit(Some(id(2, 10)), Some(id(2, 7))), (Some(id(2, 7)), true));
        assert_eq!(bounded_commit(Some(id(2, 10)), None), (None, true));
        assert_eq!(bounded_commit(Some(id(2, 10)), Some(id(2, 10))), (Some(id(2, 10)), false));
        assert_eq!(bounded_commit(Some(id(2, 10)), Some(id(2, 12))), (Some(id(2, 10)), false));
        assert_eq!(bounded_commit(None, Some(id(2, 12))), (None, false));
    }
}
