//! Limits on policy documents. Each bounds work or memory that a document could otherwise make
//! unbounded; the validator reports a breach as an ordinary problem.

use meridian_core::limits::REGIONS_MAX;

/// The largest policy document accepted, in bytes.
pub const POLICY_BYTES_MAX: usize = 512 * 1024;
/// The deepest nesting a policy needs is five (document, dataset list, dataset, failover,
/// order list) plus the scalar; anything deeper is a mistake or an attack on the parser.
pub const POLICY_DEPTH_MAX: usize = 8;
/// Datasets named in one policy; more belong under `[default]`.
pub const DATASETS_MAX: usize = 1024;
/// Regions in one list (`home`, `allowed`, `mirrors`, `failover.order`).
pub const REGION_LIST_MAX: usize = REGIONS_MAX;
/// Free text (a description), in bytes.
pub const TEXT_BYTES_MAX: usize = 1024;
