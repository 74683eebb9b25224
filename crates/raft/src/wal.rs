//! The Raft log's file format: an append-only, checksummed write-ahead log in two files that
//! take turns.
//!
//! Why not redb, which holds the state machine: a redb commit rewrites the copy-on-write path
//! of every tree it touches, so one group commit of a single 300-byte entry wrote nine 4 KiB
//! pages at scattered offsets (about 37 KB, 8 block writes) and cost 315 µs of CPU per node,
//! against about 60 µs for an append and `fdatasync` of the same bytes (docs/benchmarks.md).
//! A Raft log is only ever appended, cut back at its end, and dropped from its start; a file
//! that is only appended to does all three.
//!
//! **Records.** A file is a run of records, each `len: u32, crc32: u32, gen: u64, prev: u32,
//! flags: u32` then `len` bytes of operations. The checksum covers everything after itself.
//! `gen` is the file's generation; `prev` is the checksum of the record before (0 for a
//! generation's first), so the records form a chain and a record left from an earlier write,
//! or an earlier use of the file, can never join it. A group commit is one record (or
//! several, past [`RECORD_TARGET_BYTES`]) and one `fdatasync`; its first record is flagged as
//! starting a group. The file is preallocated ahead of the writes, so an append needs no
//! block allocation at sync time, and unwritten space reads as zeros: a zero length ends the
//! log.
//!
//! **Operations** inside a record: `kind: u8, len: u32` then the body: an entry (its index,
//! then the encoded entry), a vote, a truncation, a purge, the commit pointer, and the three
//! that frame a generation: a header (the vote, commit pointer and purge points the entries
//! after it start from), a seal, and the mark a compaction leaves in the file it left.
//!
//! **Two files.** Entries dropped from the start of the log stay in the file until it is
//! compacted: the writer then truncates the other file (and syncs that), copies the live
//! entries into it after a header, ends them with a seal, syncs, marks the old file as
//! superseded, and from then on appends to the new one. At open, the file whose generation is
//! the highest among those with a seal is the log; an unsealed generation (a compaction a
//! crash cut short) is ignored, and the older file, untouched until then, is still whole. A
//! new generation's number is past every one either file has held, finished or not.
//!
//! **Recovery.** Records are replayed in order up to the first that is incomplete, fails its
//! checksum or does not follow the one before. The writer starts a group only after the one
//! before it is synced, so a failure is a torn write if nothing after it proves otherwise; the
//! open then cuts the file at the last whole record (and anything past it), before anything
//! is appended. It refuses to open, rather than lose synced records, when the chain after the
//! failed record leads to a record that starts a later group (the failed one had been
//! synced: damage, not a crash), or when the newest sealed generation carries the mark of a
//! newer one that does not open. Replaying and writing share one function
//! ([`DiskIndex::apply_record`]), so the index the writer keeps is the one a restart would
//! rebuild.
//!
//! What it cannot tell: a damaged record whose own header is damaged too hides where the
//! chain goes on, and is cut like a torn one. The other voters of the region still hold every
//! acknowledged entry; the node's vote is what a cut can lose.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{decode, encode, Entry, LogId, Vote};

/// One file of the log, read and written at offsets. The seam the simulator's disk plugs
/// into, as redb's storage backend is for the state machine.
pub trait LogFile: Send + Sync + 'static {
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Fill `buf` from `offset`; an error if the file ends first.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Make every write so far durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Make the file at least `len` bytes long, reading as zeros past what was written, with
    /// its blocks reserved if the platform can, so later writes need no allocation.
    fn preallocate(&self, len: u64) -> io::Result<()> {
        if self.len()? < len {
            self.set_len(len)
        } else {
            Ok(())
        }
    }
}

/// The two files of a log.
pub type LogFiles = [Arc<dyn LogFile>; 2];

/// A log file on the local file system.
pub struct FsLogFile {
    file: File,
    path: PathBuf,
}

