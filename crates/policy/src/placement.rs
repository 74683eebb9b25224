//! The evaluator: (policy version, topology, dataset, key, object attributes) → [`Placement`].
//!
//! Pure and deterministic: no I/O, no clock, no randomness; the same inputs give the same
//! placement on every node and in every release that keeps [`stable_hash`]. Replication, routing
//! and remediation consume placements; none of them reads the policy.

use std::fmt;

use meridian_core::{DatasetName, Key, RegionId, Topology};

use crate::document::{Classification, ConflictRule, Consistency, Kind, Locality, Retention};
use crate::policy::{Allowed, MirrorChoice, Policy, PolicyId, Release, RuleSource, Schedule};
use crate::units::{Dur, Rate};

/// What the caller knows about the object beyond its key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectAttributes {
    /// For `user` locality: the home given at the key's first write (immutable afterwards; the
    /// caller enforces that). Ignored for other localities.
    pub home: Option<RegionId>,
    /// The region the object was first written in, where a held object stays.
    pub origin: Option<RegionId>,
    pub quarantine: QuarantineTag,
}

/// An object's own quarantine mark, beside its dataset's rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QuarantineTag {
    /// Follows the dataset's rule.
    #[default]
    None,
    /// Tagged by an operator or a rule: held in its origin region.
    Held,
    /// Released by an operator (or by age, as the caller decided): ships normally.
    Released,
}

/// Why no placement can be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("dataset \"{dataset}\" is not in policy {policy} and the policy has no default")]
    DatasetNotInPolicy { dataset: DatasetName, policy: String },
    #[error("key {key:?} of user-homed dataset \"{dataset}\" has no home: no region prefix and no `home` attribute")]
    HomeUnknown { dataset: DatasetName, key: String },
    #[error("the key's prefix names region \"{prefix}\" but its `home` attribute says \"{attribute}\"")]
    HomeMismatch { prefix: RegionId, attribute: RegionId },
    #[error("home \"{home}\" is not allowed for dataset \"{dataset}\"")]
    HomeNotAllowed { dataset: DatasetName, home: RegionId },
    #[error("home \"{home}\" is not a region of the topology")]
    HomeNotInTopology { home: RegionId },
}

/// A directed replication channel for one dataset, and when it ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub from: RegionId,
    pub to: RegionId,
    pub schedule: Schedule,
    /// For interval schedules: this link's fixed shift inside the jitter, so links of one dataset
    /// do not all fire at once. Derived from (dataset, from, to), so every node agrees.
    pub phase: Dur,
    pub rate: Option<Rate>,
    pub max_lag: Option<Dur>,
}

/// The quarantine state of one object under its placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuarantineState {
    NotHeld,
    /// Kept in its origin region until released.
    Held {
        release: Release,
    },
    /// Released; ships like any other object.
    Released,
}

/// The part a region plays for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Home,
    Mirror,
    /// Holds no copy.
    None,
}

/// Why a region plays its role: what `explain` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    HomeListed,
    HomeFromKeyPrefix,
    HomeFromAttribute,
    MirrorListed,
    MirrorAllAllowed,
    NotAllowedListed,
    NotAllowedRestricted,
    NotAllowedRegional,
    NotMirrored,
    Held,
}

