//! The objects the operator owns, built as plain data from the ScaledService, the
//! backend Service, the assigned ports and the activator pods. No client needed.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use snooze_crds::{LABEL_SCALED_SERVICE, MANAGER, PortStatus, ScaledService};

use crate::ports::{Exhausted, PortAllocator, PortKey};

/// The key of a Service port in the allocator: its name, or its number when unnamed.
pub fn port_id(name: Option<&str>, port: i32) -> String {
    match name {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => port.to_string(),
    }
}

/// Assigns an activator port to every TCP port of the backend Service.
pub fn port_statuses(
    ss: &ScaledService,
    backend: &Service,
    alloc: &mut PortAllocator,
) -> Result<Vec<PortStatus>, Exhausted> {
    let ns = ss.namespace().unwrap_or_default();
    let name = ss.name_any();
    let mut out = Vec::new();
    let mut keys = Vec::new();
    // A refusal gives back what this call assigned, and only that: the ports the
    // ScaledService held before stay its (its managed objects still name them).
    let before = alloc.keys_of(&ns, &name);
    for p in backend.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
        if p.protocol.as_deref().is_some_and(|pr| pr != "TCP") {
            continue;
        }
        let key = PortKey::new(&ns, &name, &port_id(p.name.as_deref(), p.port));
        let activator_port = match alloc.assign(&key) {
            Ok(p) => p,
            Err(e) => {
                alloc.retain(&ns, &name, &before);
                return Err(e);
            }
        };
        keys.push(key);
        out.push(PortStatus {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port: p.port,
            activator_port: i32::from(activator_port),
            app_protocol: p.app_protocol.clone(),
            tcp: snooze_crds::tcp_mode(
                &ss.spec.ports,
                &port_id(p.name.as_deref(), p.port),
                p.app_protocol.as_deref(),
            ),
        });
    }
    alloc.retain(&ns, &name, &keys);
    Ok(out)
}

fn labels(ss: &ScaledService) -> BTreeMap<String, String> {
    [
        (LABEL_SCALED_SERVICE.to_string(), ss.name_any()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "snooze".to_string(),
        ),
    ]
    .into()
}

