//! Session tokens: what a client has seen, carried between its requests so that a read in any
//! region sees its own writes and never goes back in time (read-your-writes and monotonic
//! reads, across regions).
//!
//! A token is a version vector over regions: for each region, the highest of that region's
//! write sequences the client has written or read (every version carries its origin region's
//! sequence, and every object's causal context is a vector of them). A write adds its
//! version's dot; a read merges in the context of the object it returned. A `session` read of
//! a key needs, of the copy that serves it, every write of the key's homes up to the token's
//! slot for each home: a home's own copy has it once its region sequence is that far, another
//! region's once it has merged that far from the home ([`applied`]).
//!
//! On the wire it is text, `ms1.<slots>.<tag>`: slots are `region=seq` joined by commas,
//! sorted, zero slots left out; the tag is HMAC-SHA256 under the cluster's session key
//! (`[session] key` in the configuration) over a fixed label and the slots, in lowercase hex.
//! A token whose tag does not verify (edited, or signed by another cluster) is refused; so is
//! one that is malformed or too large. The slots are readable on purpose: a token hides
//! nothing, it only cannot be forged.
//!
//! HMAC is built here on `sha2` (RFC 2104, checked against RFC 4231's vectors) rather than
//! adding a crate for twenty lines.

use std::collections::BTreeMap;

use meridian_core::limits::REGIONS_MAX;
use meridian_core::{RegionId, VersionVector};
use sha2::{Digest as _, Sha256};

/// Longest token text accepted.
pub const SESSION_TOKEN_BYTES_MAX: usize = 4096;
/// Bounds on the session key, in bytes (given as twice as many hex digits).
pub const SESSION_KEY_BYTES_MIN: usize = 32;
pub const SESSION_KEY_BYTES_MAX: usize = 64;

const PREFIX: &str = "ms1.";
/// Domain separation: a tag made for anything else never verifies as a session token.
const LABEL: &[u8] = b"meridian session token v1\n";
const BLOCK: usize = 64;

/// The cluster's session key. Its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(Vec<u8>);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionKey({} bytes, redacted)", self.0.len())
    }
}

impl SessionKey {
    /// A key from its hex text (64 to 128 hex digits).
    pub fn from_hex(text: &str) -> Result<SessionKey, String> {
        let bytes = from_hex(text.trim()).ok_or("the session key is not hexadecimal (0-9, a-f)")?;
        if !(SESSION_KEY_BYTES_MIN..=SESSION_KEY_BYTES_MAX).contains(&bytes.len()) {
            return Err(format!(
                "the session key must be {SESSION_KEY_BYTES_MIN} to {SESSION_KEY_BYTES_MAX} bytes \
                 ({} to {} hex digits); it is {} bytes",
                2 * SESSION_KEY_BYTES_MIN,
                2 * SESSION_KEY_BYTES_MAX,
                bytes.len()
            ));
        }
        Ok(SessionKey(bytes))
    }

    /// A fresh key from the operating system's random source (the demo's, which lives as
    /// long as its process).
    pub fn random() -> std::io::Result<SessionKey> {
        use std::io::Read as _;
        let mut bytes = vec![0u8; SESSION_KEY_BYTES_MIN];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(SessionKey(bytes))
    }

    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }

    fn tag(&self, slots: &str) -> [u8; 32] {
        hmac_sha256(&self.0, &[LABEL, slots.as_bytes()])
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the session token is {0} bytes; tokens are at most {SESSION_TOKEN_BYTES_MAX}")]
    TooLarge(usize),
    #[error("the session token is malformed: {0}")]
    Malformed(String),
    #[error("the session token's signature does not verify: it was changed, or made by another cluster")]
    Forged,
}

/// Sign `seen` as a token.
pub fn encode(key: &SessionKey, seen: &VersionVector) -> String {
    let slots = slots_text(seen);
    format!("{PREFIX}{slots}.{}", to_hex(&key.tag(&slots)))
}

