//! Multi-process: a voter that was down while the region compacted its log past what it has
//! catches up by snapshot installation, then by the log, and serves every write locally.

mod common;

use std::time::Duration;

use common::Region;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_behind_the_compacted_log_catches_up_from_a_snapshot() {
    let mut region = Region::start("[raft]\nsnapshot_every_entries = 50\nlog_entries_kept_after_snapshot = 5\n");
    let leader = region.leader(Duration::from_secs(30)).await;
    let down = (1..=3).find(|&id| id != leader).unwrap();
    // A follower may not have applied the first entries yet when the leader is known.
    let first = region.client(leader).health().await.unwrap().applied_index.unwrap_or(1).max(1);
    region.wait_applied(down, first, Duration::from_secs(30)).await;
    let behind = region.client(down).health().await.unwrap().applied_index.unwrap_or(0);
    region.kill(down);

    let c = region.client(leader);
    for i in 0..400 {
        c.put_raw("snap", &format!("k{i:03}"), format!("{i}"), &Default::default()).await.unwrap();
    }
    // The leader compacted its log past everything the stopped voter has: the entries it
    // needs exist only inside a snapshot now.
    let h = c.health().await.unwrap();
    assert!(h.purged_index.unwrap_or(0) > behind + 1, "leader did not compact past {behind}: {h:?}");

    region.spawn(down);
    let target = c.health().await.unwrap().applied_index.unwrap();
    region.wait_applied(down, target, Duration::from_secs(60)).await;
    let h = region.client(down).health().await.unwrap();
    assert!(h.snapshot_index.unwrap_or(0) > behind + 1, "node {down} holds no snapshot past its old state: {h:?}");
    let local = region.client(down);
    let page = local.list("snap", None, Some(1000), None, Some("local")).await.unwrap();
    assert_eq!(page.items.len(), 400);
    for i in [0, 199, 399] {
        let got = local.get("snap", &format!("k{i:03}"), Some("local")).await.unwrap();
        assert_eq!(got.value, serde_json::json!(i));
    }
    // And it keeps up with new writes through the log.
    c.put_raw("snap", "after", "1", &Default::default()).await.unwrap();
    let target = c.health().await.unwrap().applied_index.unwrap();
    region.wait_applied(down, target, Duration::from_secs(30)).await;
    assert_eq!(local.get("snap", "after", Some("local")).await.unwrap().value, serde_json::json!(1));
}
