//! The leader's caches of what a reconcile reads, so that a steady reconcile makes no
//! GET: Services (backend and managed, one watch), the managed EndpointSlices, the
//! backend EndpointSlices indexed by their Service, and the workloads of the built-in
//! kinds (their replicas, version and pod template). Each is a reflector store fed by
//! one watch, whose stream also triggers the reconciles (`run.rs`); objects are trimmed
//! before they are stored (managed fields, annotations; a workload keeps only what is
//! read; a ScaledService, the controller's own store in `run.rs`, its managed fields and
//! `kubectl apply`'s copy of the spec). A lookup answers `Unsynced` while its store has not listed yet, and the
//! caller then asks the API server (counted by what in `snooze_operator_api_reads_total`).
//!
//! Must not: write, decide, or be read for what must be exact at the moment of a write
//! (a replica write holds only on the replicas it was decided on: decided on the cache's
//! stale number, it is refused and decided again on a fresh read).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use snooze_runtime::watch::resilient;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::metrics::Metrics;
use snooze_crds::ScaledService;

/// What a cache knows of one object.
#[derive(Debug)]
pub enum Lookup<K> {
    /// The store has not listed yet: ask the API server.
    Unsynced,
    /// Listed and watched, and not there (a just-created object may not be yet).
    Missing,
    Found(Arc<K>),
}

fn lookup<K>(store: &Store<K>, ns: &str, name: &str) -> Lookup<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    if store.wait_until_ready().now_or_never().is_none() {
        return Lookup::Unsynced;
    }
    match store.get(&ObjectRef::new(name).within(ns)) {
        Some(o) => Lookup::Found(o),
        None => Lookup::Missing,
    }
}

/// The kinds whose objects the workload cache holds: their `/scale` reads
/// `spec.replicas` (a custom kind may map it elsewhere, so it is read through `/scale`).
pub fn cached_kind(gvk: &GroupVersionKind) -> bool {
    gvk.group == "apps"
        && gvk.version == "v1"
        && matches!(
            gvk.kind.as_str(),
            "Deployment" | "StatefulSet" | "ReplicaSet"
        )
}

pub struct Caches {
    client: Client,
    metrics: Arc<Metrics>,
    /// Ends the workload watches with the leadership term.
    term: CancellationToken,
    pub services: Store<Service>,
    pub managed_slices: Store<EndpointSlice>,
    pub backend_slices: Store<EndpointSlice>,
    /// Backend slice names by (namespace, Service); a name whose slice is gone is
    /// dropped when it is next looked up.
    slice_index: Mutex<HashMap<(String, String), BTreeSet<String>>>,
    workloads: Mutex<HashMap<GroupVersionKind, Store<DynamicObject>>>,
}

impl Caches {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        term: CancellationToken,
        services: Store<Service>,
        managed_slices: Store<EndpointSlice>,
        backend_slices: Store<EndpointSlice>,
    ) -> Self {
        Self {
            client,
            metrics,
            term,
            services,
            managed_slices,
            backend_slices,
            slice_index: Mutex::new(HashMap::new()),
            workloads: Mutex::new(HashMap::new()),
        }
    }

    pub fn service(&self, ns: &str, name: &str) -> Lookup<Service> {
        lookup(&self.services, ns, name)
    }

    pub fn managed_slice(&self, ns: &str, name: &str) -> Lookup<EndpointSlice> {
        lookup(&self.managed_slices, ns, name)
    }

    /// Notes a backend slice the watch delivered (called from its stream).
    pub fn index_slice(&self, s: &EndpointSlice) {
        let (Some(ns), Some(svc)) = (
            s.metadata.namespace.clone(),
            s.labels().get("kubernetes.io/service-name").cloned(),
        ) else {
            return;
        };
        self.slice_index
            .lock()
            .entry((ns, svc))
            .or_default()
            .insert(s.name_any());
    }

    /// The distinct ready addresses of the backend Service `ns/service`.
    pub fn ready_endpoints(&self, ns: &str, service: &str) -> i32 {
        let key = (ns.to_string(), service.to_string());
        let mut index = self.slice_index.lock();
        let Some(names) = index.get_mut(&key) else {
            return 0;
        };
        let mut ips: BTreeSet<String> = BTreeSet::new();
        names.retain(|n| {
            let Some(s) = self
                .backend_slices
                .get(&ObjectRef::new(n).within(ns))
                .filter(|s| {
                    s.labels()
                        .get("kubernetes.io/service-name")
                        .map(String::as_str)
                        == Some(service)
                })
            else {
                return false;
            };
            for e in &s.endpoints {
                if e.conditions.as_ref().and_then(|c| c.ready) == Some(true) {
                    ips.extend(e.addresses.iter().cloned());
                }
            }
            true
        });
        if names.is_empty() {
            index.remove(&key);
        }
        ips.len() as i32
    }

    /// The workload `ns/name` of a cached kind, trimmed to its replicas, version and
    /// pod template's probes. The first ask for a kind starts its watch (until then,
    /// and for other kinds, `Unsynced`).
    pub fn workload(&self, gvk: &GroupVersionKind, ns: &str, name: &str) -> Lookup<DynamicObject> {
        if !cached_kind(gvk) {
            return Lookup::Unsynced;
        }
        let store = {
            let mut w = self.workloads.lock();
            match w.get(gvk) {
                Some(s) => s.clone(),
                None => {
                    let s = self.watch_workloads(gvk);
                    w.insert(gvk.clone(), s.clone());
                    s
                }
            }
        };
        if store.wait_until_ready().now_or_never().is_none() {
            return Lookup::Unsynced;
        }
        match store.get(&ObjectRef::new_with(name, ApiResource::from_gvk(gvk)).within(ns)) {
            Some(o) => Lookup::Found(o),
            None => Lookup::Missing,
        }
    }

    fn watch_workloads(&self, gvk: &GroupVersionKind) -> Store<DynamicObject> {
        let ar = ApiResource::from_gvk(gvk);
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        let writer = reflector::store::Writer::new(ar);
        let reader = writer.as_reader();
        let m = self.metrics.clone();
        let what = format!("workloads {}", gvk.kind);
        info!(kind = %gvk.kind, "watching workloads of this kind (the reconciles read them from the cache)");
        let stream = resilient(
            reflector::reflector(
                writer,
                watcher(api, watcher::Config::default())
                    .default_backoff()
                    .modify(trim_workload),
            ),
            "workloads",
            move || m.watch_error("workloads"),
        );
        let term = self.term.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.cancelled() => {}
                _ = stream.for_each(|_| futures::future::ready(())) => {
                    tracing::warn!("{what}: the watch ended");
                }
            }
        });
        reader
    }
}

