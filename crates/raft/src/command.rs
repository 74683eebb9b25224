//! What the region's Raft log carries, and what applying it answers.
//!
//! Architecture invariant: applying the log is a pure function of the log. The leader stamps
//! each write with its HLC reading before proposing it; the state machine then makes the
//! stamp strictly greater than every earlier one it applied and assigns the next region
//! sequence, so every voter ends in the same state byte for byte.

use meridian_core::crdt::{CrdtKind, CrdtObject, CrdtOp};
use meridian_core::{Dot, HlcTimestamp, Version, VersionVector};
use serde::{Deserialize, Serialize};

/// A command in the log. The outer enum is the wire and disk version: a new format is a new
/// variant, and old ones keep decoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    V1(CommandV1),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandV1 {
    /// Store a JSON value (as its text) under (dataset, key).
    Put {
        dataset: String,
        key: String,
        #[serde(with = "meridian_core::byte_strings::bytes")]
        value: Vec<u8>,
        hlc: HlcTimestamp,
        condition: Condition,
    },
    /// Replace the value with a tombstone.
    Delete { dataset: String, key: String, hlc: HlcTimestamp, condition: Condition },
    /// Several writes from different clients proposed as one log entry, applied in order, each
    /// with its own result. The gateway batches writes that arrive while earlier proposals are
    /// in flight, so the leader makes one log append (one fsync) for all of them.
    Batch(Vec<CommandV1>),
    /// Writes nothing; inside an [`CommandV1::Atomic`] group, its condition guards the others
    /// (the gateway pins the policy record it routed by this way). Applied alone it answers
    /// [`CommandResult::Nothing`] or [`CommandResult::PreconditionFailed`].
    Check { dataset: String, key: String, condition: Condition },
    /// Changes another region originated, shipped by its link: applied exactly once, keyed by
    /// the source region and its sequence. The batch covers the source's outbox range
    /// `from_seq..=upto_seq` (changes the link's filter withheld are simply absent); it applies
    /// only if it starts at or before what this region has merged from the source, so a resend
    /// is harmless and a gap is refused.
    ApplyRemote { source: String, from_seq: u64, upto_seq: u64, changes: Vec<RemoteChange> },
    /// Record how far the link to `destination` has been acknowledged (it may move back, when
    /// a destination reports it has less than the cursor says).
    SetCursor { destination: String, upto_seq: u64 },
    /// Several writes that apply together or not at all: every condition is checked against
    /// the state before any of them is written. Used for metadata whose records must agree
    /// (a policy version, its history entry and the active pointer). No two may name the
    /// same key; the proposer refuses such a command before it reaches the log.
    Atomic(Vec<CommandV1>),
    /// Changes another region holds, sent outside the sequenced link: a catch-up scan after
    /// the outbox was trimmed past a link's cursor, a backfill after a policy change made this
    /// region a holder, or an anti-entropy repair. Each change applies only if its version is
    /// newer than the local copy, so any resend is harmless; the merged ranges do not move.
    Repair { source: String, changes: Vec<RemoteChange> },
    /// Remove copies this region's policy no longer lets it hold: each key is removed (not
    /// tombstoned) only if its stored version is still exactly the given one. Never shipped.
    Purge { dataset: String, keys: Vec<(String, Version)> },
    /// Record that the link to `destination` has backfilled everything the policy entry with
    /// this epoch newly lets it hold.
    SetBackfilled { destination: String, epoch: u64 },
    /// [`CommandV1::ApplyRemote`] that also says how fresh the range is: everything the source
    /// committed before `fresh_ms` (its wall clock) is at or below `upto_seq`. An empty range
    /// at or below what is merged (a heartbeat) only refreshes that time.
    ApplyRemoteAt { source: String, from_seq: u64, upto_seq: u64, fresh_ms: u64, changes: Vec<RemoteChange> },
    /// An operation on a conflict-free value (a counter, set or map dataset): applied to the
    /// stored state, or to a new one of `kind` if the key holds none.
    Op { dataset: String, key: String, op: CrdtOp, kind: CrdtKind, hlc: HlcTimestamp, condition: Condition },
    /// A write (`None`: a delete) that supersedes exactly the versions `context` has seen; any
    /// other version stored under the key stays beside it as a sibling.
    PutInContext {
        dataset: String,
        key: String,
        #[serde(with = "meridian_core::byte_strings::option_bytes")]
        value: Option<Vec<u8>>,
        hlc: HlcTimestamp,
        condition: Condition,
        context: VersionVector,
    },
    /// [`CommandV1::ApplyRemoteAt`] with changes that carry their causal history: each merges
    /// by causality, and concurrent versions by the rule the change names (what this
    /// region's policy said when it proposed the batch).
    ApplyChanges { source: String, from_seq: u64, upto_seq: u64, fresh_ms: u64, changes: Vec<Change> },
    /// [`CommandV1::Repair`] with changes that carry their causal history.
    RepairChanges { source: String, changes: Vec<Change> },
    /// Remove tombstones every region that may hold them holds alike: each key is removed
    /// only if its stored object is still exactly the given one (a write since keeps it).
    /// Decided by the tombstone's origin region, never shipped by links (see
    /// `docs/conflicts.md`, "Deletes and tombstones").
    CollectTombstones { dataset: String, keys: Vec<(String, StoredObject)> },
}