fn meta(ss: &ScaledService, name: String, extra: &[(&str, &str)]) -> ObjectMeta {
    let mut l = labels(ss);
    for (k, v) in extra {
        l.insert((*k).to_string(), (*v).to_string());
    }
    ObjectMeta {
        name: Some(name),
        namespace: ss.namespace(),
        labels: Some(l),
        owner_references: ss.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}

/// The Service the user's ingress points at: the backend's ports, no selector.
pub fn managed_service(ss: &ScaledService, ports: &[PortStatus]) -> Service {
    Service {
        metadata: meta(ss, ss.managed_service_name(), &[]),
        spec: Some(ServiceSpec {
            type_: Some(ss.spec.service_type.as_str().into()),
            ports: Some(
                ports
                    .iter()
                    .map(|p| ServicePort {
                        name: p.name.clone(),
                        port: p.port,
                        target_port: Some(IntOrString::Int(p.activator_port)),
                        protocol: Some("TCP".into()),
                        app_protocol: p.app_protocol.clone(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    }
}

/// The EndpointSlice of the managed Service: the ready activator pods, each Service
/// port mapped to the activator port assigned to it.
pub fn managed_slice(
    ss: &ScaledService,
    ports: &[PortStatus],
    activators: &[String],
) -> EndpointSlice {
    let svc = ss.managed_service_name();
    let mut addrs: Vec<String> = activators.to_vec();
    addrs.sort();
    addrs.dedup();
    EndpointSlice {
        metadata: meta(
            ss,
            svc.clone(),
            &[
                ("kubernetes.io/service-name", &svc),
                ("endpointslice.kubernetes.io/managed-by", MANAGER),
            ],
        ),
        address_type: "IPv4".into(),
        endpoints: addrs
            .into_iter()
            .map(|ip| Endpoint {
                addresses: vec![ip],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                ..Default::default()
            })
            .collect(),
        ports: Some(
            ports
                .iter()
                .map(|p| EndpointPort {
                    name: Some(p.name.clone().unwrap_or_default()),
                    port: Some(p.activator_port),
                    protocol: Some("TCP".into()),
                    app_protocol: p.app_protocol.clone(),
                })
                .collect(),
        ),
    }
}

fn owned_labels_match(have: &ObjectMeta, want: &ObjectMeta) -> bool {
    let hl = have.labels.clone().unwrap_or_default();
    want.labels
        .iter()
        .flatten()
        .all(|(k, v)| hl.get(k) == Some(v))
        && have.owner_references == want.owner_references
}

/// The fields of a Service port we own: name, port, target port, app protocol.
type OwnedPort = (Option<String>, i32, Option<IntOrString>, Option<String>);

/// True when the live Service differs from the desired one in a field we own.
pub fn service_differs(have: &Service, want: &Service) -> bool {
    let ports = |s: &Service| -> Vec<OwnedPort> {
        s.spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| {
                (
                    p.name.clone().filter(|n| !n.is_empty()),
                    p.port,
                    p.target_port.clone(),
                    p.app_protocol.clone(),
                )
            })
            .collect()
    };
    !owned_labels_match(&have.metadata, &want.metadata)
        || ports(have) != ports(want)
        || have
            .spec
            .as_ref()
            .and_then(|s| s.selector.as_ref())
            .is_some_and(|s| !s.is_empty())
}

/// True when the live EndpointSlice differs from the desired one.
pub fn slice_differs(have: &EndpointSlice, want: &EndpointSlice) -> bool {
    let eps = |s: &EndpointSlice| -> Vec<(Vec<String>, Option<bool>)> {
        let mut v: Vec<_> = s
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.addresses.clone(),
                    e.conditions.as_ref().and_then(|c| c.ready),
                )
            })
            .collect();
        v.sort();
        v
    };
    let ports = |s: &EndpointSlice| -> Vec<(Option<String>, Option<i32>, Option<String>)> {
        s.ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone().filter(|n| !n.is_empty()),
                    p.port,
                    p.app_protocol.clone(),
                )
            })
            .collect()
    };
    !owned_labels_match(&have.metadata, &want.metadata)
        || eps(have) != eps(want)
        || ports(have) != ports(want)
}

