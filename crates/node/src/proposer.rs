//! The leader's proposer: it turns the commands that queue up while earlier proposals are in
//! flight into one Raft entry, so that one log append (one fsync) and one replication round
//! serve them all. Openraft 0.9's core waits for each append to be durable before taking the
//! next message, so without this every client write would cost one fsync in sequence.
//!
//! Invariant: commands reach the log in the order they were queued. Each entry is handed to
//! the core from the proposer's one loop, and only the waits for outcomes run concurrently.
//! (Handing entries over from concurrent tasks let them overtake each other, and a destination
//! merging pipelined link batches then found a gap and made the source resend a round trip's
//! worth.)
//!
//! It proposes whatever it is given: the checks that decide whether a client write may be
//! proposed (leadership, policy, HLC) are the gateway's.

use std::sync::Arc;

use meridian_raft::command::{Change, CommandV1, RemoteChange};
use meridian_raft::{Command, CommandResult, Raft};
use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use tokio::sync::{mpsc, oneshot};

use crate::error::{LocalError, NodeError};
use crate::limits::{
    BATCH_BYTES_MAX, BATCH_WRITES_MAX, ENTRY_OVERHEAD_PER_WRITE_BYTES, PROPOSALS_IN_FLIGHT_MAX, PROPOSAL_QUEUE_MAX,
};
use crate::region::RegionGroup;
use crate::supervisor::StopSignal;

struct Proposal {
    cmd: CommandV1,
    bytes: usize,
    reply: oneshot::Sender<Result<CommandResult, LocalError>>,
}

/// The answer to one queued command, once its entry is applied.
pub(crate) struct Answer(oneshot::Receiver<Result<CommandResult, LocalError>>);

impl Answer {
    pub(crate) async fn wait(self) -> Result<CommandResult, LocalError> {
        match self.0.await {
            Ok(result) => result,
            Err(_) => Err(LocalError::Other(NodeError::OutcomeUnknown("the proposal was dropped".into()))),
        }
    }
}

pub struct Proposer {
    region: Arc<RegionGroup>,
    queue: mpsc::Sender<Proposal>,
}

/// The proposer's loop, for the supervisor to run.
pub(crate) struct ProposerWorker {
    raft: Raft,
    node: meridian_core::NodeId,
    rx: mpsc::Receiver<Proposal>,
}

impl Proposer {
    pub(crate) fn new(region: Arc<RegionGroup>) -> (Proposer, ProposerWorker) {
        let (queue, rx) = mpsc::channel(PROPOSAL_QUEUE_MAX);
        let worker = ProposerWorker { raft: region.raft().clone(), node: region.spec().id, rx };
        (Proposer { region, queue }, worker)
    }

    /// Queue one command (commands reach the log in the order they are queued); the answer
    /// yields its result.
    pub(crate) async fn enqueue(&self, cmd: CommandV1) -> Result<Answer, LocalError> {
        let bytes = command_bytes(&cmd);
        let (reply, answer) = oneshot::channel();
        self.queue.send(Proposal { cmd, bytes, reply }).await.map_err(|_| {
            LocalError::Other(NodeError::Unavailable {
                node: self.region.spec().id,
                reason: "the proposer has stopped".into(),
            })
        })?;
        Ok(Answer(answer))
    }

    /// Queue one command and wait for its result.
    pub(crate) async fn propose(&self, cmd: CommandV1) -> Result<CommandResult, LocalError> {
        self.enqueue(cmd).await?.wait().await
    }

    /// Propose the node's own bookkeeping (a merged batch, a cursor, a repair, a purge) if
    /// this node leads its region.
    pub(crate) async fn propose_if_leader(&self, cmd: CommandV1) -> Result<CommandResult, LocalError> {
        self.region.lead_or_refuse()?;
        self.propose(cmd).await
    }
}

