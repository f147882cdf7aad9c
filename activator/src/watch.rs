//! Feeds the table and the listeners from the API server: ScaledServices (settings and
//! the activator ports in their status) and the backend Services' EndpointSlices.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use futures::TryStreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use snooze_crds::ScaledService;
use snooze_crds::stats::ServiceRef;
use tokio::sync::watch;
use tracing::warn;

use crate::listeners::Listeners;
use crate::proxy::Route;
use crate::table::{Settings, Table};

pub const H2C_APP_PROTOCOL: &str = "kubernetes.io/h2c";

fn key(ss: &ScaledService) -> ServiceRef {
    ServiceRef {
        namespace: ss.namespace().unwrap_or_default(),
        name: ss.name_any(),
    }
}

fn settings(ss: &ScaledService) -> Settings {
    let a = &ss.spec.activation;
    Settings {
        timeout: a.timeout(),
        max_queued: u64::from(a.max_queued_requests),
        pod_concurrency: a.pod_concurrency as usize,
    }
}

/// Brings the table and the listeners in line with the ScaledServices.
pub async fn apply_scaled_services(
    table: &Table,
    listeners: &Arc<Listeners>,
    all: &BTreeMap<ServiceRef, ScaledService>,
) {
    let mut desired = HashMap::new();
    for (k, ss) in all {
        let status = ss.status.as_ref();
        let ports = status.map(|s| s.ports.as_slice()).unwrap_or_default();
        if ports.is_empty() {
            table.remove(k);
            continue;
        }
        let svc = table.upsert(k.clone(), &ss.spec.service, settings(ss));
        for p in ports {
            let Ok(port) = u16::try_from(p.activator_port) else {
                continue;
            };
            desired.insert(
                port,
                Arc::new(Route {
                    service: svc.clone(),
                    port_name: p.name.clone().unwrap_or_default(),
                    h2c: p.app_protocol.as_deref() == Some(H2C_APP_PROTOCOL),
                }),
            );
        }
    }
    for s in table.services() {
        if !all.contains_key(&s.key) {
            table.remove(&s.key);
        }
    }
    for (port, e) in listeners.sync(desired).await {
        warn!(port, "listener not opened: {e}");
    }
}

pub async fn scaled_services(
    client: Client,
    table: Arc<Table>,
    listeners: Arc<Listeners>,
    synced: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let api: Api<ScaledService> = Api::all(client);
    let mut all: BTreeMap<ServiceRef, ScaledService> = BTreeMap::new();
    let mut init: Option<BTreeMap<ServiceRef, ScaledService>> = None;
    let mut stream =
        std::pin::pin!(watcher::watcher(api, watcher::Config::default()).default_backoff());
    while let Some(ev) = stream.try_next().await? {
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
                all = init.take().unwrap_or_default();
                // Ready only once the listeners of every known service are open: the
                // operator publishes ready activators in the managed EndpointSlices.
                apply_scaled_services(&table, &listeners, &all).await;
                synced.send_replace(true);
                continue;
            }
            Event::Apply(ss) => {
                all.insert(key(&ss), ss);
            }
            Event::Delete(ss) => {
                all.remove(&key(&ss));
            }
        }
        apply_scaled_services(&table, &listeners, &all).await;
    }
    Ok(())
}

type SliceKey = (String, String);

/// Ready endpoints of one backend Service from all of its slices.
fn endpoints_of(
    slices: &HashMap<SliceKey, EndpointSlice>,
    ns: &str,
    svc: &str,
) -> Vec<(IpAddr, Vec<(String, u16)>)> {
    let mut out: Vec<(IpAddr, Vec<(String, u16)>)> = Vec::new();
    for ((sns, _), s) in slices {
        if sns != ns || service_of(s).as_deref() != Some(svc) {
            continue;
        }
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
        for e in &s.endpoints {
            if e.conditions.as_ref().and_then(|c| c.ready) != Some(true) {
                continue;
            }
            for a in &e.addresses {
                if let Ok(ip) = a.parse::<IpAddr>()
                    && !out.iter().any(|(i, _)| *i == ip)
                {
                    out.push((ip, ports.clone()));
                }
            }
        }
    }
    out.sort_by_key(|(ip, _)| *ip);
    out
}

fn service_of(s: &EndpointSlice) -> Option<String> {
    s.labels().get("kubernetes.io/service-name").cloned()
}

pub async fn endpoint_slices(
    client: Client,
    table: Arc<Table>,
    synced: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let api: Api<EndpointSlice> = Api::all(client);
    let cfg = watcher::Config::default()
        .labels("endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io");
    let mut slices: HashMap<SliceKey, EndpointSlice> = HashMap::new();
    let mut init: Option<HashMap<SliceKey, EndpointSlice>> = None;
    let mut stream = std::pin::pin!(watcher::watcher(api, cfg).default_backoff());
    let skey = |s: &EndpointSlice| (s.namespace().unwrap_or_default(), s.name_any());
    while let Some(ev) = stream.try_next().await? {
        let touched: Vec<(String, String)> = match ev {
            Event::Init => {
                init = Some(HashMap::new());
                vec![]
            }
            Event::InitApply(s) => {
                if let Some(i) = init.as_mut() {
                    i.insert(skey(&s), s);
                }
                vec![]
            }
            Event::InitDone => {
                let next = init.take().unwrap_or_default();
                let mut t: Vec<(String, String)> = slices
                    .values()
                    .chain(next.values())
                    .filter_map(|s| Some((s.namespace()?, service_of(s)?)))
                    .collect();
                t.sort();
                t.dedup();
                slices = next;
                synced.send_replace(true);
                t
            }
            Event::Apply(s) => {
                let t = s.namespace().zip(service_of(&s)).into_iter().collect();
                slices.insert(skey(&s), s);
                t
            }
            Event::Delete(s) => {
                slices.remove(&skey(&s));
                s.namespace().zip(service_of(&s)).into_iter().collect()
            }
        };
        for (ns, svc) in touched {
            table.set_backend_endpoints(&ns, &svc, endpoints_of(&slices, &ns, &svc));
        }
    }
    Ok(())
}
