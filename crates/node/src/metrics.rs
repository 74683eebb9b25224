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
    pub raft_term: Gauge,
    pub raft_is_leader: Gauge,
    pub raft_last_log_index: Gauge,
    pub raft_applied_index: Gauge,
    pub raft_log_fsyncs: Counter,
    pub raft_log_entries_written: Counter,
    pub policy_epoch: Gauge,
    pub policy_refusals: Family<KindLabels, Counter>,
    pub policy_shadow_reroutes: Counter,
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
    pub purge_held: Gauge,
    pub cross_region_bytes: Family<CrossRegionLabels, Counter>,
    pub replication_queued_changes: Family<DatasetLinkLabels, Gauge>,
    pub replication_queued_bytes: Family<DatasetLinkLabels, Gauge>,
    pub replication_lag_seconds: Family<DatasetLinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub replication_deferred: Family<DeferralLabels, Gauge>,
    pub replication_rtt_seconds: Family<LinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub replication_congested: Family<LinkLabels, Gauge>,
    pub replication_apply_lag: Family<LinkLabels, Histogram>,
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

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("meridian");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register("http_requests", "HTTP API requests by route, method and status", http_requests.clone());
        let http_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
        });
        registry.register("http_request_duration_seconds", "HTTP API request latency", http_duration.clone());
        let forwarded = Family::<KindLabels, Counter>::default();
        registry.register("gateway_forwarded_requests", "Requests forwarded to the region's leader", forwarded.clone());
        let peer_errors = Family::<KindLabels, Counter>::default();
        registry.register("peer_rpc_errors", "Failed node-to-node calls by kind", peer_errors.clone());
        let hlc_refusals = Counter::default();
        registry.register(
            "hlc_refusals",
            "Timestamps refused because the HLC would run ahead of the wall clock by more than the maximum offset",
            hlc_refusals.clone(),
        );
        let raft_term = Gauge::default();
        registry.register("raft_term", "Current Raft term of this node's region group", raft_term.clone());
        let raft_is_leader = Gauge::default();
        registry.register("raft_is_leader", "1 when this node leads its region's Raft group", raft_is_leader.clone());
        let raft_last_log_index = Gauge::default();
        registry.register(
            "raft_last_log_index",
            "Index of the last entry in this node's Raft log",
            raft_last_log_index.clone(),
        );
        let raft_applied_index = Gauge::default();
        registry.register(
            "raft_applied_index",
            "Index of the last entry applied to the state machine",
            raft_applied_index.clone(),
        );
        let raft_log_fsyncs = Counter::default();
        registry.register("raft_log_fsyncs", "Group commits of the Raft log (one fsync each)", raft_log_fsyncs.clone());
        let raft_log_entries_written = Counter::default();
        registry.register(
            "raft_log_entries_written",
            "Raft log entries made durable",
            raft_log_entries_written.clone(),
        );
        let policy_epoch = Gauge::default();
        registry.register(
            "policy_epoch",
            "Epoch of the policy entry this node's region copy holds as active (0: none)",
            policy_epoch.clone(),
        );
        let policy_refusals = Family::<KindLabels, Counter>::default();
        registry.register(
            "policy_refusals",
            "Client requests refused by the policy, by error code",
            policy_refusals.clone(),
        );
        let policy_shadow_reroutes = Counter::default();
        registry.register(
            "policy_shadow_reroutes",
            "Writes a shadow policy version would have sent to another region than the enforced one did",
            policy_shadow_reroutes.clone(),
        );
        let chaos_dropped = Family::<KindLabels, Counter>::default();
        registry.register(
            "chaos_dropped_messages",
            "Peer messages dropped by fault injection, by kind (cut, loss, reply)",
            chaos_dropped.clone(),
        );
        let replication_shipped = Family::<LinkLabels, Counter>::default();
        registry.register(
            "replication_shipped_changes",
            "Changes a link shipped to its destination",
            replication_shipped.clone(),
        );
        let replication_withheld = Family::<LinkLabels, Counter>::default();
        registry.register(
            "replication_withheld_changes",
            "Changes a link withheld because the placement does not allow the destination to hold them",
            replication_withheld.clone(),
        );
        let replication_refused = Family::<LinkLabels, Counter>::default();
        registry.register(
            "replication_refused_changes",
            "Changes a destination refused because its own policy copy forbids holding them",
            replication_refused.clone(),
        );
        let replication_batches = Family::<LinkLabels, Counter>::default();
        registry.register(
            "replication_batches",
            "Batches a link sent and had acknowledged",
            replication_batches.clone(),
        );
        let replication_errors = Family::<LinkLabels, Counter>::default();
        registry.register("replication_errors", "Failed attempts to ship a batch", replication_errors.clone());
        let replication_lag_changes = Family::<LinkLabels, Gauge>::default();
        registry.register(
            "replication_lag_changes",
            "Local writes not yet acknowledged by the destination (region sequence minus cursor)",
            replication_lag_changes.clone(),
        );
        let replication_catch_ups = Family::<LinkLabels, Counter>::default();
        registry.register(
            "replication_catch_ups",
            "Times a link fell behind the bounded outbox and caught up by a filtered scan of the data",
            replication_catch_ups.clone(),
        );
        let replication_backfilled = Family::<LinkLabels, Counter>::default();
        registry.register(
            "replication_backfilled_changes",
            "Changes sent by catch-up scans and by backfills after a policy change made the destination a holder",
            replication_backfilled.clone(),
        );
        let replication_shadow = Family::<ShadowLabels, Counter>::default();
        registry.register(
            "replication_shadow_changes",
            "Changes whose link decision a shadow policy version would make differently (would_ship, would_withhold)",
            replication_shadow.clone(),
        );
        let anti_entropy_rounds = Family::<LinkLabels, Counter>::default();
        registry.register(
            "anti_entropy_rounds",
            "Digest comparisons of this region (destination) against another (source)",
            anti_entropy_rounds.clone(),
        );
        let anti_entropy_repaired = Family::<LinkLabels, Counter>::default();
        registry.register(
            "anti_entropy_repaired_changes",
            "Copies repaired here (destination) from another region (source) after digests differed",
            anti_entropy_repaired.clone(),
        );
        let purged = Family::<DatasetLabels, Counter>::default();
        registry.register(
            "replication_purged_copies",
            "Copies removed because the active policy no longer lets this region hold them",
            purged.clone(),
        );
        let purge_held = Gauge::default();
        registry.register(
            "replication_purge_held_copies",
            "Copies this region may no longer hold but keeps until a region that may hold them has them",
            purge_held.clone(),
        );
        let cross_region_bytes = Family::<CrossRegionLabels, Counter>::default();
        registry.register(
            "peer_cross_region_bytes",
            "Message body bytes this node exchanged with nodes of other regions on calls it made, raw and on the wire",
            cross_region_bytes.clone(),
        );
        let replication_queued_changes = Family::<DatasetLinkLabels, Gauge>::default();
        registry.register(
            "replication_queued_changes",
            "Changes of the dataset waiting on the link (schedule, rate limit or congestion), in the window of the outbox the link last read",
            replication_queued_changes.clone(),
        );
        let replication_queued_bytes = Family::<DatasetLinkLabels, Gauge>::default();
        registry.register(
            "replication_queued_bytes",
            "Key and value bytes of the changes counted by replication_queued_changes",
            replication_queued_bytes.clone(),
        );
        let replication_lag_seconds = Family::<DatasetLinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "replication_lag_seconds",
            "Age of the oldest change of the dataset waiting on the link (0 when none waits)",
            replication_lag_seconds.clone(),
        );
        let replication_deferred = Family::<DeferralLabels, Gauge>::default();
        registry.register(
            "replication_deferred_changes",
            "Changes the link holds back this round, by reason (schedule, rate, congestion)",
            replication_deferred.clone(),
        );
        let replication_rtt_seconds = Family::<LinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "replication_rtt_seconds",
            "Smoothed round trip of the link's batches (sent to acknowledged)",
            replication_rtt_seconds.clone(),
        );
        let replication_congested = Family::<LinkLabels, Gauge>::default();
        registry.register(
            "replication_congested",
            "1 while the link's round trip is degraded and low-priority datasets are deferred",
            replication_congested.clone(),
        );
        let replication_apply_lag = Family::<LinkLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 18))
        });
        registry.register(
            "replication_apply_lag_seconds",
            "At the destination: from the source's stamp on a change to its merge here",
            replication_apply_lag.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            replication_queued_changes,
            replication_queued_bytes,
            replication_lag_seconds,
            replication_deferred,
            replication_rtt_seconds,
            replication_congested,
            replication_apply_lag,
            cross_region_bytes,
            replication_catch_ups,
            replication_backfilled,
            replication_shadow,
            anti_entropy_rounds,
            anti_entropy_repaired,
            purged,
            purge_held,
            replication_shipped,
            replication_withheld,
            replication_refused,
            replication_batches,
            replication_errors,
            replication_lag_changes,
            chaos_dropped,
            policy_epoch,
            policy_refusals,
            policy_shadow_reroutes,
            http_requests,
            http_duration,
            forwarded,
            peer_errors,
            hlc_refusals,
            raft_term,
            raft_is_leader,
            raft_last_log_index,
            raft_applied_index,
            raft_log_fsyncs,
            raft_log_entries_written,
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