impl FsLogFile {
    /// Open or create the file. A new file's directory entry is synced, so the file survives
    /// a crash.
    pub fn open(path: &Path) -> io::Result<Self> {
        let existed = path.exists();
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        if !existed {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok(FsLogFile { file, path: path.to_path_buf() })
    }

    /// The two files of a log at `base`: `base.0` and `base.1`.
    pub fn open_pair(base: &Path) -> io::Result<LogFiles> {
        let name = |n: u8| {
            let mut s = base.as_os_str().to_owned();
            s.push(format!(".{n}"));
            PathBuf::from(s)
        };
        let first = FsLogFile::open(&name(0))?;
        first.lock_exclusive()?;
        Ok([Arc::new(first), Arc::new(FsLogFile::open(&name(1))?)])
    }

    /// One process at a time: a second writer would interleave records with the first.
    /// Released when the file is closed.
    fn lock_exclusive(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this struct owns; no memory is passed.
        let rc = unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "the Raft log {} is in use by another process (or another open in this one)",
                    self.path.display()
                ),
            ));
        }
        Err(err)
    }
}

impl LogFile for FsLogFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, data, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    #[cfg(target_os = "linux")]
    fn preallocate(&self, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let cur = self.len()?;
        if cur >= len {
            return Ok(());
        }
        // SAFETY: fallocate on a file descriptor this struct owns; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, cur as libc::off_t, (len - cur) as libc::off_t) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // A file system without fallocate: a sparse extension still reads as zeros.
            Some(libc::EOPNOTSUPP) => self.file.set_len(len),
            _ => Err(io::Error::new(err.kind(), format!("preallocating {}: {err}", self.path.display()))),
        }
    }
}

/// Bytes before a record's operations: length, checksum, generation, the previous record's
/// checksum, flags.
pub const RECORD_HEADER_BYTES: usize = 24;
/// Past a record that fails, how far recovery looks for proof that it had been synced.
const CHAIN_PROBE_RECORDS_MAX: usize = 4096;
/// A group commit's operations are split into records of about this size (an operation is
/// never split).
pub const RECORD_TARGET_BYTES: usize = 4 << 20;
/// Largest record recovery accepts; a larger length is taken for a torn or corrupt header.
pub const RECORD_MAX_BYTES: u64 = 1 << 30;
const OP_HEADER_BYTES: usize = 5;

const OP_HEADER: u8 = 1;
const OP_SEAL: u8 = 2;
const OP_ENTRY: u8 = 3;
const OP_VOTE: u8 = 4;
const OP_TRUNCATE: u8 = 5;
const OP_PURGE: u8 = 6;
const OP_COMMITTED: u8 = 7;
const OP_SUPERSEDED: u8 = 8;

/// Where an entry's encoded bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub file: u8,
    pub offset: u64,
    pub len: u32,
}

/// What the log holds besides its entries, as its operations left it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    pub last_purged: Option<LogId>,
    /// The purge openraft last asked for; ahead of `last_purged` while the log keeps entries
    /// back for a state machine that has not yet made them durable.
    pub purge_requested: Option<LogId>,
}

/// The entries of the current generation and where they are, with [`Meta`]: what a replay of
/// the file up to its end gives.
#[derive(Clone, Debug, Default)]
pub struct DiskIndex {
    pub entries: BTreeMap<u64, Loc>,
    /// Bytes of the entries in `entries` (what a compaction copies).
    pub live_bytes: u64,
    pub meta: Meta,
}

impl DiskIndex {
    fn insert(&mut self, index: u64, loc: Loc) {
        if let Some(old) = self.entries.insert(index, loc) {
            self.live_bytes -= u64::from(old.len);
        }
        self.live_bytes += u64::from(loc.len);
    }

    fn drop_from(&mut self, from: u64) {
        let cut = self.entries.split_off(&from);
        self.live_bytes -= cut.values().map(|l| u64::from(l.len)).sum::<u64>();
    }

