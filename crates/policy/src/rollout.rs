//! Rollout of a policy version: `shadow` (evaluate and count, act on nothing) or `enforce`,
//! optionally for a percentage of keys chosen by a stable hash of (dataset, key).

use meridian_core::{DatasetName, Key};
use serde::{Deserialize, Serialize};

use crate::placement::stable_hash;

/// How a policy version is rolled out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Evaluated beside the enforced version; its differences are counted, never acted on.
    Shadow,
    /// Governs the keys in its percentage.
    Enforce,
}

/// A mode and the share of keys it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub mode: Mode,
    /// 1 to 100.
    pub percent: u8,
}

impl Rollout {
    pub const FULL: u8 = 100;

    pub fn new(mode: Mode, percent: u8) -> Result<Rollout, String> {
        if !(1..=Self::FULL).contains(&percent) {
            return Err(format!("percent must be between 1 and 100, not {percent}"));
        }
        Ok(Rollout { mode, percent })
    }

    /// Whether this rollout covers `key`: its bucket is below the percentage.
    pub fn covers(&self, dataset: &DatasetName, key: &Key) -> bool {
        key_bucket(dataset, key) < self.percent
    }

    /// Whether the new version, not the previous one, governs `key`.
    pub fn enforces(&self, dataset: &DatasetName, key: &Key) -> bool {
        self.mode == Mode::Enforce && self.covers(dataset, key)
    }
}

/// The key's bucket, 0 to 99. Growing the percentage only adds keys: a key covered at 10% stays
/// covered at 50%.
pub fn key_bucket(dataset: &DatasetName, key: &Key) -> u8 {
    (stable_hash(&[dataset.as_str().as_bytes(), key.as_str().as_bytes()]) % 100) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_nest_and_spread() {
        let ds = DatasetName::new("orders").unwrap();
        let keys: Vec<Key> = (0..10_000).map(|i| Key::new(format!("k{i}")).unwrap()).collect();
        let at = |p: u8| Rollout::new(Mode::Enforce, p).unwrap();
        let covered = |p: u8| keys.iter().filter(|k| at(p).enforces(&ds, k)).count();
        for p in [1u8, 10, 50, 100] {
            let n = covered(p);
            let expected = 100 * usize::from(p);
            assert!(n.abs_diff(expected) <= expected / 5 + 30, "{p}% covered {n} of 10000");
        }
        assert_eq!(covered(100), keys.len());
        for k in &keys {
            if at(10).enforces(&ds, k) {
                assert!(at(50).enforces(&ds, k), "a key covered at 10% must stay covered at 50%");
            }
        }
        assert!(!Rollout::new(Mode::Shadow, 100).unwrap().enforces(&ds, &keys[0]));
        assert!(Rollout::new(Mode::Enforce, 0).is_err() && Rollout::new(Mode::Enforce, 101).is_err());
    }

    #[test]
    fn buckets_are_fixed_forever() {
        // Changing the hash would move keys between versions mid-rollout: these values pin it.
        let ds = DatasetName::new("orders").unwrap();
        let b: Vec<u8> = ["a", "b", "eu-west/alice"].iter().map(|k| key_bucket(&ds, &Key::new(*k).unwrap())).collect();
        assert_eq!(b, PINNED_BUCKETS);
    }

    const PINNED_BUCKETS: [u8; 3] = [21, 6, 31];
}
