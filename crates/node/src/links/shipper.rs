//! The shipper's decisions, free of I/O: what range and which changes the next batch carries,
//! when it may leave, how long to pause after failures, and what the batches that came back
//! mean for the cursor. The driver in `links/mod.rs` reads the outbox, asks the policy, sends
//! and proposes; everything it decides with, it decides here, so the decisions are tested by
//! the batches and steps they produce (as [`crate::traffic`] is).

use std::collections::BTreeMap;
use std::time::Duration;

use meridian_core::Version;
use meridian_raft::command::Change;

use crate::limits::{
    DEPARTURE_SPACING_MIN, EARLY_SENT_MAX, HEARTBEAT_INTERVAL, LINK_BACKOFF_DOUBLINGS_MAX, LINK_BACKOFF_MAX,
    LINK_BATCH_BYTES_MAX, LINK_BATCH_ENTRIES_MAX, LINK_TICK, PIPELINE_BYTES_MAX, PIPELINE_MAX,
};
use crate::traffic::{Candidate, Deferral};

/// One shipper's batches in flight, and what the destination acknowledged.
#[derive(Debug, Default)]
pub(crate) struct Pipeline {
    /// The end of the last range sent; the next batch starts after it (`None`: after the
    /// cursor).
    pub(crate) sent_upto: Option<u64>,
    pub(crate) in_flight: usize,
    pub(crate) in_flight_bytes: u64,
    /// The highest range end the destination acknowledged.
    pub(crate) acked: u64,
    /// Failures in a row (0 once a batch is merged or the link is idle).
    pub(crate) failures: u32,
    pub(crate) batches: u64,
    pub(crate) errors: u64,
    pub(crate) last_error: Option<String>,
    pub(crate) last_departure: Option<tokio::time::Instant>,
}

/// What came back for one batch, reduced to what the pipeline decides on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Returned {
    /// Merged up to `upto` (the destination's mark for this source).
    Merged { upto: u64, rtt_ms: f64, bytes: u64, shipped: u64, withheld: u64 },
    /// The destination has less than the cursor says (it lost state): it holds `merged_upto`.
    /// `early`: the sequences of the changes the batch carried ahead of its range.
    Gap { merged_upto: u64, bytes: u64, early: Vec<u64> },
    /// Not merged, for this reason; the range is sent again from the cursor.
    Failed { reason: String, bytes: u64, early: Vec<u64> },
}

/// What settling the returned batches found.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Settled {
    /// Per merged batch: round trip, bytes, changes shipped and withheld.
    pub(crate) merged: Vec<(f64, u64, u64, u64)>,
    /// The lowest mark a destination reported below what was sent.
    pub(crate) gap: Option<u64>,
    /// Times the pipeline went back to the cursor.
    pub(crate) restarts: u64,
    /// Why batches failed.
    pub(crate) errors: Vec<String>,
    /// Changes sent ahead of a range in batches that were not merged: they may not have
    /// arrived, so the range must carry them again (forget them in the early set).
    pub(crate) unsent_early: Vec<u64>,
}

/// What to do about the persisted cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CursorStep {
    Stay,
    /// Persist the acknowledged mark (the shipper does not wait for it).
    Persist(u64),
    /// The destination lost what it acknowledged: move the cursor back to its mark, after
    /// any proposal in flight (which could otherwise land after this one).
    MoveBack(u64),
}

/// Whether the next batch may leave now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Departure {
    Go,
    /// [`PIPELINE_MAX`] batches or [`PIPELINE_BYTES_MAX`] bytes are in flight.
    WindowFull,
    /// Too soon after the last one: departures are spread over the round trip.
    After(Duration),
}

impl Pipeline {
    /// Where the next batch starts: after the last range sent, else after what the
    /// destination acknowledged (the cursor may not be persisted that far yet), never before
    /// the cursor.
    pub(crate) fn next_from(&self, cursor: u64) -> u64 {
        self.sent_upto.unwrap_or(cursor.max(self.acked)).max(cursor)
    }

