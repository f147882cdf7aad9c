//! The autoscale tick: once a second on the leader, every service's load recorded and
//! the decision (idle, load, needs) applied through the one replica writer; the
//! spec-to-policy mapping it and the reconcile share.

use super::*;

/// The policy now: `minReplicas` raised by an active schedule (an invalid schedule
/// raises nothing; the reconcile reports it), and what the annotations ask for
/// (`crate::manual`).
pub fn policy(ss: &ScaledService) -> Policy {
    let floor = crate::schedule::floor_at(&ss.spec.schedules, SystemTime::now()).unwrap_or(0);
    let m = crate::manual::read(ss);
    Policy {
        min_replicas: ss.spec.min_replicas.max(floor.min(ss.spec.max_replicas)),
        max_replicas: ss.spec.max_replicas,
        idle_timeout: ss.spec.idle_timeout(),
        wake_replicas: ss.spec.scaling.wake_replicas,
        max_step: ss.spec.scaling.max_scale_down_step,
        paused: m.paused,
        awake_until: m.awake_until,
        sleep: m.sleep.is_some(),
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
pub(crate) fn idle_since(ctx: &Context, ss: &ScaledService) -> SystemTime {
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
        // Recorded while asleep too (a wake finds its window filled); copied out only
        // for the autoscaler, which follows running workloads.
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
            if current > 0 {
                q.iter().copied().collect()
            } else {
                Vec::new()
            }
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
            // The reconcile rewrites the last request (and who sent the requests, and
            // when it sleeps) by the rule of `status::show_last_request`.
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
                    .is_some_and(|t| status::show_last_request(shown, t, now, pol.idle_timeout))
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
