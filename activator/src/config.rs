//! The activator's command line, and the static service file that replaces the API
//! server in benchmarks and local runs.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use snooze_crds::stats::ServiceRef;
use snooze_runtime::duration;

use crate::dispatch::Route;
use crate::table::{Settings, Table};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Snooze activator: holds requests while a workload sleeps and forwards them once it is awake"
)]
pub struct Args {
    /// Address the service listeners bind (the pod IP in the chart).
    #[arg(long, env = "SNOOZE_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    pub listen_address: IpAddr,
    /// Address of the admin server: /livez, /readyz, /metrics and the stats stream.
    #[arg(long, env = "SNOOZE_ADMIN_ADDRESS", default_value = "0.0.0.0:9090")]
    pub admin_address: SocketAddr,
    /// The one user that may read the stats stream (the operator's ServiceAccount,
    /// `system:serviceaccount:<namespace>:<name>`), checked with a TokenReview of its
    /// Bearer token. Empty: the stream is open (the static-config mode of tests).
    #[arg(long, env = "SNOOZE_STATS_READER", default_value = "")]
    pub stats_reader: String,
    /// The audience the operator's stats token must be made for.
    #[arg(
        long,
        env = "SNOOZE_STATS_AUDIENCE",
        default_value = "snooze-activator"
    )]
    pub stats_audience: String,
    /// When set, `/metrics` needs a Bearer token made for this audience (a projected
    /// ServiceAccount token) whose user may `get` the non-resource URL `/metrics`
    /// (TokenReview + SubjectAccessReview). Empty: `/metrics` is open.
    #[arg(long, env = "SNOOZE_METRICS_AUDIENCE", default_value = "")]
    pub metrics_audience: String,
    /// This pod's name, reported to the operator.
    #[arg(long, env = "POD_NAME", default_value = "activator")]
    pub pod_name: String,
    /// Tokio worker threads; 0 uses one per core. 1 runs everything on one thread
    /// (tokio's current-thread scheduler, about 1 µs less CPU per request than a
    /// multi-thread runtime with one worker).
    #[arg(long, env = "SNOOZE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Most requests held across all services at once.
    #[arg(long, env = "SNOOZE_MAX_QUEUED_TOTAL", default_value_t = 20_000)]
    pub max_queued_total: u64,
    /// Most requests one service may hold on this activator, whatever its
    /// `maxQueuedRequests` share says (0: a quarter of --max-queued-total), so one
    /// service's flood leaves room for the others.
    #[arg(long, env = "SNOOZE_MAX_QUEUED_PER_SERVICE", default_value_t = 0)]
    pub max_queued_per_service: u64,
    /// Clients must send their request headers within this time (e.g. 10s).
    #[arg(long, env = "SNOOZE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// Largest request head in bytes; larger ones get 431.
    #[arg(long, env = "SNOOZE_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Most client connections open at once on the data path; at the limit new ones
    /// wait in the kernel's accept queue. 0: from the open-file limit, leaving room
    /// for a connection to a pod per client connection and for the admin server.
    #[arg(long, env = "SNOOZE_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,
    /// A write to a client that reads nothing for this long cuts its connection.
    #[arg(long, env = "SNOOZE_SEND_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub send_timeout: Duration,
    /// Clients whose X-Forwarded-For and X-Forwarded-Proto are trusted, as CIDRs
    /// (e.g. the ingress controller's pods: 10.42.0.0/16,fd00::/64); anyone else's are
    /// replaced with the address the activator sees and `http`.
    #[arg(long, env = "SNOOZE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Longest wait for a pod's response headers.
    #[arg(long, env = "SNOOZE_RESPONSE_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub response_timeout: Duration,
    /// Timeout of a TCP connect to a pod.
    #[arg(long, env = "SNOOZE_CONNECT_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// After SIGTERM: keep serving (not ready) this long so endpoints move away.
    #[arg(long, env = "SNOOZE_DRAIN_DELAY", default_value = "5s", value_parser = duration)]
    pub drain_delay: Duration,
    /// After the drain delay: wait this long for in-flight requests to finish.
    #[arg(long, env = "SNOOZE_GRACE_PERIOD", default_value = "20s", value_parser = duration)]
    pub grace_period: Duration,
    /// Interval of the stats reports to the operator.
    #[arg(long, env = "SNOOZE_STATS_INTERVAL", default_value = "1s", value_parser = duration)]
    pub stats_interval: Duration,
    /// Serve the services in this JSON file instead of watching the API server
    /// (benchmarks and local runs): {"services": [{"namespace", "name", "port",
    /// "endpoints": ["127.0.0.1:8080"], "timeout": "60s", "maxQueuedRequests": 1000,
    /// "podConcurrency": 0, "h2c": false, "tcp": {"wakeOn": "FirstByte", "activity":
    /// "Traffic"}}]} ("tcp" absent: HTTP).
    #[arg(long, env = "SNOOZE_STATIC_CONFIG")]
    pub static_config: Option<PathBuf>,
    /// `json` or `text`.
    #[arg(long, env = "SNOOZE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Check the new pods of a cold service with the workload's readiness probe
    /// (`status.activationProbe`) instead of waiting for the kubelet to mark one Ready.
    #[arg(long, env = "SNOOZE_ACTIVATION_PROBING", default_value_t = true, action = clap::ArgAction::Set)]
    pub activation_probing: bool,
    /// Keep, per service, who sent the requests that count as activity (client
    /// address, User-Agent, method, path) for `status.activity`; off: nothing of the
    /// clients is kept or reported.
    #[arg(long, env = "SNOOZE_ACTIVITY_SUMMARY", default_value_t = true, action = clap::ArgAction::Set)]
    pub activity_summary: bool,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StaticService {
    namespace: String,
    name: String,
    port: u16,
    #[serde(default)]
    endpoints: Vec<SocketAddr>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    max_queued_requests: Option<u64>,
    #[serde(default)]
    pod_concurrency: Option<usize>,
    #[serde(default)]
    h2c: bool,
    #[serde(default)]
    tcp: Option<snooze_crds::TcpMode>,
}