/// A precondition checked at apply time, inside the log's total order, which is what makes
/// compare-and-set linearizable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    Always,
    /// The current live version must be exactly this one.
    IfMatch(Version),
    /// There must be no live value (create-only).
    IfAbsent,
}

/// The outcome of applying one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Blank and membership entries.
    Nothing,
    Written {
        version: Version,
        created: bool,
    },
    Deleted {
        version: Version,
    },
    /// A delete of a key that holds no live value: nothing was written.
    NotFound,
    PreconditionFailed {
        current: Option<Version>,
    },
    /// The results of a [`CommandV1::Batch`] or an applied [`CommandV1::Atomic`], in order.
    Batch(Vec<CommandResult>),
    /// An [`CommandV1::Atomic`] whose condition at `index` did not hold: nothing was written.
    AtomicFailed {
        index: u32,
        current: Option<Version>,
    },
    /// An applied (or duplicate) [`CommandV1::ApplyRemote`]: everything from the source up to
    /// `merged_upto` is merged here; `applied` changes were newer than the local copy.
    Remote {
        merged_upto: u64,
        applied: u32,
    },
    /// A [`CommandV1::ApplyRemote`] that starts past what is merged: nothing was applied; the
    /// source must resend from `merged_upto + 1`.
    RemoteGap {
        merged_upto: u64,
    },
    /// An applied [`CommandV1::Repair`]: `applied` changes were newer than the local copy.
    Repaired {
        applied: u32,
    },
    /// An applied [`CommandV1::Purge`]: `removed` copies were removed.
    Purged {
        removed: u32,
    },
    /// A [`CommandV1::Op`] that does not fit the kind the key holds: nothing was written.
    KindMismatch {
        /// `None`: the key holds a plain JSON value.
        held: Option<CrdtKind>,
    },
    /// An applied [`CommandV1::CollectTombstones`]: `removed` tombstones were removed.
    Collected {
        removed: u32,
    },
}

/// One change as it travels between regions. It keeps the version it was given at its origin,
/// so every copy of a key carries the same version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteChange {
    pub dataset: String,
    pub key: String,
    pub version: Version,
    /// The JSON text; `None` is a tombstone.
    #[serde(with = "meridian_core::byte_strings::option_bytes")]
    pub value: Option<Vec<u8>>,
}

/// One change as it travels between regions since objects carry their causal history: the
/// whole stored object (every version kept, the version vector, a conflict-free state), and
/// the rule the receiving region merges concurrent versions by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub dataset: String,
    pub key: String,
    pub object: StoredObject,
    pub rule: MergeRule,
}

/// How concurrent versions of one key become one state: the policy's `conflict`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MergeRule {
    /// The highest HLC wins, ties to the lower region id; the others are kept out of sight
    /// (so every region picks the same winner) until a write supersedes them.
    Lww,
    /// Every concurrent version is kept and read; a write carrying their context ends them.
    Siblings,
    /// Merged by the kind's laws.
    Crdt,
}

impl MergeRule {
    pub fn name(self) -> &'static str {
        match self {
            MergeRule::Lww => "lww",
            MergeRule::Siblings => "siblings",
            MergeRule::Crdt => "crdt",
        }
    }
}

/// What a region's outbox records for each write it originates: the key, not the value (the
/// link reads the object when it ships, so values are not stored twice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub dataset: String,
    pub key: String,
}

