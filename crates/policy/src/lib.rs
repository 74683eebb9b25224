//! Meridian's policy engine: policy text → validated, content-addressed [`Policy`] → a
//! [`Placement`] per (dataset, key).
//!
//! Pure and deterministic: no I/O, no clock, no randomness. Storing versions, the active pointer
//! and the HTTP/CLI surface live in `node`, `server` and `cli`; replication, routing and
//! remediation consume placements and never parse policy (docs/design.md#per-dataset-rules).
//!
//! The document language, its defaults and every rule code are in docs/policy.md.

mod decode;
pub mod diagnostic;
pub mod document;
pub mod limits;
pub mod placement;
mod policy;
pub mod rollout;
pub mod source;
pub mod units;
mod validate;

pub use diagnostic::{Diagnostic, Report, Rule};
pub use document::{json_schema, Classification, ConflictRule, Consistency, Kind, Locality, Retention, SyncMode};
pub use placement::{
    evaluate, ObjectAttributes, Placement, PlacementError, QuarantineState, QuarantineTag, Reason, Role,
};
pub use policy::{
    Allowed, DatasetPolicy, MirrorChoice, Policy, PolicyId, Quarantine, Release, RuleSource, Schedule, Sync,
};
pub use rollout::{Mode, Rollout};
pub use source::Format;