impl Reason {
    /// A stable code for scripts.
    pub fn code(self) -> &'static str {
        match self {
            Reason::HomeListed => "home_listed",
            Reason::HomeFromKeyPrefix => "home_from_key_prefix",
            Reason::HomeFromAttribute => "home_from_attribute",
            Reason::MirrorListed => "mirror_listed",
            Reason::MirrorAllAllowed => "mirror_all_allowed",
            Reason::NotAllowedListed => "not_in_allowed",
            Reason::NotAllowedRestricted => "restricted_stays_home",
            Reason::NotAllowedRegional => "regional_stays_home",
            Reason::NotMirrored => "not_a_mirror",
            Reason::Held => "held_in_quarantine",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::HomeListed => "listed in `home`",
            Reason::HomeFromKeyPrefix => "the key's home, from its region prefix",
            Reason::HomeFromAttribute => "the key's home, from the `home` attribute of its first write",
            Reason::MirrorListed => "listed in `mirrors`",
            Reason::MirrorAllAllowed => "mirrors = \"all-allowed\"",
            Reason::NotAllowedListed => "not in `allowed`",
            Reason::NotAllowedRestricted => "restricted data stays in its home region",
            Reason::NotAllowedRegional => "regional data stays in its home regions (no `allowed` widens it)",
            Reason::NotMirrored => "allowed, but not a mirror",
            Reason::Held => "allowed, but the object is held in quarantine in its origin region",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDecision {
    pub region: RegionId,
    pub role: Role,
    pub reason: Reason,
}

/// Where one key's copies live and how they move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub policy: PolicyId,
    pub dataset: DatasetName,
    pub rules: RuleSource,
    pub locality: Locality,
    pub classification: Classification,
    pub kind: Kind,
    /// Regions that accept writes for this key, preferred first.
    pub homes: Vec<RegionId>,
    /// Regions holding a read-only copy, in topology order.
    pub mirrors: Vec<RegionId>,
    /// Every region the key's bytes may reach, in topology order.
    pub allowed: Vec<RegionId>,
    pub links: Vec<Link>,
    pub conflict: ConflictRule,
    pub consistency: Consistency,
    pub max_staleness: Option<Dur>,
    pub failover: Vec<RegionId>,
    pub rpo: Option<Dur>,
    pub retention: Retention,
    pub encryption_at_rest: bool,
    pub quarantine: QuarantineState,
    pub purge_grace: Dur,
    /// One decision per topology region, in topology order: the `explain` answer.
    pub regions: Vec<RegionDecision>,
}

impl Placement {
    /// Whether `region` may hold this key's bytes.
    pub fn is_allowed(&self, region: &RegionId) -> bool {
        self.allowed.contains(region)
    }

