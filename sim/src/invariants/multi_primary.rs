//! No acknowledged multi-primary write vanishes without a trace.
//!
//! `carts` (a set, merged by its laws) and `notes` (documents, last writer wins) have a home in
//! every region, and clients write them through gateways everywhere, so the same key takes
//! concurrent writes in several regions. Checked after the heal, once every copy of them is
//! identical on all nine nodes:
//!
//! (a) `carts`: every member an acknowledged add put in is a member of the key's set on every
//!     node. The workload never removes and adds each member once, so add-wins leaves no
//!     excuse for a missing one.
//!
//! (b) `notes`: for every acknowledged put, whose answer named its version V (origin region A,
//!     A's sequence s), on every node:
//!     1. the copy's version vector contains V's dot (A, s): the copy's history includes V;
//!     2. V left a trace, at least one of:
//!        - it is one of the copy's versions (the one a read answers with, or a loser kept out
//!          of sight), with the value the client wrote;
//!        - it is among the versions of a conflict record for the key, in some region, with
//!          the value the client wrote;
//!        - a later write of A itself to the key (an acknowledged or seen version of A with a
//!          higher sequence): A applies its writes to a key in the order of its log, and each
//!          is stamped with everything A's copy holds, which includes V or a write that saw it;
//!        - a write X of another region whose own history contains V's dot.
//!
//! A write's own history is the vector it was stamped with: its region's vector for the key
//! plus its dot. The simulator learns it from objects whose only version is X: a local write
//! leaves exactly that, and a correct merge that leaves a single version leaves that version's
//! vector (everything either side carried was in it). Such objects are collected
//! on every node of the writing region as soon as a write to `notes` answers (whatever the
//! answer), from every link batch and repair that crosses regions, and from the final copies.
//! Where several were seen for one version, their meet (pointwise minimum) is kept, so a vector
//! that a faulty merge inflated after the write cannot explain a loss away.
//!
//! The last rule is needed: a write of another region that merged V and then wrote the key
//! supersedes V with no conflict and no later write of A. With only the final copies as
//! evidence, 9 of 40 seeds failed on such writes; with the copies read after each write, or
//! with the link batches and repairs, alone, 100 seeds of 100 passed.
//!
//! What it cannot tell: a vector says "every write of A to the key up to the n-th", so a copy
//! that silently dropped V but later took in a write of A after V looks like one that saw V.
//! The losses it catches are those where no later write claims to have seen V: the last write
//! of a region lost to a concurrent one (1 fails), or a merge that keeps the vectors but drops
//! a concurrent version with no record (2 fails). `--plain-lww` (merge by the newest version
//! alone, no vectors, no records) must fail it, and `tests/invariants_can_fail.rs` checks that.

use std::collections::{BTreeMap, BTreeSet};

use meridian_core::{RegionId, Version, VersionVector};
use meridian_raft::command::{dot_of, StoredObject};
use meridian_raft::conflicts::ConflictQuery;

use super::Violation;
use crate::workload::{CARTS, NOTES};
use crate::world::Live;

pub const INVARIANT: &str = "no acknowledged multi-primary write vanishes";

/// An acknowledged put to `notes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedPut {
    pub client: u64,
    pub key: String,
    pub version: Version,
    /// The JSON text written.
    pub value: String,
    /// When the answer came, in simulated ns.
    pub at_ns: u64,
}

/// What the multi-primary workload did, and what the simulator saw of `notes`' histories.
#[derive(Debug, Default)]
pub struct Record {
    /// (dataset, key) of every multi-primary key a client tried to write.
    pub keys: BTreeSet<(String, String)>,
    /// Acknowledged adds to `carts`: (key, member, client, when answered in ns).
    pub adds: Vec<(String, String, u64, u64)>,
    pub puts: Vec<AckedPut>,
    /// Calls whose outcome is not known (maybe applied), and calls refused, of both datasets.
    pub unknown: u64,
    pub refused: u64,
    /// `notes`: key -> version -> the meet of the vectors of every object seen whose only
    /// version it was.
    histories: BTreeMap<String, BTreeMap<Version, VersionVector>>,
    /// `notes`: every version seen in any object, by key.
    seen: BTreeMap<String, BTreeSet<Version>>,
}

impl Record {
    /// Note one object of `notes` under `key`, wherever it was seen.
    pub fn observe(&mut self, key: &str, obj: &StoredObject) {
        let seen = self.seen.entry(key.to_owned()).or_default();
        for (v, _) in obj.versions() {
            if !seen.contains(v) {
                seen.insert(v.clone());
            }
        }
        if !obj.siblings.is_empty() || obj.crdt.is_some() {
            return;
        }
        let histories = self.histories.entry(key.to_owned()).or_default();
        match histories.get_mut(&obj.version) {
            Some(h) => *h = meet(h, &obj.vv),
            None => {
                histories.insert(obj.version.clone(), obj.vv.clone());
            }
        }
    }

