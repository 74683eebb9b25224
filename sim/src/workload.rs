//! The simulated clients: concurrent writers and linearizable readers on a few keys, each
//! call recorded in the history the invariants check. When the harness says the faults are
//! over, every client's last act is a read of every key, retried until one succeeds.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use meridian_testkit::{Op, Outcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::net::{self, ClientReply, ClientRequest, Reply, Request};
use crate::world::{sim_elapsed, World};

/// Concurrent clients.
pub const CLIENTS: u64 = 4;
/// Keys they share: few, so that calls on one key overlap.
pub const KEYS: u64 = 6;
/// A client's deadline for one call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the final reads may keep retrying before the run fails.
pub const FINAL_READS_DEADLINE: Duration = Duration::from_secs(60);

fn now_ns() -> u64 {
    sim_elapsed().as_nanos() as u64
}

/// Run every client until the harness heals the cluster, then read every key.
pub async fn run(world: Arc<World>) -> Result<(), Box<dyn std::error::Error>> {
    let mut tasks = Vec::new();
    for c in 1..=CLIENTS {
        tasks.push(tokio::spawn(client(c, world.clone())));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn client(c: u64, world: Arc<World>) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(world.seed.wrapping_mul(31).wrapping_add(c));
    let nodes = world.node_ids();
    let mut leader: Option<u64> = None;
    let mut written = 0u64;
    while !world.healed.load(Ordering::SeqCst) {
        let key = format!("k{}", rng.random_range(0..KEYS));
        let target = leader.unwrap_or_else(|| nodes[rng.random_range(0..nodes.len())]);
        if rng.random_bool(0.6) {
            written += 1;
            let value = format!("c{c}-{written}");
            {
                let mut keys = world.keys.lock().expect("keys lock");
                if !keys.contains(&key) {
                    keys.push(key.clone());
                }
            }
            let invoke = now_ns();
            let reply = net::call(
                target,
                &Request::Client(ClientRequest::Put { key: key.clone(), value: value.clone() }),
                CALL_TIMEOUT,
            )
            .await;
            let complete = now_ns();
            let op = Op::write(c, &key, &value, invoke, Some(complete));
            let op = match reply {
                Ok(Reply::Client(ClientReply::Written)) => op,
                Ok(Reply::Client(ClientReply::NotLeader(hint))) => {
                    leader = hint;
                    op.with_outcome(Outcome::Failed)
                }
                Ok(Reply::Client(ClientReply::Refused(_))) => op.with_outcome(Outcome::Failed),
                _ => {
                    leader = None;
                    Op::write(c, &key, &value, invoke, None)
                }
            };
            world.history.lock().expect("history lock").push(op);
        } else {
            read(c, &world, target, &key, &mut leader).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..40))).await;
    }
    // The faults are over: read every key once, from the leader, retrying until it answers.
    let keys = world.keys.lock().expect("keys lock").clone();
    let started = sim_elapsed();
    for key in keys {
        loop {
            if sim_elapsed() - started > FINAL_READS_DEADLINE {
                return Err(format!("client {c} could not read {key} within {FINAL_READS_DEADLINE:?} after the heal"));
            }
            let target = leader.unwrap_or_else(|| nodes[rng.random_range(0..nodes.len())]);
            if read(c, &world, target, &key, &mut leader).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// One linearizable read by client `c`, recorded if it returned; follows a leader hint.
/// True if it returned a value.
async fn read(c: u64, world: &World, target: u64, key: &str, leader: &mut Option<u64>) -> bool {
    let invoke = now_ns();
    let reply = net::call(target, &Request::Client(ClientRequest::Get { key: key.to_owned() }), CALL_TIMEOUT).await;
    let complete = now_ns();
    match reply {
        Ok(Reply::Client(ClientReply::Value(v))) => {
            let op = Op::read(c, key, v.as_deref(), invoke, Some(complete));
            world.history.lock().expect("history lock").push(op);
            return true;
        }
        Ok(Reply::Client(ClientReply::NotLeader(hint))) => *leader = hint,
        _ => *leader = None,
    }
    false
}