    fn drop_through(&mut self, upto: u64) {
        let keep = match upto.checked_add(1) {
            Some(next) => self.entries.split_off(&next),
            None => BTreeMap::new(),
        };
        let gone = std::mem::replace(&mut self.entries, keep);
        self.live_bytes -= gone.values().map(|l| u64::from(l.len)).sum::<u64>();
    }

    /// Bring the index up to records this writer just wrote at `at` of `file`, through the
    /// same code a replay runs.
    pub fn apply_written(&mut self, file: u8, at: u64, bytes: &[u8]) {
        let mut frame = Frame::default();
        for_each_record(bytes, at, |payload, offset| {
            self.apply_record(payload, offset, file, &mut frame).expect("records this writer built parse");
        });
    }

    /// Apply one record's operations, found at `payload_offset` of `file`. `frame` notes a
    /// seal, and a mark that a newer generation replaced this one. An error means operations
    /// that passed their checksum but cannot be read: a bug or a format this build does not
    /// know, never a torn write.
    pub fn apply_record(
        &mut self,
        payload: &[u8],
        payload_offset: u64,
        file: u8,
        frame: &mut Frame,
    ) -> Result<(), String> {
        let mut at = 0usize;
        while at < payload.len() {
            let head = payload.get(at..at + OP_HEADER_BYTES).ok_or("an operation header past the record's end")?;
            let kind = head[0];
            let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
            let body_at = at + OP_HEADER_BYTES;
            let body = payload.get(body_at..body_at + len).ok_or("an operation past the record's end")?;
            match kind {
                OP_HEADER => {
                    self.entries.clear();
                    self.live_bytes = 0;
                    self.meta = decode(body).map_err(|e| format!("header: {e}"))?;
                }
                OP_SEAL => frame.sealed = true,
                OP_SUPERSEDED => {
                    let by = u64::from_le_bytes(body.try_into().map_err(|_| "a superseded mark of the wrong size")?);
                    frame.superseded_by = Some(by);
                }
                OP_ENTRY => {
                    let index = u64::from_le_bytes(body.get(..8).ok_or("a short entry")?.try_into().expect("8 bytes"));
                    let loc = Loc { file, offset: payload_offset + (body_at + 8) as u64, len: (len - 8) as u32 };
                    self.insert(index, loc);
                }
                OP_VOTE => self.meta.vote = Some(decode(body).map_err(|e| format!("vote: {e}"))?),
                OP_TRUNCATE => {
                    let from = u64::from_le_bytes(body.try_into().map_err(|_| "a truncation of the wrong size")?);
                    self.drop_from(from);
                }
                OP_PURGE => {
                    let (upto, requested): (Option<LogId>, LogId) = decode(body).map_err(|e| format!("purge: {e}"))?;
                    if let Some(upto) = upto {
                        self.drop_through(upto.index);
                        self.meta.last_purged = Some(upto);
                    }
                    self.meta.purge_requested = Some(requested);
                }
                OP_COMMITTED => self.meta.committed = decode(body).map_err(|e| format!("commit pointer: {e}"))?,
                k => return Err(format!("an operation of unknown kind {k}")),
            }
            at = body_at + len;
        }
        Ok(())
    }
}

/// What frames a generation, besides its operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    /// The generation's seal was seen: it is complete.
    pub sealed: bool,
    /// A compaction wrote this generation, sealed and synced, and the log moved on to it.
    pub superseded_by: Option<u64>,
}

/// Builds records in memory: operations go into the open record, and a record is closed (its
/// length and checksum filled in) when it passes [`RECORD_TARGET_BYTES`] or at the end. Each
/// record names the checksum of the one before it in the file (0 for a generation's first),
/// so that a record left over from an earlier write can never join the chain; the first
/// record a builder closes is flagged as starting a group, which the writer only writes after
/// everything before it is synced.
pub struct RecordBuilder {
    gen: u64,
    /// The file offset `buf` will be written at.
    base: u64,
    buf: Vec<u8>,
    /// Where the open record starts in `buf`.
    open: Option<usize>,
    /// The checksum of the last record closed (or of the record before this builder's first).
    prev: u32,
    group_start: bool,
}

