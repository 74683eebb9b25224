//! One simulated node: the real Raft group (openraft with Meridian's log store and state
//! machine) over simulated disks and the simulated network, serving peers and clients.
//!
//! It stands in for the node composition root (`crates/node`) until that takes its peer
//! transport through a seam too; what it runs of Meridian is the consensus and storage code.

use std::sync::Arc;
use std::time::Duration;

use meridian_core::{Hlc, RegionId};
use meridian_raft::command::{CommandV1, Condition};
use meridian_raft::network::{serve_raft_rpc, NetworkFactory};
use meridian_raft::{Command, CommandResult, LogStore, Raft, StateMachineStore};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ServerState};

use crate::net::{self, ClientReply, ClientRequest, Reply, Request, SimRpc};
use crate::world::World;

/// The dataset every simulated client writes.
pub const DATASET: &str = "sim";

pub fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "meridian-sim".into(),
        heartbeat_interval: 50,
        election_timeout_min: 200,
        election_timeout_max: 400,
        max_payload_entries: 64,
        // Small enough that runs build snapshots, purge logs and send snapshots to nodes that
        // were down.
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(300),
        max_in_snapshot_log_to_keep: 50,
        purge_batch_size: 16,
        ..Default::default()
    }
    .validate()
    .expect("a valid Raft configuration")
}

/// Run node `id` until the simulation crashes it.
pub async fn run(id: u64, world: Arc<World>) -> Result<(), Box<dyn std::error::Error>> {
    let disks = world.disks(id);
    disks.log.power_on();
    disks.state.power_on();
    let region = RegionId::new("sim").expect("a valid region name");
    let sm_db = redb::Database::builder().create_with_backend(disks.state.backend())?;
    let sm = StateMachineStore::with_database(sm_db, world.snapshot_path(id), region)?;
    let reader = sm.reader();
    let durable = sm.durable_point();
    let log_db = redb::Database::builder().create_with_backend(disks.log.backend())?;
    let mut log = LogStore::with_database_inline(log_db, sm.durable_point())?;
    let mut sm = sm;
    // What the node starts from, for the error if openraft refuses it.
    let start_state = {
        use openraft::storage::{RaftLogReader as _, RaftLogStorage as _, RaftStateMachine as _};
        let state = log.get_log_state().await?;
        let entries = log.try_get_log_entries(0..u64::MAX).await.unwrap_or_default();
        let first = entries.first().map(|e| e.log_id.index);
        let gaps: Vec<(u64, u64)> = entries
            .windows(2)
            .filter(|w| w[1].log_id.index != w[0].log_id.index + 1)
            .map(|w| (w[0].log_id.index, w[1].log_id.index))
            .collect();
        let committed = log.read_committed().await?;
        let (applied, _) = sm.applied_state().await?;
        format!(
            "log first index {first:?}, last {:?}, purged {:?}, gaps {gaps:?}; committed {:?}; state machine applied {:?}, durable through {}",
            state.last_log_id.map(|l| l.index),
            state.last_purged_log_id.map(|l| l.index),
            committed.map(|l| l.index),
            applied.map(|l| l.index),
            durable.load(std::sync::atomic::Ordering::SeqCst)
        )
    };
    let rpc = SimRpc { faults: world.faults.clone() };
    let raft = Raft::new(id, Arc::new(raft_config()), NetworkFactory::new(id, rpc), log, sm)
        .await
        .map_err(|e| format!("node {id} could not start from {start_state}: {e}"))?;
    world.node_started(id, crate::world::Live { raft: raft.clone(), reader: reader.clone(), durable });
    if id == 1 && !world.take_bootstrap() {
        let members = world
            .node_ids()
            .into_iter()
            .map(|n| (n, BasicNode::default()))
            .collect::<std::collections::BTreeMap<_, _>>();
        raft.initialize(members).await?;
    }
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", net::PORT)).await?;
    let hlc = Arc::new(std::sync::Mutex::new(Hlc::new(500)));
    loop {
        let (stream, _) = listener.accept().await?;
        let (raft, hlc) = (raft.clone(), hlc.clone());
        let reader = reader.clone();
        tokio::spawn(net::serve_connection(stream, move |req| async move {
            match req {
                Request::Raft(r) => Reply::Raft(serve_raft_rpc(&raft, r).await),
                Request::Client(c) => Reply::Client(serve_client(&raft, &reader, &hlc, c).await),
            }
        }));
    }
}

/// How long a leader may take to confirm a read or commit a write before the client is told
/// the outcome is unknown.
const CLIENT_OP_TIMEOUT: Duration = Duration::from_secs(2);

async fn serve_client(
    raft: &Raft,
    reader: &meridian_raft::StateMachineReader,
    hlc: &std::sync::Mutex<Hlc>,
    req: ClientRequest,
) -> ClientReply {
    let metrics = raft.metrics().borrow().clone();
    if metrics.state != ServerState::Leader {
        return ClientReply::NotLeader(metrics.current_leader);
    }
    match req {
        ClientRequest::Put { key, value } => {
            let wall = crate::world::sim_now_ms();
            let stamp = match hlc.lock().expect("hlc lock").now(wall) {
                Ok(t) => t,
                Err(e) => return ClientReply::Refused(e.to_string()),
            };
            let cmd = Command::V1(CommandV1::Put {
                dataset: DATASET.into(),
                key,
                value: value.into_bytes(),
                hlc: stamp,
                condition: Condition::Always,
            });
            match tokio::time::timeout(CLIENT_OP_TIMEOUT, raft.client_write(cmd)).await {
                Ok(Ok(resp)) => match resp.data {
                    CommandResult::Written { .. } => ClientReply::Written,
                    other => ClientReply::Unknown(format!("unexpected result {other:?}")),
                },
                // Refused before anything was proposed.
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    ClientReply::NotLeader(f.leader_id)
                }
                Ok(Err(e)) => ClientReply::Unknown(e.to_string()),
                Err(_) => ClientReply::Unknown("no commit within the deadline".into()),
            }
        }
        ClientRequest::Get { key } => {
            match tokio::time::timeout(CLIENT_OP_TIMEOUT, raft.ensure_linearizable()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return ClientReply::Unknown(e.to_string()),
                Err(_) => return ClientReply::Unknown("no read confirmation within the deadline".into()),
            }
            match reader.get(DATASET, &key) {
                Ok(obj) => {
                    ClientReply::Value(obj.and_then(|o| o.value).map(|v| String::from_utf8_lossy(&v).into_owned()))
                }
                Err(e) => ClientReply::Unknown(format!("read: {e}")),
            }
        }
    }
}
