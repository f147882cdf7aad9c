//! Routes that bypass the managed Service (`bypass`): listed now and then per
//! namespace, told as Warning events.

use super::*;

/// How often, at most, a leader looks at a ScaledService's routes when nothing changed.
pub(crate) const ROUTE_CHECK_EVERY: Duration = Duration::from_secs(300);
/// How long one listing of a namespace's routes serves all its ScaledServices (so the
/// lists cost one per namespace, not one per ScaledService).
pub(crate) const ROUTES_FRESH: Duration = Duration::from_secs(30);

/// Routes (Ingress, HTTPRoute, GRPCRoute) in the namespace that send traffic to the
/// app's own Service instead of the managed one (`bypass`): a Warning event for each one
/// not reported before. Looked at on a leader's first reconcile of the ScaledService, on
/// every spec change, and every `ROUTE_CHECK_EVERY`; a failed list (no Gateway API
/// CRDs, no RBAC) only skips that kind.
pub(crate) async fn check_routes(ctx: &Context, ss: &ScaledService) {
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

fn fresh_routes(ctx: &Context, ns: &str) -> Option<Arc<Vec<bypass::Route>>> {
    ctx.routes
        .lock()
        .get(ns)
        .filter(|(at, _)| at.elapsed() < ROUTES_FRESH)
        .map(|(_, r)| r.clone())
}

/// The namespace's Ingresses, HTTPRoutes and GRPCRoutes: listed, or the listing of the
/// last `ROUTES_FRESH`. One listing per namespace at a time: the ScaledServices of a
/// namespace that reconcile at once (a new leader's first pass over 1,000 of them) wait
/// for it and share it, instead of each listing the three kinds (the scale benchmark saw
/// 2,400 lists in a minute before).
pub(crate) async fn namespace_routes(ctx: &Context, ns: &str) -> Arc<Vec<bypass::Route>> {
    if let Some(r) = fresh_routes(ctx, ns) {
        return r;
    }
    let gate = ctx
        .routes_listing
        .lock()
        .entry(ns.to_string())
        .or_default()
        .clone();
    let _listing = gate.lock().await;
    if let Some(r) = fresh_routes(ctx, ns) {
        return r;
    }
    let lp = ListParams::default();
    let mut routes = Vec::new();
    let ingresses: Api<Ingress> = Api::namespaced(ctx.client.clone(), ns);
    ctx.metrics.read("routes");
    match timed(ctx, ingresses.list(&lp)).await {
        Ok(l) => routes.extend(l.items.iter().map(bypass::from_ingress)),
        Err(e) => debug!(namespace = %ns, "listing Ingresses: {e}"),
    }
    for (kind, plural) in [("HTTPRoute", "httproutes"), ("GRPCRoute", "grpcroutes")] {
        let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
        let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &ar);
        ctx.metrics.read("routes");
        match timed(ctx, api.list(&lp)).await {
            Ok(l) => routes.extend(l.items.iter().map(|r| bypass::from_route(kind, r))),
            Err(e) => debug!(namespace = %ns, "listing {kind}s: {e}"),
        }
    }
    let routes = Arc::new(routes);
    let mut cache = ctx.routes.lock();
    cache.retain(|_, (at, _)| at.elapsed() < ROUTES_FRESH);
    cache.insert(ns.to_string(), (Instant::now(), routes.clone()));
    drop(cache);
    // Gates nobody holds or waits for go (this one stays until a later listing).
    ctx.routes_listing
        .lock()
        .retain(|_, g| Arc::strong_count(g) > 1);
    routes
}
