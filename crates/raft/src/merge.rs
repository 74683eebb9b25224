//! How a change from another region merges into the copy a region holds, and how a local
//! write builds on it. Pure functions of their inputs, so every voter of a region and every
//! region reach the same state whatever order changes arrive in (property-tested below).
//!
//! Causality decides first, never clocks: a change whose version vector the local copy's
//! dominates is already reflected here and changes nothing; one that dominates the local copy
//! replaces it. Only versions neither side has seen meet the dataset's rule:
//! - `lww` and `siblings` keep the set of concurrent versions (a dotted version vector: a
//!   version survives a merge unless the other side saw its dot and dropped it). `lww` reads
//!   the winner and keeps the losers out of sight, which is what lets every region pick the
//!   same winner; `siblings` reads them all. A write that supersedes them ends them.
//! - `crdt` joins the kinds' states, which is commutative, associative and idempotent.
//!
//! Each merge where versions from both sides survive is a conflict, which the state machine
//! records.

use std::cmp::Ordering;

use meridian_core::crdt::{Crdt, CrdtObject, CrdtState};
use meridian_core::{Causality, Version, VersionVector};

use crate::command::{MergeRule, Sibling, StoredObject};

/// Versions an object keeps at most (the one a read answers with and its siblings). Beyond
/// this, or beyond the value limit in bytes of values together, the last in [`lww_cmp`] order
/// are dropped (their dots stay in the vector, so they never come back; the merge's conflict
/// record keeps them). So an object is never larger than one value at the limit.
pub const VERSIONS_KEPT_MAX: usize = 8;

/// The order last-writer-wins reads in, winner first: the higher HLC, then on equal HLCs the
/// lower region id (then the higher sequence, which only one region's versions share).
pub fn lww_cmp(a: &Version, b: &Version) -> Ordering {
    b.hlc.cmp(&a.hlc).then_with(|| a.region.cmp(&b.region)).then_with(|| b.seq.cmp(&a.seq))
}

/// What merging a change did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)] // built once per change and consumed at once
pub enum Merge {
    /// Everything the change carries is reflected here already.
    Seen,
    /// The state to store. `met` lists the concurrent versions when versions from both
    /// sides survived (a conflict to record), and is empty otherwise.
    Changed { object: StoredObject, met: Vec<Sibling> },
}

/// The simulator's negative control: merge by the newest version alone, with no record, as
/// before version vectors. Never set outside it.
#[doc(hidden)]
pub static PLAIN_LWW_FOR_NEGATIVE_CONTROL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Merge `incoming` into `local` under `rule`. Both are taken by value: a merge moves the
/// versions it keeps and copies only what a conflict record needs.
/// `values_max`: the value limit, which bounds the values an object keeps together.
pub fn merge(local: Option<StoredObject>, incoming: StoredObject, rule: MergeRule, values_max: usize) -> Merge {
    if PLAIN_LWW_FOR_NEGATIVE_CONTROL.load(std::sync::atomic::Ordering::Relaxed) {
        return match local {
            Some(local) if local.version >= incoming.version => Merge::Seen,
            _ => Merge::Changed { object: incoming, met: Vec::new() },
        };
    }
    let Some(local) = local else {
        let met = if incoming.siblings.is_empty() { Vec::new() } else { sorted(siblings_of(&incoming)) };
        return Merge::Changed { object: canonical(incoming, rule, values_max), met };
    };
    match incoming.vv.compare(&local.vv) {
        Causality::Equal | Causality::Before => Merge::Seen,
        Causality::After => {
            // Causally newer, but it may carry concurrent versions this copy never met (a
            // region relaying what it merged): a meeting here too.
            let had = |v: &Version| local.versions().any(|(lv, _)| lv == v);
            let met = if incoming.siblings.is_empty() || incoming.versions().all(|(v, _)| had(v)) {
                Vec::new()
            } else {
                sorted(siblings_of(&incoming))
            };
            Merge::Changed { object: canonical(incoming, rule, values_max), met }
        }
        Causality::Concurrent => match (rule, local.crdt.is_some(), incoming.crdt.is_some()) {
            (MergeRule::Crdt, true, true) => {
                let StoredObject { version: lv, value: lval, mut vv, crdt: mine, .. } = local;
                let StoredObject { version: iv, value: ival, vv: ivv, crdt: theirs, .. } = incoming;
                let mut state = mine.expect("checked above");
                state.merge(&theirs.expect("checked above"));
                vv.merge(&ivv);
                let version = lv.clone().max(iv.clone());
                let value = render(&state);
                let met = vec![Sibling { version: lv, value: lval }, Sibling { version: iv, value: ival }];
                Merge::Changed {
                    object: StoredObject { version, value, vv, siblings: Vec::new(), crdt: Some(state) },
                    met,
                }
            }
            // A conflict-free dataset whose copies are not both conflict-free states (its
            // kind changed while they diverged) falls back to the winner by time.
            (MergeRule::Crdt, _, _) => merge_versions(local, incoming, MergeRule::Lww, values_max),
            (rule, _, _) => merge_versions(local, incoming, rule, values_max),
        },
    }
}

