//! How often each fault, and each path worth exercising, actually happened. Summed over a
//! batch of seeds, it makes a silent loss of coverage visible: a fault that never fired fails
//! the batch.

use std::collections::BTreeMap;

use crate::nemesis::FAULTS;

/// Paths the invariants only mean something if runs take them.
pub const PATHS: [&str; 23] = [
    "leader elected",
    "leader changed",
    "crash lost unsynced writes",
    "snapshot built",
    "leader's entry reported before its fsync",
    "commit held back for the leader's fsync",
    "Raft log compacted",
    "acknowledged write",
    "crossing: link batch",
    "crossing: forwarded write",
    "crossing: anti-entropy",
    "crossing: repair",
    "restricted read refused outside its region",
    "local read answered by the gateway",
    "local read value checked against the writes",
    "link caught up by a scan",
    "change backfilled or caught up",
    "copy purged",
    "key linearizable for stateright too",
    "concurrent set adds merged",
    "lww conflict recorded",
    "set add found in every copy",
    "lww write superseded by another region",
];

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Coverage {
    pub faults: BTreeMap<String, u64>,
    pub paths: BTreeMap<String, u64>,
}

impl Coverage {
    pub fn fault(&mut self, kind: &str) {
        *self.faults.entry(kind.to_owned()).or_default() += 1;
    }

    pub fn hit(&mut self, path: &str) {
        self.hit_n(path, 1);
    }

    pub fn hit_n(&mut self, path: &str, n: u64) {
        *self.paths.entry(path.to_owned()).or_default() += n;
    }

    /// Count what one node's metrics say happened (read before it crashes, and at the end).
    pub fn count_node(&mut self, node: &meridian_node::Node) {
        node.refresh_metrics();
        let text = node.metrics().encode();
        for (metric, path) in [
            ("meridian_replication_catch_ups_total", "link caught up by a scan"),
            ("meridian_replication_backfilled_changes_total", "change backfilled or caught up"),
            ("meridian_replication_purged_copies_total", "copy purged"),
            ("meridian_raft_log_acked_at_submit_total", "leader's entry reported before its fsync"),
            ("meridian_raft_commits_held_back_total", "commit held back for the leader's fsync"),
            ("meridian_raft_log_compactions_total", "Raft log compacted"),
        ] {
            let n: f64 = text
                .lines()
                .filter(|l| l.starts_with(metric))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            self.hit_n(path, n as u64);
        }
    }

    pub fn merge(&mut self, other: &Coverage) {
        for (k, v) in &other.faults {
            *self.faults.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.paths {
            *self.paths.entry(k.clone()).or_default() += v;
        }
    }

    /// Faults and paths that never happened.
    pub fn missing(&self) -> Vec<String> {
        let faults = FAULTS.iter().filter(|f| self.faults.get(**f).copied().unwrap_or(0) == 0);
        let paths = PATHS.iter().filter(|p| self.paths.get(**p).copied().unwrap_or(0) == 0);
        faults.chain(paths).map(|s| s.to_string()).collect()
    }

    pub fn render(&self) -> String {
        let mut out = String::from("coverage (times, summed over the seeds):\n");
        for f in FAULTS {
            out.push_str(&format!("  fault  {f:<44} {:>8}\n", self.faults.get(f).copied().unwrap_or(0)));
        }
        for p in PATHS {
            out.push_str(&format!("  path   {p:<44} {:>8}\n", self.paths.get(p).copied().unwrap_or(0)));
        }
        for (p, n) in self.paths.iter().filter(|(p, _)| !PATHS.contains(&p.as_str())) {
            out.push_str(&format!("  seen   {p:<44} {n:>8}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_never_happened_is_named() {
        let mut c = Coverage::default();
        for f in FAULTS {
            c.fault(f);
        }
        c.hit("leader elected");
        let missing = c.missing();
        assert!(missing.contains(&"leader changed".to_string()));
        assert!(!missing.contains(&"leader elected".to_string()));
        assert!(!missing.iter().any(|m| FAULTS.contains(&m.as_str())));
    }
}
