//! Feeds the table and the listeners from the API server: ScaledServices (settings and
//! the activator ports in their status) and the backend Services' EndpointSlices.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use snooze_crds::ScaledService;
use snooze_crds::stats::ServiceRef;
use tokio::sync::watch;
use tracing::warn;

use crate::accept::Listeners;
use crate::dispatch::Route;
use crate::dispatch::pool::Pool;
use crate::metrics::Metrics;
use crate::table::{PodPorts, Settings, Table};

pub const H2C_APP_PROTOCOL: &str = "kubernetes.io/h2c";

fn key(ss: &ScaledService) -> ServiceRef {
    ServiceRef {
        namespace: ss.namespace().unwrap_or_default(),
        name: ss.name_any(),
    }
}

fn settings(ss: &ScaledService) -> Settings {
    let a = &ss.spec.activation;
    // This activator's share of the service's bound (the operator divides it among
    // the activators); the whole bound until the operator has written the share.
    let share = ss
        .status
        .as_ref()
        .and_then(|s| s.max_queued_per_activator)
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(u64::from(a.max_queued_requests));
    Settings {
        timeout: a.timeout(),
        max_queued: share,
        pod_concurrency: a.pod_concurrency as usize,
        idle: ss.spec.idle_timeout(),
    }
}

/// The activator's routes: the route of every listener port, and the ports each
/// ScaledService holds. An event changes only the entries of its own service, so
/// programming N services costs O(N), not O(N²) (a rebuild per event cost 1.6 ms at
/// 1,000 services).
#[derive(Default)]
pub struct Routes {
    by_port: HashMap<u16, Arc<Route>>,
    ports_of: HashMap<ServiceRef, Vec<u16>>,
    /// Off: no activator probe; held requests wait for the kubelet's readiness.
    pub no_probing: bool,
}

impl Routes {
    /// Takes in one ScaledService as it is now (`None`: deleted).
    pub fn apply(&mut self, table: &Table, key: &ServiceRef, ss: Option<&ScaledService>) {
        for port in self.ports_of.remove(key).unwrap_or_default() {
            // Only while the port is still this service's: the operator may have handed
            // it to another one, whose event came first.
            if self
                .by_port
                .get(&port)
                .is_some_and(|r| r.service.key == *key)
            {
                self.by_port.remove(&port);
            }
        }
        let ports = ss
            .and_then(|ss| ss.status.as_ref())
            .map(|s| s.ports.as_slice())
            .unwrap_or_default();
        let Some(ss) = ss.filter(|_| !ports.is_empty()) else {
            table.remove(key);
            return;
        };
        let svc = table.upsert(key.clone(), &ss.spec.service, settings(ss));
        svc.set_answers(&ss.spec.activation.answer_while_asleep);
        svc.set_waiting_page(ss.spec.activation.waiting_page.as_ref());
        svc.set_probe(
            ss.status
                .as_ref()
                .and_then(|s| s.activation_probe.as_ref())
                .and_then(crate::probe::Probe::from_spec)
                .filter(|_| !self.no_probing),
        );
        let mut mine = Vec::with_capacity(ports.len());
        for p in ports {
            let Ok(port) = u16::try_from(p.activator_port) else {
                continue;
            };
            self.by_port.insert(
                port,
                Arc::new(Route {
                    service: svc.clone(),
                    port_name: p.name.clone().unwrap_or_default(),
                    h2c: p.app_protocol.as_deref() == Some(H2C_APP_PROTOCOL),
                    tcp: p.tcp,
                }),
            );
            mine.push(port);
        }
        self.ports_of.insert(key.clone(), mine);
    }

    /// Starts over from a full list (the watch's first list, or a re-list after it
    /// lost its place): services not in it are dropped.
    pub fn reset(&mut self, table: &Table, all: &BTreeMap<ServiceRef, ScaledService>) {
        *self = Self {
            no_probing: self.no_probing,
            ..Self::default()
        };
        for (k, ss) in all {
            self.apply(table, k, Some(ss));
        }
        for s in table.services() {
            if !all.contains_key(&s.key) {
                table.remove(&s.key);
            }
        }
    }

