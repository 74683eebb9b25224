//! The merge laws of every conflict-free kind, and of version vectors: commutative,
//! associative, idempotent, over states that three regions reach by random operations and
//! random merges between them (10,000 cases each). Plus what each kind promises on top: a
//! counter counts every operation once; a set is add-wins.

use meridian_core::causal::{Causality, VersionVector};
use meridian_core::crdt::{Crdt, LwwMap, OrSet, PnCounter, Stamp};
use meridian_core::{HlcTimestamp, RegionId};
use proptest::prelude::*;

const REGIONS: [&str; 3] = ["ap-south", "eu-west", "us-east"];

fn region(i: usize) -> RegionId {
    RegionId::new(REGIONS[i % 3]).expect("region")
}

/// One step of the history: region `at` does `op`.
#[derive(Debug, Clone)]
enum Op {
    /// Counter: increment (true) or decrement by an amount.
    Count(bool, u64),
    /// Set: add or remove one of a few members.
    Member(bool, u8),
    /// Map: set (with a value) or delete one of a few fields, at a wall time.
    Field(u8, Option<u8>, u64),
    /// Vector: one more write of this region.
    Tick,
    /// Merge another region's state into this one's.
    MergeFrom(usize),
}

fn op() -> impl Strategy<Value = (usize, Op)> {
    let op = prop_oneof![
        (any::<bool>(), 0u64..1000).prop_map(|(up, n)| Op::Count(up, n)),
        (any::<bool>(), 0u8..5).prop_map(|(add, m)| Op::Member(add, m)),
        (0u8..4, proptest::option::of(any::<u8>()), 0u64..50).prop_map(|(f, v, t)| Op::Field(f, v, t)),
        Just(Op::Tick),
        (0usize..3).prop_map(Op::MergeFrom),
    ];
    (0usize..3, op)
}

/// The three regions' states after `ops`.
#[derive(Debug, Clone, Default)]
struct World {
    counters: [PnCounter; 3],
    sets: [OrSet; 3],
    maps: [LwwMap; 3],
    vectors: [VersionVector; 3],
    /// What every counter operation added up to, whatever was merged.
    total: i128,
}

fn run(ops: &[(usize, Op)]) -> World {
    let mut w = World::default();
    for (seq, (at, op)) in ops.iter().enumerate() {
        let r = region(*at);
        match op {
            Op::Count(true, n) => {
                w.counters[*at].increment(&r, *n);
                w.total += i128::from(*n);
            }
            Op::Count(false, n) => {
                w.counters[*at].decrement(&r, *n);
                w.total -= i128::from(*n);
            }
            Op::Member(true, m) => {
                w.sets[*at].add(&r, &format!("m{m}"));
            }
            Op::Member(false, m) => {
                w.sets[*at].remove(&format!("m{m}"));
            }
            Op::Field(f, v, t) => {
                // The logical part is unique per operation: one stamp, one write.
                let stamp = Stamp { hlc: HlcTimestamp::new(*t, seq as u16), region: r };
                match v {
                    Some(v) => w.maps[*at].set(&format!("f{f}"), vec![*v], stamp),
                    None => w.maps[*at].delete(&format!("f{f}"), stamp),
                }
            }
            Op::Tick => {
                w.vectors[*at].increment(&r);
            }
            Op::MergeFrom(from) if from != at => {
                let (c, s, m, v) =
                    (w.counters[*from].clone(), w.sets[*from].clone(), w.maps[*from].clone(), w.vectors[*from].clone());
                w.counters[*at].merge(&c);
                w.sets[*at].merge(&s);
                w.maps[*at].merge(&m);
                w.vectors[*at].merge(&v);
            }
            Op::MergeFrom(_) => {}
        }
    }
    w
}

fn join<T: Crdt>(a: &T, b: &T) -> T {
    let mut m = a.clone();
    m.merge(b);
    m
}

fn laws<T: Crdt + std::fmt::Debug>(s: &[T; 3]) -> Result<(), TestCaseError> {
    let [a, b, c] = s;
    prop_assert_eq!(join(a, b), join(b, a), "commutative");
    prop_assert_eq!(join(&join(a, b), c), join(a, &join(b, c)), "associative");
    prop_assert_eq!(join(a, a), a.clone(), "idempotent");
    prop_assert_eq!(join(&join(a, b), b), join(a, b), "a repeated merge changes nothing");
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig { cases: 10_000, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn counters_merge_lawfully_and_count_every_operation_once(ops in proptest::collection::vec(op(), 0..40)) {
        let w = run(&ops);
        laws(&w.counters)?;
        let all = join(&join(&w.counters[0], &w.counters[1]), &w.counters[2]);
        prop_assert_eq!(all.value(), w.total);
    }

    #[test]
    fn sets_merge_lawfully(ops in proptest::collection::vec(op(), 0..40)) {
        laws(&run(&ops).sets)?;
    }

    #[test]
    fn maps_merge_lawfully(ops in proptest::collection::vec(op(), 0..40)) {
        laws(&run(&ops).maps)?;
    }

    #[test]
    fn version_vectors_merge_lawfully_and_a_merge_is_after_both(ops in proptest::collection::vec(op(), 0..40)) {
        let w = run(&ops);
        laws(&w.vectors)?;
        let [a, b, _] = &w.vectors;
        let m = join(a, b);
        prop_assert!(matches!(a.compare(&m), Causality::Before | Causality::Equal));
        prop_assert!(matches!(b.compare(&m), Causality::Before | Causality::Equal));
        prop_assert_eq!(a.compare(b) == Causality::Concurrent, !a.dominates(b) && !b.dominates(a));
    }

    /// Add-wins: a member added in one region and removed concurrently in another (the
    /// remove not having seen that add) is present after the merge.
    #[test]
    fn an_add_survives_a_concurrent_remove(ops in proptest::collection::vec(op(), 0..40), m in 0u8..5) {
        let w = run(&ops);
        let member = format!("m{m}");
        let mut adder = w.sets[0].clone();
        let mut remover = w.sets[1].clone();
        adder.add(&region(0), &member);
        remover.remove(&member);
        prop_assert!(join(&adder, &remover).contains(&member));
        prop_assert!(join(&remover, &adder).contains(&member));
    }
}
