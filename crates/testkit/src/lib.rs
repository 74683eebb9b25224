//! Test-only helpers for Meridian's multi-process tests.
//!
//! Today this is one thing: [`linearizability`], a checker that decides whether a recorded history
//! of concurrent reads, writes and deletes against the store could have come from a single atomic
//! register per key. Tests that kill leaders while clients keep going record such a history and
//! hand it to [`check`].
//!
//! This crate deliberately does not start clusters, inject faults, drive clients or read clocks:
//! the tests own all of that and pass in plain data. It is never a dependency of production code.

pub mod linearizability;

pub use linearizability::{check, CheckError, CheckStats, Checker, History, IndexedOp, Op, OpKind, Outcome, Violation};
