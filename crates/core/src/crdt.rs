//! The conflict-free kinds a multi-home dataset can hold, with regions as the actors.
//!
//! Every type here keeps the merge laws that let copies converge whatever order, grouping
//! or repetition their merges arrive in (property-tested, 10,000 cases each, in
//! `tests/crdt_laws.rs`):
//! - commutative: `a ⊔ b = b ⊔ a`;
//! - associative: `(a ⊔ b) ⊔ c = a ⊔ (b ⊔ c)`;
//! - idempotent: `a ⊔ a = a`.
//!
//! Each keeps a canonical form (no empty entries, no zero counts) so that equal states are
//! equal values, and merging them compares with `==`.
//!
//! Sources: Shapiro, Preguiça, Baquero, Zawirski, "A comprehensive study of Convergent and
//! Commutative Replicated Data Types" (INRIA RR-7506, 2011) for the PN-counter and the
//! last-writer-wins register; Bieniusa et al., "An optimized conflict-free replicated set"
//! (arXiv:1210.3368, 2012) for the observed-remove set with a causal context.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::causal::{Dot, VersionVector};
use crate::hlc::HlcTimestamp;
use crate::ids::RegionId;

/// A state-based CRDT: `merge` is the join of a semilattice.
pub trait Crdt: Clone + PartialEq {
    /// Fold `other` into `self`. Must be commutative, associative and idempotent.
    fn merge(&mut self, other: &Self);
}

impl Crdt for VersionVector {
    fn merge(&mut self, other: &Self) {
        VersionVector::merge(self, other)
    }
}

/// A counter that goes up and down: per region, the sum of its increments and of its
/// decrements, each only ever growing. Its value is the difference of the totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PnCounter {
    up: BTreeMap<RegionId, u64>,
    down: BTreeMap<RegionId, u64>,
}

impl PnCounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// `region` adds `amount` (0 changes nothing).
    pub fn increment(&mut self, region: &RegionId, amount: u64) {
        Self::bump(&mut self.up, region, amount);
    }

    /// `region` subtracts `amount`.
    pub fn decrement(&mut self, region: &RegionId, amount: u64) {
        Self::bump(&mut self.down, region, amount);
    }

    fn bump(side: &mut BTreeMap<RegionId, u64>, region: &RegionId, amount: u64) {
        if amount == 0 {
            return;
        }
        // A region's total saturates at u64::MAX (1.8e19) rather than wrap: the node bounds
        // one operation to 2^53 - 1, so reaching it takes two thousand of the largest.
        let slot = side.entry(region.clone()).or_insert(0);
        *slot = slot.saturating_add(amount);
    }

    /// The counter's value.
    /// Bring the value this copy sees back to zero, by a compensating operation of `region`:
    /// increments other regions made concurrently survive the merge.
    pub fn reset(&mut self, region: &RegionId) {
        let v = self.value();
        // A counter's total fits in u64 per side, so the difference of two sides does too.
        let amount = u64::try_from(v.unsigned_abs()).expect("a counter's value fits in u64");
        if v > 0 {
            self.decrement(region, amount);
        } else {
            self.increment(region, amount);
        }
    }

    pub fn value(&self) -> i128 {
        let sum = |side: &BTreeMap<RegionId, u64>| side.values().map(|&v| i128::from(v)).sum::<i128>();
        sum(&self.up) - sum(&self.down)
    }
}

impl Crdt for PnCounter {
    fn merge(&mut self, other: &Self) {
        for (side, theirs) in [(&mut self.up, &other.up), (&mut self.down, &other.down)] {
            for (region, &n) in theirs {
                let slot = side.entry(region.clone()).or_insert(0);
                *slot = (*slot).max(n);
            }
        }
    }
}

/// An observed-remove set of strings, add-wins: a remove takes out only the adds it has
/// seen, so an add concurrent with a remove survives. Each member keeps the dots of the adds
/// that put it there; the causal context (`seen`) records every add ever seen, present or
/// removed, so a merge can tell "removed here" from "not yet seen here".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrSet {
    members: BTreeMap<String, Dots>,
    seen: VersionVector,
}

/// The dots of the adds that put one member in a set: in order, without repeats. Almost
/// always one (an add replaces the dots this copy had seen), so a vector rather than a tree:
/// one small allocation per member instead of a tree node. Encoded as a sequence in order,
/// byte for byte what a `BTreeSet<Dot>` was, and put in order again when read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
struct Dots(Vec<Dot>);

