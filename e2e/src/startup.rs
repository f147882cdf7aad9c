//! The objects of the activator start-up benchmark (`bench/startup.sh`): N
//! ScaledServices, each with `status.ports` as an operator would write them, and M
//! EndpointSlices of Services that no ScaledService names, as any busy cluster has.

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use snooze_crds::ScaledService;

/// Creates what is missing (an existing object is kept); `first_port` is the activator
/// port of the first ScaledService, the others follow.
pub async fn populate(
    namespace: &str,
    scaled_services: usize,
    slices: usize,
    first_port: u16,
) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let nss: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}}))?;
    ignore_exists(nss.create(&PostParams::default(), &ns).await)?;
    let t0 = std::time::Instant::now();
    let eps: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    futures::stream::iter(0..slices)
        .map(|i| {
            let eps = eps.clone();
            async move {
                let s: EndpointSlice = serde_json::from_value(json!({
                    "metadata": {
                        "name": format!("noise-{i}"),
                        "labels": {
                            "kubernetes.io/service-name": format!("noise-{}", i / 2),
                            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                        },
                    },
                    "addressType": "IPv4",
                    "endpoints": [{
                        "addresses": [format!("10.250.{}.{}", (i / 250) % 250, i % 250 + 1)],
                        "conditions": {"ready": true},
                    }],
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                }))?;
                ignore_exists(eps.create(&PostParams::default(), &s).await)
            }
        })
        .buffer_unordered(32)
        .try_collect::<()>()
        .await?;
    eprintln!("{slices} EndpointSlices in {:?}", t0.elapsed());
    let t0 = std::time::Instant::now();
    let ssvcs: Api<ScaledService> = Api::namespaced(client.clone(), namespace);
    futures::stream::iter(0..scaled_services)
        .map(|i| {
            let ssvcs = ssvcs.clone();
            async move {
                let name = format!("ss-{i}");
                let ss: ScaledService = serde_json::from_value(json!({
                    "apiVersion": "snooze.dev/v1alpha1",
                    "kind": "ScaledService",
                    "metadata": {"name": name},
                    "spec": {"scaleTargetRef": {"name": format!("app-{i}")}, "service": format!("app-{i}")},
                }))?;
                ignore_exists(ssvcs.create(&PostParams::default(), &ss).await)?;
                let port = i32::from(first_port) + i as i32;
                let status = json!({"status": {
                    "serviceName": format!("{name}-snooze"),
                    "ports": [{"name": "http", "port": 80, "activatorPort": port}],
                }});
                ssvcs
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<()>()
        .await?;
    eprintln!("{scaled_services} ScaledServices in {:?}", t0.elapsed());
    Ok(())
}

fn ignore_exists<T>(r: kube::Result<T>) -> anyhow::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
