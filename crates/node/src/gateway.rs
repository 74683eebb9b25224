//! The gateway: the node's one client API. Every node is a gateway: `put`, `get`, `delete`
//! and `list` take typed names and a consistency, decide where the request must be served
//! (this node, its region's leader, or a home region of the key), send it there, and answer
//! with the node's own result types, the node that served it and why. The HTTP server and the
//! simulator's clients both call it, so routing runs under simulation too.
//!
//! Routing, from the key's placement under the version of the policy that governs it:
//! - writes go to a home region of the key: this one if it is a home, else the first home;
//!   there the region's leader stamps and proposes them ([`Gateway::write_here`]);
//! - `strong` reads go to a home's leader (read index);
//! - `local` and `eventual` reads are served from this node's copy if its region holds one
//!   (a home or a mirror), else at a home;
//! - `bounded` reads are served here if this region's copy is fresh enough for the bound,
//!   else at a home.
//!
//! A read is never fetched into a region the key's placement does not allow
//! (`ResidencyRefused`): the value would have to come here. A write is relayed to a home from
//! anywhere: that carries the client's bytes into an allowed region, never out of one.
//!
//! Invariant: a write is retried behind the client's back only when the answer proves it was
//! never proposed (no leader or another leader before proposing, or no connection made).
//! Anything else after proposing is `OutcomeUnknown`, across the peer protocol too.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use meridian_core::crdt::{CrdtKind, CrdtOp};
use meridian_core::{DatasetName, Hlc, HlcTimestamp, Key, NodeId, RegionId, Version, VersionVector};
use meridian_policy::{ConflictRule, Consistency as PolicyConsistency, Placement};
use meridian_raft::command::CommandV1;
use meridian_raft::{CommandResult, Condition, StoredObject};
use tokio::time::Instant;

use crate::error::{peer_error, to_peer_error, LocalError, NodeError, Skip, SkipCause};
use crate::health::Reachability;
use crate::limits::{LEADER_ATTEMPTS_MAX, REQUEST_TIMEOUT, SESSION_POLL, SESSION_WAIT};
use crate::links::CommitBell;
use crate::metrics::KindLabels;
use crate::peer::{CopyNeed, PeerError, PeerRequestV1, PeerResponseV1, WriteEffect, WriteOp, WriteRequest};
use crate::policy::{self, WriteRules};
use crate::transport::{leader_backoff, AnyFailure};
use crate::Deps;
use meridian_core::limits::LIST_LIMIT_MAX;
use meridian_raft::network::RpcFailure;

/// A key's placement under the governing policy version (`None`: no version governs it), or
/// why the policy refuses the key.
type Placed = Result<Option<Placement>, NodeError>;

/// Regions in the order a request tries them, each with its reachability as this node's
/// probes see it ([`crate::health::ranked`]).
type Ranked = Vec<(RegionId, Reachability)>;

/// How a read is served.
enum ReadPlan {
    /// From this node's state (through the region's leader for `Strong`).
    Here(ReadConsistency),
    /// At a home's leader, the homes tried in turn.
    Strong(Ranked),
    /// From another region's copy that meets the need, nearest first.
    Copy(Ranked, CopyNeed),
    /// A session read: here once this node's copy has applied what it needs (waiting
    /// briefly), else from another region's copy that has.
    Session(Ranked, CopyNeed),
}

/// One region's failure to serve, as [`Gateway::first_to_serve`] takes it: `Skip` proves
/// nothing was applied, so the next region is tried; `Fail` ends the request.
enum Tried {
    Skip(SkipCause, String),
    Fail(NodeError),
}

impl From<NodeError> for Tried {
    fn from(e: NodeError) -> Tried {
        match e {
            NodeError::Unavailable { reason, .. } => Tried::Skip(SkipCause::Unreachable, reason),
            NodeError::NoLeader => Tried::Skip(SkipCause::NoLeader, "no leader".into()),
            NodeError::NotPromoted(m) => Tried::Skip(SkipCause::NotPromoted, m),
            e => Tried::Fail(e),
        }
    }
}

/// Why a node served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    Leader,
    Local,
    ForwardedToLeader,
    /// Sent to a home region of the key (another region's leader).
    ForwardedToHome,
    /// A `local` or `eventual` read served by the nearest other region holding a copy (this
    /// one holds none).
    NearestCopy,
    /// A `bounded` read served by the nearest other region whose copy is within the bound
    /// (this region's is not, or it holds none).
    FreshCopy,
    /// A `session` read served by the nearest other region whose copy has applied what the
    /// session has seen (this region's had not, within a brief wait, or it holds none).
    SessionCopy,
    /// A write taken by a failover target promoted while the key's homes are unreachable.
    Promoted,
}

impl RouteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::Leader => "leader",
            RouteReason::Local => "local",
            RouteReason::ForwardedToLeader => "forwarded-to-leader",
            RouteReason::ForwardedToHome => "forwarded-to-home",
            RouteReason::NearestCopy => "nearest-copy",
            RouteReason::FreshCopy => "fresh-copy",
            RouteReason::SessionCopy => "session-copy",
            RouteReason::Promoted => "promoted",
        }
    }
}

/// Who served a request, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub node: NodeId,
    pub reason: RouteReason,
    /// The regions passed over on the way: tried without an answer, or known down, in the
    /// order they were considered.
    pub skipped: Vec<Skip>,
}

impl Served {
    pub fn by(node: NodeId, reason: RouteReason) -> Served {
        Served { node, reason, skipped: Vec::new() }
    }
}

/// A read's consistency, as the client asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Linearizable: a home region's leader confirms its leadership with a quorum (read
    /// index), waits until it has applied that far, then reads.
    Strong,
    /// This node's copy if its region holds one, else the nearest other region's copy.
    Local,
    /// The nearest copy (routed as `Local`): it converges, with no bound on how stale.
    Eventual,
    /// At most this many milliseconds stale (`None`: the dataset's `max_staleness`).
    Bounded(Option<u64>),
    /// A copy that has applied every write of the key's homes that the session (the read's
    /// `session` argument, a session token's vector) has seen: read-your-writes and
    /// monotonic reads across regions.
    Session,
    /// Whatever the dataset's policy names (`consistency`, default `strong`): what a request
    /// that names no level asks for.
    DatasetDefault,
}

/// A read's level, and what the client's session has seen (for `Session`, or a dataset whose
/// default it is; `None`: no session).
#[derive(Debug, Clone, Copy)]
pub struct ReadAt<'a> {
    pub consistency: Consistency,
    pub session: Option<&'a VersionVector>,
}

impl From<Consistency> for ReadAt<'_> {
    fn from(consistency: Consistency) -> Self {
        ReadAt { consistency, session: None }
    }
}

/// How a node serves a read in its own region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadConsistency {
    /// Through the region's leader, after a read index.
    Strong,
    /// Whatever this node has applied.
    Local,
}

/// A write's condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// Only if the key's current version is this one.
    IfMatch(Version),
    /// Only if the key holds no value (create-only).
    IfAbsent,
}

impl Precondition {
    fn condition(&self) -> Condition {
        match self {
            Precondition::None => Condition::Always,
            Precondition::IfMatch(v) => Condition::IfMatch(v.clone()),
            Precondition::IfAbsent => Condition::IfAbsent,
        }
    }
}

