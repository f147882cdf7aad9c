//! Prometheus metrics of the activator. Label sets are resolved once per service
//! ([`ServiceMetrics`]), never per request.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub namespace: String,
    pub name: String,
    pub class: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 17,
    ))
}

pub struct Metrics {
    pub registry: Registry,
    tcp_bytes: Family<ByteLabels, Counter>,
    requests: Family<StatusLabels, Counter>,
    latency: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    cold_wait: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    queued: Family<ServiceLabels, Gauge>,
    in_flight: Family<ServiceLabels, Gauge>,
    wakes: Family<ServiceLabels, Counter>,
    asleep_answers: Family<ServiceLabels, Counter>,
    waiting_pages: Family<ServiceLabels, Counter>,
    activation_timeouts: Family<ServiceLabels, Counter>,
    queue_full: Family<ServiceLabels, Counter>,
    pub shed_global: Counter,
    /// Watch errors by watch (`scaledservices`, `endpointslices`): each one is
    /// logged and retried with back-off; the activator keeps serving what it knows.
    pub watch_errors: Family<WatchLabels, Counter>,
    pub resident_memory: Gauge,
    /// Idle upstream connections kept for reuse (set by the pool).
    pub pooled_connections: Gauge,
    /// Requests forwarded by the HTTP/1.1 fast path (the rest go through hyper).
    pub fast_path_requests: Counter,
    /// Client connections open on the data path (under `--max-connections`).
    pub client_connections: Gauge,
    /// Client connections cut because the client stopped reading (`--send-timeout`).
    pub send_timeouts: Counter,
    /// Stats streams open (the operator leader's: one per activator when all is well).
    pub stats_streams: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByteLabels {
    pub namespace: String,
    pub name: String,
    /// `received` (from clients) or `sent` (to clients).
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    pub watch: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("snooze_activator");
        let requests = Family::<StatusLabels, Counter>::default();
        let latency = Family::<ServiceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let cold_wait = Family::<ServiceLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let queued = Family::<ServiceLabels, Gauge>::default();
        let in_flight = Family::<ServiceLabels, Gauge>::default();
        let wakes = Family::<ServiceLabels, Counter>::default();
        let asleep_answers = Family::<ServiceLabels, Counter>::default();
        let waiting_pages = Family::<ServiceLabels, Counter>::default();
        let activation_timeouts = Family::<ServiceLabels, Counter>::default();
        let queue_full = Family::<ServiceLabels, Counter>::default();
        let shed_global = Counter::default();
        let watch_errors = Family::<WatchLabels, Counter>::default();
        // Every watch's series exists from the start (0 until an error), so that a rate
        // over it is 0, not absent.
        for watch in ["scaledservices", "endpointslices"] {
            let _ = watch_errors.get_or_create(&WatchLabels { watch });
        }
        let tcp_bytes = Family::<ByteLabels, Counter>::default();
        registry.register(
            "tcp_bytes",
            "Bytes relayed on TCP ports, by service and direction (TCP ports have no requests)",
            tcp_bytes.clone(),
        );
        let pooled_connections = Gauge::default();
        let fast_path_requests = Counter::default();
        let client_connections = Gauge::default();
        let send_timeouts = Counter::default();
        let stats_streams = Gauge::default();
        registry.register(
            "stats_streams",
            "Stats streams open on the admin port (the operator leader's; more than one means a reader leaked)",
            stats_streams.clone(),
        );
        registry.register(
            "client_connections",
            "Client connections open on the data path (bounded by --max-connections)",
            client_connections.clone(),
        );
        registry.register(
            "send_timeouts",
            "Client connections cut because the client read nothing for --send-timeout",
            send_timeouts.clone(),
        );
        let resident_memory = Gauge::default();
        registry.register(
            "resident_memory_bytes",
            "Resident memory of the activator process (VmRSS), read at each scrape",
            resident_memory.clone(),
        );
        registry.register(
            "fast_path_requests",
            "Requests forwarded by the HTTP/1.1 fast path (the others by hyper)",
            fast_path_requests.clone(),
        );
        registry.register(
            "watch_errors",
            "Errors of the API watches, by watch (logged and retried; never fatal)",
            watch_errors.clone(),
        );
        registry.register(
            "pooled_connections",
            "Idle connections to pods kept for reuse",
            pooled_connections.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by service and status class",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to its response headers",
            latency.clone(),
        );
        registry.register(
            "cold_start_wait_seconds",
            "Time requests waited for a ready pod",
            cold_wait.clone(),
        );
        registry.register(
            "queued_requests",
            "Requests waiting for a pod",
            queued.clone(),
        );
        registry.register(
            "in_flight_requests",
            "Requests being forwarded",
            in_flight.clone(),
        );
        registry.register(
            "wake_signals",
            "Wake signals sent to the operator",
            wakes.clone(),
        );
        registry.register(
            "asleep_answers",
            "Requests answered by the activator itself while no pod was ready (activation.answerWhileAsleep)",
            asleep_answers.clone(),
        );
        registry.register(
            "waiting_pages",
            "Page loads answered with the waiting page after activation.waitingPage.after without a pod",
            waiting_pages.clone(),
        );
        registry.register(
            "activation_timeouts",
            "Requests answered 504 because no pod became ready within activation.timeout",
            activation_timeouts.clone(),
        );
        registry.register(
            "queue_full",
            "Requests refused with 503 because the service's queue (or the activator-wide bound) was full",
            queue_full.clone(),
        );
        registry.register(
            "shed_global_limit",
            "Requests refused because the activator-wide queue bound was reached",
            shed_global.clone(),
        );
        Self {
            registry,
            tcp_bytes,
            requests,
            latency,
            cold_wait,
            queued,
            in_flight,
            wakes,
            asleep_answers,
            waiting_pages,
            activation_timeouts,
            queue_full,
            shed_global,
            watch_errors,
            resident_memory,
            pooled_connections,
            fast_path_requests,
            client_connections,
            send_timeouts,
            stats_streams,
        }
    }

