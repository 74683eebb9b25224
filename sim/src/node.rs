//! One simulated node: Meridian's real node (`meridian_node::Node`: its region's Raft group,
//! the links, the policy, routing, anti-entropy) over simulated disks, a simulated clock and
//! the simulated network, serving its peers and the clients.
//!
//! Clients reach it as they would reach the HTTP API: through the node's gateway, the same
//! `put`/`op`/`get` the server calls, so routing (a write to the key's home region, a strong read to
//! the home's leader, a local read from this region's copy, and never a restricted value into a
//! region its policy keeps it out of) runs under simulation.

use std::sync::Arc;

use meridian_core::{DatasetName, Key};
use meridian_node::transport::serve_peer_body;
use meridian_node::{Consistency, Node, NodeError, NodeOptions, NodeStorage, Precondition, WriteOutcome};
use meridian_raft::wal::{LogFiles, WalOptions};

use crate::disk::Disk;
use crate::net::{self, ClientReply, ClientRequest, Reply, Request, SimWire};
use crate::workload::NOTES;
use crate::world::{Live, SimClock, World};

/// Run node `id` until the simulation crashes it.
/// How long a group commit of the Raft log takes on a simulated disk: about what an fsync
/// costs on the machines we measure, so that a leader's own write overlaps its replication, and
/// a crash can fall between the two, as in production.
pub const LOG_SYNC_TIME: std::time::Duration = std::time::Duration::from_micros(400);

/// One sync's time: half to one and a half times [`LOG_SYNC_TIME`]; one in ten stalls for 10 to
/// 50 times as long, as real disks do, long enough for a follower to answer first.
fn log_sync_time() -> std::time::Duration {
    let draw = meridian_raft::rt::random_f64();
    let factor = if draw < 0.1 { 10.0 + 400.0 * draw } else { 0.5 + draw };
    LOG_SYNC_TIME.mul_f64(factor)
}

/// Small files, so that runs compact the Raft log (and crash in the middle of doing so).
const LOG_OPTIONS: WalOptions = WalOptions { compact_at_bytes: 32 << 10, preallocate_bytes: 16 << 10 };

pub async fn run(id: u64, world: Arc<World>) -> Result<(), Box<dyn std::error::Error>> {
    let disks = world.disks(id);
    disks.log.iter().for_each(Disk::power_on);
    disks.state.power_on();
    let spec = world.spec(id);
    let log: LogFiles = [Arc::new(disks.log[0].backend()), Arc::new(disks.log[1].backend())];
    let state = redb::Database::builder().create_with_backend(disks.state.backend())?;
    let opts = NodeOptions {
        config: world.config.clone(),
        node_id: id,
        storage: NodeStorage::Opened {
            log,
            log_options: LOG_OPTIONS,
            state,
            snapshot_path: world.snapshot_path(id),
            log_sync_time: Arc::new(log_sync_time),
        },
        clock: Arc::new(SimClock { id, world: world.clone() }),
        wire: Arc::new(SimWire { node: spec.clone(), world: world.clone(), faults: world.faults.clone() }),
        wire_capture: None,
    };
    let node = Node::start(opts).await.map_err(|e| format!("node {id} could not start: {e:#}"))?;
    // Listen before the group forms, so that no first election knocks on a closed door.
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", net::PORT)).await?;
    // One voter forms each region's group, once; the others learn the membership from it.
    if world.region_ids(&spec.region).first() == Some(&id) && !world.take_bootstrap(&spec.region) {
        node.bootstrap().await?;
    }
    world.node_started(id, Live { node: node.clone() });
    loop {
        let (stream, _) = listener.accept().await?;
        let node = node.clone();
        let world = world.clone();
        tokio::spawn(net::serve_connection(stream, move |req| async move {
            match req {
                Request::Peer { body, compressed } => {
                    let r = serve_peer_body(&node, &body, compressed, compressed).await;
                    Reply::Peer { status: r.status, body: r.body.to_vec(), compressed: r.compressed }
                }
                Request::Client(c) => Reply::Client(serve_client(&node, &world, c).await),
            }
        }));
    }
}

