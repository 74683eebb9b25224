//! Our own storage tests: recovery after reopening, apply semantics, snapshots.

use std::collections::BTreeSet;

use meridian_core::{HlcTimestamp, RegionId};
use meridian_raft::command::CommandV1;
use meridian_raft::{Command, CommandResult, Condition, Entry, LogStore, StateMachineStore};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership, RaftLogReader, RaftSnapshotBuilder};

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn put(index: u64, key: &str, value: &str, hlc: u64, condition: Condition) -> Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(Command::V1(CommandV1::Put {
            dataset: "d".into(),
            key: key.into(),
            value: value.as_bytes().to_vec(),
            hlc: HlcTimestamp::new(hlc, 0),
            condition,
        })),
    }
}

fn region() -> RegionId {
    RegionId::new("r1").unwrap()
}

#[tokio::test]
async fn log_survives_reopen_and_truncate_purge() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.wal");
    {
        let mut log = LogStore::open(&path).unwrap();
        let entries: Vec<Entry> = (1..=10).map(|i| put(i, "k", "v", 1, Condition::Always)).collect();
        log.blocking_append(entries).await.unwrap();
        log.truncate(log_id(1, 8)).await.unwrap();
        log.purge(log_id(1, 3)).await.unwrap();
        log.save_vote(&openraft::Vote::new(4, 2)).await.unwrap();
        assert!(log.stats().fsyncs_total.load(std::sync::atomic::Ordering::Relaxed) >= 4);
    }
    // The writer thread holds the database until its channel closes; wait for that.
    let mut log = loop {
        match LogStore::open(&path) {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    };
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
    assert_eq!(state.last_log_id, Some(log_id(1, 7)));
    assert_eq!(log.read_vote().await.unwrap(), Some(openraft::Vote::new(4, 2)));
    let got = log.try_get_log_entries(0..100).await.unwrap();
    assert_eq!(got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), vec![4, 5, 6, 7]);
}

#[tokio::test]
async fn apply_assigns_versions_and_checks_conditions() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let r = sm
        .apply(vec![
            put(1, "a", "1", 1000, Condition::Always),
            // A stale leader clock: the stamp is still pushed past the previous one.
            put(2, "a", "2", 5, Condition::Always),
            put(3, "a", "3", 2000, Condition::IfAbsent),
        ])
        .await
        .unwrap();
    let (v1, v2) = match (&r[0], &r[1]) {
        (
            CommandResult::Written { version: v1, created: true },
            CommandResult::Written { version: v2, created: false },
        ) => (v1.clone(), v2.clone()),
        other => panic!("unexpected {other:?}"),
    };
    assert!(v2 > v1 && v2.seq == v1.seq + 1 && v2.hlc > v1.hlc);
    assert_eq!(r[2], CommandResult::PreconditionFailed { current: Some(v2.clone()) });
    let r = sm.apply(vec![put(4, "a", "4", 3000, Condition::IfMatch(v1.clone()))]).await.unwrap();
    assert_eq!(r[0], CommandResult::PreconditionFailed { current: Some(v2.clone()) });
    let r = sm.apply(vec![put(5, "a", "5", 3000, Condition::IfMatch(v2.clone()))]).await.unwrap();
    assert!(matches!(r[0], CommandResult::Written { .. }));
    let reader = sm.reader();
    assert_eq!(reader.get("d", "a").unwrap().unwrap().value.as_deref(), Some(&b"5"[..]));
    let del = Entry {
        log_id: log_id(1, 6),
        payload: EntryPayload::Normal(Command::V1(CommandV1::Delete {
            dataset: "d".into(),
            key: "a".into(),
            hlc: HlcTimestamp::new(1, 0),
            condition: Condition::Always,
        })),
    };
    let mut del2 = del.clone();
    del2.log_id = log_id(1, 7);
    let r = sm.apply(vec![del, del2]).await.unwrap();
    assert!(matches!(r[0], CommandResult::Deleted { .. }));
    assert_eq!(r[1], CommandResult::NotFound);
    assert!(!reader.get("d", "a").unwrap().unwrap().is_live());
    assert!(reader.list("d", "", None, 10).unwrap().is_empty());
}

#[tokio::test]
async fn list_pages_by_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let keys = ["a1", "a2", "a3", "b1", "a"];
    let entries: Vec<Entry> =
        keys.iter().enumerate().map(|(i, k)| put(i as u64 + 1, k, "x", 1, Condition::Always)).collect();
    sm.apply(entries).await.unwrap();
    let r = sm.reader();
    let names = |v: Vec<(String, _)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(names(r.list("d", "a", None, 2).unwrap()), vec!["a", "a1"]);
    assert_eq!(names(r.list("d", "a", Some("a1"), 10).unwrap()), vec!["a2", "a3"]);
    assert_eq!(names(r.list("d", "", Some("a3"), 10).unwrap()), vec!["b1"]);
    assert!(r.list("other", "", None, 10).unwrap().is_empty());
}

