//! The invariants, one per file. Each returns a [`Violation`] naming what broke; the harness
//! records it with the seed that replays it.

pub mod acknowledged_writes;
pub mod applied_entries_agree;
pub mod convergence;
pub mod linearizable;
pub mod local_reads;
pub mod multi_primary;
pub mod replicas_agree;
pub mod residency;

/// A broken invariant: which one, and what was seen.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Violation {
    pub invariant: String,
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}
