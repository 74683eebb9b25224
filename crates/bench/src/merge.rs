//! `meridian bench merge`: what multi-primary merges cost a destination region, against plain
//! single-home apply on the same workload, and what version vectors cost on the wire.
//!
//! Merges: one region (`eu-west`) receives, in memory, the stream of changes its links would
//! deliver, and applies it through a real [`StateMachineStore`] (redb on disk, as in
//! production) as `ApplyChanges` entries of `--batch` changes, one entry per apply call, timing
//! only the apply calls. Every run starts from a fresh store holding the first region's
//! version of every key, then applies a warm-up pass on separate keys (untimed), then the
//! measured stream of two changes per key:
//! - baseline (plain single-home apply): both from the home (`us-east`), each causally newer
//!   than what is held, so each simply replaces the copy (rule `lww`, no conflict);
//! - `lww`, `siblings`: one version from `ap-south` that never saw the held one, then one from
//!   `us-east` that never saw `ap-south`'s: every change is concurrent with the copy, so every
//!   change is a real merge and writes a conflict record;
//! - `crdt`: the same with observed-remove set states (`ap-south` adds its members, `us-east`
//!   removes one of its own and adds another), values rendered as the JSON a read answers.
//!
//! Rounds run baseline, lww, baseline, siblings, baseline, crdt. Each rule reports its changes
//! merged per second (median of its runs), the p99 and p99.9 of per-batch apply latency over
//! every batch of every round, and the ratio of its median rate to the baseline's (target at
//! least 0.8).
//!
//! Bytes: for the same workload, the postcard encoding (as a link batch carries each change,
//! before compression) of a change in the form with version vectors ([`Change`]) against the
//! form before them ([`RemoteChange`], the same version and value), for a single-home change
//! and for each rule's merged two-region object.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use meridian_core::crdt::{CrdtKind, CrdtObject, CrdtOp, Stamp};
use meridian_core::{HlcTimestamp, RegionId, Version, VersionVector};
use meridian_raft::command::{Change, CommandV1, MergeRule, RemoteChange, StoredObject};
use meridian_raft::{Command, CommandResult, Entry, StateMachineStore};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use serde::Serialize;

use crate::report::{CpuTimes, Machine};

/// The dataset every change belongs to.
pub const DATASET: &str = "bench";
/// The region that applies the stream.
pub const HERE: &str = "eu-west";
/// The home of the baseline, and the first writer of every key.
pub const FIRST: &str = "us-east";
/// The other writer of the concurrent workloads.
pub const SECOND: &str = "ap-south";
/// The throughput ratio every rule must reach against the baseline.
pub const TARGET_RATIO: f64 = 0.8;

/// Bounds of the inputs: the stream of a run is held in memory, and every run is applied in
/// full.
pub const KEYS_MAX: usize = 200_000;
pub const WARMUP_KEYS_MAX: usize = 200_000;
pub const ROUNDS_MAX: usize = 20;
pub const BATCH_MAX: usize = 4096;
pub const VALUE_BYTES_MIN: usize = 128;
pub const VALUE_BYTES_MAX: usize = 65_536;
pub const MIXES_MAX: usize = 4;

/// HLC wall time of the first change of a workload (2026-01-01); each change is a
/// millisecond after the one before it.
const BASE_MS: u64 = 1_767_225_600_000;
/// Members each region's set change carries.
const SET_MEMBERS: usize = 5;

/// Measure multi-primary merges against plain single-home apply, in one run, and bytes per
/// change with version vectors against the form before them.
///
/// A destination region applies the changes its links would deliver through a real state
/// machine on disk, in batches of `--batch` changes: from one home (each change causally newer,
/// the baseline), and for each rule (lww, siblings, crdt set) from two regions writing every
/// key concurrently, so every change is a merge and writes a conflict record. Runs alternate
/// baseline and rule for `--rounds` rounds. Prints changes merged per second, p99 and p99.9 per
/// batch, and each rule's ratio to the baseline (target: at least 0.8).
#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// Keys each run's measured stream covers (two changes per key).
    #[arg(long, default_value_t = 10_000)]
    pub keys: usize,
    /// Rounds; each runs baseline, lww, baseline, siblings, baseline, crdt on fresh stores.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Changes per `ApplyChanges` entry (a link sends at most 256).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Keys of the untimed warm-up pass each run applies first (separate keys, same stream).
    #[arg(long, default_value_t = 1_000)]
    pub warmup_keys: usize,
    /// Bytes of each document value (a JSON string); set changes carry members sized so that
    /// a merged set renders about this long.
    #[arg(long, default_value_t = 256)]
    pub value_bytes: usize,
    /// Shares of keys, in percent, whose two changes are concurrent, one mix per value: each
    /// rule runs once per mix. The other keys' changes are ordered (each writer saw the other's
    /// change), as most writes to a multi-home dataset are. 100 is the worst case: every change
    /// is a merge that writes a conflict record.
    #[arg(long, value_delimiter = ',', default_values_t = [5u8, 100])]
    pub concurrent: Vec<u8>,
    /// Rules to run, comma-separated (each runs with its own baseline run before it).
    #[arg(long, value_delimiter = ',', default_values_t = [RuleArg::Lww, RuleArg::Siblings, RuleArg::Crdt])]
    pub rules: Vec<RuleArg>,
    /// Directory to create each run's store under (default: the system's temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl Default for MergeArgs {
    fn default() -> Self {
        MergeArgs {
            keys: 10_000,
            rounds: 3,
            batch: 256,
            warmup_keys: 1_000,
            value_bytes: 256,
            concurrent: vec![5, 100],
            rules: vec![RuleArg::Lww, RuleArg::Siblings, RuleArg::Crdt],
            dir: None,
            json: false,
        }
    }
}

