//! The durable Raft log, with group commit, over the append-only files of [`crate::wal`].
//!
//! Writes (appends, votes, truncations, purges) go, in the order openraft issues them, to one
//! writer thread. The thread takes everything queued (up to [`GROUP_COMMIT_OPS_MAX`]),
//! appends it as one record and syncs it with one `fdatasync`, then completes every
//! callback in the batch. Under load many clients' entries share one fsync; with one client
//! nothing waits for a batch to fill.
//!
//! Appended entries are readable as soon as `append` returns, before they are durable (as
//! openraft's `RaftLogStorage::append` requires): they are served from an in-memory tail.
//! The tail also keeps the most recent durable entries (bounded in count and bytes), so the
//! leader's replication to followers reads memory rather than decoding from disk. Openraft
//! only counts an entry towards a quorum once its callback reports it durable, so an
//! acknowledged write is always on disk in a majority of zones.
//!
//! One exception, on the leader only ([`LogStore::ack_own_entries_at_submit`]): the entries a
//! leader proposes itself are reported as written when they are queued, so its core sends them
//! to the followers while its own fsync runs, instead of after it (Raft thesis §10.2.1; this
//! is what openraft 0.10 does in its core). Three rules keep that safe, each enforced here or
//! next to it, because until the leader's fsync ends the entry may exist on one disk only:
//! - the state machine never applies an entry past [`LogDurability`] (so no client hears of a
//!   write before the leader's own copy is on disk; with a follower's acknowledgement that is
//!   a majority);
//! - the network never tells a follower of a commit past it (so no follower applies such an
//!   entry either: [`crate::network`]);
//! - the commit pointer on disk never points past the entries on disk ([`write_batch`]).
//!
//! Architecture invariant: the log on disk has no holes, and the in-memory tail is always a
//! contiguous suffix of the log (entries past `durable_through` exist only there, and are
//! never evicted).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader, StorageIOError};
use tokio::sync::{mpsc, oneshot, watch};

use crate::wal::{DiskIndex, FsLogFile, LogFiles, Opened, Wal, WalOptions};
use crate::{Entry, LogId, StorageError, TypeConfig, Vote};

/// Most queued operations folded into one transaction (one fsync).
pub const GROUP_COMMIT_OPS_MAX: usize = 1024;
/// Longest a purge waits for the state machine to make durable what the purge covers.
pub const PURGE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(10);
/// Most operations waiting for the writer thread; `append` waits when it is full.
pub const WRITE_QUEUE_MAX: usize = 4096;

/// Counters the node exports as metrics.
#[derive(Debug, Default)]
pub struct LogStoreStats {
    pub fsyncs_total: AtomicU64,
    pub entries_written_total: AtomicU64,
    /// Appends of the leader's own entries reported written before their fsync ended.
    pub acked_at_submit_total: AtomicU64,
    /// Times the log was compacted into its other file.
    pub compactions_total: AtomicU64,
}

/// How far this node's log is on disk: the id of the last entry such that it and every entry
/// before it are durable. The state machine waits on it before applying, and the network
/// bounds the commit it tells followers by it (see the module documentation). Cloning shares it.
#[derive(Clone)]
pub struct LogDurability {
    state: Arc<watch::Sender<DurableState>>,
    /// Set when the network held a commit back for it; the node then sends a heartbeat once
    /// the disk catches up, so followers learn the commit without waiting for the next write.
    held_back: Arc<AtomicBool>,
    held_back_total: Arc<AtomicU64>,
    /// Woken when the disk moves while a commit is held back (and only then: no wake-up per
    /// fsync otherwise).
    disk_caught_up: Arc<tokio::sync::Notify>,
}

/// What [`LogDurability`] publishes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DurableState {
    through: Option<LogId>,
    /// The log writer stopped after a failed write: nothing more will become durable.
    failed: bool,
}