/// One object as stored: the version a read answers with and its value (or a tombstone),
/// the object's causal history, the concurrent versions kept beside it, and for a
/// conflict-free dataset the state its value renders.
///
/// Invariants (kept by [`crate::merge`]): `vv` holds the dot of every version kept and of
/// every version they superseded; no sibling's version equals `version`; siblings are in
/// the order [`crate::merge::lww_cmp`] gives, winner first; a conflict-free object has no
/// siblings and its `value` is its state rendered as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredObject {
    pub version: Version,
    /// The JSON text; `None` is a tombstone.
    #[serde(with = "meridian_core::byte_strings::option_bytes")]
    pub value: Option<Vec<u8>>,
    /// Every write this object reflects, by region: a version's dot is (its region, its
    /// region sequence).
    pub vv: VersionVector,
    /// Versions concurrent with `version` that the dataset's rule keeps.
    pub siblings: Vec<Sibling>,
    /// A counter, set or map dataset's state.
    pub crdt: Option<CrdtObject>,
}

/// A version kept beside the one a read answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sibling {
    pub version: Version,
    #[serde(with = "meridian_core::byte_strings::option_bytes")]
    pub value: Option<Vec<u8>>,
}

impl StoredObject {
    /// An object with one version and no history beyond it: what a record written before
    /// objects carried version vectors reads as, and what a first write creates.
    pub fn plain(version: Version, value: Option<Vec<u8>>) -> StoredObject {
        let vv = [(version.region.clone(), version.seq)].into_iter().collect();
        StoredObject { version, value, vv, siblings: Vec::new(), crdt: None }
    }

    pub fn is_live(&self) -> bool {
        self.value.is_some()
    }

    /// A tombstone and nothing else: no value, no version kept beside it, no live state.
    /// What tombstone collection may remove.
    pub fn is_bare_tombstone(&self) -> bool {
        self.value.is_none() && self.siblings.is_empty() && self.crdt.as_ref().is_none_or(|c| !c.is_live())
    }

    /// Every version kept, the one a read answers with first.
    pub fn versions(&self) -> impl Iterator<Item = (&Version, Option<&[u8]>)> {
        std::iter::once((&self.version, self.value.as_deref()))
            .chain(self.siblings.iter().map(|s| (&s.version, s.value.as_deref())))
    }

    /// Its size encoded (on the wire, in the log and on disk, give or take a byte).
    pub fn encoded_len(&self) -> usize {
        postcard::to_stdvec(self).map_or(0, |v| v.len())
    }

    /// Its bytes for batching and rate limits, cheaply: the values it keeps and its vector
    /// (a conflict-free state is measured encoded).
    pub fn payload_len(&self) -> usize {
        if self.crdt.is_some() {
            return self.encoded_len();
        }
        let values: usize = self.versions().map(|(_, v)| v.map_or(0, <[u8]>::len) + 24).sum();
        values + self.vv.iter().map(|(r, _)| r.as_str().len() + 10).sum::<usize>()
    }

    /// The live values kept: more than one when siblings wait for a choice.
    pub fn live_versions(&self) -> impl Iterator<Item = (&Version, &[u8])> {
        self.versions().filter_map(|(v, value)| value.map(|value| (v, value)))
    }
}

/// A version's dot: its origin region and that region's sequence.
pub fn dot_of(v: &Version) -> Dot {
    Dot { region: v.region.clone(), counter: v.seq }
}

/// The stored form of an object before version vectors; still read.
#[derive(Deserialize)]
struct StoredObjectV1 {
    version: Version,
    #[serde(with = "meridian_core::byte_strings::option_bytes")]
    value: Option<Vec<u8>>,
}

/// The format byte of an object record since objects carry version vectors.
pub const OBJECT_FORMAT: u8 = 2;

/// Encode an object for the objects table.
pub fn encode_object(obj: &StoredObject) -> Vec<u8> {
    // Sized once for what it will hold (its values, and for a conflict-free state about as
    // much again), so encoding neither grows the buffer step by step nor copies it after.
    let values: usize = obj.versions().map(|(_, v)| v.map_or(0, <[u8]>::len)).sum();
    let state = if obj.crdt.is_some() { 2 * values + 256 } else { 0 };
    let mut out = Vec::with_capacity(1 + values + state + 64 * (1 + obj.siblings.len()) + 16 * obj.vv.len());
    out.push(OBJECT_FORMAT);
    postcard::to_extend(obj, out).expect("postcard encodes our own types")
}

