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
//! **Records.** A file is a run of records, each `len: u32, crc32: u32, gen: u64` then `len`
//! bytes of operations. The checksum covers `gen` and the operations; `gen` is the file's
//! generation, so a record can never be taken for one of an earlier life of the file. A group
//! commit is one record (or several, past [`RECORD_TARGET_BYTES`]) and one `fdatasync`. The
//! file is preallocated ahead of the writes, so an append needs no block allocation at sync
//! time, and unwritten space reads as zeros: a zero length ends the log.
//!
//! **Operations** inside a record: `kind: u8, len: u32` then the body: an entry (its index,
//! then the encoded entry), a vote, a truncation, a purge, the commit pointer, and the two
//! that frame a generation, a header (the vote, commit pointer and purge points the entries
//! after it start from) and a seal.
//!
//! **Two files.** Entries dropped from the start of the log stay in the file until it is
//! compacted: the writer then copies the live entries, after a header, into the other file,
//! ends them with a seal, syncs, and from then on appends there. At open, the file whose
//! generation is the highest among those with a seal is the log; an unsealed generation (a
//! compaction a crash cut short) is ignored, and the older file, untouched until the next
//! compaction, is still whole.
//!
//! **Recovery.** Records are replayed in order up to the first that is incomplete or fails
//! its checksum. Only the last record can be torn, because the writer never starts a record
//! before the one before it is synced; the torn tail is cut off before anything is appended.
//! Replaying and writing share one function ([`DiskIndex::apply_record`]), so the index the
//! writer keeps is the one a restart would rebuild.

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