impl LogDurability {
    fn new(through: Option<LogId>) -> Self {
        LogDurability {
            state: Arc::new(watch::Sender::new(DurableState { through, failed: false })),
            held_back: Arc::new(AtomicBool::new(false)),
            held_back_total: Arc::new(AtomicU64::new(0)),
            disk_caught_up: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// The last entry durable with everything before it, if any.
    pub fn through(&self) -> Option<LogId> {
        self.state.borrow().through
    }

    /// Wait until the log is durable through `index`. Fails if the log writer stopped.
    pub async fn wait_through(&self, index: u64) -> io::Result<()> {
        let mut rx = self.state.subscribe();
        let state = rx
            .wait_for(|s| s.failed || s.through.is_some_and(|t| t.index >= index))
            .await
            .map_err(|_| io_err("log writer stopped"))?;
        if state.failed && state.through.is_none_or(|t| t.index < index) {
            return Err(io_err("the Raft log writer stopped after a failed write"));
        }
        Ok(())
    }

    /// Record that a commit through `index` was held back for the disk. If the disk got there
    /// meanwhile, wake [`LogDurability::held_back_commit_ready`] at once, so the hold is not missed.
    pub fn note_held_back(&self, index: u64) {
        self.held_back_total.fetch_add(1, Ordering::Relaxed);
        self.held_back.store(true, Ordering::SeqCst);
        if self.through().is_some_and(|t| t.index >= index) {
            self.disk_caught_up.notify_one();
        }
    }

    /// Wait until a commit was held back and the disk has moved since; then the commit can be
    /// announced (the node sends a heartbeat).
    pub async fn held_back_commit_ready(&self) {
        loop {
            self.disk_caught_up.notified().await;
            if self.held_back.swap(false, Ordering::SeqCst) {
                return;
            }
        }
    }

    /// How many messages had their commit held back, ever.
    pub fn held_back_total(&self) -> u64 {
        self.held_back_total.load(Ordering::Relaxed)
    }

    fn set(&self, through: Option<LogId>) {
        let moved = self.state.send_if_modified(|s| {
            let changed = s.through != through;
            s.through = through;
            changed
        });
        if moved && self.held_back.load(Ordering::SeqCst) {
            self.disk_caught_up.notify_one();
        }
    }

    fn fail(&self) {
        self.state.send_modify(|s| s.failed = true);
    }
}

enum LogOp {
    Append {
        entries: Vec<Entry>,
        /// None when the append was acknowledged at submit (the leader's own entries).
        callback: Option<LogFlushed<TypeConfig>>,
    },
    SaveVote {
        vote: Vote,
        done: oneshot::Sender<io::Result<()>>,
    },
    Truncate {
        from_index: u64,
        /// The entry before `from_index`, which becomes the last one.
        prev: Option<LogId>,
        done: oneshot::Sender<io::Result<()>>,
    },
    /// Drop entries through `upto` (if any) from the file; openraft asked for `requested`
    /// (at or past `upto`), which is recorded so that an open can finish the purge.
    Purge {
        upto: Option<LogId>,
        requested: LogId,
        done: oneshot::Sender<io::Result<()>>,
    },
}

/// Most entries kept in the in-memory tail once they are durable.
pub const TAIL_ENTRIES_MAX: usize = 8192;
/// Most bytes (of values and keys, roughly) kept in the in-memory tail once durable.
pub const TAIL_BYTES_MAX: usize = 64 * 1024 * 1024;

struct MemState {
    /// The newest entries of the log, a suffix of it: every entry not yet durable, plus
    /// recent durable ones (bounded by [`TAIL_ENTRIES_MAX`] and [`TAIL_BYTES_MAX`]) so that
    /// replication to followers reads memory, not disk.
    tail: BTreeMap<u64, Entry>,
    tail_bytes: usize,
    /// Highest index known to be on disk.
    durable_through: u64,
    /// The id of the entry at `durable_through` (what [`LogDurability`] publishes).
    durable_id: Option<LogId>,
    last_log_id: Option<LogId>,
    last_purged: Option<LogId>,
    /// What the file has really dropped: at most `last_purged`, held back while the state
    /// machine's durable state is behind it (see [`LogStore::purge`]).
    purged_on_disk: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    /// Where each entry on disk is, and what the file's operations left besides (written by
    /// the writer only, after each sync).
    disk: DiskIndex,
}

struct Shared {
    files: LogFiles,
    /// Held (shared) by a read from the files, and (exclusive) by a compaction while it
    /// truncates the file it is about to reuse, so no read sees a file cut under it.
    reuse: RwLock<()>,
    mem: Mutex<MemState>,
    stats: Arc<LogStoreStats>,
    /// Highest log index whose effects the state machine holds durably; entries above it are
    /// never dropped from the file, so a crash can always re-apply them.
    purge_limit: Arc<AtomicU64>,
    durability: LogDurability,
}

/// The log store handed to openraft. Cloning it shares the same log.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
    writer: Writer,
    /// This node's id when its own leader entries are acknowledged at submit.
    ack_own_at_submit: Option<u64>,
}

/// How long each group commit of the writer task takes (the simulator draws it).
pub type SyncTime = Arc<dyn Fn() -> std::time::Duration + Send + Sync>;

/// Who writes the log file.
#[derive(Clone)]
enum Writer {
    /// Production: a dedicated thread group-commits whatever is queued (one fsync for all).
    Thread(mpsc::Sender<LogOp>),
    /// The simulator: a task on the caller's runtime does the same, after a simulated sync
    /// time, so that a single-threaded simulation stays deterministic while writes still take
    /// time and overlap the network as they do in production.
    Task(mpsc::Sender<LogOp>),
}

/// Rough memory weight of an entry in the tail: its keys and values, batches included.
fn weight(e: &Entry) -> usize {
    fn command(c: &crate::command::CommandV1) -> usize {
        use crate::command::CommandV1;
        match c {
            CommandV1::Put { dataset, key, value, .. } => 64 + dataset.len() + key.len() + value.len(),
            CommandV1::Delete { dataset, key, .. } | CommandV1::Check { dataset, key, .. } => {
                64 + dataset.len() + key.len()
            }
            CommandV1::Batch(cmds) | CommandV1::Atomic(cmds) => 64 + cmds.iter().map(command).sum::<usize>(),
            CommandV1::ApplyRemote { changes, .. }
            | CommandV1::ApplyRemoteAt { changes, .. }
            | CommandV1::Repair { changes, .. } => {
                64 + changes
                    .iter()
                    .map(|c| 64 + c.dataset.len() + c.key.len() + c.value.as_ref().map_or(0, Vec::len))
                    .sum::<usize>()
            }
            CommandV1::ApplyChanges { changes, .. } | CommandV1::RepairChanges { changes, .. } => {
                64 + changes.iter().map(|c| 64 + c.dataset.len() + c.key.len() + c.object.encoded_len()).sum::<usize>()
            }
            CommandV1::PutInContext { dataset, key, value, .. } => {
                128 + dataset.len() + key.len() + value.as_ref().map_or(0, Vec::len)
            }
            CommandV1::Op { dataset, key, op, .. } => 128 + dataset.len() + key.len() + op.encoded_len(),
            CommandV1::CollectTombstones { dataset, keys } => {
                64 + dataset.len() + keys.iter().map(|(k, o)| 64 + k.len() + o.encoded_len()).sum::<usize>()
            }
            CommandV1::Purge { dataset, keys } => {
                64 + dataset.len() + keys.iter().map(|(k, _)| 64 + k.len()).sum::<usize>()
            }
            CommandV1::SetCursor { destination, .. } | CommandV1::SetBackfilled { destination, .. } => {
                64 + destination.len()
            }
        }
    }
    match &e.payload {
        openraft::EntryPayload::Normal(crate::Command::V1(c)) => command(c),
        _ => 64,
    }
}

impl MemState {
    fn insert_tail(&mut self, e: Entry) {
        self.tail_bytes += weight(&e);
        if let Some(old) = self.tail.insert(e.log_id.index, e) {
            self.tail_bytes -= weight(&old);
        }
    }

