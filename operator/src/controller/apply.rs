//! Apply one ScaledService, stage by stage: what it reads and what stops it (`read`) →
//! ports → routing objects → replicas (through the one writer) → status.

use super::*;
use std::time::UNIX_EPOCH;

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

    // 1. References, the target and the managed objects, from the caches.
    let Reads {
        backend,
        problem,
        target,
        have_svc,
        have_slice,
        svc_name,
        svcs,
        slices,
    } = read(ctx, &ss, &old).await?;

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
    let (Some(backend), Some((scale_api, read, cached))) = (backend, target) else {
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
    let current = read.replicas;
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
    let workload = match cached {
        Some(o) => Ok(Some(o)),
        None => {
            ctx.metrics.read("workload");
            timed(ctx, scale_api.get_opt(&ss.spec.scale_target_ref.name))
                .await
                .map(|o| o.map(Arc::new))
        }
    };
    let (probe, source) = match workload {
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
    let now_sys = SystemTime::now();
    let pol = policy(&ss);
    let shown_last = old.last_request_time.as_ref().map(to_system);
    let rewrite = load
        .last_request
        .is_some_and(|last| status::show_last_request(shown_last, last, now_sys, pol.idle_timeout));
    if rewrite && let Some(last) = load.last_request {
        // In whole seconds, as the API server keeps it: what follows (sleepsAt) is
        // computed from the same value the next reconcile reads back, so that one finds
        // nothing to rewrite (with the fraction kept here, sleepsAt moved by a second
        // and back: two status writes a minute per busy service instead of one).
        let secs = last
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        status.last_request_time = to_time(UNIX_EPOCH + Duration::from_secs(secs));
    }
    // 5. Why it is awake, and when it sleeps (`manual`): who sent the requests is
    // rewritten with the last request (or at once when it was empty); nothing while
    // asleep.
    let m = crate::manual::read(&ss);
    let activity = ctx.stats.activity(&key, ACTIVITY_SHOWN);
    if written <= 0 {
        status.activity.clear();
    } else if rewrite || (old.activity.is_empty() && !activity.is_empty()) {
        status.activity = activity.into_iter().filter_map(activity_entry).collect();
    }
    let holders = crate::manual::Holders {
        replicas: written,
        paused: m.paused,
        awake_until: m.awake_until,
        needed_by: &status.needed_by,
        min_replicas: pol.min_replicas,
        activity: &status.activity,
    };
    status.awake_because = holders.because(now_sys);
    status.sleeps_at = if holders.requests_only(now_sys) {
        let since = idle_since(ctx, &ss)
            .max(
                status
                    .last_request_time
                    .as_ref()
                    .map_or(UNIX_EPOCH, to_system),
            )
            .max(m.awake_until.unwrap_or(UNIX_EPOCH));
        to_time(crate::manual::sleeps_at(since, pol.idle_timeout))
    } else {
        None
    };
    status.paused = m.paused;
    status.awake_until = m.awake_until.and_then(to_time);
    if let Some(v) = &m.sleep
        && written <= pol.min_replicas.max(0)
    {
        status.handled_sleep = Some(v.clone());
    }
    let warned = ctx.state(&key, |st| {
        std::mem::replace(&mut st.annotations_warned, m.invalid.clone()) == m.invalid
    });
    if !warned && !m.invalid.is_empty() {
        publish(
            ctx,
            &ss,
            EventType::Warning,
            "InvalidAnnotation",
            format!("ignored: {}", m.invalid.join("; ")),
        )
        .await;
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

/// Clients shown in `status.activity`.
const ACTIVITY_SHOWN: usize = 5;

fn activity_entry(w: snooze_crds::stats::Waker) -> Option<snooze_crds::ActivityEntry> {
    Some(snooze_crds::ActivityEntry {
        client: w.client,
        user_agent: (!w.user_agent.is_empty()).then_some(w.user_agent),
        method: w.method,
        path: (!w.path.is_empty()).then_some(w.path),
        count: i64::try_from(w.count).unwrap_or(i64::MAX),
        last_seen: to_time(UNIX_EPOCH + Duration::from_millis(w.last_ms))?,
    })
}