/// Decode an object record in either form: one written before version vectors reads as a
/// [`StoredObject::plain`] of its version.
pub fn decode_object(bytes: &[u8]) -> Result<StoredObject, crate::DecodeError> {
    match bytes.split_first() {
        Some((&OBJECT_FORMAT, rest)) => {
            postcard::from_bytes(rest).map_err(|e| crate::DecodeError::Corrupt(e.to_string()))
        }
        Some((&crate::FORMAT_VERSION, _)) => {
            let v1: StoredObjectV1 = crate::decode(bytes)?;
            Ok(StoredObject::plain(v1.version, v1.value))
        }
        Some((&v, _)) => Err(crate::DecodeError::UnknownFormat(v)),
        None => Err(crate::DecodeError::Corrupt("empty record".into())),
    }
}

/// The version vector of an object record, read without decoding its values, siblings or
/// state (the fields after it): what a merge looks at first.
pub fn decode_object_vv(bytes: &[u8]) -> Result<VersionVector, crate::DecodeError> {
    /// The leading fields of [`StoredObject`]'s encoding, the value borrowed.
    #[derive(Deserialize)]
    struct Head<'a> {
        #[allow(dead_code)] // read to reach the vector
        version: Version,
        #[allow(dead_code)]
        #[serde(borrow)]
        value: Option<&'a [u8]>,
        vv: VersionVector,
    }
    match bytes.split_first() {
        Some((&OBJECT_FORMAT, rest)) => postcard::take_from_bytes::<Head<'_>>(rest)
            .map(|(head, _)| head.vv)
            .map_err(|e| crate::DecodeError::Corrupt(e.to_string())),
        _ => decode_object(bytes).map(|o| o.vv),
    }
}

/// The storage key of (dataset, key): the dataset name, a NUL, then the key. Dataset names
/// never contain NUL, so the first NUL always splits the two, and all keys of one dataset
/// are contiguous and ordered by key bytes.
pub fn object_key(dataset: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(dataset.len() + 1 + key.len());
    k.extend_from_slice(dataset.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

/// Split a storage key back into (dataset, key).
pub fn split_object_key(k: &[u8]) -> Option<(&str, &str)> {
    let nul = k.iter().position(|&b| b == 0)?;
    let dataset = std::str::from_utf8(&k[..nul]).ok()?;
    let key = std::str::from_utf8(&k[nul + 1..]).ok()?;
    Some((dataset, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_keys_split_and_order() {
        let a = object_key("orders", "a/b\u{e9}");
        assert_eq!(split_object_key(&a), Some(("orders", "a/b\u{e9}")));
        // every key of "ab" sorts before any key of "ab-x": NUL is the smallest byte.
        assert!(object_key("ab", "\u{10ffff}") < object_key("ab-x", "a"));
    }

    #[test]
    fn the_vector_reads_from_the_head_of_every_form_of_object() {
        use meridian_core::crdt::Stamp;
        use meridian_core::RegionId;
        let us = RegionId::new("us-east").unwrap();
        let eu = RegionId::new("eu-west").unwrap();
        let v = |region: &RegionId, seq: u64| Version {
            hlc: HlcTimestamp::new(1_000 + seq, 0),
            region: region.clone(),
            seq,
        };
        let vv: VersionVector = [(us.clone(), 3), (eu.clone(), 2)].into_iter().collect();
        let mut set = CrdtObject::new(CrdtKind::Set);
        set.apply(&CrdtOp::Add(vec!["x".into()]), &us, &Stamp { hlc: HlcTimestamp::new(1, 0), region: us.clone() })
            .unwrap();
        let objects = [
            StoredObject::plain(v(&us, 1), Some(b"\"a\"".to_vec())),
            StoredObject::plain(v(&us, 2), None),
            StoredObject {
                version: v(&us, 3),
                value: Some(vec![b'7'; 300]),
                vv: vv.clone(),
                siblings: vec![Sibling { version: v(&eu, 2), value: Some(b"1".to_vec()) }],
                crdt: None,
            },
            StoredObject {
                version: v(&eu, 2),
                value: Some(b"[\"x\"]".to_vec()),
                vv: vv.clone(),
                siblings: vec![],
                crdt: Some(set),
            },
        ];
        for obj in objects {
            assert_eq!(decode_object_vv(&encode_object(&obj)).unwrap(), obj.vv, "{obj:?}");
        }
        #[derive(Serialize)]
        struct V1 {
            version: Version,
            value: Option<Vec<u8>>,
        }
        let legacy = crate::encode(&V1 { version: v(&us, 9), value: None });
        assert_eq!(decode_object_vv(&legacy).unwrap(), StoredObject::plain(v(&us, 9), None).vv);
        assert!(decode_object_vv(&[OBJECT_FORMAT, 0xff]).is_err(), "a cut record is corrupt, not an empty vector");
    }
}