/// A stored object as a client sees it: a value, or a tombstone (`value: None`); for a
/// `siblings` dataset, the concurrent versions kept beside it; and its causal context, which
/// a write hands back to supersede exactly what was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub value: Option<Vec<u8>>,
    pub version: Version,
    /// Concurrent versions a `siblings` dataset keeps (empty for every other rule: `lww`
    /// keeps its losers out of sight, and they are in the conflict log).
    pub siblings: Vec<(Version, Option<Vec<u8>>)>,
    pub context: VersionVector,
}

impl Object {
    /// The object as a dataset with `placed`'s rule shows it.
    fn shown(o: StoredObject, placed: &Placed) -> Object {
        let siblings_shown = matches!(placed, Ok(Some(p)) if p.conflict == ConflictRule::Siblings);
        let siblings =
            if siblings_shown { o.siblings.into_iter().map(|s| (s.version, s.value)).collect() } else { Vec::new() };
        Object { value: o.value, version: o.version, siblings, context: o.vv }
    }
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Written {
        version: Version,
        created: bool,
    },
    Deleted {
        version: Version,
    },
    /// Nothing was written: the precondition did not hold (`current`: the key's version).
    PreconditionFailed {
        current: Option<Version>,
    },
    /// Nothing was deleted: the key holds no value.
    NotFound,
}

impl WriteOutcome {
    fn of(result: CommandResult) -> Result<WriteOutcome, NodeError> {
        match result {
            CommandResult::Written { version, created } => Ok(WriteOutcome::Written { version, created }),
            CommandResult::Deleted { version } => Ok(WriteOutcome::Deleted { version }),
            CommandResult::PreconditionFailed { current } => Ok(WriteOutcome::PreconditionFailed { current }),
            CommandResult::NotFound => Ok(WriteOutcome::NotFound),
            CommandResult::KindMismatch { held } => Err(NodeError::WrongOperation(match held {
                Some(kind) => format!(
                    "the key holds a {kind} (the dataset's kind changed since it was written); its operations are {}",
                    op_names(kind)
                ),
                None => "the key holds a JSON document written before the dataset became a counter, set or map; \
                         delete it first"
                    .to_owned(),
            })),
            other => Err(NodeError::Internal(format!("unexpected write result {other:?}"))),
        }
    }
}

/// One page of a listing: keys and their versions, in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<(String, Version)>,
}

pub struct Gateway {
    deps: Deps,
    hlc: Mutex<Hlc>,
    commits: Arc<CommitBell>,
    here: RegionId,
    id: NodeId,
    /// The configured value limit; a counter, set or map key's state is held to it too.
    value_bytes_max: usize,
}

impl Gateway {
    pub(crate) fn new(deps: Deps, hlc_max_offset_ms: u64, value_bytes_max: usize, commits: Arc<CommitBell>) -> Gateway {
        let (here, id) = (deps.region.spec().region.clone(), deps.region.spec().id);
        let hlc = Mutex::new(Hlc::new(hlc_max_offset_ms));
        Gateway { deps, hlc, commits, here, id, value_bytes_max }
    }

    /// Set `meridian_hlc_ahead_ms`: how far the region's newest applied stamp runs ahead of
    /// this node's wall clock.
    pub(crate) fn refresh_clock_metrics(&self) {
        match self.deps.region.reader().last_hlc() {
            Ok(last) => {
                let ahead = last.wall_ms().saturating_sub(self.deps.clock.now_ms());
                self.deps.metrics.hlc_ahead_ms.set(i64::try_from(ahead).unwrap_or(i64::MAX));
            }
            Err(e) => tracing::warn!(error = %e, "could not read the applied HLC for metrics"),
        }
    }

    // ---- the client API ------------------------------------------------------------------

    /// Write `value` under (dataset, key) in a home region of the key. `home` is the
    /// user-locality attribute, for a user-homed key without a region prefix.
    pub async fn put(
        &self,
        dataset: &DatasetName,
        key: &Key,
        value: Vec<u8>,
        precondition: Precondition,
        home: Option<&str>,
    ) -> Result<(WriteOutcome, Served), NodeError> {
        let homes = self.route_put(dataset, key, home).await?;
        self.write_one(homes, dataset, key, Some(value), WriteEffect::Replace, precondition).await
    }

    /// Write `value` (`None`: delete) superseding exactly the versions `context` saw; the
    /// others stay as siblings. Only for `siblings` datasets (the home's leader refuses it
    /// elsewhere with [`NodeError::WrongOperation`]).
    pub async fn put_in_context(
        &self,
        dataset: &DatasetName,
        key: &Key,
        value: Option<Vec<u8>>,
        context: VersionVector,
        precondition: Precondition,
        home: Option<&str>,
    ) -> Result<(WriteOutcome, Served), NodeError> {
        let homes = self.route_put(dataset, key, home).await?;
        self.write_one(homes, dataset, key, value, WriteEffect::InContext(context), precondition).await
    }

    /// Apply an operation to a counter, set or map key in a home region of the key.
    pub async fn op(
        &self,
        dataset: &DatasetName,
        key: &Key,
        op: CrdtOp,
        precondition: Precondition,
        home: Option<&str>,
    ) -> Result<(WriteOutcome, Served), NodeError> {
        let homes = self.route_put(dataset, key, home).await?;
        self.write_one(homes, dataset, key, None, WriteEffect::Op(op), precondition).await
    }

    /// Delete (dataset, key) in a home region of the key: a tombstone with a new version.
    pub async fn delete(
        &self,
        dataset: &DatasetName,
        key: &Key,
        precondition: Precondition,
        home: Option<&str>,
    ) -> Result<(WriteOutcome, Served), NodeError> {
        let home = self.parse_home(home)?;
        let placed = self.place(dataset, key, home.as_ref())?;
        let order = self.write_order(&placed)?;
        self.write_one(order, dataset, key, None, WriteEffect::Replace, precondition).await
    }

    /// One client write (a value, or a tombstone with `None`; or an operation) in the first
    /// of `homes` that takes it: a home that could not be reached, or had no leader, never
    /// applied it, so the next is tried.
    async fn write_one(
        &self,
        (homes, targets): (Ranked, Vec<RegionId>),
        dataset: &DatasetName,
        key: &Key,
        value: Option<Vec<u8>>,
        effect: WriteEffect,
        precondition: Precondition,
    ) -> Result<(WriteOutcome, Served), NodeError> {
        let req = WriteRequest {
            dataset: dataset.to_string(),
            key: key.to_string(),
            value,
            condition: precondition.condition(),
            effect,
        };
        let what = format!("no home of {dataset}/{key} could take the write");
        let targets = &targets;
        let attempt = |region: RegionId, by: Instant| {
            let op = WriteOp::One(req.clone());
            async move {
                let (result, mut served) = self.write_in_until(&region, by, op).await.map_err(Tried::from)?;
                if targets.contains(&region) {
                    served.reason = RouteReason::Promoted;
                }
                Ok((result, served))
            }
        };
        let (result, served) = self.first_to_serve(what, homes, attempt).await?;
        Ok((WriteOutcome::of(result)?, served))
    }

