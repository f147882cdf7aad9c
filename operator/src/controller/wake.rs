//! Wakes: the fast path of an activator's wake signal (with the services it needs,
//! `group`), the `Needs` condition, and the `WakeSucceeded` outcome of a wake.

use super::*;

/// The needs of the ScaledServices of `ns` (`group`), and the names that exist there.
pub(crate) fn namespace_needs(ctx: &Context, ns: &str) -> (group::Needs, BTreeSet<String>) {
    // Only this namespace's objects are read (a reconcile asks this of every object).
    let mine: Vec<_> = ctx
        .store
        .state()
        .into_iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(ns))
        .collect();
    all_needs(&mine).remove(ns).unwrap_or_default()
}

/// [`namespace_needs`] of every namespace, in one pass.
pub(crate) fn all_needs(
    all: &[Arc<ScaledService>],
) -> HashMap<String, (group::Needs, BTreeSet<String>)> {
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
pub(crate) fn held_by(
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

/// The `WakeSucceeded` condition (see `wakefail`): False, with a Warning event, when
/// the activators report new activation timeouts; True again once a pod is ready;
/// absent until a wake first fails.
pub(crate) async fn wake_outcome(
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
pub(crate) async fn workload_pods(
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
    ctx.metrics.read("pods");
    let list = timed(ctx, pods.list(&ListParams::default().labels(&selector))).await?;
    Ok(list.items)
}

/// The fast path of a wake signal: scale a sleeping workload up at once, then let a
/// reconcile write the status.
/// The `Needs` condition of a ScaledService with `spec.needs`: what it wakes with, or
/// the names that do not resolve and the cycle (`group`).
pub(crate) fn needs_condition(
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

pub(crate) async fn wake_member(
    ctx: &Context,
    key: &ServiceRef,
    received: Instant,
) -> Result<bool, Error> {
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

pub(crate) async fn wake_once(
    ctx: &Context,
    key: &ServiceRef,
    received: Instant,
) -> Result<bool, Error> {
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
    // The cached replicas and version, when the cache has the workload: the patch goes
    // out without a read first (a stale cache is refused, and decided again on a read).
    // Only a cached zero is trusted without a read (a stale one is refused by the
    // precondition); a cache that says awake is checked against `/scale`.
    let first = cached_read(ctx, &ss)
        .map(|(r, _)| r)
        .filter(|r| r.replicas == 0);
    match change_replicas(ctx, &ss, &api, first, Some(received), decide).await? {
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
