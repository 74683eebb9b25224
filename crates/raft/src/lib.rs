//! One region's Raft group: the openraft type configuration, the durable log store and state
//! machine over redb, and the network adapter over a pluggable peer transport.
//!
//! This is the only crate that names openraft's types in its public API besides the node
//! composition root, so a move to openraft 0.10 stays contained here.
//!
//! It deliberately knows nothing of HTTP, sockets or policy: RPCs leave through the
//! [`network::PeerRpc`] seam, and the state machine applies commands whose meaning the node
//! layer has already checked.

// openraft's StorageError is large, and its storage traits return it; our constructors return
// the same type so errors pass through unchanged.
#![allow(clippy::result_large_err)]

pub mod command;
pub mod conflicts;
pub mod log_store;
pub mod merge;
pub mod network;
pub mod rt;
pub mod state_machine;
pub mod wal;

use std::io::Cursor;

pub use command::{Command, CommandResult, Condition, StoredObject};
pub use log_store::LogStore;
pub use state_machine::{StateMachineReader, StateMachineStore};
/// The error of a read through a [`StateMachineReader`].
pub type StorageReadError = redb::Error;

openraft::declare_raft_types!(
    /// Meridian's Raft types: one group per region, node ids from the topology.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = crate::rt::Runtime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type Vote = openraft::Vote<u64>;
pub type StorageError = openraft::StorageError<u64>;
pub type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, openraft::BasicNode>;

/// Leading byte of every record this crate writes to disk; bump it and add a migration step
/// when a stored format changes.
pub const FORMAT_VERSION: u8 = 1;

/// Encode a value with the leading format byte.
pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    encode_sized(value, 64)
}

/// [`encode`] into a buffer made for about `bytes` bytes, so a large record is written
/// without growing its buffer step by step.
pub(crate) fn encode_sized<T: serde::Serialize>(value: &T, bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + bytes);
    out.push(FORMAT_VERSION);
    // postcard's serializer only fails on types it cannot represent, which ours never are.
    postcard::to_extend(value, out).expect("postcard encodes our own types")
}

/// Decode a record written by [`encode`], refusing unknown format versions.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| DecodeError::Corrupt(e.to_string())),
        Some((&v, _)) => Err(DecodeError::UnknownFormat(v)),
        None => Err(DecodeError::Corrupt("empty record".into())),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("record has format version {0}, which this build does not know")]
    UnknownFormat(u8),
    #[error("record is corrupt: {0}")]
    Corrupt(String),
}