#[tokio::test]
async fn snapshot_round_trip_into_a_fresh_state_machine() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let mut entries = vec![Entry {
        log_id: log_id(1, 1),
        payload: EntryPayload::Membership(Membership::new(vec![BTreeSet::from([1, 2, 3])], None)),
    }];
    entries.extend((2..50).map(|i| put(i, &format!("k{i}"), "v", i, Condition::Always)));
    sm.apply(entries).await.unwrap();
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 49)));

    let dir2 = tempfile::tempdir().unwrap();
    let mut sm2 = StateMachineStore::open(dir2.path(), region()).unwrap();
    sm2.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    let (applied, membership) = sm2.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 49)));
    assert_eq!(membership.membership().voter_ids().collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(sm2.reader().list("d", "k", None, 1000).unwrap().len(), 48);
    // The next write continues the region's sequence where the snapshot left it.
    let r = sm2.apply(vec![put(50, "z", "v", 1, Condition::Always)]).await.unwrap();
    match &r[0] {
        CommandResult::Written { version, .. } => assert_eq!(version.seq, 49),
        other => panic!("{other:?}"),
    }
    // And the snapshot is still there after reopening.
    drop(sm2);
    let mut sm3 = StateMachineStore::open(dir2.path(), region()).unwrap();
    assert!(sm3.get_current_snapshot().await.unwrap().is_some());
    assert_eq!(sm3.applied_state().await.unwrap().0, Some(log_id(1, 50)));
}

#[tokio::test]
async fn reads_span_the_memory_tail_and_the_disk_after_eviction() {
    use meridian_raft::log_store::TAIL_ENTRIES_MAX;
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(&dir.path().join("log.wal")).unwrap();
    let total = TAIL_ENTRIES_MAX as u64 + 500;
    for chunk in (1..=total).collect::<Vec<_>>().chunks(700) {
        let entries: Vec<Entry> = chunk.iter().map(|&i| put(i, &format!("k{i}"), "v", 1, Condition::Always)).collect();
        log.blocking_append(entries).await.unwrap();
    }
    let got = log.try_get_log_entries(1..=total).await.unwrap();
    assert_eq!(got.len() as u64, total);
    assert!(got.iter().enumerate().all(|(i, e)| e.log_id.index == i as u64 + 1), "entries out of order or missing");
    // A range that starts on disk and ends in memory, and one wholly in memory.
    assert_eq!(log.try_get_log_entries(10..600).await.unwrap().len(), 590);
    assert_eq!(log.try_get_log_entries(total - 5..=total + 10).await.unwrap().len(), 6);
    // Truncating inside the memory tail, then appending a new suffix.
    log.truncate(log_id(1, total - 9)).await.unwrap();
    let mut e = put(total - 9, "new", "v", 1, Condition::Always);
    e.log_id = log_id(2, total - 9);
    log.blocking_append(vec![e]).await.unwrap();
    let tail = log.try_get_log_entries(total - 12..).await.unwrap();
    assert_eq!(tail.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), (total - 12..=total - 9).collect::<Vec<_>>());
    assert_eq!(tail.last().unwrap().log_id, log_id(2, total - 9));
}

#[tokio::test]
async fn a_batch_applies_in_order_with_one_result_per_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let cmd = |key: &str, value: &str, condition| CommandV1::Put {
        dataset: "d".into(),
        key: key.into(),
        value: value.as_bytes().to_vec(),
        hlc: HlcTimestamp::new(7, 0),
        condition,
    };
    let batch = Entry {
        log_id: log_id(1, 1),
        payload: EntryPayload::Normal(Command::V1(CommandV1::Batch(vec![
            cmd("a", "1", Condition::IfAbsent),
            // Same key, same batch: the condition sees the write just before it.
            cmd("a", "2", Condition::IfAbsent),
            cmd("b", "3", Condition::Always),
        ]))),
    };
    let r = sm.apply(vec![batch]).await.unwrap();
    let CommandResult::Batch(results) = &r[0] else { panic!("{r:?}") };
    assert_eq!(results.len(), 3);
    let CommandResult::Written { version: va, created: true } = &results[0] else { panic!("{results:?}") };
    assert_eq!(results[1], CommandResult::PreconditionFailed { current: Some(va.clone()) });
    let CommandResult::Written { version: vb, .. } = &results[2] else { panic!("{results:?}") };
    assert!(vb.seq == va.seq + 1 && vb.hlc > va.hlc, "versions in a batch still strictly increase");
    assert_eq!(sm.reader().get("d", "a").unwrap().unwrap().value.as_deref(), Some(&b"1"[..]));
}

