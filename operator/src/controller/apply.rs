//! Apply one ScaledService, stage by stage: references → ports → routing objects →
//! replicas (through the one writer) → status.

use super::*;

pub(crate) async fn apply(ss: Arc<ScaledService>, ctx: &Context) -> Result<Action, Error> {
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
