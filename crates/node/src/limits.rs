//! Every limit of the node: queues, batches, retries, deadlines, pipelines. Names carry their
//! unit last. The relations between them that correctness depends on are asserted at compile
//! time at the bottom of this file, or (where a setting takes part) by [`check`] when the node
//! starts.
//!
//! The limits of inputs (key and value sizes, list pages, topology sizes) are in
//! `meridian_core::limits`; those of policy documents in `meridian_policy::limits`.

use std::time::Duration;

use meridian_core::limits::{DATASET_NAME_BYTES_MAX, KEY_BYTES_MAX, REGIONS_MAX, VALUE_BYTES_HARD_MAX};

use crate::peer::PEER_BODY_BYTES_MAX;

// ---- requests ------------------------------------------------------------------------------

/// How long a write or strong read may take end to end, forwarding included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `session` read waits for this node's copy to apply what the session has seen
/// before it asks another region's copy.
pub const SESSION_WAIT: Duration = Duration::from_millis(250);
/// How often it looks meanwhile.
pub const SESSION_POLL: Duration = Duration::from_millis(10);
/// Most attempts to reach a leader for one request (each after proof nothing was applied).
pub const LEADER_ATTEMPTS_MAX: u32 = 20;
/// Longest pause between two attempts to reach a leader.
pub const LEADER_BACKOFF_MAX: Duration = Duration::from_millis(400);
/// Deadline of a status call to another node.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of one region's policy install during an apply (a region that misses it catches
/// up from the authority).
pub const POLICY_INSTALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts to install a policy entry into a region whose copy keeps changing meanwhile.
pub const POLICY_INSTALL_ATTEMPTS_MAX: u32 = 3;

// ---- the proposer --------------------------------------------------------------------------

/// Most proposals in flight at once (submitted to Raft, not yet applied). While they are,
/// new writes wait in the queue and leave together as the next batch.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 4;
/// Most writes in one proposed batch.
pub const BATCH_WRITES_MAX: usize = 256;
/// A batch stops growing once it holds this many bytes of keys and values (one large value
/// may take it past: see [`ENTRY_BYTES_MAX`]).
pub const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Most writes waiting to be proposed; writers wait when it is full.
pub const PROPOSAL_QUEUE_MAX: usize = 4096;

// ---- Raft ----------------------------------------------------------------------------------

/// Framing one record of a command costs beyond its names, keys and values (versions, HLC
/// stamps, conditions, lengths), bounded generously: `proposer::command_bytes` counts it per
/// record, and a test checks that bound against postcard's real encoding.
pub const ENTRY_OVERHEAD_PER_WRITE_BYTES: usize = 256;
/// Framing of one entry in an AppendEntries (its log id and payload tag), bounded generously.
pub const RAFT_ENTRY_FRAMING_BYTES: usize = 256;
/// The policy records one atomic install carries at most: two versions (the new one and its
/// base) as JSON, whose escaping can grow text up to six times, and the history entries.
pub const POLICY_RECORDS_BYTES_MAX: usize = 2 * 6 * meridian_policy::limits::POLICY_BYTES_MAX + 64 * 1024;

/// The largest single command the node proposes, with values of at most `value_bytes_max`
/// (as `proposer::command_bytes` counts it): a link's merge or a repair scan's batch (each
/// stops growing past [`LINK_BATCH_BYTES_MAX`], by at most one value), a repair fetch (past
/// [`FETCH_BYTES_MAX`]), or a policy install; plus the framing of every record in it.
pub const fn command_bytes_max(value_bytes_max: usize) -> usize {
    let mut payload = LINK_BATCH_BYTES_MAX;
    if FETCH_BYTES_MAX > payload {
        payload = FETCH_BYTES_MAX;
    }
    if POLICY_RECORDS_BYTES_MAX > payload {
        payload = POLICY_RECORDS_BYTES_MAX;
    }
    let mut records = LINK_BATCH_ENTRIES_MAX;
    if FETCH_KEYS_MAX > records {
        records = FETCH_KEYS_MAX;
    }
    let per_record = KEY_BYTES_MAX + DATASET_NAME_BYTES_MAX + ENTRY_OVERHEAD_PER_WRITE_BYTES;
    payload + value_bytes_max + (records + 1) * per_record + ENTRY_OVERHEAD_PER_WRITE_BYTES
}

