//! Per-key linearizability of everything the clients saw, checked on the whole history at the
//! end of the run (writes, strong reads, and the final reads after the heal), by two checkers
//! that must agree:
//!
//! - `meridian-testkit`'s (Wing & Gong / Lowe with P-compositionality, bounded), the one the
//!   multi-process tests use; its verdict decides;
//! - stateright's `LinearizabilityTester`, an independent implementation, on each key's
//!   sub-history. Its search is a plain depth-first one, so it runs within a step budget per
//!   key; a key it cannot decide in that budget is counted, not failed.
//!
//! A key the two disagree on is a violation: one of the checkers is wrong.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use meridian_testkit::{check, CheckStats, History, Op, OpKind, Outcome};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

use super::Violation;

/// Register steps stateright's search may take on one key before it gives up on the key.
pub const REFERENCE_STEPS_MAX: u64 = 2_000_000;
/// Thread ids from here up stand for writes still in flight at the end, one each (a client's
/// own thread moves on to its next call).
const IN_FLIGHT_THREADS: u64 = 1 << 40;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdicts {
    pub stats: Option<CheckStats>,
    /// Keys stateright found linearizable, and keys it could not decide within its budget.
    pub reference_agreed: u64,
    pub reference_undecided: u64,
}

pub fn check_history(history: &History) -> (Verdicts, Vec<Violation>) {
    let mut verdicts = Verdicts::default();
    let mut violations = Vec::new();
    let ours = check(history);
    let ours_ok: BTreeSet<String> = match &ours {
        Ok(stats) => {
            verdicts.stats = Some(*stats);
            history.ops().iter().map(|o| o.key.clone()).collect()
        }
        Err(e) => {
            violations.push(Violation { invariant: "per-key linearizability".into(), detail: e.to_string() });
            BTreeSet::new()
        }
    };
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history.ops() {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, ops) in by_key {
        match reference_check(&ops) {
            Reference::Linearizable => {
                verdicts.reference_agreed += 1;
                // Ours failed the whole history; only a key it passed can disagree.
                if ours.is_err() {
                    continue;
                }
            }
            Reference::Undecided => verdicts.reference_undecided += 1,
            Reference::NotLinearizable if ours_ok.contains(key) => violations.push(Violation {
                invariant: "linearizability checkers agree".into(),
                detail: format!("stateright finds key {key} not linearizable; meridian-testkit finds it linearizable"),
            }),
            Reference::NotLinearizable => {}
            Reference::Malformed(why) => violations.push(Violation {
                invariant: "linearizability checkers agree".into(),
                detail: format!("key {key}: the history could not be given to stateright: {why}"),
            }),
        }
    }
    (verdicts, violations)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RegOp {
    Write(Option<String>),
    Read,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RegRet {
    Written,
    Read(Option<String>),
}

/// A register whose steps are counted against a budget shared by every copy the search makes;
/// past it, no step is valid, so the search unwinds at once.
#[derive(Debug, Clone)]
struct BudgetedRegister {
    value: Option<String>,
    steps: Rc<Cell<u64>>,
}

impl BudgetedRegister {
    fn spend(&self) -> bool {
        let n = self.steps.get() + 1;
        self.steps.set(n);
        n <= REFERENCE_STEPS_MAX
    }
}

impl SequentialSpec for BudgetedRegister {
    type Op = RegOp;
    type Ret = RegRet;

    fn invoke(&mut self, op: &RegOp) -> RegRet {
        self.spend();
        match op {
            RegOp::Write(v) => {
                self.value = v.clone();
                RegRet::Written
            }
            RegOp::Read => RegRet::Read(self.value.clone()),
        }
    }

    fn is_valid_step(&mut self, op: &RegOp, ret: &RegRet) -> bool {
        if !self.spend() {
            return false;
        }
        match (op, ret) {
            (RegOp::Write(v), RegRet::Written) => {
                self.value = v.clone();
                true
            }
            (RegOp::Read, RegRet::Read(v)) => self.value == *v,
            _ => false,
        }
    }
}

enum Reference {
    Linearizable,
    NotLinearizable,
    Undecided,
    Malformed(String),
}

/// One key's sub-history through stateright. Failed calls and reads without an answer are
/// left out; a write without an answer is an operation still in flight at the end (it may have
/// taken effect or not), on a thread of its own, and left out if no read saw its value (it can
/// then only add orders, never remove one).
fn reference_check(ops: &[&Op]) -> Reference {
    let observed: BTreeSet<&str> = ops
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .filter_map(|o| match &o.kind {
            OpKind::Read { observed } => observed.as_deref(),
            OpKind::Write { .. } => None,
        })
        .collect();
    // What each call asks and, if it answered, what it got.
    let mut calls: Vec<(RegOp, Option<RegRet>)> = Vec::new();
    // (time, 0 = invoke | 1 = return, thread, call)
    let mut events: Vec<(u64, u8, u64, usize)> = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        let op = match &o.kind {
            OpKind::Write { value } => RegOp::Write(value.clone()),
            OpKind::Read { .. } => RegOp::Read,
        };
        match (o.outcome, &o.kind, o.complete) {
            (Outcome::Failed, _, _) | (Outcome::Unknown, OpKind::Read { .. }, _) => {}
            (Outcome::Unknown, OpKind::Write { value }, _) => {
                if value.as_deref().is_some_and(|v| observed.contains(v)) {
                    events.push((o.invoke, 0, IN_FLIGHT_THREADS + i as u64, calls.len()));
                    calls.push((op, None));
                }
            }
            (Outcome::Ok, kind, Some(complete)) => {
                let ret = match kind {
                    OpKind::Write { .. } => RegRet::Written,
                    OpKind::Read { observed } => RegRet::Read(observed.clone()),
                };
                events.push((o.invoke, 0, o.client, calls.len()));
                events.push((complete, 1, o.client, calls.len()));
                calls.push((op, Some(ret)));
            }
            (Outcome::Ok, _, None) => return Reference::Malformed(format!("a completed call without a time: {o:?}")),
        }
    }
    // At equal times, invokes first: calls that touch in time count as concurrent.
    events.sort_by_key(|e| (e.0, e.1));
    let steps = Rc::new(Cell::new(0));
    let mut tester = LinearizabilityTester::new(BudgetedRegister { value: None, steps: steps.clone() });
    // Thread -> its call in flight that will answer.
    let mut pending: BTreeMap<u64, usize> = BTreeMap::new();
    for (_, kind, thread, call) in events {
        let (op, ret) = &calls[call];
        let result = if kind == 0 {
            // The same client's previous call ended at this very instant: end it first.
            if let Some(previous) = pending.remove(&thread) {
                let ret = calls[previous].1.clone().expect("a pending call answers");
                if let Err(e) = tester.on_return(thread, ret) {
                    return Reference::Malformed(e);
                }
            }
            if ret.is_some() {
                pending.insert(thread, call);
            }
            tester.on_invoke(thread, op.clone()).map(|_| ())
        } else {
            if pending.get(&thread) != Some(&call) {
                continue; // already ended above
            }
            pending.remove(&thread);
            tester.on_return(thread, ret.clone().expect("a return event answers")).map(|_| ())
        };
        if let Err(e) = result {
            return Reference::Malformed(e);
        }
    }
    let linearizable = tester.is_consistent();
    if steps.get() > REFERENCE_STEPS_MAX {
        Reference::Undecided
    } else if linearizable {
        Reference::Linearizable
    } else {
        Reference::NotLinearizable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(h: &History) -> Vec<&Op> {
        h.ops().iter().collect()
    }

    #[test]
    fn both_checkers_accept_a_linearizable_history_and_stateright_refuses_a_stale_read() {
        let mut h = History::new();
        h.push(Op::write(1, "k", "a", 0, Some(10)));
        h.push(Op::write(2, "k", "b", 5, Some(20)));
        h.push(Op::read(3, "k", Some("b"), 25, Some(30)));
        let (v, violations) = check_history(&h);
        assert!(violations.is_empty(), "{violations:?}");
        assert_eq!(v.reference_agreed, 1);
        // A read after "b" was acknowledged cannot see "a" if "b" began after "a" ended.
        let mut bad = History::new();
        bad.push(Op::write(1, "k", "a", 0, Some(10)));
        bad.push(Op::write(2, "k", "b", 11, Some(20)));
        bad.push(Op::read(3, "k", Some("a"), 25, Some(30)));
        assert!(matches!(reference_check(&ops(&bad)), Reference::NotLinearizable));
        let (_, violations) = check_history(&bad);
        assert!(violations.iter().any(|v| v.invariant == "per-key linearizability"), "{violations:?}");
    }

    #[test]
    fn a_write_without_an_answer_may_or_may_not_have_happened() {
        let mut h = History::new();
        h.push(Op::write(1, "k", "a", 0, Some(10)));
        h.push(Op::write(2, "k", "b", 12, None));
        h.push(Op::read(3, "k", Some("b"), 30, Some(40)));
        h.push(Op::read(3, "k", Some("b"), 50, Some(60)));
        assert!(matches!(reference_check(&ops(&h)), Reference::Linearizable));
        let mut never = History::new();
        never.push(Op::write(1, "k", "a", 0, Some(10)));
        never.push(Op::write(2, "k", "b", 12, None));
        never.push(Op::read(3, "k", Some("a"), 30, Some(40)));
        assert!(matches!(reference_check(&ops(&never)), Reference::Linearizable));
    }

    #[test]
    fn a_client_whose_calls_touch_in_time_is_still_one_thread() {
        let mut h = History::new();
        h.push(Op::write(1, "k", "a", 0, Some(10)));
        h.push(Op::read(1, "k", Some("a"), 10, Some(20)));
        assert!(matches!(reference_check(&ops(&h)), Reference::Linearizable));
    }
}