    /// Drop entries from the tail: those at or after `from` (truncation) or at or before `upto`
    /// (purge).
    fn remove_tail_where(&mut self, f: impl Fn(u64) -> bool) {
        let doomed: Vec<u64> = self.tail.keys().copied().filter(|&i| f(i)).collect();
        for i in doomed {
            if let Some(e) = self.tail.remove(&i) {
                self.tail_bytes -= weight(&e);
            }
        }
    }

    /// Evict the oldest durable entries beyond the tail's bounds. Entries not yet durable are
    /// never evicted: they exist nowhere else.
    fn trim_tail(&mut self) {
        while self.tail.len() > TAIL_ENTRIES_MAX || self.tail_bytes > TAIL_BYTES_MAX {
            let Some((&first, _)) = self.tail.first_key_value() else { break };
            if first > self.durable_through {
                break;
            }
            if let Some(e) = self.tail.remove(&first) {
                self.tail_bytes -= weight(&e);
            }
        }
    }
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl LogStore {
    /// Open (or create) the log in the files `path.0` and `path.1`, and start its writer
    /// thread. The log alone, purging whatever openraft asks (for tests of the log by itself).
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        Self::open_with_purge_limit(path, Arc::new(AtomicU64::new(u64::MAX)))
    }

    /// Open (or create) the log, never dropping entries above `purge_limit` from the file: the
    /// state machine's durable point ([`crate::StateMachineStore::durable_point`]).
    pub fn open_with_purge_limit(path: &Path, purge_limit: Arc<AtomicU64>) -> Result<Self, StorageError> {
        let files = FsLogFile::open_pair(path).map_err(|e| StorageIOError::read_logs(&e))?;
        Self::with_files(files, purge_limit, WalOptions::default())
    }

