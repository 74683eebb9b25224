//! A simulated disk under redb's pluggable storage backend (the state machine) and the Raft
//! log's file seam.
//!
//! Every write lands in memory at once; what was written since the last `sync_data` is also
//! kept in an undo log. A crash plays the undo log backwards, so the disk holds exactly what
//! was synced: every unsynced write is lost, as after a power cut. While the node is down the
//! disk refuses all I/O, so nothing the dropped process still does can reach it.
//!
//! [`Disk::lying`] makes a disk that acknowledges `sync_data` without making anything durable,
//! so a crash loses everything since the node started. Tests use it to prove the invariants
//! catch a storage layer that loses acknowledged writes.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// Most bytes one simulated file may hold; a runaway write fails instead of exhausting memory.
pub const DISK_BYTES_MAX: u64 = 1 << 30;

#[derive(Debug)]
enum Undo {
    /// `old` was at `offset` before a write.
    Bytes { offset: usize, old: Vec<u8> },
    /// The file was `len` bytes long, and `tail` held its bytes from the new length on.
    Len { len: usize, tail: Vec<u8> },
}

#[derive(Debug, Default)]
struct State {
    data: Vec<u8>,
    undo: Vec<Undo>,
    down: bool,
    lying: bool,
    syncs: u64,
}

/// One simulated file. Clones share it: the harness keeps one handle across a node's crashes
/// and hands redb a [`Backend`] over the same state at every start.
#[derive(Debug, Clone, Default)]
pub struct Disk(Arc<Mutex<State>>);

/// What a crash did to a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashLoss {
    /// Writes and resizes undone.
    pub operations: usize,
}

impl Disk {
    pub fn new() -> Disk {
        Disk::default()
    }

    /// A disk whose `sync_data` makes nothing durable (a broken storage layer, for tests).
    pub fn lying() -> Disk {
        let d = Disk::default();
        d.state().lying = true;
        d
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The simulation is single-threaded; a poisoned lock means a panic already failed it.
        self.0.lock().expect("disk lock")
    }

    /// Power cut: undo every write since the last sync, then refuse I/O until [`Disk::power_on`].
    pub fn crash(&self) -> CrashLoss {
        let mut s = self.state();
        let operations = s.undo.len();
        while let Some(u) = s.undo.pop() {
            match u {
                Undo::Bytes { offset, old } => s.data[offset..offset + old.len()].copy_from_slice(&old),
                Undo::Len { len, tail } => {
                    // Shrunk: the bytes cut off come back; grown: the growth goes.
                    let cut = s.data.len();
                    s.data.resize(len, 0);
                    if !tail.is_empty() {
                        s.data[cut..cut + tail.len()].copy_from_slice(&tail);
                    }
                }
            }
        }
        s.down = true;
        CrashLoss { operations }
    }

    pub fn power_on(&self) {
        self.state().down = false;
    }

    /// Syncs so far (for the coverage report).
    pub fn syncs(&self) -> u64 {
        self.state().syncs
    }

