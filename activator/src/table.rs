//! What the activator knows: the ScaledServices it serves (with their counters and
//! settings), and the ready endpoints of each backend Service.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use rand::Rng;
use snooze_crds::AsleepAnswer;
use snooze_crds::stats::{ServiceRef, ServiceStats};
use tokio::sync::{Notify, watch};

use crate::metrics::{Metrics, ServiceMetrics};

/// One ready pod of a backend Service.
#[derive(Debug)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// Target ports by the Service port's name ("" for an unnamed port).
    pub ports: Vec<(String, u16)>,
    /// Requests this activator has in flight to the pod.
    pub in_flight: AtomicUsize,
}

impl Endpoint {
    pub fn new(ip: IpAddr, ports: Vec<(String, u16)>) -> Self {
        Self {
            ip,
            ports,
            in_flight: AtomicUsize::new(0),
        }
    }

    pub fn port(&self, name: &str) -> Option<u16> {
        self.ports.iter().find(|(n, _)| n == name).map(|(_, p)| *p)
    }
}

pub type EndpointSet = Arc<Vec<Arc<Endpoint>>>;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub timeout: Duration,
    pub max_queued: u64,
    /// 0: no limit.
    pub pod_concurrency: usize,
    /// The service's idle timeout: the window of its activity summary.
    pub idle: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            max_queued: 1000,
            pod_concurrency: 0,
            idle: Duration::from_secs(300),
        }
    }
}

fn window_ms(idle: Duration) -> u64 {
    u64::try_from(idle.as_millis()).unwrap_or(u64::MAX)
}

/// One ScaledService as the data plane sees it (named so as not to be taken for a
/// Kubernetes Service).
pub struct ServiceEntry {
    pub key: ServiceRef,
    /// Text used in error bodies and logs: `namespace/name`.
    pub display: String,
    pub backend: String,
    settings: RwLock<Settings>,
    endpoints: watch::Sender<EndpointSet>,
    /// Signalled when a pod may have room again (a request to it finished).
    capacity: Notify,
    pub in_flight: AtomicU64,
    pub queued: AtomicU64,
    pub requests: AtomicU64,
    pub last_request_ms: AtomicU64,
    /// Requests answered 504 after the activation timeout.
    pub timeouts: AtomicU64,
    /// Who sent the requests that counted as activity (see `crate::activity`).
    activity: parking_lot::Mutex<crate::activity::Activity>,
    /// What the activator answers itself while no pod is ready
    /// (`activation.answerWhileAsleep`); never counted as activity.
    answers: RwLock<Arc<Vec<AsleepAnswer>>>,
    /// Whether `answers` has any entry: read on every request without the lock.
    any_answers: AtomicBool,
    /// The page for browsers (`activation.waitingPage`), when opted in.
    waiting_page: RwLock<Option<Arc<crate::waiting::Page>>>,
    pub metrics: ServiceMetrics,
    /// Endpoints as the backend's slices give them, and what the activator's own
    /// probing found (see `crate::probe` and DESIGN.md).
    pub(crate) pods: parking_lot::Mutex<BackendState>,
    /// Signalled when the not-ready endpoints change (the prober waits on it).
    pub(crate) candidates_changed: Notify,
    /// True while a prober runs for this service.
    pub(crate) probing: std::sync::atomic::AtomicBool,
}

/// The backend's endpoints by readiness, and the not-ready pods that passed the
/// activator's own probe.
#[derive(Default)]
pub(crate) struct BackendState {
    /// Ready in the slices (the kubelet's verdict).
    pub ready: PodPorts,
    /// Not ready and not terminating: pods starting up, which the prober may check.
    pub candidates: PodPorts,
    /// Candidates that passed the probe; they serve until the kubelet agrees (they
    /// move to `ready`), their probe fails, or they leave.
    pub probed: std::collections::HashSet<IpAddr>,
    /// The check to run, from the ScaledService's status (`None`: wait for the kubelet).
    pub probe: Option<Arc<crate::probe::Probe>>,
}

