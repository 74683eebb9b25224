//! Openraft's own storage conformance suite, run against our redb log store and state
//! machine, with the production writer thread and with the simulator's inline writer. Every
//! storage implementation must pass it.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use meridian_core::RegionId;
use meridian_raft::{LogStore, StateMachineStore, StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

struct RedbBuilder {
    inline: bool,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RedbBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("create temp dir");
        let log = if self.inline {
            let db = redb::Database::create(dir.path().join("log.redb")).expect("create the log file");
            LogStore::with_database_inline(db, Arc::new(AtomicU64::new(u64::MAX)))?
        } else {
            LogStore::open(&dir.path().join("log.redb"))?
        };
        let sm = StateMachineStore::open(dir.path(), RegionId::new("test").unwrap())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(RedbBuilder { inline: false }).expect("openraft storage suite");
}

#[test]
fn openraft_storage_suite_with_the_inline_writer() {
    Suite::test_all(RedbBuilder { inline: true }).expect("openraft storage suite, inline writer");
}