    /// How long to wait before the next round: the tick, or after failures an exponential
    /// backoff (capped at [`LINK_BACKOFF_MAX`]) with jitter in its upper half, from `draw`
    /// (called only after failures, so a healthy link draws no randomness).
    pub(crate) fn pause(&self, draw: impl FnOnce() -> u64) -> Duration {
        if self.failures == 0 {
            return LINK_TICK;
        }
        let draw = draw();
        let cap = LINK_BACKOFF_MAX.as_millis() as u64;
        let base = (LINK_TICK.as_millis() as u64) << self.failures.min(LINK_BACKOFF_DOUBLINGS_MAX);
        let ms = base.min(cap);
        Duration::from_millis(ms / 2 + draw % (ms / 2 + 1))
    }

    /// Whether a batch may leave at `now`, given the link's smoothed round trip.
    pub(crate) fn departure(&self, rtt_ms: Option<f64>, now: tokio::time::Instant) -> Departure {
        if self.in_flight >= PIPELINE_MAX || self.in_flight_bytes >= PIPELINE_BYTES_MAX {
            return Departure::WindowFull;
        }
        // Spread departures over the round trip: sending every batch at once and then
        // waiting a whole round trip for room would make the changes written meanwhile wait
        // that long.
        if let (Some(rtt), Some(last), true) = (rtt_ms, self.last_departure, self.in_flight > 0) {
            let spacing = Duration::from_secs_f64(rtt / 1000.0 / PIPELINE_MAX as f64).max(DEPARTURE_SPACING_MIN);
            let since = now.saturating_duration_since(last);
            if since < spacing {
                return Departure::After(spacing - since);
            }
        }
        Departure::Go
    }

    /// A batch covering up to `upto` left at `now`.
    pub(crate) fn departed(&mut self, upto: u64, bytes: u64, now: tokio::time::Instant) {
        self.sent_upto = Some(upto);
        self.in_flight += 1;
        self.in_flight_bytes += bytes;
        self.last_departure = Some(now);
    }

    /// Send the next batch from the cursor again. True if anything had been sent past it.
    pub(crate) fn restart(&mut self) -> bool {
        self.sent_upto.take().is_some()
    }

    /// An attempt failed: back off, and go back to the cursor. True if that was a restart.
    pub(crate) fn fail(&mut self, reason: String) -> bool {
        self.failures = self.failures.saturating_add(1);
        self.errors += 1;
        self.last_error = Some(reason);
        self.restart()
    }

    /// Nothing to do, or a scan finished: nothing is failing.
    pub(crate) fn quiet(&mut self) {
        self.failures = 0;
    }

    /// This node does not lead: start afresh when it does.
    pub(crate) fn not_leading(&mut self) {
        self.sent_upto = None;
        self.failures = 0;
    }

    /// Account for the batches that came back.
    pub(crate) fn settle(&mut self, returned: Vec<Returned>) -> Settled {
        let mut s = Settled::default();
        for r in returned {
            assert!(self.in_flight > 0, "a batch came back that was never in flight");
            self.in_flight -= 1;
            match r {
                Returned::Merged { upto, rtt_ms, bytes, shipped, withheld } => {
                    self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
                    self.acked = self.acked.max(upto);
                    self.failures = 0;
                    self.batches += 1;
                    s.merged.push((rtt_ms, bytes, shipped, withheld));
                }
                Returned::Gap { merged_upto, bytes, early } => {
                    self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
                    s.unsent_early.extend(early);
                    s.gap = Some(s.gap.map_or(merged_upto, |g| g.min(merged_upto)));
                    s.restarts += u64::from(self.restart());
                }
                Returned::Failed { reason, bytes, early } => {
                    self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
                    s.unsent_early.extend(early);
                    s.restarts += u64::from(self.fail(reason.clone()));
                    s.errors.push(reason);
                }
            }
        }
        s
    }

