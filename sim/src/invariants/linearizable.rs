//! Per-key linearizability of everything the clients saw, checked on the whole history at
//! the end of the run (writes, linearizable reads, and the final reads after the heal).

use meridian_testkit::{check, CheckStats, History};

use super::Violation;

pub fn check_history(history: &History) -> Result<CheckStats, Violation> {
    check(history).map_err(|e| Violation { invariant: "per-key linearizability".into(), detail: e.to_string() })
}