impl MergeArgs {
    /// Rejects unusable parameters before anything is built.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(1..=KEYS_MAX).contains(&self.keys) {
            bail!("--keys must be between 1 and {KEYS_MAX} (got {})", self.keys);
        }
        if !(1..=ROUNDS_MAX).contains(&self.rounds) {
            bail!("--rounds must be between 1 and {ROUNDS_MAX} (got {})", self.rounds);
        }
        if !(1..=BATCH_MAX).contains(&self.batch) {
            bail!("--batch must be between 1 and {BATCH_MAX} changes (got {})", self.batch);
        }
        if self.warmup_keys > WARMUP_KEYS_MAX {
            bail!("--warmup-keys must be at most {WARMUP_KEYS_MAX} (got {})", self.warmup_keys);
        }
        if !(VALUE_BYTES_MIN..=VALUE_BYTES_MAX).contains(&self.value_bytes) {
            bail!("--value-bytes must be between {VALUE_BYTES_MIN} and {VALUE_BYTES_MAX} (got {})", self.value_bytes);
        }
        if self.concurrent.is_empty() || self.concurrent.len() > MIXES_MAX {
            bail!("--concurrent takes 1 to {MIXES_MAX} shares (got {})", self.concurrent.len());
        }
        if let Some(p) = self.concurrent.iter().find(|p| **p > 100) {
            bail!("--concurrent shares are percentages from 0 to 100 (got {p})");
        }
        if (1..self.concurrent.len()).any(|i| self.concurrent[..i].contains(&self.concurrent[i])) {
            bail!("--concurrent lists a share twice: {:?}", self.concurrent);
        }
        if self.rules.is_empty() || (1..self.rules.len()).any(|i| self.rules[..i].contains(&self.rules[i])) {
            bail!("--rules takes each of lww, siblings, crdt at most once (got {:?})", self.rules);
        }
        if let Some(dir) = &self.dir {
            if !dir.is_dir() {
                bail!("--dir {} is not a directory", dir.display());
            }
        }
        Ok(())
    }

    fn data_root(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

/// A rule `--rules` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuleArg {
    Lww,
    Siblings,
    Crdt,
}

impl RuleArg {
    fn workload(self) -> Workload {
        match self {
            RuleArg::Lww => Workload::Lww,
            RuleArg::Siblings => Workload::Siblings,
            RuleArg::Crdt => Workload::Crdt,
        }
    }
}

impl std::fmt::Display for RuleArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.workload().name())
    }
}

/// What one run applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Plain single-home apply of documents: every change from one region, causally newer
    /// than the copy (the baseline of lww and siblings).
    Baseline,
    /// The same with set states (the baseline of crdt): what a single-home set dataset's
    /// links deliver, each change replacing the copy with its state.
    #[serde(rename = "baseline-set")]
    BaselineSet,
    Lww,
    Siblings,
    /// Observed-remove sets.
    Crdt,
}

impl Workload {
    pub const RULES: [Workload; 3] = [Workload::Lww, Workload::Siblings, Workload::Crdt];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Baseline => "baseline",
            Workload::BaselineSet => "baseline-set",
            Workload::Lww => "lww",
            Workload::Siblings => "siblings",
            Workload::Crdt => "crdt",
        }
    }

    /// The rule its changes name.
    pub fn rule(self) -> MergeRule {
        match self {
            Workload::Baseline | Workload::Lww => MergeRule::Lww,
            Workload::Siblings => MergeRule::Siblings,
            Workload::Crdt | Workload::BaselineSet => MergeRule::Crdt,
        }
    }

    /// The single-home apply of the same kind of value a rule is measured against.
    pub fn baseline(self) -> Workload {
        match self {
            Workload::Crdt | Workload::BaselineSet => Workload::BaselineSet,
            Workload::Baseline | Workload::Lww | Workload::Siblings => Workload::Baseline,
        }
    }

    /// Whether its values are set states.
    fn sets(self) -> bool {
        self.baseline() == Workload::BaselineSet
    }

    /// Whether it runs a rule (the baseline does not).
    pub fn is_rule(self) -> bool {
        !matches!(self, Workload::Baseline | Workload::BaselineSet)
    }
}

/// One `ApplyChanges` entry's contents.
#[derive(Debug, Clone)]
struct Batch {
    source: String,
    from_seq: u64,
    upto_seq: u64,
    fresh_ms: u64,
    changes: Vec<Change>,
}

impl Batch {
    fn into_entry(self, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::V1(CommandV1::ApplyChanges {
                source: self.source,
                from_seq: self.from_seq,
                upto_seq: self.upto_seq,
                fresh_ms: self.fresh_ms,
                changes: self.changes,
            })),
        }
    }
}

/// A run's stream: what is applied before the clock starts, and what is timed.
#[derive(Debug, Clone)]
struct Plan {
    workload: Workload,
    /// Percent of keys whose changes are concurrent (0 for the baseline).
    concurrent_pct: u8,
    untimed: Vec<Batch>,
    /// Conflicts the untimed part records (the warm-up pass's concurrent changes).
    untimed_concurrent: u64,
    timed: Vec<Batch>,
    /// Conflicts the timed part records: one per change to a concurrent key.
    timed_concurrent: u64,
    /// The measured keys.
    keys: Vec<String>,
}

impl Plan {
    fn timed_changes(&self) -> u64 {
        self.timed.iter().map(|b| b.changes.len() as u64).sum()
    }
}

fn region(name: &str) -> RegionId {
    RegionId::new(name).expect("the benchmark's region names are valid")
}

/// `len` bytes of letters and digits, deterministic in `seed`.
fn letters(seed: u64, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % ALPHABET.len() as u64) as usize] as char
        })
        .collect()
}

/// A document value: a JSON string of exactly `len` bytes, quotes included.
fn document(seed: u64, len: usize) -> Vec<u8> {
    format!("\"{}\"", letters(seed, len.saturating_sub(2))).into_bytes()
}

