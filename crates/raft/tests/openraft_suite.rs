//! Openraft's own storage conformance suite, run against our log store and state
//! machine, with the production writer thread and with the simulator's writer task. Every
//! storage implementation must pass it.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use meridian_core::RegionId;
use meridian_raft::{LogStore, StateMachineStore, StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

struct RedbBuilder {
    task: bool,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RedbBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("create temp dir");
        let log = if self.task {
            let files =
                meridian_raft::wal::FsLogFile::open_pair(&dir.path().join("log.wal")).expect("create the log files");
            LogStore::with_files_in_task(
                files,
                Arc::new(AtomicU64::new(u64::MAX)),
                meridian_raft::wal::WalOptions::default(),
                Arc::new(|| std::time::Duration::ZERO),
            )?
        } else {
            LogStore::open(&dir.path().join("log.wal"))?
        };
        let sm = StateMachineStore::open(dir.path(), RegionId::new("test").unwrap())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(RedbBuilder { task: false }).expect("openraft storage suite");
}

#[test]
fn openraft_storage_suite_with_the_writer_task() {
    Suite::test_all(RedbBuilder { task: true }).expect("openraft storage suite, writer task");
}
