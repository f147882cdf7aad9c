//! The check the activators run on a cold service's new pods: `spec.activation.probe`
//! when set, else the readiness probe of the workload's pod template, with named ports
//! resolved to numbers. Pure; the reconcile reads the template and writes the result
//! into the status.

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use snooze_crds::{ActivationProbe, GrpcProbe, HttpGetProbe, ProbeHeader, TcpProbe};

/// The probe and where it comes from (or why there is none): for the status.
pub fn resolve(
    explicit: Option<&ActivationProbe>,
    template: Option<&serde_json::Value>,
) -> (Option<ActivationProbe>, String) {
    if let Some(p) = explicit {
        return (Some(p.clone()), "spec.activation.probe".into());
    }
    let Some(template) = template else {
        return (
            None,
            "none: the workload's pod template could not be read; held requests wait for the kubelet's readiness".into(),
        );
    };
    let containers: Vec<Container> = template
        .pointer("/spec/template/spec/containers")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    let Some((c, probe)) = containers
        .iter()
        .find_map(|c| c.readiness_probe.as_ref().map(|p| (c, p)))
    else {
        return (
            None,
            "none: no container has a readiness probe; held requests wait for the kubelet's readiness".into(),
        );
    };
    match from_readiness(c, probe) {
        Ok(p) => (Some(p), format!("readinessProbe of container {}", c.name)),
        Err(why) => (
            None,
            format!(
                "none: the readiness probe of container {} {why}; held requests wait for the kubelet's readiness",
                c.name
            ),
        ),
    }
}

fn port(c: &Container, p: &IntOrString) -> Result<i32, String> {
    match p {
        IntOrString::Int(n) => Ok(*n),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .map(|cp| cp.container_port)
            .ok_or_else(|| format!("names port {name:?}, which the container does not declare")),
    }
}

fn from_readiness(c: &Container, p: &Probe) -> Result<ActivationProbe, String> {
    if let Some(h) = &p.http_get {
        let scheme = h.scheme.clone().unwrap_or_else(|| "HTTP".into());
        if !scheme.eq_ignore_ascii_case("HTTP") {
            return Err(format!("uses {scheme}, which the activator does not check"));
        }
        return Ok(ActivationProbe {
            http_get: Some(HttpGetProbe {
                path: h.path.clone().unwrap_or_else(|| "/".into()),
                port: port(c, &h.port)?,
                scheme: "HTTP".into(),
                http_headers: h
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|x| ProbeHeader {
                        name: x.name.clone(),
                        value: x.value.clone(),
                    })
                    .collect(),
            }),
            ..Default::default()
        });
    }
    if let Some(t) = &p.tcp_socket {
        return Ok(ActivationProbe {
            tcp_socket: Some(TcpProbe {
                port: port(c, &t.port)?,
            }),
            ..Default::default()
        });
    }
    if let Some(g) = &p.grpc {
        return Ok(ActivationProbe {
            grpc: Some(GrpcProbe {
                port: g.port,
                service: g.service.clone().filter(|s| !s.is_empty()),
            }),
            ..Default::default()
        });
    }
    Err("is an exec probe, which only the kubelet can run".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(containers: serde_json::Value) -> serde_json::Value {
        json!({"spec": {"template": {"spec": {"containers": containers}}}})
    }

    #[test]
    fn probes_from_the_pod_template() {
        let cases: Vec<(serde_json::Value, Option<ActivationProbe>, &str)> = vec![
            (
                deployment(
                    json!([{"name": "app", "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http",
                        "httpHeaders": [{"name": "X-Probe", "value": "1"}]}}}]),
                ),
                Some(ActivationProbe {
                    http_get: Some(HttpGetProbe {
                        path: "/ready".into(),
                        port: 8080,
                        scheme: "HTTP".into(),
                        http_headers: vec![ProbeHeader {
                            name: "X-Probe".into(),
                            value: "1".into(),
                        }],
                    }),
                    ..Default::default()
                }),
                "readinessProbe of container app",
            ),
            (
                // The first container with a readiness probe (a sidecar without one first).
                deployment(json!([{"name": "sidecar"},
                    {"name": "app", "readinessProbe": {"tcpSocket": {"port": 9000}}}])),
                Some(ActivationProbe {
                    tcp_socket: Some(TcpProbe { port: 9000 }),
                    ..Default::default()
                }),
                "readinessProbe of container app",
            ),
            (
                deployment(
                    json!([{"name": "app", "readinessProbe": {"grpc": {"port": 50051, "service": ""}}}]),
                ),
                Some(ActivationProbe {
                    grpc: Some(GrpcProbe {
                        port: 50051,
                        service: None,
                    }),
                    ..Default::default()
                }),
                "readinessProbe of container app",
            ),
            (
                deployment(
                    json!([{"name": "app", "readinessProbe": {"exec": {"command": ["true"]}}}]),
                ),
                None,
                "exec probe",
            ),
            (
                deployment(json!([{"name": "app"}])),
                None,
                "no container has a readiness probe",
            ),
            (
                deployment(
                    json!([{"name": "app", "readinessProbe": {"httpGet": {"port": "web"}}}]),
                ),
                None,
                "does not declare",
            ),
            (
                deployment(
                    json!([{"name": "app", "readinessProbe": {"httpGet": {"port": 443, "scheme": "HTTPS"}}}]),
                ),
                None,
                "HTTPS",
            ),
        ];
        for (template, want, source) in cases {
            let (got, why) = resolve(None, Some(&template));
            assert_eq!(got, want, "{template}");
            assert!(why.contains(source), "{why:?} should say {source:?}");
        }
    }

    #[test]
    fn the_spec_wins_over_the_template() {
        let explicit = ActivationProbe {
            tcp_socket: Some(TcpProbe { port: 1 }),
            ..Default::default()
        };
        let t = deployment(json!([{"name": "app", "readinessProbe": {"tcpSocket": {"port": 2}}}]));
        assert_eq!(
            resolve(Some(&explicit), Some(&t)),
            (Some(explicit), "spec.activation.probe".into())
        );
        assert_eq!(resolve(None, None).0, None);
    }
}
