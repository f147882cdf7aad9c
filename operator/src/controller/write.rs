//! The writers: every replica change goes through `change_replicas` (one door,
//! optimistic concurrency in `replicas`) and is recorded once; the status is written
//! only when it changed.

use super::*;

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
        ctx.state(&key_of(ss), |st| {
            st.written = Some((to, Instant::now()));
            // Asleep again: the next signal is a new cold start, not a repeat of the
            // last one (with the mark kept, a service woken again within 5 s of its
            // last wake left the signal to the tick, a second later and without the
            // services it needs).
            if to == 0 {
                st.waking = None;
            }
        });
        record_change(ctx, ss, from, to, why, woken_at).await;
    }
    Ok(applied)
}

/// Counts, logs and tells one change of replicas that was written.
pub(crate) async fn record_change(
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
        Reason::Sleep => "PutToSleep",
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

pub(crate) async fn write_status(
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
