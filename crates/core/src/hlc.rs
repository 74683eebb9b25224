//! Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", OPODIS 2014).
//!
//! A timestamp packs wall-clock milliseconds (upper 48 bits) and a logical counter (lower 16
//! bits) into one `u64`, so timestamps compare as integers and stay small on the wire.
//!
//! The clock never reads time itself: every call takes the caller's wall-clock reading. It
//! refuses to run ahead of that reading by more than `max_offset_ms`; a refusal is an error
//! the caller counts and reports, never a silent jump. Monotonicity holds across every call
//! that succeeds, which is property-tested below.

use std::fmt;

use serde::{Deserialize, Serialize};

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MAX: u64 = (1 << LOGICAL_BITS) - 1;
/// Largest wall-clock reading representable: 2^48 ms is about 8900 years after 1970.
pub const WALL_MS_MAX: u64 = (1 << (64 - LOGICAL_BITS)) - 1;

/// One HLC reading: wall milliseconds and a logical counter, ordered as a `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HlcTimestamp(u64);

impl HlcTimestamp {
    pub const ZERO: HlcTimestamp = HlcTimestamp(0);

    pub fn new(wall_ms: u64, logical: u16) -> Self {
        assert!(wall_ms <= WALL_MS_MAX, "wall clock reading out of range: {wall_ms}");
        HlcTimestamp((wall_ms << LOGICAL_BITS) | u64::from(logical))
    }
    pub fn from_u64(raw: u64) -> Self {
        HlcTimestamp(raw)
    }
    pub fn as_u64(self) -> u64 {
        self.0
    }
    pub fn wall_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }
    pub fn logical(self) -> u16 {
        (self.0 & LOGICAL_MAX) as u16
    }
    /// The smallest timestamp strictly greater than `self`.
    pub fn successor(self) -> Self {
        assert!(self.0 < u64::MAX, "HLC timestamp space exhausted");
        HlcTimestamp(self.0 + 1)
    }
}

impl fmt::Display for HlcTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.wall_ms(), self.logical())
    }
}

/// Why the clock refused to produce a timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    #[error("HLC would run {ahead_ms} ms ahead of the wall clock; the maximum offset is {max_offset_ms} ms")]
    TooFarAhead { ahead_ms: u64, max_offset_ms: u64 },
}

/// A hybrid logical clock. Not thread-safe by itself: the owner wraps it in a lock.
#[derive(Debug, Clone)]
pub struct Hlc {
    last: HlcTimestamp,
    max_offset_ms: u64,
}

impl Hlc {
    pub fn new(max_offset_ms: u64) -> Self {
        Hlc { last: HlcTimestamp::ZERO, max_offset_ms }
    }

    pub fn last(&self) -> HlcTimestamp {
        self.last
    }

    pub fn max_offset_ms(&self) -> u64 {
        self.max_offset_ms
    }

    /// A timestamp for a local event (a write, a send): greater than every earlier one.
    pub fn now(&mut self, wall_ms: u64) -> Result<HlcTimestamp, ClockError> {
        let candidate =
            if wall_ms > self.last.wall_ms() { HlcTimestamp::new(wall_ms, 0) } else { self.last.successor() };
        self.accept(candidate, wall_ms)
    }

    /// Merge a timestamp received from elsewhere, then return a timestamp for the receive
    /// event. A remote timestamp too far ahead of our wall clock is refused, and the clock is
    /// left unchanged: one bad clock elsewhere must not drag this one into the future.
    pub fn observe(&mut self, remote: HlcTimestamp, wall_ms: u64) -> Result<HlcTimestamp, ClockError> {
        let base = self.last.max(remote);
        let candidate = if wall_ms > base.wall_ms() { HlcTimestamp::new(wall_ms, 0) } else { base.successor() };
        self.accept(candidate, wall_ms)
    }

    fn accept(&mut self, candidate: HlcTimestamp, wall_ms: u64) -> Result<HlcTimestamp, ClockError> {
        let ahead_ms = candidate.wall_ms().saturating_sub(wall_ms);
        if ahead_ms > self.max_offset_ms {
            return Err(ClockError::TooFarAhead { ahead_ms, max_offset_ms: self.max_offset_ms });
        }
        assert!(candidate > self.last, "HLC must be strictly monotonic");
        self.last = candidate;
        Ok(candidate)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn packs_and_orders() {
        let a = HlcTimestamp::new(1_000, 5);
        assert_eq!(a.wall_ms(), 1_000);
        assert_eq!(a.logical(), 5);
        assert!(HlcTimestamp::new(1_000, 65535) < HlcTimestamp::new(1_001, 0));
        assert_eq!(HlcTimestamp::new(1_000, 65535).successor(), HlcTimestamp::new(1_001, 0));
        assert_eq!(a.to_string(), "1000.5");
    }

    #[test]
    fn logical_counter_ticks_when_wall_clock_stalls() {
        let mut c = Hlc::new(500);
        let a = c.now(10).unwrap();
        let b = c.now(10).unwrap();
        let d = c.now(9).unwrap(); // wall clock went backwards
        assert!(a < b && b < d);
        assert_eq!(d.wall_ms(), 10);
    }

    #[test]
    fn refuses_remote_too_far_ahead_and_stays_put() {
        let mut c = Hlc::new(500);
        let before = c.now(1_000).unwrap();
        let err = c.observe(HlcTimestamp::new(1_501, 0), 1_000).unwrap_err();
        assert_eq!(err, ClockError::TooFarAhead { ahead_ms: 501, max_offset_ms: 500 });
        assert_eq!(c.last(), before);
        // Exactly at the bound is accepted.
        let t = c.observe(HlcTimestamp::new(1_500, 0), 1_000).unwrap();
        assert_eq!(t, HlcTimestamp::new(1_500, 1));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Now { advance_ms: i64 },
        Observe { advance_ms: i64, remote_delta_ms: i64, remote_logical: u16 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (-50i64..200).prop_map(|advance_ms| Step::Now { advance_ms }),
            (-50i64..200, -1_000i64..1_000, any::<u16>()).prop_map(|(a, r, l)| Step::Observe {
                advance_ms: a,
                remote_delta_ms: r,
                remote_logical: l
            }),
        ]
    }

    proptest! {
        /// Every timestamp handed out is strictly greater than the one before, whatever the
        /// wall clock and the remote clocks do, and never more than max_offset ahead of wall.
        #[test]
        fn monotonic_and_bounded(steps in proptest::collection::vec(step(), 1..200), offset in 0u64..1_000) {
            let mut c = Hlc::new(offset);
            let mut wall: i64 = 1_000_000;
            let mut prev = HlcTimestamp::ZERO;
            for s in steps {
                let (adv, result) = match s {
                    Step::Now { advance_ms } => (advance_ms, None),
                    Step::Observe { advance_ms, remote_delta_ms, remote_logical } =>
                        (advance_ms, Some((remote_delta_ms, remote_logical))),
                };
                wall = (wall + adv).max(0);
                let w = wall as u64;
                let r = match result {
                    None => c.now(w),
                    Some((delta, logical)) => {
                        let remote = HlcTimestamp::new((wall + delta).max(0) as u64, logical);
                        c.observe(remote, w)
                    }
                };
                match r {
                    Ok(t) => {
                        prop_assert!(t > prev, "{t} after {prev}");
                        prop_assert!(t.wall_ms() <= w + offset);
                        prev = t;
                    }
                    Err(ClockError::TooFarAhead { ahead_ms, max_offset_ms }) => {
                        prop_assert!(ahead_ms > max_offset_ms);
                        prop_assert_eq!(c.last(), prev);
                    }
                }
            }
        }
    }
}
