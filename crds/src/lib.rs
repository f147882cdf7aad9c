//! The `ScaledService` custom resource: the one API object users write.
//!
//! These Rust types are the single source of truth. The CRD YAML in `crds/` and in the
//! Helm chart is generated from them (`cargo run -p snooze-crds --bin crdgen -- --write`),
//! doc comments become `kubectl explain` text, and the CEL rules below are enforced by
//! the API server at apply time.

use std::time::Duration as StdDuration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "snooze.dev";
pub const VERSION: &str = "v1alpha1";
/// Finalizer that restores the workload's replicas when a ScaledService is deleted.
pub const FINALIZER: &str = "snooze.dev/restore-replicas";
/// Label on the objects the operator manages, naming the ScaledService.
pub const LABEL_SCALED_SERVICE: &str = "snooze.dev/scaled-service";
/// Field manager (server-side apply) and `endpointslice.kubernetes.io/managed-by` value.
pub const MANAGER: &str = "operator.snooze.dev";

/// A Go-style duration string, as Kubernetes writes them: `30s`, `5m`, `1h30m`, `250ms`.
/// The CEL rules on durations first check the same pattern (written out in each rule),
/// so an invalid string gets the pattern's message alone, not a second "type conversion
/// error" from `duration()`.
const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// Scale a workload to zero when nobody uses it, and back up on the first request.
///
/// The operator creates a Service named `<name>-snooze` (see `status.serviceName`) whose
/// endpoints are the Snooze activators; point your ingress at it. The activator holds
/// requests while the workload is at zero and forwards them to its ready pods.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "snooze.dev",
    version = "v1alpha1",
    kind = "ScaledService",
    namespaced,
    shortname = "ssvc",
    status = "ScaledServiceStatus",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.scaleTargetRef.name"}"#,
    printcolumn = r#"{"name":"Min","type":"integer","jsonPath":".spec.minReplicas"}"#,
    printcolumn = r#"{"name":"Max","type":"integer","jsonPath":".spec.maxReplicas"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".status.conditions[?(@.type==\"Active\")].status"}"#,
    printcolumn = r#"{"name":"Last Request","type":"date","jsonPath":".status.lastRequestTime"}"#,
    printcolumn = r#"{"name":"Needed By","type":"string","jsonPath":".status.neededBy"}"#,
    printcolumn = r#"{"name":"Sleeps At","type":"string","jsonPath":".status.sleepsAt"}"#,
    printcolumn = r#"{"name":"Awake Because","type":"string","priority":1,"jsonPath":".status.awakeBecause"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
// The client-side validator (`validate_cel`) only for the unit tests: the `cel` feature
// (a CEL interpreter) stays out of the binaries (`kube/cel` is a dev-dependency).
#[cfg_attr(test, x_kube(cel))]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must be less than or equal to maxReplicas").field_path(".minReplicas"))]
#[serde(rename_all = "camelCase")]
pub struct ScaledServiceSpec {
    /// The workload to scale: any object with a `/scale` subresource in this namespace
    /// (a Deployment first of all).
    pub scale_target_ref: ScaleTargetRef,

    /// Name of the existing Service, in this namespace, that selects the workload's pods.
    /// Every port of it is served through the activator.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,

    /// Fewest replicas. 0 (the default) lets the workload sleep when idle.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10000))]
    pub min_replicas: i32,

    /// Most replicas the autoscaler may set.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_replicas: i32,

    /// How long without any request (and nothing in flight) before the workload is
    /// scaled to `minReplicas`, zero included. Go duration syntax: `30s`, `5m`, `1h`.
    #[serde(default = "default_idle_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new(concat!(r#"!self.matches('^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || "#, "duration(self) >= duration('1s')")).message("idleTimeout must be a duration of at least 1s, such as 30s or 5m"))]
    pub idle_timeout: Duration,

    /// How the activator holds requests while no pod is ready.
    #[serde(default)]
    pub activation: ActivationSpec,

    /// Request-driven scaling between 1 and `maxReplicas`.
    #[serde(default)]
    pub scaling: ScalingPolicy,

    /// Windows with a raised floor of replicas (a warm pool before predictable load).
    /// Outside them the normal policy applies, zero included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub schedules: Vec<Schedule>,

