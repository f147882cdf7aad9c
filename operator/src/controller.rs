//! Reconciliation of one ScaledService: read, validate the references, build the
//! routing objects as data, apply what differs, decide and write the replicas, write
//! the status when it changed. Runs only on the leader.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use parking_lot::Mutex;
use serde_json::json;
use snooze_crds::stats::ServiceRef;
use snooze_crds::{FINALIZER, MANAGER, PortStatus, ScaledService, ScaledServiceStatus};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::autoscale::{self, Autoscale, Replicas, Sample, ScaleState};
use crate::decision::{self, Load, Policy, Reason};
use crate::metrics::{Metrics, ScaleLabels, ServiceLabels};
use crate::objects;
use crate::ports::{Exhausted, PortAllocator};
use crate::replicas::{self, Applied};
use crate::stats::StatsStore;
use crate::status::{self, Problem};
use crate::{bypass, group, wakefail};

pub use crate::activators::Activators;

pub struct Context {
    pub client: Client,
    pub store: Store<ScaledService>,
    /// EndpointSlices of backend Services (managed by the EndpointSlice controller).
    pub slices: Store<EndpointSlice>,
    pub ports: Mutex<PortAllocator>,
    pub stats: Arc<StatsStore>,
    pub activators: watch::Receiver<Activators>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub started: SystemTime,
    /// Resolved scale targets by group/version/kind (None: not scalable).
    pub discovery: Mutex<HashMap<GroupVersionKind, Option<ApiResource>>>,
    /// Bound on every API call.
    pub api_timeout: Duration,
    /// What this leader remembers of each ScaledService (dropped on delete).
    pub services: Mutex<HashMap<ServiceRef, ServiceState>>,
    /// The routes of a namespace as last listed, shared by its ScaledServices for
    /// `ROUTES_FRESH` (`check_routes`).
    pub routes: Mutex<HashMap<String, ListedRoutes>>,
    /// The activators' ceiling on one service's held requests (`queue_share` is
    /// clamped to it).
    pub max_queued_per_service: u32,
}

/// A namespace's routes and when they were listed.
pub type ListedRoutes = (Instant, Arc<Vec<bypass::Route>>);

/// What the leader remembers of one ScaledService between reconciles and ticks. A new
/// leader starts from the API objects (status included) and builds this up again.
#[derive(Default)]
pub struct ServiceState {
    /// Replicas (current, ready) as last read; `None` until a reconcile programmed it
    /// (the autoscaler leaves it alone until then).
    pub replicas: Option<(i32, i32)>,
    /// Per-second load samples (trimmed to the autoscaler's longest window).
    pub history: VecDeque<Sample>,
    /// The autoscaler's memory (last change, panic).
    pub scale: ScaleState,
    /// The last scale the operator made: when and why (for the status).
    pub last_scale: Option<(Time, String)>,
    /// The replicas the workload had when this leader took it over, until the status
    /// shows them: a reconcile that reads a cached object from before the first status
    /// write must not record the replicas Snooze itself set as the original ones.
    pub original: Option<i32>,
    /// A wake in progress or just done: repeated signals for the same cold start
    /// (every waiting request, every activator) patch once.
    pub waking: Option<Instant>,
    /// Activation timeouts (504s) the activators reported, as last seen.
    pub timeouts_seen: Option<u64>,
    /// When (and at which generation) this leader last looked for routes that bypass
    /// the managed Service, and what it found (`bypass`).
    pub routes_checked: Option<(Instant, Option<i64>)>,
    pub routes_reported: Vec<String>,
    /// The `WakeSucceeded` condition as this leader last wrote it (`wake_outcome`).
    pub wake_condition: Option<Condition>,
    /// Reconciles of this object that failed in a row (the error policy's backoff).
    pub failures: u32,
}

impl Context {
    /// Runs `f` on the remembered state of `key` (created empty on first use).
    pub fn state<R>(&self, key: &ServiceRef, f: impl FnOnce(&mut ServiceState) -> R) -> R {
        f(self.services.lock().entry(key.clone()).or_default())
    }
}

/// The needs of the ScaledServices of `ns` (`group`), and the names that exist there.
fn namespace_needs(ctx: &Context, ns: &str) -> (group::Needs, BTreeSet<String>) {
    all_needs(&ctx.store.state()).remove(ns).unwrap_or_default()
}

/// [`namespace_needs`] of every namespace, in one pass.
fn all_needs(all: &[Arc<ScaledService>]) -> HashMap<String, (group::Needs, BTreeSet<String>)> {
    let mut out: HashMap<String, (group::Needs, BTreeSet<String>)> = HashMap::new();
    for s in all {
        let (needs, names) = out.entry(s.namespace().unwrap_or_default()).or_default();
        let name = s.name_any();
        if !s.spec.needs.is_empty() {
            needs.insert(name.clone(), s.spec.needs.clone());
        }
        names.insert(name);
    }
    out
}

/// The awake ScaledServices that hold `name` of `ns` awake (`group::needed_by`),
/// awake as this leader last read their replicas.
fn held_by(
    ctx: &Context,
    ns: &str,
    name: &str,
    needs: &group::Needs,
    names: &BTreeSet<String>,
) -> Vec<String> {
    if needs.is_empty() {
        return Vec::new();
    }
    let awake = |n: &str| {
        let key = ServiceRef {
            namespace: ns.to_string(),
            name: n.to_string(),
        };
        ctx.services
            .lock()
            .get(&key)
            .and_then(|st| st.replicas)
            .is_some_and(|(current, _)| current > 0)
    };
    group::needed_by(needs, name, |n| names.contains(n), awake)
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("API call timed out")]
    Timeout,
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error(transparent)]
    Ports(#[from] Exhausted),
    #[error("writing the replicas of {workload}: {source}")]
    Replicas {
        workload: String,
        #[source]
        source: replicas::WriteError,
    },
}