#[tokio::test]
async fn an_atomic_group_applies_entirely_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let cmd = |key: &str, value: &str, condition| CommandV1::Put {
        dataset: "d".into(),
        key: key.into(),
        value: value.as_bytes().to_vec(),
        hlc: HlcTimestamp::new(7, 0),
        condition,
    };
    let entry = |index, cmds| Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(Command::V1(CommandV1::Atomic(cmds))),
    };
    let r = sm
        .apply(vec![entry(1, vec![cmd("a", "1", Condition::IfAbsent), cmd("b", "1", Condition::IfAbsent)])])
        .await
        .unwrap();
    let CommandResult::Batch(results) = &r[0] else { panic!("{r:?}") };
    let CommandResult::Written { version: va, .. } = &results[0] else { panic!("{results:?}") };
    // The second condition fails, so the first write must not happen either.
    let r = sm
        .apply(vec![entry(2, vec![cmd("c", "2", Condition::Always), cmd("a", "2", Condition::IfAbsent)])])
        .await
        .unwrap();
    assert_eq!(r[0], CommandResult::AtomicFailed { index: 1, current: Some(va.clone()) });
    assert!(sm.reader().get("d", "c").unwrap().is_none(), "a failed atomic group wrote something");
    assert_eq!(sm.reader().get("d", "a").unwrap().unwrap().value.as_deref(), Some(&b"1"[..]));
    // And a matching condition lets the whole group through.
    let r = sm
        .apply(vec![entry(3, vec![cmd("c", "3", Condition::Always), cmd("a", "3", Condition::IfMatch(va.clone()))])])
        .await
        .unwrap();
    assert!(matches!(&r[0], CommandResult::Batch(v) if v.len() == 2));
    assert_eq!(sm.reader().get("d", "c").unwrap().unwrap().value.as_deref(), Some(&b"3"[..]));
    let sizes = sm.reader().dataset_sizes().unwrap();
    assert_eq!(sizes.get("d"), Some(&(3, 3 + 3)), "three live keys of one byte plus three one-byte values");
}

async fn reopen(path: &std::path::Path, limit: std::sync::Arc<std::sync::atomic::AtomicU64>) -> LogStore {
    // The writer thread holds the database until its channel closes; wait for that.
    loop {
        match LogStore::open_with_purge_limit(path, limit.clone()) {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

// Paused time: a purge past the durable point waits (bounded) for the state machine.
#[tokio::test(start_paused = true)]
async fn purge_never_drops_what_the_state_machine_may_have_to_reapply() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.wal");
    // The state machine holds entries up to 4 durably.
    let limit = Arc::new(AtomicU64::new(4));
    {
        let mut log = LogStore::open_with_purge_limit(&path, limit.clone()).unwrap();
        log.blocking_append((1..=10).map(|i| put(i, "k", "v", 1, Condition::Always)).collect::<Vec<_>>())
            .await
            .unwrap();
        log.purge(log_id(1, 8)).await.unwrap();
        // Openraft sees the purge it asked for...
        assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, Some(log_id(1, 8)));
    }
    // ...but after a crash the file still holds everything above the durable point.
    {
        let mut log = reopen(&path, limit.clone()).await;
        assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, Some(log_id(1, 4)));
        let idx: Vec<u64> = log.try_get_log_entries(0..100).await.unwrap().iter().map(|e| e.log_id.index).collect();
        assert_eq!(idx, (5..=10).collect::<Vec<_>>());
        // Once the state machine is durable further, the next purge drops the rest.
        limit.store(10, Ordering::SeqCst);
        log.purge(log_id(1, 9)).await.unwrap();
    }
    let mut log = reopen(&path, limit).await;
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 9)));
    assert_eq!(state.last_log_id, Some(log_id(1, 10)));
}

/// After a snapshot install openraft asks to purge through the snapshot and appends past it.
/// If the state machine was not yet durable, the file keeps its older entries below a hole;
/// an open finishes the purge once the state machine holds the snapshot, and reports the hole
/// plainly while it does not.
#[tokio::test(start_paused = true)]
async fn a_purge_held_back_past_a_snapshot_is_finished_at_open() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.wal");
    let limit = Arc::new(AtomicU64::new(4));
    {
        let mut log = LogStore::open_with_purge_limit(&path, limit.clone()).unwrap();
        log.blocking_append((1..=10).map(|i| put(i, "k", "v", 1, Condition::Always)).collect::<Vec<_>>())
            .await
            .unwrap();
        // A snapshot through 20 is being installed; the state machine is still at 4.
        log.purge(log_id(1, 20)).await.unwrap();
        log.blocking_append((21..=25).map(|i| put(i, "k", "v", 1, Condition::Always)).collect::<Vec<_>>())
            .await
            .unwrap();
    }
    // Crash before the install was durable: the hole is named, not left to openraft.
    let err = loop {
        match LogStore::open_with_purge_limit(&path, limit.clone()) {
            Ok(_) => panic!("a log with a hole must not open"),
            Err(e) if e.to_string().contains("hole") => break e.to_string(),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    };
    assert!(err.contains("entry 11 is missing before entry 21"), "{err}");
    // The install was durable: the open drops what the snapshot covers.
    limit.store(20, Ordering::SeqCst);
    let mut log = reopen(&path, limit).await;
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 20)));
    let idx: Vec<u64> = log.try_get_log_entries(0..100).await.unwrap().iter().map(|e| e.log_id.index).collect();
    assert_eq!(idx, (21..=25).collect::<Vec<_>>());
}