    /// Versions of `notes` known for `key`: seen in some object, or acknowledged.
    fn versions_of<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Version> + 'a {
        self.seen
            .get(key)
            .into_iter()
            .flatten()
            .chain(self.puts.iter().filter(move |p| p.key == key).map(|p| &p.version))
    }
}

/// The pointwise minimum of two vectors.
fn meet(a: &VersionVector, b: &VersionVector) -> VersionVector {
    a.iter().map(|(r, n)| (r.clone(), n.min(b.get(r)))).filter(|(_, n)| *n > 0).collect()
}

/// A vector as `{region: n, ...}`.
pub fn show(vv: &VersionVector) -> String {
    let slots: Vec<String> = vv.iter().map(|(r, n)| format!("{r}: {n}")).collect();
    format!("{{{}}}", slots.join(", "))
}

/// How the acknowledged writes checked left their trace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub adds: u64,
    pub puts: u64,
    /// Puts still among the final copy's versions, in a conflict record (and not kept),
    /// superseded by a later write of their own region, or by a write of another region.
    pub kept: u64,
    pub recorded: u64,
    pub superseded_here: u64,
    pub superseded_elsewhere: u64,
}

fn violation(detail: String) -> Violation {
    Violation { invariant: INVARIANT.into(), detail }
}

fn read(node: &Live, id: u64, dataset: &str, key: &str) -> Result<Option<StoredObject>, Violation> {
    node.node.reader().get(dataset, key).map_err(|e| violation(format!("node {id} read {dataset}/{key}: {e}")))
}

/// Check every acknowledged write of the record against the copies of the nodes `live`, which
/// must all be identical by now (see `convergence`): the first violation of each dataset.
pub fn check(record: &mut Record, live: &BTreeMap<u64, Live>) -> Result<Stats, Vec<Violation>> {
    let mut stats = Stats::default();
    let mut violations = Vec::new();
    if let Err(v) = check_sets(record, live, &mut stats) {
        violations.push(v);
    }
    if let Err(v) = check_notes(record, live, &mut stats) {
        violations.push(v);
    }
    if violations.is_empty() {
        Ok(stats)
    } else {
        Err(violations)
    }
}

/// (a) Every acknowledged add is a member of the final set, on every node.
fn check_sets(record: &Record, live: &BTreeMap<u64, Live>, stats: &mut Stats) -> Result<(), Violation> {
    // (node, key) -> the members its copy holds.
    let mut sets: BTreeMap<(u64, &str), BTreeSet<String>> = BTreeMap::new();
    for (key, member, client, at) in &record.adds {
        for (&id, node) in live {
            let members = match sets.entry((id, key.as_str())) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    let members = match read(node, id, CARTS, key)? {
                        Some(StoredObject { value: Some(v), .. }) => serde_json::from_slice::<Vec<String>>(&v)
                            .map_err(|e| violation(format!("node {id}: {CARTS}/{key} is not a set of strings: {e}")))?,
                        _ => Vec::new(),
                    };
                    e.insert(members.into_iter().collect())
                }
            };
            if !members.contains(member) {
                return Err(violation(format!(
                    "{CARTS}/{key}: client {client}'s add of {member:?}, acknowledged at {:.3} s, is not in the set \
                     node {id} ({}) holds ({} members)",
                    *at as f64 / 1e9,
                    node.region(),
                    members.len()
                )));
            }
        }
        stats.adds += 1;
    }
    Ok(())
}

/// The versions some region's conflict records name for one key, each with its value and the
/// region that recorded it.
type Recorded = BTreeMap<Version, (RegionId, Option<Vec<u8>>)>;

/// The conflict records of `notes/key` in every region (one node each: a region's nodes agree).
fn recorded(live: &BTreeMap<u64, Live>, key: &str) -> Result<Recorded, Violation> {
    let mut versions = Recorded::new();
    let mut regions = BTreeSet::new();
    for (&id, node) in live {
        if !regions.insert(node.region().clone()) {
            continue;
        }
        let q = ConflictQuery { dataset: Some(NOTES), key: Some(key), limit: usize::MAX, ..Default::default() };
        let found = node
            .node
            .reader()
            .conflicts(&q)
            .map_err(|e| violation(format!("node {id} list the conflicts of {NOTES}/{key}: {e}")))?;
        for (rec, _) in found {
            for s in rec.versions {
                versions.insert(s.version, (node.region().clone(), s.value));
            }
        }
    }
    Ok(versions)
}

