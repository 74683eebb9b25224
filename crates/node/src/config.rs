//! The cluster configuration file: topology plus the settings every node of the cluster
//! shares. One file describes the whole cluster; `--node ID` picks which node to run.

use std::path::Path;

use meridian_core::limits::{
    CONFIG_BYTES_MAX, HLC_MAX_OFFSET_MS_DEFAULT, VALUE_BYTES_HARD_MAX, VALUE_BYTES_MAX_DEFAULT,
};
use meridian_core::topology::{RegionSpec, WanSpec};
use meridian_core::{NodeSpec, Topology};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    regions: Vec<RegionSpec>,
    nodes: Vec<NodeSpec>,
    #[serde(default)]
    wan: Vec<WanSpec>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    clock: ClockSettings,
    #[serde(default)]
    raft: RaftSettings,
    #[serde(default)]
    replication: ReplicationSettings,
    #[serde(default)]
    health: HealthSettings,
    #[serde(default, skip_serializing_if = "SessionSettings::is_empty")]
    session: SessionSettings,
    #[serde(default)]
    failover: crate::failover::FailoverSettings,
}

/// `[session]`: the key session tokens are signed with, shared by every node of the cluster.
#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct SessionSettings {
    /// 32 to 64 bytes as hex. Without it the node issues no session tokens and refuses
    /// `consistency=session`.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

impl SessionSettings {
    fn is_empty(&self) -> bool {
        self.key.is_none()
    }
}

impl std::fmt::Debug for SessionSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.key.is_some() {
            "SessionSettings { key: <redacted> }"
        } else {
            "SessionSettings { key: None }"
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest value accepted, in bytes of JSON text.
    pub value_bytes_max: usize,
}
impl Default for Limits {
    fn default() -> Self {
        Limits { value_bytes_max: VALUE_BYTES_MAX_DEFAULT }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockSettings {
    /// How far the HLC may run ahead of this node's wall clock before writes are refused.
    pub max_offset_ms: u64,
}
impl Default for ClockSettings {
    fn default() -> Self {
        ClockSettings { max_offset_ms: HLC_MAX_OFFSET_MS_DEFAULT }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and allow the log before it to be purged) after this many entries.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind a snapshot, so a briefly absent voter catches up from
    /// the log rather than from a snapshot.
    pub log_entries_kept_after_snapshot: u64,
}
impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_every_entries: 10_000,
            log_entries_kept_after_snapshot: 1_000,
        }
    }
}

/// Cross-region replication settings every node of the cluster shares.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationSettings {
    /// Outbox entries each region keeps for its links. A link that falls further behind
    /// (a long partition) catches up by a filtered scan of the data instead. Every voter of a
    /// region must use the same value.
    pub outbox_entries_max: u64,
    /// How often each region's leader compares digests with every other region and repairs
    /// differences, and checks for copies its policy no longer lets it hold.
    pub anti_entropy_interval_ms: u64,
    /// Bytes per second (keys plus values) each link may send; 0 for no limit. Datasets'
    /// own `sync.rate` limits apply inside it.
    pub link_rate_bytes_per_sec: u64,
    /// Conflict records each region keeps at most; the oldest go first, counted as expired.
    /// Every voter of a region must use the same value.
    pub conflict_records_max: u64,
    /// How long a conflict record is kept, in milliseconds. Every voter of a region must use
    /// the same value.
    pub conflict_record_age_ms: u64,
    /// How long a tombstone is kept at least, in milliseconds, before its origin region may
    /// collect it (it also waits until every region that may hold the key holds that same
    /// tombstone and has merged every write it covers). Longer than any message can take.
    pub tombstone_grace_ms: u64,
}

impl ReplicationSettings {
    pub fn conflict_limits(&self) -> meridian_raft::conflicts::ConflictLimits {
        meridian_raft::conflicts::ConflictLimits {
            records: self.conflict_records_max,
            age_ms: self.conflict_record_age_ms,
        }
    }
}

impl Default for ReplicationSettings {
    fn default() -> Self {
        ReplicationSettings {
            outbox_entries_max: OUTBOX_ENTRIES_DEFAULT,
            anti_entropy_interval_ms: 60_000,
            link_rate_bytes_per_sec: 0,
            conflict_records_max: meridian_raft::conflicts::CONFLICT_RECORDS_MAX,
            conflict_record_age_ms: meridian_raft::conflicts::CONFLICT_AGE_MS_MAX,
            tombstone_grace_ms: TOMBSTONE_GRACE_MS_DEFAULT,
        }
    }
}

/// Default outbox bound (entries hold a key, not a value: about 100 bytes each).
/// How each node probes the other regions (see `crate::health`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    /// Time between the starts of two probe rounds.
    pub probe_interval_ms: u64,
    /// How long one node of a region has to answer a probe.
    pub probe_timeout_ms: u64,
    /// Probes in a row that must fail before a region is marked down.
    pub down_after_failures: u32,
    /// Probes in a row that must succeed before a region marked down is marked up again.
    pub up_after_successes: u32,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            probe_interval_ms: 1_000,
            probe_timeout_ms: 1_000,
            down_after_failures: 3,
            up_after_successes: 2,
        }
    }
}