impl<'de> Deserialize<'de> for Dots {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut dots = Vec::<Dot>::deserialize(d)?;
        dots.sort();
        dots.dedup();
        Ok(Dots(dots))
    }
}

impl Dots {
    fn contains(&self, d: &Dot) -> bool {
        self.0.binary_search(d).is_ok()
    }

    fn insert(&mut self, d: Dot) {
        if let Err(at) = self.0.binary_search(&d) {
            self.0.insert(at, d);
        }
    }
}

impl OrSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// `region` adds `member`: a new dot replaces the ones this copy had seen for it.
    pub fn add(&mut self, region: &RegionId, member: &str) -> Dot {
        let dot = self.seen.increment(region);
        self.members.insert(member.to_owned(), Dots(vec![dot.clone()]));
        dot
    }

    /// Remove `member` as this copy sees it (adds it has not seen survive the merge).
    /// Returns whether it was present.
    pub fn remove(&mut self, member: &str) -> bool {
        self.members.remove(member).is_some()
    }

    /// Remove every member this copy has seen (adds it has not seen survive the merge).
    pub fn clear(&mut self) {
        self.members.clear();
    }

    pub fn contains(&self, member: &str) -> bool {
        self.members.contains_key(member)
    }

    /// The members, in order.
    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every add this copy has seen.
    pub fn context(&self) -> &VersionVector {
        &self.seen
    }
}

impl Crdt for OrSet {
    /// In place: a dot survives if both copies hold it, or if one holds it and the other has
    /// never seen it (had it seen it, its absence there is a remove).
    fn merge(&mut self, other: &Self) {
        let OrSet { members, seen } = self;
        members.retain(|name, mine| {
            match other.members.get(name) {
                None => mine.0.retain(|d| !other.seen.contains(d)),
                Some(theirs) => {
                    mine.0.retain(|d| theirs.contains(d) || !other.seen.contains(d));
                    // A dot of theirs is in `mine` now exactly when it was before: the
                    // retain kept every dot both hold.
                    for d in &theirs.0 {
                        if !seen.contains(d) && !mine.contains(d) {
                            mine.insert(d.clone());
                        }
                    }
                }
            }
            !mine.0.is_empty()
        });
        for (name, theirs) in &other.members {
            if members.contains_key(name) {
                continue;
            }
            // A subsequence of theirs, so still in order.
            let dots: Vec<Dot> = theirs.0.iter().filter(|d| !seen.contains(d)).cloned().collect();
            if !dots.is_empty() {
                members.insert(name.clone(), Dots(dots));
            }
        }
        seen.merge(&other.seen);
    }
}

/// The order of last-writer-wins: the higher HLC timestamp wins, and on a tie the lower
/// region id (a fixed, arbitrary rule every region applies alike).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub hlc: HlcTimestamp,
    pub region: RegionId,
}

impl Stamp {
    /// Whether `self` wins over `other`.
    pub fn beats(&self, other: &Stamp) -> bool {
        self.hlc > other.hlc || (self.hlc == other.hlc && self.region < other.region)
    }
}

/// One field of a map: a value, or a tombstone (`None`, the field was deleted), stamped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    #[serde(with = "crate::byte_strings::option_bytes")]
    pub value: Option<Vec<u8>>,
    pub stamp: Stamp,
}

impl Crdt for Register {
    fn merge(&mut self, other: &Self) {
        // Equal stamps name the same write (one region stamps each write once), so which
        // copy is kept does not matter; a strict win replaces.
        if other.stamp.beats(&self.stamp) {
            *self = other.clone();
        }
    }
}

/// A map of string fields, each a last-writer-wins register: concurrent writes to different
/// fields both survive, and to one field the later stamp wins.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LwwMap {
    fields: BTreeMap<String, Register>,
}

impl LwwMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set `field` to `value` at `stamp` (a no-op if the field holds a later write).
    pub fn set(&mut self, field: &str, value: Vec<u8>, stamp: Stamp) {
        self.write(field, Register { value: Some(value), stamp });
    }

    /// Delete `field` at `stamp`: a tombstone, so an older set arriving later stays deleted.
    pub fn delete(&mut self, field: &str, stamp: Stamp) {
        self.write(field, Register { value: None, stamp });
    }

    fn write(&mut self, field: &str, register: Register) {
        match self.fields.get_mut(field) {
            Some(current) => current.merge(&register),
            None => {
                self.fields.insert(field.to_owned(), register);
            }
        }
    }

    /// The live value of `field`.
    /// Delete every field this copy holds, as of `stamp`.
    pub fn clear(&mut self, stamp: &Stamp) {
        let fields: Vec<String> = self.fields.keys().cloned().collect();
        for f in fields {
            self.delete(&f, stamp.clone());
        }
    }

    pub fn get(&self, field: &str) -> Option<&[u8]> {
        self.fields.get(field).and_then(|r| r.value.as_deref())
    }

    /// The live fields and their values, in order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.fields.iter().filter_map(|(k, r)| r.value.as_deref().map(|v| (k.as_str(), v)))
    }
}