/// Whether key `i`'s changes are concurrent when `pct` percent of keys' are: spread evenly,
/// exactly `floor(n * pct / 100)` of the first `n` keys.
fn concurrent_key(i: usize, pct: u8) -> bool {
    let p = usize::from(pct);
    i * p / 100 != (i + 1) * p / 100
}

/// What the first region holds of a key: the history its next write builds on.
#[derive(Debug, Clone, Default)]
struct KeyState {
    vv: VersionVector,
    set: Option<CrdtObject>,
}

/// Builds the changes of one run, with each source region's sequence and the HLC moving on as
/// a real region's would.
struct Generator {
    workload: Workload,
    concurrent_pct: u8,
    value_bytes: usize,
    batch: usize,
    first: RegionId,
    second: RegionId,
    first_seq: u64,
    second_seq: u64,
    ms: u64,
}

/// Which region writes a change.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Writer {
    First,
    Second,
}

/// What a set change does (document changes write a new value whatever their step).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The first region's first write: its members.
    Seed,
    /// Five members of the other writer's (in a baseline, the home writes them itself, so
    /// its sets hold what the concurrent workload's do).
    AddOthers,
    /// The first region removes its oldest member and adds a new one.
    SwapOwn,
}

impl Generator {
    fn new(workload: Workload, concurrent_pct: u8, args: &MergeArgs) -> Self {
        Generator {
            workload,
            concurrent_pct: if workload.is_rule() { concurrent_pct } else { 0 },
            value_bytes: args.value_bytes,
            batch: args.batch,
            first: region(FIRST),
            second: region(SECOND),
            first_seq: 0,
            second_seq: 0,
            ms: BASE_MS,
        }
    }

    fn next_version(&mut self, w: Writer) -> Version {
        self.ms += 1;
        let (region, seq) = match w {
            Writer::First => (self.first.clone(), &mut self.first_seq),
            Writer::Second => (self.second.clone(), &mut self.second_seq),
        };
        *seq += 1;
        Version { hlc: HlcTimestamp::new(self.ms, 0), region, seq: *seq }
    }

    /// Length of one set member: ten members (five per region) render about `value_bytes`.
    fn member_len(&self) -> usize {
        (self.value_bytes / (2 * SET_MEMBERS)).saturating_sub(3).max(12)
    }

    /// Member `j` that `tag`'s region adds to key `i`.
    fn member(&self, tag: char, i: usize, j: usize) -> String {
        let mut m = format!("{tag}{i:06}-{j:02}-");
        let pad = self.member_len().saturating_sub(m.len());
        m.push_str(&letters((i * 64 + j) as u64, pad));
        m
    }

    /// Apply a set operation as `region` at `version`.
    fn set_op(state: &mut CrdtObject, op: CrdtOp, version: &Version) {
        let stamp = Stamp { hlc: version.hlc, region: version.region.clone() };
        state.apply(&op, &version.region, &stamp).expect("set operations on a set");
    }

    /// The object a region ships after writing `version` on top of `vv`: `set` for a set,
    /// otherwise a document.
    fn object(&self, version: Version, i: usize, vv: VersionVector, set: Option<CrdtObject>) -> StoredObject {
        let value = match &set {
            Some(state) => meridian_raft::merge::render(state),
            None => Some(document(i as u64 ^ (version.seq << 24) ^ version.hlc.as_u64(), self.value_bytes)),
        };
        StoredObject { version, value, vv, siblings: Vec::new(), crdt: set }
    }

    /// One batch from `w` of a change per key of `chunk` (`index` numbers the keys). `states`
    /// holds the first region's history of each key of the chunk, and moves on: the first
    /// region always writes on top of it; the second writes on top of it when the key's
    /// changes are ordered (and the first region then has its write), and on top of nothing
    /// when they are concurrent.
    fn batch_of(&mut self, w: Writer, step: Step, chunk: &[(usize, String)], states: &mut [KeyState]) -> Batch {
        let mut changes = Vec::with_capacity(chunk.len());
        let mut from_seq = 0;
        let mut upto_seq = 0;
        for ((i, key), st) in chunk.iter().zip(states.iter_mut()) {
            let version = self.next_version(w);
            if from_seq == 0 {
                from_seq = version.seq;
            }
            upto_seq = version.seq;
            let shared = w == Writer::First || !concurrent_key(*i, self.concurrent_pct);
            let (mut vv, prior) = if shared { (st.vv.clone(), st.set.clone()) } else { Default::default() };
            vv.merge(&[(version.region.clone(), version.seq)].into_iter().collect());
            let set = self.workload.sets().then(|| {
                let mut s = prior.unwrap_or_else(|| CrdtObject::new(CrdtKind::Set));
                match step {
                    Step::Seed => {
                        let members = (0..SET_MEMBERS).map(|j| self.member('a', *i, j)).collect();
                        Self::set_op(&mut s, CrdtOp::Add(members), &version);
                    }
                    Step::SwapOwn => {
                        Self::set_op(&mut s, CrdtOp::Remove(vec![self.member('a', *i, 0)]), &version);
                        Self::set_op(&mut s, CrdtOp::Add(vec![self.member('a', *i, SET_MEMBERS)]), &version);
                    }
                    Step::AddOthers => {
                        let members = (0..SET_MEMBERS).map(|j| self.member('b', *i, j)).collect();
                        Self::set_op(&mut s, CrdtOp::Add(members), &version);
                    }
                }
                s
            });
            if shared {
                st.vv = vv.clone();
                st.set = set.clone();
            }
            let object = self.object(version, *i, vv, set);
            changes.push(Change { dataset: DATASET.into(), key: key.clone(), object, rule: self.workload.rule() });
        }
        let source = match w {
            Writer::First => FIRST,
            Writer::Second => SECOND,
        };
        Batch { source: source.into(), from_seq, upto_seq, fresh_ms: self.ms, changes }
    }