    /// Whether `region` holds a copy (home or mirror).
    pub fn holds_copy(&self, region: &RegionId) -> bool {
        self.homes.contains(region) || self.mirrors.contains(region)
    }
}

/// FNV-1a over the parts, each followed by a 0xff separator (a byte no UTF-8 text contains).
/// Link phases and rollout buckets depend on it: changing it moves keys between policy versions
/// in the middle of a rollout, so it is fixed forever.
pub fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The user-locality home of `key`: its `region/` prefix if that names a topology region, else
/// the attribute.
fn user_home(
    dataset: &DatasetName,
    key: &Key,
    attrs: &ObjectAttributes,
    topology_regions: &[RegionId],
) -> Result<(RegionId, Reason), PlacementError> {
    let prefix =
        key.as_str().split_once('/').and_then(|(p, _)| topology_regions.iter().find(|r| r.as_str() == p)).cloned();
    match (prefix, &attrs.home) {
        (Some(p), Some(a)) if &p != a => Err(PlacementError::HomeMismatch { prefix: p, attribute: a.clone() }),
        (Some(p), _) => Ok((p, Reason::HomeFromKeyPrefix)),
        (None, Some(a)) => Ok((a.clone(), Reason::HomeFromAttribute)),
        (None, None) => Err(PlacementError::HomeUnknown { dataset: dataset.clone(), key: key.as_str().to_string() }),
    }
}

/// Evaluates `policy` for one key. See the module docs.
pub fn evaluate(
    policy: &Policy,
    topology: &Topology,
    dataset: &DatasetName,
    key: &Key,
    attrs: &ObjectAttributes,
) -> Result<Placement, PlacementError> {
    let (rules, source) = policy
        .rules(dataset)
        .ok_or_else(|| PlacementError::DatasetNotInPolicy { dataset: dataset.clone(), policy: policy.id().short() })?;
    let topo: Vec<RegionId> = topology.regions().iter().map(|r| r.name.clone()).collect();
    let in_topology = |r: &RegionId| topo.contains(r);

    // Homes.
    let (mut homes, home_reason) = match rules.locality {
        Locality::User => {
            let (home, reason) = user_home(dataset, key, attrs, &topo)?;
            (vec![home], reason)
        }
        Locality::Global | Locality::Regional => (rules.homes.clone(), Reason::HomeListed),
    };
    if let Some(h) = homes.iter().find(|h| !in_topology(h)) {
        return Err(PlacementError::HomeNotInTopology { home: h.clone() });
    }

    // Allowed, in topology order (an upper bound: a region gone from the topology drops out).
    let (allowed, not_allowed_reason): (Vec<RegionId>, Reason) = match &rules.allowed {
        Allowed::Listed(list) => {
            (topo.iter().filter(|r| list.contains(r)).cloned().collect(), Reason::NotAllowedListed)
        }
        Allowed::RestrictedHome => {
            (topo.iter().filter(|r| homes.contains(r)).cloned().collect(), Reason::NotAllowedRestricted)
        }
        Allowed::RegionalHomes => {
            (topo.iter().filter(|r| homes.contains(r)).cloned().collect(), Reason::NotAllowedRegional)
        }
        Allowed::Everywhere => (topo.clone(), Reason::NotAllowedListed),
    };
    if let Some(h) = homes.iter().find(|h| !allowed.contains(h)) {
        return Err(PlacementError::HomeNotAllowed { dataset: dataset.clone(), home: h.clone() });
    }
    // Restricted bytes never leave the key's home, whatever else `allowed` lists (for user
    // locality that list bounds where keys may be homed, not where copies may go).
    let written_allowed = allowed.clone();
    let allowed = if rules.classification == Classification::Restricted {
        topo.iter().filter(|r| homes.contains(r)).cloned().collect()
    } else {
        allowed
    };

    // Quarantine: a held object stays in its origin region.
    let quarantine = match attrs.quarantine {
        QuarantineTag::Released => QuarantineState::Released,
        QuarantineTag::Held => QuarantineState::Held { release: rules.quarantine.release },
        QuarantineTag::None if rules.quarantine.hold => QuarantineState::Held { release: rules.quarantine.release },
        QuarantineTag::None => QuarantineState::NotHeld,
    };
    let held = matches!(quarantine, QuarantineState::Held { .. });
    if held && homes.len() > 1 {
        let origin = attrs.origin.as_ref().filter(|o| homes.contains(o)).unwrap_or(&homes[0]).clone();
        homes = vec![origin];
    }

    // Mirrors: allowed, not a home, and not while held. Restricted data never has one.
    let (mirrors, mirror_reason): (Vec<RegionId>, Reason) =
        if held || rules.classification == Classification::Restricted {
            (Vec::new(), Reason::MirrorListed)
        } else {
            match &rules.mirrors {
                MirrorChoice::None => (Vec::new(), Reason::MirrorListed),
                MirrorChoice::Listed(list) => (
                    allowed.iter().filter(|r| list.contains(r) && !homes.contains(r)).cloned().collect(),
                    Reason::MirrorListed,
                ),
                MirrorChoice::AllAllowed => {
                    (allowed.iter().filter(|r| !homes.contains(r)).cloned().collect(), Reason::MirrorAllAllowed)
                }
            }
        };

    // Links: each home to every other copy.
    let phase_of = |from: &RegionId, to: &RegionId| match rules.sync.schedule {
        Schedule::Interval { jitter, .. } if jitter.ms() > 0 => {
            Dur(stable_hash(&[dataset.as_str().as_bytes(), from.as_str().as_bytes(), to.as_str().as_bytes()])
                % jitter.ms())
        }
        _ => Dur(0),
    };
    let mut links = Vec::new();
    for from in &homes {
        for to in homes.iter().chain(mirrors.iter()).filter(|to| *to != from) {
            links.push(Link {
                from: from.clone(),
                to: to.clone(),
                schedule: rules.sync.schedule,
                phase: phase_of(from, to),
                rate: rules.sync.rate,
                max_lag: rules.sync.max_lag,
            });
        }
    }

    let failover: Vec<RegionId> = rules
        .failover
        .iter()
        .filter(|r| allowed.contains(r) && (mirrors.contains(r) || homes.contains(r)))
        // A region cannot fail over to itself (a held object keeps one home, its origin).
        .filter(|r| !(homes.len() == 1 && homes.contains(r)))
        .cloned()
        .collect();

    let regions = topo
        .iter()
        .map(|region| {
            let (role, reason) = if homes.contains(region) {
                (Role::Home, home_reason)
            } else if mirrors.contains(region) {
                (Role::Mirror, mirror_reason)
            } else if !written_allowed.contains(region) {
                (Role::None, not_allowed_reason)
            } else if !allowed.contains(region) {
                (Role::None, Reason::NotAllowedRestricted)
            } else if held {
                (Role::None, Reason::Held)
            } else {
                (Role::None, Reason::NotMirrored)
            };
            RegionDecision { region: region.clone(), role, reason }
        })
        .collect();

    Ok(Placement {
        policy: policy.id(),
        dataset: dataset.clone(),
        rules: source,
        locality: rules.locality,
        classification: rules.classification,
        kind: rules.kind,
        homes,
        mirrors,
        allowed,
        links,
        conflict: rules.conflict,
        consistency: rules.consistency,
        max_staleness: rules.max_staleness,
        failover,
        rpo: rules.rpo,
        retention: rules.retention,
        encryption_at_rest: rules.encryption_at_rest,
        quarantine,
        purge_grace: rules.quarantine.purge_grace,
        regions,
    })
}