impl RecordBuilder {
    /// Records of generation `gen`, written at `base`, after a record whose checksum is `prev`.
    pub fn new(gen: u64, base: u64, prev: u32) -> Self {
        RecordBuilder { gen, base, buf: Vec::new(), open: None, prev, group_start: true }
    }

    fn op(&mut self, kind: u8, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if let Some(start) = self.open {
            // Never close an empty record: a zero length reads as the end of the log.
            let used = self.buf.len() - start - RECORD_HEADER_BYTES;
            if used > 0 && used + OP_HEADER_BYTES + len > RECORD_TARGET_BYTES {
                self.close();
            }
        }
        if self.open.is_none() {
            self.open = Some(self.buf.len());
            self.buf.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
        }
        self.buf.push(kind);
        self.buf.extend_from_slice(&(len as u32).to_le_bytes());
        for p in parts {
            self.buf.extend_from_slice(p);
        }
    }

    fn close(&mut self) {
        let Some(start) = self.open.take() else { return };
        let payload_len = self.buf.len() - start - RECORD_HEADER_BYTES;
        let flags = if std::mem::take(&mut self.group_start) { FLAG_GROUP_START } else { 0 };
        let head = &mut self.buf[start..start + RECORD_HEADER_BYTES];
        head[0..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
        head[8..16].copy_from_slice(&self.gen.to_le_bytes());
        head[16..20].copy_from_slice(&self.prev.to_le_bytes());
        head[20..24].copy_from_slice(&flags.to_le_bytes());
        let crc =
            record_crc(&self.buf[start + 8..start + RECORD_HEADER_BYTES], &self.buf[start + RECORD_HEADER_BYTES..]);
        self.buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        self.prev = crc;
    }

    pub fn header(&mut self, meta: &Meta) {
        self.op(OP_HEADER, &[&encode(meta)]);
    }

    pub fn seal(&mut self) {
        self.op(OP_SEAL, &[]);
    }

    /// The mark a compaction leaves in the file it moved away from.
    pub fn superseded(&mut self, by_gen: u64) {
        self.op(OP_SUPERSEDED, &[&by_gen.to_le_bytes()]);
    }

    /// An entry already encoded.
    pub fn entry_bytes(&mut self, index: u64, bytes: &[u8]) {
        self.op(OP_ENTRY, &[&index.to_le_bytes(), bytes]);
    }

    pub fn entry(&mut self, e: &Entry) {
        self.entry_bytes(e.log_id.index, &encode(e));
    }

    pub fn vote(&mut self, vote: &Vote) {
        self.op(OP_VOTE, &[&encode(vote)]);
    }

    pub fn truncate(&mut self, from_index: u64) {
        self.op(OP_TRUNCATE, &[&from_index.to_le_bytes()]);
    }

    pub fn purge(&mut self, upto: Option<LogId>, requested: LogId) {
        self.op(OP_PURGE, &[&encode(&(upto, requested))]);
    }

    pub fn committed(&mut self, committed: Option<LogId>) {
        self.op(OP_COMMITTED, &[&encode(&committed)]);
    }

    /// Bytes built so far (records closed or not).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Close the open record and hand over the bytes and the offset they go at; the builder
    /// continues after them.
    pub fn take(&mut self) -> (u64, Vec<u8>) {
        self.close();
        let buf = std::mem::take(&mut self.buf);
        let base = self.base;
        self.base += buf.len() as u64;
        (base, buf)
    }

    /// The checksum of the last record closed.
    pub fn last_crc(&self) -> u32 {
        self.prev
    }
}

/// Flag of the first record of a group commit: the writer writes it only once everything
/// before it is synced.
const FLAG_GROUP_START: u32 = 1;

/// The checksum of a record: its generation, previous checksum and flags (`head_tail`, the
/// header's bytes 8..24), and its operations.
fn record_crc(head_tail: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head_tail);
    h.update(payload);
    h.finalize()
}

