//! Linearizability checking for histories of a key-value store, one key at a time.
//!
//! A multi-process test records what its clients did — for every call, who made it, on which
//! key, when it was invoked, when (and whether) it completed, and what it wrote or read — into a
//! [`History`], then calls [`check`]. The check passes when there is a single total order of the
//! operations that (a) respects real time: if one call completed before another was invoked, it
//! comes first; and (b) is a legal run of an atomic register per key that starts absent. If there
//! is no such order the result is a [`Violation`] that names the key, the longest linearizable
//! prefix the search found and the operation it could not place.
//!
//! # Recording a history
//!
//! * Take `invoke` just before the request is sent and `complete` just after the response
//!   arrives, from one monotonic clock that every client shares (for example nanoseconds since
//!   the test started, from an `Instant` in the test process). Equal timestamps count as
//!   overlapping, so coarse clocks make the check weaker, never wrong.
//! * [`Outcome::Ok`]: the store acknowledged the write, or the read returned a value or "absent".
//! * [`Outcome::Failed`]: the store guarantees the write did not and never will take effect (for
//!   example it was rejected before it was proposed to Raft). Failed operations are ignored.
//!   Recording `Failed` for a write that may have been applied produces false violations.
//! * [`Outcome::Unknown`]: anything else — timeouts, dropped connections, a leader that stepped
//!   down after the proposal. An unknown write may take effect at any moment after its
//!   invocation, even after the client gave up, or never; its `complete` time is not used. An
//!   unknown read tells us nothing and is ignored.
//! * Write a distinct value every time (client id and a counter, say). Repeated values are
//!   checked correctly too, but every repetition gives the search more orders to consider.
//!
//! # How it checks
//!
//! Linearizability is compositional (Herlihy & Wing): a store of independent registers is
//! linearizable iff the sub-history of every key is. Each key is checked on its own with the
//! Wing & Gong search as improved by Lowe: calls and returns in one time-ordered linked list; a
//! depth-first search that linearizes a pending call whose effect is legal in the current
//! register state, and backtracks when it reaches the return of a call it has not linearized;
//! and a cache of the (set of linearized operations, register value) configurations already
//! explored, so that none is expanded twice.
//!
//! An unknown write gets its return at +infinity, so it never forces backtracking, and the
//! search succeeds once every operation with a known outcome is placed (the unknown writes left
//! are taken to happen later, or never). Unknown writes whose value no read observed are dropped
//! up front: nothing would change if they happened last.
//!
//! On top of that, a few rules keep the search close to linear on typical histories: a read of
//! the value the register holds is taken at once; the register does not move away from a value
//! that a pending read still needs and nothing can write again in time; an unknown write is only
//! placed right before a read of its value; and a write that no read can have seen is only
//! placed right before another write. Each rule discards only branches that cannot succeed or
//! that have an equivalent branch kept; the reasoning is written down on the search, and the
//! tests compare the result with a brute-force search on many small random histories.
//!
//! The search is still exponential in the worst case, so it is bounded: once one key has
//! explored [`Checker::DEFAULT_MAX_STATES_PER_KEY`] states (configurable), checking stops with
//! [`CheckError::SearchLimitExceeded`]. That is an error, never a pass.
//!
//! # What it deliberately does not do
//!
//! * Only plain reads, writes and deletes on single keys. There are no multi-key operations,
//!   scans, transactions, or conditional writes (`If-Match`, compare-and-set), and no versions.
//! * Only linearizability. It says nothing about weaker guarantees (session guarantees,
//!   cross-region convergence), so only feed it operations the store promises to be
//!   linearizable.
//! * It records nothing and reads no clock; timestamps are whatever the caller measured.
//! * A violation report is the longest linearizable prefix found plus the operation that could
//!   not be placed after it, not a minimal counterexample.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use serde::{Deserialize, Serialize};

/// What a call asked the store to do.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpKind {
    /// Set the key to `value`; `None` deletes it.
    Write { value: Option<String> },
    /// Read the key. `observed` is what came back, `None` meaning absent. It is only looked at
    /// when the outcome is [`Outcome::Ok`].
    Read { observed: Option<String> },
}

/// How a call ended, from the client's point of view. See the module documentation for which
/// one to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// The call completed: a write was acknowledged, a read returned. Needs a `complete` time.
    Ok,
    /// The call definitely had no effect. The operation is ignored.
    Failed,
    /// Nobody knows. A write may take effect at any time after `invoke`, or never; a read is
    /// ignored.
    Unknown,
}

/// One client call against one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Op {
    /// Who made the call. Only used in reports.
    pub client: u64,
    pub key: String,
    pub kind: OpKind,
    /// When the call was made, on the clock all clients share.
    pub invoke: u64,
    /// When the response arrived, on the same clock. `None` when there was no response.
    pub complete: Option<u64>,
    pub outcome: Outcome,
}

impl Op {
    /// A call of any kind. The outcome is [`Outcome::Ok`] when `complete` is `Some` and
    /// [`Outcome::Unknown`] when it is `None`; use [`Op::with_outcome`] for anything else.
    pub fn new(client: u64, key: impl Into<String>, kind: OpKind, invoke: u64, complete: Option<u64>) -> Op {
        let outcome = if complete.is_some() { Outcome::Ok } else { Outcome::Unknown };
        Op { client, key: key.into(), kind, invoke, complete, outcome }
    }

    /// A write of `value` to `key`; see [`Op::new`] for the outcome.
    pub fn write(
        client: u64,
        key: impl Into<String>,
        value: impl Into<String>,
        invoke: u64,
        complete: Option<u64>,
    ) -> Op {
        Op::new(client, key, OpKind::Write { value: Some(value.into()) }, invoke, complete)
    }

    /// A delete of `key`; see [`Op::new`] for the outcome.
    pub fn delete(client: u64, key: impl Into<String>, invoke: u64, complete: Option<u64>) -> Op {
        Op::new(client, key, OpKind::Write { value: None }, invoke, complete)
    }

    /// A read of `key` that saw `observed` (`None` = absent); see [`Op::new`] for the outcome.
    pub fn read(client: u64, key: impl Into<String>, observed: Option<&str>, invoke: u64, complete: Option<u64>) -> Op {
        let observed = observed.map(str::to_owned);
        Op::new(client, key, OpKind::Read { observed }, invoke, complete)
    }

    /// The same call with another outcome, e.g. `Op::write(..).with_outcome(Outcome::Failed)`.
    pub fn with_outcome(mut self, outcome: Outcome) -> Op {
        self.outcome = outcome;
        self
    }
}

struct Value<'a>(Option<&'a str>);

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v:?}"),
            None => f.write_str("absent"),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {}: ", self.client)?;
        match &self.kind {
            OpKind::Write { value: Some(v) } => write!(f, "write {:?} = {v:?}", self.key)?,
            OpKind::Write { value: None } => write!(f, "delete {:?}", self.key)?,
            OpKind::Read { observed } if self.outcome == Outcome::Ok => {
                write!(f, "read {:?} -> {}", self.key, Value(observed.as_deref()))?
            }
            OpKind::Read { .. } => write!(f, "read {:?}", self.key)?,
        }
        match self.complete {
            Some(c) => write!(f, " [{}, {c}]", self.invoke)?,
            None => write!(f, " [{}, ?]", self.invoke)?,
        }
        match self.outcome {
            Outcome::Ok => Ok(()),
            Outcome::Failed => f.write_str(" (failed)"),
            Outcome::Unknown => f.write_str(" (outcome unknown)"),
        }
    }
}

/// A recorded history: every call any client made, in any order, on any number of keys.
///
/// Build it with [`History::push`], [`History::with`], `collect()`, `extend()` or
/// `From<Vec<Op>>`. Operations are referred to by their position in it (`#index`) in reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct History {
    ops: Vec<Op>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    /// Appends one operation.
    pub fn push(&mut self, op: Op) -> &mut History {
        self.ops.push(op);
        self
    }

    /// Appends one operation, by value, for chaining.
    pub fn with(mut self, op: Op) -> History {
        self.ops.push(op);
        self
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn into_ops(self) -> Vec<Op> {
        self.ops
    }
}

impl From<Vec<Op>> for History {
    fn from(ops: Vec<Op>) -> History {
        History { ops }
    }
}

impl FromIterator<Op> for History {
    fn from_iter<I: IntoIterator<Item = Op>>(iter: I) -> History {
        History { ops: iter.into_iter().collect() }
    }
}

