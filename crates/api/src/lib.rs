//! The public API's vocabulary: request and response bodies, header names, and the stable
//! error codes, shared by the server and every client.
//!
//! It deliberately holds no HTTP machinery and no status mapping: the server owns the one
//! error-to-status table, and clients read the `code` field, never the message text.

pub mod chaos;
pub mod error;
pub mod failover;
pub mod policy;
pub mod types;

pub use chaos::*;
pub use error::{ErrorBody, ErrorCode};
pub use failover::*;
pub use policy::*;
pub use types::*;

/// Header naming the node that served a request: `region/zone/node-ID`.
pub const HEADER_SERVED_BY: &str = "meridian-served-by";
/// Header saying why that node served it (`leader`, `local`, `forwarded-to-leader`,
/// `forwarded-to-home`, `nearest-copy`, `fresh-copy`).
pub const HEADER_ROUTE_REASON: &str = "meridian-route-reason";
/// Header naming the regions a request passed over before the one that served it, each with
/// its cause: `eu-west=down, us-east=unreachable` (absent when none was).
pub const HEADER_ROUTE_SKIPPED: &str = "meridian-route-skipped";
/// A session token: returned by every data answer of a cluster with a session key, sent back
/// with the next request so that a `session` read sees what the client wrote and read before.
pub const HEADER_SESSION: &str = "meridian-session";
/// A key's causal context: returned by a read, sent back with a write to supersede exactly
/// the versions the read saw.
pub const HEADER_CONTEXT: &str = "meridian-context";
