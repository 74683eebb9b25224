//! The conflict log: a durable record of every merge where concurrent versions of a key met,
//! written in the same transaction as the merge, in each region that holds the key (a region
//! that may not hold a key never receives its versions, so it never records its conflicts).
//!
//! Records are numbered by a sequence of their region's state machine, kept oldest first and
//! bounded by count and by age ([`ConflictLimits`]); what the bounds drop is counted as
//! expired. A record's state is not stored: it is read against the key's current copy, so a
//! write that supersedes the versions ends the conflict in every region it reaches.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::{MergeRule, Sibling, StoredObject};

/// Records kept at most by default, per region.
pub const CONFLICT_RECORDS_MAX: u64 = 100_000;
/// How long a record is kept by default: 30 days, in milliseconds of HLC time.
pub const CONFLICT_AGE_MS_MAX: u64 = 30 * 24 * 3600 * 1000;

/// The bounds of a region's conflict log. Every voter of a region must use the same (the
/// cluster configuration sets them): trimming is part of applying the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConflictLimits {
    pub records: u64,
    pub age_ms: u64,
}

impl Default for ConflictLimits {
    fn default() -> Self {
        ConflictLimits { records: CONFLICT_RECORDS_MAX, age_ms: CONFLICT_AGE_MS_MAX }
    }
}

/// One conflict as this region met it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictRecord {
    /// This region's number for it (each region numbers its own records).
    pub id: u64,
    pub dataset: String,
    pub key: String,
    pub rule: MergeRule,
    /// The region whose change met this region's copy.
    pub source: String,
    /// The concurrent versions, with their values (`None`: a delete).
    pub versions: Vec<Sibling>,
    /// What the merge left a read to answer with.
    pub outcome: Sibling,
    /// HLC wall time of the merge, in milliseconds.
    pub at_ms: u64,
}

/// Where a conflict stands, read against the key's current copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConflictState {
    /// Siblings wait for a write that chooses among them.
    Open,
    /// The rule chose (lww) or merged (crdt); a write may still override it.
    Resolved,
    /// A later write superseded the versions.
    Superseded,
}

impl ConflictState {
    pub fn name(self) -> &'static str {
        match self {
            ConflictState::Open => "open",
            ConflictState::Resolved => "resolved",
            ConflictState::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<ConflictState> {
        match s {
            "open" => Some(ConflictState::Open),
            "resolved" => Some(ConflictState::Resolved),
            "superseded" => Some(ConflictState::Superseded),
            _ => None,
        }
    }
}

impl ConflictRecord {
    /// Where this conflict stands given the key's current copy (`None`: the copy is gone).
    pub fn state(&self, current: Option<&StoredObject>) -> ConflictState {
        let Some(current) = current else { return ConflictState::Superseded };
        let kept = self.versions.iter().filter(|s| current.versions().any(|(v, _)| *v == s.version)).count();
        match self.rule {
            MergeRule::Siblings if kept >= 2 => ConflictState::Open,
            MergeRule::Lww if kept == self.versions.len() => ConflictState::Resolved,
            MergeRule::Crdt if current.crdt.is_some() => ConflictState::Resolved,
            _ => ConflictState::Superseded,
        }
    }
}

/// Which records a listing wants: newest first, ids below `before`, at most `limit`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConflictQuery<'a> {
    pub dataset: Option<&'a str>,
    /// Only with `dataset`.
    pub key: Option<&'a str>,
    pub state: Option<ConflictState>,
    pub before: Option<u64>,
    pub limit: usize,
}

/// The conflict log's bookkeeping, in the state machine's `meta` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictLogState {
    /// The id the next record gets.
    pub next_id: u64,
    /// Records held now.
    pub held: u64,
    /// Records dropped by the count or age bound.
    pub expired: u64,
    /// Dataset → rule name → conflicts recorded, ever.
    pub recorded: BTreeMap<String, BTreeMap<String, u64>>,
}