    /// Open over files the caller opened, with a writer thread.
    pub fn with_files(files: LogFiles, purge_limit: Arc<AtomicU64>, options: WalOptions) -> Result<Self, StorageError> {
        let (shared, wal) = Self::load(files, purge_limit, options)?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_MAX);
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || writer_loop(writer_shared, wal, rx))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(LogStore { shared, writer: Writer::Thread(tx), ack_own_at_submit: None })
    }

    /// Open over files the caller opened (the simulator's, on its simulated disk), written by
    /// a task on the current runtime instead of a thread: nothing runs outside the
    /// simulation's single thread. Each group commit first sleeps for what `sync_time`
    /// returns, to stand for the fsync.
    pub fn with_files_in_task(
        files: LogFiles,
        purge_limit: Arc<AtomicU64>,
        options: WalOptions,
        sync_time: SyncTime,
    ) -> Result<Self, StorageError> {
        let (shared, wal) = Self::load(files, purge_limit, options)?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_MAX);
        tokio::spawn(writer_task(shared.clone(), wal, rx, sync_time));
        Ok(LogStore { shared, writer: Writer::Task(tx), ack_own_at_submit: None })
    }

    /// Report the entries this node proposes as leader written as soon as they are queued,
    /// before their fsync, so that the leader's fsync overlaps the followers' (see the module
    /// documentation for what keeps this safe: the state machine must be given
    /// [`LogStore::durability`] and the network [`crate::network::NetworkFactory::bound_commit_by`]).
    /// Every other append (a follower's, or entries of an earlier leader) still reports only
    /// once durable.
    pub fn ack_own_entries_at_submit(mut self, node_id: u64) -> Self {
        self.ack_own_at_submit = Some(node_id);
        self
    }

    /// How far the log is on disk.
    pub fn durability(&self) -> LogDurability {
        self.shared.durability.clone()
    }

    fn load(
        files: LogFiles,
        purge_limit: Arc<AtomicU64>,
        options: WalOptions,
    ) -> Result<(Arc<Shared>, Wal), StorageError> {
        let durable = purge_limit.load(Ordering::SeqCst);
        let load = || -> io::Result<(MemState, Wal)> {
            let Opened { mut wal, mut index } = Wal::open(files.clone(), options)?;
            finish_held_back_purge(&mut wal, &mut index, durable)?;
            check_contiguous(&index, durable)?;
            // Never resume leadership from disk: openraft 0.9 restores a node whose stored vote
            // is committed for itself as leader at once, reusing its old term's first entry as
            // the read index floor. The commit index it restores is only as fresh as the last
            // log write (it rides along, see `write_batch`), so such a leader could confirm a
            // read with a quorum and serve it from before a write it had acknowledged. Loaded
            // as not committed, the vote keeps its term and candidate (no double voting), and
            // the node must win an election, with a new no-op entry, before it serves.
            let vote: Option<Vote> = index.meta.vote.map(|mut v| {
                v.committed = false;
                v
            });
            let last_entry = match index.entries.last_key_value() {
                Some((_, &loc)) => Some(Wal::read(&files, loc)?),
                None => None,
            };
            let last_log_id = last_entry.map(|e| e.log_id).or(index.meta.last_purged);
            let mem = MemState {
                tail: BTreeMap::new(),
                tail_bytes: 0,
                durable_through: last_log_id.map_or(0, |l| l.index),
                durable_id: last_log_id,
                last_log_id,
                last_purged: index.meta.last_purged,
                purged_on_disk: index.meta.last_purged,
                vote,
                committed: index.meta.committed,
                disk: index,
            };
            Ok((mem, wal))
        };
        let (mem, wal) = load().map_err(|e| StorageIOError::read_logs(&e))?;
        let durability = LogDurability::new(mem.durable_id);
        let shared = Arc::new(Shared {
            files,
            reuse: RwLock::new(()),
            mem: Mutex::new(mem),
            stats: Arc::new(LogStoreStats::default()),
            purge_limit,
            durability,
        });
        Ok((shared, wal))
    }

    pub fn stats(&self) -> Arc<LogStoreStats> {
        self.shared.stats.clone()
    }

    async fn submit(&self, op: LogOp) -> Result<(), StorageError> {
        let (Writer::Thread(tx) | Writer::Task(tx)) = &self.writer;
        tx.send(op).await.map_err(|_| StorageIOError::write_logs(&io_err("log writer has stopped")).into())
    }
}

