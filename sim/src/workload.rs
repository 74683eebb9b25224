//! The simulated clients. One applies the policy; then concurrent clients write and read a few
//! keys of two datasets through random gateways in every region, each call recorded in the
//! history the invariants check. When the harness says the faults are over, every client's
//! last act is a read of every key, retried until one succeeds.
//!
//! The datasets (see [`Policy`]): `catalog`, written in us-east and mirrored everywhere;
//! `vault`, restricted to eu-west, every value a fresh canary. Some reads of `vault` go to
//! gateways outside eu-west on purpose: they must be refused, never answered.
//!
//! Multi-primary: `carts` (a set) and `notes` (documents, last writer wins) have a home in
//! every region, so a gateway anywhere writes them in its own region, and the same key takes
//! concurrent writes in several. Some of each client's calls add a member no one else adds
//! (`c{client}-{n}`) to a `carts` key, or put a value no one else writes to a `notes` key;
//! each acknowledged one is recorded for `invariants/multi_primary.rs`. They are not part of
//! the linearizable history: concurrent writes in different homes are not linearizable, by
//! design.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use meridian_core::crdt::CrdtOp;
use meridian_core::RegionId;
use meridian_testkit::{Op, Outcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::invariants::multi_primary::AckedPut;
use crate::net::{self, ClientReply, ClientRequest, Reply, Request};
use crate::world::{sim_elapsed, World, CANARY_PREFIX};

/// The multi-primary datasets, homed in all three regions in every policy.
const MULTI_PRIMARY: &str = "[[dataset]]\nname = \"carts\"\nlocality = \"global\"\nclassification = \"internal\"\n\
     home = [\"us-east\", \"eu-west\", \"ap-south\"]\nkind = \"set\"\nconflict = \"crdt\"\n\n\
     [[dataset]]\nname = \"notes\"\nlocality = \"global\"\nclassification = \"internal\"\n\
     home = [\"us-east\", \"eu-west\", \"ap-south\"]\nconflict = \"lww\"\n";

/// The policies the operator applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Applied first: `catalog` written in us-east and mirrored everywhere; `vault`
    /// restricted to eu-west. `carts` and `notes` are homed everywhere in every policy.
    First,
    /// What the nemesis switches to for a while: `catalog` mirrored to eu-west only, so
    /// ap-south must purge its copies, and backfill them when the first policy comes back.
    Narrow,
    /// `vault` mirrored everywhere: a policy that lets the canaries out, to prove the
    /// residency check catches them (`--leaky-policy`).
    Leaky,
}