/// Read and verify a token.
pub fn decode(key: &SessionKey, text: &str) -> Result<VersionVector, TokenError> {
    if text.len() > SESSION_TOKEN_BYTES_MAX {
        return Err(TokenError::TooLarge(text.len()));
    }
    let body =
        text.strip_prefix(PREFIX).ok_or_else(|| TokenError::Malformed(format!("it does not start with {PREFIX:?}")))?;
    let (slots, tag) = body.rsplit_once('.').ok_or_else(|| TokenError::Malformed("it has no signature".into()))?;
    let tag = from_hex(tag)
        .filter(|t| t.len() == 32)
        .ok_or_else(|| TokenError::Malformed("its signature is not 64 hex digits".into()))?;
    // Verify before parsing anything the signer did not vouch for.
    if !constant_time_eq(&key.tag(slots), &tag) {
        return Err(TokenError::Forged);
    }
    parse_slots(slots).map_err(TokenError::Malformed)
}

/// The slots of a token, unverified: for a client that keeps the newer of two tokens (it
/// cannot check a tag without the key, and does not need to).
pub fn peek(text: &str) -> Option<VersionVector> {
    let body = text.strip_prefix(PREFIX)?;
    let (slots, _) = body.rsplit_once('.')?;
    parse_slots(slots).ok()
}

fn slots_text(seen: &VersionVector) -> String {
    seen.iter().filter(|(_, n)| *n > 0).map(|(r, n)| format!("{r}={n}")).collect::<Vec<_>>().join(",")
}

fn parse_slots(slots: &str) -> Result<VersionVector, String> {
    let mut seen = VersionVector::new();
    if slots.is_empty() {
        return Ok(seen);
    }
    let mut last: Option<RegionId> = None;
    for (i, slot) in slots.split(',').enumerate() {
        if i >= REGIONS_MAX {
            return Err(format!("it names more than {REGIONS_MAX} regions"));
        }
        let (region, seq) = slot.split_once('=').ok_or_else(|| format!("slot {slot:?} is not REGION=SEQ"))?;
        let region = RegionId::new(region).map_err(|e| format!("slot {slot:?}: {e}"))?;
        let seq: u64 = seq.parse().map_err(|_| format!("slot {slot:?}: {seq:?} is not a sequence number"))?;
        if seq == 0 || last.as_ref().is_some_and(|l| *l >= region) {
            return Err("its slots are not sorted, distinct and non-zero".into());
        }
        seen.add(&meridian_core::Dot { region: region.clone(), counter: seq });
        last = Some(region);
    }
    Ok(seen)
}

/// What a `session` read of a key with these homes needs of the copy that serves it: each
/// home's slot of the token, where the token has one.
pub fn requirement(seen: &VersionVector, homes: &[RegionId]) -> Vec<(RegionId, u64)> {
    homes.iter().map(|h| (h.clone(), seen.get(h))).filter(|(_, n)| *n > 0).collect()
}

/// Whether a copy in region `here`, whose own writes have reached `region_seq` and which has
/// merged `merged` (source region → sequence), has applied everything `need` names.
pub fn applied(need: &[(RegionId, u64)], here: &RegionId, region_seq: u64, merged: &BTreeMap<String, u64>) -> bool {
    need.iter().all(|(r, n)| {
        let have = if r == here { region_seq } else { merged.get(r.as_str()).copied().unwrap_or(0) };
        have >= *n
    })
}