/// Bytes before a record's operations: length, checksum, generation.
pub const RECORD_HEADER_BYTES: usize = 16;
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

    /// Apply one record's operations, found at `payload_offset` of `file`. `sealed` is set by
    /// a seal. An error means operations that passed their checksum but cannot be read: a
    /// bug or a format this build does not know, never a torn write.
    pub fn apply_record(
        &mut self,
        payload: &[u8],
        payload_offset: u64,
        file: u8,
        sealed: &mut bool,
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
                OP_SEAL => *sealed = true,
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

/// Builds records in memory: operations go into the open record, and a record is closed (its
/// length and checksum filled in) when it passes [`RECORD_TARGET_BYTES`] or at the end.
pub struct RecordBuilder {
    gen: u64,
    /// The file offset `buf` will be written at.
    base: u64,
    buf: Vec<u8>,
    /// Where the open record starts in `buf`.
    open: Option<usize>,
}

impl RecordBuilder {
    pub fn new(gen: u64, base: u64) -> Self {
        RecordBuilder { gen, base, buf: Vec::new(), open: None }
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
        let gen = self.gen.to_le_bytes();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&gen);
        crc.update(&self.buf[start + RECORD_HEADER_BYTES..]);
        let head = &mut self.buf[start..start + RECORD_HEADER_BYTES];
        head[0..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
        head[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
        head[8..16].copy_from_slice(&gen);
    }

    pub fn header(&mut self, meta: &Meta) {
        self.op(OP_HEADER, &[&encode(meta)]);
    }

    pub fn seal(&mut self) {
        self.op(OP_SEAL, &[]);
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
}

/// Visit each record of `bytes` (written at `base`): its payload and the payload's offset.
pub fn for_each_record(bytes: &[u8], base: u64, mut f: impl FnMut(&[u8], u64)) {
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
    pub sealed: bool,
    pub index: DiskIndex,
    /// Where the last whole record ends.
    pub end: u64,
    /// Why replay stopped before the file's end, if a record there was torn or corrupt.
    pub torn: Option<String>,
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

/// Replay `file` (number `n`) up to its first incomplete or corrupt record. None if it holds
/// no generation at all (empty, zeros, or a first record torn).
pub fn replay(file: &dyn LogFile, n: u8) -> io::Result<Option<Replay>> {
    let len = file.len()?;
    let mut r = ChunkReader { file, len, buf: Vec::new(), buf_at: 0 };
    let mut out: Option<Replay> = None;
    let mut at = 0u64;
    let torn = loop {
        let Some(head) = r.get(at, RECORD_HEADER_BYTES)? else { break None };
        let plen = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as u64;
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        let gen_bytes: [u8; 8] = head[8..16].try_into().expect("8 bytes");
        let gen = u64::from_le_bytes(gen_bytes);
        if plen == 0 {
            // Preallocated space: the end of the log, unless something was written past it.
            break None;
        }
        if plen > RECORD_MAX_BYTES {
            break Some(format!("a record at {at} claims {plen} bytes"));
        }
        let start = at + RECORD_HEADER_BYTES as u64;
        let Some(payload) = r.get(start, plen as usize)? else {
            break Some(format!("a record at {at} of {plen} bytes runs past the file's end"));
        };
        let mut h = crc32fast::Hasher::new();
        h.update(&gen_bytes);
        h.update(payload);
        if h.finalize() != crc {
            break Some(format!("a record at {at} fails its checksum"));
        }
        let payload = payload.to_vec();
        if out.is_none() {
            if payload.first() != Some(&OP_HEADER) {
                break Some(format!("the first record at {at} has no header"));
            }
            out = Some(Replay { gen, sealed: false, index: DiskIndex::default(), end: 0, torn: None });
        }
        let rep = out.as_mut().expect("set above");
        if rep.gen != gen {
            break Some(format!("a record at {at} of generation {gen} in generation {}", rep.gen));
        }
        let mut sealed = rep.sealed;
        rep.index
            .apply_record(&payload, start, n, &mut sealed)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("Raft log record at {at}: {e}")))?;
        rep.sealed = sealed;
        at = start + plen;
        rep.end = at;
    };
    if let Some(rep) = &mut out {
        rep.torn = torn;
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

/// The log's files, with the one being appended to.
pub struct Wal {
    pub files: LogFiles,
    pub current: u8,
    pub gen: u64,
    /// Where the next record goes.
    pub end: u64,
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
    /// in empty files.
    pub fn open(files: LogFiles, options: WalOptions) -> io::Result<Opened> {
        let found = [replay(&*files[0], 0)?, replay(&*files[1], 1)?];
        let pick = (0..2u8)
            .filter(|&n| found[n as usize].as_ref().is_some_and(|r| r.sealed))
            .max_by_key(|&n| found[n as usize].as_ref().map_or(0, |r| r.gen));
        let Some(current) = pick else {
            // No sealed generation. A new log, unless a file holds one that is not sealed
            // (only a compaction leaves those, and it leaves a sealed one in the other file).
            if found.iter().flatten().next().is_some() || !files[1].is_empty()? || written_past_init(&*files[0])? {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the Raft log files hold no complete generation: they are damaged, and this node's log \
                     cannot be trusted; restore the node from a peer",
                ));
            }
            return Self::create(files, options);
        };
        let rep = found.into_iter().nth(current as usize).flatten().expect("picked above");
        let file = &files[current as usize];
        if let Some(why) = &rep.torn {
            tracing::warn!(file = current, end = rep.end, "cutting a torn tail off the Raft log: {why}");
            file.set_len(rep.end)?;
            file.sync()?;
        }
        let mut wal = Wal { allocated: file.len()?, files, current, gen: rep.gen, end: rep.end, options };
        wal.ensure_allocated(wal.end + 1)?;
        Ok(Opened { wal, index: rep.index })
    }

    fn create(files: LogFiles, options: WalOptions) -> io::Result<Opened> {
        files[0].set_len(0)?;
        let mut wal = Wal { files, current: 0, gen: 1, end: 0, allocated: 0, options };
        let mut b = RecordBuilder::new(1, 0);
        b.header(&Meta::default());
        b.seal();
        let (_, bytes) = b.take();
        wal.ensure_allocated(bytes.len() as u64)?;
        wal.files[0].write_at(0, &bytes)?;
        wal.files[0].sync()?;
        wal.end = bytes.len() as u64;
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

    /// A builder for records appended at the current end.
    pub fn builder(&self) -> RecordBuilder {
        RecordBuilder::new(self.gen, self.end)
    }

    /// Write what `b` built at the end of the current file and sync. Returns the bytes and
    /// where they went, to be applied to the index (see [`for_each_record`]).
    pub fn append(&mut self, b: &mut RecordBuilder) -> io::Result<(u64, Vec<u8>)> {
        let (at, bytes) = b.take();
        debug_assert_eq!(at, self.end, "records are appended at the end");
        self.ensure_allocated(at + bytes.len() as u64 + 1)?;
        self.files[self.current as usize].write_at(at, &bytes)?;
        self.files[self.current as usize].sync()?;
        self.end = at + bytes.len() as u64;
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
    /// it, and switch to it. `reuse` is called, and must return, before the other file is
    /// truncated (the caller takes its readers' lock there). Returns the entries' new places.
    pub fn compact(
        &mut self,
        index: &DiskIndex,
        reuse: impl FnOnce(&dyn LogFile) -> io::Result<()>,
    ) -> io::Result<Vec<(u64, Loc)>> {
        let other = 1 - self.current;
        let gen = self.gen + 1;
        let target = self.files[other as usize].clone();
        reuse(&*target)?;
        let mut next =
            Wal { files: self.files.clone(), current: other, gen, end: 0, allocated: 0, options: self.options };
        let mut b = RecordBuilder::new(gen, 0);
        b.header(&index.meta);
        let mut moved = Vec::with_capacity(index.entries.len());
        let flush =
            |b: &mut RecordBuilder, next: &mut Wal, moved: &mut Vec<(u64, Loc)>, sync: bool| -> io::Result<()> {
                let (at, bytes) = b.take();
                next.ensure_allocated(at + bytes.len() as u64 + 1)?;
                target.write_at(at, &bytes)?;
                if sync {
                    target.sync()?;
                }
                next.end = at + bytes.len() as u64;
                let mut scratch = DiskIndex::default();
                let mut sealed = false;
                for_each_record(&bytes, at, |payload, off| {
                    // Our own bytes: they parse.
                    scratch.apply_record(payload, off, other, &mut sealed).expect("records just built");
                });
                moved.extend(scratch.entries);
                Ok(())
            };
        for (&i, &loc) in &index.entries {
            let mut bytes = vec![0u8; loc.len as usize];
            self.files[loc.file as usize].read_at(loc.offset, &mut bytes)?;
            b.entry_bytes(i, &bytes);
            if b.len() >= RECORD_TARGET_BYTES {
                flush(&mut b, &mut next, &mut moved, false)?;
            }
        }
        b.seal();
        flush(&mut b, &mut next, &mut moved, true)?;
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