impl BackendState {
    /// The endpoints requests may go to: ready ones, then probed candidates.
    fn usable(&self) -> PodPorts {
        let mut out = self.ready.clone();
        for (ip, ports) in &self.candidates {
            if self.probed.contains(ip) && !out.iter().any(|(i, _)| i == ip) {
                out.push((*ip, ports.clone()));
            }
        }
        out
    }
}

impl ServiceEntry {
    pub fn new(
        key: ServiceRef,
        backend: String,
        settings: Settings,
        metrics: ServiceMetrics,
    ) -> Self {
        let display = format!("{}/{}", key.namespace, key.name);
        Self {
            key,
            display,
            backend,
            settings: RwLock::new(settings),
            endpoints: watch::channel(Arc::new(Vec::new())).0,
            capacity: Notify::new(),
            in_flight: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            last_request_ms: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            activity: parking_lot::Mutex::new(Default::default()),
            answers: RwLock::new(Arc::new(Vec::new())),
            any_answers: AtomicBool::new(false),
            waiting_page: RwLock::new(None),
            metrics,
            pods: parking_lot::Mutex::new(BackendState::default()),
            candidates_changed: Notify::new(),
            probing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Takes in the backend's endpoints from its slices: ready ones, and not-ready,
    /// not-terminating ones (candidates for the activator's own probe). A probed pod
    /// that is no longer a candidate (ready now, terminating, or gone) loses its mark.
    pub fn set_backend(&self, ready: PodPorts, candidates: PodPorts) {
        let usable = {
            let mut b = self.pods.lock();
            b.ready = ready;
            b.candidates = candidates;
            let keep: std::collections::HashSet<IpAddr> =
                b.candidates.iter().map(|(ip, _)| *ip).collect();
            b.probed.retain(|ip| keep.contains(ip));
            b.usable()
        };
        self.set_endpoints(usable);
        self.candidates_changed.notify_waiters();
    }

    /// Marks a candidate as passing (or no longer passing) the activator's probe.
    pub fn set_probed(&self, ip: IpAddr, passing: bool) {
        let usable = {
            let mut b = self.pods.lock();
            let changed = if passing {
                b.candidates.iter().any(|(i, _)| *i == ip) && b.probed.insert(ip)
            } else {
                b.probed.remove(&ip)
            };
            if !changed {
                return;
            }
            b.usable()
        };
        self.set_endpoints(usable);
    }

    /// The probe the activator runs on new pods (from the ScaledService's status).
    pub fn set_probe(&self, probe: Option<crate::probe::Probe>) {
        let mut b = self.pods.lock();
        if b.probe.as_deref() != probe.as_ref() {
            b.probe = probe.map(Arc::new);
        }
    }

    pub fn set_answers(&self, answers: &[AsleepAnswer]) {
        if self.answers.read().as_slice() != answers {
            *self.answers.write() = Arc::new(answers.to_vec());
            self.any_answers
                .store(!answers.is_empty(), Ordering::Release);
        }
    }

    pub fn set_waiting_page(&self, spec: Option<&snooze_crds::WaitingPage>) {
        let page = spec.map(crate::waiting::Page::new);
        if self.waiting_page.read().as_deref() != page.as_ref() {
            *self.waiting_page.write() = page.map(Arc::new);
        }
    }

    /// The waiting page, when the service has one.
    pub fn waiting_page(&self) -> Option<Arc<crate::waiting::Page>> {
        self.waiting_page.read().clone()
    }

    /// The `answerWhileAsleep` entry for a request, if one matches (`path` without
    /// the query); cloned only when it does.
    pub fn asleep_answer(&self, method: &str, path: &str) -> Option<AsleepAnswer> {
        let answers = self.answers.read();
        answers.iter().find(|a| a.matches(method, path)).cloned()
    }

    /// Whether a request is an `answerWhileAsleep` one (nothing cloned).
    pub fn is_asleep_answer(&self, method: &str, path: &str) -> bool {
        self.answers.read().iter().any(|a| a.matches(method, path))
    }

    /// Whether any `answerWhileAsleep` entry is set (most services have none, and the
    /// fast path then skips looking).
    pub fn has_answers(&self) -> bool {
        self.any_answers.load(Ordering::Acquire)
    }

    /// Counts a request (or connection) that is activity in the summary of who keeps
    /// the service awake.
    pub fn seen(&self, seen: &crate::activity::Seen, now_ms: u64) {
        if !crate::activity::enabled() {
            return;
        }
        // The window is read only when the summary is full (a lock of its own).
        let window = || window_ms(self.settings().idle);
        self.activity.lock().record(seen, now_ms, window);
    }

    pub fn settings(&self) -> Settings {
        *self.settings.read()
    }

    pub fn set_settings(&self, s: Settings) {
        *self.settings.write() = s;
        self.capacity.notify_waiters();
    }

    /// Whether a pod is there for the Service port `port_name`.
    pub fn has_pod(&self, port_name: &str) -> bool {
        self.endpoints
            .borrow()
            .iter()
            .any(|e| e.port(port_name).is_some())
    }

    pub fn endpoints(&self) -> EndpointSet {
        self.endpoints.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<EndpointSet> {
        self.endpoints.subscribe()
    }

    /// Replaces the endpoint set, keeping the in-flight counts of pods that stay.
    pub fn set_endpoints(&self, next: PodPorts) {
        let old = self.endpoints();
        let set: Vec<Arc<Endpoint>> = next
            .into_iter()
            .map(|(ip, ports)| {
                old.iter()
                    .find(|e| e.ip == ip && e.ports == ports)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(ip, ports)))
            })
            .collect();
        self.endpoints.send_replace(Arc::new(set));
        self.capacity.notify_waiters();
    }

    /// A pod with room for one more request on the given Service port, chosen by
    /// the power of two choices over in-flight requests; the slot is reserved.
    /// Pods in `exclude` (they refused a connection for this request) are passed over.
    pub fn pick(&self, port_name: &str, limit: usize, exclude: &[SocketAddr]) -> Option<Slot> {
        let set = self.endpoints();
        let usable = |e: &Endpoint| {
            e.port(port_name)
                .is_some_and(|p| !exclude.contains(&SocketAddr::new(e.ip, p)))
                && (limit == 0 || e.in_flight.load(Ordering::Relaxed) < limit)
        };
        let n = set.len();
        let chosen = match n {
            0 => None,
            1 => usable(&set[0]).then(|| set[0].clone()),
            _ => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (&set[a], &set[b]);
                match (usable(ea), usable(eb)) {
                    (true, true) => Some(
                        if eb.in_flight.load(Ordering::Relaxed)
                            < ea.in_flight.load(Ordering::Relaxed)
                        {
                            eb.clone()
                        } else {
                            ea.clone()
                        },
                    ),
                    (true, false) => Some(ea.clone()),
                    (false, true) => Some(eb.clone()),
                    (false, false) => set
                        .iter()
                        .filter(|e| usable(e))
                        .min_by_key(|e| e.in_flight.load(Ordering::Relaxed))
                        .cloned(),
                }
            }
        }?;
        let before = chosen.in_flight.fetch_add(1, Ordering::AcqRel);
        if limit > 0 && before >= limit {
            chosen.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let port = chosen.port(port_name)?;
        Some(Slot {
            endpoint: chosen,
            port,
        })
    }

    /// Waits until the endpoints change or a pod gets room, whichever is first.
    pub async fn changed(&self, rx: &mut watch::Receiver<EndpointSet>) {
        tokio::select! {
            _ = rx.changed() => {}
            _ = self.capacity.notified() => {}
        }
    }

    pub fn release(&self, endpoint: &Endpoint) {
        endpoint.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.capacity.notify_one();
    }

    pub fn stats(&self) -> ServiceStats {
        ServiceStats {
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            last_request_ms: self.last_request_ms.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            activity: self
                .activity
                .lock()
                .snapshot(crate::admit::now_ms(), window_ms(self.settings().idle)),
        }
    }
}

/// A reserved place on one pod; give it back with [`ServiceEntry::release`].
pub struct Slot {
    pub endpoint: Arc<Endpoint>,
    pub port: u16,
}

type BackendKey = (String, String);
/// Ready pods of a backend Service: IP and target ports by Service port name.
pub type PodPorts = Vec<(IpAddr, Vec<(String, u16)>)>;

/// All services and backend endpoints, shared by the listeners, the watchers and the
/// stats stream.
pub struct Table {
    services: RwLock<HashMap<ServiceRef, Arc<ServiceEntry>>>,
    /// The services of each backend Service (an endpoint change touches only them).
    by_backend: RwLock<HashMap<BackendKey, Vec<Arc<ServiceEntry>>>>,
    /// Ready and not-ready (candidate) endpoints of each backend Service.
    endpoints: RwLock<HashMap<BackendKey, (PodPorts, PodPorts)>>,
    pub metrics: Arc<Metrics>,
    /// Requests waiting across all services, and the bound on them.
    pub queued_total: AtomicU64,
    pub max_queued_total: u64,
    /// Most requests one service may hold, whatever its own bound says: a quarter of
    /// the activator-wide bound unless set, so one service's flood leaves room for
    /// every other cold service.
    pub max_queued_per_service: u64,
}

impl Table {
    pub fn new(metrics: Arc<Metrics>, max_queued_total: u64) -> Self {
        Self {
            services: RwLock::new(HashMap::new()),
            by_backend: RwLock::new(HashMap::new()),
            endpoints: RwLock::new(HashMap::new()),
            metrics,
            queued_total: AtomicU64::new(0),
            max_queued_total,
            max_queued_per_service: (max_queued_total / 4).max(1),
        }
    }