pub const PROBE_INTERVAL_MS_RANGE: std::ops::RangeInclusive<u64> = 100..=60_000;
pub const PROBE_TIMEOUT_MS_RANGE: std::ops::RangeInclusive<u64> = 10..=30_000;
pub const PROBE_STREAK_RANGE: std::ops::RangeInclusive<u32> = 1..=100;

pub const OUTBOX_ENTRIES_DEFAULT: u64 = meridian_raft::state_machine::OUTBOX_ENTRIES_MAX;
/// Bounds on the replication settings.
pub const OUTBOX_ENTRIES_RANGE: std::ops::RangeInclusive<u64> = 16..=50_000_000;
pub const ANTI_ENTROPY_INTERVAL_MS_RANGE: std::ops::RangeInclusive<u64> = 200..=86_400_000;
/// A day.
pub const TOMBSTONE_GRACE_MS_DEFAULT: u64 = 86_400_000;
/// From a second to a year.
pub const TOMBSTONE_GRACE_MS_RANGE: std::ops::RangeInclusive<u64> = 1_000..=31_536_000_000;
pub const CONFLICT_RECORDS_RANGE: std::ops::RangeInclusive<u64> = 1..=10_000_000;
/// From a second to a year.
pub const CONFLICT_RECORD_AGE_MS_RANGE: std::ops::RangeInclusive<u64> = 1_000..=31_536_000_000;

/// A parsed and validated cluster configuration.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub topology: Topology,
    pub limits: Limits,
    pub clock: ClockSettings,
    pub raft: RaftSettings,
    pub replication: ReplicationSettings,
    pub health: HealthSettings,
    /// The key session tokens are signed with (`[session] key`); `None`: no tokens.
    pub session_key: Option<crate::session::SessionKey>,
    pub failover: crate::failover::FailoverSettings,
}

/// Report `name` unless `value` lies in `range`.
fn in_range<T: PartialOrd + std::fmt::Display>(
    problems: &mut Vec<String>,
    name: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
) {
    if !range.contains(&value) {
        problems.push(format!("{name} must be between {} and {}", range.start(), range.end()));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is {len} bytes; configuration files are limited to {max}")]
    TooLarge { path: String, len: u64, max: usize },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: String, problems: Vec<String> },
}

