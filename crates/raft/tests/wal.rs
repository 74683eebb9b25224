//! The Raft log's file format (`wal.rs`): recovery from torn writes, compaction into the
//! other file, and refusing a damaged log rather than starting empty.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use meridian_raft::wal::{
    replay, FsLogFile, MemLogFile, Opened, RecordBuilder, Wal, WalOptions, RECORD_HEADER_BYTES, RECORD_TARGET_BYTES,
};
use meridian_raft::{Entry, LogStore};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{CommittedLeaderId, EntryPayload, LogId, RaftLogReader};

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn blank(index: u64) -> Entry {
    Entry { log_id: log_id(1, index), payload: EntryPayload::Blank }
}

fn small() -> WalOptions {
    WalOptions { compact_at_bytes: 1024, preallocate_bytes: 1024 }
}

/// Append entries `from..=to`, one record each.
fn append(wal: &mut Wal, from: u64, to: u64) -> Vec<(u64, Vec<u8>)> {
    (from..=to)
        .map(|i| {
            let mut b = wal.builder();
            b.entry(&blank(i));
            wal.append(&mut b).unwrap()
        })
        .collect()
}

fn indexes(o: &Opened) -> Vec<u64> {
    o.index.entries.keys().copied().collect()
}

#[test]
fn a_new_log_reopens_empty_and_appends_survive() {
    let files = MemLogFile::pair();
    let mut o = Wal::open(files.clone(), small()).unwrap();
    assert!(o.index.entries.is_empty());
    append(&mut o.wal, 1, 5);
    let o = Wal::open(files, small()).unwrap();
    assert_eq!(indexes(&o), vec![1, 2, 3, 4, 5]);
    let last = o.index.entries[&5];
    assert_eq!(Wal::read(&o.wal.files, last).unwrap().log_id, log_id(1, 5));
}

#[test]
fn a_torn_last_record_is_cut_off_and_the_log_goes_on() {
    let files = MemLogFile::pair();
    let mut o = Wal::open(files.clone(), small()).unwrap();
    let written = append(&mut o.wal, 1, 3);
    // A crash in the middle of writing the third record: half of it reached the disk.
    let (at, bytes) = &written[2];
    let keep = bytes.len() / 2;
    files[0].write_at(at + keep as u64, &vec![0xA5; bytes.len() - keep]).unwrap();
    let mut o = Wal::open(files.clone(), small()).unwrap();
    assert_eq!(indexes(&o), vec![1, 2], "the torn record is not replayed");
    assert_eq!(o.wal.end, *at, "the log ends where the torn record began");
    append(&mut o.wal, 3, 4);
    let o = Wal::open(files, small()).unwrap();
    assert_eq!(indexes(&o), vec![1, 2, 3, 4], "appends after the cut are replayed");
}

#[test]
fn a_record_failing_its_checksum_ends_the_replay() {
    let files = MemLogFile::pair();
    let mut o = Wal::open(files.clone(), small()).unwrap();
    let written = append(&mut o.wal, 1, 3);
    let (at, _) = &written[1];
    // Flip one byte of the second record's operations.
    let mut b = [0u8; 1];
    let off = at + RECORD_HEADER_BYTES as u64 + 3;
    files[0].read_at(off, &mut b).unwrap();
    files[0].write_at(off, &[b[0] ^ 1]).unwrap();
    let r = replay(&*files[0], 0).unwrap().unwrap();
    assert!(r.torn.as_deref().is_some_and(|t| t.contains("checksum")), "{:?}", r.torn);
    assert_eq!(r.index.entries.keys().copied().collect::<Vec<_>>(), vec![1]);
    // The third record was written after the second was synced: the second is damage, not a
    // torn write, and cutting it would lose an acknowledged entry.
    assert_eq!(r.synced_after_failure, Some(written[2].0));
    let err = Wal::open(files, small()).err().expect("a damaged synced record must not be cut silently");
    assert!(err.to_string().contains("restore the node from a peer"), "{err}");
}