    /// The first region's version of every key.
    fn seed(&mut self, keys: &[(usize, String)], states: &mut [KeyState]) -> Vec<Batch> {
        keys.chunks(self.batch)
            .zip(states.chunks_mut(self.batch))
            .map(|(chunk, st)| self.batch_of(Writer::First, Step::Seed, chunk, st))
            .collect()
    }

    /// Two changes per key, batch by batch as two links would deliver them: for each chunk
    /// of keys, a batch of first changes, then a batch of second changes.
    fn passes(&mut self, keys: &[(usize, String)], states: &mut [KeyState]) -> Vec<Batch> {
        let (one, two) = match self.workload {
            Workload::Baseline | Workload::BaselineSet => (Writer::First, Writer::First),
            _ => (Writer::Second, Writer::First),
        };
        let mut out = Vec::new();
        for (chunk, st) in keys.chunks(self.batch).zip(states.chunks_mut(self.batch)) {
            out.push(self.batch_of(one, Step::AddOthers, chunk, st));
            out.push(self.batch_of(two, Step::SwapOwn, chunk, st));
        }
        out
    }

    /// Conflicts two changes per key record: both changes of every concurrent key.
    fn conflicts_of(&self, keys: &[(usize, String)]) -> u64 {
        2 * keys.iter().filter(|(i, _)| concurrent_key(*i, self.concurrent_pct)).count() as u64
    }
}

fn keys(prefix: char, n: usize) -> Vec<(usize, String)> {
    (0..n).map(|i| (i, format!("{prefix}{i:06}"))).collect()
}

/// The stream of one run of `workload` with `concurrent_pct` percent of keys concurrent:
/// deterministic in the arguments, so every round applies the same changes.
fn plan(workload: Workload, concurrent_pct: u8, args: &MergeArgs) -> Plan {
    let mut g = Generator::new(workload, concurrent_pct, args);
    let measured = keys('k', args.keys);
    let warm = keys('w', args.warmup_keys);
    let mut measured_states = vec![KeyState::default(); measured.len()];
    let mut warm_states = vec![KeyState::default(); warm.len()];
    let mut untimed = g.seed(&warm, &mut warm_states);
    untimed.extend(g.seed(&measured, &mut measured_states));
    untimed.extend(g.passes(&warm, &mut warm_states));
    let timed = g.passes(&measured, &mut measured_states);
    Plan {
        workload,
        concurrent_pct: g.concurrent_pct,
        untimed,
        untimed_concurrent: g.conflicts_of(&warm),
        timed,
        timed_concurrent: g.conflicts_of(&measured),
        keys: measured.into_iter().map(|(_, k)| k).collect(),
    }
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    pub workload: Workload,
    /// Percent of keys whose changes are concurrent (0 for the baseline).
    pub concurrent_pct: u8,
    pub round: usize,
    /// Changes in the measured stream.
    pub changes: u64,
    /// Changes the state machine reported applied (merged or replaced).
    pub applied: u64,
    /// Conflict records the measured stream wrote.
    pub conflicts: u64,
    /// Conflict records it must write: one per change to a concurrent key.
    pub expected_conflicts: u64,
    /// Sum of the timed apply calls.
    pub apply_secs: f64,
    pub changes_per_sec: f64,
    /// Each batch's apply call, in order.
    #[serde(skip)]
    pub batch_latencies: Vec<Duration>,
    /// Share of the machine's CPU time the hypervisor took during the run, where known.
    pub steal_pct: Option<f64>,
}

fn apply_result(r: Vec<CommandResult>) -> anyhow::Result<u64> {
    match r.as_slice() {
        [CommandResult::Remote { applied, .. }] => Ok(u64::from(*applied)),
        other => bail!("applying a batch answered {other:?}, not a merged range"),
    }
}

fn recorded(sm: &StateMachineStore) -> anyhow::Result<u64> {
    let log = sm.reader().conflict_log().context("read the conflict log")?;
    Ok(log.recorded.get(DATASET).map_or(0, |by_rule| by_rule.values().sum()))
}

/// Apply `plan` to a fresh store in `dir`: the untimed part, then the timed batches one apply
/// call each. Returns the store for inspection.
async fn run_plan(dir: &Path, plan: Plan, round: usize) -> anyhow::Result<(RunOutcome, StateMachineStore)> {
    let workload = plan.workload;
    let concurrent_pct = plan.concurrent_pct;
    let expected_conflicts = plan.timed_concurrent;
    let changes = plan.timed_changes();
    let mut sm = StateMachineStore::open(dir, region(HERE))
        .map_err(|e| anyhow!("open a state machine in {}: {e}", dir.display()))?;
    let mut index = 0u64;
    let untimed_changes: u64 = plan.untimed.iter().map(|b| b.changes.len() as u64).sum();
    let mut untimed_applied = 0;
    for b in plan.untimed {
        index += 1;
        let r = sm.apply(vec![b.into_entry(index)]).await.map_err(|e| anyhow!("apply: {e}"))?;
        untimed_applied += apply_result(r)?;
    }
    if untimed_applied != untimed_changes {
        bail!("{}: the seed and warm-up applied {untimed_applied} of {untimed_changes} changes", workload.name());
    }
    let conflicts_before = recorded(&sm)?;
    if conflicts_before != plan.untimed_concurrent {
        bail!(
            "{}: the warm-up recorded {conflicts_before} conflicts, expected {}",
            workload.name(),
            plan.untimed_concurrent
        );
    }
    let mut batch_latencies = Vec::with_capacity(plan.timed.len());
    let mut applied = 0;
    let cpu_before = CpuTimes::now();
    for b in plan.timed {
        index += 1;
        let entries = vec![b.into_entry(index)];
        let start = Instant::now();
        let r = sm.apply(entries).await;
        batch_latencies.push(start.elapsed());
        applied += apply_result(r.map_err(|e| anyhow!("apply: {e}"))?)?;
    }
    let steal_pct = cpu_before.zip(CpuTimes::now()).and_then(|(a, b)| a.steal_pct_until(&b));
    let conflicts = recorded(&sm)? - conflicts_before;
    let apply_secs: f64 = batch_latencies.iter().map(Duration::as_secs_f64).sum();
    let outcome = RunOutcome {
        workload,
        concurrent_pct,
        round,
        changes,
        applied,
        conflicts,
        expected_conflicts,
        apply_secs,
        changes_per_sec: changes as f64 / apply_secs.max(1e-9),
        batch_latencies,
        steal_pct,
    };
    Ok((outcome, sm))
}