impl Extend<Op> for History {
    fn extend<I: IntoIterator<Item = Op>>(&mut self, iter: I) {
        self.ops.extend(iter);
    }
}

impl IntoIterator for History {
    type Item = Op;
    type IntoIter = std::vec::IntoIter<Op>;
    fn into_iter(self) -> Self::IntoIter {
        self.ops.into_iter()
    }
}

impl<'a> IntoIterator for &'a History {
    type Item = &'a Op;
    type IntoIter = std::slice::Iter<'a, Op>;
    fn into_iter(self) -> Self::IntoIter {
        self.ops.iter()
    }
}

/// An operation together with its position in the [`History`] it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedOp {
    pub index: usize,
    pub op: Op,
}

impl fmt::Display for IndexedOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} {}", self.index, self.op)
    }
}

/// Why one key's history is not linearizable.
///
/// The search found no order of the key's operations that is both consistent with real time and
/// a legal register run. `prefix` is the longest partial order it did find; after it, `stuck`
/// completed before it could be placed, and nothing else that was still pending (`pending`) led
/// anywhere either. When `holding_reads` is not empty, the register could not change at that
/// point: those reads still had to see its value, and no write of that value outside `prefix`
/// was invoked before they completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub key: String,
    /// Operations on this key that the search considered (ignored ones are not counted).
    pub ops_checked: usize,
    /// The longest linearizable prefix found, in linearization order.
    pub prefix: Vec<IndexedOp>,
    /// The register after `prefix`; `None` is absent.
    pub register: Option<String>,
    /// The operation whose completion came before it could be linearized after `prefix`.
    pub stuck: IndexedOp,
    /// Reads outside `prefix` that observed `register` and that no write of that value outside
    /// `prefix` could precede, which kept the register from changing; usually empty.
    pub holding_reads: Vec<IndexedOp>,
    /// Other operations invoked before `stuck` completed that are not in `prefix`.
    pub pending: Vec<IndexedOp>,
}

impl Violation {
    /// How many of the last prefix operations [`fmt::Display`] shows.
    const SHOWN_PREFIX: usize = 10;
    /// How many operations of the other lists [`fmt::Display`] shows.
    const SHOWN: usize = 16;
}

fn write_ops(f: &mut fmt::Formatter<'_>, ops: &[IndexedOp]) -> fmt::Result {
    for op in ops.iter().take(Violation::SHOWN) {
        write!(f, "\n    {op}")?;
    }
    if ops.len() > Violation::SHOWN {
        write!(f, "\n    ... {} more", ops.len() - Violation::SHOWN)?;
    }
    Ok(())
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let register = Value(self.register.as_deref());
        write!(
            f,
            "key {:?} is not linearizable: no order of its {} operations fits both real time and \
             a register",
            self.key, self.ops_checked
        )?;
        write!(
            f,
            "\n  longest linearizable prefix found: {} operations, leaving the register {register}",
            self.prefix.len(),
        )?;
        let skipped = self.prefix.len().saturating_sub(Self::SHOWN_PREFIX);
        if skipped > 0 {
            write!(f, "\n    ... {skipped} earlier operations")?;
        }
        for op in &self.prefix[skipped..] {
            write!(f, "\n    {op}")?;
        }
        write!(f, "\n  after which this operation completed before it could take effect:")?;
        write!(f, "\n    {}", self.stuck)?;
        if !self.holding_reads.is_empty() {
            write!(
                f,
                "\n  because the register had to keep {register} for these reads, and no write of it \
                 that is left could come before them:"
            )?;
            write_ops(f, &self.holding_reads)?;
        }
        if !self.pending.is_empty() {
            write!(f, "\n  while these were pending and led nowhere either:")?;
            write_ops(f, &self.pending)?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// Why [`check`] did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckError {
    /// The history of one key is not linearizable.
    NotLinearizable(Box<Violation>),
    /// The search for one key explored more than `limit` states without an answer. The history
    /// may or may not be linearizable.
    SearchLimitExceeded { key: String, ops: usize, limit: u64 },
    /// An operation cannot be interpreted, e.g. it completes before it was invoked.
    InvalidOp { index: usize, op: Box<Op>, reason: &'static str },
}

impl CheckError {
    /// The violation, if this error is one.
    pub fn violation(&self) -> Option<&Violation> {
        match self {
            CheckError::NotLinearizable(v) => Some(v),
            _ => None,
        }
    }
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::NotLinearizable(v) => v.fmt(f),
            CheckError::SearchLimitExceeded { key, ops, limit } => write!(
                f,
                "gave up on key {key:?} after exploring {limit} states of its {ops} operations \
                 without deciding whether they are linearizable; raise \
                 Checker::max_states_per_key, write distinct values, or record a shorter or less \
                 concurrent history"
            ),
            CheckError::InvalidOp { index, op, reason } => {
                write!(f, "operation #{index} ({op}) is invalid: {reason}")
            }
        }
    }
}

impl std::error::Error for CheckError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CheckError::NotLinearizable(v) => Some(v.as_ref()),
            _ => None,
        }
    }
}

/// What a successful check looked at. Tests should assert `ops_checked` is not trivially small:
/// a history in which every call timed out passes vacuously.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Distinct keys in the history.
    pub keys: usize,
    /// Operations the search considered.
    pub ops_checked: usize,
    /// Operations that constrain nothing and were ignored: failed ones, reads with an unknown
    /// outcome, and writes with an unknown outcome whose value no read observed.
    pub ops_ignored: usize,
    /// Search states explored, summed over keys.
    pub states_explored: u64,
    /// The most search states explored for a single key.
    pub max_states_for_one_key: u64,
}

/// A configured checker. [`check`] is `Checker::new().check(history)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checker {
    max_states_per_key: u64,
}

impl Default for Checker {
    fn default() -> Checker {
        Checker { max_states_per_key: Checker::DEFAULT_MAX_STATES_PER_KEY }
    }
}

/// Checks `history` with the default [`Checker`].
pub fn check(history: &History) -> Result<CheckStats, CheckError> {
    Checker::new().check(history)
}

impl Checker {
    /// Plenty for thousands of operations per key at a concurrency of tens when written values
    /// are distinct (a passing history takes about one state per operation). Each state costs
    /// about a hundred bytes, so a search that reaches the limit holds about half a gigabyte.
    pub const DEFAULT_MAX_STATES_PER_KEY: u64 = 5_000_000;

    pub fn new() -> Checker {
        Checker::default()
    }

    /// The most search states to explore for one key before giving up with
    /// [`CheckError::SearchLimitExceeded`].
    pub fn max_states_per_key(mut self, limit: u64) -> Checker {
        self.max_states_per_key = limit;
        self
    }

    /// Checks every key of `history` in key order and returns the first error.
    pub fn check(&self, history: &History) -> Result<CheckStats, CheckError> {
        let mut classes = Vec::with_capacity(history.len());
        let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (index, op) in history.ops.iter().enumerate() {
            let class =
                classify(op).map_err(|reason| CheckError::InvalidOp { index, op: Box::new(op.clone()), reason })?;
            classes.push(class);
            by_key.entry(&op.key).or_default().push(index);
        }
        let mut stats = CheckStats { keys: by_key.len(), ..CheckStats::default() };
        for (key, indices) in by_key {
            let states = self.check_key(key, &history.ops, &classes, &indices, &mut stats)?;
            stats.states_explored += states;
            stats.max_states_for_one_key = stats.max_states_for_one_key.max(states);
        }
        Ok(stats)
    }

