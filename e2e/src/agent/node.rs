//! The Node object: registration, status, and the Lease heartbeat the node lifecycle
//! controller watches.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::{AgentConfig, NODE_CPU, NODE_MEMORY_BYTES, NODE_PODS, now};

pub const KUBELET_VERSION: &str = "v1.33.13";

/// Creates the Node (if needed) and writes its status.
pub async fn register(client: &kube::Client, cfg: &AgentConfig) -> kube::Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", cfg.node_name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", std::env::consts::ARCH),
        ("beta.kubernetes.io/os", "linux"),
        ("beta.kubernetes.io/arch", std::env::consts::ARCH),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let node = Node {
        metadata: ObjectMeta {
            name: Some(cfg.node_name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    write_status(&api, cfg).await
}

async fn write_status(api: &Api<Node>, cfg: &AgentConfig) -> kube::Result<Node> {
    let t = now();
    let cond = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": t, "lastTransitionTime": cfg.started})
    };
    let resources: BTreeMap<&str, Quantity> = [
        ("cpu", Quantity(NODE_CPU.to_string())),
        ("memory", Quantity(NODE_MEMORY_BYTES.to_string())),
        ("pods", Quantity(NODE_PODS.to_string())),
        ("ephemeral-storage", Quantity("100Gi".into())),
    ]
    .into();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let status = json!({
        "status": {
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "snooze node agent is posting ready status"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": cfg.node_ip},
                {"type": "Hostname", "address": cfg.node_name},
            ],
            "capacity": resources,
            "allocatable": resources,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": cfg.node_name,
                "systemUUID": cfg.node_name,
                "bootID": boot_id.trim(),
                "kernelVersion": kernel.trim(),
                "osImage": "snooze local node",
                "containerRuntimeVersion": "snooze://0.1.0",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": if cfg!(target_arch = "x86_64") { "amd64" } else { std::env::consts::ARCH },
            },
        }
    });
    api.patch_status(
        &cfg.node_name,
        &PatchParams::default(),
        &Patch::Strategic(&status),
    )
    .await
}

/// Renews the node Lease every 5 s (a kubelet: 10 s) and rewrites the node status
/// every 30 s. A failed renew is retried every 500 ms (a kubelet backs off from
/// 200 ms), and the status is written at once when the API server is back: the node
/// lifecycle controller marks the node NotReady, and so every pod not ready, 40 s after
/// the last renew it saw, and a 20 s API server restart with a 10 s tick and no retry
/// came to 40 s (the fault tests caught it).
pub async fn heartbeat(client: kube::Client, cfg: std::sync::Arc<AgentConfig>, node_uid: String) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client);
    let mut n: u64 = 0;
    let mut failing = false;
    loop {
        tokio::time::sleep(if failing {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(5)
        })
        .await;
        n += 1;
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": cfg.node_name,
                "namespace": "kube-node-lease",
                "ownerReferences": [OwnerReference {
                    api_version: "v1".into(), kind: "Node".into(),
                    name: cfg.node_name.clone(), uid: node_uid.clone(), ..Default::default()
                }],
            },
            "spec": {
                "holderIdentity": cfg.node_name,
                "leaseDurationSeconds": 40,
                "renewTime": MicroTime(now().0),
            }
        });
        let pp = PatchParams::apply("snooze-node-agent").force();
        let recovered = match leases
            .patch(&cfg.node_name, &pp, &Patch::Apply(&lease))
            .await
        {
            Ok(_) => std::mem::replace(&mut failing, false),
            Err(e) => {
                if !failing {
                    warn!("renewing node lease: {e}; retrying every 500 ms");
                }
                failing = true;
                continue;
            }
        };
        if (recovered || n.is_multiple_of(6))
            && let Err(e) = write_status(&nodes, &cfg).await
        {
            warn!("writing node status: {e}");
        }
    }
}

pub fn uid(node: &Node) -> String {
    node.uid().unwrap_or_default()
}