/// HMAC-SHA256 (RFC 2104) of the concatenation of `parts` under `key`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| -> [u8; BLOCK] { std::array::from_fn(|i| k[i] ^ byte) };
    let mut inner = Sha256::new();
    inner.update(pad(0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    let mut out = [0u8; 32];
    out.copy_from_slice(&outer.finalize());
    out
}

/// Equal, in a time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> RegionId {
        RegionId::new(s).unwrap()
    }

    fn vv(slots: &[(&str, u64)]) -> VersionVector {
        let mut v = VersionVector::new();
        for (region, n) in slots {
            v.add(&meridian_core::Dot { region: r(region), counter: *n });
        }
        v
    }

    fn key() -> SessionKey {
        SessionKey::from_hex(&"5a".repeat(32)).unwrap()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        let cases: [(Vec<u8>, &[u8], &str); 3] = [
            (vec![0x0b; 20], b"Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?",
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                vec![0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First",
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
        ];
        for (k, data, want) in cases {
            // Split the message to check that parts are concatenated.
            let (a, b) = data.split_at(data.len() / 2);
            assert_eq!(to_hex(&hmac_sha256(&k, &[a, b])), want);
        }
    }

    #[test]
    fn tokens_round_trip_and_show_their_slots() {
        let seen = vv(&[("us-east", 41), ("eu-west", 7)]);
        let text = encode(&key(), &seen);
        assert!(text.starts_with("ms1.eu-west=7,us-east=41."), "{text}");
        assert_eq!(decode(&key(), &text), Ok(seen.clone()));
        assert_eq!(peek(&text), Some(seen));
        let empty = encode(&key(), &VersionVector::new());
        assert_eq!(decode(&key(), &empty), Ok(VersionVector::new()));
    }

    #[test]
    fn edited_foreign_and_malformed_tokens_are_refused() {
        let text = encode(&key(), &vv(&[("us-east", 41)]));
        let raised = text.replace("us-east=41", "us-east=42");
        assert_eq!(decode(&key(), &raised), Err(TokenError::Forged), "a slot changed");
        let other = SessionKey::from_hex(&"a5".repeat(32)).unwrap();
        assert_eq!(decode(&other, &text), Err(TokenError::Forged), "another cluster's key");
        let mut flipped = text.clone();
        let last = flipped.pop().unwrap();
        flipped.push(if last == '0' { '1' } else { '0' });
        assert_eq!(decode(&key(), &flipped), Err(TokenError::Forged), "a tag changed");
        for bad in ["", "ms1.", "ms2.us-east=1.00", "ms1.us-east=1.zz", "ms1.us-east=1.abcd"] {
            assert!(matches!(decode(&key(), bad), Err(TokenError::Malformed(_))), "{bad:?}");
        }
        assert!(matches!(decode(&key(), &"x".repeat(SESSION_TOKEN_BYTES_MAX + 1)), Err(TokenError::TooLarge(_))));
        // Slots the signer would never write are refused even when signed.
        for slots in ["us-east=0", "us-east=2,eu-west=1", "us-east=x", "Bad Region=1", "us-east"] {
            let signed = format!("{PREFIX}{slots}.{}", to_hex(&key().tag(slots)));
            assert!(matches!(decode(&key(), &signed), Err(TokenError::Malformed(_))), "{slots}");
        }
    }

    #[test]
    fn keys_are_bounded_and_never_printed() {
        assert!(SessionKey::from_hex("abcd").is_err(), "too short");
        assert!(SessionKey::from_hex(&"ab".repeat(65)).is_err(), "too long");
        assert!(SessionKey::from_hex(&"zz".repeat(32)).is_err(), "not hex");
        let k = key();
        assert!(!format!("{k:?}").contains("5a5a"), "{k:?}");
        assert_eq!(SessionKey::from_hex(&k.to_hex()), Ok(k));
        assert_ne!(SessionKey::random().unwrap(), SessionKey::random().unwrap());
    }

    #[test]
    fn a_copy_serves_a_session_once_it_has_applied_each_home_that_far() {
        let seen = vv(&[("us-east", 41), ("eu-west", 7), ("ap-south", 3)]);
        let need = requirement(&seen, &[r("us-east"), r("sa-east")]);
        assert_eq!(need, vec![(r("us-east"), 41)], "only the key's homes count, and only slots the token has");
        let merged = |n: u64| BTreeMap::from([("us-east".to_owned(), n)]);
        assert!(!applied(&need, &r("eu-west"), 100, &merged(40)), "a mirror one write behind");
        assert!(applied(&need, &r("eu-west"), 0, &merged(41)));
        assert!(applied(&need, &r("us-east"), 41, &BTreeMap::new()), "the home by its own sequence");
        assert!(!applied(&need, &r("us-east"), 40, &merged(99)), "a home is judged by its own sequence");
        assert!(applied(&[], &r("eu-west"), 0, &BTreeMap::new()), "a session that has seen nothing");
    }
}
