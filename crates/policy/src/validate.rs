//! The meaning-level rules of a policy (docs/policy.md#validation-rules), checked over a
//! decoded document, all at once. Each rule that fails adds one diagnostic at the value that
//! breaks it; the resolved rules are returned either way and used only if nothing failed.

use std::collections::{BTreeMap, BTreeSet};

use meridian_core::{DatasetName, RegionId};

use crate::diagnostic::{did_you_mean, Diagnostic, Rule};
use crate::document::*;
use crate::policy::{Allowed, DatasetPolicy, MirrorChoice, Quarantine, Release, Schedule, Sync, DOCUMENT_START};
use crate::source::Pos;
use crate::units::{Dur, Window};

/// The default grace before a copy found in a forbidden region is purged.
pub const PURGE_GRACE_DEFAULT: Dur = Dur(24 * 3_600_000);

pub(crate) type Resolved = (BTreeMap<DatasetName, DatasetPolicy>, Option<DatasetPolicy>);

pub(crate) fn validate(doc: &PolicyDocument, topology: Option<&[RegionId]>, diags: &mut Vec<Diagnostic>) -> Resolved {
    let mut datasets = BTreeMap::new();
    let mut first_seen: BTreeMap<&str, Pos> = BTreeMap::new();
    for ds in &doc.datasets {
        let name = &ds.value.name;
        if let Some(first) = first_seen.get(name.value.as_str()) {
            diags.push(
                Diagnostic::at(name.pos, Rule::DuplicateDataset, format!("dataset {:?} is named twice", name.value))
                    .hint(format!("merge it with the entry at line {}, or rename one", first.line)),
            );
            continue;
        }
        first_seen.insert(&name.value, name.pos);
        let what = format!("dataset {:?}", name.value);
        let rules = check(&ds.value.rules, &what, ds.pos, topology, diags);
        let name = DatasetName::new(name.value.clone()).expect("the decoder checked dataset names");
        datasets.insert(name, rules);
    }
    let default = doc.default.as_ref().map(|d| check(&d.value, "[default]", d.pos, topology, diags));
    // Only when nothing else is wrong: a document whose datasets failed to decode is not empty.
    if doc.datasets.is_empty() && doc.default.is_none() && diags.is_empty() {
        diags.push(
            Diagnostic::at(DOCUMENT_START, Rule::NoDatasets, "the policy names no dataset and has no [default]")
                .hint("add a [[dataset]] entry; a policy without one would refuse every write"),
        );
    }
    (datasets, default)
}

fn names(list: &RegionList) -> BTreeSet<&str> {
    list.iter().map(|r| r.value.as_str()).collect()
}

fn region(r: &Loc<String>) -> RegionId {
    RegionId::new(r.value.clone()).expect("the decoder checked region names")
}

fn listed(list: &RegionList) -> String {
    let v: Vec<&str> = list.iter().map(|r| r.value.as_str()).collect();
    format!("[{}]", v.join(", "))
}