    /// What to do about the persisted `cursor`, after settling (`gap` from [`Settled`]);
    /// `persisting`: a cursor proposal is in flight (only one at a time).
    pub(crate) fn cursor_step(&self, gap: Option<u64>, cursor: u64, persisting: bool) -> CursorStep {
        match gap.filter(|g| *g < cursor) {
            Some(g) => CursorStep::MoveBack(g),
            None if self.acked > cursor && !persisting => CursorStep::Persist(self.acked),
            None => CursorStep::Stay,
        }
    }

    /// The cursor was moved back to `g`: that is all the destination holds.
    pub(crate) fn moved_back(&mut self, g: u64) {
        self.acked = g;
    }

    /// How far the destination holds this region's changes, for the early set and the lag.
    pub(crate) fn acked_through(&self, step: CursorStep, cursor: u64) -> u64 {
        match step {
            CursorStep::MoveBack(_) => self.acked,
            _ => self.acked.max(cursor),
        }
    }
}

/// What the next batch carries, decided from the window of the outbox just read.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Formed {
    /// Changes inside the range, in sequence order.
    pub(crate) changes: Vec<Change>,
    /// Changes admitted past a waiting one: sent ahead of the range as newer-only merges.
    pub(crate) early: Vec<Change>,
    /// The range's end (`None`: it reaches everything read).
    pub(crate) upto: Option<u64>,
    /// Key and value bytes of `changes` and `early`.
    pub(crate) bytes: u64,
    /// The candidates (by index) that wait, and why.
    pub(crate) deferred: Vec<(usize, Deferral)>,
    /// The candidates (by index) admitted but not sent this round: their tokens go back.
    pub(crate) given_back: Vec<usize>,
}

/// Form the next batch from the `candidates` the placement lets the destination hold (each
/// with its change in `objects`, same index) and the traffic plan for them.
///
/// The range stops before the first change that waits (it stays behind the cursor); changes
/// admitted past it go at once, outside the range, and are remembered in `early_sent` (at most
/// [`EARLY_SENT_MAX`]) so the range does not send them again. A batch stops growing at
/// [`LINK_BATCH_BYTES_MAX`]: the range ends before the first change left out.
pub(crate) fn form_batch(
    candidates: &[Candidate],
    plan: &[Result<(), Deferral>],
    objects: &[Change],
    early_sent: &mut BTreeMap<u64, Version>,
) -> Formed {
    assert_eq!(candidates.len(), plan.len(), "one plan entry per candidate");
    assert_eq!(candidates.len(), objects.len(), "one change per candidate");
    let mut in_range_seqs: Vec<u64> = Vec::new();
    let mut f = Formed {
        upto: candidates.iter().zip(plan).find(|(_, p)| p.is_err()).map(|(c, _)| c.seq - 1),
        ..Formed::default()
    };
    for (i, (c, p)) in candidates.iter().zip(plan).enumerate() {
        if let Err(reason) = p {
            f.deferred.push((i, *reason));
            continue;
        }
        let in_range = f.upto.is_none_or(|u| c.seq <= u);
        let over = f.bytes >= LINK_BATCH_BYTES_MAX as u64;
        if over || (!in_range && early_sent.len() >= EARLY_SENT_MAX) {
            // Not this round: return its tokens, and end the range before it.
            f.given_back.push(i);
            f.upto = Some(f.upto.map_or(c.seq - 1, |u| u.min(c.seq - 1)));
            continue;
        }
        let change = objects[i].clone();
        f.bytes += c.bytes;
        if in_range {
            in_range_seqs.push(c.seq);
            f.changes.push(change);
        } else {
            early_sent.insert(c.seq, change.object.version.clone());
            f.early.push(change);
        }
    }
    // Changes past a range end that stopped short belong to the next round.
    if let Some(u) = f.upto {
        let keep = in_range_seqs.iter().take_while(|&&s| s <= u).count();
        debug_assert!(in_range_seqs.windows(2).all(|w| w[0] < w[1]), "candidates come in outbox order");
        f.changes.truncate(keep);
    }
    f
}

