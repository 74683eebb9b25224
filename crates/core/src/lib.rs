//! Meridian's vocabulary in code: ids, topology, hybrid logical clocks, versions and limits.
//!
//! This crate is pure. It does no I/O, runs no async code and never reads a clock: callers pass
//! wall-clock time in. That keeps every rule here testable by property tests and lets the
//! simulator drive time.

pub mod byte_strings;
pub mod causal;
pub mod crdt;
pub mod hlc;
pub mod ids;
pub mod limits;
pub mod topology;
pub mod version;

pub use causal::{Causality, Dot, VectorParseError, VersionVector};
pub use hlc::{ClockError, Hlc, HlcTimestamp};
pub use ids::{DatasetName, Key, NameError, NodeId, RegionId, ZoneId};
pub use topology::{NodeSpec, Topology, TopologyError};
pub use version::{Version, VersionParseError};