/// Checks one dataset's rules (or the default's) and resolves its defaults.
fn check(
    r: &DatasetRules,
    what: &str,
    at: Pos,
    topology: Option<&[RegionId]>,
    diags: &mut Vec<Diagnostic>,
) -> DatasetPolicy {
    let locality = r.locality.value;
    let class = r.classification.value;
    let kind = r.kind.as_ref().map_or(Kind::Document, |k| k.value);
    let empty = Vec::new();
    let home: &RegionList = r.home.as_ref().map_or(&empty, |h| &h.value);
    let home_set = names(home);

    // Every region named exists.
    if let Some(regions) = topology {
        let known: Vec<&str> = regions.iter().map(|r| r.as_str()).collect();
        let mut lists: Vec<(&str, &RegionList)> = vec![("home", home)];
        if let Some(a) = &r.allowed {
            lists.push(("allowed", &a.value));
        }
        if let Some(Loc { value: Mirrors::List(m), .. }) = &r.mirrors {
            lists.push(("mirrors", m));
        }
        if let Some(f) = &r.failover {
            lists.push(("failover.order", &f.value.order.value));
        }
        for (field, list) in lists {
            for reg in list.iter().filter(|reg| !known.contains(&reg.value.as_str())) {
                let d = Diagnostic::at(
                    reg.pos,
                    Rule::UnknownRegion,
                    format!("{field} names {:?}, which is not a region of the topology", reg.value),
                );
                diags.push(match did_you_mean(&reg.value, known.iter().copied()) {
                    Some(s) => d.hint(format!("did you mean {s:?}?")),
                    None => d.hint(format!("the regions are: {}", known.join(", "))),
                });
            }
        }
    }

    // Homes: fixed for global and regional, per key for user.
    match locality {
        Locality::Global | Locality::Regional if home.is_empty() => {
            let pos = r.home.as_ref().map_or(at, |h| h.pos);
            diags.push(
                Diagnostic::at(pos, Rule::HomeRequired, format!("{what} is {locality} but names no home region"))
                    .hint("add home = [\"region\"]: the regions that accept its writes"),
            );
        }
        Locality::User => {
            if let Some(h) = &r.home {
                diags.push(
                    Diagnostic::at(
                        h.pos,
                        Rule::HomeOnUserLocality,
                        format!("{what} is user-homed, so it cannot have fixed homes"),
                    )
                    .hint("remove `home`: each key's home comes from its `region/` prefix or its `home` attribute"),
                );
            }
        }
        _ => {}
    }

    // Restricted data: one home, no mirrors.
    if class == Classification::Restricted {
        if locality != Locality::User && home.len() > 1 {
            diags.push(
                Diagnostic::at(
                    r.home.as_ref().map_or(at, |h| h.pos),
                    Rule::RestrictedSingleHome,
                    format!("{what} is restricted, so it has exactly one home; it names {}", listed(home)),
                )
                .hint("keep one home, or lower the classification"),
            );
        }
        let copies = match &r.mirrors {
            Some(Loc { value: Mirrors::AllAllowed, pos }) => Some(*pos),
            Some(Loc { value: Mirrors::List(l), pos }) if !l.is_empty() => Some(*pos),
            _ => None,
        };
        if let Some(pos) = copies {
            diags.push(
                Diagnostic::at(pos, Rule::RestrictedMirrors, format!("{what} is restricted, so it has no mirrors"))
                    .hint(
                        "restricted data never leaves its home region: remove `mirrors`, or lower the classification",
                    ),
            );
        }
    }

    // Allowed regions, and what they bound.
    let (allowed, allowed_names, allowed_source): (Allowed, Option<BTreeSet<&str>>, String) = match &r.allowed {
        Some(a) => (
            Allowed::Listed(a.value.iter().map(region).collect()),
            Some(names(&a.value)),
            format!("allowed = {}", listed(&a.value)),
        ),
        None if class == Classification::Restricted => (
            Allowed::RestrictedHome,
            (locality != Locality::User).then(|| home_set.clone()),
            "restricted data is allowed only in its home region".to_string(),
        ),
        None if locality == Locality::Regional => (
            Allowed::RegionalHomes,
            Some(home_set.clone()),
            format!("regional data stays in its home regions {}", listed(home)),
        ),
        None => (Allowed::Everywhere, None, String::new()),
    };
    if let (Some(a), Some(_)) = (&r.allowed, &allowed_names) {
        for h in home.iter().filter(|h| !names(&a.value).contains(h.value.as_str())) {
            diags.push(
                Diagnostic::at(h.pos, Rule::HomeNotAllowed, format!("home {:?} is not in {allowed_source}", h.value))
                    .hint("add it to `allowed`, or remove it from `home`"),
            );
        }
    }

    // Mirrors.
    let mirrors = match &r.mirrors {
        None => MirrorChoice::None,
        Some(Loc { value: Mirrors::AllAllowed, .. }) => MirrorChoice::AllAllowed,
        Some(Loc { value: Mirrors::List(list), .. }) => {
            for m in list {
                if home_set.contains(m.value.as_str()) {
                    diags.push(
                        Diagnostic::at(
                            m.pos,
                            Rule::MirrorIsHome,
                            format!("{:?} is both a home and a mirror of {what}", m.value),
                        )
                        .hint("a home already holds a full copy: remove it from `mirrors`"),
                    );
                } else if allowed_names.as_ref().is_some_and(|a| !a.contains(m.value.as_str())) {
                    let hint = if r.allowed.is_some() {
                        "add it to `allowed` if the data may live there, or remove it from `mirrors`".to_string()
                    } else {
                        format!(
                            "name the regions it may reach: allowed = {}",
                            listed(&[home.clone(), vec![m.clone()]].concat())
                        )
                    };
                    diags.push(
                        Diagnostic::at(
                            m.pos,
                            Rule::MirrorNotAllowed,
                            format!("mirror {:?} is outside the allowed regions: {allowed_source}", m.value),
                        )
                        .hint(hint),
                    );
                }
            }
            if list.is_empty() {
                MirrorChoice::None
            } else {
                MirrorChoice::Listed(list.iter().map(region).collect())
            }
        }
    };

    // Failover: allowed targets that hold a copy.
    let (failover, rpo) = match &r.failover {
        None => (Vec::new(), None),
        Some(f) => {
            let order = &f.value.order;
            if order.value.is_empty() {
                diags.push(
                    Diagnostic::at(order.pos, Rule::FailoverEmpty, "failover.order is empty")
                        .hint("name the regions to try in order, or remove `failover`"),
                );
            }
            for t in &order.value {
                let is_home = home_set.contains(t.value.as_str());
                if allowed_names.as_ref().is_some_and(|a| !a.contains(t.value.as_str())) {
                    diags.push(
                        Diagnostic::at(
                            t.pos,
                            Rule::FailoverNotAllowed,
                            format!("failover target {:?} is outside the allowed regions: {allowed_source}", t.value),
                        )
                        .hint("writes may only fail over to a region the data may live in"),
                    );
                } else if is_home && home.len() == 1 {
                    diags.push(
                        Diagnostic::at(
                            t.pos,
                            Rule::FailoverWithoutCopy,
                            format!("failover target {:?} is the home region itself", t.value),
                        )
                        .hint("name the regions to take over when the home is unreachable"),
                    );
                } else {
                    let mirrored = match &r.mirrors {
                        Some(Loc { value: Mirrors::AllAllowed, .. }) => true,
                        Some(Loc { value: Mirrors::List(l), .. }) => l.iter().any(|m| m.value == t.value),
                        None => false,
                    };
                    if !is_home && !mirrored {
                        diags.push(
                            Diagnostic::at(
                                t.pos,
                                Rule::FailoverWithoutCopy,
                                format!("failover target {:?} holds no copy of {what}", t.value),
                            )
                            .hint("add it to `mirrors`: a region without a copy cannot take over its writes"),
                        );
                    }
                }
            }
            (order.value.iter().map(region).collect(), f.value.rpo.as_ref().map(|d| d.value))
        }
    };

    // Conflict rule agrees with homes and kind.
    if home.len() > 1 && r.conflict.is_none() {
        diags.push(
            Diagnostic::at(
                r.home.as_ref().map_or(at, |h| h.pos),
                Rule::ConflictRequired,
                format!("{what} has {} homes, so concurrent writes need a conflict rule", home.len()),
            )
            .hint(match kind {
                Kind::Document => "add conflict = \"lww\" or \"siblings\"",
                _ => "add conflict = \"crdt\"",
            }),
        );
    }
    let conflict = match &r.conflict {
        Some(c) => {
            match (kind, c.value) {
                (Kind::Document, ConflictRule::Crdt) => diags.push(
                    Diagnostic::at(
                        c.pos,
                        Rule::ConflictKindMismatch,
                        "conflict = \"crdt\" needs a kind with merge laws; a document has none",
                    )
                    .hint("use kind = \"counter\", \"set\" or \"map\", or conflict = \"lww\" or \"siblings\""),
                ),
                (Kind::Counter | Kind::Set | Kind::Map, ConflictRule::Lww | ConflictRule::Siblings) => diags.push(
                    Diagnostic::at(
                        c.pos,
                        Rule::ConflictKindMismatch,
                        format!(
                            "a {kind} merges by its own laws; conflict = \"{}\" would {}",
                            c.value,
                            if c.value == ConflictRule::Lww {
                                "drop concurrent updates"
                            } else {
                                "keep whole concurrent copies instead of merging them"
                            }
                        ),
                    )
                    .hint("use conflict = \"crdt\""),
                ),
                _ => {}
            }
            c.value
        }
        None if kind == Kind::Document => ConflictRule::Lww,
        None => ConflictRule::Crdt,
    };

    // Encryption at rest.
    let encryption_required = class >= Classification::Confidential;
    if let Some(Loc { value: false, pos }) = r.encryption_at_rest {
        if encryption_required {
            diags.push(
                Diagnostic::at(pos, Rule::EncryptionRequired, format!("{class} data must be encrypted at rest"))
                    .hint("remove encryption_at_rest = false, or lower the classification"),
            );
        }
    }
    let encryption_at_rest = r.encryption_at_rest.as_ref().map_or(encryption_required, |e| e.value);

    let sync = check_sync(r.sync.as_ref(), diags);

    // Read defaults.
    let consistency = r.consistency.as_ref().map_or(Consistency::Strong, |c| c.value);
    match (&r.consistency, &r.max_staleness) {
        (Some(c), None) if c.value == Consistency::Bounded => diags.push(
            Diagnostic::at(c.pos, Rule::StalenessRequired, "consistency = \"bounded\" needs max_staleness")
                .hint("add max_staleness = \"5s\" (how stale a read may be)"),
        ),
        (_, Some(s)) if consistency != Consistency::Bounded => diags.push(
            Diagnostic::at(
                s.pos,
                Rule::StalenessWithoutBounded,
                format!("max_staleness only applies to bounded reads; the default here is {consistency}"),
            )
            .hint("set consistency = \"bounded\", or remove max_staleness"),
        ),
        _ => {}
    }

    let quarantine = check_quarantine(r.quarantine.as_ref(), diags);
    DatasetPolicy {
        locality,
        classification: class,
        kind,
        homes: home.iter().map(region).collect(),
        allowed,
        mirrors,
        sync,
        conflict,
        consistency,
        max_staleness: r.max_staleness.as_ref().map(|d| d.value),
        failover,
        rpo,
        retention: r.retention.as_ref().map_or(Retention::Forever, |r| r.value),
        quarantine,
        encryption_at_rest,
    }
}

