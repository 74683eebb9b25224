//! How byte strings (values, encoded records) go through serde: as one run of bytes.
//!
//! serde treats a `Vec<u8>` as a sequence of `u8`, so an encoder is called once per byte and
//! a decoder pushes one byte at a time: for a 256-byte value that was a quarter of the time a
//! state machine spent applying a merge. These `with` modules hand the whole slice to
//! `serialize_bytes` instead. For postcard (every format Meridian stores or ships) the bytes
//! written are identical: a byte sequence and a byte string are both a varint length followed
//! by the bytes (postcard's wire specification, "seq" and "byte array"), so records and
//! messages written either way read either way (tested below). In JSON both are an array of
//! numbers.
//!
//! Use: `#[serde(with = "meridian_core::byte_strings::bytes")]` on a `Vec<u8>`,
//! `option_bytes` on an `Option<Vec<u8>>`, `pairs` on a `Vec<(Vec<u8>, Vec<u8>)>` and
//! `numbered` on a `Vec<(u64, Vec<u8>)>`.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// A borrowed byte string that serializes as one.
struct Raw<'a>(&'a [u8]);

impl Serialize for Raw<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// An owned byte string read as one (or, from a format that wrote a sequence, element by
/// element).
struct Owned(Vec<u8>);

impl<'de> Deserialize<'de> for Owned {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_byte_buf(OwnedVisitor).map(Owned)
    }
}

struct OwnedVisitor;

impl<'de> Visitor<'de> for OwnedVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        // The length a peer claims is not trusted for more than a modest reservation.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 * 1024));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(out)
    }
}

/// `Vec<u8>`.
pub mod bytes {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Owned::deserialize(d).map(|o| o.0)
    }
}

/// `Option<Vec<u8>>`.
pub mod option_bytes {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&Raw(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<Owned>::deserialize(d).map(|o| o.map(|o| o.0))
    }
}

/// `Vec<(Vec<u8>, Vec<u8>)>`: storage keys and records, as snapshots carry them.
pub mod pairs {
    use super::*;

    /// Rows of (storage key, record).
    pub type Rows = Vec<(Vec<u8>, Vec<u8>)>;

    pub fn serialize<S: Serializer>(v: &[(Vec<u8>, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for (a, b) in v {
            seq.serialize_element(&(Raw(a), Raw(b)))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Rows, D::Error> {
        Vec::<(Owned, Owned)>::deserialize(d).map(|v| v.into_iter().map(|(a, b)| (a.0, b.0)).collect())
    }
}

/// `Vec<(u64, Vec<u8>)>`: numbered records, as snapshots carry them.
pub mod numbered {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[(u64, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for (n, b) in v {
            seq.serialize_element(&(n, Raw(b)))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u64, Vec<u8>)>, D::Error> {
        Vec::<(u64, Owned)>::deserialize(d).map(|v| v.into_iter().map(|(n, b)| (n, b.0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    /// The same fields, encoded the way serde does by default.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Plain {
        a: Vec<u8>,
        b: Option<Vec<u8>>,
        c: Option<Vec<u8>>,
        d: Vec<(Vec<u8>, Vec<u8>)>,
        e: Vec<(u64, Vec<u8>)>,
    }

    /// ... and through this module.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Fast {
        #[serde(with = "super::bytes")]
        a: Vec<u8>,
        #[serde(with = "super::option_bytes")]
        b: Option<Vec<u8>>,
        #[serde(with = "super::option_bytes")]
        c: Option<Vec<u8>>,
        #[serde(with = "super::pairs")]
        d: Vec<(Vec<u8>, Vec<u8>)>,
        #[serde(with = "super::numbered")]
        e: Vec<(u64, Vec<u8>)>,
    }

    fn sample(n: usize) -> Plain {
        let bytes = |k: usize| (0..k).map(|i| (i * 7 + n) as u8).collect::<Vec<u8>>();
        Plain {
            a: bytes(n),
            b: Some(bytes(n + 130)),
            c: None,
            d: vec![(bytes(3), bytes(n * 3)), (Vec::new(), bytes(200))],
            e: vec![(u64::MAX, bytes(n)), (0, Vec::new())],
        }
    }

    fn fast(p: &Plain) -> Fast {
        Fast { a: p.a.clone(), b: p.b.clone(), c: p.c.clone(), d: p.d.clone(), e: p.e.clone() }
    }

    #[test]
    fn postcard_bytes_are_the_same_either_way_and_read_either_way() {
        for n in [0, 1, 127, 128, 300, 20_000] {
            let p = sample(n);
            let f = fast(&p);
            let old = postcard::to_stdvec(&p).unwrap();
            let new = postcard::to_stdvec(&f).unwrap();
            assert_eq!(old, new, "n = {n}");
            assert_eq!(postcard::from_bytes::<Fast>(&old).unwrap(), f);
            assert_eq!(postcard::from_bytes::<Plain>(&new).unwrap(), p);
        }
    }

    #[test]
    fn json_is_the_same_either_way_and_reads_either_way() {
        let p = sample(5);
        let f = fast(&p);
        let old = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::to_string(&f).unwrap(), old);
        assert_eq!(serde_json::from_str::<Fast>(&old).unwrap(), f);
    }

    #[test]
    fn a_truncated_byte_string_is_an_error() {
        let bytes = postcard::to_stdvec(&fast(&sample(300))).unwrap();
        for cut in [1, 2, 150, bytes.len() - 1] {
            assert!(postcard::from_bytes::<Fast>(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