/// A crash inside a group commit split into two records: the first record's header never
/// reached the disk, the second did. The open cuts the second off, so a later append of the
/// same length cannot bring it back (a record also names the checksum of the one before it).
#[test]
fn a_whole_record_past_a_lost_one_never_comes_back() {
    let files = MemLogFile::pair();
    let mut o = Wal::open(files.clone(), WalOptions::default()).unwrap();
    append(&mut o.wal, 1, 1);
    let big = vec![1u8; RECORD_TARGET_BYTES / 2 + 1];
    let mut b = o.wal.builder();
    b.entry_bytes(2, &big);
    b.entry_bytes(3, &big);
    b.vote(&openraft::Vote::new(3, 2));
    let (at, bytes) = o.wal.append(&mut b).unwrap();
    files[0].write_at(at, &[0u8; RECORD_HEADER_BYTES]).unwrap();
    let mut o = Wal::open(files.clone(), WalOptions::default()).unwrap();
    assert_eq!(indexes(&o), vec![1]);
    assert_eq!(o.index.meta.vote, None);
    assert!(
        files[0].len().unwrap() < at + bytes.len() as u64 || {
            let mut tail = vec![0u8; bytes.len()];
            files[0].read_at(at, &mut tail).unwrap();
            tail.iter().all(|&x| x == 0)
        }
    );
    // An append of exactly the first record's length, where it was.
    let mut b = o.wal.builder();
    b.entry_bytes(2, &vec![2u8; RECORD_TARGET_BYTES / 2 + 1]);
    o.wal.append(&mut b).unwrap();
    let o = Wal::open(files, WalOptions::default()).unwrap();
    assert_eq!(indexes(&o), vec![1, 2]);
    assert_eq!(o.index.meta.vote, None, "the lost group's vote stays lost");
}

#[test]
fn damage_to_the_newer_generation_is_refused_not_rolled_back() {
    let files = MemLogFile::pair();
    let mut o = Wal::open(files.clone(), small()).unwrap();
    append(&mut o.wal, 1, 20);
    o.wal.compact(&o.index, |f| f.set_len(0)).unwrap();
    let mut b = o.wal.builder();
    b.vote(&openraft::Vote::new(7, 1));
    o.wal.append(&mut b).unwrap();
    let newer = o.wal.current as usize;
    files[newer].write_at(RECORD_HEADER_BYTES as u64 + 2, &[0xEE]).unwrap();
    let err = Wal::open(files, small()).err().expect("must not fall back to the older generation");
    assert!(err.to_string().contains("replaced by generation"), "{err}");
}

#[test]
fn compaction_keeps_live_entries_and_drops_purged_ones() {
    let files = MemLogFile::pair();
    let mut o = Wal::open(files.clone(), small()).unwrap();
    append(&mut o.wal, 1, 100);
    let mut b = o.wal.builder();
    b.purge(Some(log_id(1, 90)), log_id(1, 90));
    b.committed(Some(log_id(1, 99)));
    b.vote(&openraft::Vote::new(3, 2));
    o.wal.append(&mut b).unwrap();
    let mut o = Wal::open(files.clone(), small()).unwrap();
    assert_eq!(indexes(&o), (91..=100).collect::<Vec<_>>());
    assert!(o.wal.wants_compaction(o.index.live_bytes), "end {} live {}", o.wal.end, o.index.live_bytes);
    let (before, gen) = (o.wal.current, o.wal.gen);
    let mut reused = false;
    o.wal
        .compact(&o.index, |f| {
            reused = true;
            f.set_len(0)
        })
        .unwrap();
    assert!(reused);
    assert_eq!((o.wal.current, o.wal.gen), (1 - before, gen + 1));
    assert!(!o.wal.wants_compaction(o.index.live_bytes));
    append(&mut o.wal, 101, 102);
    let o = Wal::open(files, small()).unwrap();
    assert_eq!(o.wal.current, 1 - before, "the new generation is the log");
    assert_eq!(indexes(&o), (91..=102).collect::<Vec<_>>());
    assert_eq!(o.index.meta.last_purged, Some(log_id(1, 90)));
    assert_eq!(o.index.meta.committed, Some(log_id(1, 99)));
    assert_eq!(o.index.meta.vote, Some(openraft::Vote::new(3, 2)));
    for (&i, &loc) in &o.index.entries {
        assert_eq!(Wal::read(&o.wal.files, loc).unwrap().log_id.index, i);
    }
}