/// A node restarts as a follower even if it was the leader: its vote comes back with the same
/// term and candidate but not committed (the simulator found a restarted leader serving a
/// linearizable read from before a write it had acknowledged; seed 72).
#[tokio::test]
async fn a_committed_vote_comes_back_uncommitted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.wal");
    let mut vote = openraft::Vote::new(3, 2);
    vote.commit();
    {
        let mut log = LogStore::open(&path).unwrap();
        log.save_vote(&vote).await.unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    }
    let mut log = reopen(&path, std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX))).await;
    let loaded = log.read_vote().await.unwrap().expect("a vote");
    assert_eq!(loaded, openraft::Vote::new(3, 2));
    assert!(!loaded.is_committed());
}

fn remote_entry(
    index: u64,
    source: &str,
    from_seq: u64,
    upto_seq: u64,
    changes: Vec<meridian_raft::command::RemoteChange>,
) -> Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(Command::V1(CommandV1::ApplyRemote {
            source: source.into(),
            from_seq,
            upto_seq,
            changes,
        })),
    }
}

fn change(key: &str, value: &str, hlc: u64, source: &str, seq: u64) -> meridian_raft::command::RemoteChange {
    meridian_raft::command::RemoteChange {
        dataset: "d".into(),
        key: key.into(),
        version: meridian_core::Version { hlc: HlcTimestamp::new(hlc, 0), region: RegionId::new(source).unwrap(), seq },
        value: Some(value.as_bytes().to_vec()),
    }
}

#[tokio::test]
async fn local_writes_enter_the_outbox_in_order_and_reserved_namespaces_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let reserved = Entry {
        log_id: log_id(1, 3),
        payload: EntryPayload::Normal(Command::V1(CommandV1::Put {
            dataset: "_policy".into(),
            key: "active".into(),
            value: b"{}".to_vec(),
            hlc: HlcTimestamp::new(3, 0),
            condition: Condition::Always,
        })),
    };
    sm.apply(vec![
        put(1, "a", "1", 1, Condition::Always),
        put(2, "b", "1", 2, Condition::Always),
        reserved,
        put(4, "a", "2", 4, Condition::Always),
    ])
    .await
    .unwrap();
    let out = sm.reader().outbox_after(0, 100).unwrap();
    let keys: Vec<(u64, &str)> = out.iter().map(|(s, e)| (*s, e.key.as_str())).collect();
    assert_eq!(keys, [(1, "a"), (2, "b"), (4, "a")], "sequence 3 was the reserved write");
    assert_eq!(sm.reader().outbox_after(2, 100).unwrap().len(), 1);
    assert_eq!(sm.reader().replication().unwrap().1, 4, "the region sequence counts every local write");
}

#[tokio::test]
async fn remote_batches_apply_exactly_once_and_refuse_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let batch1 = vec![change("x", "1", 100, "r2", 1), change("y", "1", 101, "r2", 3)];
    let r = sm.apply(vec![remote_entry(1, "r2", 1, 3, batch1.clone())]).await.unwrap();
    assert_eq!(r[0], CommandResult::Remote { merged_upto: 3, applied: 2 });
    // The same batch again (a resend after a lost acknowledgement) changes nothing.
    let r = sm.apply(vec![remote_entry(2, "r2", 1, 3, batch1)]).await.unwrap();
    assert_eq!(r[0], CommandResult::Remote { merged_upto: 3, applied: 0 });
    // A batch past what is merged is a gap: refused, nothing applied.
    let r = sm.apply(vec![remote_entry(3, "r2", 5, 6, vec![change("z", "1", 102, "r2", 6)])]).await.unwrap();
    assert_eq!(r[0], CommandResult::RemoteGap { merged_upto: 3 });
    assert!(sm.reader().get("d", "z").unwrap().is_none());
    // An overlapping batch applies only what is new; the version travels unchanged.
    let r = sm
        .apply(vec![remote_entry(4, "r2", 3, 5, vec![change("y", "1", 101, "r2", 3), change("x", "2", 103, "r2", 5)])])
        .await
        .unwrap();
    assert_eq!(r[0], CommandResult::Remote { merged_upto: 5, applied: 1 });
    let x = sm.reader().get("d", "x").unwrap().unwrap();
    assert_eq!((x.version.region.as_str(), x.version.seq, x.value.as_deref()), ("r2", 5, Some(&b"2"[..])));
    // A local write after a merge orders after it (the HLC was pushed past the remote stamp),
    // and the merged object is not an outbox entry of this region.
    let r = sm.apply(vec![put(5, "x", "local", 1, Condition::Always)]).await.unwrap();
    let CommandResult::Written { version, .. } = &r[0] else { panic!("{r:?}") };
    assert!(version.hlc > HlcTimestamp::new(103, 0), "{version}");
    assert_eq!(sm.reader().outbox_after(0, 10).unwrap().len(), 1);
    // A remote write that did not see the local one is concurrent with it: the newer by HLC
    // is read, the other kept out of sight, and the meeting is recorded as a conflict.
    let r = sm.apply(vec![remote_entry(6, "r2", 6, 7, vec![change("x", "old", 103, "r2", 7)])]).await.unwrap();
    assert_eq!(r[0], CommandResult::Remote { merged_upto: 7, applied: 1 });
    let x = sm.reader().get("d", "x").unwrap().unwrap();
    assert_eq!(x.value.as_deref(), Some(&b"local"[..]));
    assert_eq!(x.siblings.len(), 1, "the loser is kept until a write supersedes it");
    let conflicts = sm
        .reader()
        .conflicts(&meridian_raft::conflicts::ConflictQuery {
            dataset: Some("d"),
            key: Some("x"),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].0.versions.len(), 2);
    assert_eq!(conflicts[0].1, meridian_raft::conflicts::ConflictState::Resolved);
    let (state, _) = sm.reader().replication().unwrap();
    assert_eq!(state.merged.get("r2"), Some(&7));
}

