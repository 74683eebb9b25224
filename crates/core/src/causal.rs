//! Causality between versions of one object: version vectors and dots, with one slot per
//! region (regions, not nodes, are the actors: a region's writes to a key are totally ordered
//! by its Raft group, so one counter per region is enough, and vectors stay small).
//!
//! A [`Dot`] names one write: the region that made it and that region's count of writes to
//! the object so far. A [`VersionVector`] is a set of dots closed downwards per region: slot
//! `r = n` means "every write of region `r` up to its `n`-th". Comparing two vectors says
//! whether one version saw the other ([`Causality`]); clocks never decide it.
//!
//! Merge is the pointwise maximum: commutative, associative and idempotent (property-tested
//! in `tests/crdt_laws.rs`), so copies merged in any order and any number of times agree.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::RegionId;

/// One write: the `counter`-th write of `region` to an object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub region: RegionId,
    pub counter: u64,
}

/// How two versions of an object relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// Both saw exactly the same writes.
    Equal,
    /// The left one saw a strict subset of what the right one saw: the right replaces it.
    Before,
    /// The left one saw a strict superset: it replaces the right.
    After,
    /// Each saw a write the other did not: the dataset's rule decides.
    Concurrent,
}

/// Per region, how many of its writes to an object a version includes. Zero slots are not
/// stored, so equal vectors are equal as values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector {
    slots: BTreeMap<RegionId, u64>,
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes of `region` included.
    pub fn get(&self, region: &RegionId) -> u64 {
        self.slots.get(region).copied().unwrap_or(0)
    }

    /// Record the next write of `region`, and return its dot.
    pub fn increment(&mut self, region: &RegionId) -> Dot {
        let slot = self.slot_mut(region);
        *slot = slot.checked_add(1).expect("a region's write counter never reaches u64::MAX");
        Dot { region: region.clone(), counter: *slot }
    }

    /// Whether the write `dot` is included.
    pub fn contains(&self, dot: &Dot) -> bool {
        self.includes(&dot.region, dot.counter)
    }

    /// Whether write `counter` of `region` is included: [`VersionVector::contains`] without
    /// building the dot.
    pub fn includes(&self, region: &RegionId, counter: u64) -> bool {
        counter != 0 && self.get(region) >= counter
    }

    /// The slot of `region`, created at 0; the name is cloned only when it is new.
    fn slot_mut(&mut self, region: &RegionId) -> &mut u64 {
        if !self.slots.contains_key(region) {
            self.slots.insert(region.clone(), 0);
        }
        self.slots.get_mut(region).expect("inserted above")
    }

    /// Include everything `other` includes.
    pub fn merge(&mut self, other: &VersionVector) {
        for (region, &n) in &other.slots {
            let slot = self.slot_mut(region);
            *slot = (*slot).max(n);
        }
    }

    /// Include one write (and, the vector being closed downwards, those before it).
    pub fn add(&mut self, dot: &Dot) {
        if dot.counter == 0 {
            return;
        }
        let slot = self.slot_mut(&dot.region);
        *slot = (*slot).max(dot.counter);
    }

    /// Whether this vector includes every write `other` includes.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other.slots.iter().all(|(r, &n)| self.get(r) >= n)
    }

    pub fn compare(&self, other: &VersionVector) -> Causality {
        match (self.dominates(other), other.dominates(self)) {
            (true, true) => Causality::Equal,
            (true, false) => Causality::After,
            (false, true) => Causality::Before,
            (false, false) => Causality::Concurrent,
        }
    }

    /// The regions with writes included, and how many each.
    pub fn iter(&self) -> impl Iterator<Item = (&RegionId, u64)> {
        self.slots.iter().map(|(r, &n)| (r, n))
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Regions with a slot.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
}

impl FromIterator<(RegionId, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (RegionId, u64)>>(iter: I) -> Self {
        let mut v = VersionVector::new();
        for (region, n) in iter {
            v.add(&Dot { region, counter: n });
        }
        v
    }
}

/// The text form, `region:n,region:n` in region order (`-` for the empty vector): what a
/// causal context looks like in a header or on a command line.
impl std::fmt::Display for VersionVector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.slots.is_empty() {
            return f.write_str("-");
        }
        for (i, (region, n)) in self.slots.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{region}:{n}")?;
        }
        Ok(())
    }
}

/// Slots a version vector's text form may name: regions are the actors, and a topology has
/// far fewer.
pub const VECTOR_SLOTS_MAX: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a causal context; expected REGION:N[,REGION:N...] as a read returned it, e.g. eu-west:3,us-east:12")]
pub struct VectorParseError {
    pub input: String,
}

impl std::str::FromStr for VersionVector {
    type Err = VectorParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || VectorParseError { input: s.chars().take(128).collect() };
        let s = s.trim();
        if s == "-" {
            return Ok(VersionVector::new());
        }
        let mut v = VersionVector::new();
        for (i, slot) in s.split(',').enumerate() {
            if i >= VECTOR_SLOTS_MAX {
                return Err(err());
            }
            let (region, n) = slot.trim().rsplit_once(':').ok_or_else(err)?;
            let region = RegionId::new(region).map_err(|_| err())?;
            let n: u64 = n.parse().map_err(|_| err())?;
            if v.get(&region) != 0 {
                return Err(err());
            }
            v.add(&Dot { region, counter: n });
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> RegionId {
        RegionId::new(s).expect("region")
    }

    #[test]
    fn vectors_order_what_saw_what_and_nothing_else() {
        let mut a = VersionVector::new();
        let d1 = a.increment(&r("us"));
        assert_eq!(d1, Dot { region: r("us"), counter: 1 });
        let mut b = a.clone();
        assert_eq!(a.compare(&b), Causality::Equal);
        b.increment(&r("eu"));
        assert_eq!((a.compare(&b), b.compare(&a)), (Causality::Before, Causality::After));
        a.increment(&r("us"));
        assert_eq!(a.compare(&b), Causality::Concurrent, "each saw a write the other did not");
        let mut m = a.clone();
        m.merge(&b);
        assert!(m.dominates(&a) && m.dominates(&b));
        assert_eq!(m.iter().collect::<Vec<_>>(), vec![(&r("eu"), 1), (&r("us"), 2)]);
        assert!(m.contains(&d1) && !m.contains(&Dot { region: r("us"), counter: 3 }));
        assert!(!m.contains(&Dot { region: r("us"), counter: 0 }), "no write is numbered 0");
    }

    #[test]
    fn the_text_form_round_trips_and_refuses_what_is_not_one() {
        let v: VersionVector = [(r("us-east"), 12), (r("eu-west"), 3)].into_iter().collect();
        assert_eq!(v.to_string(), "eu-west:3,us-east:12");
        assert_eq!("eu-west:3, us-east:12".parse::<VersionVector>().unwrap(), v);
        assert_eq!("-".parse::<VersionVector>().unwrap(), VersionVector::new());
        assert_eq!(VersionVector::new().to_string(), "-");
        for bad in ["", "eu-west", "eu-west:x", "EU:1", "eu:1,eu:2", "eu:-1"] {
            assert!(bad.parse::<VersionVector>().is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_slots_are_not_stored_so_equal_vectors_are_equal_values() {
        let a: VersionVector = [(r("us"), 0), (r("eu"), 2)].into_iter().collect();
        let b: VersionVector = [(r("eu"), 2)].into_iter().collect();
        assert_eq!(a, b);
    }
}
