//! Deleting a ScaledService: the workload's replicas restored, only the objects it
//! created deleted.

use super::*;

/// Deletes the object `name` only while it is the one read (its uid, a precondition of
/// the API server). Gone already (404) or replaced meanwhile (409) is done; any other
/// error is returned, so the finalizer retries instead of leaving an object behind.
pub(crate) async fn delete_exactly<K>(
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

pub(crate) async fn cleanup(ss: Arc<ScaledService>, ctx: &Context) -> Result<Action, Error> {
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