#[tokio::test]
async fn replication_state_and_outbox_survive_reopen_and_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let cursor = Entry {
        log_id: log_id(1, 3),
        payload: EntryPayload::Normal(Command::V1(CommandV1::SetCursor { destination: "r3".into(), upto_seq: 1 })),
    };
    sm.apply(vec![
        put(1, "a", "1", 1, Condition::Always),
        remote_entry(2, "r2", 1, 9, vec![change("b", "1", 50, "r2", 9)]),
        cursor,
        put(4, "c", "1", 60, Condition::Always),
    ])
    .await
    .unwrap();
    drop(sm);
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let (state, seq) = sm.reader().replication().unwrap();
    assert_eq!((state.merged.get("r2"), state.cursors.get("r3"), seq), (Some(&9), Some(&1), 2));
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let mut sm2 = StateMachineStore::open(dir2.path(), region()).unwrap();
    sm2.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    let (state2, seq2) = sm2.reader().replication().unwrap();
    assert_eq!((state2, seq2), (state, seq));
    let out: Vec<u64> = sm2.reader().outbox_after(0, 10).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(out, [1, 2]);
    // A duplicate of the merged batch is still recognised after the snapshot.
    let r = sm2.apply(vec![remote_entry(5, "r2", 1, 9, vec![change("b", "1", 50, "r2", 9)])]).await.unwrap();
    assert_eq!(r[0], CommandResult::Remote { merged_upto: 9, applied: 0 });
}

fn normal(index: u64, cmd: CommandV1) -> Entry {
    Entry { log_id: log_id(1, index), payload: EntryPayload::Normal(Command::V1(cmd)) }
}

#[tokio::test]
async fn each_shipped_sequence_is_received_once_however_often_it_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let first = vec![change("a", "1", 10, "r2", 1), change("b", "1", 11, "r2", 2)];
    sm.apply(vec![remote_entry(1, "r2", 1, 2, first.clone())]).await.unwrap();
    // The whole batch again, then an overlapping one: only sequence 3 is new.
    sm.apply(vec![remote_entry(2, "r2", 1, 2, first)]).await.unwrap();
    let overlap = vec![change("b", "1", 11, "r2", 2), change("c", "1", 12, "r2", 3)];
    let r = sm.apply(vec![remote_entry(3, "r2", 2, 3, overlap)]).await.unwrap();
    assert_eq!(r[0], CommandResult::Remote { merged_upto: 3, applied: 1 });
    let (state, _) = sm.reader().replication().unwrap();
    assert_eq!(state.received.get("r2"), Some(&3), "three sequences, each counted once");
}

#[tokio::test]
async fn repairs_keep_only_newer_versions_and_leave_merged_ranges_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    sm.apply(vec![remote_entry(1, "r2", 1, 5, vec![change("a", "new", 50, "r2", 5)])]).await.unwrap();
    let repair = CommandV1::Repair {
        source: "r2".into(),
        changes: vec![change("a", "old", 40, "r2", 4), change("b", "1", 30, "r2", 3)],
    };
    let r = sm.apply(vec![normal(2, repair.clone())]).await.unwrap();
    assert_eq!(r[0], CommandResult::Repaired { applied: 1 }, "only b is newer than what is held");
    let r = sm.apply(vec![normal(3, repair)]).await.unwrap();
    assert_eq!(r[0], CommandResult::Repaired { applied: 0 }, "a resend is a no-op");
    assert_eq!(sm.reader().get("d", "a").unwrap().unwrap().value.as_deref(), Some(&b"new"[..]));
    let (state, _) = sm.reader().replication().unwrap();
    assert_eq!((state.merged.get("r2"), state.repaired.get("r2")), (Some(&5), Some(&1)));
    assert!(sm.reader().outbox_after(0, 10).unwrap().is_empty(), "repairs are not this region's writes");
}