    /// Read (dataset, key) at `consistency`. `None`: the key was never written (or purged);
    /// a tombstone comes back as an object without a value.
    pub async fn get(
        &self,
        dataset: &DatasetName,
        key: &Key,
        at: ReadAt<'_>,
        home: Option<&str>,
    ) -> Result<(Option<Object>, Served), NodeError> {
        let ReadAt { consistency, session } = at;
        let home_attr = self.parse_home(home)?;
        let placed = self.place(dataset, key, home_attr.as_ref())?;
        let homes = self.home_order(&placed)?;
        let (ds, k) = (dataset.as_str(), key.as_str());
        let (obj, served) = match self.settle(self.read_plan(consistency, homes, dataset, &placed, session)?).await? {
            ReadPlan::Here(c) => self.read(ds, k, c).await?,
            plan => {
                // Residency: never fetch a value into a region its policy keeps it out of.
                self.check_value_may_come_here(dataset, key, &placed)?;
                let home = home_attr.as_ref().map(|h| h.to_string());
                let request = |need| PeerRequestV1::ReadCopy {
                    dataset: ds.into(),
                    key: k.into(),
                    home: home.clone(),
                    to: self.here.to_string(),
                    need,
                };
                let unpack = |r| match r {
                    PeerResponseV1::Read(r) => Some(r),
                    _ => None,
                };
                let strong = |region: RegionId, by: Instant| async move {
                    self.read_in_until(&region, by, ds, k).await.map_err(Tried::from)
                };
                let what = format!("no region holding {dataset}/{key} could serve the read");
                self.serve_plan(what, plan, strong, request, unpack).await?
            }
        };
        Ok((obj.map(|o| Object::shown(o, &placed)), served))
    }

    /// A page of (dataset)'s keys starting with `prefix`, after `after`, at most `limit`.
    /// Fixed-home datasets list at a home; user-homed ones at the home that `home` or the
    /// prefix names, else here (the keys homed in this region).
    pub async fn list(
        &self,
        dataset: &DatasetName,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        at: ReadAt<'_>,
        home: Option<&str>,
    ) -> Result<(Page, Served), NodeError> {
        let ReadAt { consistency, session } = at;
        let limit = limit.clamp(1, LIST_LIMIT_MAX);
        let home_attr = self.parse_home(home)?;
        let probe = if prefix.is_empty() { "_" } else { prefix };
        // The server checks that a prefix could begin a key; one that reaches here anyway is a
        // caller's bug, not the client's.
        let probe = Key::new(probe).map_err(|e| NodeError::Internal(format!("unchecked prefix: {e}")))?;
        let placed = self.place(dataset, &probe, home_attr.as_ref())?;
        let homes = match self.home_order(&placed) {
            Ok(r) => r,
            Err(NodeError::HomeUnknown(_)) if home_attr.is_none() => vec![(self.here.clone(), Reachability::Up)],
            Err(e) => return Err(e),
        };
        let ds = dataset.as_str();
        let (items, served) = match self.settle(self.read_plan(consistency, homes, dataset, &placed, session)?).await? {
            ReadPlan::Here(c) => self.list_local(ds, prefix, after, limit, c).await?,
            plan => {
                // Keys are data too: a listing is not fetched into a region the policy keeps
                // them out of.
                self.check_value_may_come_here(dataset, &probe, &placed)?;
                let home = home_attr.as_ref().map(|h| h.to_string());
                let request = |need| PeerRequestV1::ListCopy {
                    dataset: ds.into(),
                    prefix: prefix.into(),
                    after: after.map(str::to_owned),
                    limit: limit as u32,
                    home: home.clone(),
                    to: self.here.to_string(),
                    need,
                };
                let unpack = |r| match r {
                    PeerResponseV1::List(r) => Some(r),
                    _ => None,
                };
                let strong = |region: RegionId, by: Instant| async move {
                    self.list_in_until(&region, by, ds, prefix, after, limit).await.map_err(Tried::from)
                };
                let what = format!("no region holding {dataset} could serve the listing");
                self.serve_plan(what, plan, strong, request, unpack).await?
            }
        };
        Ok((Page { items: items.into_iter().map(|(k, o)| (k, o.version)).collect() }, served))
    }

    // ---- routing -------------------------------------------------------------------------

    /// The `home` attribute as a region of this cluster.
    fn parse_home(&self, home: Option<&str>) -> Result<Option<RegionId>, NodeError> {
        match home {
            None => Ok(None),
            Some(h) => match RegionId::new(h) {
                Ok(r) if self.deps.region.topology().regions().iter().any(|s| s.name == r) => Ok(Some(r)),
                _ => {
                    self.count_refusal("home_unknown");
                    Err(NodeError::HomeUnknown(format!("home {h:?} is not a region of this cluster")))
                }
            },
        }
    }

    fn count_refusal(&self, kind: &str) {
        self.deps.metrics.policy_refusals.get_or_create(&KindLabels { kind: kind.into() }).inc();
    }

    /// The placement of (dataset, key) under the policy copy as it stands now: evaluated once
    /// per request, and every routing decision of the request is made from it. The outer
    /// error is a failure to read the copy; the inner result is the placement or why the
    /// policy refuses the key.
    fn place(&self, dataset: &DatasetName, key: &Key, home: Option<&RegionId>) -> Result<Placed, NodeError> {
        self.deps.policy.refresh()?;
        let placed = self.deps.policy.placement(dataset, key, home);
        // Shadow: where the shadow version would have sent it; counted, never acted on.
        if let (Some(active), Ok(placement)) = (self.deps.policy.active(), &placed) {
            let region = self.choose(placement.as_ref());
            if let Some(p) = self.deps.policy.shadow_placement(&active, dataset, key, home, None) {
                if self.choose(Some(&p)) != region {
                    self.deps.metrics.policy_shadow_reroutes.inc();
                }
            } else if active.shadow(dataset, key).is_some() {
                self.deps.metrics.policy_shadow_reroutes.inc();
            }
        }
        Ok(placed)
    }

    /// Where a write goes first under `placement`: this region if it is a home, else the
    /// nearest home this node's probes find up, else one not known to be down, else the first
    /// home (see [`crate::health::nearest`]); without a governing policy, this region.
    fn choose(&self, placement: Option<&Placement>) -> RegionId {
        match placement {
            Some(p) => self.deps.health.nearest(&p.homes).unwrap_or_else(|| self.here.clone()),
            None => self.here.clone(),
        }
    }

    /// The homes a write (or strong read) of the key placed so is tried at, in order (see
    /// [`crate::health::ranked`]); without a governing policy, this region alone. A refusal
    /// is counted by its kind.
    fn home_order(&self, placed: &Placed) -> Result<Ranked, NodeError> {
        match placed {
            Ok(Some(p)) if !p.homes.is_empty() => Ok(self.deps.health.ranked(&p.homes)),
            Ok(_) => Ok(vec![(self.here.clone(), Reachability::Up)]),
            Err(e) => {
                self.count_refusal(match e {
                    NodeError::DatasetNotInPolicy(_) => "dataset_not_in_policy",
                    NodeError::HomeUnknown(_) => "home_unknown",
                    _ => "other",
                });
                Err(e.clone())
            }
        }
    }

    /// The regions a write of the key placed so is tried at, in order, and which of them are
    /// failover targets rather than homes: the homes not marked down (as [`Gateway::home_order`]
    /// ranks them), then the dataset's failover targets in the policy's order (each takes the
    /// write only while it holds an active promotion), then the homes marked down.
    fn write_order(&self, placed: &Placed) -> Result<(Ranked, Vec<RegionId>), NodeError> {
        let homes = self.home_order(placed)?;
        let p = match placed {
            Ok(Some(p)) if !p.failover.is_empty() => p,
            _ => return Ok((homes, Vec::new())),
        };
        let targets: Vec<RegionId> = p.failover.iter().filter(|t| !p.homes.contains(t)).cloned().collect();
        let (down, mut order): (Ranked, Ranked) = homes.into_iter().partition(|(_, s)| *s == Reachability::Down);
        order.extend(targets.iter().map(|t| (t.clone(), self.deps.health.reachability(t))));
        order.extend(down);
        Ok((order, targets))
    }