impl Crdt for LwwMap {
    fn merge(&mut self, other: &Self) {
        for (field, register) in &other.fields {
            self.write(field, register.clone());
        }
    }
}

/// Which conflict-free kind a dataset's values are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CrdtKind {
    Counter,
    Set,
    Map,
}

impl std::fmt::Display for CrdtKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CrdtKind::Counter => "counter",
            CrdtKind::Set => "set",
            CrdtKind::Map => "map",
        })
    }
}

/// One kind's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CrdtState {
    Counter(PnCounter),
    Set(OrSet),
    Map(LwwMap),
}

impl CrdtState {
    pub fn new(kind: CrdtKind) -> Self {
        match kind {
            CrdtKind::Counter => CrdtState::Counter(PnCounter::new()),
            CrdtKind::Set => CrdtState::Set(OrSet::new()),
            CrdtKind::Map => CrdtState::Map(LwwMap::new()),
        }
    }

    pub fn kind(&self) -> CrdtKind {
        match self {
            CrdtState::Counter(_) => CrdtKind::Counter,
            CrdtState::Set(_) => CrdtKind::Set,
            CrdtState::Map(_) => CrdtKind::Map,
        }
    }
}

impl Crdt for CrdtState {
    fn merge(&mut self, other: &Self) {
        match (self, other) {
            (CrdtState::Counter(a), CrdtState::Counter(b)) => a.merge(b),
            (CrdtState::Set(a), CrdtState::Set(b)) => a.merge(b),
            (CrdtState::Map(a), CrdtState::Map(b)) => a.merge(b),
            // Two kinds under one key (the dataset's kind was changed while copies diverged):
            // the greater kind wins whole, which keeps the merge a semilattice. The node
            // refuses operations of another kind than the stored one, so this stays rare.
            (mine, theirs) => {
                if theirs.kind() > mine.kind() {
                    *mine = theirs.clone();
                }
            }
        }
    }
}

/// An operation on a conflict-free value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CrdtOp {
    Increment(u64),
    Decrement(u64),
    /// Add these members to a set.
    Add(Vec<String>),
    /// Remove these members, as far as this copy has seen them.
    Remove(Vec<String>),
    /// Set these fields of a map (each value a JSON text).
    SetFields(Vec<(String, Vec<u8>)>),
    /// Delete these fields of a map.
    DeleteFields(Vec<String>),
    /// Delete the key: everything this copy has seen of it goes; what other regions did
    /// concurrently survives the merge.
    Clear,
}

impl CrdtOp {
    /// The kind this operation applies to; `None` for [`CrdtOp::Clear`], which any kind takes.
    pub fn kind(&self) -> Option<CrdtKind> {
        match self {
            CrdtOp::Increment(_) | CrdtOp::Decrement(_) => Some(CrdtKind::Counter),
            CrdtOp::Add(_) | CrdtOp::Remove(_) => Some(CrdtKind::Set),
            CrdtOp::SetFields(_) | CrdtOp::DeleteFields(_) => Some(CrdtKind::Map),
            CrdtOp::Clear => None,
        }
    }

    /// Bytes it takes, roughly: its members, fields and values.
    pub fn encoded_len(&self) -> usize {
        match self {
            CrdtOp::Increment(_) | CrdtOp::Decrement(_) | CrdtOp::Clear => 10,
            CrdtOp::Add(m) | CrdtOp::Remove(m) | CrdtOp::DeleteFields(m) => m.iter().map(|s| s.len() + 5).sum(),
            CrdtOp::SetFields(f) => f.iter().map(|(k, v)| k.len() + v.len() + 10).sum(),
        }
    }