#[tokio::test]
async fn a_purge_removes_only_the_exact_version_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let b1 = change("a", "1", 10, "r2", 1);
    let b2 = change("b", "1", 11, "r2", 2);
    sm.apply(vec![remote_entry(1, "r2", 1, 2, vec![b1.clone(), b2.clone()])]).await.unwrap();
    let stale = meridian_core::Version { seq: 9, ..b2.version.clone() };
    let purge = CommandV1::Purge {
        dataset: "d".into(),
        keys: vec![("a".into(), b1.version.clone()), ("b".into(), stale), ("gone".into(), b1.version)],
    };
    let r = sm.apply(vec![normal(2, purge)]).await.unwrap();
    assert_eq!(r[0], CommandResult::Purged { removed: 1 });
    assert!(sm.reader().get("d", "a").unwrap().is_none(), "removed, not tombstoned");
    assert!(sm.reader().get("d", "b").unwrap().is_some(), "a newer or other version is kept");
    assert_eq!(sm.reader().replication().unwrap().0.purged, 1);
    let scanned = sm.reader().scan(None, None, 10).unwrap();
    assert_eq!(scanned.iter().map(|(d, k, _)| (d.as_str(), k.as_str())).collect::<Vec<_>>(), [("d", "b")]);
}

#[tokio::test]
async fn the_outbox_keeps_at_most_its_bound_and_the_new_record_survives_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    sm.set_outbox_limit(3);
    let writes: Vec<Entry> = (1..=7).map(|i| put(i, &format!("k{i}"), "v", i, Condition::Always)).collect();
    sm.apply(writes).await.unwrap();
    let kept: Vec<u64> = sm.reader().outbox_after(0, 100).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(kept, [5, 6, 7]);
    assert_eq!(sm.reader().replication().unwrap().0.outbox_trimmed, 4);
    sm.apply(vec![normal(8, CommandV1::SetBackfilled { destination: "r3".into(), epoch: 4 })]).await.unwrap();
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let mut sm2 = StateMachineStore::open(dir2.path(), region()).unwrap();
    sm2.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(sm2.reader().replication().unwrap().0.backfilled.get("r3"), Some(&4));
    drop(sm2);
    let sm3 = StateMachineStore::open(dir2.path(), region()).unwrap();
    assert_eq!(sm3.reader().replication().unwrap().0.backfilled.get("r3"), Some(&4));
}

#[tokio::test]
async fn ranges_carry_freshness_and_heartbeats_refresh_it_without_merging() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let at = |index: u64, from: u64, upto: u64, fresh_ms: u64, changes| {
        normal(
            index,
            CommandV1::ApplyRemoteAt { source: "r2".into(), from_seq: from, upto_seq: upto, fresh_ms, changes },
        )
    };
    let r = sm.apply(vec![at(1, 1, 2, 5_000, vec![change("a", "1", 10, "r2", 2)])]).await.unwrap();
    assert_eq!(r[0], CommandResult::Remote { merged_upto: 2, applied: 1 });
    // A heartbeat: nothing new, later time.
    sm.apply(vec![at(2, 3, 2, 7_000, vec![])]).await.unwrap();
    // A gap says nothing about freshness; an older duplicate does not move it back.
    let r = sm.apply(vec![at(3, 9, 9, 9_000, vec![])]).await.unwrap();
    assert_eq!(r[0], CommandResult::RemoteGap { merged_upto: 2 });
    sm.apply(vec![at(4, 1, 2, 6_000, vec![])]).await.unwrap();
    let (state, _) = sm.reader().replication().unwrap();
    assert_eq!((state.fresh.get("r2"), state.merged.get("r2")), (Some(&7_000), Some(&2)));
}

fn entry_of(term: u64, leader: u64, index: u64) -> Entry {
    let mut e = put(index, "k", "v", index, Condition::Always);
    e.log_id = LogId::new(CommittedLeaderId::new(term, leader), index);
    e
}

fn acked_at_submit(log: &LogStore) -> u64 {
    log.stats().acked_at_submit_total.load(std::sync::atomic::Ordering::Relaxed)
}