/// Keeps of a ScaledService all but its managed fields and the copy of the last applied
/// spec `kubectl apply` keeps in an annotation (the other annotations are the user's
/// steering: `manual.rs`).
pub fn trim_scaled_service(s: &mut ScaledService) {
    s.metadata.managed_fields = None;
    if let Some(a) = s.metadata.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Keeps of a Service what is read: its spec, and the metadata that says who made it.
pub fn trim_service(s: &mut Service) {
    s.metadata.managed_fields = None;
    s.metadata.annotations = None;
    s.status = None;
}

/// Keeps of an EndpointSlice what is read (its endpoints, ports and labels).
pub fn trim_slice(s: &mut EndpointSlice) {
    s.metadata.managed_fields = None;
    s.metadata.annotations = None;
}

/// Keeps of a workload its name, version and owners, `spec.replicas`, and of each
/// container of its pod template the name, ports and readiness probe (what
/// `probe::resolve` reads).
pub fn trim_workload(o: &mut DynamicObject) {
    o.metadata.managed_fields = None;
    o.metadata.annotations = None;
    o.metadata.labels = None;
    let mut spec = Map::new();
    if let Some(r) = o.data.pointer("/spec/replicas") {
        spec.insert("replicas".into(), r.clone());
    }
    let containers: Vec<Value> = o
        .data
        .pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    let mut keep = Map::new();
                    for k in ["name", "ports", "readinessProbe"] {
                        if let Some(v) = c.get(k) {
                            keep.insert(k.into(), v.clone());
                        }
                    }
                    Value::Object(keep)
                })
                .collect()
        })
        .unwrap_or_default();
    spec.insert(
        "template".into(),
        serde_json::json!({"spec": {"containers": containers}}),
    );
    o.data = serde_json::json!({ "spec": spec });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_trimmed_workload_keeps_what_the_reconcile_reads() {
        let mut d: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "42",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4096)},
                "managedFields": [{"manager": "kubectl"}]},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{
                    "name": "app", "image": "web:1", "env": [{"name": "SECRET", "value": "s"}],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}]}}},
            "status": {"replicas": 3},
        }))
        .unwrap();
        trim_workload(&mut d);
        assert_eq!(d.metadata.resource_version.as_deref(), Some("42"));
        assert!(d.metadata.annotations.is_none() && d.metadata.managed_fields.is_none());
        assert_eq!(
            d.data,
            json!({"spec": {"replicas": 3, "template": {"spec": {"containers": [{
                "name": "app", "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}}]}}}})
        );
        // What the probe is resolved from is still there.
        let (probe, source) = crate::probe::resolve(None, Some(&d.data));
        assert!(probe.is_some(), "{source}");
    }

    #[test]
    fn a_trimmed_scaled_service_keeps_its_spec_status_and_steering() {
        let mut ss: ScaledService = serde_json::from_value(json!({
            "apiVersion": "snooze.dev/v1alpha1", "kind": "ScaledService",
            "metadata": {"name": "web", "namespace": "shop", "generation": 2,
                "annotations": {LAST_APPLIED: "x".repeat(4096), "snooze.dev/paused": "true"},
                "managedFields": [{"manager": "kubectl"}]},
            "spec": {"scaleTargetRef": {"name": "web"}, "service": "web", "idleTimeout": "1h"},
            "status": {"replicas": 1},
        }))
        .unwrap();
        let before = ss.clone();
        trim_scaled_service(&mut ss);
        assert!(ss.metadata.managed_fields.is_none());
        let a = ss.metadata.annotations.as_ref().unwrap();
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a["snooze.dev/paused"], "true");
        assert_eq!(ss.spec, before.spec);
        assert_eq!(ss.status, before.status);
        assert_eq!(ss.metadata.generation, Some(2));
    }

    #[test]
    fn only_the_built_in_kinds_with_spec_replicas_are_cached() {
        assert!(cached_kind(&GroupVersionKind::gvk(
            "apps",
            "v1",
            "Deployment"
        )));
        assert!(cached_kind(&GroupVersionKind::gvk(
            "apps",
            "v1",
            "StatefulSet"
        )));
        assert!(!cached_kind(&GroupVersionKind::gvk(
            "example.com",
            "v1",
            "Widget"
        )));
    }
}