/// (b) Every acknowledged put is in every final history, and left a trace.
fn check_notes(record: &mut Record, live: &BTreeMap<u64, Live>, stats: &mut Stats) -> Result<(), Violation> {
    // Every node's final copy of each key; they are observations too.
    let mut copies: BTreeMap<String, Vec<(u64, StoredObject)>> = BTreeMap::new();
    let mut records: BTreeMap<String, Recorded> = BTreeMap::new();
    for (dataset, key) in &record.keys {
        if dataset != NOTES {
            continue;
        }
        let mut held = Vec::new();
        for (&id, node) in live {
            if let Some(obj) = read(node, id, NOTES, key)? {
                held.push((id, obj));
            }
        }
        copies.insert(key.clone(), held);
        records.insert(key.clone(), recorded(live, key)?);
    }
    for (key, held) in &copies {
        for (_, obj) in held {
            record.observe(key, obj);
        }
    }
    for put in &record.puts {
        let key = put.key.as_str();
        let v = &put.version;
        let dot = dot_of(v);
        let what = || {
            format!(
                "{NOTES}/{key}: client {}'s put of {} (version {v}), acknowledged at {:.3} s,",
                put.client,
                put.value,
                put.at_ns as f64 / 1e9
            )
        };
        let held = copies.get(key).map(Vec::as_slice).unwrap_or_default();
        if let Some(id) = live.keys().find(|id| !held.iter().any(|(h, _)| h == *id)) {
            return Err(violation(format!("{} has no copy on node {id} ({})", what(), live[id].region())));
        }
        for (id, obj) in held {
            if !obj.vv.contains(&dot) {
                return Err(violation(format!(
                    "{} is not in the history of node {id}'s ({}) copy: vector {}, version {}",
                    what(),
                    live[id].region(),
                    show(&obj.vv),
                    obj.version
                )));
            }
        }
        // The copies are identical (convergence checked it): the first speaks for all.
        let Some((_, fin)) = held.first() else { continue };
        let written = Some(put.value.as_bytes());
        if let Some((_, value)) = fin.versions().find(|(kept, _)| *kept == v) {
            if value != written {
                return Err(violation(format!(
                    "{} is kept with another value: {:?}",
                    what(),
                    value.map(String::from_utf8_lossy)
                )));
            }
            stats.kept += 1;
        } else if let Some((region, value)) = records.get(key).and_then(|r| r.get(v)) {
            if value.as_deref() != written {
                return Err(violation(format!(
                    "{} is in a conflict record of {region} with another value: {:?}",
                    what(),
                    value.as_deref().map(String::from_utf8_lossy)
                )));
            }
            stats.recorded += 1;
        } else if record.versions_of(key).any(|x| x.region == v.region && x.seq > v.seq) {
            stats.superseded_here += 1;
        } else if record.histories.get(key).into_iter().flatten().any(|(x, h)| x != v && h.contains(&dot)) {
            stats.superseded_elsewhere += 1;
        } else {
            return Err(violation(format!(
                "{} vanished without a trace: the final copy keeps {} (and out of sight: {}), no region's conflict \
                 records name it, and no later write is known to have seen it",
                what(),
                fin.version,
                fin.siblings.iter().map(|s| s.version.to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        stats.puts += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use meridian_core::HlcTimestamp;

    use super::*;

    fn version(ms: u64, region: &str, seq: u64) -> Version {
        Version { hlc: HlcTimestamp::new(ms, 0), region: RegionId::new(region).expect("region"), seq }
    }

    fn vv(slots: &[(&str, u64)]) -> VersionVector {
        slots.iter().map(|&(r, n)| (RegionId::new(r).expect("region"), n)).collect()
    }

    #[test]
    fn the_meet_of_two_histories_keeps_what_both_saw() {
        let m = meet(&vv(&[("us-east", 3), ("eu-west", 5)]), &vv(&[("us-east", 4), ("ap-south", 1)]));
        assert_eq!(m, vv(&[("us-east", 3)]));
    }

    #[test]
    fn a_history_is_learned_only_from_an_object_with_one_version() {
        let mut r = Record::default();
        let x = version(10, "eu-west", 7);
        let mut obj = StoredObject::plain(x.clone(), Some(b"1".to_vec()));
        obj.vv = vv(&[("eu-west", 7), ("us-east", 2)]);
        r.observe("k", &obj);
        // Seen again after a merge inflated its vector: the meet keeps the smaller one.
        obj.vv = vv(&[("eu-west", 7), ("us-east", 9)]);
        r.observe("k", &obj);
        assert_eq!(r.histories["k"][&x], vv(&[("eu-west", 7), ("us-east", 2)]));
        // With a sibling, the vector is the union of several histories: not learned.
        let y = version(11, "ap-south", 1);
        let mut two = StoredObject::plain(y.clone(), Some(b"2".to_vec()));
        two.siblings.push(meridian_raft::command::Sibling { version: x, value: Some(b"1".to_vec()) });
        r.observe("k", &two);
        assert!(!r.histories["k"].contains_key(&y));
        assert!(r.versions_of("k").any(|v| *v == y));
    }
}