/// Visit each record of `bytes` (written at `base`): its payload and the payload's offset.
fn for_each_record(bytes: &[u8], base: u64, mut f: impl FnMut(&[u8], u64)) {
    let mut at = 0;
    while at + RECORD_HEADER_BYTES <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let start = at + RECORD_HEADER_BYTES;
        f(&bytes[start..start + len], base + start as u64);
        at = start + len;
    }
}

/// What replaying one file found.
#[derive(Debug)]
pub struct Replay {
    pub gen: u64,
    pub frame: Frame,
    pub index: DiskIndex,
    /// Where the last whole record ends.
    pub end: u64,
    /// The checksum of the last whole record.
    pub last_crc: u32,
    /// Why replay stopped before the file's end, if a record there was torn or corrupt.
    pub torn: Option<String>,
    /// Where a record that starts a later group follows the failed one in the chain: proof
    /// that the failed record had been synced, so it is damage, not a torn write.
    pub synced_after_failure: Option<u64>,
}

/// Reads a file front to back in large chunks.
struct ChunkReader<'a> {
    file: &'a dyn LogFile,
    len: u64,
    buf: Vec<u8>,
    buf_at: u64,
}

impl ChunkReader<'_> {
    const CHUNK: usize = 1 << 20;

    fn get(&mut self, offset: u64, n: usize) -> io::Result<Option<&[u8]>> {
        if offset + n as u64 > self.len {
            return Ok(None);
        }
        let have = offset >= self.buf_at && offset + n as u64 <= self.buf_at + self.buf.len() as u64;
        if !have {
            let take = (n.max(Self::CHUNK) as u64).min(self.len - offset) as usize;
            self.buf.resize(take, 0);
            self.file.read_at(offset, &mut self.buf)?;
            self.buf_at = offset;
        }
        let s = (offset - self.buf_at) as usize;
        Ok(Some(&self.buf[s..s + n]))
    }
}

/// A record's header as read.
#[derive(Clone, Copy, Debug)]
struct Head {
    len: u64,
    crc: u32,
    gen: u64,
    prev: u32,
    flags: u32,
}

fn parse_head(b: &[u8]) -> Head {
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    Head {
        len: u64::from(u32_at(0)),
        crc: u32_at(4),
        gen: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        prev: u32_at(16),
        flags: u32_at(20),
    }
}

/// What reading one record found: `Ok(None)` at the end of the log, `Err(why)` if it is
/// incomplete or fails its checksum.
type ReadRecord = Result<Option<(Head, Vec<u8>)>, String>;

/// The record at `at`: `Ok(None)` at the end of the log (a zero length, or no room for a
/// header), `Err(why)` if it is incomplete or fails its checksum.
fn read_record(r: &mut ChunkReader<'_>, at: u64) -> io::Result<ReadRecord> {
    let Some(head) = r.get(at, RECORD_HEADER_BYTES)? else { return Ok(Ok(None)) };
    let (h, head_tail): (Head, [u8; RECORD_HEADER_BYTES - 8]) =
        (parse_head(head), head[8..].try_into().expect("16 bytes"));
    if h.len == 0 {
        // Preallocated space.
        return Ok(Ok(None));
    }
    if h.len > RECORD_MAX_BYTES {
        return Ok(Err(format!("a record at {at} claims {} bytes", h.len)));
    }
    let Some(payload) = r.get(at + RECORD_HEADER_BYTES as u64, h.len as usize)? else {
        return Ok(Err(format!("a record at {at} of {} bytes runs past the file's end", h.len)));
    };
    if record_crc(&head_tail, payload) != h.crc {
        return Ok(Err(format!("a record at {at} fails its checksum")));
    }
    Ok(Ok(Some((h, payload.to_vec()))))
}