    /// Backend Services whose endpoints the table holds.
    pub fn backends_with_endpoints(&self) -> usize {
        self.endpoints.read().len()
    }

    pub fn get(&self, key: &ServiceRef) -> Option<Arc<ServiceEntry>> {
        self.services.read().get(key).cloned()
    }

    pub fn services(&self) -> Vec<Arc<ServiceEntry>> {
        self.services.read().values().cloned().collect()
    }

    /// Adds or updates a service; an existing one keeps its counters and waiters.
    pub fn upsert(&self, key: ServiceRef, backend: &str, settings: Settings) -> Arc<ServiceEntry> {
        if let Some(s) = self.get(&key)
            && s.backend == backend
        {
            if s.settings() != settings {
                s.set_settings(settings);
            }
            return s;
        }
        let metrics = self.metrics.service(&key.namespace, &key.name);
        let svc = Arc::new(ServiceEntry::new(
            key.clone(),
            backend.to_string(),
            settings,
            metrics,
        ));
        let (ready, candidates) = self
            .endpoints
            .read()
            .get(&(key.namespace.clone(), backend.to_string()))
            .cloned()
            .unwrap_or_default();
        svc.set_backend(ready, candidates);
        let old = self.services.write().insert(key.clone(), svc.clone());
        let mut by_backend = self.by_backend.write();
        if let Some(old) = old {
            Self::unindex(&mut by_backend, &old);
        }
        by_backend
            .entry((key.namespace.clone(), backend.to_string()))
            .or_default()
            .push(svc.clone());
        svc
    }