/// Complete, at open, a purge the file held back while the state machine was not yet durable
/// through it, if the state machine now is. This happens after a snapshot install: openraft
/// asks to purge through the snapshot while the state machine is still installing it, then
/// appends the entries after the snapshot; the file keeps its older entries until the install
/// is durable, and a crash in between leaves stale entries below a hole. Once the state
/// machine holds the snapshot, the entries below the hole are covered by it and are dropped.
fn finish_held_back_purge(wal: &mut Wal, index: &mut DiskIndex, durable: u64) -> io::Result<()> {
    let (purged, requested) = (index.meta.last_purged, index.meta.purge_requested);
    if let Some(req) = requested.filter(|r| Some(*r) > purged && r.index <= durable) {
        let mut b = wal.builder();
        b.purge(Some(req), req);
        let (at, bytes) = wal.append(&mut b)?;
        index.apply_written(wal.current, at, &bytes);
        tracing::info!(purged = req.index, "finished a purge held back for the state machine");
    }
    Ok(())
}

/// The entries after the purged point must be consecutive: openraft reads them as one run.
/// A hole is reported with what is known, rather than as a missing entry deep in openraft.
fn check_contiguous(index: &DiskIndex, durable: u64) -> io::Result<()> {
    let purged = index.meta.last_purged;
    let mut expected = purged.map(|p| p.index + 1);
    for &i in index.entries.keys() {
        if let Some(e) = expected.filter(|e| *e != i) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the Raft log has a hole: entry {e} is missing before entry {i} (purged through {:?}, \
                     state machine durable through {durable})",
                    purged.map(|p| p.index)
                ),
            ));
        }
        expected = Some(i + 1);
    }
    Ok(())
}

/// The writer thread: one record and one fsync for everything queued.
fn writer_loop(shared: Arc<Shared>, mut wal: Wal, mut rx: mpsc::Receiver<LogOp>) {
    while let Some(first) = rx.blocking_recv() {
        if !commit_group(&shared, &mut wal, take_group(first, &mut rx)) {
            fail_queued(rx);
            return;
        }
    }
}

/// The simulator's writer: the same, as a task, with a simulated sync time.
async fn writer_task(shared: Arc<Shared>, mut wal: Wal, mut rx: mpsc::Receiver<LogOp>, sync_time: SyncTime) {
    while let Some(first) = rx.recv().await {
        let sync = sync_time();
        if !sync.is_zero() {
            tokio::time::sleep(sync).await;
        }
        if !commit_group(&shared, &mut wal, take_group(first, &mut rx)) {
            fail_queued(rx);
            return;
        }
    }
}