fn check_sync(spec: Option<&Loc<SyncSpec>>, diags: &mut Vec<Diagnostic>) -> Sync {
    let Some(spec) = spec else {
        return Sync { schedule: Schedule::Continuous, rate: None, max_lag: None };
    };
    let s = &spec.value;
    let mode = s.mode.as_ref().map_or(SyncMode::Continuous, |m| m.value);
    let mut not_for_mode = |field: &str, pos: Pos, belongs: &str| {
        diags.push(
            Diagnostic::at(pos, Rule::SyncFieldForMode, format!("sync.{field} does not apply to mode = \"{mode}\""))
                .hint(format!("`{field}` belongs to mode = \"{belongs}\"; remove it or change the mode")),
        );
    };
    if mode != SyncMode::Interval {
        if let Some(e) = &s.every {
            not_for_mode("every", e.pos, "interval");
        }
        if let Some(j) = &s.jitter {
            not_for_mode("jitter", j.pos, "interval");
        }
    }
    if mode != SyncMode::Window {
        if let Some(w) = &s.window {
            not_for_mode("window", w.pos, "window");
        }
    }
    let mut required = |field: &str, example: &str| {
        diags.push(
            Diagnostic::at(spec.pos, Rule::SyncFieldRequired, format!("sync mode = \"{mode}\" needs `{field}`"))
                .hint(format!("add {field} = \"{example}\"")),
        );
    };
    let schedule = match mode {
        SyncMode::Continuous => Schedule::Continuous,
        SyncMode::Interval => {
            let jitter = s.jitter.as_ref().map_or(Dur(0), |j| j.value);
            match &s.every {
                None => {
                    required("every", "30s");
                    Schedule::Continuous
                }
                Some(every) => {
                    if let Some(j) = &s.jitter {
                        if j.value >= every.value {
                            diags.push(
                                Diagnostic::at(
                                    j.pos,
                                    Rule::JitterTooLarge,
                                    format!("sync.jitter {} is not shorter than sync.every {}", j.value, every.value),
                                )
                                .hint("keep jitter well below the interval, such as a fifth of it"),
                            );
                        }
                    }
                    Schedule::Interval { every: every.value, jitter }
                }
            }
        }
        SyncMode::Window => match &s.window {
            None => {
                required("window", "01:00-05:00");
                Schedule::Continuous
            }
            Some(w) => Schedule::Window(w.value),
        },
    };
    // The budget must be reachable by the schedule, or it is broken by design.
    if let Some(max_lag) = &s.max_lag {
        let (worst, why) = match schedule {
            Schedule::Continuous => (Dur(0), String::new()),
            Schedule::Interval { every, jitter } if jitter.ms() == 0 => (every, format!("it ships every {every}")),
            Schedule::Interval { every, jitter } => {
                (Dur(every.ms() + jitter.ms()), format!("it ships every {every}, plus up to {jitter} of jitter"))
            }
            Schedule::Window(w) => {
                let closed_ms = u64::from(Window::MINUTES_PER_DAY - w.length_minutes()) * 60_000;
                (Dur(closed_ms), format!("the window {w} is closed for {}", Dur(closed_ms)))
            }
        };
        if max_lag.value < worst {
            diags.push(
                Diagnostic::at(
                    max_lag.pos,
                    Rule::MaxLagUnreachable,
                    format!("sync.max_lag {} is shorter than the schedule allows: {why}", max_lag.value),
                )
                .hint(format!("raise max_lag to at least {worst}, or ship more often")),
            );
        }
    }
    Sync { schedule, rate: s.rate.as_ref().map(|r| r.value), max_lag: s.max_lag.as_ref().map(|m| m.value) }
}