impl Policy {
    pub fn text(self) -> String {
        let mirrors = if self == Policy::Narrow { r#"["eu-west"]"# } else { r#""all-allowed""# };
        let vault = if self == Policy::Leaky {
            "locality = \"global\"\nclassification = \"internal\"\nmirrors = \"all-allowed\"\n\
             sync = { mode = \"continuous\", max_lag = \"5s\" }"
        } else {
            "locality = \"regional\"\nclassification = \"restricted\""
        };
        format!(
            "format = 1\n\n\
             [[dataset]]\nname = \"catalog\"\nlocality = \"global\"\nclassification = \"public\"\n\
             home = [\"us-east\"]\nmirrors = {mirrors}\nsync = {{ mode = \"continuous\", max_lag = \"5s\" }}\n\
             consistency = \"strong\"\n\n\
             [[dataset]]\nname = \"vault\"\nhome = [\"eu-west\"]\n{vault}\n\n\
             {MULTI_PRIMARY}"
        )
    }
}

/// The mirrored dataset and the restricted one.
pub const MIRRORED: &str = "catalog";
pub const RESTRICTED: &str = "vault";
/// The only region `vault` may reach.
pub const RESTRICTED_REGION: &str = "eu-west";
/// The multi-primary set and documents.
pub const CARTS: &str = "carts";
pub const NOTES: &str = "notes";
/// Keys of each multi-primary dataset: few, so that regions write one key concurrently.
pub const MULTI_PRIMARY_KEYS: u64 = 3;
/// The share of a client's calls that write a multi-primary dataset.
pub const MULTI_PRIMARY_SHARE: f64 = 0.2;

/// Concurrent clients.
pub const CLIENTS: u64 = 4;
/// Keys per dataset: few, so that calls on one key overlap.
pub const KEYS: u64 = 4;
/// A client's deadline for one call: past the gateway's own (10 s), so the gateway answers.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(12);
/// How long the policy may take to become active before the run fails.
pub const POLICY_DEADLINE: Duration = Duration::from_secs(60);
/// How long the final reads may keep retrying before the run fails.
pub const FINAL_READS_DEADLINE: Duration = Duration::from_secs(90);

fn now_ns() -> u64 {
    sim_elapsed().as_nanos() as u64
}

/// Apply the policy, then run every client, and the operator who applies the policy the
/// nemesis asks for, until the harness heals the cluster.
pub async fn run(world: Arc<World>) -> Result<(), Box<dyn std::error::Error>> {
    let first = if world.leaky_policy { Policy::Leaky } else { Policy::First };
    let deadline = sim_elapsed() + POLICY_DEADLINE;
    apply_policy(&world, first, deadline).await?;
    world.policy_active.store(true, Ordering::SeqCst);
    let mut tasks = Vec::new();
    for c in 1..=CLIENTS {
        tasks.push(tokio::spawn(client(c, world.clone())));
    }
    tasks.push(tokio::spawn(operator(world.clone(), first)));
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Apply `policy` through a us-east gateway, retrying until it is applied or `deadline`.
async fn apply_policy(world: &World, policy: Policy, deadline: Duration) -> Result<(), String> {
    let us = RegionId::new("us-east").expect("a valid region");
    let gateways = world.region_ids(&us);
    let mut attempt = 0usize;
    loop {
        if sim_elapsed() > deadline {
            return Err("a policy was not applied in time".into());
        }
        let target = gateways[attempt % gateways.len()];
        attempt += 1;
        let req = Request::Client(ClientRequest::ApplyPolicy { text: policy.text() });
        match net::call(target, &req, CALL_TIMEOUT).await {
            Ok(Reply::Client(ClientReply::Applied { epoch })) => {
                world.event(format!("operator: policy {policy:?} applied at node {target}, epoch {epoch}"));
                return Ok(());
            }
            other => world.event(format!("operator: policy {policy:?} apply at node {target}: {other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Apply whatever policy the nemesis wants (`World::policy_wanted`) whenever it may differ from
/// the active one; after the heal, apply the first policy again and stop.
///
/// An attempt that ran out of time may still have been applied (its outcome is unknown), so
/// after one the active policy counts as unknown and the wanted one is applied again. (Seed
/// 66 found the operator trusting an attempt to narrow the mirrors had failed when it had
/// committed, so the run ended under the narrow policy while the check expected the first.)
async fn operator(world: Arc<World>, first: Policy) -> Result<(), String> {
    let mut active = Some(first);
    loop {
        let healed = world.healed();
        let wanted = if healed { first } else { world.policy_wanted.lock().expect("policy lock").unwrap_or(first) };
        if active != Some(wanted) {
            let deadline = sim_elapsed() + if healed { POLICY_DEADLINE } else { Duration::from_secs(5) };
            match apply_policy(&world, wanted, deadline).await {
                Ok(()) => active = Some(wanted),
                Err(e) if healed => return Err(format!("after the heal: {e}")),
                // Maybe applied, maybe not: the next round applies what is wanted then.
                Err(_) => active = None,
            }
        } else if healed {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn client(c: u64, world: Arc<World>) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(world.seed.wrapping_mul(31).wrapping_add(c));
    let nodes = world.node_ids();
    let allowed: Vec<u64> = world.region_ids(&RegionId::new(RESTRICTED_REGION).expect("a valid region"));
    let mut written = 0u64;
    while !world.healed() {
        if rng.random_bool(MULTI_PRIMARY_SHARE) {
            written += 1;
            let key = format!("k{}", rng.random_range(0..MULTI_PRIMARY_KEYS));
            let gateway = nodes[rng.random_range(0..nodes.len())];
            if rng.random_bool(0.5) {
                add(c, &world, gateway, &key, format!("c{c}-{written}")).await;
            } else {
                put_note(c, &world, gateway, &key, format!("\"c{c}-{written}\"")).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(1..60))).await;
            continue;
        }
        let dataset = if rng.random_bool(0.5) { MIRRORED } else { RESTRICTED };
        let key = format!("k{}", rng.random_range(0..KEYS));
        let gateway = nodes[rng.random_range(0..nodes.len())];
        if rng.random_bool(0.6) {
            written += 1;
            let value = if dataset == RESTRICTED {
                format!("\"{CANARY_PREFIX}{:016x} c{c}-{written}\"", rng.random::<u64>())
            } else {
                format!("\"c{c}-{written}\"")
            };
            write(c, &world, gateway, dataset, &key, &value).await;
        } else {
            // Restricted reads go to eu-west, but one in five to a gateway anywhere: outside
            // eu-west it must refuse.
            let gateway = if dataset == RESTRICTED && !rng.random_bool(0.2) {
                allowed[rng.random_range(0..allowed.len())]
            } else {
                gateway
            };
            // One read in four asks for a local copy: routed by the gateway like a client's
            // `consistency=local`, checked for residency, and not part of the linearizable
            // history (a mirror may be behind).
            let local = rng.random_bool(0.25);
            read(c, &world, gateway, dataset, &key, local).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..60))).await;
    }
    // The faults are over: read every key once, retrying until it answers.
    let keys = world.keys.lock().expect("keys lock").clone();
    let started = sim_elapsed();
    for full in keys {
        let (dataset, key) = full.split_once('/').expect("keys are dataset/key");
        loop {
            if sim_elapsed() - started > FINAL_READS_DEADLINE {
                return Err(format!("client {c} could not read {full} within {FINAL_READS_DEADLINE:?} after the heal"));
            }
            let pool = if dataset == RESTRICTED { &allowed } else { &nodes };
            let gateway = pool[rng.random_range(0..pool.len())];
            if read(c, &world, gateway, dataset, key, false).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

async fn write(c: u64, world: &World, gateway: u64, dataset: &str, key: &str, value: &str) {
    let full = format!("{dataset}/{key}");
    {
        let mut keys = world.keys.lock().expect("keys lock");
        if !keys.contains(&full) {
            keys.push(full.clone());
        }
    }
    world.attempted.lock().expect("attempted lock").insert((full.clone(), value.to_owned()));
    let req = Request::Client(ClientRequest::Put { dataset: dataset.into(), key: key.into(), value: value.into() });
    let invoke = now_ns();
    let reply = net::call(gateway, &req, CALL_TIMEOUT).await;
    let complete = now_ns();
    let op = Op::write(c, &full, value, invoke, Some(complete));
    let op = match reply {
        Ok(Reply::Client(ClientReply::Written { .. })) => op,
        Ok(Reply::Client(ClientReply::Refused(_) | ClientReply::ResidencyRefused(_))) => {
            op.with_outcome(Outcome::Failed)
        }
        // Unknown, timed out, or interrupted: it may have been applied.
        _ => Op::write(c, &full, value, invoke, None),
    };
    world.history.lock().expect("history lock").push(op);
}

/// Add `member` to `carts/key` through `gateway`; recorded if acknowledged.
async fn add(c: u64, world: &World, gateway: u64, key: &str, member: String) {
    world.multi.lock().expect("multi lock").keys.insert((CARTS.to_owned(), key.to_owned()));
    let op = CrdtOp::Add(vec![member.clone()]);
    let req = Request::Client(ClientRequest::Op { dataset: CARTS.into(), key: key.into(), op });
    let reply = net::call(gateway, &req, CALL_TIMEOUT).await;
    let mut multi = world.multi.lock().expect("multi lock");
    match reply {
        Ok(Reply::Client(ClientReply::Written { .. })) => multi.adds.push((key.to_owned(), member, c, now_ns())),
        Ok(Reply::Client(ClientReply::Refused(_) | ClientReply::ResidencyRefused(_))) => multi.refused += 1,
        _ => multi.unknown += 1,
    }
}

/// Put `value` (unique) to `notes/key` through `gateway`; recorded with its version if
/// acknowledged.
async fn put_note(c: u64, world: &World, gateway: u64, key: &str, value: String) {
    world.multi.lock().expect("multi lock").keys.insert((NOTES.to_owned(), key.to_owned()));
    let req = Request::Client(ClientRequest::Put { dataset: NOTES.into(), key: key.into(), value: value.clone() });
    let reply = net::call(gateway, &req, CALL_TIMEOUT).await;
    let mut multi = world.multi.lock().expect("multi lock");
    match reply {
        Ok(Reply::Client(ClientReply::Written { version })) => {
            multi.puts.push(AckedPut { client: c, key: key.to_owned(), version, value, at_ns: now_ns() })
        }
        Ok(Reply::Client(ClientReply::Refused(_) | ClientReply::ResidencyRefused(_))) => multi.refused += 1,
        _ => multi.unknown += 1,
    }
}

/// One read by client `c` through `gateway`: strong, recorded in the history if it returned,
/// or `local` (not recorded: not linearizable). True if it returned a value.
async fn read(c: u64, world: &World, gateway: u64, dataset: &str, key: &str, local: bool) -> bool {
    let full = format!("{dataset}/{key}");
    let req = Request::Client(ClientRequest::Get { dataset: dataset.into(), key: key.into(), local });
    let invoke = now_ns();
    let reply = net::call(gateway, &req, CALL_TIMEOUT).await;
    let complete = now_ns();
    let spec = world.spec(gateway);
    let forbidden = dataset == RESTRICTED && spec.region.as_str() != RESTRICTED_REGION;
    match reply {
        Ok(Reply::Client(ClientReply::Value(v))) => {
            if forbidden {
                world.residency.lock().expect("residency lock").breaches.push(format!(
                    "gateway {gateway} in {} answered a read of {full} with {v:?} (called at {:.3} s)",
                    spec.region,
                    invoke as f64 / 1e9
                ));
            }
            if local {
                world.local_reads.fetch_add(1, Ordering::Relaxed);
                if let Some(v) = &v {
                    world.local_answers.lock().expect("local answers lock").push((full.clone(), v.clone()));
                }
            } else {
                let op = Op::read(c, &full, v.as_deref(), invoke, Some(complete));
                world.history.lock().expect("history lock").push(op);
            }
            true
        }
        Ok(Reply::Client(ClientReply::ResidencyRefused(_))) if forbidden => {
            world.residency.lock().expect("residency lock").refused += 1;
            false
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_the_operator_applies_is_valid_for_the_cluster() {
        let topology = crate::cluster_config().topology;
        for p in [Policy::First, Policy::Narrow, Policy::Leaky] {
            let parsed =
                meridian_policy::Policy::parse(&p.text(), meridian_policy::Format::Toml, "sim", Some(&topology));
            assert!(parsed.is_ok(), "{p:?}: {:?}\n{}", parsed.err(), p.text());
        }
    }
}