/// What merging a change comes to when that is decided by the local copy's version vector
/// alone (see [`shortcut`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortcut {
    /// Everything the change carries is reflected here already.
    Seen,
    /// The change replaces the copy as it is, and meets nothing.
    Replace,
}

/// What [`merge`] would answer, when the local copy's vector (`None`: no copy) decides it, so
/// the copy need not be read in full: a change it dominates or equals was seen; a causally
/// newer change that keeps a single version replaces it (most changes of every dataset). `None`
/// when the full merge is needed.
pub fn shortcut(local_vv: Option<&VersionVector>, incoming: &StoredObject) -> Option<Shortcut> {
    if PLAIN_LWW_FOR_NEGATIVE_CONTROL.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let newer = match local_vv {
        None => true,
        Some(vv) => match incoming.vv.compare(vv) {
            Causality::Equal | Causality::Before => return Some(Shortcut::Seen),
            Causality::After => true,
            Causality::Concurrent => false,
        },
    };
    (newer && incoming.siblings.is_empty()).then_some(Shortcut::Replace)
}

/// Dotted-version-vector sync of the versions each side keeps: a version survives unless the
/// other side's vector holds its dot and the other side no longer keeps it.
fn merge_versions(local: StoredObject, incoming: StoredObject, rule: MergeRule, values_max: usize) -> Merge {
    let StoredObject { version: lv, value: lval, mut vv, siblings: lsib, .. } = local;
    let StoredObject { version: iv, value: ival, vv: ivv, siblings: isib, .. } = incoming;
    let theirs: Vec<Sibling> = std::iter::once(Sibling { version: iv, value: ival }).chain(isib).collect();
    let mut all: Vec<Sibling> = std::iter::once(Sibling { version: lv, value: lval })
        .chain(lsib)
        .filter(|s| !seen_by(&ivv, &s.version) || theirs.iter().any(|t| t.version == s.version))
        .collect();
    let kept_mine = all.len();
    // A version of theirs this copy's vector holds was seen here: kept already, or dropped by
    // a write that saw it.
    all.extend(theirs.into_iter().filter(|t| !seen_by(&vv, &t.version)));
    vv.merge(&ivv);
    // A meeting this copy has not recorded: more than one version, and one it did not hold.
    let met = if all.len() >= 2 && all.len() > kept_mine { sorted(all.clone()) } else { Vec::new() };
    let object = assemble(all, vv, rule, values_max);
    Merge::Changed { object, met }
}

/// Whether `vv` holds the dot of `v`.
fn seen_by(vv: &VersionVector, v: &Version) -> bool {
    vv.includes(&v.region, v.seq)
}

/// Versions in the order `lww` reads them (taken before an object's bounds drop any, so a
/// conflict record keeps them all).
fn sorted(mut versions: Vec<Sibling>) -> Vec<Sibling> {
    versions.sort_by(|a, b| lww_cmp(&a.version, &b.version));
    versions
}

/// Every version an object keeps, as siblings, the one a read answers with first.
pub fn siblings_of(obj: &StoredObject) -> Vec<Sibling> {
    obj.versions().map(|(v, value)| Sibling { version: v.clone(), value: value.map(<[u8]>::to_vec) }).collect()
}