/// Only the entries a node proposes as leader are reported before their fsync; a follower's
/// appends, and entries of another leader, are reported once durable.
#[tokio::test]
async fn only_a_leaders_own_entries_are_reported_before_they_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(&dir.path().join("log.wal")).unwrap().ack_own_entries_at_submit(1);
    let durability = log.durability();

    // Leader of term 2: its own entries are reported at submit, and become durable after.
    log.save_vote(&openraft::Vote::new_committed(2, 1)).await.unwrap();
    log.blocking_append((1..=3).map(|i| entry_of(2, 1, i))).await.unwrap();
    assert_eq!(acked_at_submit(&log), 1);
    durability.wait_through(3).await.unwrap();
    assert_eq!(durability.through(), Some(LogId::new(CommittedLeaderId::new(2, 1), 3)));

    // Another leader's entries under our vote: reported only once durable.
    log.blocking_append([entry_of(1, 3, 4)]).await.unwrap();
    assert_eq!(acked_at_submit(&log), 1);
    assert!(durability.through().is_some_and(|t| t.index >= 4), "reported before durable");

    // A follower (its vote is for node 2): the same.
    log.save_vote(&openraft::Vote::new_committed(3, 2)).await.unwrap();
    log.blocking_append([entry_of(3, 2, 5)]).await.unwrap();
    assert_eq!(acked_at_submit(&log), 1);
    assert!(durability.through().is_some_and(|t| t.index >= 5), "reported before durable");

    // A truncation lowers the durable end at once.
    log.truncate(LogId::new(CommittedLeaderId::new(3, 2), 4)).await.unwrap();
    assert_eq!(durability.through(), Some(LogId::new(CommittedLeaderId::new(2, 1), 3)));

    // A store not told its id never reports early, even for entries of a vote it holds.
    let dir2 = tempfile::tempdir().unwrap();
    let mut plain = LogStore::open(&dir2.path().join("log.wal")).unwrap();
    plain.save_vote(&openraft::Vote::new_committed(2, 1)).await.unwrap();
    plain.blocking_append((1..=2).map(|i| entry_of(2, 1, i))).await.unwrap();
    assert_eq!(acked_at_submit(&plain), 0);
    assert!(plain.durability().through().is_some_and(|t| t.index >= 2));
}

/// A leader can learn of a commit before its own copy is on disk; the commit pointer written
/// to disk never points past the entries there, or a restart would re-apply entries it does
/// not have.
#[tokio::test]
async fn the_commit_pointer_on_disk_never_points_past_the_log_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.wal");
    {
        let mut log = LogStore::open(&path).unwrap();
        log.blocking_append((1..=3).map(|i| put(i, "k", "v", i, Condition::Always))).await.unwrap();
        log.save_committed(Some(log_id(1, 9))).await.unwrap();
        // A batch that is not only appends carries the pointer.
        log.save_vote(&openraft::Vote::new(2, 1)).await.unwrap();
    }
    let mut log = reopen(&path, std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX))).await;
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 3)));
}

/// The state machine applies nothing the log does not hold durably.
#[tokio::test]
async fn the_state_machine_waits_for_the_log_to_be_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(&dir.path().join("log.wal")).unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    sm.wait_for_log(log.durability());
    log.blocking_append((1..=2).map(|i| put(i, "k", "v", i, Condition::Always))).await.unwrap();
    sm.apply([put(1, "a", "1", 1, Condition::Always), put(2, "b", "2", 2, Condition::Always)]).await.unwrap();

    let reader = sm.reader();
    let apply = tokio::spawn(async move {
        sm.apply([put(3, "c", "3", 3, Condition::Always)]).await.unwrap();
        sm
    });
    // Entry 3 is not in the log: however long this waits, nothing can be applied.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!apply.is_finished());
    assert!(reader.get("d", "c").unwrap().is_none());

    log.blocking_append([put(3, "k", "v", 3, Condition::Always)]).await.unwrap();
    let _sm = apply.await.unwrap();
    assert_eq!(reader.get("d", "c").unwrap().unwrap().value.as_deref(), Some(&b"3"[..]));
}

fn cmd(index: u64, c: CommandV1) -> Entry {
    Entry { log_id: log_id(1, index), payload: EntryPayload::Normal(Command::V1(c)) }
}

#[tokio::test]
async fn a_collection_removes_a_tombstone_only_while_it_is_exactly_the_one_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    let del = |index: u64, key: &str| {
        cmd(
            index,
            CommandV1::Delete {
                dataset: "d".into(),
                key: key.into(),
                hlc: HlcTimestamp::new(index, 0),
                condition: Condition::Always,
            },
        )
    };
    sm.apply(vec![put(1, "a", "1", 1, Condition::Always), del(2, "a"), put(3, "b", "1", 3, Condition::Always)])
        .await
        .unwrap();
    let tomb = sm.reader().get("d", "a").unwrap().unwrap();
    let live = sm.reader().get("d", "b").unwrap().unwrap();
    assert!(tomb.is_bare_tombstone() && !live.is_bare_tombstone());
    let collect = |index: u64, keys: Vec<(String, meridian_raft::StoredObject)>| {
        cmd(index, CommandV1::CollectTombstones { dataset: "d".into(), keys })
    };
    // A live value, or a tombstone that is not the stored one, is never removed.
    let mut other = tomb.clone();
    other.vv.add(&meridian_core::Dot { region: meridian_core::RegionId::new("r9").unwrap(), counter: 1 });
    let r = sm.apply(vec![collect(4, vec![("b".into(), live), ("a".into(), other)])]).await.unwrap();
    assert_eq!(r[0], CommandResult::Collected { removed: 0 });
    assert!(sm.reader().get("d", "a").unwrap().is_some() && sm.reader().get("d", "b").unwrap().is_some());
    // Exactly the stored tombstone: removed, and counted.
    let r = sm.apply(vec![collect(5, vec![("a".into(), tomb.clone())])]).await.unwrap();
    assert_eq!(r[0], CommandResult::Collected { removed: 1 });
    assert!(sm.reader().get("d", "a").unwrap().is_none());
    assert_eq!(sm.reader().tombstones_collected().unwrap(), 1);
    // A repeat finds nothing; a write after a tombstone keeps the key from being collected.
    let r = sm.apply(vec![collect(6, vec![("a".into(), tomb)])]).await.unwrap();
    assert_eq!(r[0], CommandResult::Collected { removed: 0 });
    // The count survives a snapshot.
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let mut sm2 = StateMachineStore::open(dir2.path(), region()).unwrap();
    sm2.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(sm2.reader().tombstones_collected().unwrap(), 1);
}

