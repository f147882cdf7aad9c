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
    let mine = (ss.metadata.creation_timestamp.clone(), ss.name_any());
    other_claimants(ctx, ss)
        .into_iter()
        .find(|o| (o.metadata.creation_timestamp.clone(), o.name_any()) < mine)
        .map(|o| o.name_any())
}

/// The other live ScaledServices that name the same workload.
pub(crate) fn other_claimants(ctx: &Context, ss: &ScaledService) -> Vec<Arc<ScaledService>> {
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

pub(crate) fn group(api_version: &str) -> &str {
    api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("")
}

/// The `/scale`-capable API of the target, or why there is none.
pub(crate) async fn scale_api(
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