    /// Type of the managed Service (`<name>-snooze`): `ClusterIP` (the default) for an
    /// ingress controller, a Gateway or in-cluster clients; `NodePort` or `LoadBalancer`
    /// when a load balancer sends traffic to the nodes. Node ports are allocated by the
    /// API server and shown on the Service.
    #[serde(default, skip_serializing_if = "ServiceType::is_default")]
    pub service_type: ServiceType,

    /// How ports of the backend Service are served, by port name (its number for an
    /// unnamed port). A port not listed is HTTP (HTTP/1.x, h2c, gRPC, WebSocket) unless
    /// its `appProtocol` names another protocol (`redis`, `postgresql`, `https`, ...):
    /// then it is TCP with the defaults below.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    #[x_kube(validation = Rule::new("self.all(p, self.exists_one(q, q.name == p.name))").message("ports[].name must be unique"))]
    pub ports: Vec<PortSpec>,

    /// Other ScaledServices of this namespace this one needs (a database, a cache, a
    /// worker): waking this one wakes them at the same moment, and none of them sleeps
    /// while this one is awake. Followed transitively; a cycle or a missing name is
    /// reported in the `Needs` condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 20),
        inner(
            length(min = 1, max = 253),
            regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
        )
    )]
    pub needs: Vec<String>,
}

/// How one port of the backend Service is served.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("self.protocol == 'TCP' || (!has(self.wakeOn) && !has(self.activity))").message("ports[].wakeOn and ports[].activity apply to protocol TCP only"))]
#[serde(rename_all = "camelCase")]
pub struct PortSpec {
    /// Name of the backend Service port, or its number for an unnamed port.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// `HTTP` (requests: held, counted, answered) or `TCP` (a byte stream: the
    /// connection is held until a pod is ready, then joined to it byte for byte).
    pub protocol: PortProtocol,
    /// TCP: what wakes the workload. `FirstByte` (the default): the client's first
    /// byte, so a connect-and-close health check wakes nothing. `Connect`: the
    /// connection itself, for protocols whose server speaks first (MySQL, SMTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_on: Option<WakeOn>,
    /// TCP: what keeps the workload awake. `Traffic` (the default): bytes in either
    /// direction; idle time runs from the last byte, so a connection pool's silent
    /// connections do not hold it awake (they are closed when it sleeps).
    /// `Connections`: any open connection, for protocols with long silent sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<TcpActivity>,
}