    /// The other regions holding a copy of the key placed so (homes, then mirrors), in the
    /// order a read tries them.
    fn copy_order(&self, placed: &Placed) -> Ranked {
        let Ok(Some(p)) = placed else { return Vec::new() };
        let holders: Vec<RegionId> = p.homes.iter().chain(&p.mirrors).filter(|r| **r != self.here).cloned().collect();
        self.deps.health.ranked(&holders)
    }

    /// How to serve a read at `consistency`, given the key's homes in the order a strong read
    /// tries them:
    /// - `strong`: here through the leader if this region is a home, else at the homes;
    /// - `local`, `eventual`: this node's copy if its region holds one, else the nearest other
    ///   copy;
    /// - `bounded`: this node's copy if it is within the bound, else the nearest other copy
    ///   that is (a home's always is).
    /// - `session`: this node's copy if its region holds one and it has applied what the
    ///   session needs (after a brief wait), else the nearest other copy that has.
    fn read_plan(
        &self,
        consistency: Consistency,
        homes: Ranked,
        dataset: &DatasetName,
        placed: &Placed,
        session: Option<&VersionVector>,
    ) -> Result<ReadPlan, NodeError> {
        let at_home = homes.first().is_some_and(|(r, _)| *r == self.here);
        let holds_here = matches!(placed, Ok(Some(p)) if p.holds_copy(&self.here));
        let any = CopyNeed { max_staleness_ms: None, applied: Vec::new() };
        let bound = |max| CopyNeed { max_staleness_ms: Some(max), applied: Vec::new() };
        Ok(match self.level(consistency, placed) {
            Consistency::Session => {
                let key_homes: Vec<RegionId> = match placed {
                    Ok(Some(p)) => p.homes.clone(),
                    _ => vec![self.here.clone()],
                };
                let applied = session.map(|s| crate::session::requirement(s, &key_homes)).unwrap_or_default();
                let need = CopyNeed { max_staleness_ms: None, applied };
                if at_home || holds_here || !matches!(placed, Ok(Some(_))) {
                    ReadPlan::Session(self.copy_order(placed), need)
                } else {
                    ReadPlan::Copy(self.copy_order(placed), need)
                }
            }
            Consistency::Strong if at_home => ReadPlan::Here(ReadConsistency::Strong),
            Consistency::Strong => ReadPlan::Strong(homes),
            Consistency::Local | Consistency::Eventual if at_home || holds_here => {
                ReadPlan::Here(ReadConsistency::Local)
            }
            Consistency::Local | Consistency::Eventual => ReadPlan::Copy(self.copy_order(placed), any),
            Consistency::Bounded(max) => match self.local_staleness(placed)? {
                Some((staleness, budget)) => {
                    let max = max.or(budget).ok_or_else(|| NodeError::NoStalenessBound(dataset.to_string()))?;
                    if staleness <= max {
                        ReadPlan::Here(ReadConsistency::Local)
                    } else if at_home {
                        ReadPlan::Here(ReadConsistency::Strong)
                    } else {
                        ReadPlan::Copy(self.copy_order(placed), bound(max))
                    }
                }
                // No governing policy: every copy is this region's own.
                None if at_home => ReadPlan::Here(ReadConsistency::Strong),
                None => {
                    let budget = match placed {
                        Ok(Some(p)) => p.max_staleness.map(|d| d.ms()),
                        _ => None,
                    };
                    let max = max.or(budget).ok_or_else(|| NodeError::NoStalenessBound(dataset.to_string()))?;
                    ReadPlan::Copy(self.copy_order(placed), bound(max))
                }
            },
            Consistency::DatasetDefault => unreachable!("level() resolves it"),
        })
    }

    /// Turn a session plan into where it is served: here once this node's copy has applied
    /// what the session needs (waiting at most [`SESSION_WAIT`] for it), else at the other
    /// copies. Other plans pass through.
    async fn settle(&self, plan: ReadPlan) -> Result<ReadPlan, NodeError> {
        let ReadPlan::Session(others, need) = plan else { return Ok(plan) };
        let deadline = Instant::now() + SESSION_WAIT;
        loop {
            let (state, region_seq) = self.deps.region.reader().replication().map_err(NodeError::storage)?;
            if crate::session::applied(&need.applied, &self.here, region_seq, &state.merged) {
                return Ok(ReadPlan::Here(ReadConsistency::Local));
            }
            if Instant::now() >= deadline {
                self.deps.metrics.session_forwards.inc();
                return Ok(ReadPlan::Session(others, need));
            }
            tokio::time::sleep(SESSION_POLL).await;
        }
    }

    /// The level a read asks for, with the dataset's default resolved.
    fn level(&self, consistency: Consistency, placed: &Placed) -> Consistency {
        match consistency {
            Consistency::DatasetDefault => match placed {
                Ok(Some(p)) => match p.consistency {
                    PolicyConsistency::Strong => Consistency::Strong,
                    PolicyConsistency::Bounded => Consistency::Bounded(None),
                    PolicyConsistency::Local => Consistency::Local,
                    PolicyConsistency::Eventual => Consistency::Eventual,
                    PolicyConsistency::Session => Consistency::Session,
                },
                // No governing policy (or a refusal, reported elsewhere): the safe default.
                _ => Consistency::Strong,
            },
            c => c,
        }
    }

    /// Serve a read planned for other regions: strongly at the homes in turn (`strong`), or
    /// from the first copy, nearest first, that meets the plan's need (`copy`: any node of
    /// the region answers from its own state, or refuses).
    async fn serve_plan<T, F, Fut>(
        &self,
        what: String,
        plan: ReadPlan,
        strong: F,
        request: impl Fn(CopyNeed) -> PeerRequestV1,
        unpack: impl Fn(PeerResponseV1) -> Option<Result<T, PeerError>>,
    ) -> Result<(T, Served), NodeError>
    where
        F: Fn(RegionId, Instant) -> Fut,
        Fut: std::future::Future<Output = Result<(T, Served), Tried>>,
    {
        match plan {
            ReadPlan::Strong(homes) => self.first_to_serve(what, homes, strong).await,
            ReadPlan::Copy(holders, need) | ReadPlan::Session(holders, need) => {
                let reason = match (&need.max_staleness_ms, need.applied.is_empty()) {
                    (Some(_), _) => RouteReason::FreshCopy,
                    (None, false) => RouteReason::SessionCopy,
                    (None, true) => RouteReason::NearestCopy,
                };
                let (request, unpack, need) = (&request, &unpack, &need);
                let attempt = |region: RegionId, by: Instant| async move {
                    match self.deps.transport.call_any(&region, by, || request(need.clone()), unpack).await {
                        Ok((v, node)) => Ok((v, Served::by(node, reason))),
                        Err((_, AnyFailure::Unreachable(e))) => Err(Tried::Skip(SkipCause::Unreachable, e)),
                        Err((_, AnyFailure::Refused(e @ PeerError::Stale { .. }))) => {
                            Err(Tried::Skip(SkipCause::Stale, e.to_string()))
                        }
                        Err((_, AnyFailure::Refused(e @ PeerError::NoCopy(_)))) => {
                            Err(Tried::Skip(SkipCause::NoCopy, e.to_string()))
                        }
                        Err((_, AnyFailure::Refused(e @ PeerError::Behind(_)))) => {
                            Err(Tried::Skip(SkipCause::Behind, e.to_string()))
                        }
                        Err((node, AnyFailure::Refused(e))) => Err(Tried::from(peer_error(node, e))),
                    }
                };
                self.first_to_serve(what, holders, attempt).await
            }
            ReadPlan::Here(_) => Err(NodeError::Internal("a read planned here was sent elsewhere".into())),
        }
    }