/// Every measured change must have been applied, and every change to a concurrent key must
/// have written a conflict record (and no other): otherwise the run measured something else.
fn check(o: &RunOutcome) -> anyhow::Result<()> {
    if o.applied != o.changes {
        bail!("{} round {}: {} of {} changes applied", o.workload.name(), o.round, o.applied, o.changes);
    }
    let want = o.expected_conflicts;
    if o.conflicts != want {
        bail!("{} round {}: {} conflict records, expected {want}", o.workload.name(), o.round, o.conflicts);
    }
    Ok(())
}

/// Encoded bytes of a change in both forms, summed over a set of changes.
#[derive(Debug, Clone, Default)]
struct ByteSums {
    changes: usize,
    new: usize,
    old: usize,
}

impl ByteSums {
    fn add(&mut self, c: &Change) {
        let old = RemoteChange {
            dataset: c.dataset.clone(),
            key: c.key.clone(),
            version: c.object.version.clone(),
            value: c.object.value.clone(),
        };
        self.changes += 1;
        self.new += postcard::to_stdvec(c).expect("changes encode").len();
        self.old += postcard::to_stdvec(&old).expect("changes encode").len();
    }

    fn row(&self, case: &str) -> BytesRow {
        let n = self.changes.max(1) as f64;
        BytesRow {
            case: case.into(),
            changes: self.changes,
            new_bytes_per_change: self.new as f64 / n,
            old_bytes_per_change: self.old as f64 / n,
            ratio: self.new as f64 / self.old.max(1) as f64,
        }
    }
}

/// One line of the bytes comparison.
#[derive(Debug, Clone, Serialize)]
pub struct BytesRow {
    pub case: String,
    /// Changes averaged over.
    pub changes: usize,
    /// `Change` (object with its version vector, siblings and state), postcard-encoded.
    pub new_bytes_per_change: f64,
    /// `RemoteChange` (the same version and value), postcard-encoded.
    pub old_bytes_per_change: f64,
    pub ratio: f64,
}

/// One workload's figures over every round.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadReport {
    pub workload: Workload,
    pub rule: &'static str,
    /// Percent of keys whose changes are concurrent (rules only).
    pub concurrent_pct: Option<u8>,
    /// Each run's changes per second, in run order.
    pub rates: Vec<f64>,
    pub median_rate: f64,
    /// Per-batch apply latency over every batch of every run (nearest rank).
    pub batches: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Conflict records each run wrote.
    pub conflicts_per_run: u64,
    /// The highest steal share of its runs, where known.
    pub steal_pct_max: Option<f64>,
    /// Median rate over the baseline's median rate (rules only).
    pub ratio: Option<f64>,
    /// Each run's rate over the baseline run just before it (rules only).
    pub paired_ratios: Vec<f64>,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub machine: Machine,
    pub keys: usize,
    pub warmup_keys: usize,
    pub rounds: usize,
    pub batch: usize,
    pub value_bytes: usize,
    pub changes_per_run: u64,
    pub data_root: String,
    pub target_ratio: f64,
    /// The mixes run, in percent of keys concurrent.
    pub concurrent: Vec<u8>,
    /// The baselines first (documents, then sets, each if a rule used it), then the rules of
    /// each mix in turn.
    pub workloads: Vec<WorkloadReport>,
    /// Whether every rule met the target in each mix, in the order of `concurrent`.
    pub met_by_mix: Vec<(u8, bool)>,
    pub bytes: Vec<BytesRow>,
    pub runs: Vec<RunOutcome>,
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile of sorted `xs`, in milliseconds.
fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

fn summarize(
    workload: Workload,
    concurrent_pct: u8,
    runs: &[RunOutcome],
    baseline_median: Option<f64>,
    paired: Vec<f64>,
) -> WorkloadReport {
    let mine: Vec<&RunOutcome> =
        runs.iter().filter(|r| r.workload == workload && r.concurrent_pct == concurrent_pct).collect();
    let rates: Vec<f64> = mine.iter().map(|r| r.changes_per_sec).collect();
    let mut lat: Vec<Duration> = mine.iter().flat_map(|r| r.batch_latencies.iter().copied()).collect();
    lat.sort();
    let median_rate = median(&rates);
    let ratio = baseline_median.map(|b| median_rate / b.max(1e-9));
    WorkloadReport {
        workload,
        rule: workload.rule().name(),
        concurrent_pct: workload.is_rule().then_some(concurrent_pct),
        median_rate,
        rates,
        batches: lat.len(),
        p50_ms: percentile_ms(&lat, 0.50),
        p99_ms: percentile_ms(&lat, 0.99),
        p999_ms: percentile_ms(&lat, 0.999),
        max_ms: lat.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        conflicts_per_run: mine.first().map_or(0, |r| r.conflicts),
        steal_pct_max: mine.iter().filter_map(|r| r.steal_pct).reduce(f64::max),
        met: ratio.map(|r| r >= TARGET_RATIO),
        ratio,
        paired_ratios: paired,
    }
}

