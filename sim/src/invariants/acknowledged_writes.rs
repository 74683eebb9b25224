//! No acknowledged write is lost. After the heal, each client reads every key; the value it
//! reads must not be older than an acknowledged write that began after the read value's own
//! write was acknowledged, and a key with an acknowledged write must not read as absent.
//!
//! Linearizability implies this, but this check names the loss plainly and does not depend
//! on the search.

use std::collections::BTreeMap;

use meridian_testkit::{History, OpKind, Outcome};

use super::Violation;

/// `final_from`: reads invoked at or after this time (ns) are the final reads.
pub fn check(history: &History, final_from: u64) -> Result<usize, Violation> {
    let ops = history.ops();
    // Each written value (values are unique) -> when its write was acknowledged, if it was.
    let mut acked_at: BTreeMap<(&str, &str), Option<u64>> = BTreeMap::new();
    for op in ops {
        if let OpKind::Write { value: Some(v) } = &op.kind {
            let at = if op.outcome == Outcome::Ok { op.complete } else { None };
            acked_at.insert((op.key.as_str(), v.as_str()), at);
        }
    }
    let mut checked = 0;
    for read in ops.iter().filter(|o| o.invoke >= final_from && o.outcome == Outcome::Ok) {
        let OpKind::Read { observed } = &read.kind else { continue };
        let mut acked_writes = ops
            .iter()
            .filter(|w| w.key == read.key && matches!(w.kind, OpKind::Write { .. }) && w.outcome == Outcome::Ok);
        let floor = match observed {
            None => 0,
            // Acknowledged at t: only acknowledged writes invoked after t are known to be newer.
            Some(v) => match acked_at.get(&(read.key.as_str(), v.as_str())) {
                Some(Some(t)) => *t + 1,
                // Unknown outcome: it may have taken effect late, after anything else.
                Some(None) => u64::MAX,
                None => {
                    return Err(Violation {
                        invariant: "no acknowledged write lost".into(),
                        detail: format!("key {}: final read saw {v:?}, which no client wrote", read.key),
                    })
                }
            },
        };
        if let Some(lost) = acked_writes.find(|w| w.invoke >= floor && w.complete < Some(read.invoke)) {
            return Err(Violation {
                invariant: "no acknowledged write lost".into(),
                detail: format!(
                    "key {}: the write of {:?} by client {} was acknowledged at {} ns, but the final read at {} ns saw {observed:?}",
                    read.key,
                    match &lost.kind {
                        OpKind::Write { value } => value.clone(),
                        _ => None,
                    },
                    lost.client,
                    lost.complete.unwrap_or(0),
                    read.invoke
                ),
            });
        }
        checked += 1;
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_testkit::Op;

    #[test]
    fn a_final_read_older_than_an_acknowledged_write_is_a_loss() {
        let h = History::new()
            .with(Op::write(1, "k", "a", 0, Some(10)))
            .with(Op::write(2, "k", "b", 20, Some(30)))
            .with(Op::read(3, "k", Some("a"), 100, Some(110)));
        let v = check(&h, 100).unwrap_err();
        assert!(v.detail.contains("\"b\""), "{v}");
    }

    #[test]
    fn absent_after_an_acknowledged_write_is_a_loss() {
        let h = History::new().with(Op::write(1, "k", "a", 0, Some(10))).with(Op::read(3, "k", None, 100, Some(110)));
        assert!(check(&h, 100).is_err());
    }

    #[test]
    fn overlapping_and_unknown_writes_may_win() {
        let h = History::new()
            .with(Op::write(1, "k", "a", 0, Some(50)))
            .with(Op::write(2, "k", "b", 20, Some(30)))
            .with(Op::write(4, "k", "c", 40, None))
            .with(Op::read(3, "k", Some("a"), 100, Some(110)))
            .with(Op::read(3, "k", Some("c"), 120, Some(130)));
        assert_eq!(check(&h, 100), Ok(2));
    }
}