    /// The route of every port.
    pub fn ports(&self) -> &HashMap<u16, Arc<Route>> {
        &self.by_port
    }
}

async fn open_listeners(listeners: &Arc<Listeners>, routes: &Routes) {
    for (port, e) in listeners.sync(routes.ports()).await {
        warn!(port, "listener not opened: {e}");
    }
}

/// Follows the ScaledServices. Never ends on an error: a watch that cannot be
/// (re)started is logged, counted (`snooze_activator_watch_errors`) and retried with
/// back-off while the routes known so far keep serving.
pub async fn scaled_services(
    client: Client,
    table: Arc<Table>,
    listeners: Arc<Listeners>,
    metrics: Arc<Metrics>,
    probing: bool,
    synced: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let api: Api<ScaledService> = Api::all(client);
    let mut routes = Routes {
        no_probing: !probing,
        ..Routes::default()
    };
    let mut init: Option<BTreeMap<ServiceRef, ScaledService>> = None;
    let mut stream = std::pin::pin!(snooze_runtime::watch::resilient(
        watcher::watcher(api, watcher::Config::default()).default_backoff(),
        "scaledservices",
        move || metrics.watch_error("scaledservices"),
    ));
    while let Some(ev) = stream.next().await {
        match ev {
            Event::Init => {
                init = Some(BTreeMap::new());
                continue;
            }
            Event::InitApply(ss) => {
                if let Some(i) = init.as_mut() {
                    i.insert(key(&ss), ss);
                }
                continue;
            }
            Event::InitDone => {
                routes.reset(&table, &init.take().unwrap_or_default());
                // Ready only once the listeners of every known service are open: the
                // operator publishes ready activators in the managed EndpointSlices.
                open_listeners(&listeners, &routes).await;
                synced.send_replace(true);
                continue;
            }
            Event::Apply(ss) => routes.apply(&table, &key(&ss), Some(&ss)),
            Event::Delete(ss) => routes.apply(&table, &key(&ss), None),
        }
        open_listeners(&listeners, &routes).await;
    }
    Ok(())
}

/// A backend Service: namespace and name.
type BackendKey = (String, String);

/// What the activator keeps of one EndpointSlice: its endpoints by readiness (ready;
/// not ready and not terminating), with their ports. A few hundred bytes, not the
/// object: every slice of the cluster is kept, so that a ScaledService naming any
/// Service finds its endpoints at once.
#[derive(Debug, Default, Clone, PartialEq)]
struct SliceEndpoints {
    ready: PodPorts,
    candidates: PodPorts,
}

fn slice_endpoints(s: &EndpointSlice) -> SliceEndpoints {
    let ports: Vec<(String, u16)> = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let mut out = SliceEndpoints::default();
    let ns = s.metadata.namespace.as_deref();
    for e in &s.endpoints {
        if !is_own_pod(e, ns) {
            continue;
        }
        let c = e.conditions.as_ref();
        let list = if c.and_then(|c| c.ready) == Some(true) {
            &mut out.ready
        } else if c.and_then(|c| c.terminating) != Some(true) {
            &mut out.candidates
        } else {
            continue;
        };
        for a in &e.addresses {
            if let Ok(ip) = a.parse::<IpAddr>()
                && !list.iter().any(|(i, _)| *i == ip)
            {
                list.push((ip, ports.clone()));
            }
        }
    }
    out
}

/// Whether an endpoint is a Pod of the slice's own namespace, as the EndpointSlice
/// controller writes them. Anyone who may write EndpointSlices can label one as that
/// controller's: an endpoint without a Pod behind it (any address its author names:
/// another tenant's pod, a node port) is never forwarded to nor probed (the pattern of
/// CVE-2021-25740).
fn is_own_pod(e: &k8s_openapi::api::discovery::v1::Endpoint, ns: Option<&str>) -> bool {
    e.target_ref.as_ref().is_some_and(|r| {
        r.kind.as_deref() == Some("Pod")
            && r.name.as_deref().is_some_and(|n| !n.is_empty())
            && (r.namespace.is_none() || r.namespace.as_deref() == ns)
    })
}