/// The end of the range a batch covers, given the window read: `entries_read` outbox entries
/// up to `last_read`, with the region's last write at `region_seq` (read before the outbox, so
/// no entry at or below it is missing). A full window ends at what was read; otherwise the
/// range reaches the region's last write, past writes that never enter the outbox.
pub(crate) fn range_end(formed_upto: Option<u64>, entries_read: usize, last_read: u64, region_seq: u64) -> u64 {
    formed_upto.unwrap_or(if entries_read >= LINK_BATCH_ENTRIES_MAX { last_read } else { last_read.max(region_seq) })
}

/// Whether the outbox may hold more past this window (the next round should come at once).
pub(crate) fn more_after(formed_upto: Option<u64>, entries_read: usize) -> bool {
    entries_read >= LINK_BATCH_ENTRIES_MAX || formed_upto.is_some()
}

/// With nothing to send: whether an empty batch is due, telling the destination it is
/// current and measuring the path's round trip. Only with nothing in flight, and at most every
/// [`HEARTBEAT_INTERVAL`].
pub(crate) fn heartbeat_due(idle: bool, now_ms: u64, last_heartbeat_ms: u64) -> bool {
    idle && now_ms.saturating_sub(last_heartbeat_ms) >= HEARTBEAT_INTERVAL.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::{HlcTimestamp, RegionId};
    use meridian_policy::units::Dur;
    use meridian_policy::Schedule;

    fn version(seq: u64) -> Version {
        Version { hlc: HlcTimestamp::new(1_000 + seq, 0), region: RegionId::new("a").expect("region"), seq }
    }

    fn change(seq: u64, bytes: usize) -> Change {
        Change {
            dataset: "d".into(),
            key: format!("k{seq}"),
            object: meridian_raft::StoredObject::plain(version(seq), Some(vec![0; bytes])),
            rule: meridian_raft::command::MergeRule::Lww,
        }
    }

    fn cand(seq: u64, bytes: u64) -> Candidate {
        Candidate {
            seq,
            dataset: "d".into(),
            bytes,
            written_ms: 0,
            schedule: Schedule::Continuous,
            phase: Dur(0),
            rate: None,
            max_lag: None,
        }
    }

    fn seqs(changes: &[Change]) -> Vec<u64> {
        changes.iter().map(|c| c.object.version.seq).collect()
    }

    #[test]
    fn everything_admitted_goes_in_the_range() {
        let cands = [cand(1, 10), cand(2, 10), cand(3, 10)];
        let objects = [change(1, 8), change(2, 8), change(3, 8)];
        let mut early = BTreeMap::new();
        let f = form_batch(&cands, &[Ok(()), Ok(()), Ok(())], &objects, &mut early);
        assert_eq!(seqs(&f.changes), vec![1, 2, 3]);
        assert!(f.early.is_empty() && f.deferred.is_empty() && f.given_back.is_empty());
        assert_eq!((f.upto, f.bytes), (None, 30));
        assert_eq!(range_end(f.upto, 3, 3, 5), 5, "a short window reaches the region's last write");
        assert!(!more_after(f.upto, 3));
    }

    #[test]
    fn the_range_stops_before_a_waiting_change_and_later_ones_go_ahead_of_it() {
        let cands = [cand(1, 10), cand(2, 10), cand(3, 10), cand(4, 10)];
        let objects = [change(1, 8), change(2, 8), change(3, 8), change(4, 8)];
        let plan = [Ok(()), Err(Deferral::Schedule), Ok(()), Err(Deferral::Rate)];
        let mut early = BTreeMap::new();
        let f = form_batch(&cands, &plan, &objects, &mut early);
        assert_eq!(f.upto, Some(1), "the range ends before the first waiting change");
        assert_eq!(seqs(&f.changes), vec![1]);
        assert_eq!(seqs(&f.early), vec![3], "an admitted change past the wait goes ahead of the range");
        assert_eq!(early.get(&3), Some(&version(3)), "and is remembered, so the range does not resend it");
        assert_eq!(f.deferred, vec![(1, Deferral::Schedule), (3, Deferral::Rate)]);
        assert!(more_after(f.upto, 4));
        assert_eq!(range_end(f.upto, 4, 4, 9), 1);
    }

    #[test]
    fn a_full_early_set_holds_later_changes_back_with_their_tokens() {
        let mut early: BTreeMap<u64, Version> = (100..100 + EARLY_SENT_MAX as u64).map(|s| (s, version(s))).collect();
        let cands = [cand(1, 10), cand(2, 10), cand(3, 10)];
        let objects = [change(1, 8), change(2, 8), change(3, 8)];
        let f = form_batch(&cands, &[Err(Deferral::Congestion), Ok(()), Ok(())], &objects, &mut early);
        assert_eq!(f.upto, Some(0));
        assert!(f.changes.is_empty() && f.early.is_empty());
        assert_eq!(f.given_back, vec![1, 2]);
        assert_eq!(early.len(), EARLY_SENT_MAX, "nothing more is remembered");
    }

    #[test]
    fn a_batch_stops_at_its_byte_bound_and_the_range_ends_before_what_was_left_out() {
        let big = LINK_BATCH_BYTES_MAX as u64;
        let cands = [cand(1, big / 2), cand(2, big / 2), cand(3, 10), cand(4, 10)];
        let objects = [change(1, 1), change(2, 1), change(3, 1), change(4, 1)];
        let mut early = BTreeMap::new();
        let f = form_batch(&cands, &[Ok(()), Ok(()), Ok(()), Ok(())], &objects, &mut early);
        assert_eq!(seqs(&f.changes), vec![1, 2]);
        assert_eq!(f.upto, Some(2));
        assert_eq!(f.given_back, vec![2, 3]);
        assert!(more_after(f.upto, 4), "the next round comes at once");
    }

    #[test]
    fn a_full_window_ends_the_range_at_what_was_read() {
        assert_eq!(range_end(None, LINK_BATCH_ENTRIES_MAX, 700, 900), 700);
        assert!(more_after(None, LINK_BATCH_ENTRIES_MAX));
    }

    #[test]
    fn heartbeats_go_only_when_idle_and_at_most_every_interval() {
        let every = HEARTBEAT_INTERVAL.as_millis() as u64;
        assert!(heartbeat_due(true, 10_000, 10_000 - every));
        assert!(!heartbeat_due(true, 10_000, 10_000 - every + 1));
        assert!(!heartbeat_due(false, 10_000, 0), "not while batches are in flight");
    }

    #[test]
    fn failures_back_off_exponentially_with_jitter_up_to_the_cap() {
        let mut p = Pipeline::default();
        assert_eq!(p.pause(|| panic!("a healthy link draws no randomness")), LINK_TICK);
        let mut last_max = Duration::ZERO;
        for n in 1..=12 {
            p.fail(format!("failure {n}"));
            // Every jitter the draw can give (ms / 2 + 1 values, at most 2501).
            let (lo, hi) = (p.pause(|| 0), (0..=2600).map(|d| p.pause(|| d)).max().expect("draws"));
            assert!(lo <= hi && hi <= LINK_BACKOFF_MAX, "{n}: {lo:?}..{hi:?}");
            assert!(hi >= last_max, "the backoff never shrinks while failures go on");
            assert!(lo >= hi / 2 - Duration::from_millis(1), "jitter stays in the upper half");
            last_max = hi;
        }
        assert!(last_max >= LINK_BACKOFF_MAX / 2);
        p.quiet();
        assert_eq!(p.pause(|| 7), LINK_TICK);
    }

    #[test]
    fn the_window_closes_on_count_or_bytes_and_departures_are_spread_over_the_round_trip() {
        let now = tokio::time::Instant::now();
        let mut p = Pipeline::default();
        assert_eq!(p.departure(Some(300.0), now), Departure::Go);
        p.departed(10, 100, now);
        // 300 ms / 128 in flight = 2.34 ms between departures.
        match p.departure(Some(300.0), now + Duration::from_millis(1)) {
            Departure::After(d) => assert!(d > Duration::from_millis(1) && d < Duration::from_millis(2), "{d:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(p.departure(Some(300.0), now + Duration::from_millis(3)), Departure::Go);
        // A short round trip is floored at the minimum spacing.
        assert_eq!(
            p.departure(Some(1.0), now + Duration::from_millis(1)),
            Departure::After(DEPARTURE_SPACING_MIN - Duration::from_millis(1))
        );
        let mut full = Pipeline { in_flight: PIPELINE_MAX, ..Pipeline::default() };
        assert_eq!(full.departure(None, now), Departure::WindowFull);
        full.in_flight = 1;
        full.in_flight_bytes = PIPELINE_BYTES_MAX;
        assert_eq!(full.departure(None, now), Departure::WindowFull);
    }

    #[test]
    fn batches_continue_after_the_last_range_sent_and_a_failure_goes_back_to_the_cursor() {
        let now = tokio::time::Instant::now();
        let mut p = Pipeline::default();
        assert_eq!(p.next_from(5), 5);
        p.departed(20, 1, now);
        p.departed(30, 1, now);
        assert_eq!(p.next_from(5), 30);
        let s = p.settle(vec![
            Returned::Merged { upto: 20, rtt_ms: 10.0, bytes: 1, shipped: 3, withheld: 1 },
            Returned::Failed { reason: "timeout".into(), bytes: 1, early: vec![31, 33] },
        ]);
        assert_eq!((s.restarts, s.errors.len(), s.merged.len()), (1, 1, 1));
        assert_eq!(s.unsent_early, vec![31, 33], "what the failed batch carried early must go again");
        assert_eq!((p.in_flight, p.in_flight_bytes, p.acked, p.failures), (0, 0, 20, 1));
        assert_eq!(p.next_from(5), 20, "after a failure: from what was acknowledged");
        assert_eq!(p.cursor_step(s.gap, 5, false), CursorStep::Persist(20));
        assert_eq!(p.cursor_step(s.gap, 5, true), CursorStep::Stay, "one cursor proposal at a time");
        assert_eq!(p.cursor_step(s.gap, 20, false), CursorStep::Stay);
    }

    #[test]
    fn a_destination_that_lost_state_moves_the_cursor_back() {
        let now = tokio::time::Instant::now();
        let mut p = Pipeline { acked: 50, ..Pipeline::default() };
        p.departed(60, 1, now);
        p.departed(70, 1, now);
        let s = p.settle(vec![
            Returned::Gap { merged_upto: 40, bytes: 1, early: vec![] },
            Returned::Gap { merged_upto: 35, bytes: 1, early: vec![71] },
        ]);
        assert_eq!(s.gap, Some(35), "the lowest mark wins");
        assert_eq!(s.unsent_early, vec![71]);
        assert_eq!(s.restarts, 1, "one restart: the second found nothing sent past the cursor");
        let step = p.cursor_step(s.gap, 50, true);
        assert_eq!(step, CursorStep::MoveBack(35), "even with a proposal in flight");
        p.moved_back(35);
        assert_eq!(p.acked_through(step, 50), 35);
        assert_eq!(p.next_from(35), 35);
        // A gap at or above the cursor is only a restart.
        assert_eq!(p.cursor_step(Some(60), 50, false), CursorStep::Stay);
    }
}