#[derive(serde::Deserialize)]
struct StaticConfig {
    services: Vec<StaticService>,
}

/// Reads a static service file into the table; returns the route of every port.
pub fn load_static(
    path: &std::path::Path,
    table: &Table,
) -> anyhow::Result<HashMap<u16, Arc<Route>>> {
    let cfg: StaticConfig = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut routes = HashMap::new();
    for s in cfg.services {
        let settings = Settings {
            timeout: match &s.timeout {
                Some(t) => duration(t).map_err(anyhow::Error::msg)?,
                None => Settings::default().timeout,
            },
            max_queued: s.max_queued_requests.unwrap_or(1000),
            pod_concurrency: s.pod_concurrency.unwrap_or(0),
            ..Settings::default()
        };
        let key = ServiceRef {
            namespace: s.namespace,
            name: s.name.clone(),
        };
        let svc = table.upsert(key, &s.name, settings);
        svc.set_endpoints(
            s.endpoints
                .iter()
                .map(|a| (a.ip(), vec![(String::new(), a.port())]))
                .collect(),
        );
        routes.insert(
            s.port,
            Arc::new(Route {
                service: svc,
                port_name: String::new(),
                h2c: s.h2c,
                tcp: s.tcp,
            }),
        );
    }
    Ok(routes)
}

/// The data path's connection cap when none is set: half the open-file limit (a client
/// connection and a connection to a pod each) less 2,048 kept for the admin server,
/// watches and pools; 50,000 when the limit cannot be read.
pub fn default_max_connections(open_files: Option<u64>) -> usize {
    match open_files {
        Some(n) => usize::try_from(n.saturating_sub(2048) / 2)
            .unwrap_or(usize::MAX)
            .max(64),
        None => 50_000,
    }
}

/// The soft open-file limit of this process (`/proc/self/limits`).
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