    pub fn remove(&self, key: &ServiceRef) {
        let Some(old) = self.services.write().remove(key) else {
            return;
        };
        Self::unindex(&mut self.by_backend.write(), &old);
        self.metrics.remove_service(&key.namespace, &key.name);
    }

    fn unindex(
        by_backend: &mut HashMap<BackendKey, Vec<Arc<ServiceEntry>>>,
        svc: &Arc<ServiceEntry>,
    ) {
        let k = (svc.key.namespace.clone(), svc.backend.clone());
        if let Some(list) = by_backend.get_mut(&k) {
            list.retain(|s| !Arc::ptr_eq(s, svc));
            if list.is_empty() {
                by_backend.remove(&k);
            }
        }
    }

    /// Sets the endpoints of a backend Service (ready ones, and not-ready ones the
    /// activator may probe) and hands them to its services; returns the pod addresses
    /// (IP and port) that it had and no longer has, whose connections must go.
    pub fn set_backend_endpoints(
        &self,
        namespace: &str,
        backend: &str,
        ready: PodPorts,
        candidates: PodPorts,
    ) -> Vec<SocketAddr> {
        // A backend with no endpoint left (its slices deleted, or its Service) is
        // forgotten: the table holds the Services that have endpoints, not every one
        // ever seen.
        let key = (namespace.to_string(), backend.to_string());
        let (old_ready, old_candidates) = {
            let mut eps = self.endpoints.write();
            if ready.is_empty() && candidates.is_empty() {
                eps.remove(&key)
            } else {
                eps.insert(key, (ready.clone(), candidates.clone()))
            }
        }
        .unwrap_or_default();
        let addrs = |a: &PodPorts, b: &PodPorts| -> Vec<SocketAddr> {
            a.iter()
                .chain(b)
                .flat_map(|(ip, ports)| ports.iter().map(|(_, port)| SocketAddr::new(*ip, *port)))
                .collect()
        };
        let now = addrs(&ready, &candidates);
        let gone: Vec<SocketAddr> = addrs(&old_ready, &old_candidates)
            .into_iter()
            .filter(|a| !now.contains(a))
            .collect();
        let services = self
            .by_backend
            .read()
            .get(&(namespace.to_string(), backend.to_string()))
            .cloned()
            .unwrap_or_default();
        for s in services {
            s.set_backend(ready.clone(), candidates.clone());
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> ServiceEntry {
        let m = Metrics::new();
        ServiceEntry::new(
            ServiceRef {
                namespace: "ns".into(),
                name: "web".into(),
            },
            "web".into(),
            Settings::default(),
            m.service("ns", "web"),
        )
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn pick_prefers_less_loaded_and_respects_limit() {
        let s = svc();
        s.set_endpoints(vec![
            (ip(1), vec![("http".into(), 8080)]),
            (ip(2), vec![("http".into(), 8080)]),
        ]);
        let a = s.pick("http", 1, &[]).unwrap();
        let b = s.pick("http", 1, &[]).unwrap();
        assert_ne!(
            a.endpoint.ip, b.endpoint.ip,
            "second pick goes to the idle pod"
        );
        assert!(
            s.pick("http", 1, &[]).is_none(),
            "both pods are at their limit"
        );
        s.release(&a.endpoint);
        let c = s.pick("http", 1, &[]).unwrap();
        assert_eq!(c.endpoint.ip, a.endpoint.ip);
        assert!(
            s.pick("other", 0, &[]).is_none(),
            "no pod serves an unknown port"
        );
    }

    #[test]
    fn in_flight_survives_endpoint_updates() {
        let s = svc();
        s.set_endpoints(vec![(ip(1), vec![("".into(), 80)])]);
        let a = s.pick("", 0, &[]).unwrap();
        s.set_endpoints(vec![
            (ip(1), vec![("".into(), 80)]),
            (ip(2), vec![("".into(), 80)]),
        ]);
        let kept = s
            .endpoints()
            .iter()
            .find(|e| e.ip == ip(1))
            .unwrap()
            .clone();
        assert_eq!(kept.in_flight.load(Ordering::Relaxed), 1);
        assert!(Arc::ptr_eq(&kept, &a.endpoint));
    }
}