/// A condition in the Kubernetes convention. The transition time is kept from the
/// previous condition of the same type when its status did not change.
pub fn condition(
    prev: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ss() -> ScaledService {
        serde_json::from_value(json!({
            "apiVersion": "snooze.dev/v1alpha1", "kind": "ScaledService",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1"},
            "spec": {"scaleTargetRef": {"name": "web"}, "service": "web"}
        }))
        .unwrap()
    }

    fn backend() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "grpc", "port": 9000, "targetPort": 9000, "appProtocol": "kubernetes.io/h2c"},
                {"name": "dns", "port": 53, "protocol": "UDP"}
            ]}
        }))
        .unwrap()
    }

    #[test]
    fn a_refused_port_gives_back_only_what_the_call_assigned() {
        // Room for one more port in the namespace: the second of the backend's two
        // TCP ports is refused, and the first is given back.
        let mut alloc = PortAllocator::with_namespace_limit(20000..=20100, 2);
        alloc
            .assign(&PortKey::new("shop", "other", "http"))
            .unwrap();
        let e = port_statuses(&ss(), &backend(), &mut alloc).unwrap_err();
        assert_eq!(e.reason(), "NamespacePortLimit");
        assert_eq!(alloc.in_namespace("shop"), 1);
        assert!(alloc.keys_of("shop", "web").is_empty());
        // Ports it held before stay its.
        let mut alloc = PortAllocator::with_namespace_limit(20000..=20100, 2);
        alloc.assign(&PortKey::new("shop", "web", "http")).unwrap();
        alloc
            .assign(&PortKey::new("shop", "other", "http"))
            .unwrap();
        assert!(port_statuses(&ss(), &backend(), &mut alloc).is_err());
        assert_eq!(
            alloc.keys_of("shop", "web"),
            vec![PortKey::new("shop", "web", "http")]
        );
    }

    #[test]
    fn builds_service_and_slice_with_assigned_ports() {
        let mut alloc = PortAllocator::new(20000..=20100);
        let ports = port_statuses(&ss(), &backend(), &mut alloc).unwrap();
        assert_eq!(ports.len(), 2, "UDP ports are not served");
        assert_eq!((ports[0].port, ports[0].activator_port), (80, 20000));
        assert_eq!(ports[1].app_protocol.as_deref(), Some("kubernetes.io/h2c"));

        let svc = managed_service(&ss(), &ports);
        assert_eq!(svc.metadata.name.as_deref(), Some("web-snooze"));
        let spec = svc.spec.as_ref().unwrap();
        assert!(spec.selector.is_none(), "no selector: the slice is ours");
        assert_eq!(
            spec.ports.as_ref().unwrap()[0].target_port,
            Some(IntOrString::Int(20000))
        );
        let owner = &svc.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("ScaledService", "u-1", Some(true))
        );

        let slice = managed_slice(&ss(), &ports, &["10.244.0.2".into(), "10.244.0.1".into()]);
        let l = slice.metadata.labels.as_ref().unwrap();
        assert_eq!(l["kubernetes.io/service-name"], "web-snooze");
        assert_eq!(l["endpointslice.kubernetes.io/managed-by"], MANAGER);
        assert_eq!(slice.endpoints.len(), 2);
        assert_eq!(slice.endpoints[0].addresses, vec!["10.244.0.1"]);
        assert_eq!(
            slice.endpoints[0].conditions.as_ref().unwrap().ready,
            Some(true)
        );
        let p = slice.ports.as_ref().unwrap();
        assert_eq!(
            (p[0].name.as_deref(), p[0].port),
            (Some("http"), Some(20000))
        );
        assert_eq!(
            (p[1].name.as_deref(), p[1].port),
            (Some("grpc"), Some(20001))
        );
    }

    #[test]
    fn differs_only_on_owned_fields() {
        let mut alloc = PortAllocator::new(20000..=20100);
        let ports = port_statuses(&ss(), &backend(), &mut alloc).unwrap();
        let want = managed_slice(&ss(), &ports, &["10.244.0.1".into()]);
        let mut have = want.clone();
        have.metadata.resource_version = Some("42".into());
        have.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("extra".into(), "x".into());
        assert!(!slice_differs(&have, &want));
        have.endpoints.clear();
        assert!(slice_differs(&have, &want));

        let want = managed_service(&ss(), &ports);
        let mut have = want.clone();
        have.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.10".into());
        assert!(!service_differs(&have, &want));
        have.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port =
            Some(IntOrString::Int(1));
        assert!(service_differs(&have, &want));
    }

    #[test]
    fn condition_keeps_transition_time_while_status_holds() {
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(1).unwrap());
        let t2 = Time(k8s_openapi::jiff::Timestamp::from_second(2).unwrap());
        let c1 = condition(&[], "Ready", true, "Programmed", "ok".into(), Some(1), &t1);
        let c2 = condition(
            std::slice::from_ref(&c1),
            "Ready",
            true,
            "Programmed",
            "ok".into(),
            Some(2),
            &t2,
        );
        assert_eq!(c2.last_transition_time, t1);
        let c3 = condition(
            &[c2],
            "Ready",
            false,
            "ServiceNotFound",
            "gone".into(),
            Some(2),
            &t2,
        );
        assert_eq!(c3.last_transition_time, t2);
    }
}
