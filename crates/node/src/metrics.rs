//! The node's metrics registry. One registry per node, never a global one, so that several
//! nodes in one process (the demo, the simulator) keep their figures apart.
//!
//! Names follow `meridian_<component>_<noun>_<unit>`; counters end in `_total`.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabels {
    pub region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<RouteLabels, Histogram>,
    pub forwarded: Family<KindLabels, Counter>,
    pub peer_errors: Family<KindLabels, Counter>,
    pub hlc_refusals: Counter,
    pub hlc_ahead_ms: Gauge,
    pub region_reachable: Family<RegionLabels, Gauge>,
    pub region_probe_rtt_seconds: Family<RegionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub region_probe_failures: Family<RegionLabels, Counter>,
    pub region_reachability_changes: Family<RegionLabels, Counter>,
    pub raft_term: Gauge,
    pub raft_is_leader: Gauge,
    pub raft_last_log_index: Gauge,
    pub raft_applied_index: Gauge,
    pub raft_log_fsyncs: Counter,
    pub raft_log_entries_written: Counter,
    pub raft_log_acked_at_submit: Counter,
    pub raft_commits_held_back: Counter,
    pub raft_log_compactions: Counter,
    pub policy_epoch: Gauge,
    pub policy_refusals: Family<KindLabels, Counter>,
    pub policy_shadow_reroutes: Counter,
    pub session_forwards: Counter,
    pub chaos_dropped: Family<KindLabels, Counter>,
    pub replication_shipped: Family<LinkLabels, Counter>,
    pub replication_withheld: Family<LinkLabels, Counter>,
    pub replication_refused: Family<LinkLabels, Counter>,
    pub replication_batches: Family<LinkLabels, Counter>,
    pub replication_errors: Family<LinkLabels, Counter>,
    pub replication_lag_changes: Family<LinkLabels, Gauge>,
    pub replication_catch_ups: Family<LinkLabels, Counter>,
    pub replication_backfilled: Family<LinkLabels, Counter>,
    pub replication_shadow: Family<ShadowLabels, Counter>,
    pub anti_entropy_rounds: Family<LinkLabels, Counter>,
    pub anti_entropy_repaired: Family<LinkLabels, Counter>,
    pub purged: Family<DatasetLabels, Counter>,
    pub failover_promotions: Family<DatasetLabels, Counter>,
    pub failover_active: Family<DatasetLabels, Gauge>,
    pub purge_held: Gauge,
    pub conflicts_recorded: Family<ConflictLabels, Gauge>,
    pub conflict_records_held: Gauge,
    pub conflict_records_expired: Gauge,
    pub tombstones_collected: Gauge,
    pub cross_region_bytes: Family<CrossRegionLabels, Counter>,
    pub replication_queued_changes: Family<DatasetLinkLabels, Gauge>,
    pub replication_queued_bytes: Family<DatasetLinkLabels, Gauge>,
    pub replication_lag_seconds: Family<DatasetLinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub replication_deferred: Family<DeferralLabels, Gauge>,
    pub replication_rtt_seconds: Family<LinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub replication_congested: Family<LinkLabels, Gauge>,
    pub replication_apply_lag: Family<LinkLabels, Histogram>,
    pub replication_restarts: Family<LinkLabels, Counter>,
    pub replication_window_full: Family<LinkLabels, Counter>,
    pub replication_order_held: Family<HeldLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeldLabels {
    pub source: String,
    pub destination: String,
    /// `in_order` (the batch ahead arrived in time) or `timed_out`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatasetLinkLabels {
    pub source: String,
    pub destination: String,
    pub dataset: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeferralLabels {
    pub source: String,
    pub destination: String,
    /// `schedule`, `rate` or `congestion`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CrossRegionLabels {
    pub peer_region: String,
    /// `sent` (request bodies) or `received` (reply bodies), from this node's side.
    pub direction: String,
    /// `ship` (link batches), `repair` (catch-up and backfill), `anti_entropy`, `raft`, `other`.
    pub kind: String,
    /// `raw` (encoded message) or `wire` (after compression).
    pub encoding: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShadowLabels {
    pub source: String,
    pub destination: String,
    /// `would_ship` or `would_withhold`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConflictLabels {
    pub dataset: String,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatasetLabels {
    pub dataset: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct LinkLabels {
    pub source: String,
    pub destination: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Register `metric` under `name` and hand it back (registries keep a clone).
fn add<M: prometheus_client::registry::Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("meridian");
        Metrics {
            http_requests: add(&mut r, "http_requests", "HTTP API requests by route, method and status", Family::<HttpLabels, Counter>::default()),
            http_duration: add(&mut r, "http_request_duration_seconds", "HTTP API request latency", Family::<RouteLabels, Histogram>::new_with_constructor(|| { Histogram::new(exponential_buckets(0.000_25, 2.0, 16)) })),
            forwarded: add(&mut r, "gateway_forwarded_requests", "Requests forwarded to the region's leader", Family::<KindLabels, Counter>::default()),
            peer_errors: add(&mut r, "peer_rpc_errors", "Failed node-to-node calls by kind", Family::<KindLabels, Counter>::default()),
            hlc_refusals: add(&mut r, "hlc_refusals", "Timestamps refused because the HLC would run ahead of the wall clock by more than the maximum offset", Counter::default()),
            hlc_ahead_ms: add(&mut r, "hlc_ahead_ms", "How far the newest timestamp this region has applied runs ahead of this node's wall clock, in milliseconds: a clock behind the other regions' shows here, long before writes are refused", Gauge::default()),
            region_reachable: add(&mut r, "region_reachable", "1 while this node's probes find the region up, 0 while down or not yet known (with hysteresis: health.down_after_failures and health.up_after_successes)", Family::<RegionLabels, Gauge>::default()),
            region_probe_rtt_seconds: add(&mut r, "region_probe_rtt_seconds", "Smoothed round-trip time of this node's successful probes of the region", Family::<RegionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default()),
            region_probe_failures: add(&mut r, "region_probe_failures", "Probes of the region that no node of it answered in time", Family::<RegionLabels, Counter>::default()),
            region_reachability_changes: add(&mut r, "region_reachability_changes", "Times this node's verdict on the region changed (unknown, up, down)", Family::<RegionLabels, Counter>::default()),
            raft_term: add(&mut r, "raft_term", "Current Raft term of this node's region group", Gauge::default()),
            raft_is_leader: add(&mut r, "raft_is_leader", "1 when this node leads its region's Raft group", Gauge::default()),
            raft_last_log_index: add(&mut r, "raft_last_log_index", "Index of the last entry in this node's Raft log", Gauge::default()),
            raft_applied_index: add(&mut r, "raft_applied_index", "Index of the last entry applied to the state machine", Gauge::default()),
            raft_log_fsyncs: add(&mut r, "raft_log_fsyncs", "Group commits of the Raft log (one fsync each)", Counter::default()),
            raft_log_entries_written: add(&mut r, "raft_log_entries_written", "Raft log entries made durable", Counter::default()),
            raft_log_acked_at_submit: add(&mut r, "raft_log_acked_at_submit", "Appends of the leader's own entries reported written before their fsync, so that it overlaps replication", Counter::default()),
            raft_commits_held_back: add(&mut r, "raft_commits_held_back", "Messages to followers whose commit was held back to what the leader's log holds durably", Counter::default()),
            raft_log_compactions: add(&mut r, "raft_log_compactions", "Times the Raft log copied its live entries into its other file to drop purged ones", Counter::default()),
            policy_epoch: add(&mut r, "policy_epoch", "Epoch of the policy entry this node's region copy holds as active (0: none)", Gauge::default()),
            policy_refusals: add(&mut r, "policy_refusals", "Client requests refused by the policy, by error code", Family::<KindLabels, Counter>::default()),
            policy_shadow_reroutes: add(&mut r, "policy_shadow_reroutes", "Writes a shadow policy version would have sent to another region than the enforced one did", Counter::default()),
            session_forwards: add(&mut r, "session_forwards", "Session reads this node's copy had not caught up with within the brief wait, sent to another region's copy", Counter::default()),
            chaos_dropped: add(&mut r, "chaos_dropped_messages", "Peer messages dropped by fault injection, by kind (cut, loss, reply)", Family::<KindLabels, Counter>::default()),
            replication_shipped: add(&mut r, "replication_shipped_changes", "Changes a link shipped to its destination", Family::<LinkLabels, Counter>::default()),
            replication_withheld: add(&mut r, "replication_withheld_changes", "Changes a link withheld because the placement does not allow the destination to hold them", Family::<LinkLabels, Counter>::default()),
            replication_refused: add(&mut r, "replication_refused_changes", "Changes a destination refused because its own policy copy forbids holding them", Family::<LinkLabels, Counter>::default()),
            replication_batches: add(&mut r, "replication_batches", "Batches a link sent and had acknowledged", Family::<LinkLabels, Counter>::default()),
            replication_errors: add(&mut r, "replication_errors", "Failed attempts to ship a batch", Family::<LinkLabels, Counter>::default()),
            replication_lag_changes: add(&mut r, "replication_lag_changes", "Local writes not yet acknowledged by the destination (region sequence minus cursor)", Family::<LinkLabels, Gauge>::default()),
            replication_catch_ups: add(&mut r, "replication_catch_ups", "Times a link fell behind the bounded outbox and caught up by a filtered scan of the data", Family::<LinkLabels, Counter>::default()),
            replication_backfilled: add(&mut r, "replication_backfilled_changes", "Changes sent by catch-up scans and by backfills after a policy change made the destination a holder", Family::<LinkLabels, Counter>::default()),
            replication_shadow: add(&mut r, "replication_shadow_changes", "Changes whose link decision a shadow policy version would make differently (would_ship, would_withhold)", Family::<ShadowLabels, Counter>::default()),
            anti_entropy_rounds: add(&mut r, "anti_entropy_rounds", "Digest comparisons of this region (destination) against another (source)", Family::<LinkLabels, Counter>::default()),
            anti_entropy_repaired: add(&mut r, "anti_entropy_repaired_changes", "Copies repaired here (destination) from another region (source) after digests differed", Family::<LinkLabels, Counter>::default()),
            purged: add(&mut r, "replication_purged_copies", "Copies removed because the active policy no longer lets this region hold them", Family::<DatasetLabels, Counter>::default()),
            failover_promotions: add(&mut r, "failover_promotions", "Promotions of this node's region to take a dataset's writes while its homes are unreachable", Family::<DatasetLabels, Counter>::default()),
            failover_active: add(&mut r, "failover_active", "1 while this node's region holds an active promotion for the dataset", Family::<DatasetLabels, Gauge>::default()),
            conflicts_recorded: add(&mut r, "conflicts_recorded", "Conflicts this region has recorded since it began, by dataset and rule (read from the region's replicated conflict log, so every node of a region reports the same)", Family::<ConflictLabels, Gauge>::default()),
            conflict_records_held: add(&mut r, "conflict_records_held", "Conflict records this region holds now", Gauge::default()),
            conflict_records_expired: add(&mut r, "conflict_records_expired", "Conflict records this region's count and age bounds have dropped", Gauge::default()),
            tombstones_collected: add(&mut r, "tombstones_collected", "Tombstones this region has collected, ever (read from the region's replicated state)", Gauge::default()),
            purge_held: add(&mut r, "replication_purge_held_copies", "Copies this region may no longer hold but keeps until a region that may hold them has them", Gauge::default()),
            cross_region_bytes: add(&mut r, "peer_cross_region_bytes", "Message body bytes this node exchanged with nodes of other regions on calls it made, raw and on the wire", Family::<CrossRegionLabels, Counter>::default()),
            replication_queued_changes: add(&mut r, "replication_queued_changes", "Changes of the dataset waiting on the link (schedule, rate limit or congestion), in the window of the outbox the link last read", Family::<DatasetLinkLabels, Gauge>::default()),
            replication_queued_bytes: add(&mut r, "replication_queued_bytes", "Key and value bytes of the changes counted by replication_queued_changes", Family::<DatasetLinkLabels, Gauge>::default()),
            replication_lag_seconds: add(&mut r, "replication_lag_seconds", "Age of the oldest change of the dataset waiting on the link (0 when none waits)", Family::<DatasetLinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default()),
            replication_deferred: add(&mut r, "replication_deferred_changes", "Changes the link holds back this round, by reason (schedule, rate, congestion)", Family::<DeferralLabels, Gauge>::default()),
            replication_rtt_seconds: add(&mut r, "replication_rtt_seconds", "Smoothed round trip of the link's batches (sent to acknowledged)", Family::<LinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default()),
            replication_congested: add(&mut r, "replication_congested", "1 while the link's round trip is degraded and low-priority datasets are deferred", Family::<LinkLabels, Gauge>::default()),
            replication_apply_lag: add(&mut r, "replication_apply_lag_seconds", "At the destination: from the source's stamp on a change to its merge here", Family::<LinkLabels, Histogram>::new_with_constructor(|| { Histogram::new(exponential_buckets(0.001, 2.0, 18)) })),
            replication_restarts: add(&mut r, "replication_pipeline_restarts", "Times a link's pipeline started again from the cursor after a failed batch or a gap at the destination (the batches in flight are sent again)", Family::<LinkLabels, Counter>::default()),
            replication_window_full: add(&mut r, "replication_window_waits", "Times a link had a batch to send but its pipeline was full (batches or bytes in flight at their bound)", Family::<LinkLabels, Counter>::default()),
            replication_order_held: add(&mut r, "replication_order_held_batches", "At the destination: batches that arrived before the one ahead of them was queued and waited for it (timed_out: gave up after the bound and answered with the gap)", Family::<HeldLabels, Counter>::default()),
            // Last: the fields above borrow the registry.
            registry: Mutex::new(r),
        }
    }

    pub fn peer_rpc_errors(&self, kind: &str) {
        self.peer_errors.get_or_create(&KindLabels { kind: kind.to_owned() }).inc();
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("metrics registry lock");
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoding to a String cannot fail");
        out
    }
}