/// Follow the chain past a record that failed at `at`, as far as its header can be trusted
/// for where the next one starts, looking for a record that starts a group: the writer wrote
/// that one only after syncing the failed one.
fn find_synced_after(r: &mut ChunkReader<'_>, at: u64, gen: u64) -> io::Result<Option<u64>> {
    let Some(head) = r.get(at, RECORD_HEADER_BYTES)? else { return Ok(None) };
    let failed = parse_head(head);
    if failed.len == 0 || failed.len > RECORD_MAX_BYTES {
        return Ok(None);
    }
    let (mut next, mut expected) = (at + RECORD_HEADER_BYTES as u64 + failed.len, failed.crc);
    for _ in 0..CHAIN_PROBE_RECORDS_MAX {
        match read_record(r, next)? {
            Ok(Some((h, _))) if h.gen == gen && h.prev == expected => {
                if h.flags & FLAG_GROUP_START != 0 {
                    return Ok(Some(next));
                }
                expected = h.crc;
                next += RECORD_HEADER_BYTES as u64 + h.len;
            }
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Replay `file` (number `n`) up to its first incomplete, corrupt or unchained record. None if
/// it holds no generation at all (empty, zeros, or a first record torn).
pub fn replay(file: &dyn LogFile, n: u8) -> io::Result<Option<Replay>> {
    let len = file.len()?;
    let mut r = ChunkReader { file, len, buf: Vec::new(), buf_at: 0 };
    let mut out: Option<Replay> = None;
    let mut at = 0u64;
    let failed = loop {
        let (h, payload) = match read_record(&mut r, at)? {
            Ok(None) => break None,
            Err(why) => break Some(why),
            Ok(Some(rec)) => rec,
        };
        match &out {
            None if payload.first() != Some(&OP_HEADER) || h.prev != 0 => {
                break Some(format!("the first record at {at} does not start a generation"));
            }
            None => {}
            Some(rep) if h.gen != rep.gen || h.prev != rep.last_crc => {
                break Some(format!("a record at {at} does not follow the one before it"));
            }
            Some(_) => {}
        }
        let rep = out.get_or_insert_with(|| Replay {
            gen: h.gen,
            frame: Frame::default(),
            index: DiskIndex::default(),
            end: 0,
            last_crc: 0,
            torn: None,
            synced_after_failure: None,
        });
        let start = at + RECORD_HEADER_BYTES as u64;
        rep.index
            .apply_record(&payload, start, n, &mut rep.frame)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("Raft log record at {at}: {e}")))?;
        at = start + h.len;
        rep.end = at;
        rep.last_crc = h.crc;
    };
    if let (Some(rep), Some(why)) = (&mut out, failed) {
        rep.synced_after_failure = find_synced_after(&mut r, rep.end, rep.gen)?;
        rep.torn = Some(why);
    }
    Ok(out)
}

/// Whether `file` holds anything past where a new log's first record ends: if so, it is not
/// a new log whose first write a crash cut short, but a log whose start is damaged.
fn written_past_init(file: &dyn LogFile) -> io::Result<bool> {
    const INIT_MAX: u64 = 4096;
    let len = file.len()?;
    if len <= INIT_MAX {
        return Ok(false);
    }
    let mut buf = vec![0u8; (len - INIT_MAX).min(1 << 20) as usize];
    file.read_at(INIT_MAX, &mut buf)?;
    Ok(buf.iter().any(|&b| b != 0))
}

fn damaged(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{what}: the Raft log is damaged and this node's copy cannot be trusted; restore the node from a peer"),
    )
}

/// The log's files, with the one being appended to.
pub struct Wal {
    pub files: LogFiles,
    pub current: u8,
    pub gen: u64,
    /// The generation the next compaction writes: past every generation either file has held,
    /// finished or not.
    next_gen: u64,
    /// Where the next record goes.
    pub end: u64,
    /// The checksum of the last record, which the next one names.
    last_crc: u32,
    /// How far the current file is preallocated.
    allocated: u64,
    pub options: WalOptions,
}

