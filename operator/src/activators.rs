//! The activator pods, from their Service's EndpointSlices: the ready pod IPs (listed
//! in every managed EndpointSlice) and the addresses of their stats streams.

use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::info;

use crate::metrics::Metrics;

/// The ready activator pods: their IPs (for the managed EndpointSlices) and the
/// addresses of their stats streams.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Activators {
    pub ips: Vec<String>,
    pub stats_addrs: Vec<SocketAddr>,
}

impl Activators {
    /// The ready endpoints of the activator Service's slices; the stats address is
    /// the ready IP with the slice's port named `admin_port`.
    pub fn from_slices<'a>(
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        admin_port: &str,
    ) -> Self {
        let mut ips = Vec::new();
        let mut stats = Vec::new();
        for s in slices {
            let port = s
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(admin_port))
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok());
            for e in &s.endpoints {
                if e.conditions.as_ref().and_then(|c| c.ready) != Some(true) {
                    continue;
                }
                for a in &e.addresses {
                    ips.push(a.clone());
                    if let (Some(port), Ok(ip)) = (port, a.parse()) {
                        stats.push(SocketAddr::new(ip, port));
                    }
                }
            }
        }
        ips.sort();
        ips.dedup();
        stats.sort();
        stats.dedup();
        Self {
            ips,
            stats_addrs: stats,
        }
    }
}

/// Follows the activator Service's EndpointSlices into `tx`. Never ends on an error:
/// each is logged and counted, and the activators known so far stay.
pub async fn watch(
    client: Client,
    namespace: String,
    service: String,
    admin_port: String,
    metrics: Arc<Metrics>,
    tx: watch::Sender<Activators>,
) -> anyhow::Result<()> {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let (reader, writer): (Store<EndpointSlice>, _) = reflector::store();
    let events = reflector::reflector(writer, watcher(api, cfg).default_backoff());
    let mut stream = std::pin::pin!(snooze_runtime::watch::resilient(
        events,
        "activator-endpointslices",
        move || metrics.watch_error("activator-endpointslices"),
    ));
    while let Some(ev) = stream.next().await {
        // The store holds the listed objects only once the initial list is done.
        if matches!(ev, watcher::Event::Init | watcher::Event::InitApply(_)) {
            continue;
        }
        let state = reader.state();
        let next = Activators::from_slices(state.iter().map(|s| s.as_ref()), &admin_port);
        tx.send_if_modified(|cur| {
            if *cur != next {
                info!(activators = ?next.ips, "activators changed");
                *cur = next;
                true
            } else {
                false
            }
        });
    }
    anyhow::bail!("the activator watch ended")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(ports: serde_json::Value, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "s", "namespace": "snooze-system"},
            "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
        }))
        .unwrap()
    }

    #[test]
    fn ready_endpoints_with_their_admin_port() {
        let a = slice(
            json!([{"name": "admin", "port": 9090}, {"name": "other", "port": 1}]),
            json!([
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.4"]},
            ]),
        );
        // The same pod in a second slice is listed once.
        let b = slice(
            json!([{"name": "admin", "port": 9090}]),
            json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": true}}]),
        );
        let got = Activators::from_slices([&a, &b], "admin");
        assert_eq!(got.ips, vec!["10.0.0.1", "10.0.0.2"]);
        assert_eq!(
            got.stats_addrs,
            vec![
                "10.0.0.1:9090".parse().unwrap(),
                "10.0.0.2:9090".parse().unwrap()
            ]
        );
    }

    #[test]
    fn without_the_admin_port_pods_are_listed_without_a_stats_address() {
        let a = slice(
            json!([{"name": "http", "port": 80}]),
            json!([{"addresses": ["10.0.0.1", "not-an-ip"], "conditions": {"ready": true}}]),
        );
        let got = Activators::from_slices([&a], "admin");
        assert_eq!(got.ips, vec!["10.0.0.1", "not-an-ip"]);
        assert!(got.stats_addrs.is_empty());
    }
}
