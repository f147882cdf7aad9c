//! What a reconcile reads before it applies: the backend Service, the scale target and
//! its replicas, and the managed Service and slice — from the leader's caches
//! (`crate::caches`), and from the API server only when a cache cannot answer (not
//! synced, an object not in it yet, a kind it does not hold), each such GET counted in
//! `snooze_operator_api_reads_total`. Also the first problem that stops the
//! ScaledService (references, target, a name taken).
//!
//! Must not: write anything.

use super::*;
use crate::caches::Lookup;

/// What [`read`] found.
pub(crate) struct Reads {
    pub backend: Option<Arc<Service>>,
    pub problem: Option<Problem>,
    /// The `/scale` API of the target, its replicas as read, and the cached workload.
    pub target: Option<(
        Api<DynamicObject>,
        replicas::Read,
        Option<Arc<DynamicObject>>,
    )>,
    pub have_svc: Option<Arc<Service>>,
    pub have_slice: Option<Arc<EndpointSlice>>,
    pub svc_name: String,
    pub svcs: Api<Service>,
    pub slices: Api<EndpointSlice>,
}

pub(crate) async fn read(
    ctx: &Context,
    ss: &ScaledService,
    old: &ScaledServiceStatus,
) -> Result<Reads, Error> {
    let ns = ss.namespace().unwrap_or_default();
    let gen_ = ss.metadata.generation;
    let conflict = conflicting_owner(ctx, ss);
    let svcs: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let backend = if conflict.is_none() {
        match ctx.caches.service(&ns, &ss.spec.service) {
            Lookup::Found(s) => Some(s),
            // Already said: the watch's event for the Service, when it comes, triggers
            // the next reconcile.
            Lookup::Missing if already_said(old, gen_, "ServiceNotFound") => None,
            Lookup::Missing | Lookup::Unsynced => {
                ctx.metrics.read("service");
                timed(ctx, svcs.get_opt(&ss.spec.service))
                    .await?
                    .map(Arc::new)
            }
        }
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
        status::references_problem(ss, conflict.as_deref(), backend.is_some(), selects_pods)
            .or_else(|| {
                backend
                    .as_ref()
                    .and_then(|_| status::ports_problem(ss, &backend_ports))
            });
    let (target, problem) = match problem {
        Some(p) => (None, Some(p)),
        None => match scale_api(ctx, ss).await? {
            Err(p) => (None, Some(p)),
            Ok(api) => match read_workload(ctx, ss, &api, old).await? {
                Some((read, cached)) => (Some((api, read, cached)), None),
                None => (
                    None,
                    Some(Problem {
                        reason: "TargetNotFound",
                        message: format!(
                            "{} {} not found in namespace {ns}",
                            ss.spec.scale_target_ref.kind, ss.spec.scale_target_ref.name
                        ),
                    }),
                ),
            },
        },
    };
    // The managed objects as they are, once nothing else stops the ScaledService (a
    // missing one is then about to be made, and asked for once): a name held by objects
    // this ScaledService did not create is a problem of its own (they are never taken
    // over).
    let svc_name = ss.managed_service_name();
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let (have_svc, have_slice) = if problem.is_none() {
        // Not in the cache: not made yet (or the cache not synced): asked once.
        let have_svc = match ctx.caches.service(&ns, &svc_name) {
            Lookup::Found(s) => Some(s),
            Lookup::Missing | Lookup::Unsynced => {
                ctx.metrics.read("managed_service");
                timed(ctx, svcs.get_opt(&svc_name)).await?.map(Arc::new)
            }
        };
        let have_slice = match ctx.caches.managed_slice(&ns, &svc_name) {
            Lookup::Found(s) => Some(s),
            Lookup::Missing | Lookup::Unsynced => {
                ctx.metrics.read("managed_slice");
                timed(ctx, slices.get_opt(&svc_name)).await?.map(Arc::new)
            }
        };
        (have_svc, have_slice)
    } else {
        (None, None)
    };
    let problem = problem.or_else(|| {
        status::name_taken(
            ss,
            have_svc.as_ref().map(|s| &s.metadata),
            have_slice.as_ref().map(|s| &s.metadata),
        )
    });
    let target = target.filter(|_| problem.is_none());
    Ok(Reads {
        backend,
        problem,
        target,
        have_svc,
        have_slice,
        svc_name,
        svcs,
        slices,
    })
}

/// How long after its own replica write the leader reads `/scale` rather than a
/// workload cache that does not show the write yet.
const CACHE_CATCH_UP: Duration = Duration::from_secs(10);

/// The status already says `reason` for this generation. A synced cache that still
/// misses the object is then believed: only the first time is it confirmed with a GET
/// (a just-created object may not be in the cache yet), so a ScaledService whose
/// Service is gone, or a namespace being deleted, costs no read per reconcile.
fn already_said(old: &ScaledServiceStatus, gen_: Option<i64>, reason: &str) -> bool {
    old.observed_generation == gen_
        && old
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == reason)
}

/// The replicas of the workload: from the workload
/// cache for the built-in kinds, else (or while it has not synced, or the workload is
/// not in it yet) from `/scale`. Also the cached workload, whose pod template the
/// probe is resolved from. `None`: the workload does not exist (confirmed once by the
/// API server, then believed from the cache while the status says so).
async fn read_workload(
    ctx: &Context,
    ss: &ScaledService,
    api: &Api<DynamicObject>,
    old: &ScaledServiceStatus,
) -> Result<Option<(replicas::Read, Option<Arc<DynamicObject>>)>, Error> {
    if let Some((read, o)) = cached_read(ctx, ss) {
        return Ok(Some((read, Some(o))));
    }
    let r = &ss.spec.scale_target_ref;
    let ns = ss.namespace().unwrap_or_default();
    if already_said(old, ss.metadata.generation, "TargetNotFound")
        && matches!(
            ctx.caches.workload(&target_gvk(ss), &ns, &r.name),
            Lookup::Missing
        )
    {
        return Ok(None);
    }
    ctx.metrics.read("scale");
    match timed(ctx, api.get_scale(&r.name)).await {
        Ok(scale) => Ok(Some((
            replicas::Read {
                replicas: scale.spec.and_then(|s| s.replicas).unwrap_or(0),
            },
            None,
        ))),
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 404 => Ok(None),
        Err(e) => Err(e),
    }
}

/// The workload's replicas as the workload cache has them (built-in kinds,
/// once synced), and the cached object.
pub(crate) fn cached_read(
    ctx: &Context,
    ss: &ScaledService,
) -> Option<(replicas::Read, Arc<DynamicObject>)> {
    let r = &ss.spec.scale_target_ref;
    let ns = ss.namespace().unwrap_or_default();
    let Lookup::Found(o) = ctx.caches.workload(&target_gvk(ss), &ns, &r.name) else {
        return None;
    };
    let replicas = o
        .data
        .pointer("/spec/replicas")
        .and_then(serde_json::Value::as_i64)
        .and_then(|n| i32::try_from(n).ok())
        .unwrap_or(0);
    // A write of this leader the cache does not show yet: the cache is behind.
    let behind = ctx.state(&key_of(ss), |st| {
        st.written
            .is_some_and(|(w, at)| w != replicas && at.elapsed() < CACHE_CATCH_UP)
    });
    if behind {
        return None;
    }
    Some((replicas::Read { replicas }, o))
}