/// A change of `source`'s that did not see anything of this region's: concurrent with every
/// local write to the key.
fn concurrent(key: &str, hlc: u64, source: &str, seq: u64) -> meridian_raft::command::Change {
    let v = meridian_core::Version { hlc: HlcTimestamp::new(hlc, 0), region: RegionId::new(source).unwrap(), seq };
    meridian_raft::command::Change {
        dataset: "d".into(),
        key: key.into(),
        object: meridian_raft::StoredObject::plain(v, Some(b"\"theirs\"".to_vec())),
        rule: meridian_raft::command::MergeRule::Siblings,
    }
}

#[tokio::test]
async fn the_conflict_log_is_bounded_travels_in_snapshots_and_leaves_with_a_purged_key() {
    use meridian_raft::conflicts::{ConflictLimits, ConflictQuery, ConflictState};
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path(), region()).unwrap();
    sm.set_conflict_limits(ConflictLimits { records: 3, age_ms: 1_000_000 });
    // Five keys written here, each met by a concurrent write from r2: five conflicts.
    let mut entries: Vec<Entry> = (0..5).map(|i| put(i + 1, &format!("k{i}"), "1", 10, Condition::Always)).collect();
    let changes: Vec<_> = (0..5).map(|i| concurrent(&format!("k{i}"), 20, "r2", i + 1)).collect();
    entries.push(cmd(6, CommandV1::RepairChanges { source: "r2".into(), changes }));
    sm.apply(entries).await.unwrap();
    let all =
        |sm: &StateMachineStore| sm.reader().conflicts(&ConflictQuery { limit: 100, ..Default::default() }).unwrap();
    let records = all(&sm);
    assert_eq!(
        records.iter().map(|(r, _)| r.key.as_str()).collect::<Vec<_>>(),
        ["k4", "k3", "k2"],
        "newest first, oldest dropped"
    );
    assert!(records.iter().all(|(r, s)| *s == ConflictState::Open && r.versions.len() == 2), "{records:?}");
    let log = sm.reader().conflict_log().unwrap();
    assert_eq!((log.held, log.expired, log.recorded["d"]["siblings"]), (3, 2, 5));
    // A snapshot carries the records and their bookkeeping.
    let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let mut sm2 = StateMachineStore::open(dir2.path(), region()).unwrap();
    sm2.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
    assert_eq!(all(&sm2).len(), 3);
    assert_eq!(sm2.reader().conflict_log().unwrap().held, 3);
    let by_key =
        sm2.reader().conflicts(&ConflictQuery { dataset: Some("d"), key: Some("k3"), limit: 10, ..Default::default() });
    assert_eq!(by_key.unwrap().len(), 1, "the index by key is rebuilt from the records");
    // A purged key takes its records with it.
    let k3 = sm.reader().get("d", "k3").unwrap().unwrap();
    sm.apply(vec![cmd(7, CommandV1::Purge { dataset: "d".into(), keys: vec![("k3".into(), k3.version)] })])
        .await
        .unwrap();
    assert_eq!(all(&sm).iter().map(|(r, _)| r.key.as_str()).collect::<Vec<_>>(), ["k4", "k2"]);
    // A write that supersedes the siblings ends the conflict.
    let ctx = sm.reader().get("d", "k4").unwrap().unwrap().vv;
    sm.apply(vec![cmd(
        8,
        CommandV1::PutInContext {
            dataset: "d".into(),
            key: "k4".into(),
            value: Some(b"\"merged\"".to_vec()),
            hlc: HlcTimestamp::new(30, 0),
            condition: Condition::Always,
            context: ctx,
        },
    )])
    .await
    .unwrap();
    let k4 = sm.reader().get("d", "k4").unwrap().unwrap();
    assert!(k4.siblings.is_empty() && k4.value.as_deref() == Some(&b"\"merged\""[..]));
    assert_eq!(all(&sm)[0].1, ConflictState::Superseded);
}