/// One run of `workload` on a fresh store under `root`; the store is removed afterwards.
/// With `bytes`, the merged objects of the measured keys are added to it.
async fn run_once(
    args: &MergeArgs,
    root: &Path,
    workload: Workload,
    concurrent_pct: u8,
    round: usize,
    bytes: Option<&mut ByteSums>,
) -> anyhow::Result<RunOutcome> {
    let dir = tempfile::Builder::new()
        .prefix(&format!("meridian-bench-merge-{}-", workload.name()))
        .tempdir_in(root)
        .with_context(|| format!("create a temporary directory under {}", root.display()))?;
    let p = plan(workload, concurrent_pct, args);
    let keys = p.keys.clone();
    let (outcome, sm) = run_plan(dir.path(), p, round).await?;
    check(&outcome)?;
    if let Some(sums) = bytes {
        let reader = sm.reader();
        for key in &keys {
            let object = reader.get(DATASET, key)?.with_context(|| format!("{key} is missing after the run"))?;
            sums.add(&Change { dataset: DATASET.into(), key: key.clone(), object, rule: workload.rule() });
        }
    }
    drop(sm);
    Ok(outcome)
}

/// Runs every round and builds the report. Progress goes to stderr unless `quiet`.
pub async fn run(args: &MergeArgs, quiet: bool) -> anyhow::Result<MergeReport> {
    args.validate()?;
    let root = args.data_root();

    // Bytes of the single-home changes: the baseline's measured stream as built.
    let mut single = ByteSums::default();
    for b in &plan(Workload::Baseline, 0, args).timed {
        for c in &b.changes {
            single.add(c);
        }
    }
    // Bytes of merged objects: what each rule left in the first round of the most concurrent
    // mix.
    let bytes_mix = args.concurrent.iter().copied().max().unwrap_or(100);
    let rules: Vec<Workload> = args.rules.iter().map(|r| r.workload()).collect();
    let mut merged: Vec<(Workload, ByteSums)> = rules.iter().map(|w| (*w, ByteSums::default())).collect();

    let order: Vec<(Workload, u8)> = args
        .concurrent
        .iter()
        .flat_map(|&pct| rules.iter().flat_map(move |w| [(w.baseline(), 0), (*w, pct)]))
        .collect();
    let total = order.len() * args.rounds;
    let mut runs: Vec<RunOutcome> = Vec::with_capacity(total);
    let mut paired: Vec<(Workload, u8, f64)> = Vec::new();
    for round in 1..=args.rounds {
        for &(workload, pct) in &order {
            let sums = if round == 1 && pct == bytes_mix {
                merged.iter_mut().find(|(w, _)| *w == workload).map(|(_, s)| s)
            } else {
                None
            };
            let outcome = run_once(args, &root, workload, pct, round, sums)
                .await
                .with_context(|| format!("{} run ({pct}% concurrent), round {round}", workload.name()))?;
            if !quiet {
                let mix = if workload.is_rule() { format!("{pct}% concurrent") } else { String::new() };
                eprintln!(
                    "[{}/{total}] round {round} {:<8} {mix:<15} {:>9.0} changes/s, {} conflicts",
                    runs.len() + 1,
                    workload.name(),
                    outcome.changes_per_sec,
                    outcome.conflicts
                );
            }
            if workload.is_rule() {
                if let Some(prev) = runs.last().filter(|r| r.workload == workload.baseline()) {
                    paired.push((workload, pct, outcome.changes_per_sec / prev.changes_per_sec.max(1e-9)));
                }
            }
            runs.push(outcome);
        }
    }

    let mut workloads: Vec<WorkloadReport> = [Workload::Baseline, Workload::BaselineSet]
        .into_iter()
        .filter(|b| rules.iter().any(|w| w.baseline() == *b))
        .map(|b| summarize(b, 0, &runs, None, Vec::new()))
        .collect();
    let mut met_by_mix = Vec::new();
    for &pct in &args.concurrent {
        let mut all = true;
        for &w in &rules {
            let pr = paired.iter().filter(|(x, p, _)| *x == w && *p == pct).map(|(_, _, r)| *r).collect();
            let base = workloads.iter().find(|b| b.workload == w.baseline()).map(|b| b.median_rate);
            let report = summarize(w, pct, &runs, base, pr);
            all &= report.met == Some(true);
            workloads.push(report);
        }
        met_by_mix.push((pct, all));
    }
    let mut bytes = vec![single.row("single-home change")];
    for (w, sums) in &merged {
        let case = if bytes_mix == 100 {
            format!("{} object merged from two regions", w.name())
        } else {
            format!("{} object, {bytes_mix}% of keys merged from two regions", w.name())
        };
        bytes.push(sums.row(&case));
    }
    Ok(MergeReport {
        machine: Machine::current(),
        keys: args.keys,
        warmup_keys: args.warmup_keys,
        rounds: args.rounds,
        batch: args.batch,
        value_bytes: args.value_bytes,
        changes_per_run: runs.first().map_or(0, |r| r.changes),
        data_root: root.display().to_string(),
        target_ratio: TARGET_RATIO,
        concurrent: args.concurrent.clone(),
        workloads,
        met_by_mix,
        bytes,
        runs,
    })
}

