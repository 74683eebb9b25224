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

use std::collections::{BTreeMap, BTreeSet};

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
        let slot = side.entry(region.clone()).or_insert(0);
        *slot = slot.checked_add(amount).expect("a region's counter total stays below u64::MAX");
    }

    /// The counter's value.
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
    members: BTreeMap<String, BTreeSet<Dot>>,
    seen: VersionVector,
}

impl OrSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// `region` adds `member`: a new dot replaces the ones this copy had seen for it.
    pub fn add(&mut self, region: &RegionId, member: &str) -> Dot {
        let dot = self.seen.increment(region);
        self.members.insert(member.to_owned(), BTreeSet::from([dot.clone()]));
        dot
    }

    /// Remove `member` as this copy sees it (adds it has not seen survive the merge).
    /// Returns whether it was present.
    pub fn remove(&mut self, member: &str) -> bool {
        self.members.remove(member).is_some()
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
    fn merge(&mut self, other: &Self) {
        let names: BTreeSet<&String> = self.members.keys().chain(other.members.keys()).collect();
        let mut merged = BTreeMap::new();
        for name in names {
            let empty = BTreeSet::new();
            let mine = self.members.get(name).unwrap_or(&empty);
            let theirs = other.members.get(name).unwrap_or(&empty);
            // A dot survives if both copies hold it, or if one holds it and the other has
            // never seen it (had it seen it, its absence there is a remove).
            let dots: BTreeSet<Dot> = mine
                .intersection(theirs)
                .chain(mine.difference(theirs).filter(|d| !other.seen.contains(d)))
                .chain(theirs.difference(mine).filter(|d| !self.seen.contains(d)))
                .cloned()
                .collect();
            if !dots.is_empty() {
                merged.insert(name.clone(), dots);
            }
        }
        self.members = merged;
        self.seen.merge(&other.seen);
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