    /// Try `attempt` in each region of `order` until one serves, giving each an even share of
    /// the request's time left. A region that fails in a way that proves nothing was applied
    /// ([`Tried::Skip`]) passes the request on; any other failure ends it. Regions marked down
    /// that were not tried are named in the answer too. When every region fails: the one
    /// region's own error if there was one, else [`NodeError::NoRegion`] naming each.
    async fn first_to_serve<T, F, Fut>(&self, what: String, order: Ranked, attempt: F) -> Result<(T, Served), NodeError>
    where
        F: Fn(RegionId, Instant) -> Fut,
        Fut: std::future::Future<Output = Result<(T, Served), Tried>>,
    {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let n = order.len();
        let mut tried: Vec<Skip> = Vec::new();
        let mut only: Option<NodeError> = None;
        for (i, (region, _)) in order.iter().enumerate() {
            let now = Instant::now();
            if now >= deadline {
                tried.push(Skip {
                    region: region.clone(),
                    cause: SkipCause::Unreachable,
                    detail: "not tried: the request's time ran out".into(),
                });
                continue;
            }
            let share = deadline.saturating_duration_since(now) / u32::try_from(n - i).unwrap_or(u32::MAX);
            match attempt(region.clone(), now + share).await {
                Ok((v, mut served)) => {
                    served.skipped = tried;
                    let later_down = order[i + 1..].iter().filter(|(_, s)| *s == Reachability::Down);
                    served.skipped.extend(later_down.map(|(r, _)| Skip {
                        region: r.clone(),
                        cause: SkipCause::Down,
                        detail: String::new(),
                    }));
                    return Ok((v, served));
                }
                Err(Tried::Fail(e)) => return Err(e),
                Err(Tried::Skip(cause, detail)) => {
                    if n == 1 {
                        only = Some(match cause {
                            SkipCause::NoLeader => NodeError::NoLeader,
                            _ => NodeError::Unavailable { node: 0, reason: format!("region {region}: {detail}") },
                        });
                    }
                    tried.push(Skip { region: region.clone(), cause, detail });
                }
            }
        }
        Err(only.unwrap_or(NodeError::NoRegion { message: what, tried }))
    }

    /// For a bounded-staleness read here: `None` if this region holds no copy of the key;
    /// otherwise how stale this node's copy may be, in milliseconds (0 in a home region,
    /// where the node follows the region's own log; in a mirror, the time since the moment
    /// as of which everything every home committed is merged here, `u64::MAX` if unknown),
    /// and the dataset's own `max_staleness` in milliseconds, if it has one.
    fn local_staleness(&self, placed: &Placed) -> Result<Option<(u64, Option<u64>)>, NodeError> {
        let Some(p) = placed.as_ref().map_err(Clone::clone)? else { return Ok(None) };
        if !p.holds_copy(&self.here) {
            return Ok(None);
        }
        let budget = p.max_staleness.map(|d| d.ms());
        if p.homes.contains(&self.here) {
            return Ok(Some((0, budget)));
        }
        let (state, _) = self.deps.region.reader().replication().map_err(NodeError::storage)?;
        let now = self.deps.clock.now_ms();
        let staleness = p
            .homes
            .iter()
            .map(|h| state.fresh.get(h.as_str()).map_or(u64::MAX, |f| now.saturating_sub(*f)))
            .max()
            .unwrap_or(u64::MAX);
        Ok(Some((staleness, budget)))
    }