    /// The operation's name in the API and the CLI.
    pub fn name(&self) -> &'static str {
        match self {
            CrdtOp::Increment(_) => "increment",
            CrdtOp::Decrement(_) => "decrement",
            CrdtOp::Add(_) => "add",
            CrdtOp::Remove(_) => "remove",
            CrdtOp::SetFields(_) => "set",
            CrdtOp::DeleteFields(_) => "delete",
            CrdtOp::Clear => "clear",
        }
    }
}

/// An operation that does not fit the value it was applied to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{op}` applies to a {wanted}, and this key holds a {held}")]
pub struct KindMismatch {
    pub op: &'static str,
    pub wanted: CrdtKind,
    pub held: CrdtKind,
}

/// What a key of a conflict-free dataset holds: its kind's state and whether the key exists.
///
/// Existence is an add-wins flag (an observed-remove set of one member): every operation
/// adds it and a delete removes what it has seen, so an operation concurrent with a delete
/// keeps the key, and a delete that saw everything takes it out for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrdtObject {
    presence: OrSet,
    pub state: CrdtState,
}

impl CrdtObject {
    pub fn new(kind: CrdtKind) -> Self {
        CrdtObject { presence: OrSet::new(), state: CrdtState::new(kind) }
    }

    /// Whether the key exists (an operation that no delete has seen).
    pub fn is_live(&self) -> bool {
        !self.presence.is_empty()
    }

    /// Apply `op` as `region` at `stamp` (the write's HLC reading, which orders map fields).
    pub fn apply(&mut self, op: &CrdtOp, region: &RegionId, stamp: &Stamp) -> Result<(), KindMismatch> {
        if let Some(wanted) = op.kind() {
            let held = self.state.kind();
            if wanted != held {
                return Err(KindMismatch { op: op.name(), wanted, held });
            }
        }
        match (op, &mut self.state) {
            (CrdtOp::Increment(n), CrdtState::Counter(c)) => c.increment(region, *n),
            (CrdtOp::Decrement(n), CrdtState::Counter(c)) => c.decrement(region, *n),
            (CrdtOp::Add(members), CrdtState::Set(s)) => {
                for m in members {
                    s.add(region, m);
                }
            }
            (CrdtOp::Remove(members), CrdtState::Set(s)) => {
                for m in members {
                    s.remove(m);
                }
            }
            (CrdtOp::SetFields(fields), CrdtState::Map(m)) => {
                for (f, v) in fields {
                    m.set(f, v.clone(), stamp.clone());
                }
            }
            (CrdtOp::DeleteFields(fields), CrdtState::Map(m)) => {
                for f in fields {
                    m.delete(f, stamp.clone());
                }
            }
            (CrdtOp::Clear, state) => {
                match state {
                    CrdtState::Counter(c) => c.reset(region),
                    CrdtState::Set(s) => s.clear(),
                    CrdtState::Map(m) => m.clear(stamp),
                }
                self.presence.clear();
                return Ok(());
            }
            _ => unreachable!("the kind was checked above"),
        }
        // A fresh dot each time: a delete elsewhere that did not see this operation must not
        // take the key out.
        self.presence.add(region, "");
        Ok(())
    }
}