#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortProtocol {
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum WakeOn {
    #[default]
    FirstByte,
    Connect,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum TcpActivity {
    #[default]
    Traffic,
    Connections,
}

/// `appProtocol` values served as HTTP; any other value makes a port TCP. Unset is HTTP.
pub const HTTP_APP_PROTOCOLS: &[&str] = &[
    "http",
    "kubernetes.io/h2c",
    "kubernetes.io/ws",
    "h2c",
    "http2",
    "grpc",
    "grpc-web",
];

/// How a port is served, from the ScaledService's `ports` entry for it (by name or
/// number) or else from its `appProtocol`: `None` for HTTP.
pub fn tcp_mode(ports: &[PortSpec], port_id: &str, app_protocol: Option<&str>) -> Option<TcpMode> {
    match ports.iter().find(|p| p.name == port_id) {
        Some(p) if p.protocol == PortProtocol::Http => None,
        Some(p) => Some(TcpMode {
            wake_on: p.wake_on.unwrap_or_default(),
            activity: p.activity.unwrap_or_default(),
        }),
        None => app_protocol
            .filter(|a| !HTTP_APP_PROTOCOLS.iter().any(|h| h.eq_ignore_ascii_case(a)))
            .map(|_| TcpMode::default()),
    }
}

/// The Kubernetes Service types the managed Service can have (not `ExternalName`: it
/// has no endpoints).
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    fn is_default(&self) -> bool {
        *self == ServiceType::ClusterIP
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

fn default_max_replicas() -> i32 {
    1
}
fn default_idle_timeout() -> Duration {
    StdDuration::from_secs(300).into()
}

/// Reference to the scaled workload.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct ScaleTargetRef {
    /// API version of the workload, `apps/v1` by default.
    #[serde(default = "default_api_version")]
    pub api_version: String,
    /// Kind of the workload, `Deployment` by default.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Name of the workload.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn default_api_version() -> String {
    "apps/v1".into()
}
fn default_kind() -> String {
    "Deployment".into()
}

/// What the activator does with requests that find no ready pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ActivationSpec {
    /// Longest a request waits for a ready pod; past it the client gets 504.
    #[serde(default = "default_activation_timeout")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new(concat!(r#"!self.matches('^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || "#, "(duration(self) >= duration('1s') && duration(self) <= duration('1h'))")).message("activation.timeout must be between 1s and 1h"))]
    pub timeout: Duration,

    /// Most requests held for this service at once, across all activators (each holds
    /// its share, `status.maxQueuedPerActivator`); more get 503 with `Retry-After` at
    /// once.
    #[serde(default = "default_max_queued")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_queued_requests: u32,

    /// Most requests in flight to one pod; 0 means no limit. Requests over the limit
    /// wait in the same queue as cold requests.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000))]
    pub pod_concurrency: u32,

    /// How the activator checks itself that a new pod can serve, so that held requests
    /// go to it as soon as it answers instead of after the kubelet's next readiness
    /// probe (Kubernetes probes every 10 s by default). Unset: the readiness probe of
    /// the workload's pod template (HTTP GET, TCP socket or gRPC); with an exec probe
    /// or none, held requests wait for the kubelet (see `status.activationProbe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<ActivationProbe>,

    /// Requests the activator answers itself while no pod is ready (the health checks
    /// of load balancers, ingress controllers and uptime monitors): they never wake
    /// the workload. While a pod is ready they are forwarded to it. Either way they
    /// never count as activity, so they neither keep the workload awake nor reset its
    /// idle clock.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub answer_while_asleep: Vec<AsleepAnswer>,

    /// A page for browsers (opt-in): a page load (a GET that accepts `text/html`, not a
    /// script's `fetch`) still waiting for a pod after `after` gets a small HTML page,
    /// 503 with `Retry-After`, that reloads itself every two seconds until a pod
    /// answers. Other requests keep being held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_page: Option<WaitingPage>,
}

/// The page a browser is shown while the workload starts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WaitingPage {
    /// How long a page load is held before it gets the page (a fast start shows no
    /// page at all).
    #[serde(default = "default_waiting_page_after")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new(concat!(r#"!self.matches('^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || "#, "(duration(self) >= duration('0s') && duration(self) <= duration('1m'))")).message("activation.waitingPage.after must be between 0s and 1m"))]
    pub after: Duration,
    /// The page's title and heading.
    #[serde(default = "default_waiting_page_title")]
    #[schemars(length(max = 200))]
    pub title: String,
    /// The text under the heading (plain text: it is escaped).
    #[serde(default = "default_waiting_page_message")]
    #[schemars(length(max = 2000))]
    pub message: String,
}

fn default_waiting_page_after() -> Duration {
    StdDuration::from_secs(1).into()
}
fn default_waiting_page_title() -> String {
    "Starting up".into()
}
fn default_waiting_page_message() -> String {
    "This service was asleep and is starting. The page reloads by itself when it is ready.".into()
}

impl WaitingPage {
    pub fn after(&self) -> StdDuration {
        self.after.into()
    }
}

impl Default for ActivationSpec {
    fn default() -> Self {
        Self {
            timeout: default_activation_timeout(),
            max_queued_requests: default_max_queued(),
            pod_concurrency: 0,
            probe: None,
            answer_while_asleep: Vec::new(),
            waiting_page: None,
        }
    }
}

/// One request the activator answers while the workload sleeps.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AsleepAnswer {
    /// The request path, matched exactly; the query string is ignored (`/healthz`
    /// matches `/healthz?full=1`).
    #[schemars(regex(pattern = r"^/[^?#\s]*$"), length(min = 1, max = 1024))]
    pub path: String,
    /// The request method to match (`GET`, `HEAD`, ...); unset: any method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Z]+$"), length(min = 1, max = 16))]
    pub method: Option<String>,
    /// The status code of the answer.
    #[serde(default = "default_answer_status")]
    #[schemars(range(min = 200, max = 599))]
    pub status: u16,
    /// The body of the answer (`text/plain`); unset: empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub body: Option<String>,
}