/// The largest Raft entry: the proposer stops a batch growing once it holds
/// [`BATCH_BYTES_MAX`] (as `proposer::command_bytes` counts), so the last command may take it
/// past by at most one command.
pub const fn entry_bytes_max(value_bytes_max: usize) -> usize {
    BATCH_BYTES_MAX + command_bytes_max(value_bytes_max) + RAFT_ENTRY_FRAMING_BYTES
}
/// The largest entry at the hard value limit.
pub const ENTRY_BYTES_MAX: usize = entry_bytes_max(VALUE_BYTES_HARD_MAX);
/// Most entries in one AppendEntries. Openraft bounds a payload by count only, so the count
/// is what keeps the largest AppendEntries inside [`PEER_BODY_BYTES_MAX`]:
/// [`raft_payload_entries_max`] lowers it for the configured value limit.
pub const RAFT_PAYLOAD_ENTRIES_MAX: u64 = 256;
/// Room kept in a peer body for the AppendEntries framing around its entries.
pub const RAFT_PAYLOAD_FRAMING_BYTES: usize = 64 * 1024;

/// Most entries one AppendEntries may carry so that it always fits a peer body, with values
/// of at most `value_bytes_max` bytes.
pub const fn raft_payload_entries_max(value_bytes_max: usize) -> u64 {
    let fit = ((PEER_BODY_BYTES_MAX - RAFT_PAYLOAD_FRAMING_BYTES) / entry_bytes_max(value_bytes_max)) as u64;
    if fit < RAFT_PAYLOAD_ENTRIES_MAX {
        fit
    } else {
        RAFT_PAYLOAD_ENTRIES_MAX
    }
}

/// How long shutdown waits for the node's tasks before aborting them.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// Most tasks of either kind the supervisor keeps (workers, and short jobs running at once).
pub const SUPERVISED_TASKS_MAX: usize = 8192;

// ---- links ---------------------------------------------------------------------------------

/// How often an idle link looks at the outbox.
pub const LINK_TICK: Duration = Duration::from_millis(50);
/// Most outbox entries in one batch.
pub const LINK_BATCH_ENTRIES_MAX: usize = 256;
/// A batch stops growing past this many bytes of keys and values.
pub const LINK_BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Longest pause after repeated failures (exponential backoff with jitter up to this).
pub const LINK_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most doublings of the link tick in its backoff.
pub const LINK_BACKOFF_DOUBLINGS_MAX: u32 = 8;
/// Objects read per page by catch-up, backfill and digest scans.
pub const SCAN_PAGE: usize = 1024;
/// An idle link tells its destination it is current this often (for bounded-staleness reads).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// Batches one link keeps in flight at once. Departures are spaced by the link's round trip
/// divided by this (but at least [`DEPARTURE_SPACING_MIN`]), so a change waits at most about
/// that long for its batch to leave: about 2.4 ms on a 300 ms round trip. (At 32, that wait
/// was the larger part of the lag excess on long links: p99 14.5 ms at 150 ms one way,
/// against 6.8 ms at 10 ms.)
pub const PIPELINE_MAX: usize = 128;
/// The least time between two departures on one link while batches are in flight. Smaller
/// batches cost bytes: every batch carries its own framing and compresses on its own, and at
/// 128 in flight with no floor the cross-region bytes of `meridian bench bytes` grew by 8%.
pub const DEPARTURE_SPACING_MIN: Duration = Duration::from_millis(2);
/// Key and value bytes one link keeps in flight at most (batches wait beyond it).
pub const PIPELINE_BYTES_MAX: u64 = 32 * 1024 * 1024;
/// How long a destination holds a batch that arrived before the one ahead of it was merged.
pub const ORDER_WAIT_MAX: Duration = Duration::from_secs(2);
/// How often a held batch looks again whether the one ahead of it was queued.
pub const ORDER_POLL: Duration = Duration::from_millis(20);
/// Changes a link remembers having sent ahead of its range (so the range does not send them
/// again); past this, changes behind a waiting one wait too.
pub const EARLY_SENT_MAX: usize = 4096;
/// Longest sleep of a rate-limited scan before it looks at its bucket again.
pub const SCAN_PACE_SLEEP_MAX: Duration = Duration::from_secs(1);

// ---- policy --------------------------------------------------------------------------------

/// How often each region's leader compares its policy copy with the authority's.
pub const POLICY_SYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Most random delay added to each policy sync, so regions do not ask together.
pub const POLICY_SYNC_JITTER_MAX: Duration = Duration::from_millis(500);
/// Most history entries read back (the newest); older ones stay stored.
pub const HISTORY_ENTRIES_MAX: usize = 10_000;
/// Entries per page when the history is read.
pub const HISTORY_PAGE_ENTRIES: usize = 1_000;
/// Pages read at most to find the newest history entries.
pub const HISTORY_PAGES_MAX: usize = 1_000;
/// Parsed policy versions kept in memory per node.
pub const PARSED_VERSIONS_MAX: usize = 64;

// ---- anti-entropy --------------------------------------------------------------------------