    /// Checks the operations `indices` of `ops`, which all are on `key`, and returns the number
    /// of states explored.
    fn check_key<'h>(
        &self,
        key: &str,
        ops: &'h [Op],
        classes: &[Class],
        indices: &[usize],
        stats: &mut CheckStats,
    ) -> Result<u64, CheckError> {
        // Register values become small integers; 0 is absent.
        let mut ids: HashMap<Option<&'h str>, u32> = HashMap::from([(None, 0)]);
        let mut names: Vec<Option<&'h str>> = vec![None];
        let mut intern = |value: Option<&'h str>| {
            *ids.entry(value).or_insert_with(|| {
                names.push(value);
                names.len() as u32 - 1
            })
        };

        let mut seen = HashSet::new();
        for &i in indices {
            if let (OpKind::Read { observed }, Class::Known { .. }) = (&ops[i].kind, classes[i]) {
                seen.insert(intern(observed.as_deref()));
            }
        }
        let mut search_ops = Vec::new();
        for &i in indices {
            let op = &ops[i];
            let (step, complete) = match (&op.kind, classes[i]) {
                (_, Class::Ignored) => {
                    stats.ops_ignored += 1;
                    continue;
                }
                (OpKind::Read { observed }, Class::Known { complete }) => {
                    (Step::Read(intern(observed.as_deref())), Some(complete))
                }
                (OpKind::Read { .. }, Class::UnknownWrite) => unreachable!("classify"),
                (OpKind::Write { value }, class) => {
                    let id = intern(value.as_deref());
                    match class {
                        Class::Known { complete } => (Step::Write(id), Some(complete)),
                        _ if seen.contains(&id) => (Step::Write(id), None),
                        _ => {
                            stats.ops_ignored += 1;
                            continue;
                        }
                    }
                }
            };
            search_ops.push(SearchOp { index: i, step, invoke: op.invoke, complete });
        }
        stats.ops_checked += search_ops.len();
        // Invocation order keeps the set of linearized operations a dense prefix plus a short
        // tail, which keeps cache keys small.
        search_ops.sort_by_key(|op| (op.invoke, op.index));

        match Search::new(&search_ops, self.max_states_per_key).run() {
            Ok(states) => Ok(states),
            Err(Failure::Limit) => Err(CheckError::SearchLimitExceeded {
                key: key.to_owned(),
                ops: search_ops.len(),
                limit: self.max_states_per_key,
            }),
            Err(Failure::NotLinearizable(best)) => {
                let indexed = |op: u32| {
                    let index = search_ops[op as usize].index;
                    IndexedOp { index, op: ops[index].clone() }
                };
                Err(CheckError::NotLinearizable(Box::new(Violation {
                    key: key.to_owned(),
                    ops_checked: search_ops.len(),
                    prefix: best.prefix.iter().map(|&op| indexed(op)).collect(),
                    register: names[best.register as usize].map(str::to_owned),
                    stuck: indexed(best.stuck),
                    holding_reads: best.holding.iter().map(|&op| indexed(op)).collect(),
                    pending: best.pending.iter().map(|&op| indexed(op)).collect(),
                })))
            }
        }
    }
}

/// How the search treats an operation.
#[derive(Debug, Clone, Copy)]
enum Class {
    /// Failed, or a read with an unknown outcome.
    Ignored,
    /// Took effect at one instant between `invoke` and `complete`.
    Known { complete: u64 },
    /// A write that took effect at one instant after `invoke`, or never.
    UnknownWrite,
}