/// Build the stored form of a set of versions: sorted winner first, the one a read answers
/// with in front (for `siblings` the newest live one, so a key with a live sibling reads as
/// live), the rest as siblings.
pub fn assemble(mut versions: Vec<Sibling>, vv: VersionVector, rule: MergeRule, values_max: usize) -> StoredObject {
    assert!(!versions.is_empty(), "an object keeps at least one version");
    versions.sort_by(|a, b| lww_cmp(&a.version, &b.version));
    versions.dedup_by(|a, b| a.version == b.version);
    // The winner always stays; the others while they fit the count and the bytes.
    let mut bytes = 0usize;
    let mut kept = 0usize;
    for (i, s) in versions.iter().enumerate() {
        bytes += s.value.as_ref().map_or(0, Vec::len);
        if i > 0 && (i >= VERSIONS_KEPT_MAX || bytes > values_max) {
            break;
        }
        kept = i + 1;
    }
    versions.truncate(kept);
    let front = match rule {
        MergeRule::Siblings => versions.iter().position(|s| s.value.is_some()).unwrap_or(0),
        MergeRule::Lww | MergeRule::Crdt => 0,
    };
    let main = versions.remove(front);
    debug_assert!(versions.iter().all(|s| seen_by(&vv, &s.version)), "vv covers every version kept");
    StoredObject { version: main.version, value: main.value, vv, siblings: versions, crdt: None }
}

/// The canonical form of an object under `rule` (a sender under another rule may have put
/// another version in front).
fn canonical(obj: StoredObject, rule: MergeRule, values_max: usize) -> StoredObject {
    if obj.crdt.is_some() || obj.siblings.is_empty() {
        return obj;
    }
    let vv = obj.vv.clone();
    assemble(siblings_of(&obj), vv, rule, values_max)
}

/// A conflict-free state as the JSON a read answers with; `None` when the key was deleted.
/// A counter is a number, a set an array of its members in order, a map an object of its
/// fields (each field's value is the JSON text it was set to).
pub fn render(obj: &CrdtObject) -> Option<Vec<u8>> {
    if !obj.is_live() {
        return None;
    }
    Some(match &obj.state {
        CrdtState::Counter(c) => c.value().to_string().into_bytes(),
        CrdtState::Set(s) => serde_json::to_vec(&s.members().collect::<Vec<_>>()).expect("strings encode"),
        CrdtState::Map(m) => {
            let mut out = b"{".to_vec();
            for (i, (field, value)) in m.entries().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(field).expect("strings encode"));
                out.push(b':');
                out.extend_from_slice(value);
            }
            out.push(b'}');
            out
        }
    })
}

#[cfg(test)]
mod tests {
    use meridian_core::crdt::{CrdtKind, CrdtOp, Stamp};
    use meridian_core::{HlcTimestamp, RegionId};

    use crate::command::dot_of;
    use proptest::prelude::*;

    use super::*;

    const REGIONS: [&str; 3] = ["ap-south", "eu-west", "us-east"];

    fn r(i: usize) -> RegionId {
        RegionId::new(REGIONS[i % 3]).expect("region")
    }

    /// One region's copy of one key, and its write sequence.
    #[derive(Clone, Debug)]
    struct Copy {
        obj: Option<StoredObject>,
        seq: u64,
        ms: u64,
    }

    fn write(c: &mut Copy, at: usize, value: Option<u8>, ms: u64) {
        c.seq += 1;
        c.ms = c.ms.max(ms) + 1;
        let version = Version { hlc: HlcTimestamp::new(c.ms, 0), region: r(at), seq: c.seq };
        let mut vv = c.obj.as_ref().map(|o| o.vv.clone()).unwrap_or_default();
        vv.add(&dot_of(&version));
        c.obj = Some(StoredObject {
            version,
            value: value.map(|v| vec![b'0' + v % 10]),
            vv,
            siblings: Vec::new(),
            crdt: None,
        });
    }

    fn op(c: &mut Copy, at: usize, op: &CrdtOp, ms: u64) {
        c.seq += 1;
        c.ms = c.ms.max(ms) + 1;
        let version = Version { hlc: HlcTimestamp::new(c.ms, 0), region: r(at), seq: c.seq };
        let (mut vv, mut state) = match &c.obj {
            Some(o) => (o.vv.clone(), o.crdt.clone().expect("crdt")),
            None => (VersionVector::new(), CrdtObject::new(CrdtKind::Set)),
        };
        state.apply(op, &r(at), &Stamp { hlc: version.hlc, region: r(at) }).expect("a set op");
        vv.add(&dot_of(&version));
        let value = render(&state);
        c.obj = Some(StoredObject { version, value, vv, siblings: Vec::new(), crdt: Some(state) });
    }