fn default_answer_status() -> u16 {
    200
}

impl AsleepAnswer {
    /// Whether this entry answers a request with `method` and `path` (the request
    /// target's path, without the query).
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.path == path && self.method.as_deref().is_none_or(|m| m == method)
    }
}

/// One check of a pod, the way a readiness probe does it: exactly one of `httpGet`,
/// `tcpSocket` and `grpc`. Ports are numbers (the operator resolves a named port of
/// the pod template).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[x_kube(validation = Rule::new("(has(self.httpGet) ? 1 : 0) + (has(self.tcpSocket) ? 1 : 0) + (has(self.grpc) ? 1 : 0) == 1").message("activation.probe needs exactly one of httpGet, tcpSocket and grpc"))]
#[serde(rename_all = "camelCase")]
pub struct ActivationProbe {
    /// Ready when a GET answers 200–399.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetProbe>,
    /// Ready when a TCP connection is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpProbe>,
    /// Ready when `grpc.health.v1.Health/Check` answers SERVING.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcProbe>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpGetProbe {
    /// Path of the request, for example `/ready`.
    #[serde(default = "default_probe_path")]
    #[schemars(length(max = 2048))]
    pub path: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// `HTTP` or `HTTPS` (HTTPS is not checked by the activator: held requests wait for
    /// the kubelet).
    #[serde(default = "default_probe_scheme")]
    pub scheme: String,
    /// Extra request headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<ProbeHeader>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProbeHeader {
    pub name: String,
    pub value: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TcpProbe {
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GrpcProbe {
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The service name sent in the health check (empty: the server as a whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

fn default_probe_path() -> String {
    "/".into()
}
fn default_probe_scheme() -> String {
    "HTTP".into()
}

fn default_activation_timeout() -> Duration {
    StdDuration::from_secs(60).into()
}
fn default_max_queued() -> u32 {
    1000
}

/// The load signal the autoscaler follows.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum ScalingMetric {
    /// Requests in flight per replica.
    #[default]
    #[serde(rename = "concurrency")]
    Concurrency,
    /// Requests per second per replica.
    #[serde(rename = "rps")]
    Rps,
}

/// How replicas follow the load between 1 and `maxReplicas`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new(concat!(r#"!self.panicWindow.matches('^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || !self.stableWindow.matches('^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || "#, "duration(self.panicWindow) <= duration(self.stableWindow)")).message("scaling.panicWindow must not be longer than scaling.stableWindow"))]
#[serde(rename_all = "camelCase")]
pub struct ScalingPolicy {
    /// `concurrency` (in-flight requests per replica) or `rps` (requests per second per
    /// replica).
    #[serde(default)]
    pub metric: ScalingMetric,
    /// Target value of the metric per replica.
    #[serde(default = "default_target")]
    #[schemars(range(min = 1, max = 1000000))]
    pub target: u32,
    /// Replicas to start when a request wakes the workload from zero (at least
    /// `minReplicas`, at most `maxReplicas`).
    #[serde(default = "default_wake_replicas")]
    #[schemars(range(min = 1, max = 10000))]
    pub wake_replicas: i32,
    /// The load is averaged over this window to decide the replicas.
    #[serde(default = "default_stable_window")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new(concat!(r#"!self.matches('^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || "#, "(duration(self) >= duration('6s') && duration(self) <= duration('1h'))")).message("scaling.stableWindow must be between 6s and 1h"))]
    pub stable_window: Duration,
    /// A short window that reacts to bursts; while it needs `panicThreshold` times the
    /// ready replicas, the workload scales up at once and never down.
    #[serde(default = "default_panic_window")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new(concat!(r#"!self.matches('^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || "#, "duration(self) >= duration('1s')")).message("scaling.panicWindow must be at least 1s"))]
    pub panic_window: Duration,
    /// Panic when the panic-window load needs this many times the ready replicas
    /// (percent: 200 means twice).
    #[serde(default = "default_panic_threshold")]
    #[schemars(range(min = 110, max = 1000))]
    pub panic_threshold_percent: u32,
    /// Most replicas after one scale-up, as a factor of the current ones (×100: 200
    /// means at most double).
    #[serde(default = "default_max_scale_up_rate")]
    #[schemars(range(min = 110, max = 100000))]
    pub max_scale_up_rate_percent: u32,
    /// Cooldown: no scale-down until this long after the last change.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub scale_down_delay: Duration,
    /// Most replicas removed in one step.
    #[serde(default = "default_max_scale_down_step")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_scale_down_step: i32,
}

impl Default for ScalingPolicy {
    fn default() -> Self {
        Self {
            metric: ScalingMetric::Concurrency,
            target: default_target(),
            wake_replicas: default_wake_replicas(),
            stable_window: default_stable_window(),
            panic_window: default_panic_window(),
            panic_threshold_percent: default_panic_threshold(),
            max_scale_up_rate_percent: default_max_scale_up_rate(),
            scale_down_delay: default_scale_down_delay(),
            max_scale_down_step: default_max_scale_down_step(),
        }
    }
}

fn default_stable_window() -> Duration {
    StdDuration::from_secs(60).into()
}
fn default_panic_window() -> Duration {
    StdDuration::from_secs(6).into()
}
fn default_panic_threshold() -> u32 {
    200
}
fn default_max_scale_up_rate() -> u32 {
    100_000
}
fn default_scale_down_delay() -> Duration {
    StdDuration::from_secs(0).into()
}
fn default_max_scale_down_step() -> i32 {
    1
}

/// A raised floor of replicas during predictable busy hours.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    /// When the window starts: a five-field cron expression (`0 8 * * 1-5`).
    #[x_kube(validation = Rule::new("self.matches('^\\\\s*\\\\S+(\\\\s+\\\\S+){4}\\\\s*$')").message("cron must have five fields: minute hour day-of-month month day-of-week"))]
    #[schemars(length(min = 9, max = 100))]
    pub cron: String,
    /// IANA time zone of the cron expression (`Europe/Paris`); UTC by default.
    #[serde(default = "default_time_zone")]
    #[schemars(length(max = 64))]
    pub time_zone: String,
    /// How long the window lasts from each start.
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new(concat!(r#"!self.matches('^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || "#, "duration(self) >= duration('1m')")).message("schedules[].duration must be at least 1m"))]
    pub duration: Duration,
    /// Fewest replicas inside the window (a warm pool).
    #[schemars(range(min = 1, max = 10000))]
    pub min_replicas: i32,
}

fn default_time_zone() -> String {
    "UTC".into()
}

fn default_target() -> u32 {
    100
}
fn default_wake_replicas() -> i32 {
    1
}

/// What the operator observed and did. Written only by the operator's leader.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaledServiceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: target and Service found, routing programmed. `Active`: the workload
    /// has ready replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Replicas of the workload (its `/scale` status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Ready endpoints of the backend Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// Replicas the operator wants now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Replicas the workload had when Snooze took it over; restored on delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_replicas: Option<i32>,
    /// Last time an activator saw a request for this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request_time: Option<Time>,
    /// Last time the operator changed the replicas, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_reason: Option<String>,
    /// The Service the operator manages; point the ingress at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// The activator port assigned to each port of the backend Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortStatus>,
    /// The check the activators run on new pods while requests are held (from
    /// `spec.activation.probe` or the pod template's readiness probe). Absent: held
    /// requests wait for the kubelet to mark a pod Ready; `activationProbeSource` says
    /// why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_probe: Option<ActivationProbe>,
    /// Where `activationProbe` comes from, or why there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_probe_source: Option<String>,
    /// The awake ScaledServices that need this one (`spec.needs`, directly or not) and
    /// so hold it awake.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needed_by: Vec<String>,
    /// Each activator's share of `activation.maxQueuedRequests` (divided among the
    /// activators that serve this service, rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued_per_activator: Option<i32>,
    /// Who kept it awake in the current idle window: the clients whose requests
    /// counted as activity, most requests first (top 5, merged over the activators;
    /// rewritten with `lastRequestTime`). `answerWhileAsleep` requests are never here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub activity: Vec<ActivityEntry>,
    /// When it goes to sleep if no request comes (the last request, or the end of a
    /// `snooze.dev/wake-until`, plus `idleTimeout`). Absent while asleep or while
    /// something other than requests holds it awake (see `awakeBecause`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleeps_at: Option<Time>,
    /// Why it is awake, in one line: the top client of `activity`, the ScaledServices
    /// that need it, `minReplicas`, a `snooze.dev/wake-until`, or `paused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awake_because: Option<String>,
    /// The `snooze.dev/paused` annotation is in effect: the operator does not change
    /// the replicas.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// The `snooze.dev/wake-until` time in effect: awake until then, then the idle
    /// clock runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awake_until: Option<Time>,
    /// The last `snooze.dev/sleep` value acted on (the workload was put to sleep for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_sleep: Option<String>,
}

/// One client that kept a service awake.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ActivityEntry {
    /// The client's address; behind a trusted proxy (`--trusted-proxies`), the address
    /// it forwarded in `X-Forwarded-For`.
    pub client: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// The request method; `TCP` for connections to a TCP port.
    pub method: String,
    /// The request path, without the query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Requests (or connections) in the current idle window.
    pub count: i64,
    pub last_seen: Time,
}

impl ActivityEntry {
    /// One line: `kube-probe/1.33 GET /healthz ×120 from 10.0.0.5`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        if let Some(a) = &self.user_agent {
            s.push_str(a);
            s.push(' ');
        }
        s.push_str(&self.method);
        if let Some(p) = &self.path {
            s.push(' ');
            s.push_str(p);
        }
        format!("{s} ×{} from {}", self.count, self.client)
    }
}

