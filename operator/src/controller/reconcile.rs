//! The reconcile's entry and its error policy (per-object backoff), and the lookups
//! it makes before applying: the workload's owner conflicts, its `/scale` API,
//! the activators serving the ports, the ready endpoints.

use super::*;

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
pub(crate) fn conflicting_owner(ctx: &Context, ss: &ScaledService) -> Option<String> {
    older_claimant(&ctx.store.state(), ss)
}

/// The other live ScaledServices that name the same workload.
pub(crate) fn other_claimants(ctx: &Context, ss: &ScaledService) -> Vec<Arc<ScaledService>> {
    claimants(&ctx.store.state(), ss)
}

/// Of `all`, an older live ScaledService that names the same workload as `ss` (it keeps
/// the workload, `ss` may not act on it); for a leader's cache or a follower's list.
pub fn older_claimant(all: &[Arc<ScaledService>], ss: &ScaledService) -> Option<String> {
    let mine = (ss.metadata.creation_timestamp.clone(), ss.name_any());
    claimants(all, ss)
        .into_iter()
        .find(|o| (o.metadata.creation_timestamp.clone(), o.name_any()) < mine)
        .map(|o| o.name_any())
}

fn claimants(all: &[Arc<ScaledService>], ss: &ScaledService) -> Vec<Arc<ScaledService>> {
    let ns = ss.namespace();
    all.iter()
        .filter(|o| {
            o.namespace() == ns && o.uid() != ss.uid() && o.metadata.deletion_timestamp.is_none()
        })
        .filter(|o| {
            o.spec.scale_target_ref.name == ss.spec.scale_target_ref.name
                && o.spec.scale_target_ref.kind == ss.spec.scale_target_ref.kind
                && group(&o.spec.scale_target_ref.api_version)
                    == group(&ss.spec.scale_target_ref.api_version)
        })
        .cloned()
        .collect()
}

pub(crate) fn group(api_version: &str) -> &str {
    api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("")
}

/// The group, version and kind of the scale target (`apiVersion` without a group is
/// the core group's).
pub(crate) fn target_gvk(ss: &ScaledService) -> GroupVersionKind {
    let r = &ss.spec.scale_target_ref;
    let (g, v) = r
        .api_version
        .rsplit_once('/')
        .unwrap_or(("", r.api_version.as_str()));
    GroupVersionKind::gvk(g, v, &r.kind)
}

/// The `/scale`-capable API of the target, or why there is none.
pub(crate) async fn scale_api(
    ctx: &Context,
    ss: &ScaledService,
) -> Result<Result<Api<DynamicObject>, Problem>, Error> {
    scale_api_with(&ctx.client, &ctx.discovery, ctx.api_timeout, ss).await
}

/// Discovery of kinds and whether they have `/scale`, remembered per kind.
pub type Discovery = Mutex<HashMap<GroupVersionKind, Option<ApiResource>>>;

/// [`scale_api`] with its parts: the client, what discovery found so far, the time
/// limit of an API call (a follower's wakes have no leader's Context).
pub async fn scale_api_with(
    client: &Client,
    discovery: &Discovery,
    api_timeout: Duration,
    ss: &ScaledService,
) -> Result<Result<Api<DynamicObject>, Problem>, Error> {
    let gvk = target_gvk(ss);
    let cached = discovery.lock().get(&gvk).cloned();
    let ar = match cached {
        Some(a) => a,
        None => {
            let found =
                match tokio::time::timeout(api_timeout, kube::discovery::pinned_kind(client, &gvk))
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
            discovery.lock().insert(gvk.clone(), found.clone());
            found
        }
    };
    Ok(match ar {
        Some(ar) => Ok(Api::namespaced_with(
            client.clone(),
            &ss.namespace().unwrap_or_default(),
            &ar,
        )),
        None => Err(Problem {
            reason: "TargetNotScalable",
            message: format!(
                "{} {} has no /scale subresource (or the kind is not served)",
                ss.spec.scale_target_ref.api_version, ss.spec.scale_target_ref.kind
            ),
        }),
    })
}

/// The ready activators that listen on every one of `ports` (the ones an ingress may be
/// sent to for this ScaledService). An activator opens a new service's listeners only
/// once its watch delivers the status with the ports, a few milliseconds after the
/// operator wrote it; listing it before would get connections refused.
pub(crate) fn serving_activators(
    ctx: &Context,
    activators: &Activators,
    ports: &[PortStatus],
) -> Vec<String> {
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

pub(crate) fn ready_endpoints(ctx: &Context, ns: &str, service: &str) -> i32 {
    ctx.caches.ready_endpoints(ns, service)
}