impl Error {
    /// The cause, for the `reconcile_errors` metric: an error inside the finalizer's
    /// apply or cleanup is labelled by what failed there, not `finalizer`.
    pub fn metric_label(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Kube(_) => "kube",
            Error::Timeout => "timeout",
            Error::Ports(_) => "ports_exhausted",
            Error::Replicas { .. } => "replicas",
            Error::Finalizer(f) => match f.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.metric_label(),
                F::AddFinalizer(_) | F::RemoveFinalizer(_) => "finalizer_patch",
                F::UnnamedObject => "unnamed_object",
                F::InvalidFinalizer => "invalid_finalizer",
            },
        }
    }
}

async fn timed<T>(ctx: &Context, f: impl Future<Output = kube::Result<T>>) -> Result<T, Error> {
    match tokio::time::timeout(ctx.api_timeout, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Error::Timeout),
    }
}

fn key_of(ss: &ScaledService) -> ServiceRef {
    ServiceRef {
        namespace: ss.namespace().unwrap_or_default(),
        name: ss.name_any(),
    }
}

/// The policy now: `minReplicas` raised by an active schedule (an invalid schedule
/// raises nothing; the reconcile reports it).
pub fn policy(ss: &ScaledService) -> Policy {
    let floor = crate::schedule::floor_at(&ss.spec.schedules, SystemTime::now()).unwrap_or(0);
    Policy {
        min_replicas: ss.spec.min_replicas.max(floor.min(ss.spec.max_replicas)),
        max_replicas: ss.spec.max_replicas,
        idle_timeout: ss.spec.idle_timeout(),
        wake_replicas: ss.spec.scaling.wake_replicas,
        max_step: ss.spec.scaling.max_scale_down_step,
    }
}

pub fn autoscale_policy(ss: &ScaledService) -> Autoscale {
    let p = &ss.spec.scaling;
    Autoscale {
        metric: p.metric,
        target: f64::from(p.target),
        stable_window: p.stable_window.into(),
        panic_window: p.panic_window.into(),
        panic_threshold: f64::from(p.panic_threshold_percent) / 100.0,
        max_scale_up_rate: f64::from(p.max_scale_up_rate_percent) / 100.0,
        scale_down_delay: p.scale_down_delay.into(),
        max_scale_down_step: p.max_scale_down_step,
    }
}

/// When the idle clock starts: the last request the status recorded, or when Snooze
/// took the workload over (this operator's start at the earliest).
fn idle_since(ctx: &Context, ss: &ScaledService) -> SystemTime {
    let created = ss
        .metadata
        .creation_timestamp
        .as_ref()
        .map(to_system)
        .unwrap_or(ctx.started);
    let last = ss
        .status
        .as_ref()
        .and_then(|s| s.last_request_time.as_ref())
        .map(to_system)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    // A wake is activity: the idle clock starts over from it (a pod woken by a request
    // whose report came late was scaled down seconds later).
    let woken = ctx
        .state(&key_of(ss), |st| st.last_scale.clone())
        .filter(|(_, why)| why == Reason::Wake.as_str())
        .map(|(t, _)| to_system(&t))
        .into_iter()
        .chain(
            ss.status
                .as_ref()
                .filter(|s| s.last_scale_reason.as_deref() == Some(Reason::Wake.as_str()))
                .and_then(|s| s.last_scale_time.as_ref())
                .map(to_system),
        )
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    created.max(ctx.started).max(last).max(woken)
}

/// Once a second on the leader: record every service's load and let the autoscaler
/// follow it. Writes only when the replicas change.
pub async fn autoscale_tick(
    ctx: &Context,
    trigger: &tokio::sync::mpsc::Sender<ObjectRef<ScaledService>>,
) {
    let now = SystemTime::now();
    let activators = ctx.activators.borrow().stats_addrs.clone();
    let all = ctx.store.state();
    let groups = all_needs(&all);
    let none = Default::default();
    for ss in all {
        let key = key_of(&ss);
        let Some((current, ready)) = ctx.services.lock().get(&key).and_then(|st| st.replicas)
        else {
            continue;
        };
        if ss.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let mut load = ctx.stats.load(&key, &activators);
        let (needs, names) = groups.get(&key.namespace).unwrap_or(&none);
        let held = held_by(ctx, &key.namespace, &key.name, needs, names);
        load.needed = !held.is_empty();
        let shown: &[String] = ss
            .status
            .as_ref()
            .map(|s| s.needed_by.as_slice())
            .unwrap_or_default();
        if held.as_slice() != shown {
            // The status says who holds it (the reconcile writes it).
            let _ = trigger.try_send(ObjectRef::from_obj(ss.as_ref()));
        }
        let ap = autoscale_policy(&ss);
        let samples: Vec<Sample> = ctx.state(&key, |st| {
            let q = &mut st.history;
            q.push_back(Sample {
                at: now,
                // in_flight counts every request from its arrival to its answer, the
                // queued ones included.
                concurrency: load.in_flight as f64,
                requests: load.requests,
            });
            let keep = ap.stable_window.max(ap.panic_window) + Duration::from_secs(2);
            while q
                .front()
                .is_some_and(|s| now.duration_since(s.at).unwrap_or_default() > keep)
            {
                q.pop_front();
            }
            q.iter().copied().collect()
        });
        let pol = policy(&ss);
        if current > 0 {
            let state = ctx.state(&key, |st| st.scale);
            let r = Replicas {
                current,
                ready,
                floor: pol.min_replicas,
                max: pol.max_replicas,
            };
            let (wants, next, _why) = autoscale::desired(&ap, &samples, r, state, now);
            ctx.state(&key, |st| st.scale = next);
            load.wants = Some(wants);
        }
        let d = decision::decide(&pol, current, &load, now, idle_since(ctx, &ss));
        if d.desired == current {
            // The status shows the last request within a couple of seconds (the
            // reconcile writes it at most once a minute, `status::LAST_REQUEST_RESOLUTION`).
            let shown = ss
                .status
                .as_ref()
                .and_then(|s| s.last_request_time.as_ref())
                .map(to_system);
            // New activation timeouts are told at once (a Warning event, and the
            // `WakeSucceeded` condition).
            let timed_out = load.complete
                && ctx.state(&key, |st| {
                    st.timeouts_seen.is_some_and(|s| load.timeouts > s)
                });
            if timed_out
                || load
                    .last_request
                    .is_some_and(|t| status::show_last_request(shown, t))
            {
                let _ = trigger.try_send(ObjectRef::from_obj(ss.as_ref()));
            }
            continue;
        }
        let api = match scale_api(ctx, &ss).await {
            Ok(Ok(api)) => api,
            Ok(Err(p)) => {
                debug!(service = ?key, "autoscale: {}", p.message);
                continue;
            }
            Err(e) => {
                ctx.metrics.tick_errors.inc();
                warn!(service = ?key, "autoscale: discovery: {e}");
                continue;
            }
        };
        // Decided on the cached replicas; written only to the workload as it is now,
        // decided again (bounds, idle, the load's wish) if it changed meanwhile.
        let idle = idle_since(ctx, &ss);
        let mut first = Some(d);
        let decide = |now: i32| {
            let d = match first.take() {
                Some(d) if now == current => d,
                _ => decision::decide(&pol, now, &load, SystemTime::now(), idle),
            };
            Some((d.desired, d.reason))
        };
        match change_replicas(ctx, &ss, &api, None, None, decide).await {
            Ok(Applied::Changed { to, why, .. }) => {
                ctx.state(&key, |st| {
                    st.replicas = Some((to, ready));
                    st.last_scale = Some((now_time(), why.as_str().into()));
                });
                let _ = trigger.try_send(ObjectRef::from_obj(ss.as_ref()));
            }
            Ok(Applied::Unchanged { replicas }) => {
                ctx.state(&key, |st| st.replicas = Some((replicas, ready)));
            }
            Err(e) => {
                ctx.metrics.tick_errors.inc();
                warn!(service = ?key, "autoscale: {e}");
            }
        }
    }
}