#[test]
fn a_compaction_cut_short_leaves_the_older_generation_in_charge() {
    let files = MemLogFile::pair();
    let mut o = Wal::open(files.clone(), small()).unwrap();
    append(&mut o.wal, 1, 50);
    // A compaction that wrote its header and entries into the other file, whole, but
    // crashed before its seal.
    let mut b = RecordBuilder::new(o.wal.gen + 1, 0, 0);
    b.header(&o.index.meta);
    for i in 1..=10 {
        b.entry(&blank(i));
    }
    let (_, bytes) = b.take();
    files[1].write_at(0, &bytes).unwrap();
    let mut o = Wal::open(files.clone(), small()).unwrap();
    assert_eq!(o.wal.current, 0, "an unsealed generation is ignored");
    assert_eq!(indexes(&o), (1..=50).collect::<Vec<_>>());
    // The next compaction does not reuse the unfinished generation's number.
    let unfinished = o.wal.gen + 1;
    o.wal.compact(&o.index, |f| f.set_len(0)).unwrap();
    assert!(o.wal.gen > unfinished, "generation {} after an unfinished {unfinished}", o.wal.gen);
    let o = Wal::open(files, small()).unwrap();
    assert_eq!((o.wal.current, indexes(&o).len()), (1, 50));
}

#[test]
fn a_damaged_start_is_refused_not_taken_for_a_new_log() {
    let files = MemLogFile::pair();
    let mut o = Wal::open(files.clone(), WalOptions::default()).unwrap();
    append(&mut o.wal, 1, 200);
    files[0].write_at(0, &[0xFF; 8]).unwrap();
    let err = Wal::open(files, WalOptions::default()).err().expect("a damaged log must not open");
    assert!(err.to_string().contains("no complete generation"), "{err}");
}

#[test]
fn a_group_larger_than_a_record_splits_and_replays_whole() {
    let files = MemLogFile::pair();
    let mut o = Wal::open(files.clone(), WalOptions::default()).unwrap();
    let big = vec![7u8; RECORD_TARGET_BYTES / 3];
    let mut b = o.wal.builder();
    for i in 1..=7 {
        b.entry_bytes(i, &big);
    }
    o.wal.append(&mut b).unwrap();
    let r = replay(&*files[0], 0).unwrap().unwrap();
    assert!(r.torn.is_none());
    assert_eq!(r.index.entries.keys().copied().collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
    assert!(r.index.entries.values().all(|l| l.len as usize == big.len()));
}

#[test]
fn a_second_open_of_the_same_files_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("log.wal");
    let _first = FsLogFile::open_pair(&base).unwrap();
    let err = FsLogFile::open_pair(&base).err().expect("the files are locked");
    assert!(err.to_string().contains("in use"), "{err}");
}

/// The store compacts by itself, and reads and reopens across compactions.
#[tokio::test]
async fn the_log_store_compacts_as_it_goes_and_reopens_after() {
    let files = MemLogFile::pair();
    let limit = Arc::new(AtomicU64::new(u64::MAX));
    let mut log = LogStore::with_files(files.clone(), limit.clone(), small()).unwrap();
    for chunk in 0..20u64 {
        let entries: Vec<Entry> = (chunk * 10 + 1..=chunk * 10 + 10).map(blank).collect();
        log.blocking_append(entries).await.unwrap();
        if chunk >= 2 {
            log.purge(log_id(1, chunk * 10 - 15)).await.unwrap();
        }
    }
    let compactions = log.stats().compactions_total.load(Ordering::Relaxed);
    assert!(compactions >= 2, "compacted {compactions} times");
    let got = log.try_get_log_entries(186..=200).await.unwrap();
    assert_eq!(got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), (186..=200).collect::<Vec<_>>());
    drop(log);
    let mut log = LogStore::with_files(files, limit, small()).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, 200)));
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 175)));
    let got = log.try_get_log_entries(176..=200).await.unwrap();
    assert_eq!(got.len(), 25);
}
