//! Identifiers: nodes, regions, zones, datasets and keys, each validated once at the edge.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::{DATASET_NAME_BYTES_MAX, KEY_BYTES_MAX, PLACE_NAME_BYTES_MAX};

/// A node's id, unique across the whole cluster. Node 0 is reserved (never valid).
pub type NodeId = u64;

/// Why a name was refused. Each variant maps to one stable API error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes; the limit is {max}")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("{what} {name:?} has a character outside {allowed}")]
    BadCharacter { what: &'static str, name: String, allowed: &'static str },
}

/// Names of regions, zones and datasets: lowercase ASCII letters, digits, `-` and `_`,
/// starting with a letter. They appear in paths, metrics labels and file names, so they are
/// kept to characters that need no escaping anywhere.
fn check_simple_name(what: &'static str, s: &str, max: usize) -> Result<(), NameError> {
    const ALLOWED: &str = "a-z, 0-9, '-' and '_' (starting with a letter)";
    if s.is_empty() {
        return Err(NameError::Empty { what });
    }
    if s.len() > max {
        return Err(NameError::TooLong { what, len: s.len(), max });
    }
    let first_ok = s.as_bytes()[0].is_ascii_lowercase();
    let rest_ok = s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !first_ok || !rest_ok {
        return Err(NameError::BadCharacter { what, name: s.to_owned(), allowed: ALLOWED });
    }
    Ok(())
}

macro_rules! simple_name {
    ($(#[$doc:meta])* $ty:ident, $what:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                check_simple_name($what, &s, $max)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.0
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

/// A region: a set of zones with low round-trip time between them; the unit of residency.
///
/// Held inline (the name's bytes, zero-padded, and its length) rather than as a `String`:
/// every version, dot and version-vector slot names a region, so cloning or decoding one
/// must not allocate. Names never contain NUL, so comparing the padded bytes orders and
/// equates regions exactly as their names do (tested below). On the wire and in every
/// format it is its name, as a string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionId {
    bytes: [u8; PLACE_NAME_BYTES_MAX],
    len: u8,
}

impl RegionId {
    pub fn new(s: impl AsRef<str>) -> Result<Self, NameError> {
        let s = s.as_ref();
        check_simple_name("region name", s, PLACE_NAME_BYTES_MAX)?;
        let mut bytes = [0u8; PLACE_NAME_BYTES_MAX];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Ok(RegionId { bytes, len: s.len() as u8 })
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).expect("a region name is ASCII, checked when made")
    }
}

impl TryFrom<String> for RegionId {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl From<RegionId> for String {
    fn from(v: RegionId) -> String {
        v.as_str().to_owned()
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RegionId").field(&self.as_str()).finish()
    }
}

impl Serialize for RegionId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RegionId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = RegionId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a region name")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RegionId, E> {
                RegionId::new(v).map_err(E::custom)
            }
        }
        d.deserialize_str(Name)
    }
}

simple_name!(
    /// A zone: a fault domain inside a region, holding one node of that region.
    ZoneId, "zone name", PLACE_NAME_BYTES_MAX
);
simple_name!(
    /// A dataset: a named collection of keys under one policy.
    DatasetName, "dataset name", DATASET_NAME_BYTES_MAX
);

/// A key: any UTF-8 string of 1 to [`KEY_BYTES_MAX`] bytes without control characters.
/// Control characters are refused so keys print safely in logs, tables and headers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Key(String);

impl Key {
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        if s.is_empty() {
            return Err(NameError::Empty { what: "key" });
        }
        if s.len() > KEY_BYTES_MAX {
            return Err(NameError::TooLong { what: "key", len: s.len(), max: KEY_BYTES_MAX });
        }
        if s.chars().any(char::is_control) {
            return Err(NameError::BadCharacter {
                what: "key",
                name: s.escape_debug().take(64).collect(),
                allowed: "any UTF-8 except control characters",
            });
        }
        Ok(Self(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for Key {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::new(s)
    }
}
impl From<Key> for String {
    fn from(v: Key) -> String {
        v.0
    }
}
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_names() {
        assert!(RegionId::new("us-east").is_ok());
        assert!(RegionId::new("a").is_ok());
        assert!(matches!(RegionId::new(""), Err(NameError::Empty { .. })));
        assert!(matches!(RegionId::new("US"), Err(NameError::BadCharacter { .. })));
        assert!(matches!(RegionId::new("1abc"), Err(NameError::BadCharacter { .. })));
        assert!(matches!(DatasetName::new("a".repeat(65)), Err(NameError::TooLong { .. })));
        assert!(DatasetName::new("a".repeat(64)).is_ok());
    }

    #[test]
    fn keys() {
        assert!(Key::new("eu-west/user:42 ünïcode").is_ok());
        assert!(Key::new("k".repeat(KEY_BYTES_MAX)).is_ok());
        assert!(matches!(Key::new("k".repeat(KEY_BYTES_MAX + 1)), Err(NameError::TooLong { .. })));
        assert!(matches!(Key::new("a\nb"), Err(NameError::BadCharacter { .. })));
        assert!(matches!(Key::new(""), Err(NameError::Empty { .. })));
    }

    #[test]
    fn regions_order_and_encode_as_their_names() {
        let names = ["a", "a-", "a0", "ab", "ap-south", "ap-south-1", "eu-west", "us-east", "us_east", &"z".repeat(32)];
        for a in names {
            let ra = RegionId::new(a).unwrap();
            assert_eq!(ra.as_str(), a);
            assert_eq!(format!("{ra:?}"), format!("RegionId({a:?})"));
            assert_eq!(postcard::to_stdvec(&ra).unwrap(), postcard::to_stdvec(a).unwrap());
            assert_eq!(postcard::from_bytes::<RegionId>(&postcard::to_stdvec(a).unwrap()).unwrap(), ra);
            assert_eq!(serde_json::from_str::<RegionId>(&serde_json::to_string(&ra).unwrap()).unwrap(), ra);
            for b in names {
                let rb = RegionId::new(b).unwrap();
                assert_eq!(ra.cmp(&rb), a.cmp(b), "{a} against {b}");
                assert_eq!(ra == rb, a == b);
            }
        }
        assert!(matches!(RegionId::new("z".repeat(33)), Err(NameError::TooLong { .. })));
        assert!(postcard::from_bytes::<RegionId>(&postcard::to_stdvec("Bad").unwrap()).is_err());
    }

    #[test]
    fn serde_validates() {
        let r: Result<RegionId, _> =
            toml::from_str::<toml::Value>("x = 'Bad'").unwrap().get("x").unwrap().clone().try_into();
        assert!(r.is_err());
    }
}