    /// The handles of one service, looked up once.
    pub fn service(&self, namespace: &str, name: &str) -> ServiceMetrics {
        let l = ServiceLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        let class = |class: &'static str| {
            self.requests
                .get_or_create(&StatusLabels {
                    namespace: l.namespace.clone(),
                    name: l.name.clone(),
                    class,
                })
                .clone()
        };
        // A clone of the series, taken inside the closure: `get_or_create`'s guard must
        // be gone before the next one (two live guards on one family deadlock).
        let bytes = |direction: &'static str| {
            self.tcp_bytes
                .get_or_create(&ByteLabels {
                    namespace: l.namespace.clone(),
                    name: l.name.clone(),
                    direction,
                })
                .clone()
        };
        ServiceMetrics {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            latency: self.latency.get_or_create(&l).clone(),
            cold_wait: self.cold_wait.get_or_create(&l).clone(),
            queued: self.queued.get_or_create(&l).clone(),
            in_flight: self.in_flight.get_or_create(&l).clone(),
            wakes: self.wakes.get_or_create(&l).clone(),
            asleep_answers: self.asleep_answers.get_or_create(&l).clone(),
            waiting_pages: self.waiting_pages.get_or_create(&l).clone(),
            activation_timeouts: self.activation_timeouts.get_or_create(&l).clone(),
            queue_full: self.queue_full.get_or_create(&l).clone(),
            tcp_received: bytes("received"),
            tcp_sent: bytes("sent"),
        }
    }

    /// Drops the series of a service that is gone.
    pub fn remove_service(&self, namespace: &str, name: &str) {
        let l = ServiceLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            self.requests.remove(&StatusLabels {
                namespace: l.namespace.clone(),
                name: l.name.clone(),
                class,
            });
        }
        self.latency.remove(&l);
        self.cold_wait.remove(&l);
        self.queued.remove(&l);
        self.in_flight.remove(&l);
        self.wakes.remove(&l);
        self.asleep_answers.remove(&l);
        self.waiting_pages.remove(&l);
        self.activation_timeouts.remove(&l);
        self.queue_full.remove(&l);
        for direction in ["received", "sent"] {
            self.tcp_bytes.remove(&ByteLabels {
                namespace: l.namespace.clone(),
                name: l.name.clone(),
                direction,
            });
        }
    }

    /// Counts one error of the watch `watch`.
    pub fn watch_error(&self, watch: &'static str) {
        self.watch_errors
            .get_or_create(&WatchLabels { watch })
            .inc();
    }

    pub fn encode(&self) -> String {
        if let Some(b) = snooze_runtime::resident_memory_bytes() {
            self.resident_memory.set(b);
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Clone)]
pub struct ServiceMetrics {
    by_class: [Counter; 5],
    pub latency: Histogram,
    pub cold_wait: Histogram,
    pub queued: Gauge,
    pub in_flight: Gauge,
    pub wakes: Counter,
    pub asleep_answers: Counter,
    pub waiting_pages: Counter,
    pub activation_timeouts: Counter,
    pub queue_full: Counter,
    pub tcp_received: Counter,
    pub tcp_sent: Counter,
}

impl ServiceMetrics {
    pub fn response(&self, status: u16) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[i].inc();
    }
}