impl ProposerWorker {
    /// Propose until `stop` is raised (after every other task of the node has stopped).
    pub(crate) async fn run(mut self, stop: StopSignal) {
        let permits = Arc::new(tokio::sync::Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
        let mut outcomes = tokio::task::JoinSet::new();
        loop {
            // Reap finished outcome waits so the set stays as small as the window.
            while outcomes.try_join_next().is_some() {}
            let permit = tokio::select! {
                biased;
                _ = stop.raised() => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let first = tokio::select! {
                biased;
                _ = stop.raised() => break,
                p = self.rx.recv() => match p { Some(p) => p, None => break },
            };
            let mut bytes = first.bytes;
            let mut batch = vec![first];
            while batch.len() < BATCH_WRITES_MAX && bytes < BATCH_BYTES_MAX {
                match self.rx.try_recv() {
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
            let submitted = self.raft.client_write_ff(Command::V1(cmd)).await;
            outcomes.spawn(async move {
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
        // Stopping (every other task of the node is gone; the Raft core still runs): commands
        // still queued were never proposed, and say so (their writers may retry); the entries
        // in flight get their outcomes from the core.
        self.rx.close();
        while let Some(p) = self.rx.recv().await {
            let _ = p.reply.send(Err(LocalError::Other(NodeError::Unavailable {
                node: self.node,
                reason: "the node is shutting down; the command was not proposed".into(),
            })));
        }
        while outcomes.join_next().await.is_some() {}
    }
}

/// An upper bound on the encoded size of `cmd` in a Raft entry: its names, keys and values,
/// plus [`ENTRY_OVERHEAD_PER_WRITE_BYTES`] for each record's framing (versions, stamps,
/// conditions). The proposer stops a batch growing at [`BATCH_BYTES_MAX`] of these, which is
/// what bounds an entry (see `limits::entry_bytes_max`); a test checks the bound against
/// postcard's real encoding.
pub(crate) fn command_bytes(cmd: &CommandV1) -> usize {
    // An object with its history is measured encoded: its vector, siblings and state vary.
    let causal_change =
        |c: &Change| c.dataset.len() + c.key.len() + c.object.encoded_len() + ENTRY_OVERHEAD_PER_WRITE_BYTES;
    let change = |c: &RemoteChange| {
        c.dataset.len() + c.key.len() + c.value.as_ref().map_or(0, Vec::len) + ENTRY_OVERHEAD_PER_WRITE_BYTES
    };
    ENTRY_OVERHEAD_PER_WRITE_BYTES
        + match cmd {
            CommandV1::Put { dataset, key, value, .. } => dataset.len() + key.len() + value.len(),
            CommandV1::Delete { dataset, key, .. } | CommandV1::Check { dataset, key, .. } => dataset.len() + key.len(),
            CommandV1::Batch(cmds) | CommandV1::Atomic(cmds) => cmds.iter().map(command_bytes).sum(),
            CommandV1::ApplyRemote { source, changes, .. }
            | CommandV1::ApplyRemoteAt { source, changes, .. }
            | CommandV1::Repair { source, changes } => source.len() + changes.iter().map(change).sum::<usize>(),
            CommandV1::SetCursor { destination, .. } | CommandV1::SetBackfilled { destination, .. } => {
                destination.len()
            }
            CommandV1::CollectTombstones { dataset, keys } => {
                dataset.len()
                    + keys
                        .iter()
                        .map(|(k, o)| k.len() + o.encoded_len() + ENTRY_OVERHEAD_PER_WRITE_BYTES)
                        .sum::<usize>()
            }
            CommandV1::Purge { dataset, keys } => {
                dataset.len() + keys.iter().map(|(k, _)| k.len() + ENTRY_OVERHEAD_PER_WRITE_BYTES).sum::<usize>()
            }
            CommandV1::ApplyChanges { source, changes, .. } | CommandV1::RepairChanges { source, changes } => {
                source.len() + changes.iter().map(causal_change).sum::<usize>()
            }
            CommandV1::PutInContext { dataset, key, value, context, .. } => {
                dataset.len()
                    + key.len()
                    + value.as_ref().map_or(0, Vec::len)
                    + context.iter().map(|(r, _)| r.as_str().len() + 11).sum::<usize>()
            }
            CommandV1::Op { dataset, key, op, .. } => dataset.len() + key.len() + op.encoded_len(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn version(seq: u64) -> meridian_core::Version {
        meridian_core::Version {
            hlc: meridian_core::HlcTimestamp::new(u64::MAX >> 20, u16::MAX),
            region: meridian_core::RegionId::new("x".repeat(meridian_core::limits::PLACE_NAME_BYTES_MAX))
                .expect("region"),
            seq: u64::MAX - seq,
        }
    }

    /// The bound the proposer batches by is never below what the entry really costs: every
    /// command, at its largest framing (longest names, largest numbers), encodes smaller.
    #[test]
    fn command_bytes_bound_the_encoded_entry() {
        use meridian_core::limits::{DATASET_NAME_BYTES_MAX, KEY_BYTES_MAX};
        use meridian_raft::Condition;
        let ds = "d".repeat(DATASET_NAME_BYTES_MAX);
        let key = |i: usize| format!("{i:0>width$}", width = KEY_BYTES_MAX);
        let hlc = meridian_core::HlcTimestamp::new(u64::MAX >> 20, u16::MAX);
        let change = |i: usize, value: usize| RemoteChange {
            dataset: ds.clone(),
            key: key(i),
            version: version(i as u64),
            value: (value > 0).then(|| vec![0xff; value]),
        };
        let changes: Vec<RemoteChange> = (0..512).map(|i| change(i, i % 3)).collect();
        // Objects with a vector of many regions and siblings beside them.
        let wide: meridian_core::VersionVector = (0..64)
            .map(|i| (meridian_core::RegionId::new(format!("region-{i:0>25}")).expect("region"), u64::MAX))
            .collect();
        let causal: Vec<Change> = (0..64)
            .map(|i| {
                let mut object = meridian_raft::StoredObject::plain(version(i), Some(vec![0xff; i as usize]));
                object.vv = wide.clone();
                object.siblings = (0..7)
                    .map(|j| meridian_raft::command::Sibling { version: version(j), value: Some(vec![1; 9]) })
                    .collect();
                Change {
                    dataset: ds.clone(),
                    key: key(i as usize),
                    object,
                    rule: meridian_raft::command::MergeRule::Siblings,
                }
            })
            .collect();
        let put = |i: usize| CommandV1::Put {
            dataset: ds.clone(),
            key: key(i),
            value: vec![b'7'; 100],
            hlc,
            condition: Condition::IfMatch(version(i as u64)),
        };
        let cmds = vec![
            put(1),
            CommandV1::Delete { dataset: ds.clone(), key: key(2), hlc, condition: Condition::IfMatch(version(2)) },
            CommandV1::Batch((0..256).map(put).collect()),
            CommandV1::Atomic(vec![
                CommandV1::Check { dataset: ds.clone(), key: key(3), condition: Condition::IfMatch(version(3)) },
                put(4),
            ]),
            CommandV1::ApplyRemoteAt {
                source: ds.clone(),
                from_seq: u64::MAX,
                upto_seq: u64::MAX,
                fresh_ms: u64::MAX,
                changes: changes.clone(),
            },
            CommandV1::Repair { source: ds.clone(), changes: changes.clone() },
            CommandV1::ApplyChanges {
                source: ds.clone(),
                from_seq: u64::MAX,
                upto_seq: u64::MAX,
                fresh_ms: u64::MAX,
                changes: causal.clone(),
            },
            CommandV1::RepairChanges { source: ds.clone(), changes: causal },
            CommandV1::PutInContext {
                dataset: ds.clone(),
                key: key(5),
                value: Some(vec![b'7'; 100]),
                hlc,
                condition: Condition::IfMatch(version(5)),
                context: wide.clone(),
            },
            CommandV1::Op {
                dataset: ds.clone(),
                key: key(6),
                op: meridian_core::crdt::CrdtOp::SetFields(vec![("f".repeat(300), vec![b'1'; 300]); 9]),
                kind: meridian_core::crdt::CrdtKind::Map,
                hlc,
                condition: Condition::IfMatch(version(6)),
            },
            CommandV1::Op {
                dataset: ds.clone(),
                key: key(7),
                op: meridian_core::crdt::CrdtOp::Add((0..50).map(|i| format!("member-{i}")).collect()),
                kind: meridian_core::crdt::CrdtKind::Set,
                hlc,
                condition: Condition::Always,
            },
            CommandV1::Purge { dataset: ds.clone(), keys: (0..256).map(|i| (key(i), version(i as u64))).collect() },
            CommandV1::SetCursor { destination: ds.clone(), upto_seq: u64::MAX },
            CommandV1::SetBackfilled { destination: ds.clone(), epoch: u64::MAX },
        ];
        for cmd in cmds {
            let encoded = postcard::to_stdvec(&meridian_raft::Command::V1(cmd.clone())).expect("encode").len();
            assert!(
                encoded <= command_bytes(&cmd),
                "{encoded} > {} for {:?}",
                command_bytes(&cmd),
                std::mem::discriminant(&cmd)
            );
        }
    }

    #[test]
    fn forward_to_leader_after_proposing_is_an_unknown_outcome() {
        let e = RaftError::APIError(ClientWriteError::ForwardToLeader(openraft::error::ForwardToLeader {
            leader_id: Some(2),
            leader_node: None,
        }));
        assert!(matches!(write_error(e), LocalError::Other(NodeError::OutcomeUnknown(_))));
    }
}