fn classify(op: &Op) -> Result<Class, &'static str> {
    if op.complete.is_some_and(|c| c < op.invoke) {
        return Err("it completes before it is invoked");
    }
    Ok(match (op.outcome, &op.kind, op.complete) {
        (Outcome::Failed, _, _) | (Outcome::Unknown, OpKind::Read { .. }, _) => Class::Ignored,
        (Outcome::Unknown, OpKind::Write { .. }, _) => Class::UnknownWrite,
        (Outcome::Ok, _, Some(complete)) => Class::Known { complete },
        (Outcome::Ok, _, None) => {
            return Err("its outcome is Ok but it has no completion time (record calls without \
                        a response as Outcome::Unknown)")
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Write(u32),
    Read(u32),
}

impl Step {
    fn value(self) -> u32 {
        match self {
            Step::Write(v) | Step::Read(v) => v,
        }
    }
}

struct SearchOp {
    /// Position in the history.
    index: usize,
    step: Step,
    invoke: u64,
    /// `None` for unknown writes: they may take effect arbitrarily late.
    complete: Option<u64>,
}

enum Failure {
    Limit,
    NotLinearizable(Best),
}

const NIL: u32 = u32::MAX;

/// The WGL search over one key's operations. Operations are numbered by their position in the
/// slice (invocation order), entries by their position in time order, and the list head is
/// entry `2 * ops.len()`.
///
/// Plain WGL tries every pending call in every state. The rules below make it fast on register
/// histories. Each one only drops branches that cannot lead to a linearization, or for which an
/// equivalent branch is kept; the brute-force comparison in the tests checks that.
///
/// 1. A pending read of the value the register holds is linearized at once, without trying
///    anything else: in any linearization from here it can be moved to this point (reads do
///    not change the register, and nothing that must precede it is still pending, or it would
///    not be a candidate).
/// 2. The register does not move away from a value while a pending read of it could no longer
///    be satisfied: when no pending write of the value (other than a dead one, see rule 4) was
///    invoked before that read completed.
/// 3. An unknown write is only linearized immediately before a read that observes its value
///    while the register holds something else. In any linearization, an unknown write not
///    directly followed by such a read can be removed, since nothing observes it. Of several
///    pending unknown writes of the same value only the earliest invoked one is tried: the
///    others can stand in for it later, since nothing bounds an unknown write from above.
/// 4. A write is dead if no read can directly follow it: every read of its value completed
///    before the write was invoked, or was invoked after a write that must come after this one
///    (invoked after it completed) had itself completed. A dead write is directly followed by another write or by nothing, so dead
///    writes are not tried on their own. Whenever a write is linearized, every pending dead
///    write is linearized just before it (moving a candidate dead write earlier, to just before
///    a write, never breaks a linearization); a dead write still pending when its return is
///    reached is linearized there; and dead writes still pending when everything else is
///    linearized go at the end.
struct Search<'a> {
    ops: &'a [SearchOp],
    limit: u64,
    /// Per entry (and the head): the operation, whether it is a return, and list links.
    entry_op: Vec<u32>,
    is_return: Vec<bool>,
    next: Vec<u32>,
    prev: Vec<u32>,
    head: u32,
    /// Per operation: its call and return entries, its bit in `known` or, for an unknown
    /// write, in `unknown`, and whether it is a dead write.
    call_entry: Vec<u32>,
    return_entry: Vec<u32>,
    bit: Vec<u32>,
    dead: Vec<bool>,
    /// Per register value: the unknown writes of that value, in invocation order, and how many
    /// of them are linearized (always the first ones).
    unknown_writes: Vec<Vec<u32>>,
    unknown_used: Vec<usize>,
    /// Per register value, for rule 2: its reads in completion order and its writes that are not
    /// dead in invocation order, each with the position of the first one not linearized.
    reads_of: Vec<Vec<u32>>,
    writes_of: Vec<Vec<u32>>,
    first_read: Vec<usize>,
    first_write: Vec<usize>,
    /// Per operation: its position in `reads_of` or `writes_of`.
    position: Vec<u32>,

    cache: HashSet<CacheKey, BuildHasherDefault<FxHasher>>,
    states: u64,
    /// The linearized operations: per operation, as two sets (unknown writes may stay pending
    /// forever, which would make the keys of a single set long) and in order.
    done: Vec<bool>,
    known: LinSet,
    unknown: LinSet,
    order: Vec<u32>,
    frames: Vec<Frame>,
    register: u32,
    /// Operations with a known outcome that are not dead writes and are not linearized yet;
    /// the search succeeds at zero.
    remaining_needed: usize,
    /// The first return entry in the list, if known since the list last changed.
    first_return: Option<u32>,
    best: Best,
}

/// One step of the search: a call linearized, possibly after an unknown write (rule 3) and dead
/// writes (rule 4).
struct Frame {
    call: u32,
    /// The register before the step.
    register: u32,
    /// How many operations the step linearized (the last ones in `order`).
    ops: usize,
    /// The unknown write linearized before `call`, if any.
    partner: Option<u32>,
    /// There are no alternatives to try when the step is undone.
    forced: bool,
}

/// Where the search goes on after a step or a backtrack.
enum Resume {
    /// In a state not looked at yet.
    Fresh,
    /// Scanning the list of the current state from this entry on.
    Scan(u32),
}

/// Which writes are dead (see rule 4 of [`Search`]).
fn dead_writes(ops: &[SearchOp], values: usize) -> Vec<bool> {
    // Per known write, the earliest completion of a known write invoked after it completed:
    // a read invoked later than that cannot directly follow it.
    let mut writes: Vec<(u64, u64)> = ops
        .iter()
        .filter_map(|op| match (op.step, op.complete) {
            (Step::Write(_), Some(complete)) => Some((op.invoke, complete)),
            _ => None,
        })
        .collect();
    writes.sort_unstable();
    let mut earliest_completion = vec![u64::MAX; writes.len() + 1];
    for i in (0..writes.len()).rev() {
        earliest_completion[i] = earliest_completion[i + 1].min(writes[i].1);
    }
    // Per value, its reads by invocation, with the latest completion so far.
    let mut reads: Vec<Vec<(u64, u64)>> = vec![Vec::new(); values];
    for op in ops {
        if let (Step::Read(v), Some(complete)) = (op.step, op.complete) {
            reads[v as usize].push((op.invoke, complete));
        }
    }
    for reads in &mut reads {
        reads.sort_unstable();
        for i in 1..reads.len() {
            reads[i].1 = reads[i].1.max(reads[i - 1].1);
        }
    }
    ops.iter()
        .map(|op| {
            let (Step::Write(v), Some(complete)) = (op.step, op.complete) else {
                return false;
            };
            let next = earliest_completion[writes.partition_point(|w| w.0 <= complete)];
            let reads = &reads[v as usize];
            // The reads invoked no later than `next`; whether any completed after `op.invoke`.
            match reads.partition_point(|r| r.0 <= next) {
                0 => true,
                n => reads[n - 1].1 < op.invoke,
            }
        })
        .collect()
}

impl<'a> Search<'a> {
    fn new(ops: &'a [SearchOp], limit: u64) -> Search<'a> {
        let n = ops.len();
        assert!(n < (u32::MAX / 2) as usize, "too many operations for one key");
        let mut entries: Vec<(u64, bool, u32)> = Vec::with_capacity(2 * n);
        for (i, op) in ops.iter().enumerate() {
            entries.push((op.invoke, false, i as u32));
            entries.push((op.complete.unwrap_or(u64::MAX), true, i as u32));
        }
        // At equal times calls come before returns, so touching intervals overlap. Ties between
        // calls go by operation number, so call entries are in operation order.
        entries.sort_unstable();
        let head = 2 * n as u32;
        let mut call_entry = vec![NIL; n];
        let mut return_entry = vec![NIL; n];
        for (e, &(_, is_return, op)) in entries.iter().enumerate() {
            let slot = if is_return { &mut return_entry } else { &mut call_entry };
            slot[op as usize] = e as u32;
        }
        let values = ops.iter().map(|op| op.step.value() as usize + 1).max().unwrap_or(1);
        let dead = dead_writes(ops, values);
        let mut unknown_writes = vec![Vec::new(); values];
        let mut reads_of = vec![Vec::new(); values];
        let mut writes_of = vec![Vec::new(); values];
        let (mut known_bits, mut unknown_bits) = (0, 0);
        let mut bit = Vec::with_capacity(n);
        for (i, op) in ops.iter().enumerate() {
            let value = op.step.value() as usize;
            match op.step {
                Step::Read(_) => reads_of[value].push(i as u32),
                Step::Write(_) if !dead[i] => writes_of[value].push(i as u32),
                Step::Write(_) => {}
            }
            let counter = if op.complete.is_some() {
                &mut known_bits
            } else {
                unknown_writes[value].push(i as u32);
                &mut unknown_bits
            };
            bit.push(*counter);
            *counter += 1;
        }
        // Reads in completion order; writes are in operation (so invocation) order already.
        for list in &mut reads_of {
            list.sort_by_key(|&op| (ops[op as usize].complete, op));
        }
        let mut position = vec![0; n];
        for list in reads_of.iter().chain(&writes_of) {
            for (p, &op) in list.iter().enumerate() {
                position[op as usize] = p as u32;
            }
        }
        Search {
            ops,
            limit,
            entry_op: entries.iter().map(|e| e.2).chain([NIL]).collect(),
            is_return: entries.iter().map(|e| e.1).chain([false]).collect(),
            next: (1..=head).map(|i| if i == head { NIL } else { i }).chain([if n == 0 { NIL } else { 0 }]).collect(),
            prev: (0..head).map(|i| if i == 0 { head } else { i - 1 }).chain([NIL]).collect(),
            head,
            call_entry,
            return_entry,
            bit,
            remaining_needed: (0..n).filter(|&i| ops[i].complete.is_some() && !dead[i]).count(),
            dead,
            unknown_used: vec![0; values],
            unknown_writes,
            reads_of,
            writes_of,
            first_read: vec![0; values],
            first_write: vec![0; values],
            position,
            cache: HashSet::default(),
            states: 0,
            done: vec![false; n],
            known: LinSet::new(known_bits as usize),
            unknown: LinSet::new(unknown_bits as usize),
            order: Vec::new(),
            frames: Vec::new(),
            register: 0,
            first_return: None,
            best: Best::default(),
        }
    }

    /// Returns the number of states explored.
    fn run(mut self) -> Result<u64, Failure> {
        let mut resume = Resume::Fresh;
        loop {
            if self.remaining_needed == 0 {
                return Ok(self.states);
            }
            let mut entry = match resume {
                Resume::Fresh => match self.read_of_register() {
                    Some(read) => {
                        resume = if self.try_step(read, None, true)? {
                            Resume::Fresh
                        } else {
                            // Explored before, and this state is no better.
                            self.backtrack()?
                        };
                        continue;
                    }
                    None => self.next[self.head as usize],
                },
                Resume::Scan(entry) => entry,
            };
            resume = loop {
                // The last entry in the list is always a return, and reaching one ends the scan.
                debug_assert_ne!(entry, NIL);
                let op = self.entry_op[entry as usize];
                let search_op = &self.ops[op as usize];
                if self.is_return[entry as usize] {
                    // Rule 4: a dead write that is due goes now.
                    if self.dead[op as usize]
                        && self.may_hold(search_op.step.value())
                        && self.try_step(self.call_entry[op as usize], None, true)?
                    {
                        break Resume::Fresh;
                    }
                    // The operation completed and nothing pending can be linearized before it.
                    if self.best.improved_by(self.order.len()) {
                        self.record_stuck(entry);
                    }
                    break self.backtrack()?;
                }
                let pushed = match search_op.step {
                    // Rules 3 and 4.
                    Step::Write(_) if search_op.complete.is_none() || self.dead[op as usize] => false,
                    Step::Write(v) => self.may_hold(v) && self.try_step(entry, None, false)?,
                    // Taken by rule 1 already if there were one.
                    Step::Read(v) if v == self.register => false,
                    Step::Read(v) => self.may_hold(v) && self.try_with_unknown_write(entry)?,
                };
                if pushed {
                    break Resume::Fresh;
                }
                entry = self.next[entry as usize];
            };
        }
    }

    /// The first return entry in the list.
    fn first_return(&mut self) -> u32 {
        if let Some(e) = self.first_return {
            return e;
        }
        let mut e = self.next[self.head as usize];
        while !self.is_return[e as usize] {
            e = self.next[e as usize];
        }
        self.first_return = Some(e);
        e
    }

    /// Rule 1: a candidate read of the register's value, if there is one.
    fn read_of_register(&mut self) -> Option<u32> {
        let mut e = self.next[self.head as usize];
        while !self.is_return[e as usize] {
            if self.ops[self.entry_op[e as usize] as usize].step == Step::Read(self.register) {
                return Some(e);
            }
            e = self.next[e as usize];
        }
        self.first_return = Some(e);
        None
    }

    /// Rule 2: whether the register may come to hold `value` now.
    fn may_hold(&self, value: u32) -> bool {
        value == self.register || self.unsatisfiable_reads().is_empty()
    }

    /// Rule 2: the pending reads of the register's value that no pending write of it can
    /// precede. If there are any, the register must not change.
    fn unsatisfiable_reads(&self) -> &[u32] {
        let v = self.register as usize;
        let reads = &self.reads_of[v][self.first_read[v]..];
        let Some(&first) = reads.first() else {
            return &[];
        };
        let Some(&write) = self.writes_of[v].get(self.first_write[v]) else {
            return reads;
        };
        let invoked = self.ops[write as usize].invoke;
        if invoked <= self.ops[first as usize].complete.unwrap_or(u64::MAX) {
            return &[];
        }
        let n = reads.partition_point(|&r| self.ops[r as usize].complete.is_some_and(|c| c < invoked));
        &reads[..n]
    }

    /// Rule 3: tries to linearize the read at `call` right after the earliest pending unknown
    /// write of the value it observed.
    fn try_with_unknown_write(&mut self, call: u32) -> Result<bool, Failure> {
        let value = self.ops[self.entry_op[call as usize] as usize].step.value() as usize;
        let Some(&write) = self.unknown_writes[value].get(self.unknown_used[value]) else {
            return Ok(false);
        };
        // Only writes invoked before the first pending return are candidates.
        Ok(self.call_entry[write as usize] < self.first_return() && self.try_step(call, Some(write), false)?)
    }

    /// Linearizes the call at `call`, after the unknown write `partner` if given and, if the step
    /// writes, after all pending dead writes, unless the resulting configuration was explored
    /// before. Returns whether it did. A `forced` step has no alternatives.
    fn try_step(&mut self, call: u32, partner: Option<u32>, forced: bool) -> Result<bool, Failure> {
        let op = self.entry_op[call as usize];
        let value = self.ops[op as usize].step.value();
        let mut steps = Vec::new();
        if partner.is_some() || matches!(self.ops[op as usize].step, Step::Write(_)) {
            let first_return = self.first_return();
            let mut e = self.next[self.head as usize];
            while e != first_return {
                let dead = self.entry_op[e as usize];
                if self.dead[dead as usize] && dead != op {
                    steps.push(dead);
                }
                e = self.next[e as usize];
            }
        }
        steps.extend(partner);
        steps.push(op);
        for &op in &steps {
            self.mark(op, true);
        }
        let key = CacheKey::new(value, &self.known, &self.unknown);
        if !self.cache.insert(key) {
            for &op in &steps {
                self.mark(op, false);
            }
            return Ok(false);
        }
        self.states += 1;
        if self.states > self.limit {
            return Err(Failure::Limit);
        }
        self.frames.push(Frame { call, register: self.register, ops: steps.len(), partner, forced });
        for &op in &steps {
            self.lift(op);
        }
        if partner.is_some() {
            self.unknown_used[value as usize] += 1;
        }
        self.register = value;
        Ok(true)
    }

    /// Undoes steps up to the last one that has alternatives; returns where to go on from.
    fn backtrack(&mut self) -> Result<Resume, Failure> {
        loop {
            let Some(frame) = self.frames.pop() else {
                return Err(Failure::NotLinearizable(std::mem::take(&mut self.best)));
            };
            for _ in 0..frame.ops {
                let op = *self.order.last().expect("a step's operations are in `order`");
                self.unlift(op);
                self.mark(op, false);
            }
            if let Some(write) = frame.partner {
                self.unknown_used[self.ops[write as usize].step.value() as usize] -= 1;
            }
            self.register = frame.register;
            if !frame.forced {
                return Ok(Resume::Scan(self.next[frame.call as usize]));
            }
        }
    }

    /// Adds `op` to or removes it from the sets of linearized operations.
    fn mark(&mut self, op: u32, linearized: bool) {
        let bit = self.bit[op as usize];
        let set = if self.ops[op as usize].complete.is_some() { &mut self.known } else { &mut self.unknown };
        if linearized {
            set.insert(bit);
        } else {
            set.remove(bit);
        }
    }

    /// The list of `op`'s value that rule 2 tracks it in, and the position of the first
    /// operation in it not linearized.
    fn rule_2_list(&mut self, op: u32) -> Option<(&[u32], &mut usize)> {
        let v = self.ops[op as usize].step.value() as usize;
        match self.ops[op as usize].step {
            Step::Read(_) => Some((&self.reads_of[v], &mut self.first_read[v])),
            Step::Write(_) if !self.dead[op as usize] => Some((&self.writes_of[v], &mut self.first_write[v])),
            Step::Write(_) => None,
        }
    }

    /// Removes an operation's call and return from the list and appends it to `order`.
    fn lift(&mut self, op: u32) {
        self.unlink(self.call_entry[op as usize]);
        self.unlink(self.return_entry[op as usize]);
        self.first_return = None;
        self.order.push(op);
        self.best.pushed(self.order.len(), op);
        self.done[op as usize] = true;
        if self.ops[op as usize].complete.is_some() && !self.dead[op as usize] {
            self.remaining_needed -= 1;
        }
        let done = std::mem::take(&mut self.done);
        if let Some((list, first)) = self.rule_2_list(op) {
            while list.get(*first).is_some_and(|&o| done[o as usize]) {
                *first += 1;
            }
        }
        self.done = done;
    }

    /// Undoes the matching [`Search::lift`]; lifts are undone in reverse order.
    fn unlift(&mut self, op: u32) {
        self.relink(self.return_entry[op as usize]);
        self.relink(self.call_entry[op as usize]);
        self.first_return = None;
        debug_assert_eq!(self.order.last(), Some(&op));
        self.order.pop();
        self.best.popped(self.order.len());
        self.done[op as usize] = false;
        if self.ops[op as usize].complete.is_some() && !self.dead[op as usize] {
            self.remaining_needed += 1;
        }
        let position = self.position[op as usize] as usize;
        if let Some((_, first)) = self.rule_2_list(op) {
            *first = (*first).min(position);
        }
    }

    fn unlink(&mut self, e: u32) {
        let (p, n) = (self.prev[e as usize], self.next[e as usize]);
        self.next[p as usize] = n;
        if n != NIL {
            self.prev[n as usize] = p;
        }
    }

    fn relink(&mut self, e: u32) {
        let (p, n) = (self.prev[e as usize], self.next[e as usize]);
        self.next[p as usize] = e;
        if n != NIL {
            self.prev[n as usize] = e;
        }
    }

    /// Remembers the current prefix and the return entry `ret` it is stuck at.
    fn record_stuck(&mut self, ret: u32) {
        let stuck = self.entry_op[ret as usize];
        let mut pending = Vec::new();
        let mut e = self.next[self.head as usize];
        while e != ret {
            let op = self.entry_op[e as usize];
            if !self.is_return[e as usize] && op != stuck {
                pending.push(op);
            }
            e = self.next[e as usize];
        }
        let holding = self.unsatisfiable_reads().iter().copied().filter(|&op| !self.done[op as usize]).collect();
        let best = &mut self.best;
        best.prefix.truncate(best.common);
        best.prefix.extend_from_slice(&self.order[best.common..]);
        best.common = self.order.len();
        best.register = self.register;
        best.stuck = stuck;
        best.pending = pending;
        best.holding = holding;
        best.recorded = true;
    }
}

/// The deepest point the search got stuck at, for the report.
#[derive(Default)]
struct Best {
    /// Operations in linearization order.
    prefix: Vec<u32>,
    /// `prefix[..common]` equals the search's current order; it saves copying the whole order
    /// on every improvement.
    common: usize,
    register: u32,
    stuck: u32,
    pending: Vec<u32>,
    /// The reads that kept the register from changing (rule 2).
    holding: Vec<u32>,
    recorded: bool,
}

impl Best {
    fn pushed(&mut self, depth: usize, op: u32) {
        if self.common == depth - 1 && self.prefix.get(depth - 1) == Some(&op) {
            self.common = depth;
        }
    }

    fn popped(&mut self, depth: usize) {
        self.common = self.common.min(depth);
    }

    fn improved_by(&self, depth: usize) -> bool {
        !self.recorded || depth > self.prefix.len()
    }
}

/// The set of linearized operations, with bookkeeping for compact cache keys: words before
/// `full` are all ones and words from `end` on are all zeros.
struct LinSet {
    words: Vec<u64>,
    full: usize,
    end: usize,
}

impl LinSet {
    fn new(n: usize) -> LinSet {
        LinSet { words: vec![0; n.div_ceil(64)], full: 0, end: 0 }
    }

    fn insert(&mut self, i: u32) {
        let w = i as usize / 64;
        self.words[w] |= 1 << (i % 64);
        self.end = self.end.max(w + 1);
        while self.full < self.words.len() && self.words[self.full] == u64::MAX {
            self.full += 1;
        }
    }

    fn remove(&mut self, i: u32) {
        let w = i as usize / 64;
        self.words[w] &= !(1 << (i % 64));
        self.full = self.full.min(w);
        while self.end > 0 && self.words[self.end - 1] == 0 {
            self.end -= 1;
        }
    }

    /// The words from the first one that is not full to the last one that is not zero.
    fn tail(&self) -> &[u64] {
        if self.end > self.full {
            &self.words[self.full..self.end]
        } else {
            &[]
        }
    }
}

/// A cache entry: the register and the two sets of linearized operations, encoded canonically
/// and compactly (there may be millions).
#[derive(PartialEq, Eq, Hash)]
struct CacheKey {
    /// The register, the `full` of both sets, and the length of the first set's tail.
    head: [u32; 4],
    /// Both tails, one after the other.
    words: Words,
}

/// Inline when there are at most two words; the last word of a tail is not zero, so zero
/// padding is unambiguous.
#[derive(PartialEq, Eq, Hash)]
enum Words {
    Inline([u64; 2]),
    Heap(Box<[u64]>),
}

impl CacheKey {
    fn new(register: u32, known: &LinSet, unknown: &LinSet) -> CacheKey {
        let (a, b) = (known.tail(), unknown.tail());
        let words = if a.len() + b.len() <= 2 {
            let mut inline = [0; 2];
            inline[..a.len()].copy_from_slice(a);
            inline[a.len()..a.len() + b.len()].copy_from_slice(b);
            Words::Inline(inline)
        } else {
            Words::Heap(a.iter().chain(b).copied().collect())
        };
        CacheKey { head: [register, known.full as u32, unknown.full as u32, a.len() as u32], words }
    }
}

/// A fast non-cryptographic hasher (the multiply-rotate scheme of rustc's FxHash with a final
/// avalanche so the low bits that pick buckets depend on every word).
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(i.into());
    }

    fn write_u32(&mut self, i: u32) {
        self.add(i.into());
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        // The MurmurHash3 64-bit finalizer.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const K: &str = "k";

    fn write(client: u64, value: &str, invoke: u64, complete: u64) -> Op {
        Op::write(client, K, value, invoke, Some(complete))
    }

    fn read(client: u64, observed: Option<&str>, invoke: u64, complete: u64) -> Op {
        Op::read(client, K, observed, invoke, Some(complete))
    }

    fn passes(ops: Vec<Op>) -> CheckStats {
        let history = History::from(ops);
        match check(&history) {
            Ok(stats) => stats,
            Err(e) => panic!("expected a linearizable history, got:\n{e}\n{history:#?}"),
        }
    }

    fn violation(ops: Vec<Op>) -> Violation {
        let history = History::from(ops);
        match check(&history) {
            Err(CheckError::NotLinearizable(v)) => *v,
            other => panic!("expected a violation, got {other:?} for\n{history:#?}"),
        }
    }

    /// The operations a report blames: the one that got stuck and the reads that held the
    /// register.
    fn culprits(v: &Violation) -> Vec<usize> {
        [v.stuck.index].into_iter().chain(v.holding_reads.iter().map(|op| op.index)).collect()
    }

    #[test]
    fn sequential_history_passes() {
        let stats = passes(vec![
            read(1, None, 0, 1),
            write(1, "a", 2, 3),
            read(2, Some("a"), 4, 5),
            write(2, "b", 6, 7),
            read(1, Some("b"), 8, 9),
            Op::delete(1, K, 10, Some(11)),
            read(2, None, 12, 13),
        ]);
        assert_eq!(stats.keys, 1);
        assert_eq!(stats.ops_checked, 7);
        assert_eq!(stats.ops_ignored, 0);
        assert_eq!(stats.states_explored, 7);
    }

    #[test]
    fn empty_history_passes_vacuously() {
        assert_eq!(check(&History::new()), Ok(CheckStats::default()));
    }

    #[test]
    fn concurrent_writes_may_be_seen_in_either_order() {
        for (first, second) in [("1", "2"), ("2", "1")] {
            passes(vec![
                write(1, "1", 0, 100),
                write(2, "2", 0, 100),
                read(3, Some(first), 10, 20),
                read(3, Some(second), 30, 40),
                read(4, Some(second), 110, 120),
            ]);
        }
    }

    #[test]
    fn touching_intervals_overlap() {
        // The read may still see the old value.
        passes(vec![write(1, "1", 0, 10), write(1, "2", 20, 30), read(2, Some("1"), 30, 40)]);
        // The second write of "a" may come before the read that completes as it is invoked.
        passes(vec![write(1, "a", 0, 1), write(1, "b", 2, 3), read(2, Some("a"), 5, 10), write(1, "a", 10, 12)]);
        let v =
            violation(vec![write(1, "a", 0, 1), write(1, "b", 2, 3), read(2, Some("a"), 5, 10), write(1, "a", 11, 12)]);
        assert_eq!(culprits(&v), [1, 2]);
    }

    #[test]
    fn delete_then_read_absent() {
        passes(vec![
            write(1, "a", 0, 10),
            Op::delete(1, K, 20, Some(30)),
            read(2, None, 40, 50),
            read(2, None, 25, 26),
            read(3, Some("a"), 21, 22),
        ]);
        let v = violation(vec![write(1, "a", 0, 10), Op::delete(1, K, 20, Some(30)), read(2, Some("a"), 40, 50)]);
        assert_eq!(culprits(&v), [1, 2]);
    }

    #[test]
    fn unknown_write_may_take_effect_late() {
        // "x" timed out at 15, yet takes effect after "b" completed.
        let stats = passes(vec![
            write(1, "a", 0, 5),
            Op::write(2, K, "x", 10, Some(15)).with_outcome(Outcome::Unknown),
            write(1, "b", 20, 30),
            read(3, Some("b"), 32, 35),
            read(3, Some("x"), 40, 50),
            read(4, Some("x"), 60, 70),
        ]);
        assert_eq!(stats.ops_checked, 6);
        passes(vec![write(1, "a", 0, 5), Op::write(2, K, "x", 10, None), read(3, Some("x"), 1_000_000, 1_000_010)]);
        // But never before it was invoked.
        let v = violation(vec![read(3, Some("x"), 0, 5), Op::write(2, K, "x", 10, None)]);
        assert_eq!(v.stuck.index, 0);
    }

    #[test]
    fn unknown_write_may_never_take_effect() {
        let stats = passes(vec![
            read(4, None, 0, 1),
            write(1, "a", 0, 5),
            Op::write(2, K, "x", 10, None),
            Op::delete(2, K, 11, None),
            read(3, Some("a"), 20, 30),
            read(3, Some("a"), 1_000, 1_010),
        ]);
        // "x" is never observed, so it is not even searched; the delete could explain a read of
        // absent, so it is.
        assert_eq!((stats.ops_checked, stats.ops_ignored), (5, 1));
    }

    #[test]
    fn failed_ops_and_unknown_reads_are_ignored() {
        let stats = passes(vec![
            write(1, "a", 0, 5),
            write(2, "z", 10, 20).with_outcome(Outcome::Failed),
            read(3, Some("nonsense"), 10, 20).with_outcome(Outcome::Failed),
            Op::read(3, K, Some("nonsense"), 30, None),
            read(3, Some("a"), 40, 50),
        ]);
        assert_eq!((stats.ops_checked, stats.ops_ignored), (2, 3));
    }

    #[test]
    fn stale_read_after_completed_write_is_rejected() {
        let v = violation(vec![write(1, "1", 0, 10), write(1, "2", 20, 30), read(2, Some("1"), 40, 50)]);
        assert_eq!(v.key, K);
        assert_eq!(v.ops_checked, 3);
        // The search keeps "1" for the read, so the write cannot go.
        assert_eq!(v.prefix.iter().map(|op| op.index).collect::<Vec<_>>(), [0]);
        assert_eq!(v.register.as_deref(), Some("1"));
        assert_eq!(culprits(&v), [1, 2]);
        assert!(v.pending.is_empty());
        let text = v.to_string();
        let expected = [
            r#"key "k" is not linearizable: no order of its 3 operations fits"#,
            r#"longest linearizable prefix found: 1 operations, leaving the register "1""#,
            r#"    #0 client 1: write "k" = "1" [0, 10]"#,
            r#"completed before it could take effect:"#,
            r#"    #1 client 1: write "k" = "2" [20, 30]"#,
            r#"because the register had to keep "1" for these reads"#,
            r#"    #2 client 2: read "k" -> "1" [40, 50]"#,
        ];
        for line in expected {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
    }

    #[test]
    fn read_of_a_value_never_written_is_rejected() {
        let v = violation(vec![
            write(1, "a", 0, 10),
            write(2, "b", 5, 15),
            read(3, Some("c"), 8, 20),
            read(3, Some("b"), 30, 40),
        ]);
        assert_eq!(v.stuck.index, 2);
        // A read of a missing key must see absent, not something else.
        let v = violation(vec![read(1, Some("a"), 0, 10)]);
        assert_eq!(v.prefix, []);
        assert_eq!(v.register, None);
    }

    #[test]
    fn reads_going_back_in_time_are_rejected() {
        // Write 2 completed before the reads.
        let v = violation(vec![
            write(1, "1", 0, 10),
            write(1, "2", 20, 30),
            read(2, Some("2"), 40, 50),
            read(3, Some("1"), 60, 70),
        ]);
        assert_eq!(culprits(&v), [1, 3]);
        // Write 2 still in flight: each read alone is fine, both in this order are not.
        let ops =
            vec![write(1, "1", 0, 10), write(1, "2", 20, 100), read(2, Some("2"), 30, 40), read(3, Some("1"), 50, 60)];
        passes(vec![ops[0].clone(), ops[1].clone(), ops[2].clone()]);
        passes(vec![ops[0].clone(), ops[1].clone(), ops[3].clone()]);
        let v = violation(ops);
        assert_eq!(culprits(&v), [2, 3]);
    }

    #[test]
    fn read_of_a_failed_write_is_rejected() {
        let v = violation(vec![
            write(1, "a", 0, 10),
            write(2, "b", 20, 30).with_outcome(Outcome::Failed),
            read(3, Some("b"), 40, 50),
        ]);
        assert_eq!(v.stuck.index, 2);
        assert_eq!(v.ops_checked, 2);
    }

    #[test]
    fn keys_are_checked_independently_and_the_bad_one_is_named() {
        let history: History = [
            Op::write(1, "a", "1", 0, Some(10)),
            Op::write(1, "b", "1", 0, Some(10)),
            Op::read(2, "a", Some("1"), 20, Some(30)),
            Op::read(2, "b", None, 20, Some(30)),
            Op::read(2, "c", None, 20, Some(30)),
        ]
        .into_iter()
        .collect();
        let err = check(&history).unwrap_err();
        let v = err.violation().expect("a violation");
        assert_eq!(v.key, "b");
        assert_eq!(culprits(v), [1, 3]);
        assert!(err.to_string().starts_with(r#"key "b" is not linearizable"#), "{err}");
        // The same values on different keys do not interfere.
        let stats =
            check(&History::new().with(Op::write(1, "a", "1", 0, Some(10))).with(Op::read(2, "b", None, 20, Some(30))))
                .unwrap();
        assert_eq!(stats.keys, 2);
    }

    #[test]
    fn malformed_ops_are_errors() {
        let backwards = History::new().with(write(1, "a", 10, 5));
        assert!(matches!(check(&backwards), Err(CheckError::InvalidOp { index: 0, .. })));
        let ok_without_completion =
            History::new().with(write(1, "a", 0, 5)).with(Op::write(1, K, "b", 10, None).with_outcome(Outcome::Ok));
        let err = check(&ok_without_completion).unwrap_err();
        assert!(matches!(err, CheckError::InvalidOp { index: 1, .. }), "{err:?}");
        assert!(err.to_string().starts_with("operation #1 (client 1: write \"k\" = \"b\""), "{err}");
    }

    #[test]
    fn search_limit_is_a_distinct_error() {
        // 25 writes, each read back: 50 steps.
        let ops: Vec<Op> = (0..25)
            .flat_map(|i| {
                let value = i.to_string();
                [write(1, &value, 10 * i, 10 * i + 4), read(1, Some(&value), 10 * i + 5, 10 * i + 9)]
            })
            .collect();
        let history = History::from(ops);
        assert_eq!(check(&history).unwrap().states_explored, 50);
        let err = Checker::new().max_states_per_key(10).check(&history).unwrap_err();
        assert_eq!(err, CheckError::SearchLimitExceeded { key: K.into(), ops: 50, limit: 10 });
        assert!(err.violation().is_none());
        let text = err.to_string();
        assert!(text.contains("gave up on key \"k\" after exploring 10 states"), "{text}");

        // A non-linearizable history that takes many states to refute: 12 concurrent writes,
        // each read by a concurrent read, and a read of a value none of them wrote.
        let mut ops: Vec<Op> = (0..12)
            .flat_map(|i| {
                let value = i.to_string();
                [write(i, &value, 0, 100), read(i + 20, Some(&value), 0, 100)]
            })
            .collect();
        ops.push(read(99, Some("never"), 50, 60));
        let history = History::from(ops);
        let limited = Checker::new().max_states_per_key(1_000).check(&history);
        assert!(matches!(limited, Err(CheckError::SearchLimitExceeded { .. })), "{limited:?}");
        assert!(matches!(check(&history), Err(CheckError::NotLinearizable(_))));
    }

    fn timed_out(op: Op) -> Op {
        Op { complete: None, outcome: Outcome::Unknown, ..op }
    }

    /// A deterministic xorshift generator, so large tests need no extra dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// `clients` clients each making `per_client` back-to-back calls on `keys` keys, with
    /// random durations and effect points, applied to real registers in effect order. About one
    /// call in twelve times out or fails. Written values are unique unless `values` limits them.
    fn simulate(seed: u64, clients: u64, per_client: usize, keys: u64, values: Option<u64>) -> History {
        let mut rng = Rng(seed);
        // (effect time or None if it never took effect, op)
        let mut planned: Vec<(Option<u64>, Op)> = Vec::new();
        for client in 0..clients {
            let mut now = rng.below(100);
            for i in 0..per_client {
                let invoke = now + rng.below(20);
                let complete = invoke + 1 + rng.below(200);
                let effect = invoke + rng.below(complete - invoke + 1);
                now = complete;
                let key = format!("key{}", rng.below(keys));
                let roll = rng.below(100);
                let op = if roll < 50 {
                    Op::read(client, key, None, invoke, Some(complete))
                } else if roll < 55 {
                    Op::delete(client, key, invoke, Some(complete))
                } else {
                    let value = match values {
                        Some(n) => rng.below(n).to_string(),
                        None => format!("{client}.{i}"),
                    };
                    Op::write(client, key, value, invoke, Some(complete))
                };
                let (op, effect) = match (rng.below(100), &op.kind) {
                    (0..=2, _) => (timed_out(op), None),
                    (3..=5, OpKind::Write { .. }) => (op.with_outcome(Outcome::Failed), None),
                    (6..=8, OpKind::Write { .. }) => (timed_out(op), Some(effect)),
                    (9..=10, OpKind::Write { .. }) => {
                        // Took effect long after the client gave up.
                        (op.with_outcome(Outcome::Unknown), Some(complete + rng.below(2_000)))
                    }
                    _ => (op, Some(effect)),
                };
                planned.push((effect, op));
            }
        }
        let mut order: Vec<usize> = (0..planned.len()).filter(|&i| planned[i].0.is_some()).collect();
        order.sort_by_key(|&i| planned[i].0);
        let mut registers: HashMap<String, Option<String>> = HashMap::new();
        for i in order {
            let op = &mut planned[i].1;
            match &mut op.kind {
                OpKind::Write { value } => {
                    registers.insert(op.key.clone(), value.clone());
                }
                OpKind::Read { observed } => {
                    *observed = registers.get(&op.key).cloned().flatten();
                }
            }
        }
        planned.into_iter().map(|(_, op)| op).collect()
    }

    #[test]
    fn large_concurrent_history_is_checked() {
        // 16 clients, one key, 4000 calls, every call overlapping most others.
        let history = simulate(0x9e37_79b9_7f4a_7c15, 16, 250, 1, None);
        let stats = check(&history).unwrap_or_else(|e| panic!("{e}"));
        assert!(stats.ops_checked > 3_500, "{stats:?}");
        assert!(stats.states_explored < 100_000, "{stats:?}");

        // The same with one read in the middle changed to a value nobody wrote.
        let mut ops = history.into_ops();
        let i = (2_000..ops.len())
            .find(|&i| matches!(ops[i].kind, OpKind::Read { .. }) && ops[i].outcome == Outcome::Ok)
            .unwrap();
        ops[i].kind = OpKind::Read { observed: Some("never written".into()) };
        match check(&History::from(ops)) {
            Err(CheckError::NotLinearizable(v)) => assert_eq!(v.key, "key0"),
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn many_keys_are_checked() {
        let history = simulate(42, 16, 300, 20, None);
        let stats = check(&history).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(stats.keys, 20);
        assert!(stats.ops_checked > 4_000, "{stats:?}");
    }

    #[test]
    fn repeated_values_are_checked() {
        // Values written many times weaken the pruning; this stays in the thousands of states.
        let history = simulate(7, 8, 250, 1, Some(3));
        let stats = check(&history).unwrap_or_else(|e| panic!("{e}"));
        assert!(stats.ops_checked > 1_800, "{stats:?}");
        assert!(stats.states_explored < 100_000, "{stats:?}");
    }

    /// One step of a sequential execution to be blurred into a concurrent history.
    #[derive(Debug, Clone)]
    struct Planned {
        key: u8,
        action: Action,
        /// How long before and after its effect point the call was in flight.
        lead: u64,
        lag: u64,
        fate: Fate,
    }

    #[derive(Debug, Clone, Copy)]
    enum Action {
        Write,
        Delete,
        Read,
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Fate {
        Ok,
        Failed,
        /// The client saw no response, but the call took effect.
        UnknownApplied,
        /// The client saw no response, and the call never took effect.
        UnknownLost,
    }

    fn planned() -> impl Strategy<Value = Planned> {
        let action = prop_oneof![3 => Just(Action::Write), 1 => Just(Action::Delete), 4 => Just(Action::Read)];
        let fate = prop_oneof![
            8 => Just(Fate::Ok),
            1 => Just(Fate::Failed),
            1 => Just(Fate::UnknownApplied),
            1 => Just(Fate::UnknownLost),
        ];
        (0u8..3, action, 0u64..60, 0u64..60, fate).prop_map(|(key, action, lead, lag, fate)| Planned {
            key,
            action,
            lead,
            lag,
            fate,
        })
    }

    /// Runs `plan` against real registers one step every 10 time units; each call is in flight
    /// from `lead` before to `lag` after its effect, so neighbouring calls overlap.
    fn execute(plan: &[Planned]) -> History {
        let mut registers: HashMap<u8, String> = HashMap::new();
        let mut history = History::new();
        for (i, p) in plan.iter().enumerate() {
            let at = 1_000 + 10 * i as u64;
            let (invoke, complete) = (at - p.lead, at + p.lag);
            let key = format!("k{}", p.key);
            let client = i as u64 % 5;
            let applied = matches!(p.fate, Fate::Ok | Fate::UnknownApplied);
            let op = match p.action {
                Action::Write | Action::Delete => {
                    let value = matches!(p.action, Action::Write).then(|| format!("v{i}"));
                    if applied {
                        match &value {
                            Some(v) => registers.insert(p.key, v.clone()),
                            None => registers.remove(&p.key),
                        };
                    }
                    Op::new(client, key, OpKind::Write { value }, invoke, Some(complete))
                }
                Action::Read if applied => {
                    let observed = registers.get(&p.key).map(String::as_str);
                    Op::read(client, key, observed, invoke, Some(complete))
                }
                Action::Read => Op::read(client, key, Some("garbage"), invoke, Some(complete)),
            };
            history.push(match p.fate {
                Fate::Ok => op,
                Fate::Failed => op.with_outcome(Outcome::Failed),
                Fate::UnknownApplied => op.with_outcome(Outcome::Unknown),
                Fate::UnknownLost => Op { complete: None, ..op }.with_outcome(Outcome::Unknown),
            });
        }
        history
    }

    /// Searches every order directly from the definition.
    fn brute_force(history: &History) -> bool {
        struct BruteOp<'a> {
            invoke: u64,
            complete: Option<u64>,
            kind: &'a OpKind,
        }
        /// Whether the remaining operations can be ordered; `dead` holds configurations known
        /// not to lead anywhere.
        fn search<'a>(
            ops: &[BruteOp<'a>],
            done: &mut Vec<bool>,
            register: Option<&'a str>,
            dead: &mut HashSet<(Vec<bool>, Option<&'a str>)>,
        ) -> bool {
            if dead.contains(&(done.clone(), register)) {
                return false;
            }
            let known_left = ops.iter().zip(done.iter()).any(|(op, d)| !d && op.complete.is_some());
            if !known_left {
                return true;
            }
            for i in 0..ops.len() {
                let earlier_pending =
                    (0..ops.len()).any(|j| !done[j] && ops[j].complete.is_some_and(|c| c < ops[i].invoke));
                if done[i] || earlier_pending {
                    continue;
                }
                let after = match ops[i].kind {
                    OpKind::Write { value } => value.as_deref(),
                    OpKind::Read { observed } if observed.as_deref() == register => register,
                    OpKind::Read { .. } => continue,
                };
                done[i] = true;
                let found = search(ops, done, after, dead);
                done[i] = false;
                if found {
                    return true;
                }
            }
            dead.insert((done.clone(), register));
            false
        }
        let mut keys: Vec<&str> = history.ops().iter().map(|op| op.key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        keys.into_iter().all(|key| {
            let ops: Vec<BruteOp<'_>> = history
                .ops()
                .iter()
                .filter(|op| op.key == key)
                .filter_map(|op| match (op.outcome, &op.kind) {
                    (Outcome::Ok, _) => Some(BruteOp { invoke: op.invoke, complete: op.complete, kind: &op.kind }),
                    (Outcome::Unknown, OpKind::Write { .. }) => {
                        Some(BruteOp { invoke: op.invoke, complete: None, kind: &op.kind })
                    }
                    _ => None,
                })
                .collect();
            search(&ops, &mut vec![false; ops.len()], None, &mut HashSet::new())
        })
    }

    fn arbitrary_op() -> impl Strategy<Value = Op> {
        let value = prop_oneof![Just(None), Just(Some("a")), Just(Some("b")), Just(Some("c"))];
        let outcome = prop_oneof![6 => Just(Outcome::Ok), 1 => Just(Outcome::Failed), 2 => Just(Outcome::Unknown)];
        (
            0u64..3,
            prop_oneof![3 => Just(0u8), 1 => Just(1u8)],
            any::<bool>(),
            value,
            // Coarse times make ties, which count as overlapping, common.
            prop_oneof![0u64..40, (0u64..5).prop_map(|t| 8 * t)],
            prop_oneof![0u64..20, (0u64..3).prop_map(|t| 8 * t)],
            outcome,
            any::<bool>(),
        )
            .prop_map(|(client, key, is_write, value, invoke, duration, outcome, timed_out)| {
                let kind = if is_write {
                    OpKind::Write { value: value.map(str::to_owned) }
                } else {
                    OpKind::Read { observed: value.map(str::to_owned) }
                };
                let complete = (outcome == Outcome::Ok || !timed_out).then_some(invoke + duration);
                Op { client, key: format!("k{key}"), kind, invoke, complete, outcome }
            })
    }

    proptest! {
        /// A sequential execution blurred into overlapping intervals is linearizable.
        #[test]
        fn blurred_sequential_executions_pass(plan in proptest::collection::vec(planned(), 0..60)) {
            let history = execute(&plan);
            if let Err(e) = check(&history) {
                panic!("{e}\n{history:#?}");
            }
        }

        /// ... and stops being so when one completed read returns a value nobody wrote.
        #[test]
        fn a_read_of_an_unwritten_value_fails(
            mut plan in proptest::collection::vec(planned(), 0..60),
            read in planned(),
            at in any::<proptest::sample::Index>(),
            pick in any::<proptest::sample::Index>(),
        ) {
            // At least one completed read.
            plan.insert(at.index(plan.len() + 1), Planned { action: Action::Read, fate: Fate::Ok, ..read });
            let mut ops = execute(&plan).into_ops();
            let reads: Vec<usize> = (0..ops.len())
                .filter(|&i| matches!(ops[i].kind, OpKind::Read { .. }) && ops[i].outcome == Outcome::Ok)
                .collect();
            let i = reads[pick.index(reads.len())];
            ops[i].kind = OpKind::Read { observed: Some("never written".into()) };
            let key = ops[i].key.clone();
            match check(&History::from(ops)) {
                Err(CheckError::NotLinearizable(v)) => {
                    prop_assert_eq!(&v.key, &key);
                }
                other => prop_assert!(false, "expected a violation, got {:?}", other),
            }
        }

        /// On small arbitrary histories, linearizable or not, the search agrees with trying
        /// every order.
        #[test]
        fn agrees_with_brute_force(ops in proptest::collection::vec(arbitrary_op(), 0..14)) {
            let history = History::from(ops);
            let result = check(&history);
            let decided = result.is_ok() || result.as_ref().is_err_and(|e| e.violation().is_some());
            prop_assert!(decided, "{:?}", result);
            prop_assert_eq!(result.is_ok(), brute_force(&history), "{:?}\n{:#?}", result, history);
        }
    }
}
