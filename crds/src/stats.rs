//! The stats stream between the activators and the operator's leader.
//!
//! The leader opens `GET /v1/stats` on every activator pod's admin port and keeps it
//! open. The activator answers with newline-delimited JSON [`Report`]s: a full one at
//! once, then every second the services whose numbers changed, and at once (with
//! `wake`) when a request finds no ready pod.

use serde::{Deserialize, Serialize};

/// Path of the stats stream on the activator's admin port.
pub const STATS_PATH: &str = "/v1/stats";

/// One line of the stats stream.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The activator's pod name.
    pub activator: String,
    /// Random id of the activator process; a new one means its counters restarted.
    pub instance: u64,
    /// True when this report lists every service the activator knows.
    pub full: bool,
    pub services: Vec<ServiceStats>,
    /// Services whose requests wait for a pod right now: scale them up immediately.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wake: Vec<ServiceRef>,
    /// The activator ports this activator has an open listener on, sorted: in every
    /// full report and at once whenever the set changes; absent means unchanged. The
    /// operator lists an activator in a managed EndpointSlice only for ports it reports
    /// here, so an ingress is never sent to a port that is not open yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listening: Option<Vec<u16>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

/// What one activator sees of one ScaledService.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStats {
    pub namespace: String,
    pub name: String,
    /// Requests being forwarded to pods right now.
    pub in_flight: u64,
    /// Requests waiting for a pod (or for a pod below its concurrency limit).
    pub queued: u64,
    /// Requests received since the activator started (a counter).
    pub requests: u64,
    /// Unix time in milliseconds of the last request received, 0 if none.
    pub last_request_ms: u64,
    /// Requests answered 504 because no pod became ready within `activation.timeout`
    /// (a counter).
    #[serde(default)]
    pub timeouts: u64,
    /// Who sent the requests that counted as activity within the idle window, most
    /// requests first (bounded: see the activator's `activity` module).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub activity: Vec<Waker>,
}

/// Requests (or TCP connections) of one client that counted as activity.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Waker {
    /// The client's address (behind a trusted proxy, the one it forwarded).
    pub client: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user_agent: String,
    /// The request method; `TCP` for a TCP connection.
    pub method: String,
    /// The request path, without the query.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    pub count: u64,
    /// Unix time in milliseconds of its last request.
    pub last_ms: u64,
}