    /// Refuse to bring the key's value into this region if its placement does not allow this
    /// region to hold its bytes: a read served elsewhere would carry the value here.
    fn check_value_may_come_here(&self, dataset: &DatasetName, key: &Key, placed: &Placed) -> Result<(), NodeError> {
        match placed.as_ref().map_err(Clone::clone)? {
            Some(p) if !p.is_allowed(&self.here) => {
                self.count_refusal("residency_refused");
                Err(NodeError::ResidencyRefused(
                    format!(
                        "{dataset}/{key} may not be read through {}: its policy keeps its bytes in {}",
                        self.here,
                        p.allowed.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                    p.allowed.clone(),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Where a PUT of (dataset, key) goes: its homes in the order they are tried (see
    /// [`Gateway::home_order`]), or, for a user-homed key whose home comes from the `home`
    /// attribute (no region prefix), that one home, once a check finds the key does not
    /// already live in another region: its home never changes. The check reads the home
    /// region and, if the key is new there, every other region; two first writes racing from
    /// different regions with different homes can still both land (a home directory is the
    /// fix).
    async fn route_put(
        &self,
        dataset: &DatasetName,
        key: &Key,
        home: Option<&str>,
    ) -> Result<(Ranked, Vec<RegionId>), NodeError> {
        let home = self.parse_home(home)?;
        // One deadline for the whole check, not one per region asked.
        match tokio::time::timeout(REQUEST_TIMEOUT, self.route_put_checked(dataset, key, home.as_ref())).await {
            Ok(answer) => answer,
            Err(_) => Err(NodeError::Unavailable {
                node: self.id,
                reason: format!("checking where {dataset}/{key} lives took longer than {REQUEST_TIMEOUT:?}"),
            }),
        }
    }

    async fn route_put_checked(
        &self,
        dataset: &DatasetName,
        key: &Key,
        home: Option<&RegionId>,
    ) -> Result<(Ranked, Vec<RegionId>), NodeError> {
        let placed = self.place(dataset, key, home)?;
        let order = self.write_order(&placed)?;
        if home.is_none() {
            return Ok(order);
        }
        let Some(p) = placed.as_ref().map_err(Clone::clone)? else { return Ok(order) };
        let from_attribute = p.regions.iter().any(|d| d.reason == meridian_policy::Reason::HomeFromAttribute);
        if !from_attribute {
            return Ok(order);
        }
        let region = self.home_order(&placed)?[0].0.clone();
        let (ds, k) = (dataset.as_str(), key.as_str());
        if self.read_in(&region, ds, k).await?.0.is_some_and(|o| o.is_live()) {
            return Ok(order);
        }
        let others: Vec<RegionId> =
            self.deps.region.topology().regions().iter().map(|r| r.name.clone()).filter(|r| *r != region).collect();
        let found = futures::future::join_all(others.iter().map(|r| self.read_in(r, ds, k))).await;
        for (r, answer) in others.iter().zip(found) {
            match answer {
                Ok((Some(obj), _)) if obj.is_live() => {
                    return Err(NodeError::HomeImmutable(format!(
                    "{dataset}/{key} already lives in {r}; a user-homed key's home cannot change (asked for {region})"
                )))
                }
                Ok(_) => {}
                // Unknown is not absent: refuse rather than risk a second home.
                Err(e) => {
                    return Err(NodeError::Unavailable {
                        node: 0,
                        reason: format!("cannot check that {dataset}/{key} is not homed in {r}: {e}"),
                    })
                }
            }
        }
        Ok(order)
    }

    // ---- writes in a region --------------------------------------------------------------

    /// Apply a write in `region`: here (through this region's leader), or at another region's
    /// leader over the peer transport. Also the path of the node's own records (`_policy`,
    /// `_audit`), which no dataset policy governs.
    pub(crate) async fn write_in(&self, region: &RegionId, op: WriteOp) -> Result<(CommandResult, Served), NodeError> {
        self.write_in_until(region, Instant::now() + REQUEST_TIMEOUT, op).await
    }

    /// [`Gateway::write_in`], giving up on another region at `deadline`.
    async fn write_in_until(
        &self,
        region: &RegionId,
        deadline: Instant,
        op: WriteOp,
    ) -> Result<(CommandResult, Served), NodeError> {
        if *region == self.here {
            return self.write_local(op).await;
        }
        let request = || match &op {
            WriteOp::One(r) => PeerRequestV1::Write(r.clone()),
            WriteOp::Atomic(rs) => PeerRequestV1::WriteAtomic(rs.clone()),
        };
        let unpack = |r| match r {
            PeerResponseV1::Write(r) => Some(r),
            _ => None,
        };
        let (result, node) = self.deps.transport.call_region_until(region, deadline, request, unpack, false).await?;
        Ok((result, Served::by(node, RouteReason::ForwardedToHome)))
    }

    /// Apply a write in this node's region, forwarding it to the leader if this node is not it.
    pub(crate) async fn write_local(&self, op: WriteOp) -> Result<(CommandResult, Served), NodeError> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let leader = match self.write_here(&op).await {
                Ok(result) => return Ok((result, Served::by(self.id, RouteReason::Leader))),
                Err(LocalError::Other(e)) => return Err(e),
                Err(LocalError::NotLeader(leader)) => leader,
            };
            if let Some(leader) = leader.filter(|&l| l != self.id) {
                self.deps.metrics.forwarded.get_or_create(&KindLabels { kind: "write".into() }).inc();
                let remaining = deadline.saturating_duration_since(Instant::now());
                let request = match &op {
                    WriteOp::One(r) => PeerRequestV1::Write(r.clone()),
                    WriteOp::Atomic(rs) => PeerRequestV1::WriteAtomic(rs.clone()),
                };
                match self.deps.transport.call(leader, request, remaining).await {
                    Ok(PeerResponseV1::Write(Ok(result))) => {
                        return Ok((result, Served::by(leader, RouteReason::ForwardedToLeader)))
                    }
                    // Not applied: leadership moved. Retry below.
                    Ok(PeerResponseV1::Write(Err(PeerError::NotLeader { .. }))) => {}
                    Ok(PeerResponseV1::Write(Err(e))) => return Err(peer_error(leader, e)),
                    Ok(other) => return Err(NodeError::Internal(format!("unexpected reply to a write: {other:?}"))),
                    // Never delivered: safe to retry.
                    Err(RpcFailure::Unreachable(_)) => {}
                    Err(e @ (RpcFailure::Timeout(_) | RpcFailure::Interrupted(_) | RpcFailure::Protocol(_))) => {
                        return Err(NodeError::OutcomeUnknown(e.to_string()))
                    }
                }
            }
            if attempt >= LEADER_ATTEMPTS_MAX || Instant::now() >= deadline {
                return Err(NodeError::NoLeader);
            }
            // Back off, but retry as soon as this node learns of another leader: after a
            // leader dies, the pause ends when the election does, not on a fixed schedule.
            self.deps.region.await_leader_change(leader, leader_backoff(attempt)).await;
        }
    }

    /// Propose a write to the local Raft group if this node leads it: check the placement of
    /// every key under this region's own copy of the policy, stamp the HLC, and propose the
    /// write in one atomic group with a condition pinning that copy.
    pub(crate) async fn write_here(&self, op: &WriteOp) -> Result<CommandResult, LocalError> {
        self.deps.region.lead_or_refuse()?;
        let reqs = op.requests();
        if let WriteOp::Atomic(rs) = op {
            let mut keys = BTreeSet::new();
            if rs.is_empty() || !rs.iter().all(|r| keys.insert((&r.dataset, &r.key))) {
                return Err(LocalError::Other(NodeError::Internal(
                    "an atomic group is empty or names a key twice".into(),
                )));
            }
        }
        // The leader checks placement with its own copy of the policy, so a gateway holding
        // an older one can never make this region store what its policy forbids here.
        // Reserved namespaces (`_policy`, `_audit`) are the cluster's own records: no dataset
        // policy governs them.
        let (guard, rules, promotions) = if reqs.iter().any(|r| !r.dataset.starts_with('_')) {
            self.deps.policy.catch_up_for_writes(&self.deps.region).await?;
            let (condition, rules, promotions) = self.deps.policy.guard(self, reqs).await.map_err(LocalError::Other)?;
            (Some(condition), rules, promotions)
        } else {
            (None, vec![None; reqs.len()], Vec::new())
        };
        // The checks ahead of the writes: the policy copy, then each promotion stood on.
        let checks = usize::from(guard.is_some()) + promotions.len();
        let hlc = {
            let mut hlc = self.hlc.lock().expect("hlc lock");
            match hlc.now(self.deps.clock.now_ms()) {
                Ok(t) => t,
                Err(e) => {
                    self.deps.metrics.hlc_refusals.inc();
                    return Err(LocalError::Other(NodeError::ClockSkew(e.to_string())));
                }
            }
        };
        // A counter, set or map grows with its operations: its state stays within the value
        // limit, judged on this leader's applied copy (what the operation will apply to).
        for r in reqs {
            if let WriteEffect::Op(op) = &r.effect {
                let current = self.deps.region.reader().get(&r.dataset, &r.key).map_err(NodeError::storage)?;
                let size = current.map_or(0, |o| o.encoded_len()) + op.encoded_len();
                if size > self.value_bytes_max {
                    return Err(LocalError::Other(NodeError::TooLarge(format!(
                        "{}/{} would hold about {size} bytes after this {}; the value limit is {} bytes",
                        r.dataset,
                        r.key,
                        op.name(),
                        self.value_bytes_max
                    ))));
                }
            }
        }
        let writes: Vec<CommandV1> = reqs
            .iter()
            .zip(&rules)
            .map(|(r, rules)| write_command(r, *rules, hlc))
            .collect::<Result<_, NodeError>>()
            .map_err(LocalError::Other)?;
        let mut cmds: Vec<CommandV1> = Vec::new();
        if let Some(condition) = &guard {
            cmds.push(CommandV1::Check {
                dataset: policy::NAMESPACE.into(),
                key: policy::ACTIVE_KEY.into(),
                condition: condition.clone(),
            });
        }
        for (key, condition) in promotions {
            cmds.push(CommandV1::Check { dataset: crate::failover::NAMESPACE.into(), key, condition });
        }
        let cmd = match (op, guard.is_some()) {
            (WriteOp::One(_), false) => writes.into_iter().next().expect("one write"),
            (WriteOp::One(_), true) | (WriteOp::Atomic(_), _) => {
                cmds.extend(writes);
                CommandV1::Atomic(cmds)
            }
        };
        let result = self.deps.proposer.propose(cmd).await?;
        // Committed and applied here: the links may have something to ship.
        self.commits.ring();
        if guard.is_none() {
            return Ok(result);
        }
        // Unwrap the guard: a check's own failure means the policy or a promotion moved under
        // the write.
        let policy_moved = || {
            LocalError::Other(NodeError::PolicyRefused(
                "the policy or a failover promotion changed while the write was in flight; nothing was written, retry"
                    .into(),
            ))
        };
        match (op, result) {
            (_, CommandResult::AtomicFailed { index, .. }) if (index as usize) < checks => Err(policy_moved()),
            (WriteOp::One(_), CommandResult::AtomicFailed { current, .. }) => {
                Ok(CommandResult::PreconditionFailed { current })
            }
            (WriteOp::One(_), CommandResult::Batch(mut results)) if results.len() == checks + 1 => {
                Ok(results.remove(checks))
            }
            (WriteOp::Atomic(_), CommandResult::AtomicFailed { index, current }) => {
                Ok(CommandResult::AtomicFailed { index: index - checks as u32, current })
            }
            (WriteOp::Atomic(_), CommandResult::Batch(mut results)) if results.len() >= checks => {
                results.drain(..checks);
                Ok(CommandResult::Batch(results))
            }
            (_, other) => {
                Err(LocalError::Other(NodeError::Internal(format!("unexpected guarded write result {other:?}"))))
            }
        }
    }

    // ---- reads in a region ---------------------------------------------------------------

    /// Read in this node's region: from this node's state (`Local`), or through the leader.
    pub(crate) async fn read(
        &self,
        dataset: &str,
        key: &str,
        consistency: ReadConsistency,
    ) -> Result<(Option<StoredObject>, Served), NodeError> {
        let reader = self.deps.region.reader();
        let local = || reader.get(dataset, key).map_err(NodeError::storage);
        let request = || PeerRequestV1::Read { dataset: dataset.into(), key: key.into() };
        self.route_read(consistency, local, request, |r| match r {
            PeerResponseV1::Read(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn list_local(
        &self,
        dataset: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        consistency: ReadConsistency,
    ) -> Result<(Vec<(String, StoredObject)>, Served), NodeError> {
        let reader = self.deps.region.reader();
        let local = || reader.list(dataset, prefix, after, limit).map_err(NodeError::storage);
        let req = || list_request(dataset, prefix, after, limit);
        self.route_read(consistency, local, req, |r| match r {
            PeerResponseV1::List(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// A strong read in `region`: this region's leader, or another region's.
    pub(crate) async fn read_in(
        &self,
        region: &RegionId,
        dataset: &str,
        key: &str,
    ) -> Result<(Option<StoredObject>, Served), NodeError> {
        self.read_in_until(region, Instant::now() + REQUEST_TIMEOUT, dataset, key).await
    }

    /// [`Gateway::read_in`], giving up on another region at `deadline`.
    async fn read_in_until(
        &self,
        region: &RegionId,
        deadline: Instant,
        dataset: &str,
        key: &str,
    ) -> Result<(Option<StoredObject>, Served), NodeError> {
        if *region == self.here {
            return self.read(dataset, key, ReadConsistency::Strong).await;
        }
        let request = || PeerRequestV1::Read { dataset: dataset.into(), key: key.into() };
        let unpack = |r| match r {
            PeerResponseV1::Read(r) => Some(r),
            _ => None,
        };
        let (v, node) = self.deps.transport.call_region_until(region, deadline, request, unpack, true).await?;
        Ok((v, Served::by(node, RouteReason::ForwardedToHome)))
    }

    /// A strong listing in `region`.
    pub(crate) async fn list_in(
        &self,
        region: &RegionId,
        dataset: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(String, StoredObject)>, Served), NodeError> {
        self.list_in_until(region, Instant::now() + REQUEST_TIMEOUT, dataset, prefix, after, limit).await
    }

    /// A strong listing in `region`, giving up on another region at `deadline`.
    async fn list_in_until(
        &self,
        region: &RegionId,
        deadline: Instant,
        dataset: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<(String, StoredObject)>, Served), NodeError> {
        if *region == self.here {
            return self.list_local(dataset, prefix, after, limit, ReadConsistency::Strong).await;
        }
        let request = || list_request(dataset, prefix, after, limit);
        let unpack = |r| match r {
            PeerResponseV1::List(r) => Some(r),
            _ => None,
        };
        let (v, node) = self.deps.transport.call_region_until(region, deadline, request, unpack, true).await?;
        Ok((v, Served::by(node, RouteReason::ForwardedToHome)))
    }

    /// Live keys and bytes per dataset as one node of `region` holds them.
    pub(crate) async fn dataset_sizes_in(&self, region: &RegionId) -> Result<Vec<(String, u64, u64)>, NodeError> {
        if *region == self.here {
            return self.local_dataset_sizes();
        }
        let unpack = |r| match r {
            PeerResponseV1::DatasetSizes(r) => Some(r),
            _ => None,
        };
        Ok(self.deps.transport.call_region(region, || PeerRequestV1::DatasetSizes, unpack, true).await?.0)
    }

    pub(crate) fn local_dataset_sizes(&self) -> Result<Vec<(String, u64, u64)>, NodeError> {
        let sizes = self.deps.region.reader().dataset_sizes().map_err(NodeError::storage)?;
        Ok(sizes.into_iter().map(|(d, (k, b))| (d, k, b)).collect())
    }

    /// Serve a read here (local, or strong when this node leads), or forward it to the leader.
    async fn route_read<T>(
        &self,
        consistency: ReadConsistency,
        local: impl Fn() -> Result<T, NodeError>,
        request: impl Fn() -> PeerRequestV1,
        unpack: impl Fn(PeerResponseV1) -> Option<Result<T, PeerError>>,
    ) -> Result<(T, Served), NodeError> {
        if consistency == ReadConsistency::Local {
            return Ok((local()?, Served::by(self.id, RouteReason::Local)));
        }
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let leader = match self.deps.region.read_index().await {
                Ok(()) => return Ok((local()?, Served::by(self.id, RouteReason::Leader))),
                Err(LocalError::Other(e)) => return Err(e),
                Err(LocalError::NotLeader(l)) => l,
            };
            if let Some(leader) = leader.filter(|&l| l != self.id) {
                self.deps.metrics.forwarded.get_or_create(&KindLabels { kind: "read".into() }).inc();
                let remaining = deadline.saturating_duration_since(Instant::now());
                // Reads change nothing: any transport failure may be retried.
                if let Ok(reply) = self.deps.transport.call(leader, request(), remaining).await {
                    match unpack(reply) {
                        Some(Ok(v)) => return Ok((v, Served::by(leader, RouteReason::ForwardedToLeader))),
                        Some(Err(PeerError::NotLeader { .. })) => {}
                        Some(Err(e)) => return Err(peer_error(leader, e)),
                        None => return Err(NodeError::Internal("unexpected reply to a read".into())),
                    }
                }
            }
            if attempt >= LEADER_ATTEMPTS_MAX || Instant::now() >= deadline {
                return Err(NodeError::NoLeader);
            }
            // Back off, but retry as soon as this node learns of another leader: after a
            // leader dies, the pause ends when the election does, not on a fixed schedule.
            self.deps.region.await_leader_change(leader, leader_backoff(attempt)).await;
        }
    }

    // ---- the peer side -------------------------------------------------------------------

    /// A write forwarded by another node: applied here if this node leads.
    pub(crate) async fn serve_write(&self, op: WriteOp) -> Result<CommandResult, PeerError> {
        self.write_here(&op).await.map_err(LocalError::into_peer_error)
    }

    /// A strong read forwarded by another node: served here if this node leads.
    pub(crate) async fn serve_read(&self, dataset: &str, key: &str) -> Result<Option<StoredObject>, PeerError> {
        self.serve_strong(|| self.deps.region.reader().get(dataset, key).map_err(NodeError::storage)).await
    }

    /// A strong listing forwarded by another node.
    pub(crate) async fn serve_list(
        &self,
        dataset: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, StoredObject)>, PeerError> {
        let limit = (limit as usize).min(LIST_LIMIT_MAX);
        self.serve_strong(|| self.deps.region.reader().list(dataset, prefix, after, limit).map_err(NodeError::storage))
            .await
    }

    /// A read of this node's own copy asked by a gateway in region `to` (see
    /// [`PeerRequestV1::ReadCopy`]).
    pub(crate) fn serve_read_copy(
        &self,
        dataset: &str,
        key: &str,
        home: Option<&str>,
        to: &str,
        need: CopyNeed,
    ) -> Result<Option<StoredObject>, PeerError> {
        self.check_copy(dataset, key, home, to, need)?;
        self.deps.region.reader().get(dataset, key).map_err(|e| to_peer_error(NodeError::storage(e)))
    }

    /// A listing of this node's own copy asked by a gateway in region `to`, placed by its
    /// prefix as the gateway placed it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn serve_list_copy(
        &self,
        dataset: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
        home: Option<&str>,
        to: &str,
        need: CopyNeed,
    ) -> Result<Vec<(String, StoredObject)>, PeerError> {
        let probe = if prefix.is_empty() { "_" } else { prefix };
        self.check_copy(dataset, probe, home, to, need)?;
        let limit = (limit as usize).min(LIST_LIMIT_MAX);
        self.deps.region.reader().list(dataset, prefix, after, limit).map_err(|e| to_peer_error(NodeError::storage(e)))
    }

    /// Whether this node may answer a copy read of (dataset, key) for region `to`: under this
    /// region's own copy of the policy, this region holds a copy, `to` may hold the key's
    /// bytes, and the copy here is as fresh as `need` asks.
    fn check_copy(
        &self,
        dataset: &str,
        key: &str,
        home: Option<&str>,
        to: &str,
        need: CopyNeed,
    ) -> Result<(), PeerError> {
        let bad = |e: String| PeerError::Protocol(e);
        let dataset = DatasetName::new(dataset).map_err(|e| bad(e.to_string()))?;
        let key = Key::new(key).map_err(|e| bad(e.to_string()))?;
        let to = RegionId::new(to).map_err(|e| bad(e.to_string()))?;
        let home = self.parse_home(home).map_err(to_peer_error)?;
        self.deps.policy.refresh().map_err(to_peer_error)?;
        let placed = self.deps.policy.placement(&dataset, &key, home.as_ref());
        if let Some(p) = placed.as_ref().map_err(|e| to_peer_error(e.clone()))? {
            if !p.holds_copy(&self.here) {
                return Err(PeerError::NoCopy(format!(
                    "{} holds no copy of {dataset}/{key} under its policy",
                    self.here
                )));
            }
            if !p.is_allowed(&to) {
                return Err(PeerError::NoCopy(format!(
                    "{dataset}/{key} may not be sent to {to} under {}'s policy",
                    self.here
                )));
            }
        }
        if !need.applied.is_empty() {
            let (state, region_seq) =
                self.deps.region.reader().replication().map_err(|e| to_peer_error(NodeError::storage(e)))?;
            if !crate::session::applied(&need.applied, &self.here, region_seq, &state.merged) {
                let want: Vec<String> = need.applied.iter().map(|(r, n)| format!("{r} up to {n}")).collect();
                return Err(PeerError::Behind(format!("the session has seen {}", want.join(", "))));
            }
        }
        if let Some(bound_ms) = need.max_staleness_ms {
            let staleness_ms = self.local_staleness(&placed).map_err(to_peer_error)?.map_or(0, |(s, _)| s);
            if staleness_ms > bound_ms {
                return Err(PeerError::Stale { staleness_ms, bound_ms });
            }
        }
        Ok(())
    }

    async fn serve_strong<T>(&self, read: impl Fn() -> Result<T, NodeError>) -> Result<T, PeerError> {
        self.deps.region.read_index().await.map_err(LocalError::into_peer_error)?;
        read().map_err(to_peer_error)
    }
}

/// The command for one client write, by the dataset's kind and conflict rule (`None`: no
/// dataset policy governs the key). Refuses writes the dataset cannot take, with what to do
/// instead.
fn write_command(r: &WriteRequest, rules: Option<WriteRules>, hlc: HlcTimestamp) -> Result<CommandV1, NodeError> {
    let (dataset, key, condition) = (r.dataset.clone(), r.key.clone(), r.condition.clone());
    let crdt = rules.and_then(WriteRules::crdt_kind);
    let siblings = rules.is_some_and(|w| w.conflict == ConflictRule::Siblings);
    Ok(match (&r.effect, crdt) {
        (WriteEffect::Replace, None) => match &r.value {
            Some(value) => CommandV1::Put { dataset, key, value: value.clone(), hlc, condition },
            None => CommandV1::Delete { dataset, key, hlc, condition },
        },
        (WriteEffect::Replace, Some(kind)) => match r.value {
            None => CommandV1::Op { dataset, key, op: CrdtOp::Clear, kind, hlc, condition },
            Some(_) => {
                return Err(NodeError::WrongOperation(format!(
                    "{dataset} is a {kind} dataset merged by its kind's laws, so a PUT would overwrite what \
                     other regions did concurrently; use POST /v1/datasets/{dataset}/keys/{{key}}/{} \
                     (meridian op {dataset} KEY {} ...)",
                    op_names(kind),
                    op_names(kind).split('|').next().unwrap_or("add"),
                )))
            }
        },
        (WriteEffect::InContext(context), None) if siblings => {
            CommandV1::PutInContext { dataset, key, value: r.value.clone(), hlc, condition, context: context.clone() }
        }
        (WriteEffect::InContext(_), _) => {
            return Err(NodeError::WrongOperation(format!(
                "a causal context applies to datasets whose conflict rule is siblings, and {dataset}'s is {}; \
                 write without one",
                rules.map_or("none (no policy governs it)".to_owned(), |w| w.conflict.to_string())
            )))
        }
        (WriteEffect::Op(op), Some(kind)) if op.kind().is_none_or(|k| k == kind) => {
            CommandV1::Op { dataset, key, op: op.clone(), kind, hlc, condition }
        }
        (WriteEffect::Op(op), Some(kind)) => {
            return Err(NodeError::WrongOperation(format!(
                "`{}` applies to a {}, and {dataset} is a {kind} dataset; its operations are {}",
                op.name(),
                op.kind().map_or("any kind".to_owned(), |k| k.to_string()),
                op_names(kind)
            )))
        }
        (WriteEffect::Op(op), None) => {
            return Err(NodeError::WrongOperation(format!(
            "`{}` is an operation on a counter, set or map, and {dataset} holds JSON documents{}; write it with PUT",
            op.name(),
            if rules.is_none() { " (no policy governs it)" } else { "" }
        )))
        }
    })
}

/// The operations a kind takes, as the API names them.
pub fn op_names(kind: CrdtKind) -> &'static str {
    match kind {
        CrdtKind::Counter => "increment|decrement",
        CrdtKind::Set => "add|remove",
        CrdtKind::Map => "set|delete",
    }
}

fn list_request(dataset: &str, prefix: &str, after: Option<&str>, limit: usize) -> PeerRequestV1 {
    PeerRequestV1::List {
        dataset: dataset.into(),
        prefix: prefix.into(),
        after: after.map(str::to_owned),
        limit: limit as u32,
    }
}