    pub fn len(&self) -> u64 {
        self.state().data.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True if the disk's bytes (synced or not, live or freed) contain `needle` anywhere.
    pub fn contains(&self, needle: &[u8]) -> bool {
        crate::world::find(&self.state().data, needle).is_some()
    }

    /// A backend for redb over this disk.
    pub fn backend(&self) -> Backend {
        Backend(self.clone())
    }
}

/// The Raft log's view of a [`Disk`]: the same bytes, crash and refusals as redb's.
impl meridian_raft::wal::LogFile for Backend {
    fn len(&self) -> io::Result<u64> {
        redb::StorageBackend::len(self)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        redb::StorageBackend::read(self, offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        redb::StorageBackend::write(self, offset, data)
    }

    fn sync(&self) -> io::Result<()> {
        redb::StorageBackend::sync_data(self)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        redb::StorageBackend::set_len(self, len)
    }
}

fn down() -> io::Error {
    io::Error::other("the simulated node is down")
}

/// redb's view of a [`Disk`].
#[derive(Debug)]
pub struct Backend(Disk);

impl redb::StorageBackend for Backend {
    fn len(&self) -> Result<u64, io::Error> {
        let s = self.0.state();
        if s.down {
            return Err(down());
        }
        Ok(s.data.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let s = self.0.state();
        if s.down {
            return Err(down());
        }
        let start = offset as usize;
        let end = start.checked_add(out.len()).filter(|e| *e <= s.data.len()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::UnexpectedEof, format!("read past the end at {offset}+{}", out.len()))
        })?;
        out.copy_from_slice(&s.data[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        if len > DISK_BYTES_MAX {
            return Err(io::Error::other(format!("simulated file of {len} bytes exceeds {DISK_BYTES_MAX}")));
        }
        let mut s = self.0.state();
        if s.down {
            return Err(down());
        }
        let (old, new) = (s.data.len(), len as usize);
        let tail = if new < old { s.data[new..].to_vec() } else { Vec::new() };
        s.undo.push(Undo::Len { len: old, tail });
        s.data.resize(new, 0);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut s = self.0.state();
        if s.down {
            return Err(down());
        }
        if !s.lying {
            s.undo.clear();
        }
        s.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let end = offset.checked_add(data.len() as u64).filter(|e| *e <= DISK_BYTES_MAX).ok_or_else(|| {
            io::Error::other(format!("simulated write at {offset}+{} exceeds {DISK_BYTES_MAX}", data.len()))
        })?;
        let mut s = self.0.state();
        if s.down {
            return Err(down());
        }
        let (start, end) = (offset as usize, end as usize);
        if end > s.data.len() {
            let len = s.data.len();
            s.undo.push(Undo::Len { len, tail: Vec::new() });
            s.data.resize(end, 0);
        }
        let old = s.data[start..end].to_vec();
        s.undo.push(Undo::Bytes { offset: start, old });
        s.data[start..end].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, ReadableTable, StorageBackend};

    fn read_all(b: &Backend) -> Vec<u8> {
        let mut out = vec![0; b.len().unwrap() as usize];
        b.read(0, &mut out).unwrap();
        out
    }

    #[test]
    fn a_crash_keeps_exactly_what_was_synced() {
        let disk = Disk::new();
        let b = disk.backend();
        b.write(0, b"hello").unwrap();
        b.sync_data().unwrap();
        b.write(2, b"LLO world").unwrap();
        b.set_len(3).unwrap();
        b.write(10, b"x").unwrap();
        assert_eq!(disk.crash(), CrashLoss { operations: 5 });
        assert!(b.read(0, &mut [0; 1]).is_err(), "a crashed disk refuses reads");
        assert!(b.write(0, b"z").is_err(), "and writes");
        disk.power_on();
        assert_eq!(read_all(&b), b"hello");
    }

    #[test]
    fn a_lying_disk_loses_synced_writes_too() {
        let disk = Disk::lying();
        let b = disk.backend();
        b.write(0, b"acknowledged").unwrap();
        b.sync_data().unwrap();
        disk.crash();
        disk.power_on();
        assert!(disk.is_empty());
    }

    const TABLE: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("t");

    /// Insert `key` in one commit of the given durability.
    fn insert(db: &redb::Database, key: u64, durability: redb::Durability) {
        let mut txn = db.begin_write().unwrap();
        txn.set_durability(durability).unwrap();
        txn.open_table(TABLE).unwrap().insert(key, key).unwrap();
        txn.commit().unwrap();
    }

    /// Crash the disk under `db`, start again and open the database anew; the keys present.
    fn crash_and_reopen(disk: &Disk, db: redb::Database) -> Vec<u64> {
        disk.crash();
        drop(db);
        disk.power_on();
        let db = redb::Database::builder().create_with_backend(disk.backend()).unwrap();
        let r = db.begin_read().unwrap();
        let t = r.open_table(TABLE).unwrap();
        t.iter().unwrap().map(|e| e.unwrap().0.value()).collect()
    }

    #[test]
    fn an_empty_durable_commit_makes_earlier_commits_durable() {
        let disk = Disk::new();
        let db = redb::Database::builder().create_with_backend(disk.backend()).unwrap();
        insert(&db, 1, redb::Durability::None);
        db.begin_write().unwrap().commit().unwrap();
        assert_eq!(crash_and_reopen(&disk, db), vec![1]);
    }

    #[test]
    fn redb_reopens_at_its_last_durable_commit() {
        let disk = Disk::new();
        let db = redb::Database::builder().create_with_backend(disk.backend()).unwrap();
        insert(&db, 1, redb::Durability::Immediate);
        insert(&db, 2, redb::Durability::None);
        assert_eq!(crash_and_reopen(&disk, db), vec![1], "the unsynced commit is gone");
    }
}