/// A client call, routed as the HTTP API routes it.
async fn serve_client(node: &Node, world: &World, req: ClientRequest) -> ClientReply {
    match req {
        ClientRequest::Put { dataset, key, value } => {
            let (dataset, key) = match names(&dataset, &key) {
                Ok(n) => n,
                Err(reply) => return reply,
            };
            let reply = match node.gateway().put(&dataset, &key, value.into_bytes(), Precondition::None, None).await {
                Ok((WriteOutcome::Written { version, .. }, _)) => ClientReply::Written { version },
                Ok((other, _)) => ClientReply::Unknown(format!("unexpected result {other:?}")),
                Err(e) => refusal(e),
            };
            // A multi-primary write applies in this region: its copies now hold the version
            // alone, unless more came since (see invariants/multi_primary.rs).
            if dataset.as_str() == NOTES {
                world.observe_region(&node.spec().region, key.as_str());
            }
            reply
        }
        ClientRequest::Op { dataset, key, op } => {
            let (dataset, key) = match names(&dataset, &key) {
                Ok(n) => n,
                Err(reply) => return reply,
            };
            match node.gateway().op(&dataset, &key, op, Precondition::None, None).await {
                Ok((WriteOutcome::Written { version, .. }, _)) => ClientReply::Written { version },
                Ok((other, _)) => ClientReply::Unknown(format!("unexpected result {other:?}")),
                Err(e) => refusal(e),
            }
        }
        ClientRequest::Get { dataset, key, local } => {
            let (dataset, key) = match names(&dataset, &key) {
                Ok(n) => n,
                Err(reply) => return reply,
            };
            let consistency = if local { Consistency::Local } else { Consistency::Strong };
            match node.gateway().get(&dataset, &key, consistency.into(), None).await {
                Ok((obj, _)) => {
                    ClientReply::Value(obj.and_then(|o| o.value).map(|v| String::from_utf8_lossy(&v).into_owned()))
                }
                Err(e) => refusal(e),
            }
        }
        ClientRequest::ApplyPolicy { text } => {
            let full = meridian_policy::Rollout {
                mode: meridian_policy::Mode::Enforce,
                percent: meridian_policy::Rollout::FULL,
            };
            let now = world.clock_ms(node.id());
            match node.policy_apply(&text, meridian_policy::Format::Toml, "sim-policy.toml", full, "apply", now).await {
                Ok(outcome) => ClientReply::Applied { epoch: outcome.entry.epoch },
                // A policy applied twice (a retry after an unknown outcome) is refused as a
                // conflict or a no-op; the client checks the active version either way.
                Err(e) => ClientReply::Unknown(e.to_string()),
            }
        }
    }
}

/// Names checked at the boundary, as the server checks them.
fn names(dataset: &str, key: &str) -> Result<(DatasetName, Key), ClientReply> {
    match (DatasetName::new(dataset), Key::new(key)) {
        (Ok(d), Ok(k)) => Ok((d, k)),
        (Err(e), _) => Err(ClientReply::Refused(e.to_string())),
        (_, Err(e)) => Err(ClientReply::Refused(e.to_string())),
    }
}

/// What a failed call tells the client: refused (nothing applied) or unknown.
fn refusal(e: NodeError) -> ClientReply {
    match e {
        NodeError::ResidencyRefused(m, _) => ClientReply::ResidencyRefused(m),
        NodeError::NoLeader
        | NodeError::Unavailable { .. }
        | NodeError::NoRegion { .. }
        | NodeError::NotPromoted(_)
        | NodeError::PromotionRefused(_)
        | NodeError::ClockSkew(_)
        | NodeError::DatasetNotInPolicy(_)
        | NodeError::HomeUnknown(_)
        | NodeError::PolicyRefused(_)
        | NodeError::HomeImmutable(_)
        | NodeError::NoStalenessBound(_)
        | NodeError::WrongOperation(_)
        | NodeError::TooLarge(_)
        | NodeError::ConflictNotFound(_)
        | NodeError::InvalidResolution(_) => ClientReply::Refused(e.to_string()),
        NodeError::OutcomeUnknown(_) | NodeError::Storage(_) | NodeError::Internal(_) => {
            ClientReply::Unknown(e.to_string())
        }
    }
}