fn check_quarantine(spec: Option<&Loc<QuarantineSpec>>, diags: &mut Vec<Diagnostic>) -> Quarantine {
    let Some(spec) = spec else {
        return Quarantine { hold: false, release: Release::Operator, purge_grace: PURGE_GRACE_DEFAULT };
    };
    let q = &spec.value;
    let rule = q.release.as_ref().map_or(ReleaseRule::Operator, |r| r.value);
    let release = match (rule, &q.release_after) {
        (ReleaseRule::Age, Some(after)) => Release::After(after.value),
        (ReleaseRule::Age, None) => {
            diags.push(
                Diagnostic::at(
                    q.release.as_ref().map_or(spec.pos, |r| r.pos),
                    Rule::ReleaseAfterMismatch,
                    "release = \"age\" needs release_after",
                )
                .hint("add release_after = \"72h\""),
            );
            Release::Operator
        }
        (ReleaseRule::Operator, Some(after)) => {
            diags.push(
                Diagnostic::at(
                    after.pos,
                    Rule::ReleaseAfterMismatch,
                    "release_after only applies with release = \"age\"",
                )
                .hint("set release = \"age\", or remove release_after"),
            );
            Release::Operator
        }
        (ReleaseRule::Operator, None) => Release::Operator,
    };
    Quarantine {
        hold: q.hold.as_ref().is_some_and(|h| h.value),
        release,
        purge_grace: q.purge_grace.as_ref().map_or(PURGE_GRACE_DEFAULT, |g| g.value),
    }
}