pub fn render(r: &MergeReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} keys, {} changes per run in batches of {}, {} round(s), {}-byte values, stores under {} ({} cores, {} {})",
        r.keys,
        r.changes_per_run,
        r.batch,
        r.rounds,
        r.value_bytes,
        r.data_root,
        r.machine.cores,
        r.machine.os,
        r.machine.arch
    );
    let mut t = comfy_table::Table::new();
    t.set_header(vec![
        "workload",
        "changes/s (median)",
        "runs",
        "batches",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "conflicts/run",
        "ratio",
        "paired",
        "target",
    ]);
    for w in &r.workloads {
        let runs = w.rates.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
        let paired = match (
            w.paired_ratios.iter().copied().reduce(f64::min),
            w.paired_ratios.iter().copied().reduce(f64::max),
        ) {
            (Some(lo), Some(hi)) => format!("{lo:.2}–{hi:.2}"),
            _ => String::new(),
        };
        t.add_row(vec![
            match (w.workload, w.concurrent_pct) {
                (Workload::Baseline, _) => "baseline: single-home documents".to_owned(),
                (Workload::BaselineSet, _) | (_, None) => "baseline-set: single-home sets".to_owned(),
                (_, Some(pct)) => format!("{}, {pct}% of keys concurrent", w.workload.name()),
            },
            format!("{:.0}", w.median_rate),
            runs,
            w.batches.to_string(),
            format!("{:.2}", w.p50_ms),
            format!("{:.2}", w.p99_ms),
            format!("{:.2}", w.p999_ms),
            w.conflicts_per_run.to_string(),
            w.ratio.map_or(String::new(), |x| format!("{x:.2}")),
            paired,
            match w.met {
                Some(true) => format!("≥ {TARGET_RATIO}: met"),
                Some(false) => format!("≥ {TARGET_RATIO}: not met"),
                None => String::new(),
            },
        ]);
    }
    let _ = writeln!(out, "{t}");
    let _ = writeln!(
        out,
        "Latencies are per ApplyChanges apply call, over every batch of every run of the workload (below 1000 \
         batches, p99.9 is the slowest). Ratio: median rate over its baseline's median (lww and siblings: \
         single-home documents; crdt: single-home sets); paired: each run over the baseline run just before it. \
         A concurrent key's two changes are both merges that write a conflict record; \
         the other keys' changes are ordered (each writer saw the other's)."
    );
    for (pct, met) in &r.met_by_mix {
        let missed: Vec<&str> = r
            .workloads
            .iter()
            .filter(|w| w.concurrent_pct == Some(*pct) && w.met == Some(false))
            .map(|w| w.workload.name())
            .collect();
        let _ = if *met {
            writeln!(out, "{pct}% of keys concurrent: target ≥ {TARGET_RATIO} met by every rule run")
        } else {
            writeln!(out, "{pct}% of keys concurrent: target ≥ {TARGET_RATIO} not met by {}", missed.join(", "))
        };
    }
    let mut b = comfy_table::Table::new();
    b.set_header(vec!["change", "with version vectors (bytes)", "before them (bytes)", "ratio"]);
    for row in &r.bytes {
        b.add_row(vec![
            row.case.clone(),
            format!("{:.1}", row.new_bytes_per_change),
            format!("{:.1}", row.old_bytes_per_change),
            format!("{:.3}", row.ratio),
        ]);
    }
    let _ = writeln!(out, "{b}");
    let _ = writeln!(
        out,
        "Bytes per change: postcard encoding of each change as a link batch carries it (Change: the object with \
         its version vector, siblings and set state; before: RemoteChange with the same version and value), \
         before compression and without the batch's own framing."
    );
    out
}

