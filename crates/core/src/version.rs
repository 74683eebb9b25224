//! The version of one write: (HLC timestamp, origin region, origin sequence).
//!
//! Versions are totally ordered by timestamp, then region, then sequence, which is the order
//! last-writer-wins uses. Inside one region the sequence alone orders writes. The text form
//! `WALL.LOGICAL@REGION:SEQ` is the `ETag` of an object and what `If-Match` carries.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::hlc::HlcTimestamp;
use crate::ids::RegionId;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Version {
    pub hlc: HlcTimestamp,
    pub region: RegionId,
    pub seq: u64,
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Version {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.hlc, &self.region, self.seq).cmp(&(other.hlc, &other.region, other.seq))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}:{}", self.hlc, self.region, self.seq)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a version; expected WALL.LOGICAL@REGION:SEQ, e.g. 1732712345678.0@us-east:42")]
pub struct VersionParseError {
    pub input: String,
}

impl FromStr for Version {
    type Err = VersionParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || VersionParseError { input: s.chars().take(128).collect() };
        let (hlc, rest) = s.split_once('@').ok_or_else(err)?;
        let (region, seq) = rest.rsplit_once(':').ok_or_else(err)?;
        let (wall, logical) = hlc.split_once('.').ok_or_else(err)?;
        let wall: u64 = wall.parse().map_err(|_| err())?;
        if wall > crate::hlc::WALL_MS_MAX {
            return Err(err());
        }
        let logical: u16 = logical.parse().map_err(|_| err())?;
        Ok(Version {
            hlc: HlcTimestamp::new(wall, logical),
            region: RegionId::new(region).map_err(|_| err())?,
            seq: seq.parse().map_err(|_| err())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn text_form() {
        let v =
            Version { hlc: HlcTimestamp::new(1732712345678, 3), region: RegionId::new("us-east").unwrap(), seq: 42 };
        assert_eq!(v.to_string(), "1732712345678.3@us-east:42");
        assert_eq!("1732712345678.3@us-east:42".parse::<Version>().unwrap(), v);
        for bad in ["", "abc", "1.2@us-east", "1@us-east:4", "1.2@US:4", "1.2@us-east:-1", "1.99999@a:1"] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn text_round_trip(wall in 0u64..=crate::hlc::WALL_MS_MAX, logical: u16, seq: u64, region in "[a-z][a-z0-9-]{0,20}") {
            let v = Version { hlc: HlcTimestamp::new(wall, logical), region: RegionId::new(region).unwrap(), seq };
            prop_assert_eq!(v.to_string().parse::<Version>().unwrap(), v);
        }
    }
}