/// Annotations a user (or `kubectl snooze`, or a GitOps tool) sets on a ScaledService
/// to steer it by hand; the status acknowledges each (`paused`, `awakeUntil`,
/// `handledSleep`).
pub mod annotations {
    /// `"true"`: the operator leaves the workload's replicas as they are (it still
    /// routes, holds and forwards requests).
    pub const PAUSED: &str = "snooze.dev/paused";
    /// An RFC 3339 time: awake until then (woken now if asleep), then the idle clock
    /// runs from it.
    pub const WAKE_UNTIL: &str = "snooze.dev/wake-until";
    /// Any new value (by convention the time it was set): put to sleep now, as soon as
    /// no request is in flight and nothing holds it; the next request wakes it.
    pub const SLEEP: &str = "snooze.dev/sleep";
}

/// One port of the backend Service and the activator port that serves it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PortStatus {
    /// Name of the Service port (may be empty for a single unnamed port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The Service port.
    pub port: i32,
    /// The port the activators listen on for it.
    pub activator_port: i32,
    /// `appProtocol` of the Service port (for example `kubernetes.io/h2c`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// Set when the port is served as a TCP stream (see `spec.ports`); unset: HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpMode>,
}

/// How the activators serve a TCP port.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TcpMode {
    pub wake_on: WakeOn,
    pub activity: TcpActivity,
}

