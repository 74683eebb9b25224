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

use meridian_raft::command::CommandV1;
use meridian_raft::{Command, CommandResult, Raft};
use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use tokio::sync::{mpsc, oneshot};

use crate::error::{LocalError, NodeError};
use crate::limits::{BATCH_BYTES_MAX, BATCH_WRITES_MAX, PROPOSALS_IN_FLIGHT_MAX, PROPOSAL_QUEUE_MAX};
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
    rx: mpsc::Receiver<Proposal>,
}

impl Proposer {
    pub(crate) fn new(region: Arc<RegionGroup>) -> (Proposer, ProposerWorker) {
        let (queue, rx) = mpsc::channel(PROPOSAL_QUEUE_MAX);
        let worker = ProposerWorker { raft: region.raft().clone(), rx };
        (Proposer { region, queue }, worker)
    }

    /// Queue one command (commands reach the log in the order they are queued); the answer
    /// yields its result.
    pub(crate) async fn enqueue(&self, cmd: CommandV1, bytes: usize) -> Result<Answer, LocalError> {
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
    pub(crate) async fn propose(&self, cmd: CommandV1, bytes: usize) -> Result<CommandResult, LocalError> {
        self.enqueue(cmd, bytes).await?.wait().await
    }

    /// Propose the node's own bookkeeping (a merged batch, a cursor, a repair, a purge) if
    /// this node leads its region.
    pub(crate) async fn propose_if_leader(&self, cmd: CommandV1) -> Result<CommandResult, LocalError> {
        self.region.lead_or_refuse()?;
        self.propose(cmd, 0).await
    }
}

impl ProposerWorker {
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
        // Stopping: the waits still running are aborted with the set, and their writers hear
        // an unknown outcome (the entry may yet commit). A command still queued is dropped the
        // same way: it was never proposed, but its writer is already gone or going.
        self.rx.close();
        outcomes.shutdown().await;
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

    #[test]
    fn forward_to_leader_after_proposing_is_an_unknown_outcome() {
        let e = RaftError::APIError(ClientWriteError::ForwardToLeader(openraft::error::ForwardToLeader {
            leader_id: Some(2),
            leader_node: None,
        }));
        assert!(matches!(write_error(e), LocalError::Other(NodeError::OutcomeUnknown(_))));
    }
}
