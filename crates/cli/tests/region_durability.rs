//! Multi-process: a region of three zone processes takes writes from concurrent clients while
//! one voter is killed with SIGKILL. Every acknowledged write must be readable afterwards,
//! and the killed voter, restarted, must catch up.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Region;

const CLIENTS: u64 = 8;

async fn wait_count(acked: &Mutex<Vec<(String, String)>>, at_least: usize, deadline: Duration, region: &Region) {
    let start = Instant::now();
    while acked.lock().unwrap().len() < at_least {
        if start.elapsed() > deadline {
            region.dump_logs();
            panic!("only {} writes acknowledged within {deadline:?}", acked.lock().unwrap().len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn kill_one_voter_under_load(kill_leader: bool) {
    let mut region = Region::start("");
    let leader = region.leader(Duration::from_secs(30)).await;
    let victim = if kill_leader { leader } else { (1..=3).find(|&id| id != leader).unwrap() };

    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (1..=3).map(|id| region.client(id)).collect();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (acked, stop, clients) = (acked.clone(), stop.clone(), clients.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // Spread requests over every node, the dead one included: a gateway that is
                // down simply fails the call, which is then not acknowledged.
                let node = &clients[((c + n) % 3) as usize];
                let (key, value) = (format!("c{c}-{n}"), format!("\"v{c}-{n}\""));
                match node.put_raw("acks", &key, value.clone(), &Default::default()).await {
                    Ok(_) => acked.lock().unwrap().push((key, value)),
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }));
    }

    wait_count(&acked, 200, Duration::from_secs(60), &region).await;
    region.kill(victim);
    let at_kill = acked.lock().unwrap().len();
    // Writes keep being acknowledged: the region elected a new leader if it lost one.
    wait_count(&acked, at_kill + 200, Duration::from_secs(60), &region).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    // Every acknowledged write is readable, linearizably, from the survivors.
    let survivor = (1..=3).find(|&id| id != victim).unwrap();
    let reader = region.client(survivor);
    for (key, value) in &acked {
        let got = reader.get("acks", key, Some("strong")).await.unwrap_or_else(|e| panic!("read {key}: {e}"));
        assert_eq!(got.value.to_string(), *value, "acknowledged write {key} lost or changed");
    }

    // Restart the killed node: it catches up with the leader's applied index and serves the
    // same data from its own state.
    region.spawn(victim);
    let leader = region.leader(Duration::from_secs(30)).await;
    let target = region.client(leader).health().await.unwrap().applied_index.unwrap();
    region.wait_applied(victim, target, Duration::from_secs(60)).await;
    let local = region.client(victim);
    for (key, value) in &acked {
        let got = local
            .get("acks", key, Some("local"))
            .await
            .unwrap_or_else(|e| panic!("local read {key} on node {victim}: {e}"));
        assert_eq!(got.value.to_string(), *value);
        assert_eq!(got.served_by.node, victim);
    }
    eprintln!("{} acknowledged writes verified ({} before the kill)", acked.len(), at_kill);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_leader_loses_no_acknowledged_write() {
    kill_one_voter_under_load(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_follower_loses_no_acknowledged_write() {
    kill_one_voter_under_load(false).await;
}
