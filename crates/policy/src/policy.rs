//! A validated policy: the document, its content hash, and each dataset's rules with every
//! default applied. This is what the evaluator reads; nothing downstream sees the document.

use std::collections::BTreeMap;
use std::fmt;

use meridian_core::{DatasetName, RegionId, Topology};
use sha2::{Digest, Sha256};

use crate::diagnostic::{Diagnostic, Report};
use crate::document::{Classification, ConflictRule, Consistency, Kind, Locality, PolicyDocument, Retention};
use crate::source::{self, Format, Pos};
use crate::units::{Dur, Rate, Window};
use crate::{decode, validate};

/// A policy version's name: the SHA-256 of its canonical form.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyId([u8; 32]);

impl PolicyId {
    /// Characters of the hex form shown in tables; any unique prefix of at least
    /// [`PolicyId::PREFIX_MIN`] names a version.
    pub const SHORT_LEN: usize = 12;
    pub const PREFIX_MIN: usize = 8;

    pub fn of_canonical(canonical: &[u8]) -> Self {
        PolicyId(Sha256::digest(canonical).into())
    }

    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn short(self) -> String {
        self.to_hex()[..Self::SHORT_LEN].to_string()
    }

    pub fn parse_hex(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(PolicyId(out))
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PolicyId({})", self.short())
    }
}

/// Which regions a dataset may ever reach, and which rule said so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// The regions `allowed` lists.
    Listed(Vec<RegionId>),
    /// Restricted data: the home region (for `user` locality, each key's home).
    RestrictedHome,
    /// Regional data without an `allowed` list: its home regions.
    RegionalHomes,
    /// No limit was written: every region of the topology.
    Everywhere,
}

/// Which regions hold a read-only copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorChoice {
    None,
    AllAllowed,
    Listed(Vec<RegionId>),
}

/// When a dataset's links ship.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Continuous,
    Interval { every: Dur, jitter: Dur },
    Window(Window),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sync {
    pub schedule: Schedule,
    pub rate: Option<Rate>,
    pub max_lag: Option<Dur>,
}

/// What releases a held object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Operator,
    After(Dur),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quarantine {
    /// New objects stay in their origin region until released.
    pub hold: bool,
    pub release: Release,
    /// How long a copy found in a forbidden region is kept (never served) before it is purged.
    pub purge_grace: Dur,
}

/// One dataset's rules with every default applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetPolicy {
    pub locality: Locality,
    pub classification: Classification,
    pub kind: Kind,
    /// Fixed home regions, in the order written (the first is preferred); empty for `user`.
    pub homes: Vec<RegionId>,
    pub allowed: Allowed,
    pub mirrors: MirrorChoice,
    pub sync: Sync,
    pub conflict: ConflictRule,
    pub consistency: Consistency,
    pub max_staleness: Option<Dur>,
    pub failover: Vec<RegionId>,
    pub rpo: Option<Dur>,
    pub retention: Retention,
    pub quarantine: Quarantine,
    pub encryption_at_rest: bool,
}

/// Where a dataset's rules came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleSource {
    /// A `[[dataset]]` entry naming it.
    Named,
    /// The policy's `[default]`.
    Default,
}

/// A validated, immutable policy version.
#[derive(Debug, Clone)]
pub struct Policy {
    id: PolicyId,
    canonical: String,
    document: PolicyDocument,
    datasets: BTreeMap<DatasetName, DatasetPolicy>,
    default: Option<DatasetPolicy>,
}

impl Policy {
    /// Parses and validates `text`. With a topology, every region named must exist in it;
    /// without one (an offline check), region names are checked for form only.
    /// `file` is the name diagnostics are reported under.
    pub fn parse(text: &str, format: Format, file: &str, topology: Option<&Topology>) -> Result<Policy, Report> {
        let mut diags: Vec<Diagnostic> = Vec::new();
        let root = source::parse(text, format).map_err(|d| Report::new(file, vec![d]))?;
        let document = decode::decode(&root, &mut diags);
        let Some(document) = document else {
            assert!(!diags.is_empty(), "an undecodable document always says why");
            return Err(Report::new(file, diags));
        };
        let regions: Option<Vec<RegionId>> = topology.map(|t| t.regions().iter().map(|r| r.name.clone()).collect());
        let (datasets, default) = validate::validate(&document, regions.as_deref(), &mut diags);
        if !diags.is_empty() {
            return Err(Report::new(file, diags));
        }
        let canonical = serde_json::to_string(&serde_json::to_value(&document).expect("a document serializes"))
            .expect("a JSON value serializes");
        let id = PolicyId::of_canonical(canonical.as_bytes());
        Ok(Policy { id, canonical, document, datasets, default })
    }

    pub fn id(&self) -> PolicyId {
        self.id
    }

    /// The canonical JSON form the id hashes: sorted keys, no positions, canonical spellings.
    pub fn canonical(&self) -> &str {
        &self.canonical
    }

    pub fn document(&self) -> &PolicyDocument {
        &self.document
    }

    pub fn datasets(&self) -> impl Iterator<Item = (&DatasetName, &DatasetPolicy)> {
        self.datasets.iter()
    }

    pub fn default_rules(&self) -> Option<&DatasetPolicy> {
        self.default.as_ref()
    }

    /// The rules governing `dataset`, or `None` if the policy neither names it nor has a default.
    pub fn rules(&self, dataset: &DatasetName) -> Option<(&DatasetPolicy, RuleSource)> {
        match self.datasets.get(dataset) {
            Some(rules) => Some((rules, RuleSource::Named)),
            None => self.default.as_ref().map(|rules| (rules, RuleSource::Default)),
        }
    }

    /// Every region the policy names, for checking it against a topology that changed since.
    pub fn regions_named(&self) -> Vec<RegionId> {
        let mut out: Vec<RegionId> = Vec::new();
        for rules in self.datasets.values().chain(self.default.iter()) {
            out.extend(rules.homes.iter().cloned());
            out.extend(rules.failover.iter().cloned());
            if let Allowed::Listed(l) = &rules.allowed {
                out.extend(l.iter().cloned());
            }
            if let MirrorChoice::Listed(l) = &rules.mirrors {
                out.extend(l.iter().cloned());
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// A position for problems of the whole document.
pub(crate) const DOCUMENT_START: Pos = Pos { line: 1, column: 1 };