impl Crdt for CrdtObject {
    fn merge(&mut self, other: &Self) {
        self.presence.merge(&other.presence);
        self.state.merge(&other.state);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn dots_encode_as_the_ordered_set_they_replace_and_are_ordered_when_read() {
        let d = |r: &str, n: u64| Dot { region: RegionId::new(r).unwrap(), counter: n };
        let tree: BTreeSet<Dot> = [d("us-east", 3), d("ap-south", 9), d("eu-west", 1), d("ap-south", 2)].into();
        let dots = Dots(tree.iter().cloned().collect());
        assert_eq!(postcard::to_stdvec(&dots).unwrap(), postcard::to_stdvec(&tree).unwrap());
        let shuffled = vec![d("us-east", 3), d("ap-south", 9), d("ap-south", 9), d("eu-west", 1), d("ap-south", 2)];
        let read: Dots = postcard::from_bytes(&postcard::to_stdvec(&shuffled).unwrap()).unwrap();
        assert_eq!(read, dots, "sorted, without the repeat");
        assert!(read.contains(&d("ap-south", 9)) && !read.contains(&d("ap-south", 8)));
    }

    fn r(s: &str) -> RegionId {
        RegionId::new(s).expect("region")
    }

    fn merged<T: Crdt>(a: &T, b: &T) -> T {
        let mut m = a.clone();
        m.merge(b);
        m
    }

    #[test]
    fn a_counter_sums_every_regions_increments_and_decrements_once() {
        let mut us = PnCounter::new();
        let mut eu = PnCounter::new();
        us.increment(&r("us"), 5);
        eu.increment(&r("eu"), 3);
        eu.decrement(&r("eu"), 10);
        let m = merged(&us, &eu);
        assert_eq!(m.value(), -2);
        assert_eq!(merged(&m, &us), m, "a repeated merge counts nothing twice");
    }

    #[test]
    fn a_remove_takes_out_what_it_saw_and_a_concurrent_add_survives() {
        let mut us = OrSet::new();
        us.add(&r("us"), "lamp");
        let mut eu = merged(&OrSet::new(), &us);
        // eu removes what it saw; us adds lamp again, concurrently.
        assert!(eu.remove("lamp"));
        us.add(&r("us"), "lamp");
        us.add(&r("us"), "desk");
        let m = merged(&us, &eu);
        assert_eq!(m.members().collect::<Vec<_>>(), vec!["desk", "lamp"], "add wins over a concurrent remove");
        // A remove after seeing every add takes the member out for good.
        let mut eu2 = m.clone();
        eu2.remove("lamp");
        let m2 = merged(&m, &eu2);
        assert_eq!(m2.members().collect::<Vec<_>>(), vec!["desk"]);
        assert_eq!(merged(&m2, &m), m2, "merging an older copy brings nothing back");
    }

    #[test]
    fn map_fields_merge_one_by_one_and_ties_go_to_the_lower_region() {
        let at = |ms: u64, region: &str| Stamp { hlc: HlcTimestamp::new(ms, 0), region: r(region) };
        let mut us = LwwMap::new();
        let mut eu = LwwMap::new();
        us.set("name", b"Lamp".to_vec(), at(10, "us"));
        eu.set("colour", b"red".to_vec(), at(11, "eu"));
        eu.set("name", b"Desk".to_vec(), at(12, "eu"));
        us.delete("colour", at(11, "us"));
        let m = merged(&us, &eu);
        assert_eq!(m.get("name"), Some(&b"Desk"[..]), "the later write wins");
        assert_eq!(m.get("colour"), Some(&b"red"[..]), "on a tie the lower region id wins (eu before us)");
        assert_eq!(m.entries().count(), 2);
        let mut late = LwwMap::new();
        late.set("name", b"Old".to_vec(), at(1, "ap"));
        assert_eq!(merged(&m, &late), m, "an older write arriving later changes nothing");
    }

    /// The observed-remove merge as its paper defines it, member by member, rebuilt: what
    /// the in-place merge must equal.
    fn merged_by_definition(a: &OrSet, b: &OrSet) -> OrSet {
        let names: BTreeSet<&String> = a.members.keys().chain(b.members.keys()).collect();
        let mut members = BTreeMap::new();
        for name in names {
            let tree = |s: &OrSet| -> BTreeSet<Dot> {
                s.members.get(name).map(|d| d.0.iter().cloned().collect()).unwrap_or_default()
            };
            let (mine, theirs) = (&tree(a), &tree(b));
            let dots: BTreeSet<Dot> = mine
                .intersection(theirs)
                .chain(mine.difference(theirs).filter(|d| !b.seen.contains(d)))
                .chain(theirs.difference(mine).filter(|d| !a.seen.contains(d)))
                .cloned()
                .collect();
            if !dots.is_empty() {
                members.insert(name.clone(), Dots(dots.into_iter().collect()));
            }
        }
        let mut seen = a.seen.clone();
        seen.merge(&b.seen);
        OrSet { members, seen }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 10_000, ..Default::default() })]
        /// Three copies take adds, removes and merges in any order; every merge in place
        /// equals the definition's.
        #[test]
        fn the_set_merge_in_place_is_the_definition(
            ops in proptest::collection::vec((0usize..3, 0u8..4, 0usize..3, 0u8..5), 0..40)
        ) {
            let regions = [r("ap"), r("eu"), r("us")];
            let mut copies = [OrSet::new(), OrSet::new(), OrSet::new()];
            for (at, what, from, m) in ops {
                let member = format!("m{m}");
                match what {
                    0 => { copies[at].add(&regions[at], &member); }
                    1 => { copies[at].remove(&member); }
                    2 => copies[at].clear(),
                    _ => {
                        let expected = merged_by_definition(&copies[at], &copies[from]);
                        let other = copies[from].clone();
                        copies[at].merge(&other);
                        proptest::prop_assert_eq!(&copies[at], &expected);
                    }
                }
            }
        }
    }
}