pub async fn reconcile(ss: Arc<ScaledService>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let ns = ss.namespace().unwrap_or_default();
    let api: Api<ScaledService> = Api::namespaced(ctx.client.clone(), &ns);
    let key = key_of(&ss);
    let r = finalizer(&api, FINALIZER, ss, |ev| async {
        match ev {
            Finalizer::Apply(ss) => apply(ss, &ctx).await,
            Finalizer::Cleanup(ss) => cleanup(ss, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if r.is_ok()
        && let Some(st) = ctx.services.lock().get_mut(&key)
    {
        st.failures = 0;
    }
    r
}

/// How long after its `failures`-th failure in a row an object is reconciled again:
/// 5 s, doubling, at most 5 minutes.
pub fn retry_after(failures: u32) -> Duration {
    let base = Duration::from_secs(5);
    base.saturating_mul(1 << failures.saturating_sub(1).min(6))
        .min(Duration::from_secs(300))
}

pub fn error_policy(ss: Arc<ScaledService>, err: &Error, ctx: Arc<Context>) -> Action {
    // (the label is the cause inside the finalizer: see `Error::metric_label`)
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::ErrorLabels {
            error: err.metric_label(),
        })
        .inc();
    // Counted only for objects this leader knows (a deleted one's state is gone and
    // stays gone).
    let key = key_of(&ss);
    let failures = ctx.services.lock().get_mut(&key).map_or(1, |st| {
        st.failures = st.failures.saturating_add(1);
        st.failures
    });
    let after = retry_after(failures);
    warn!(
        namespace = %key.namespace,
        name = %key.name,
        failures,
        retry_in_s = after.as_secs(),
        "reconcile failed: {err}"
    );
    Action::requeue(after)
}

/// The older of two ScaledServices that claim one workload keeps it.
fn conflicting_owner(ctx: &Context, ss: &ScaledService) -> Option<String> {
    let mine = (ss.metadata.creation_timestamp.clone(), ss.name_any());
    other_claimants(ctx, ss)
        .into_iter()
        .find(|o| (o.metadata.creation_timestamp.clone(), o.name_any()) < mine)
        .map(|o| o.name_any())
}

/// The other live ScaledServices that name the same workload.
fn other_claimants(ctx: &Context, ss: &ScaledService) -> Vec<Arc<ScaledService>> {
    let ns = ss.namespace();
    ctx.store
        .state()
        .into_iter()
        .filter(|o| {
            o.namespace() == ns && o.uid() != ss.uid() && o.metadata.deletion_timestamp.is_none()
        })
        .filter(|o| {
            o.spec.scale_target_ref.name == ss.spec.scale_target_ref.name
                && o.spec.scale_target_ref.kind == ss.spec.scale_target_ref.kind
                && group(&o.spec.scale_target_ref.api_version)
                    == group(&ss.spec.scale_target_ref.api_version)
        })
        .collect()
}

fn group(api_version: &str) -> &str {
    api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("")
}

/// The `/scale`-capable API of the target, or why there is none.
async fn scale_api(
    ctx: &Context,
    ss: &ScaledService,
) -> Result<Result<Api<DynamicObject>, Problem>, Error> {
    let r = &ss.spec.scale_target_ref;
    let (g, v) = r
        .api_version
        .rsplit_once('/')
        .unwrap_or(("", r.api_version.as_str()));
    let gvk = GroupVersionKind::gvk(g, v, &r.kind);
    let cached = ctx.discovery.lock().get(&gvk).cloned();
    let ar = match cached {
        Some(a) => a,
        None => {
            let found = match tokio::time::timeout(
                ctx.api_timeout,
                kube::discovery::pinned_kind(&ctx.client, &gvk),
            )
            .await
            {
                Err(_) => return Err(Error::Timeout),
                Ok(Ok((ar, caps))) => caps
                    .subresources
                    .iter()
                    .any(|(sub, _)| sub.plural.ends_with("scale"))
                    .then_some(ar),
                Ok(Err(kube::Error::Discovery(_))) => None,
                Ok(Err(kube::Error::Api(e))) if e.code == 404 => None,
                Ok(Err(e)) => return Err(e.into()),
            };
            ctx.discovery.lock().insert(gvk.clone(), found.clone());
            found
        }
    };
    Ok(match ar {
        Some(ar) => Ok(Api::namespaced_with(
            ctx.client.clone(),
            &ss.namespace().unwrap_or_default(),
            &ar,
        )),
        None => Err(Problem {
            reason: "TargetNotScalable",
            message: format!(
                "{} {} has no /scale subresource (or the kind is not served)",
                r.api_version, r.kind
            ),
        }),
    })
}

/// The ready activators that listen on every one of `ports` (the ones an ingress may be
/// sent to for this ScaledService). An activator opens a new service's listeners only
/// once its watch delivers the status with the ports, a few milliseconds after the
/// operator wrote it; listing it before would get connections refused.
fn serving_activators(ctx: &Context, activators: &Activators, ports: &[PortStatus]) -> Vec<String> {
    let ports: Vec<u16> = ports
        .iter()
        .filter_map(|p| u16::try_from(p.activator_port).ok())
        .collect();
    activators
        .ips
        .iter()
        .filter(|ip| {
            let ip: Option<std::net::IpAddr> = ip.parse().ok();
            activators
                .stats_addrs
                .iter()
                .filter(|a| Some(a.ip()) == ip)
                .all(|a| ctx.stats.serves(a, &ports))
        })
        .cloned()
        .collect()
}

async fn publish(ctx: &Context, ss: &ScaledService, type_: EventType, reason: &str, note: String) {
    let reference: ObjectReference = ss.object_ref(&());
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
        warn!("publishing event: {e}");
    }
}

fn ready_endpoints(ctx: &Context, ns: &str, service: &str) -> i32 {
    let mut ips: Vec<&str> = Vec::new();
    let state = ctx.slices.state();
    for s in state.iter().filter(|s| {
        s.metadata.namespace.as_deref() == Some(ns)
            && s.labels()
                .get("kubernetes.io/service-name")
                .map(String::as_str)
                == Some(service)
    }) {
        for e in &s.endpoints {
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(true) {
                ips.extend(e.addresses.iter().map(String::as_str));
            }
        }
    }
    ips.sort_unstable();
    ips.dedup();
    ips.len() as i32
}

fn now_time() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn to_time(t: SystemTime) -> Option<Time> {
    k8s_openapi::jiff::Timestamp::try_from(t).ok().map(Time)
}

fn to_system(t: &Time) -> SystemTime {
    SystemTime::from(t.0)
}

async fn apply(ss: Arc<ScaledService>, ctx: &Context) -> Result<Action, Error> {
    let ns = ss.namespace().unwrap_or_default();
    let name = ss.name_any();
    let old = ss.status.clone().unwrap_or_default();
    let gen_ = ss.metadata.generation;
    let now = now_time();
    let mut status = ScaledServiceStatus {
        observed_generation: gen_,
        ..old.clone()
    };

    // 1. References.
    let conflict = conflicting_owner(ctx, &ss);
    let backend = if conflict.is_none() {
        let svcs: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
        timed(ctx, svcs.get_opt(&ss.spec.service)).await?
    } else {
        None
    };
    let selects_pods = backend
        .as_ref()
        .and_then(|b| b.spec.as_ref())
        .and_then(|s| s.selector.as_ref())
        .is_some_and(|s| !s.is_empty());
    let backend_ports: Vec<(Option<&str>, i32)> = backend
        .iter()
        .flat_map(|b| b.spec.iter().flat_map(|s| s.ports.iter().flatten()))
        .map(|p| (p.name.as_deref(), p.port))
        .collect();
    let problem =
        status::references_problem(&ss, conflict.as_deref(), backend.is_some(), selects_pods)
            .or_else(|| {
                backend
                    .as_ref()
                    .and_then(|_| status::ports_problem(&ss, &backend_ports))
            });
    // The managed objects as they are: a name held by objects this ScaledService did
    // not create is a problem of its own (they are never taken over).
    let svc_name = ss.managed_service_name();
    let svcs: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let (have_svc, have_slice) = if problem.is_none() {
        (
            timed(ctx, svcs.get_opt(&svc_name)).await?,
            timed(ctx, slices.get_opt(&svc_name)).await?,
        )
    } else {
        (None, None)
    };
    let problem = problem.or_else(|| {
        status::name_taken(
            &ss,
            have_svc.as_ref().map(|s| &s.metadata),
            have_slice.as_ref().map(|s| &s.metadata),
        )
    });
    let (target, problem) = match problem {
        Some(p) => (None, Some(p)),
        None => match scale_api(ctx, &ss).await? {
            Err(p) => (None, Some(p)),
            Ok(api) => match timed(ctx, api.get_scale(&ss.spec.scale_target_ref.name)).await {
                Ok(scale) => (Some((api, scale)), None),
                Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => (
                    None,
                    Some(Problem {
                        reason: "TargetNotFound",
                        message: format!(
                            "{} {} not found in namespace {ns}",
                            ss.spec.scale_target_ref.kind, ss.spec.scale_target_ref.name
                        ),
                    }),
                ),
                Err(e) => return Err(e),
            },
        },
    };

    // Activator ports, one per Service port: refused when the range is full or the
    // namespace holds its limit, which the status says.
    let mut problem = problem;
    let mut ports = Vec::new();
    if problem.is_none()
        && let Some(backend) = &backend
    {
        let assigned = {
            let mut alloc = ctx.ports.lock();
            objects::port_statuses(&ss, backend, &mut alloc)
        };
        match assigned {
            Ok(p) => ports = p,
            Err(e) => {
                problem = Some(Problem {
                    reason: e.reason(),
                    message: e.to_string(),
                })
            }
        }
    }
    if let Some(p) = problem {
        let ready = objects::condition(
            &old.conditions,
            "Ready",
            false,
            p.reason,
            p.message.clone(),
            gen_,
            &now,
        );
        let active = objects::condition(
            &old.conditions,
            "Active",
            false,
            p.reason,
            "not programmed".into(),
            gen_,
            &now,
        );
        if old
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .is_none_or(|c| c.reason != p.reason)
        {
            publish(ctx, &ss, EventType::Warning, p.reason, p.message).await;
        }
        let wake = old
            .conditions
            .iter()
            .find(|c| c.type_ == wakefail::CONDITION)
            .cloned();
        status.conditions = [ready, active].into_iter().chain(wake).collect();
        write_status(ctx, &ss, &old, status).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    let (Some(backend), Some((scale_api, scale))) = (backend, target) else {
        return Ok(Action::requeue(Duration::from_secs(10)));
    };

    // 2. Routing objects.
    let activators = ctx.activators.borrow().clone();
    let serving = serving_activators(ctx, &activators, &ports);
    let want_svc = objects::managed_service(&ss, &ports);
    let want_slice = objects::managed_slice(&ss, &ports, &serving);
    // Forced: the fields are Snooze's alone on objects it created (checked above).
    let ssa = PatchParams::apply(MANAGER).force();
    if have_svc
        .as_ref()
        .is_none_or(|h| objects::service_differs(h, &want_svc))
    {
        timed(ctx, svcs.patch(&svc_name, &ssa, &Patch::Apply(&want_svc))).await?;
        ctx.metrics.api_writes.inc();
    }
    if have_slice
        .as_ref()
        .is_none_or(|h| objects::slice_differs(h, &want_slice))
    {
        timed(
            ctx,
            slices.patch(&svc_name, &ssa, &Patch::Apply(&want_slice)),
        )
        .await?;
        ctx.metrics.api_writes.inc();
    }

    // 3. Replicas.
    let current = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    // Recorded once, when Snooze takes the workload over (0 included): deleting the
    // ScaledService gives it back.
    let key = key_of(&ss);
    if status.original_replicas.is_none() {
        let original = ctx.state(&key, |st| *st.original.get_or_insert(current));
        status.original_replicas = Some(original);
    }
    let mut load = ctx.stats.load(&key, &activators.stats_addrs);
    let (needs, names) = namespace_needs(ctx, &ns);
    status.needed_by = held_by(ctx, &ns, &name, &needs, &names);
    load.needed = !status.needed_by.is_empty();
    let needs_condition = needs_condition(&ss, &needs, &names, &old, gen_, &now);
    let mut d = decision::decide(
        &policy(&ss),
        current,
        &load,
        SystemTime::now(),
        idle_since(ctx, &ss),
    );
    let labels = ServiceLabels {
        namespace: ns.clone(),
        name: name.clone(),
    };
    ctx.metrics
        .desired_replicas
        .get_or_create(&labels)
        .set(i64::from(d.desired));
    ctx.metrics
        .replicas
        .get_or_create(&labels)
        .set(i64::from(current));
    // Scaling down for idleness and following the load belong to the autoscaler tick
    // (one decision a second, so steps stay steps); the reconcile wakes and enforces
    // the bounds.
    if matches!(d.reason, Reason::Idle | Reason::Load) {
        d.desired = current;
        d.recheck_in = Some(d.recheck_in.unwrap_or(Duration::from_secs(30)));
    }
    let mut written = current;
    if d.desired != current {
        // Decided on the /scale just read; if the workload changed since, the bounds
        // and wakes are decided again on what is there (idle and load stay the tick's).
        let read = replicas::Read {
            replicas: current,
            version: scale.metadata.resource_version.clone(),
        };
        let pol = policy(&ss);
        let idle = idle_since(ctx, &ss);
        let mut first = Some(d);
        let decide = |now: i32| {
            let d = match first.take() {
                Some(d) => d,
                None => decision::decide(&pol, now, &load, SystemTime::now(), idle),
            };
            (!matches!(d.reason, Reason::Idle | Reason::Load)).then_some((d.desired, d.reason))
        };
        match change_replicas(ctx, &ss, &scale_api, Some(read), None, decide).await? {
            Applied::Changed { to, why, .. } => {
                written = to;
                d.desired = to;
                d.reason = why;
                status.last_scale_time = Some(now.clone());
                status.last_scale_reason = Some(why.as_str().into());
            }
            Applied::Unchanged { replicas } => {
                written = replicas;
                d.desired = replicas;
            }
        }
    }

    // 4. Status.
    let ready_replicas = ready_endpoints(ctx, &ns, &ss.spec.service);
    ctx.metrics
        .ready_replicas
        .get_or_create(&labels)
        .set(i64::from(ready_replicas));
    let last_scale = ctx.state(&key, |st| {
        st.replicas = Some((d.desired, ready_replicas));
        st.last_scale.clone()
    });
    if let Some((t, why)) = last_scale
        && status.last_scale_time.as_ref().is_none_or(|o| o.0 < t.0)
    {
        status.last_scale_time = Some(t);
        status.last_scale_reason = Some(why);
    }
    status.replicas = Some(written);
    status.ready_replicas = Some(ready_replicas);
    status.desired_replicas = Some(d.desired);
    status.service_name = Some(svc_name.clone());
    status.ports = ports;
    // The check the activators run on new pods while requests are held.
    let (probe, source) = match timed(ctx, scale_api.get_opt(&ss.spec.scale_target_ref.name)).await
    {
        Ok(t) => {
            let template = t.map(|o| serde_json::json!({"spec": o.data.get("spec")}));
            crate::probe::resolve(ss.spec.activation.probe.as_ref(), template.as_ref())
        }
        Err(e) if ss.spec.activation.probe.is_none() => (
            None,
            format!(
                "none: the workload could not be read ({e}); held requests wait for the kubelet's readiness"
            ),
        ),
        Err(_) => crate::probe::resolve(ss.spec.activation.probe.as_ref(), None),
    };
    status.activation_probe = probe;
    status.activation_probe_source = Some(source);
    status.max_queued_per_activator = Some(
        decision::queue_share(ss.spec.activation.max_queued_requests, serving.len())
            .min(i32::try_from(ctx.max_queued_per_service).unwrap_or(i32::MAX)),
    );
    if let Some(last) = load.last_request
        && status::show_last_request(old.last_request_time.as_ref().map(to_system), last)
    {
        status.last_request_time = to_time(last);
    }
    let (ok, reason, msg) = status::ready(
        serving.len(),
        activators.ips.len(),
        &svc_name,
        &ss.spec.service,
        &status.ports,
    );
    let ready = objects::condition(&old.conditions, "Ready", ok, reason, msg, gen_, &now);
    let (ok, reason, msg) = status::active(ready_replicas, status.replicas.unwrap_or(0));
    let active = objects::condition(&old.conditions, "Active", ok, reason, msg, gen_, &now);
    if ready.status == "True"
        && old
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .is_none_or(|c| c.status != "True")
    {
        publish(
            ctx,
            &ss,
            EventType::Normal,
            "Programmed",
            ready.message.clone(),
        )
        .await;
    }
    let wake = wake_outcome(ctx, &ss, &old, &load, &backend, ready_replicas, &now).await;
    if let Some(c) = &needs_condition
        && c.status == "False"
        && old
            .conditions
            .iter()
            .find(|o| o.type_ == group::CONDITION)
            .is_none_or(|o| o.reason != c.reason)
    {
        publish(ctx, &ss, EventType::Warning, &c.reason, c.message.clone()).await;
    }
    status.conditions = [ready, active]
        .into_iter()
        .chain(wake)
        .chain(needs_condition)
        .collect();
    write_status(ctx, &ss, &old, status).await?;
    check_routes(ctx, &ss).await;

    let requeue = match (d.recheck_in, d.desired) {
        (Some(r), _) => r.min(Duration::from_secs(30)),
        (None, 0) => Duration::from_secs(300),
        (None, _) => Duration::from_secs(30),
    };
    Ok(Action::requeue(requeue.max(Duration::from_millis(200))))
}

/// How often, at most, a leader looks at a ScaledService's routes when nothing changed.
const ROUTE_CHECK_EVERY: Duration = Duration::from_secs(300);
/// How long one listing of a namespace's routes serves all its ScaledServices (so the
/// lists cost one per namespace, not one per ScaledService).
const ROUTES_FRESH: Duration = Duration::from_secs(30);

/// Routes (Ingress, HTTPRoute, GRPCRoute) in the namespace that send traffic to the
/// app's own Service instead of the managed one (`bypass`): a Warning event for each one
/// not reported before. Looked at on a leader's first reconcile of the ScaledService, on
/// every spec change, and every `ROUTE_CHECK_EVERY`; a failed list (no Gateway API
/// CRDs, no RBAC) only skips that kind.
async fn check_routes(ctx: &Context, ss: &ScaledService) {
    let key = key_of(ss);
    let gen_ = ss.metadata.generation;
    let due = ctx.state(&key, |st| {
        let due = st
            .routes_checked
            .is_none_or(|(at, g)| g != gen_ || at.elapsed() >= ROUTE_CHECK_EVERY);
        if due {
            st.routes_checked = Some((Instant::now(), gen_));
        }
        due
    });
    if !due {
        return;
    }
    let ns = ss.namespace().unwrap_or_default();
    let routes = namespace_routes(ctx, &ns).await;
    let found = bypass::findings(&ns, &ss.spec.service, &ss.managed_service_name(), &routes);
    let new: Vec<String> = ctx.state(&key, |st| {
        let new = found
            .iter()
            .filter(|m| !st.routes_reported.contains(m))
            .cloned()
            .collect();
        st.routes_reported = found;
        new
    });
    for m in new {
        warn!(namespace = %ns, name = %ss.name_any(), "{m}");
        publish(ctx, ss, EventType::Warning, bypass::EVENT_REASON, m).await;
    }
}

/// The namespace's Ingresses, HTTPRoutes and GRPCRoutes: listed, or the listing of the
/// last `ROUTES_FRESH`.
async fn namespace_routes(ctx: &Context, ns: &str) -> Arc<Vec<bypass::Route>> {
    if let Some((at, r)) = ctx.routes.lock().get(ns)
        && at.elapsed() < ROUTES_FRESH
    {
        return r.clone();
    }
    let lp = ListParams::default();
    let mut routes = Vec::new();
    let ingresses: Api<Ingress> = Api::namespaced(ctx.client.clone(), ns);
    match timed(ctx, ingresses.list(&lp)).await {
        Ok(l) => routes.extend(l.items.iter().map(bypass::from_ingress)),
        Err(e) => debug!(namespace = %ns, "listing Ingresses: {e}"),
    }
    for (kind, plural) in [("HTTPRoute", "httproutes"), ("GRPCRoute", "grpcroutes")] {
        let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
        match timed(ctx, api.list(&lp)).await {
            Ok(l) => routes.extend(l.items.iter().map(|r| bypass::from_route(kind, r))),
            Err(e) => debug!(namespace = %ns, "listing {kind}s: {e}"),
        }
    }
    let routes = Arc::new(routes);
    let mut cache = ctx.routes.lock();
    cache.retain(|_, (at, _)| at.elapsed() < ROUTES_FRESH);
    cache.insert(ns.to_string(), (Instant::now(), routes.clone()));
    routes
}

/// The `WakeSucceeded` condition (see `wakefail`): False, with a Warning event, when
/// the activators report new activation timeouts; True again once a pod is ready;
/// absent until a wake first fails.
async fn wake_outcome(
    ctx: &Context,
    ss: &ScaledService,
    old: &ScaledServiceStatus,
    load: &Load,
    backend: &Service,
    ready_replicas: i32,
    now: &Time,
) -> Option<Condition> {
    let gen_ = ss.metadata.generation;
    let key = key_of(ss);
    // The condition as this leader last wrote it comes first: a reconcile can read the
    // object from the cache before its own last status write shows there, and must not
    // drop the condition it just set.
    let (new, remembered) = ctx.state(&key, |st| {
        let new = if load.complete {
            let (new, seen) = wakefail::new_timeouts(st.timeouts_seen, load.timeouts);
            st.timeouts_seen = Some(seen);
            new
        } else {
            0
        };
        (new, st.wake_condition.clone())
    });
    let prev = remembered.or_else(|| {
        old.conditions
            .iter()
            .find(|c| c.type_ == wakefail::CONDITION)
            .cloned()
    });
    let out = if new > 0 {
        let d = match workload_pods(ctx, ss, backend).await {
            Ok(pods) => wakefail::diagnose(&pods),
            Err(e) => wakefail::Diagnosis {
                reason: "Unknown".into(),
                message: format!("the workload's pods could not be listed: {e}"),
            },
        };
        let msg = wakefail::message(new, ss.spec.activation.timeout(), &d);
        publish(
            ctx,
            ss,
            EventType::Warning,
            wakefail::EVENT_REASON,
            msg.clone(),
        )
        .await;
        Some(objects::condition(
            &old.conditions,
            wakefail::CONDITION,
            false,
            &d.reason,
            msg,
            gen_,
            now,
        ))
    } else {
        match prev {
            Some(c) if c.status == "False" && ready_replicas > 0 => Some(objects::condition(
                &old.conditions,
                wakefail::CONDITION,
                true,
                "PodReady",
                format!("{ready_replicas} ready replica(s) since the last failed wake"),
                gen_,
                now,
            )),
            other => other,
        }
    };
    ctx.state(&key, |st| st.wake_condition = out.clone());
    out
}

/// The pods the backend Service selects (the workload's pods).
async fn workload_pods(
    ctx: &Context,
    ss: &ScaledService,
    backend: &Service,
) -> Result<Vec<Pod>, Error> {
    let selector = backend
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    if selector.is_empty() {
        return Ok(Vec::new());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ss.namespace().unwrap_or_default());
    let list = timed(ctx, pods.list(&ListParams::default().labels(&selector))).await?;
    Ok(list.items)
}

/// Hands a decision on a workload's replicas to the one writer (`replicas::apply`:
/// optimistic concurrency, decided again on conflict) and records the change it made:
/// counted by reason, logged, told as an Event.
pub async fn change_replicas(
    ctx: &Context,
    ss: &ScaledService,
    api: &Api<DynamicObject>,
    first: Option<replicas::Read>,
    woken_at: Option<Instant>,
    decide: impl FnMut(i32) -> Option<(i32, Reason)>,
) -> Result<Applied<Reason>, Error> {
    let workload = &ss.spec.scale_target_ref.name;
    let (applied, conflicts) = replicas::apply(api, workload, first, ctx.api_timeout, decide)
        .await
        .map_err(|source| Error::Replicas {
            workload: format!("{}/{workload}", ss.namespace().unwrap_or_default()),
            source,
        })?;
    ctx.metrics.scale_conflicts.inc_by(u64::from(conflicts));
    if let Applied::Changed { from, to, why } = applied {
        record_change(ctx, ss, from, to, why, woken_at).await;
    }
    Ok(applied)
}

/// Counts, logs and tells one change of replicas that was written.
async fn record_change(
    ctx: &Context,
    ss: &ScaledService,
    from: i32,
    to: i32,
    reason: Reason,
    woken_at: Option<Instant>,
) {
    ctx.metrics.api_writes.inc();
    ctx.metrics
        .scale_actions
        .get_or_create(&ScaleLabels {
            reason: reason.as_str(),
        })
        .inc();
    if let Some(t) = woken_at {
        ctx.metrics.wake_to_patch.observe(t.elapsed().as_secs_f64());
    }
    if from == 0 && matches!(reason, Reason::Wake) {
        ctx.metrics
            .wakes
            .get_or_create(&ServiceLabels {
                namespace: ss.namespace().unwrap_or_default(),
                name: ss.name_any(),
            })
            .inc();
    }
    let signal = woken_at
        .map(|t| {
            format!(
                " (wake signal received {}ms before the patch)",
                t.elapsed().as_millis()
            )
        })
        .unwrap_or_default();
    info!(namespace = ?ss.namespace(), name = %ss.name_any(), from, to, reason = reason.as_str(), "scaled{signal}");
    // One event reason per kind of change: events with the same reason form a
    // series that keeps the first note.
    let event_reason = match reason {
        Reason::Wake => "Woken",
        Reason::Idle if to == 0 => "ScaledToZero",
        Reason::Idle => "ScaledDown",
        Reason::MinReplicas => "ScaledToMin",
        Reason::MaxReplicas => "ScaledToMax",
        Reason::Load if to > from => "ScaledUp",
        Reason::Load => "ScaledDown",
        Reason::Steady => "Restored",
    };
    publish(
        ctx,
        ss,
        EventType::Normal,
        event_reason,
        format!(
            "{} {}: {from} → {to} replicas ({}){signal}",
            ss.spec.scale_target_ref.kind,
            ss.spec.scale_target_ref.name,
            reason.as_str()
        ),
    )
    .await;
}

async fn write_status(
    ctx: &Context,
    ss: &ScaledService,
    old: &ScaledServiceStatus,
    new: ScaledServiceStatus,
) -> Result<(), Error> {
    if *old == new {
        return Ok(());
    }
    let api: Api<ScaledService> =
        Api::namespaced(ctx.client.clone(), &ss.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": ScaledService::api_version(&()),
        "kind": ScaledService::kind(&()),
        "status": new,
    });
    timed(
        ctx,
        api.patch_status(
            &ss.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        ),
    )
    .await?;
    ctx.metrics.api_writes.inc();
    Ok(())
}

/// Deletes the object `name` only while it is the one read (its uid, a precondition of
/// the API server). Gone already (404) or replaced meanwhile (409) is done; any other
/// error is returned, so the finalizer retries instead of leaving an object behind.
async fn delete_exactly<K>(
    ctx: &Context,
    api: &Api<K>,
    name: &str,
    uid: Option<String>,
) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid,
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match timed(ctx, api.delete(name, &dp)).await {
        Ok(_) => {
            ctx.metrics.api_writes.inc();
            Ok(())
        }
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn cleanup(ss: Arc<ScaledService>, ctx: &Context) -> Result<Action, Error> {
    let ns = ss.namespace().unwrap_or_default();
    let name = ss.name_any();
    // Another ScaledService on the same workload takes it over as it is: restoring
    // first would start pods that it stops a second later.
    if other_claimants(ctx, &ss).is_empty()
        && let Ok(api) = scale_api(ctx, &ss).await?
    {
        // The replicas it had before Snooze first changed them, 0 included (an older
        // status without the record: 1, so the workload runs).
        let restore =
            decision::restore_replicas(ss.status.as_ref().and_then(|s| s.original_replicas));
        let decide = |_now: i32| Some((restore, Reason::Steady));
        match change_replicas(ctx, &ss, &api, None, None, decide).await {
            Ok(_) => {}
            Err(Error::Replicas {
                source: replicas::WriteError::Api(kube::Error::Api(e)),
                ..
            }) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    // Only what this ScaledService created goes with it: a Service or slice of that
    // name that someone else made stays.
    let svc_name = ss.managed_service_name();
    let svcs: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(have) = timed(ctx, svcs.get_opt(&svc_name)).await?
        && status::owned_by(&have.metadata, &ss)
    {
        delete_exactly(ctx, &svcs, &svc_name, have.metadata.uid).await?;
    }
    if let Some(have) = timed(ctx, slices.get_opt(&svc_name)).await?
        && status::owned_by(&have.metadata, &ss)
    {
        delete_exactly(ctx, &slices, &svc_name, have.metadata.uid).await?;
    }
    ctx.ports.lock().release(&ns, &name);
    let key = ServiceRef {
        namespace: ns.clone(),
        name: name.clone(),
    };
    ctx.services.lock().remove(&key);
    ctx.metrics.remove_service(&ServiceLabels {
        namespace: ns,
        name,
    });
    Ok(Action::await_change())
}

/// The fast path of a wake signal: scale a sleeping workload up at once, then let a
/// reconcile write the status.
/// The `Needs` condition of a ScaledService with `spec.needs`: what it wakes with, or
/// the names that do not resolve and the cycle (`group`).
fn needs_condition(
    ss: &ScaledService,
    needs: &group::Needs,
    names: &BTreeSet<String>,
    old: &ScaledServiceStatus,
    gen_: Option<i64>,
    now: &Time,
) -> Option<Condition> {
    if ss.spec.needs.is_empty() {
        return None;
    }
    let c = group::closure(needs, &ss.name_any(), |n| names.contains(n));
    let list = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(", ");
    let (ok, reason, msg) = if c.cycle {
        (
            false,
            "NeedCycle",
            format!(
                "spec.needs leads back to this ScaledService: it wakes {} with it, but holds none of them awake (a cycle would keep them all up)",
                list(&c.members)
            ),
        )
    } else if !c.missing.is_empty() {
        (
            false,
            "NeedNotFound",
            format!(
                "no ScaledService {} in this namespace; it wakes {} with it",
                list(&c.missing),
                list(&c.members)
            ),
        )
    } else {
        (
            true,
            "Resolved",
            format!("wakes {} with it", list(&c.members)),
        )
    };
    Some(objects::condition(
        &old.conditions,
        group::CONDITION,
        ok,
        reason,
        msg,
        gen_,
        now,
    ))
}

/// Wakes a service from zero at once (an activator's signal) and, at the same moment,
/// every service it needs (`spec.needs`, transitively): a group's cold start costs its
/// slowest member's, not their sum.
pub async fn wake(ctx: &Context, key: &ServiceRef, received: Instant) -> Result<bool, Error> {
    let (needs, names) = namespace_needs(ctx, &key.namespace);
    let members = group::closure(&needs, &key.name, |n| names.contains(n)).members;
    let others = members.into_iter().map(|name| {
        let k = ServiceRef {
            namespace: key.namespace.clone(),
            name,
        };
        async move {
            if let Err(e) = wake_member(ctx, &k, received).await {
                warn!(service = ?k, "waking a needed service: {e}");
            }
        }
    });
    let (mine, _) = futures::join!(
        wake_member(ctx, key, received),
        futures::future::join_all(others)
    );
    mine
}

async fn wake_member(ctx: &Context, key: &ServiceRef, received: Instant) -> Result<bool, Error> {
    let known = ctx
        .store
        .get(&ObjectRef::new(&key.name).within(&key.namespace))
        .is_some();
    if !known {
        return Ok(false);
    }
    let already = ctx.state(key, |st| {
        let recent = st
            .waking
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5));
        if !recent {
            st.waking = Some(Instant::now());
        }
        recent
    });
    if already {
        return Ok(false);
    }
    let r = wake_once(ctx, key, received).await;
    if !matches!(r, Ok(true)) {
        // Nothing was patched: let the next signal try again.
        ctx.state(key, |st| st.waking = None);
    }
    r
}

async fn wake_once(ctx: &Context, key: &ServiceRef, received: Instant) -> Result<bool, Error> {
    let Some(ss) = ctx
        .store
        .get(&ObjectRef::new(&key.name).within(&key.namespace))
    else {
        return Ok(false);
    };
    if ss.metadata.deletion_timestamp.is_some() || conflicting_owner(ctx, &ss).is_some() {
        return Ok(false);
    }
    let Ok(api) = scale_api(ctx, &ss).await? else {
        return Ok(false);
    };
    let load = Load {
        wake: true,
        ..Default::default()
    };
    let pol = policy(&ss);
    // A wake only raises from zero, decided on the replicas read (a conflict means the
    // workload changed: decided again on what is there, usually no longer zero).
    let decide = |now: i32| {
        let d = decision::decide(&pol, now, &load, SystemTime::now(), ctx.started);
        (d.reason == Reason::Wake).then_some((d.desired, d.reason))
    };
    match change_replicas(ctx, &ss, &api, None, Some(received), decide).await? {
        Applied::Changed { to, why, .. } => {
            ctx.state(key, |st| {
                st.replicas = Some((to, 0));
                st.last_scale = Some((now_time(), why.as_str().into()));
            });
            Ok(true)
        }
        Applied::Unchanged { .. } => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::finalizer::Error as F;

    #[test]
    fn failed_reconciles_back_off_per_object() {
        let secs: Vec<u64> = (1..=9).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(secs, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(retry_after(0).as_secs(), 5);
        assert_eq!(retry_after(u32::MAX).as_secs(), 300);
    }

    #[test]
    fn reconcile_errors_are_labelled_by_their_cause_inside_the_finalizer() {
        let cases: Vec<(Error, &str)> = vec![
            (Error::Timeout, "timeout"),
            (
                Error::Finalizer(Box::new(F::ApplyFailed(Error::Timeout))),
                "timeout",
            ),
            (
                Error::Finalizer(Box::new(F::CleanupFailed(Error::Ports(Exhausted::Range(
                    1..=2,
                ))))),
                "ports_exhausted",
            ),
            (
                Error::Finalizer(Box::new(F::UnnamedObject)),
                "unnamed_object",
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.metric_label(), want, "{e}");
        }
    }
}