impl ClusterConfig {
    pub fn demo(base_port: u16) -> Self {
        ClusterConfig {
            topology: Topology::demo(base_port),
            limits: Limits::default(),
            clock: ClockSettings::default(),
            raft: RaftSettings::default(),
            replication: ReplicationSettings::default(),
            health: HealthSettings::default(),
            session_key: None,
            failover: crate::failover::FailoverSettings::default(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let p = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        if meta.len() > CONFIG_BYTES_MAX as u64 {
            return Err(ConfigError::TooLarge { path: p, len: meta.len(), max: CONFIG_BYTES_MAX });
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        Self::parse(&text, &p)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_owned(), message: e.to_string() })?;
        let mut problems: Vec<String> = Vec::new();
        let topology = match Topology::new(file.regions, file.nodes, file.wan) {
            Ok(t) => Some(t),
            Err(errs) => {
                problems.extend(errs.iter().map(|e| e.to_string()));
                None
            }
        };
        if file.limits.value_bytes_max == 0 || file.limits.value_bytes_max > VALUE_BYTES_HARD_MAX {
            problems.push(format!("limits.value_bytes_max must be between 1 and {VALUE_BYTES_HARD_MAX}"));
        }
        let r = &file.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms * 2 {
            problems.push(
                "raft.election_timeout_min_ms must be more than twice raft.heartbeat_ms (and heartbeat_ms > 0)".into(),
            );
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            problems.push("raft.election_timeout_max_ms must be greater than raft.election_timeout_min_ms".into());
        }
        if r.snapshot_every_entries == 0 {
            problems.push("raft.snapshot_every_entries must be at least 1".into());
        }
        let rep = &file.replication;
        let h = &file.health;
        in_range(&mut problems, "replication.outbox_entries_max", rep.outbox_entries_max, OUTBOX_ENTRIES_RANGE);
        in_range(
            &mut problems,
            "replication.anti_entropy_interval_ms",
            rep.anti_entropy_interval_ms,
            ANTI_ENTROPY_INTERVAL_MS_RANGE,
        );
        in_range(&mut problems, "replication.tombstone_grace_ms", rep.tombstone_grace_ms, TOMBSTONE_GRACE_MS_RANGE);
        in_range(&mut problems, "replication.conflict_records_max", rep.conflict_records_max, CONFLICT_RECORDS_RANGE);
        in_range(
            &mut problems,
            "replication.conflict_record_age_ms",
            rep.conflict_record_age_ms,
            CONFLICT_RECORD_AGE_MS_RANGE,
        );
        in_range(&mut problems, "health.probe_interval_ms", h.probe_interval_ms, PROBE_INTERVAL_MS_RANGE);
        in_range(&mut problems, "health.probe_timeout_ms", h.probe_timeout_ms, PROBE_TIMEOUT_MS_RANGE);
        in_range(&mut problems, "health.down_after_failures", h.down_after_failures, PROBE_STREAK_RANGE);
        in_range(&mut problems, "health.up_after_successes", h.up_after_successes, PROBE_STREAK_RANGE);
        in_range(
            &mut problems,
            "failover.promote_after_ms",
            file.failover.promote_after_ms,
            crate::failover::PROMOTE_AFTER_MS_RANGE,
        );
        let session_key = match file.session.key.as_deref().map(crate::session::SessionKey::from_hex) {
            None => None,
            Some(Ok(k)) => Some(k),
            Some(Err(e)) => {
                problems.push(format!("session.key: {e}"));
                None
            }
        };
        match (topology, problems.is_empty()) {
            (Some(topology), true) => Ok(ClusterConfig {
                topology,
                limits: file.limits,
                clock: file.clock,
                raft: file.raft,
                replication: file.replication,
                health: file.health,
                session_key,
                failover: file.failover,
            }),
            _ => Err(ConfigError::Invalid { path: origin.to_owned(), problems }),
        }
    }

    /// The configuration as TOML, as `load` reads it.
    pub fn to_toml(&self) -> String {
        let file = ConfigFile {
            regions: self.topology.regions().to_vec(),
            nodes: self.topology.nodes().to_vec(),
            wan: self
                .topology
                .wan()
                .map(|(a, b, ms)| WanSpec { regions: [a.clone(), b.clone()], one_way_ms: ms })
                .collect(),
            limits: self.limits.clone(),
            clock: self.clock.clone(),
            raft: self.raft.clone(),
            replication: self.replication.clone(),
            health: self.health.clone(),
            session: SessionSettings { key: self.session_key.as_ref().map(|k| k.to_hex()) },
            failover: self.failover.clone(),
        };
        toml::to_string(&file).expect("configuration serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_round_trips_through_toml() {
        let c = ClusterConfig::demo(7000);
        let again = ClusterConfig::parse(&c.to_toml(), "demo").unwrap();
        assert_eq!(again.topology, c.topology);
    }

    #[test]
    fn rejects_unknown_fields_and_bad_settings() {
        let err = ClusterConfig::parse("regions = []\nnodes = []\nbogus = 1\n", "x.toml").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let text = "regions = []\nnodes = []\n[raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 150\n";
        let err = ClusterConfig::parse(text, "x.toml").unwrap_err().to_string();
        assert!(err.contains("no regions") && err.contains("election_timeout_min_ms"), "{err}");
    }

    #[test]
    fn the_session_key_is_checked_round_trips_and_is_never_printed() {
        let mut c = ClusterConfig::demo(7000);
        assert!(!c.to_toml().contains("[session]"), "no key, no section");
        c.session_key = Some(crate::session::SessionKey::from_hex(&"3c".repeat(32)).unwrap());
        let again = ClusterConfig::parse(&c.to_toml(), "x.toml").unwrap();
        assert_eq!(again.session_key, c.session_key);
        assert!(!format!("{again:?}").contains("3c3c"), "Debug must not show the key");
        let short = c.to_toml().replace(&"3c".repeat(32), "3c3c");
        let err = ClusterConfig::parse(&short, "x.toml").unwrap_err().to_string();
        assert!(err.contains("session.key") && err.contains("32 to 64 bytes"), "{err}");
    }

    #[test]
    fn health_settings_are_bounded_and_round_trip() {
        let mut c = ClusterConfig::demo(7000);
        c.health.probe_interval_ms = 250;
        c.health.down_after_failures = 5;
        let again = ClusterConfig::parse(&c.to_toml(), "demo").unwrap();
        assert_eq!(again.health, c.health);
        let base = ClusterConfig::demo(7000).to_toml();
        for (bad, field) in [
            ("probe_interval_ms = 5", "probe_interval_ms"),
            ("probe_timeout_ms = 0", "probe_timeout_ms"),
            ("down_after_failures = 0", "down_after_failures"),
            ("up_after_successes = 1000", "up_after_successes"),
        ] {
            let text = base.replace("[health]\n", &format!("[health]\n{bad}\n"));
            let text = text.replace(&format!("{field} = {}\n", default_of(field)), "");
            let err = ClusterConfig::parse(&text, "x.toml").unwrap_err().to_string();
            assert!(err.contains(&format!("health.{field} must be between")), "{bad}: {err}");
        }
    }

    fn default_of(field: &str) -> u64 {
        let d = HealthSettings::default();
        match field {
            "probe_interval_ms" => d.probe_interval_ms,
            "probe_timeout_ms" => d.probe_timeout_ms,
            "down_after_failures" => u64::from(d.down_after_failures),
            _ => u64::from(d.up_after_successes),
        }
    }
}