/// `first` and whatever else is queued, up to [`GROUP_COMMIT_OPS_MAX`].
fn take_group(first: LogOp, rx: &mut mpsc::Receiver<LogOp>) -> Vec<LogOp> {
    let mut batch = vec![first];
    while batch.len() < GROUP_COMMIT_OPS_MAX {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
    batch
}

/// After a failed write: refuse everything still queued, and take nothing more.
fn fail_queued(mut rx: mpsc::Receiver<LogOp>) {
    rx.close();
    while let Ok(op) = rx.try_recv() {
        match op {
            LogOp::Append { callback, .. } => {
                if let Some(callback) = callback {
                    callback.log_io_completed(Err(io_err("log writer stopped")))
                }
            }
            LogOp::SaveVote { done, .. } | LogOp::Truncate { done, .. } | LogOp::Purge { done, .. } => {
                let _ = done.send(Err(io_err("log writer stopped")));
            }
        }
    }
}

/// Write a group of operations as one record with one fsync, record what became durable, and
/// answer every operation; then compact the log if it is due. False when a write failed: a
/// failed fsync leaves the file in an unknown state, so the writer then stops taking writes
/// rather than pretend (the "fsyncgate" lesson); openraft sees the errors and stops.
fn commit_group(shared: &Shared, wal: &mut Wal, batch: Vec<LogOp>) -> bool {
    let (committed, durable_end) = {
        let mem = shared.mem.lock().expect("log mem lock");
        (mem.committed, durable_after(mem.durable_through, mem.durable_id, &batch))
    };
    // The commit pointer on disk never points past the entries on disk: a leader may learn
    // of a commit before its own copy is written (see the module documentation), and a
    // restart re-applies through the stored pointer. The last entry on disk is then below the
    // commit point in the leader's log, so it is committed too.
    let committed = match committed {
        Some(c) if c.index > durable_end.0 => durable_end.1.map(Some),
        c => Some(c),
    };
    let result = write_batch(wal, &batch, committed);
    let mut live = 0;
    if let Ok((at, bytes)) = &result {
        let stats = &shared.stats;
        stats.fsyncs_total.fetch_add(1, Ordering::Relaxed);
        let mut mem = shared.mem.lock().expect("log mem lock");
        // Into the disk index before out of the tail, under one lock: a reader finds each
        // entry in one or the other.
        mem.disk.apply_written(wal.current, *at, bytes);
        live = mem.disk.live_bytes;
        for op in &batch {
            if let LogOp::Append { entries, .. } = op {
                stats.entries_written_total.fetch_add(entries.len() as u64, Ordering::Relaxed);
            }
        }
        (mem.durable_through, mem.durable_id) = durable_after(mem.durable_through, mem.durable_id, &batch);
        shared.durability.set(mem.durable_id);
        mem.trim_tail();
    } else {
        shared.durability.fail();
    }
    for op in batch {
        let r = result.as_ref().map(|_| ()).map_err(|e| io::Error::other(e.to_string()));
        match op {
            LogOp::Append { callback, .. } => {
                if let Some(callback) = callback {
                    callback.log_io_completed(r)
                }
            }
            LogOp::SaveVote { done, .. } | LogOp::Truncate { done, .. } | LogOp::Purge { done, .. } => {
                let _ = done.send(r);
            }
        }
    }
    if let Err(e) = &result {
        tracing::error!(error = %e, "raft log write failed; the log writer stops");
        return false;
    }
    if wal.wants_compaction(live) {
        if let Err(e) = compact(shared, wal) {
            tracing::error!(error = %e, "raft log compaction failed; the log writer stops");
            shared.durability.fail();
            return false;
        }
    }
    true
}

/// Copy the live entries into the other file and continue there (see [`crate::wal`]).
fn compact(shared: &Shared, wal: &mut Wal) -> io::Result<()> {
    let index = shared.mem.lock().expect("log mem lock").disk.clone();
    let before = wal.end;
    let moved = wal.compact(&index, |target| {
        let _no_readers = shared.reuse.write().expect("log reuse lock");
        target.set_len(0)
    })?;
    // Only this writer changes the index, so it is still `index`, at new places.
    debug_assert_eq!(moved.meta, index.meta);
    debug_assert!(moved.entries.keys().eq(index.entries.keys()));
    shared.mem.lock().expect("log mem lock").disk = moved;
    shared.stats.compactions_total.fetch_add(1, Ordering::Relaxed);
    tracing::info!(from_bytes = before, to_bytes = wal.end, entries = index.entries.len(), "compacted the Raft log");
    Ok(())
}

/// Where the durable end of the log stands once `batch` is on disk, from where it stood
/// before: an append ends the log at its last entry (openraft appends consecutively, after
/// truncating any conflict), a truncation cuts it back.
fn durable_after(mut through: u64, mut id: Option<LogId>, batch: &[LogOp]) -> (u64, Option<LogId>) {
    for op in batch {
        match op {
            LogOp::Append { entries, .. } => {
                if let Some(last) = entries.last().filter(|l| l.log_id.index >= through) {
                    (through, id) = (last.log_id.index, Some(last.log_id));
                }
            }
            LogOp::Truncate { from_index, prev, .. } if through >= *from_index => {
                (through, id) = (from_index.saturating_sub(1), *prev);
            }
            _ => {}
        }
    }
    (through, id)
}

/// Write one batch as one record with one fsync; returns where it went, for the index. The
/// committed pointer is not worth an fsync of its own: the latest one rides along with every
/// batch (`None` only when the log on disk is empty, or it would point past it). A restart
/// re-applies through it, so that a restarted node holds, among the rest, the policy before
/// it serves.
fn write_batch(wal: &mut Wal, batch: &[LogOp], committed: Option<Option<LogId>>) -> io::Result<(u64, Vec<u8>)> {
    let mut b = wal.builder();
    for op in batch {
        match op {
            LogOp::Append { entries, .. } => entries.iter().for_each(|e| b.entry(e)),
            LogOp::SaveVote { vote, .. } => b.vote(vote),
            LogOp::Truncate { from_index, .. } => b.truncate(*from_index),
            LogOp::Purge { upto, requested, .. } => b.purge(*upto, *requested),
        }
    }
    if let Some(committed) = committed {
        b.committed(committed);
    }
    wal.append(&mut b)
}

fn read_range(shared: &Shared, start: u64, end_inclusive: u64) -> Result<Vec<Entry>, StorageError> {
    let read = || -> io::Result<BTreeMap<u64, Entry>> {
        let _no_reuse = shared.reuse.read().expect("log reuse lock");
        let locs: Vec<_> = {
            let mem = shared.mem.lock().expect("log mem lock");
            mem.disk.entries.range(start..=end_inclusive).map(|(&i, &l)| (i, l)).collect()
        };
        locs.into_iter().map(|(i, loc)| Ok((i, Wal::read(&shared.files, loc)?))).collect()
    };
    // Take the tail snapshot first: an entry leaves the tail only after it is on disk and in
    // the disk index, so an entry missing from this tail copy is found by the read that follows.
    let (tail, tail_first) = {
        let mem = shared.mem.lock().expect("log mem lock");
        let first = mem.tail.first_key_value().map(|(&i, _)| i);
        (mem.tail.range(start..=end_inclusive).map(|(_, e)| e.clone()).collect::<Vec<_>>(), first)
    };
    if tail_first.is_some_and(|f| f <= start) {
        // The tail is a suffix of the log starting at or before `start`: it holds the whole
        // range (whatever lies past its end does not exist).
        return Ok(tail);
    }
    let mut entries = read().map_err(|e| StorageIOError::read_logs(&e))?;
    for e in tail {
        entries.insert(e.log_id.index, e);
    }
    Ok(entries.into_values().collect())
}

fn bounds(range: &impl RangeBounds<u64>) -> Option<(u64, u64)> {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e,
        Bound::Excluded(&e) => e.checked_sub(1)?,
        Bound::Unbounded => u64::MAX,
    };
    (start <= end).then_some((start, end))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        match bounds(&range) {
            Some((s, e)) => read_range(&self.shared, s, e),
            None => Ok(Vec::new()),
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let mem = self.shared.mem.lock().expect("log mem lock");
        Ok(LogState { last_purged_log_id: mem.last_purged, last_log_id: mem.last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let (done, wait) = oneshot::channel();
        self.submit(LogOp::SaveVote { vote: *vote, done }).await?;
        let r = wait.await.unwrap_or_else(|_| Err(io_err("log writer stopped")));
        r.map_err(|e| StorageIOError::write_vote(&e))?;
        self.shared.mem.lock().expect("log mem lock").vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.shared.mem.lock().expect("log mem lock").vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Kept in memory and written with the next batch (see `write_batch`).
        self.shared.mem.lock().expect("log mem lock").committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.shared.mem.lock().expect("log mem lock").committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let own = {
            let mut mem = self.shared.mem.lock().expect("log mem lock");
            for e in &entries {
                // Openraft appends consecutively after truncating any conflict; we do not
                // re-check that here (its storage suite appends arbitrary layouts on purpose).
                mem.insert_tail(e.clone());
                mem.last_log_id = Some(e.log_id);
            }
            // Our own leadership's entries: the vote is ours and every entry carries it. Only
            // this node, as leader of that term, creates entries with that leader id.
            let vote = mem.vote;
            self.ack_own_at_submit.is_some_and(|me| {
                vote.is_some_and(|v| {
                    v.leader_id.node_id == me && entries.iter().all(|e| e.log_id.leader_id == v.leader_id)
                })
            })
        };
        if !own {
            return self.submit(LogOp::Append { entries, callback: Some(callback) }).await;
        }
        // Queued in order behind every earlier operation; reported now, durable later.
        self.submit(LogOp::Append { entries, callback: None }).await?;
        self.shared.stats.acked_at_submit_total.fetch_add(1, Ordering::Relaxed);
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from_index = log_id.index;
        // The new last entry is the one before `from_index`, or the purge point.
        let prev = match from_index.checked_sub(1) {
            Some(p) => read_range(&self.shared, p, p)?.pop().map(|e| e.log_id),
            None => None,
        };
        let prev = {
            let mut mem = self.shared.mem.lock().expect("log mem lock");
            let prev = prev.or(mem.last_purged);
            mem.remove_tail_where(|i| i >= from_index);
            if mem.durable_through >= from_index {
                (mem.durable_through, mem.durable_id) = (from_index.saturating_sub(1), prev);
                self.shared.durability.set(prev);
            }
            prev
        };
        let (done, wait) = oneshot::channel();
        self.submit(LogOp::Truncate { from_index, prev, done }).await?;
        let r = wait.await.unwrap_or_else(|_| Err(io_err("log writer stopped")));
        r.map_err(|e| StorageIOError::write_logs(&e))?;
        let mut mem = self.shared.mem.lock().expect("log mem lock");
        mem.last_log_id = prev;
        Ok(())
    }

    /// Openraft 0.9 may ask to purge up to a snapshot before the state machine has installed
    /// that snapshot durably (install runs on its own worker). Dropping those entries from the
    /// file at once would leave a crash with a state machine behind the log's start, and the
    /// node could never restart. So the file keeps every entry above the state machine's
    /// durable point; openraft is told the purge is done (it never reads purged entries), and
    /// a later purge drops the rest.
    async fn purge(&mut self, upto: LogId) -> Result<(), StorageError> {
        let mut limit = self.shared.purge_limit.load(Ordering::SeqCst);
        // After a snapshot install openraft asks to purge through the snapshot while the state
        // machine may still be installing it. Wait (bounded) for it to be durable, so that
        // the file drops the older entries before openraft appends past the snapshot.
        let deadline = tokio::time::Instant::now() + PURGE_WAIT_MAX;
        while limit < upto.index && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            limit = self.shared.purge_limit.load(Ordering::SeqCst);
        }
        let (on_disk, last) = {
            let mut mem = self.shared.mem.lock().expect("log mem lock");
            assert!(mem.last_purged <= Some(upto), "purge must move forward");
            mem.remove_tail_where(|i| i <= upto.index);
            (mem.purged_on_disk, mem.last_log_id)
        };
        let target = if upto.index <= limit {
            Some(upto)
        } else {
            let idx = limit.min(last.map_or(0, |l| l.index));
            match read_range(&self.shared, idx, idx)?.pop() {
                Some(e) if Some(e.log_id) > on_disk => Some(e.log_id),
                _ => None,
            }
        };
        let target = target.filter(|t| Some(*t) > on_disk);
        if target.is_some() || Some(upto) > on_disk {
            let (done, wait) = oneshot::channel();
            self.submit(LogOp::Purge { upto: target, requested: upto, done }).await?;
            let r = wait.await.unwrap_or_else(|_| Err(io_err("log writer stopped")));
            r.map_err(|e| StorageIOError::write_logs(&e))?;
            if target.is_some() {
                self.shared.mem.lock().expect("log mem lock").purged_on_disk = target;
            }
        }
        let mut mem = self.shared.mem.lock().expect("log mem lock");
        mem.last_purged = Some(upto);
        if mem.last_log_id < Some(upto) {
            mem.last_log_id = Some(upto);
        }
        Ok(())
    }
}