impl ScaledServiceSpec {
    pub fn idle_timeout(&self) -> StdDuration {
        self.idle_timeout.into()
    }
}

impl ActivationSpec {
    pub fn timeout(&self) -> StdDuration {
        self.timeout.into()
    }
}

impl ScaledService {
    /// Name of the Service the operator manages for this ScaledService.
    pub fn managed_service_name(&self) -> String {
        managed_service_name(self.metadata.name.as_deref().unwrap_or_default())
    }
}

pub fn managed_service_name(scaled_service: &str) -> String {
    format!("{scaled_service}-snooze")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> Result<(), String> {
        ScaledServiceSpec::validate_cel(&v, None).map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn defaults_fill_in() {
        let s: ScaledServiceSpec = serde_json::from_value(json!({
            "scaleTargetRef": {"name": "web"}, "service": "web"
        }))
        .unwrap();
        assert_eq!(s.scale_target_ref.kind, "Deployment");
        assert_eq!(s.scale_target_ref.api_version, "apps/v1");
        assert_eq!(s.min_replicas, 0);
        assert_eq!(s.max_replicas, 1);
        assert_eq!(s.idle_timeout(), StdDuration::from_secs(300));
        assert_eq!(s.activation.timeout(), StdDuration::from_secs(60));
        assert_eq!(s.activation.max_queued_requests, 1000);
    }

    #[test]
    fn durations_parse_like_go() {
        let s: ScaledServiceSpec = serde_json::from_value(json!({
            "scaleTargetRef": {"name": "web"}, "service": "web", "idleTimeout": "1m30s"
        }))
        .unwrap();
        assert_eq!(s.idle_timeout(), StdDuration::from_secs(90));
        assert!(
            serde_json::from_value::<ScaledServiceSpec>(json!({
                "scaleTargetRef": {"name": "web"}, "service": "web", "idleTimeout": "5 minutes"
            }))
            .is_err()
        );
    }

    #[test]
    fn crd_has_cel_rules_defaults_and_columns() {
        let crd = serde_json::to_string(&ScaledService::crd()).unwrap();
        assert!(crd.contains("self.minReplicas <= self.maxReplicas"));
        assert!(crd.contains("minReplicas must be less than or equal to maxReplicas"));
        assert!(
            crd.contains(r#""default":"5m""#) || crd.contains(r#""default":"300s""#),
            "{crd}"
        );
        assert!(crd.contains(r#""name":"Last Request""#));
        assert!(crd.contains(r#""shortNames":["ssvc"]"#));
    }

    #[test]
    fn cel_rejects_min_above_max() {
        let ok = json!({"scaleTargetRef": {"name": "w"}, "service": "w", "minReplicas": 1, "maxReplicas": 2, "idleTimeout": "5m", "activation": {"timeout": "60s"}});
        spec(ok).unwrap();
        let bad = json!({"scaleTargetRef": {"name": "w"}, "service": "w", "minReplicas": 3, "maxReplicas": 2, "idleTimeout": "5m", "activation": {"timeout": "60s"}});
        let err = spec(bad).unwrap_err();
        assert!(
            err.contains("minReplicas must be less than or equal to maxReplicas"),
            "{err}"
        );
    }

    #[test]
    fn ports_are_tcp_by_their_entry_or_a_non_http_app_protocol() {
        let ports: Vec<PortSpec> = serde_json::from_value(json!([
            {"name": "db", "protocol": "TCP", "wakeOn": "Connect"},
            {"name": "web", "protocol": "HTTP"},
        ]))
        .unwrap();
        let db = tcp_mode(&ports, "db", None).unwrap();
        assert_eq!(db.wake_on, WakeOn::Connect);
        assert_eq!(db.activity, TcpActivity::Traffic);
        // The entry wins over appProtocol.
        assert_eq!(tcp_mode(&ports, "web", Some("redis")), None);
        assert_eq!(tcp_mode(&[], "x", Some("redis")), Some(TcpMode::default()));
        assert_eq!(
            tcp_mode(&[], "x", Some("postgresql")),
            Some(TcpMode::default())
        );
        for http in [
            None,
            Some("http"),
            Some("HTTP"),
            Some("kubernetes.io/h2c"),
            Some("grpc"),
        ] {
            assert_eq!(tcp_mode(&[], "x", http), None, "{http:?}");
        }
    }

    #[test]
    fn cel_rejects_tcp_options_on_http_ports_and_repeated_names() {
        let base = json!({"scaleTargetRef": {"name": "w"}, "service": "w", "idleTimeout": "5m", "activation": {"timeout": "60s"}});
        let with = |ports: serde_json::Value| {
            let mut v = base.clone();
            v["ports"] = ports;
            v
        };
        spec(with(
            json!([{"name": "db", "protocol": "TCP", "wakeOn": "Connect"}]),
        ))
        .unwrap();
        let err = spec(with(
            json!([{"name": "web", "protocol": "HTTP", "wakeOn": "Connect"}]),
        ))
        .unwrap_err();
        assert!(err.contains("apply to protocol TCP only"), "{err}");
        let err = spec(with(
            json!([{"name": "a", "protocol": "TCP"}, {"name": "a", "protocol": "HTTP"}]),
        ))
        .unwrap_err();
        assert!(err.contains("ports[].name must be unique"), "{err}");
    }
}
pub mod stats;
