//! The operator's command line.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "Snooze operator: scales ScaledServices to zero and back"
)]
pub struct Args {
    /// Namespace of the operator and the activators (the release namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "snooze-system")]
    pub namespace: String,
    /// This pod's name: the leader lease holder identity (unique per replica).
    #[arg(long, env = "POD_NAME", default_value = "snooze-operator")]
    pub pod_name: String,
    /// Name of the leader Lease.
    #[arg(long, env = "SNOOZE_LEASE_NAME", default_value = "snooze-operator")]
    pub lease_name: String,
    /// Lease duration in seconds: a follower takes over this long after the leader's
    /// last renew; the leader steps down after two thirds of it without one.
    #[arg(long, env = "SNOOZE_LEASE_DURATION", default_value_t = 15)]
    pub lease_duration: u64,
    /// The Service that selects the activator pods.
    #[arg(
        long,
        env = "SNOOZE_ACTIVATOR_SERVICE",
        default_value = "snooze-activator"
    )]
    pub activator_service: String,
    /// Name of the activator Service port that serves the stats stream.
    #[arg(
        long,
        env = "SNOOZE_ACTIVATOR_ADMIN_PORT_NAME",
        default_value = "admin"
    )]
    pub activator_admin_port: String,
    /// First and last activator port handed to ScaledService ports.
    #[arg(long, env = "SNOOZE_PORT_RANGE_START", default_value_t = 20000)]
    pub port_range_start: u16,
    #[arg(long, env = "SNOOZE_PORT_RANGE_END", default_value_t = 29999)]
    pub port_range_end: u16,
    /// Most activator ports the ScaledServices of one namespace may hold (one per
    /// Service port), so one team cannot take the whole range.
    #[arg(long, env = "SNOOZE_MAX_PORTS_PER_NAMESPACE", default_value_t = 1000)]
    pub max_ports_per_namespace: usize,
    /// The activators' ceiling on one service's held requests (the chart's
    /// `activator.maxQueuedPerService`): each activator's share of
    /// `maxQueuedRequests` is clamped to it in `status.maxQueuedPerActivator`.
    #[arg(long, env = "SNOOZE_MAX_QUEUED_PER_SERVICE", default_value_t = 5000)]
    pub max_queued_per_service: u32,
    /// Admin server address: /livez, /readyz, /metrics.
    #[arg(long, env = "SNOOZE_ADMIN_ADDRESS", default_value = "0.0.0.0:9091")]
    pub admin_address: SocketAddr,
    /// When set, `/metrics` needs a Bearer token made for this audience (a projected
    /// ServiceAccount token) whose user may `get` the non-resource URL `/metrics`
    /// (TokenReview + SubjectAccessReview). Empty: `/metrics` is open.
    #[arg(long, env = "SNOOZE_METRICS_AUDIENCE", default_value = "")]
    pub metrics_audience: String,
    /// A ServiceAccount token for the activators' stats stream (a projected token with
    /// the activators' audience; read at every connection, as the kubelet rotates it).
    /// Empty: none is sent.
    #[arg(
        long,
        env = "SNOOZE_STATS_TOKEN_FILE",
        default_value = "/var/run/secrets/snooze/stats/token"
    )]
    pub stats_token_file: String,
    /// How long a follower waits after an activator's wake signal before it checks
    /// whether the leader woke the workload, and wakes it itself if not (the backstop
    /// for a leader that crashed; 0 turns the backstop off).
    #[arg(long, env = "SNOOZE_FOLLOWER_WAKE_DELAY_MS", default_value_t = 300)]
    pub follower_wake_delay_ms: u64,
    /// Timeout of every API call.
    #[arg(long, env = "SNOOZE_API_TIMEOUT_SECONDS", default_value_t = 10)]
    pub api_timeout_seconds: u64,
    /// Reconciles run at once, at most (one object is never reconciled twice at once).
    /// Bounded so that thousands of ScaledServices appearing together (an install, a
    /// restart, `kubectl apply` of many) queue instead of sending thousands of API calls
    /// at once: 5,000 at once timed the API calls out and starved the operator's own
    /// liveness probe into a crash loop. Wakes do not wait for it (their own path).
    #[arg(long, env = "SNOOZE_MAX_CONCURRENT_RECONCILES", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_reconciles: u16,
    /// `json` or `text`.
    #[arg(long, env = "SNOOZE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// Instead of running: check that every ready endpoint of these Services (in
    /// `--namespace`) answers `/readyz` on its `admin` port, and exit 0 or 1 (the
    /// chart's `helm test`).
    #[arg(long, value_delimiter = ',')]
    pub check_services: Vec<String>,
}