/// Buckets per dataset digest.
pub const DIGEST_BUCKETS: usize = 256;
/// Most (key, version) pairs one digest-entries answer carries; a larger difference is
/// repaired over several rounds.
pub const DIGEST_ENTRIES_MAX: u32 = 10_000;
/// Most keys one fetch asks for (and most copies one purge command removes).
pub const FETCH_KEYS_MAX: usize = 256;
/// Value bytes one fetch answer carries at most (past it by one value); the keys past it are
/// fetched next round.
pub const FETCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// How often the anti-entropy worker wakes to see whether the policy entry changed (a purge
/// pass follows a change at once) or a round is due.
pub const ANTI_ENTROPY_TICK: Duration = Duration::from_millis(500);

// ---- the relations the code relies on -----------------------------------------------------

const _: () = {
    // The largest AppendEntries fits a peer body even at the hard value limit: a follower
    // that refused one could never catch up. (`raft_payload_entries_max` picks the count; this
    // checks that at least one entry always fits.)
    assert!(RAFT_PAYLOAD_FRAMING_BYTES + ENTRY_BYTES_MAX <= PEER_BODY_BYTES_MAX);
    // A link batch, a fetch answer and a digest-entries answer fit a peer body.
    assert!(command_bytes_max(VALUE_BYTES_HARD_MAX) <= PEER_BODY_BYTES_MAX);
    assert!(DIGEST_ENTRIES_MAX as usize * (KEY_BYTES_MAX + ENTRY_OVERHEAD_PER_WRITE_BYTES) <= PEER_BODY_BYTES_MAX);
    // Every link of the largest topology can fill its pipeline, and still leave room for
    // other jobs.
    assert!(REGIONS_MAX * (PIPELINE_MAX + 1) < SUPERVISED_TASKS_MAX);
    // The proposer's window is smaller than its queue, and a batch fits in the queue.
    assert!(PROPOSALS_IN_FLIGHT_MAX < PROPOSAL_QUEUE_MAX && BATCH_WRITES_MAX <= PROPOSAL_QUEUE_MAX);
    // A link's in-flight byte bound admits at least one full batch; the early set outlives a
    // window of the outbox.
    assert!(PIPELINE_BYTES_MAX as usize >= LINK_BATCH_BYTES_MAX);
    assert!(EARLY_SENT_MAX >= LINK_BATCH_ENTRIES_MAX);
    // A purge removes at most one fetch's keys, and one batch's worth of them fits a command.
    assert!(FETCH_KEYS_MAX <= LINK_BATCH_ENTRIES_MAX);
    // A forwarded request's retries pause in all for less than its deadline.
    assert!(LEADER_BACKOFF_MAX.as_millis() * (LEADER_ATTEMPTS_MAX as u128) / 2 < REQUEST_TIMEOUT.as_millis());
    assert!(LINK_TICK.as_millis() < LINK_BACKOFF_MAX.as_millis());
    assert!(STATUS_TIMEOUT.as_millis() < REQUEST_TIMEOUT.as_millis());
    // A shutdown waits less for its tasks than a request may take.
    assert!(SHUTDOWN_TIMEOUT.as_millis() <= REQUEST_TIMEOUT.as_millis());
};

/// Check the relations that depend on the configuration, when the node starts.
pub fn check(config: &crate::config::ClusterConfig) -> Result<(), String> {
    let value = config.limits.value_bytes_max;
    if value > VALUE_BYTES_HARD_MAX {
        return Err(format!("limits.value_bytes_max {value} is over the hard limit {VALUE_BYTES_HARD_MAX}"));
    }
    let entries = raft_payload_entries_max(value);
    if entries == 0 {
        return Err(format!("limits.value_bytes_max {value} leaves no room for a Raft entry in a peer body"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_bound_shrinks_with_the_value_limit_and_always_fits_a_peer_body() {
        let default = raft_payload_entries_max(meridian_core::limits::VALUE_BYTES_MAX_DEFAULT);
        let hard = raft_payload_entries_max(VALUE_BYTES_HARD_MAX);
        assert!(hard <= default && default <= RAFT_PAYLOAD_ENTRIES_MAX, "{hard} {default}");
        for value in [1, 1024, 1 << 20, 4 << 20, VALUE_BYTES_HARD_MAX] {
            let n = raft_payload_entries_max(value) as usize;
            assert!(n >= 1);
            assert!(
                n * entry_bytes_max(value) + RAFT_PAYLOAD_FRAMING_BYTES <= PEER_BODY_BYTES_MAX,
                "value limit {value}"
            );
        }
        // The configuration check refuses nothing the hard limit allows.
        assert!(entry_bytes_max(VALUE_BYTES_HARD_MAX) >= command_bytes_max(VALUE_BYTES_HARD_MAX) + BATCH_BYTES_MAX);
    }
}