/// The slices of every backend Service, indexed by the Service (the
/// `kubernetes.io/service-name` label): an event costs the slices of its own Service,
/// not every slice of the cluster.
#[derive(Default)]
struct SliceIndex {
    by_backend: HashMap<BackendKey, HashMap<String, SliceEndpoints>>,
    /// Each slice's Service (namespace, slice name → backend).
    backend_of: HashMap<(String, String), BackendKey>,
}

impl SliceIndex {
    /// Takes in a slice; returns the backends whose endpoints may have changed.
    fn apply(&mut self, s: &EndpointSlice) -> Vec<BackendKey> {
        let (Some(ns), name) = (s.namespace(), s.name_any()) else {
            return vec![];
        };
        let mut touched = self.delete(&ns, &name);
        if let Some(svc) = service_of(s) {
            let backend = (ns.clone(), svc);
            self.by_backend
                .entry(backend.clone())
                .or_default()
                .insert(name.clone(), slice_endpoints(s));
            self.backend_of.insert((ns, name), backend.clone());
            if !touched.contains(&backend) {
                touched.push(backend);
            }
        }
        touched
    }

    /// Forgets a slice; returns the backend it belonged to.
    fn delete(&mut self, ns: &str, name: &str) -> Vec<BackendKey> {
        let Some(backend) = self.backend_of.remove(&(ns.to_string(), name.to_string())) else {
            return vec![];
        };
        if let Some(slices) = self.by_backend.get_mut(&backend) {
            slices.remove(name);
            if slices.is_empty() {
                self.by_backend.remove(&backend);
            }
        }
        vec![backend]
    }

    /// Endpoints of one backend Service from all of its slices: the ready ones, and the
    /// not-ready ones that are not terminating (pods starting up: candidates for the
    /// activator's own probe; a terminating pod is never one).
    fn endpoints(&self, backend: &BackendKey) -> (PodPorts, PodPorts) {
        let (mut ready, mut candidates): (PodPorts, PodPorts) = (Vec::new(), Vec::new());
        for s in self
            .by_backend
            .get(backend)
            .into_iter()
            .flat_map(|m| m.values())
        {
            for (list, out) in [(&s.ready, &mut ready), (&s.candidates, &mut candidates)] {
                for (ip, ports) in list {
                    if !out.iter().any(|(i, _)| i == ip) {
                        out.push((*ip, ports.clone()));
                    }
                }
            }
        }
        candidates.retain(|(ip, _)| !ready.iter().any(|(r, _)| r == ip));
        ready.sort_by_key(|(ip, _)| *ip);
        candidates.sort_by_key(|(ip, _)| *ip);
        (ready, candidates)
    }
}

/// Sets the endpoints of one backend Service from its slices, and closes the pooled
/// connections of every pod address that left them (none outlives its pod).
fn update_backend(table: &Table, pool: &Pool, index: &SliceIndex, backend: &BackendKey) {
    let (ready, candidates) = index.endpoints(backend);
    for gone in table.set_backend_endpoints(&backend.0, &backend.1, ready, candidates) {
        pool.forget(&gone);
    }
}

fn service_of(s: &EndpointSlice) -> Option<String> {
    s.labels().get("kubernetes.io/service-name").cloned()
}