    fn receive(c: &mut Copy, from: &Copy, rule: MergeRule) -> bool {
        let Some(incoming) = &from.obj else { return false };
        let merged = merge(c.obj.clone(), incoming.clone(), rule, 1 << 20);
        // Where the vector alone decides, it decides as the full merge does.
        match shortcut(c.obj.as_ref().map(|o| &o.vv), incoming) {
            Some(Shortcut::Seen) => assert_eq!(merged, Merge::Seen),
            Some(Shortcut::Replace) => {
                assert_eq!(merged, Merge::Changed { object: incoming.clone(), met: Vec::new() })
            }
            None => {}
        }
        match merged {
            Merge::Seen => false,
            Merge::Changed { object, met } => {
                c.ms = c.ms.max(object.version.hlc.wall_ms());
                c.obj = Some(object);
                !met.is_empty()
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Write(usize, Option<u8>, u64),
        Add(usize, u8),
        Remove(usize, u8),
        Send(usize, usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..3, proptest::option::of(any::<u8>()), 0u64..20).prop_map(|(a, v, t)| Step::Write(a, v, t)),
            (0usize..3, 0u8..4).prop_map(|(a, m)| Step::Add(a, m)),
            (0usize..3, 0u8..4).prop_map(|(a, m)| Step::Remove(a, m)),
            (0usize..3, 0usize..3).prop_map(|(a, b)| Step::Send(a, b)),
        ]
    }

    /// Run `steps`, then let every region send to every other twice, in a fixed order: every
    /// copy must end identical.
    fn converge(steps: &[Step], rule: MergeRule) -> (Vec<Copy>, u32) {
        let mut copies = vec![Copy { obj: None, seq: 0, ms: 0 }; 3];
        let mut conflicts = 0;
        for s in steps {
            match (s, rule) {
                (Step::Write(a, v, t), MergeRule::Lww | MergeRule::Siblings) => write(&mut copies[*a], *a, *v, *t),
                (Step::Add(a, m), MergeRule::Crdt) => op(&mut copies[*a], *a, &CrdtOp::Add(vec![m.to_string()]), 0),
                (Step::Remove(a, m), MergeRule::Crdt) => {
                    op(&mut copies[*a], *a, &CrdtOp::Remove(vec![m.to_string()]), 0)
                }
                (Step::Send(a, b), _) if a != b => {
                    let from = copies[*a].clone();
                    conflicts += u32::from(receive(&mut copies[*b], &from, rule));
                }
                _ => {}
            }
        }
        for _ in 0..2 {
            for a in 0..3 {
                for b in 0..3 {
                    if a != b {
                        let from = copies[a].clone();
                        conflicts += u32::from(receive(&mut copies[b], &from, rule));
                    }
                }
            }
        }
        (copies, conflicts)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn every_rule_converges_whatever_the_order_of_merges(steps in proptest::collection::vec(step(), 0..40)) {
            for rule in [MergeRule::Lww, MergeRule::Siblings, MergeRule::Crdt] {
                let (copies, _) = converge(&steps, rule);
                prop_assert_eq!(&copies[0].obj, &copies[1].obj, "{:?}", rule);
                prop_assert_eq!(&copies[1].obj, &copies[2].obj, "{:?}", rule);
            }
        }

        #[test]
        fn no_write_vanishes_without_being_superseded_or_kept(steps in proptest::collection::vec(step(), 0..40)) {
            // Under siblings, every version whose dot no later write saw is still kept: a
            // version is dropped only by a write that saw it.
            let (copies, _) = converge(&steps, MergeRule::Siblings);
            let obj = copies[0].obj.clone();
            if let Some(obj) = obj {
                for (v, _) in obj.versions() {
                    prop_assert!(obj.vv.contains(&dot_of(v)));
                }
            }
        }
    }

    fn v(ms: u64, region: usize, seq: u64) -> Version {
        Version { hlc: HlcTimestamp::new(ms, 0), region: r(region), seq }
    }

    #[test]
    fn concurrent_writes_meet_the_rule_and_an_older_one_changes_nothing() {
        let mut eu = Copy { obj: None, seq: 0, ms: 0 };
        let mut us = Copy { obj: None, seq: 0, ms: 0 };
        write(&mut eu, 1, Some(1), 10);
        let base = eu.clone();
        assert!(!receive(&mut us, &base, MergeRule::Lww), "the first copy is no conflict");
        write(&mut eu, 1, Some(2), 20);
        write(&mut us, 2, Some(3), 20);
        // Same wall time: the lower region (eu-west) wins.
        let mut lww = us.clone();
        assert!(receive(&mut lww, &eu, MergeRule::Lww), "concurrent writes are a conflict");
        let obj = lww.obj.clone().unwrap();
        assert_eq!(obj.value.as_deref(), Some(&b"2"[..]));
        assert_eq!(obj.siblings.len(), 1, "the loser is kept out of sight");
        let mut sib = us.clone();
        assert!(receive(&mut sib, &eu, MergeRule::Siblings));
        assert_eq!(sib.obj.as_ref().unwrap().live_versions().count(), 2);
        // The base again: seen.
        assert_eq!(merge(lww.obj.clone(), base.obj.clone().unwrap(), MergeRule::Lww, 1 << 20), Merge::Seen);
        // A write that saw both supersedes both.
        write(&mut lww, 2, Some(4), 30);
        assert!(lww.obj.as_ref().unwrap().siblings.is_empty());
        assert!(!receive(&mut eu, &lww, MergeRule::Lww), "causally newer replaces");
        assert_eq!(eu.obj.as_ref().unwrap().value.as_deref(), Some(&b"4"[..]));
    }

    #[test]
    fn a_region_that_receives_versions_already_merged_elsewhere_records_their_meeting_too() {
        let mut eu = Copy { obj: None, seq: 0, ms: 0 };
        let mut us = Copy { obj: None, seq: 0, ms: 0 };
        write(&mut eu, 1, Some(1), 10);
        write(&mut us, 2, Some(2), 10);
        let from_us = us.clone();
        assert!(receive(&mut eu, &from_us, MergeRule::Siblings), "eu-west meets us-east's write");
        // ap-south has neither: eu-west's merged copy brings both at once.
        let mut ap = Copy { obj: None, seq: 0, ms: 0 };
        let from_eu = eu.clone();
        assert!(receive(&mut ap, &from_eu, MergeRule::Siblings), "ap-south records the meeting it received");
        // Again: nothing new, no second record.
        assert!(!receive(&mut ap, &from_eu, MergeRule::Siblings));
        let mut ap2 = Copy { obj: None, seq: 0, ms: 0 };
        assert!(!receive(&mut ap2, &from_us, MergeRule::Siblings), "one version is no meeting");
        assert!(receive(&mut ap2, &from_eu, MergeRule::Siblings), "causally newer, with a version it never met");
    }

    #[test]
    fn lww_order_is_by_hlc_then_lower_region() {
        let mut vs = [v(5, 2, 1), v(7, 0, 1), v(7, 1, 9), v(3, 0, 2)];
        vs.sort_by(lww_cmp);
        assert_eq!(
            vs.iter().map(|v| (v.hlc.wall_ms(), v.region.as_str())).collect::<Vec<_>>(),
            vec![(7, "ap-south"), (7, "eu-west"), (5, "us-east"), (3, "ap-south")]
        );
    }

    #[test]
    fn concurrent_set_adds_in_three_regions_merge_to_their_union() {
        let mut copies = vec![Copy { obj: None, seq: 0, ms: 0 }; 3];
        for (i, item) in ["item-7000", "item-7003", "item-7006"].into_iter().enumerate() {
            op(&mut copies[i], i, &CrdtOp::Add(vec![item.into()]), 1);
        }
        let (a, b, c) = (copies[0].clone(), copies[1].clone(), copies[2].clone());
        assert!(receive(&mut copies[0], &b, MergeRule::Crdt));
        assert!(receive(&mut copies[0], &c, MergeRule::Crdt));
        assert!(receive(&mut copies[1], &c, MergeRule::Crdt));
        assert!(receive(&mut copies[1], &a, MergeRule::Crdt));
        let want = br#"["item-7000","item-7003","item-7006"]"#;
        assert_eq!(copies[0].obj.as_ref().unwrap().value.as_deref(), Some(&want[..]));
        assert_eq!(copies[0].obj, copies[1].obj);
    }
}