/// Sizes that tests and the simulator shrink, to exercise compaction.
#[derive(Clone, Copy, Debug)]
pub struct WalOptions {
    /// Compact once the current file is this long and holds less than half live entries.
    pub compact_at_bytes: u64,
    /// Preallocate in steps of this many bytes.
    pub preallocate_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions { compact_at_bytes: 64 << 20, preallocate_bytes: 16 << 20 }
    }
}

/// What opening the log found.
pub struct Opened {
    pub wal: Wal,
    pub index: DiskIndex,
}

impl Wal {
    /// Open the log: pick the newest sealed generation, cut off a torn tail, or start a new log
    /// in empty files. Refuses, rather than roll back, when the evidence says a synced record
    /// is damaged: a record fails but a later group follows it, or the newest sealed
    /// generation says a newer one replaced it.
    pub fn open(files: LogFiles, options: WalOptions) -> io::Result<Opened> {
        let found = [replay(&*files[0], 0)?, replay(&*files[1], 1)?];
        let newest = found.iter().flatten().map(|r| r.gen).max().unwrap_or(0);
        let pick = (0..2u8)
            .filter(|&n| found[n as usize].as_ref().is_some_and(|r| r.frame.sealed))
            .max_by_key(|&n| found[n as usize].as_ref().map_or(0, |r| r.gen));
        let Some(current) = pick else {
            // No sealed generation. A new log, unless a file holds one that is not sealed
            // (only a compaction leaves those, and it leaves a sealed one in the other file).
            if found.iter().flatten().next().is_some() || !files[1].is_empty()? || written_past_init(&*files[0])? {
                return Err(damaged("the Raft log files hold no complete generation".into()));
            }
            return Self::create(files, options);
        };
        let rep = found.into_iter().nth(current as usize).flatten().expect("picked above");
        if let Some(by) = rep.frame.superseded_by {
            return Err(damaged(format!(
                "generation {} of the Raft log was replaced by generation {by}, which does not open",
                rep.gen
            )));
        }
        let file = &files[current as usize];
        if let Some(why) = &rep.torn {
            if let Some(later) = rep.synced_after_failure {
                return Err(damaged(format!("{why}, yet a record written after it was synced follows at {later}")));
            }
            tracing::warn!(file = current, end = rep.end, "cutting a torn tail off the Raft log: {why}");
        }
        // Nothing past the last whole record may survive, torn or not: a later append could
        // otherwise line up with it.
        if file.len()? > rep.end {
            file.set_len(rep.end)?;
            file.sync()?;
        }
        let mut wal = Wal {
            allocated: file.len()?,
            files,
            current,
            gen: rep.gen,
            next_gen: newest + 1,
            end: rep.end,
            last_crc: rep.last_crc,
            options,
        };
        wal.ensure_allocated(wal.end + 1)?;
        Ok(Opened { wal, index: rep.index })
    }

    fn create(files: LogFiles, options: WalOptions) -> io::Result<Opened> {
        files[0].set_len(0)?;
        let mut wal = Wal { files, current: 0, gen: 1, next_gen: 2, end: 0, last_crc: 0, allocated: 0, options };
        let mut b = RecordBuilder::new(1, 0, 0);
        b.header(&Meta::default());
        b.seal();
        wal.append(&mut b)?;
        Ok(Opened { wal, index: DiskIndex::default() })
    }

    fn ensure_allocated(&mut self, through: u64) -> io::Result<()> {
        if through > self.allocated {
            let step = self.options.preallocate_bytes.max(1);
            let want = through.div_ceil(step) * step;
            self.files[self.current as usize].preallocate(want)?;
            self.allocated = want;
        }
        Ok(())
    }

    /// A builder for one group of records appended at the current end.
    pub fn builder(&self) -> RecordBuilder {
        RecordBuilder::new(self.gen, self.end, self.last_crc)
    }

    /// Write what `b` built at the end of the current file and sync. Returns the bytes and
    /// where they went, to be applied to the index ([`DiskIndex::apply_written`]).
    pub fn append(&mut self, b: &mut RecordBuilder) -> io::Result<(u64, Vec<u8>)> {
        let written = self.write(b)?;
        self.files[self.current as usize].sync()?;
        Ok(written)
    }

