//! Prometheus metrics of the operator.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    pub watch: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadLabels {
    pub what: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub name: String,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub scale_actions: Family<ScaleLabels, Counter>,
    pub desired_replicas: Family<ServiceLabels, Gauge>,
    pub replicas: Family<ServiceLabels, Gauge>,
    pub ready_replicas: Family<ServiceLabels, Gauge>,
    pub wakes: Family<ServiceLabels, Counter>,
    pub resident_memory: Gauge,
    pub api_writes: Counter,
    pub leader: Gauge,
    pub leader_transitions: Counter,
    pub watch_errors: Family<WatchLabels, Counter>,
    pub stats_streams: Gauge,
    pub wake_to_patch: Histogram,
    /// Replica writes refused because the workload changed since it was read (each
    /// re-read and decided again).
    pub scale_conflicts: Counter,
    /// Autoscaler ticks that could not act on a service (discovery or a replica write
    /// failed; logged, tried again at the next tick).
    pub tick_errors: Counter,
    /// Tasks alive in the process's runtime, read at each scrape (a leadership term
    /// that leaves one behind shows here).
    pub tasks: Gauge,
    /// Wake signals a follower took as the leader's backstop, by outcome.
    pub follower_wakes: Family<OutcomeLabels, Counter>,
    /// API reads (GET or LIST) made by reconciles and the tick, by what was read: each
    /// one something the caches could not answer.
    pub api_reads: Family<ReadLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("snooze_operator");
        let m = Self {
            registry: Registry::default(),
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            scale_actions: Family::default(),
            desired_replicas: Family::default(),
            replicas: Family::default(),
            ready_replicas: Family::default(),
            wakes: Family::default(),
            resident_memory: Gauge::default(),
            api_writes: Counter::default(),
            leader: Gauge::default(),
            leader_transitions: Counter::default(),
            watch_errors: Family::default(),
            stats_streams: Gauge::default(),
            wake_to_patch: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            scale_conflicts: Counter::default(),
            tick_errors: Counter::default(),
            tasks: Gauge::default(),
            follower_wakes: Family::default(),
            api_reads: Family::default(),
        };
        registry.register(
            "api_reads",
            "API reads (GET or LIST) by reconciles, by what was read: what the caches could not answer (not synced yet, or an object not cached), pods after a failed wake, routes every 5 minutes",
            m.api_reads.clone(),
        );
        registry.register(
            "follower_wakes",
            "Wake signals a follower checked after its delay, by outcome: woken (still at zero, so the follower woke it), awake (the leader had), skipped (paused, deleted, not scalable, or another ScaledService's workload), failed",
            m.follower_wakes.clone(),
        );
        for outcome in ["woken", "awake", "skipped", "failed"] {
            let _ = m.follower_wakes.get_or_create(&OutcomeLabels { outcome });
        }
        registry.register(
            "tasks",
            "Tasks alive in the operator's async runtime, read at each scrape",
            m.tasks.clone(),
        );
        registry.register(
            "tick_errors",
            "Autoscaler actions that failed (discovery or a replica write), tried again at the next tick",
            m.tick_errors.clone(),
        );
        registry.register(
            "scale_conflicts",
            "Replica writes refused because the workload changed since it was read (decided again)",
            m.scale_conflicts.clone(),
        );
        registry.register("reconciles", "Reconciliations run", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by error",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "scale_actions",
            "Scale patches written, by reason",
            m.scale_actions.clone(),
        );
        registry.register(
            "desired_replicas",
            "Replicas the operator wants, per ScaledService",
            m.desired_replicas.clone(),
        );
        registry.register(
            "replicas",
            "Replicas of the scaled workload (its /scale spec), per ScaledService",
            m.replicas.clone(),
        );
        registry.register(
            "ready_replicas",
            "Ready endpoints of the workload's Service, per ScaledService",
            m.ready_replicas.clone(),
        );
        registry.register(
            "wakes",
            "Cold starts: scale patches from zero made for a request, per ScaledService",
            m.wakes.clone(),
        );
        registry.register(
            "resident_memory_bytes",
            "Resident memory of the operator process (VmRSS), read at each scrape",
            m.resident_memory.clone(),
        );
        registry.register(
            "api_writes",
            "Writes sent to the API server (apply, patch, delete)",
            m.api_writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            m.leader.clone(),
        );
        registry.register(
            "leader_transitions",
            "Times this replica became or stopped being the leader",
            m.leader_transitions.clone(),
        );
        registry.register(
            "watch_errors",
            "Errors of the API watches, by watch (logged and retried; never fatal)",
            m.watch_errors.clone(),
        );
        registry.register_with_unit(
            "wake_to_patch",
            "From an activator's wake signal arriving to the scale patch written",
            prometheus_client::registry::Unit::Seconds,
            m.wake_to_patch.clone(),
        );
        registry.register(
            "stats_streams",
            "Open stats streams to activators",
            m.stats_streams.clone(),
        );
        // Every watch's series exists from the start (0 until an error).
        for watch in [
            "activator-endpointslices",
            "backend-endpointslices",
            "services",
            "controller",
        ] {
            let _ = m.watch_errors.get_or_create(&WatchLabels { watch });
        }
        Self { registry, ..m }
    }

    /// Forgets a deleted ScaledService's series.
    pub fn remove_service(&self, l: &ServiceLabels) {
        self.desired_replicas.remove(l);
        self.replicas.remove(l);
        self.ready_replicas.remove(l);
        self.wakes.remove(l);
    }

    /// Counts one error of the watch `watch`.
    pub fn read(&self, what: &'static str) {
        self.api_reads.get_or_create(&ReadLabels { what }).inc();
    }

    pub fn watch_error(&self, watch: &'static str) {
        self.watch_errors
            .get_or_create(&WatchLabels { watch })
            .inc();
    }

    pub fn encode(&self) -> String {
        if let Some(b) = snooze_runtime::resident_memory_bytes() {
            self.resident_memory.set(b);
        }
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            self.tasks.set(h.metrics().num_alive_tasks() as i64);
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