pub async fn run_cli(args: MergeArgs) -> anyhow::Result<()> {
    let report = run(&args, args.json).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> MergeArgs {
        MergeArgs { keys: 50, rounds: 1, batch: 16, warmup_keys: 10, concurrent: vec![100], ..MergeArgs::default() }
    }

    #[test]
    fn inputs_are_bounded() {
        assert!(MergeArgs::default().validate().is_ok());
        let bad = [
            MergeArgs { keys: 0, ..tiny() },
            MergeArgs { keys: KEYS_MAX + 1, ..tiny() },
            MergeArgs { rounds: 0, ..tiny() },
            MergeArgs { rounds: ROUNDS_MAX + 1, ..tiny() },
            MergeArgs { batch: 0, ..tiny() },
            MergeArgs { batch: BATCH_MAX + 1, ..tiny() },
            MergeArgs { warmup_keys: WARMUP_KEYS_MAX + 1, ..tiny() },
            MergeArgs { value_bytes: VALUE_BYTES_MIN - 1, ..tiny() },
            MergeArgs { value_bytes: VALUE_BYTES_MAX + 1, ..tiny() },
            MergeArgs { concurrent: vec![], ..tiny() },
            MergeArgs { concurrent: vec![101], ..tiny() },
            MergeArgs { concurrent: vec![5, 5], ..tiny() },
            MergeArgs { concurrent: vec![1, 2, 3, 4, 5], ..tiny() },
            MergeArgs { rules: vec![], ..tiny() },
            MergeArgs { rules: vec![RuleArg::Crdt, RuleArg::Crdt], ..tiny() },
            MergeArgs { dir: Some(PathBuf::from("/nonexistent/meridian-bench")), ..tiny() },
        ];
        for a in bad {
            let err = a.validate().unwrap_err().to_string();
            assert!(err.starts_with("--"), "{err}");
        }
    }

    #[test]
    fn values_have_their_size() {
        let g = Generator::new(Workload::Crdt, 100, &tiny());
        assert_eq!(document(7, 256).len(), 256);
        assert!(serde_json::from_slice::<String>(&document(7, 256)).is_ok());
        assert_eq!(g.member('a', 3, 1).len(), g.member_len());
        assert_ne!(g.member('a', 3, 1), g.member('b', 3, 1));
    }

    #[test]
    fn a_share_of_keys_is_concurrent_spread_evenly() {
        let count = |n: usize, pct: u8| (0..n).filter(|i| concurrent_key(*i, pct)).count();
        assert_eq!(count(1000, 0), 0);
        assert_eq!(count(1000, 5), 50);
        assert_eq!(count(1000, 100), 1000);
        assert_eq!(count(50, 50), 25);
        assert_eq!(count(19, 5), 0, "the first concurrent key of 5% is the twentieth");
        assert!(concurrent_key(19, 5));
    }

    #[tokio::test]
    async fn a_tiny_mix_records_exactly_its_concurrent_keys() {
        let args = MergeArgs { concurrent: vec![50], ..tiny() };
        for workload in Workload::RULES {
            let dir = tempfile::tempdir().unwrap();
            let p = plan(workload, 50, &args);
            assert_eq!((p.timed_concurrent, p.untimed_concurrent), (50, 10), "two records per concurrent key");
            let keys = p.keys.clone();
            let (o, sm) = run_plan(dir.path(), p, 1).await.unwrap();
            check(&o).unwrap();
            assert_eq!(o.conflicts, 50, "{workload:?}");
            let reader = sm.reader();
            for (i, key) in keys.iter().enumerate() {
                let obj = reader.get(DATASET, key).unwrap().unwrap();
                assert!(obj.vv.get(&region(SECOND)) > 0, "{key}: both writers in the vector");
                let versions = obj.live_versions().count();
                match workload {
                    Workload::Crdt => {
                        let members: Vec<String> = serde_json::from_slice(obj.value.as_deref().unwrap()).unwrap();
                        assert_eq!(members.len(), 2 * SET_MEMBERS, "{key}: {members:?}");
                    }
                    _ if concurrent_key(i, 50) => assert_eq!(versions, 2, "{key}: both concurrent versions kept"),
                    _ => assert_eq!(versions, 1, "{key}: an ordered change replaces the copy"),
                }
            }
        }
    }

    #[tokio::test]
    async fn a_tiny_workload_merges_every_change_and_records_every_conflict() {
        let args = tiny();
        for workload in [Workload::Baseline, Workload::BaselineSet, Workload::Lww, Workload::Siblings, Workload::Crdt] {
            let dir = tempfile::tempdir().unwrap();
            let p = plan(workload, 100, &args);
            let keys = p.keys.clone();
            let warmup = p.untimed_concurrent;
            assert_eq!(p.timed_changes(), 100, "two changes per key");
            assert!(p.timed.iter().all(|b| b.changes.len() <= args.batch));
            let (o, sm) = run_plan(dir.path(), p, 1).await.unwrap();
            assert_eq!(o.applied, 100, "{workload:?}: every change applied");
            assert_eq!(o.batch_latencies.len(), 8, "{workload:?}: 4 chunks of keys, a batch per writer");
            check(&o).unwrap();
            let log = sm.reader().conflict_log().unwrap();
            let recorded = log.recorded.get(DATASET).and_then(|r| r.get(workload.rule().name())).copied();
            if workload.is_rule() {
                assert_eq!(warmup, 20);
                assert_eq!(recorded, Some(100 + 20), "{workload:?}: a record per concurrent change");
                assert_eq!(log.held, 120);
            } else {
                assert_eq!(recorded, None, "the baseline meets no conflict");
                assert_eq!(log.held, 0);
            }
            let reader = sm.reader();
            for key in &keys {
                let obj = reader.get(DATASET, key).unwrap().unwrap();
                let regions: Vec<u64> = [FIRST, SECOND].iter().map(|r| obj.vv.get(&region(r))).collect();
                match workload {
                    Workload::Baseline => {
                        assert_eq!(regions[1], 0);
                        assert!(obj.siblings.is_empty());
                        assert!(obj.crdt.is_none());
                    }
                    Workload::BaselineSet => {
                        assert_eq!(regions[1], 0);
                        let members: Vec<String> = serde_json::from_slice(obj.value.as_deref().unwrap()).unwrap();
                        assert_eq!(members.len(), 2 * SET_MEMBERS, "{key}: the same members as a merge: {members:?}");
                        assert!(obj.crdt.is_some());
                    }
                    Workload::Lww | Workload::Siblings => {
                        assert!(regions.iter().all(|s| *s > 0), "{key}: both regions in the vector");
                        assert_eq!(obj.live_versions().count(), 2, "{key}: one version of each region kept");
                    }
                    Workload::Crdt => {
                        let members: Vec<String> = serde_json::from_slice(obj.value.as_deref().unwrap()).unwrap();
                        assert_eq!(members.len(), 2 * SET_MEMBERS, "{key}: {members:?}");
                        assert_eq!(members.iter().filter(|m| m.starts_with('b')).count(), SET_MEMBERS);
                        let i: usize = key[1..].parse().unwrap();
                        let removed = format!("a{i:06}-00-");
                        assert!(!members.iter().any(|m| m.starts_with(&removed)), "{key}: the home removed it");
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn the_report_covers_every_rule_of_every_mix_and_both_forms_of_change() {
        let dir = tempfile::tempdir().unwrap();
        let args = MergeArgs { dir: Some(dir.path().to_path_buf()), concurrent: vec![10, 100], ..tiny() };
        let r = run(&args, true).await.unwrap();
        let names: Vec<(&str, Option<u8>)> =
            r.workloads.iter().map(|w| (w.workload.name(), w.concurrent_pct)).collect();
        assert_eq!(
            names,
            [
                ("baseline", None),
                ("baseline-set", None),
                ("lww", Some(10)),
                ("siblings", Some(10)),
                ("crdt", Some(10)),
                ("lww", Some(100)),
                ("siblings", Some(100)),
                ("crdt", Some(100))
            ]
        );
        assert_eq!(r.runs.len(), 12, "baseline before each rule of each mix");
        assert_eq!(r.changes_per_run, 100);
        for w in &r.workloads {
            let runs = match w.workload {
                Workload::Baseline => 4,
                Workload::BaselineSet => 2,
                _ => 1,
            };
            assert_eq!(w.rates.len(), runs, "{w:?}");
            let want = match w.concurrent_pct {
                Some(pct) => 2 * (50 * u64::from(pct) / 100),
                None => 0,
            };
            assert_eq!(w.conflicts_per_run, want, "{w:?}: 50 keys, two changes each");
            assert_eq!(w.ratio.is_some(), w.workload.is_rule());
        }
        assert_eq!(r.met_by_mix.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [10, 100]);
        assert_eq!(r.bytes.len(), 4);
        for row in &r.bytes {
            assert_eq!(row.changes, 50 * if row.case.starts_with("single") { 2 } else { 1 });
            assert!(row.new_bytes_per_change > row.old_bytes_per_change, "{row:?}: the vector costs bytes");
        }
        assert!(render(&r).contains("siblings"));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "every run's store is removed");
    }
}