    /// [`Wal::append`] without the sync: a compaction syncs once, after its last record.
    fn write(&mut self, b: &mut RecordBuilder) -> io::Result<(u64, Vec<u8>)> {
        let (at, bytes) = b.take();
        assert_eq!(at, self.end, "records are appended at the end");
        self.ensure_allocated(at + bytes.len() as u64 + 1)?;
        self.files[self.current as usize].write_at(at, &bytes)?;
        self.end = at + bytes.len() as u64;
        self.last_crc = b.last_crc();
        Ok((at, bytes))
    }

    /// Whether the current file is worth compacting, given the live entries' bytes.
    pub fn wants_compaction(&self, live_bytes: u64) -> bool {
        self.end >= self.options.compact_at_bytes && live_bytes.saturating_mul(2) < self.end
    }

    /// Read an entry's bytes.
    pub fn read(files: &LogFiles, loc: Loc) -> io::Result<Entry> {
        let mut buf = vec![0u8; loc.len as usize];
        files[loc.file as usize].read_at(loc.offset, &mut buf)?;
        decode(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("Raft log entry: {e}")))
    }

    /// Copy the live entries of `index` into the other file as a new generation, seal and sync
    /// it, mark the old file as superseded, and switch to the new one. `reuse` is called, and
    /// must return, before the other file is truncated (the caller takes its readers' lock
    /// there). Returns the new generation's index: `index`'s entries at their new places.
    pub fn compact(
        &mut self,
        index: &DiskIndex,
        reuse: impl FnOnce(&dyn LogFile) -> io::Result<()>,
    ) -> io::Result<DiskIndex> {
        let other = 1 - self.current;
        let gen = self.next_gen;
        let target = &self.files[other as usize];
        reuse(&**target)?;
        // The truncation is durable before any record of the new generation is written.
        target.sync()?;
        let mut next = Wal {
            files: self.files.clone(),
            current: other,
            gen,
            next_gen: gen + 1,
            end: 0,
            last_crc: 0,
            allocated: 0,
            options: self.options,
        };
        let mut b = next.builder();
        b.header(&index.meta);
        let mut moved = DiskIndex::default();
        for (&i, &loc) in &index.entries {
            let mut bytes = vec![0u8; loc.len as usize];
            self.files[loc.file as usize].read_at(loc.offset, &mut bytes)?;
            b.entry_bytes(i, &bytes);
            if b.len() >= RECORD_TARGET_BYTES {
                let (at, bytes) = next.write(&mut b)?;
                moved.apply_written(other, at, &bytes);
            }
        }
        b.seal();
        let (at, bytes) = next.append(&mut b)?;
        moved.apply_written(other, at, &bytes);
        // From here the new generation is the log. Mark the old one, so that an open which
        // cannot read the new one refuses instead of rolling back to the old.
        let mut mark = self.builder();
        mark.superseded(gen);
        self.append(&mut mark)?;
        *self = next;
        Ok(moved)
    }
}

/// A log file in memory, for tests: syncs are free and a crash is not modelled (the
/// simulator's disk models one).
#[derive(Default)]
pub struct MemLogFile(std::sync::Mutex<Vec<u8>>);

impl MemLogFile {
    /// The two files of a log in memory.
    pub fn pair() -> LogFiles {
        [Arc::new(MemLogFile::default()), Arc::new(MemLogFile::default())]
    }
}

impl LogFile for MemLogFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().expect("mem file lock").len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.0.lock().expect("mem file lock");
        let s = offset as usize;
        let src = data.get(s..s + buf.len()).ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut data = self.0.lock().expect("mem file lock");
        let (s, e) = (offset as usize, offset as usize + bytes.len());
        if data.len() < e {
            data.resize(e, 0);
        }
        data[s..e].copy_from_slice(bytes);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.lock().expect("mem file lock").resize(len as usize, 0);
        Ok(())
    }
}
