//! Multi-process: a concurrent single-region history of writes and strong reads over a few
//! keys, recorded while the leader is killed, must be linearizable (checked per key).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{nanos, Region};
use meridian_api::ErrorCode;
use meridian_client::ClientError;
use meridian_testkit::linearizability::{check, History, Op, Outcome};

const CLIENTS: u64 = 6;
const KEYS: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_under_leader_kill_is_linearizable() {
    let mut region = Region::start("");
    let leader = region.leader(Duration::from_secs(30)).await;
    let start = Instant::now();
    let history: Arc<Mutex<History>> = Arc::default();
    let completed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (1..=3).map(|id| region.client(id)).collect();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (history, completed, stop, clients) = (history.clone(), completed.clone(), stop.clone(), clients.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let node = &clients[((c * 7 + n) % 3) as usize];
                let key = format!("k{}", (c + n) % KEYS);
                let invoke = nanos(start);
                let op = if (c + n).is_multiple_of(2) {
                    let value = format!("c{c}-{n}");
                    let r = node.put_raw("lin", &key, format!("\"{value}\""), &Default::default()).await;
                    let done = nanos(start);
                    match r {
                        Ok(_) => Op::write(c, &key, &value, invoke, Some(done)),
                        // The gateway proved nothing was proposed.
                        Err(ClientError::Api { body, .. }) if body.code == ErrorCode::NoLeader => {
                            Op::write(c, &key, &value, invoke, Some(done)).with_outcome(Outcome::Failed)
                        }
                        Err(_) => Op::write(c, &key, &value, invoke, None),
                    }
                } else {
                    let r = node.get("lin", &key, Some("strong")).await;
                    let done = nanos(start);
                    match r {
                        Ok(g) => Op::read(c, &key, Some(g.value.as_str().unwrap()), invoke, Some(done)),
                        Err(e) if e.code() == Some(ErrorCode::KeyNotFound) => {
                            Op::read(c, &key, None, invoke, Some(done))
                        }
                        Err(_) => Op::read(c, &key, None, invoke, None),
                    }
                };
                if op.outcome == Outcome::Ok {
                    completed.fetch_add(1, Ordering::Relaxed);
                } else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                history.lock().unwrap().push(op);
            }
        }));
    }
    let wait_for = |target: usize| {
        let completed = completed.clone();
        async move {
            let t = Instant::now();
            while completed.load(Ordering::Relaxed) < target {
                assert!(
                    t.elapsed() < Duration::from_secs(90),
                    "only {} operations completed",
                    completed.load(Ordering::Relaxed)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(300).await;
    region.kill(leader);
    let at_kill = completed.load(Ordering::Relaxed);
    wait_for(at_kill + 300).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let history = history.lock().unwrap().clone();
    let unknown = history.ops().iter().filter(|o| o.outcome == Outcome::Unknown).count();
    let stats = check(&history).unwrap_or_else(|e| panic!("not linearizable: {e}"));
    assert!(stats.ops_checked >= 600, "too little was checked: {stats:?}");
    eprintln!("{} operations ({unknown} with unknown outcome) linearizable: {stats:?}", history.len());
}
