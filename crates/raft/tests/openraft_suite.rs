//! Openraft's own storage conformance suite, run against our redb log store and state
//! machine. Every storage implementation must pass it.

use meridian_core::RegionId;
use meridian_raft::{LogStore, StateMachineStore, StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RedbBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("create temp dir");
        let log = LogStore::open(&dir.path().join("log.redb"))?;
        let sm = StateMachineStore::open(dir.path(), RegionId::new("test").unwrap())?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(RedbBuilder).expect("openraft storage suite");
}