/// Follows the EndpointSlices of the cluster's Services (the EndpointSlice
/// controller's). Never ends on an error (as [`scaled_services`]). The pool forgets the
/// connections of every pod address that leaves a Service's endpoints.
pub async fn endpoint_slices(
    client: Client,
    table: Arc<Table>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    synced: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let api: Api<EndpointSlice> = Api::all(client);
    let cfg = watcher::Config::default()
        .labels("endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io");
    let mut index = SliceIndex::default();
    let mut init: Option<SliceIndex> = None;
    let mut stream = std::pin::pin!(snooze_runtime::watch::resilient(
        watcher::watcher(api, cfg).default_backoff(),
        "endpointslices",
        move || metrics.watch_error("endpointslices"),
    ));
    while let Some(ev) = stream.next().await {
        let touched: Vec<BackendKey> = match ev {
            Event::Init => {
                init = Some(SliceIndex::default());
                vec![]
            }
            Event::InitApply(s) => {
                if let Some(i) = init.as_mut() {
                    i.apply(&s);
                }
                vec![]
            }
            Event::InitDone => {
                let next = init.take().unwrap_or_default();
                let mut t: Vec<BackendKey> = index
                    .by_backend
                    .keys()
                    .chain(next.by_backend.keys())
                    .cloned()
                    .collect();
                t.sort();
                t.dedup();
                index = next;
                synced.send_replace(true);
                t
            }
            Event::Apply(s) => index.apply(&s),
            Event::Delete(s) => index.delete(&s.namespace().unwrap_or_default(), &s.name_any()),
        };
        for backend in touched {
            update_backend(&table, &pool, &index, &backend);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use serde_json::json;

    fn ss(name: &str, ports: &[i32]) -> ScaledService {
        let ports: Vec<_> = ports
            .iter()
            .map(|p| json!({"name": "http", "port": 80, "activatorPort": p}))
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "snooze.dev/v1alpha1", "kind": "ScaledService",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"scaleTargetRef": {"name": name}, "service": name},
            "status": {"ports": ports}
        }))
        .unwrap()
    }

    fn owner(r: &Routes, port: u16) -> Option<String> {
        r.by_port.get(&port).map(|r| r.service.key.name.clone())
    }

    #[test]
    fn an_event_changes_only_its_own_service() {
        let table = Table::new(Arc::new(Metrics::new()), 100);
        let mut r = Routes::default();
        let (a, b) = (ss("a", &[20000]), ss("b", &[20001, 20002]));
        r.apply(&table, &key(&a), Some(&a));
        r.apply(&table, &key(&b), Some(&b));
        assert_eq!(r.ports().len(), 3);
        assert_eq!(owner(&r, 20002).as_deref(), Some("b"));

        // b loses a port, then its status is emptied: its routes and table entry go.
        let b2 = ss("b", &[20001]);
        r.apply(&table, &key(&b2), Some(&b2));
        assert_eq!(owner(&r, 20002), None);
        let b3 = ss("b", &[]);
        r.apply(&table, &key(&b3), Some(&b3));
        assert_eq!(r.ports().len(), 1);
        assert!(table.get(&key(&b)).is_none());
        assert!(table.get(&key(&a)).is_some());
    }

    #[test]
    fn a_port_handed_on_is_not_closed_by_its_old_owner() {
        let table = Table::new(Arc::new(Metrics::new()), 100);
        let mut r = Routes::default();
        let (a, b) = (ss("a", &[20000]), ss("b", &[20000]));
        r.apply(&table, &key(&a), Some(&a));
        r.apply(&table, &key(&b), Some(&b));
        r.apply(&table, &key(&a), None);
        assert_eq!(owner(&r, 20000).as_deref(), Some("b"));
        assert!(table.get(&key(&a)).is_none());
    }

    fn slice(svc: &str, ip: &str, port: u16) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{svc}-1"), "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true},
                           "targetRef": {"kind": "Pod", "name": format!("{svc}-pod"), "namespace": "shop"}}],
        }))
        .unwrap()
    }

    #[test]
    fn backend_services_that_go_are_forgotten() {
        let table = Table::new(Arc::new(Metrics::new()), 100);
        let pool = Pool::new(std::time::Duration::from_secs(1), 8);
        let mut index = SliceIndex::default();
        let before = table.backends_with_endpoints();
        for i in 0..1000 {
            let s = slice(
                &format!("svc-{i}"),
                &format!("10.1.{}.{}", i / 250, i % 250),
                80,
            );
            for b in index.apply(&s) {
                update_backend(&table, &pool, &index, &b);
            }
        }
        assert_eq!(table.backends_with_endpoints(), before + 1000);
        for i in 0..1000 {
            for b in index.delete("shop", &format!("svc-{i}-1")) {
                update_backend(&table, &pool, &index, &b);
            }
        }
        assert_eq!(
            table.backends_with_endpoints(),
            before,
            "deleted Services are forgotten"
        );
        assert!(index.by_backend.is_empty() && index.backend_of.is_empty());
    }

    #[test]
    fn only_pods_of_the_slices_namespace_are_endpoints() {
        let with_ref = |r: serde_json::Value| -> EndpointSlice {
            let mut s = slice("web", "10.0.0.1", 8080);
            s.endpoints[0].target_ref = serde_json::from_value(r).unwrap();
            s
        };
        let cases = [
            (
                json!({"kind": "Pod", "name": "web-1", "namespace": "shop"}),
                true,
            ),
            (json!({"kind": "Pod", "name": "web-1"}), true),
            (json!(null), false),
            (
                json!({"kind": "Pod", "name": "db-0", "namespace": "other-team"}),
                false,
            ),
            (json!({"kind": "Node", "name": "node-1"}), false),
            (json!({"kind": "Pod", "name": ""}), false),
        ];
        for (r, kept) in cases {
            let e = slice_endpoints(&with_ref(r.clone()));
            assert_eq!(e.ready.len() == 1, kept, "{r}");
        }
    }

    #[tokio::test]
    async fn pooled_connections_of_an_endpoint_go_when_it_leaves_the_slices() {
        let table = Table::new(Arc::new(Metrics::new()), 100);
        let pool = Pool::new(std::time::Duration::from_secs(1), 8);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut index = SliceIndex::default();
        let web = ("shop".to_string(), "web".to_string());
        let api = ("shop".to_string(), "api".to_string());
        assert_eq!(
            index.apply(&slice("web", "127.0.0.1", addr.port())),
            vec![web.clone()]
        );
        update_backend(&table, &pool, &index, &web);
        // Two idle connections to the pod, as after two requests.
        for _ in 0..2 {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            pool.put_raw(addr, s);
        }
        assert_eq!(pool.idle_count(Some(addr)), 2);
        // Another Service's change does not touch them.
        assert_eq!(
            index.apply(&slice("api", "127.0.0.2", 80)),
            vec![api.clone()]
        );
        update_backend(&table, &pool, &index, &api);
        assert_eq!(pool.idle_count(Some(addr)), 2);
        // The pod leaves web's slices: its connections are closed at once.
        assert_eq!(index.delete("shop", "web-1"), vec![web.clone()]);
        update_backend(&table, &pool, &index, &web);
        assert_eq!(pool.idle_count(Some(addr)), 0);
        assert_eq!(pool.idle_count(None), 0);
    }

    #[test]
    fn slices_are_indexed_by_their_service() {
        let mut index = SliceIndex::default();
        let web = ("shop".to_string(), "web".to_string());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut second = slice("web", "10.0.0.2", 8080);
        second.metadata.name = Some("web-2".into());
        index.apply(&slice("web", "10.0.0.1", 8080));
        index.apply(&second);
        index.apply(&slice("api", "10.0.0.9", 80));
        let (ready, candidates) = index.endpoints(&web);
        assert_eq!(
            ready.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![ip("10.0.0.1"), ip("10.0.0.2")],
            "both slices of web, not api's"
        );
        assert!(candidates.is_empty());
        // A slice that moves to another Service leaves the first one's endpoints.
        let mut moved = slice("api", "10.0.0.2", 8080);
        moved.metadata.name = Some("web-2".into());
        let touched = index.apply(&moved);
        assert!(touched.contains(&web) && touched.len() == 2, "{touched:?}");
        assert_eq!(index.endpoints(&web).0.len(), 1);
        // The last slice gone: nothing is kept for the Service.
        index.delete("shop", "web-1");
        assert!(index.endpoints(&web).0.is_empty());
        assert!(!index.by_backend.contains_key(&web));
    }

    #[test]
    fn a_relist_drops_what_is_gone() {
        let table = Table::new(Arc::new(Metrics::new()), 100);
        let mut r = Routes::default();
        let (a, b) = (ss("a", &[20000]), ss("b", &[20001]));
        r.apply(&table, &key(&a), Some(&a));
        r.apply(&table, &key(&b), Some(&b));
        r.reset(&table, &[(key(&b), b.clone())].into());
        assert_eq!(owner(&r, 20000), None);
        assert_eq!(owner(&r, 20001).as_deref(), Some("b"));
        assert!(table.get(&key(&a)).is_none());
    }
}
