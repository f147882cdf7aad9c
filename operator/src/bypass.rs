//! The usual mistake when putting Snooze in front of an app: an Ingress or HTTPRoute
//! that still sends traffic to the app's own Service. While the app sleeps that Service
//! has no endpoints, so requests through the route fail at the ingress and never reach
//! an activator, and nothing wakes the app. The leader looks at the routes in the
//! ScaledService's namespace now and then and says so in a Warning event. Pure: the
//! controller lists the objects.

use k8s_openapi::api::networking::v1::Ingress;
use kube::ResourceExt;
use kube::core::DynamicObject;

pub const EVENT_REASON: &str = "BackendBypassesSnooze";

/// One route object and the Services it sends traffic to, as (namespace, name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub backends: Vec<(String, String)>,
}

/// An Ingress's Service backends: the default backend and every path's.
pub fn from_ingress(i: &Ingress) -> Route {
    let ns = i.namespace().unwrap_or_default();
    let spec = i.spec.as_ref();
    let default = spec.and_then(|s| s.default_backend.as_ref());
    let paths = spec
        .into_iter()
        .flat_map(|s| s.rules.iter().flatten())
        .filter_map(|r| r.http.as_ref())
        .flat_map(|h| h.paths.iter().map(|p| &p.backend));
    let backends = default
        .into_iter()
        .chain(paths)
        .filter_map(|b| b.service.as_ref())
        .map(|s| (ns.clone(), s.name.clone()))
        .collect();
    Route {
        kind: "Ingress",
        namespace: ns,
        name: i.name_any(),
        backends,
    }
}

/// An HTTPRoute's (or GRPCRoute's) Service backends: every rule's `backendRefs` of
/// the core group and kind `Service` (the defaults), in the route's namespace unless
/// the reference names another.
pub fn from_route(kind: &'static str, r: &DynamicObject) -> Route {
    let ns = r.namespace().unwrap_or_default();
    let rules = r.data["spec"]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let backends = rules
        .iter()
        .flat_map(|rule| rule["backendRefs"].as_array().cloned().unwrap_or_default())
        .filter(|b| b["group"].as_str().unwrap_or("").is_empty())
        .filter(|b| b["kind"].as_str().unwrap_or("Service") == "Service")
        .filter_map(|b| {
            let name = b["name"].as_str()?.to_string();
            let bns = b["namespace"].as_str().unwrap_or(&ns).to_string();
            Some((bns, name))
        })
        .collect();
    Route {
        kind,
        namespace: ns,
        name: r.name_any(),
        backends,
    }
}

/// One message per route that sends traffic to `service` (in `namespace`) rather than
/// to `managed`, sorted.
pub fn findings(namespace: &str, service: &str, managed: &str, routes: &[Route]) -> Vec<String> {
    let mut out: Vec<String> = routes
        .iter()
        .filter(|r| {
            r.backends
                .iter()
                .any(|(ns, name)| ns == namespace && name == service)
        })
        .map(|r| {
            format!(
                "{} {}/{} sends traffic to Service {service}, which has no endpoints while \
                 {service} sleeps: requests through it fail at the ingress and never wake \
                 it. Point its backend at {managed} (same port).",
                r.kind, r.namespace, r.name
            )
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingress(v: serde_json::Value) -> Ingress {
        serde_json::from_value(v).unwrap()
    }

    fn route(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn ingress_backends_default_and_paths() {
        let i = ingress(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "defaultBackend": {"service": {"name": "fallback", "port": {"number": 80}}},
                "rules": [
                    {"host": "a", "http": {"paths": [
                        {"path": "/", "pathType": "Prefix",
                         "backend": {"service": {"name": "web", "port": {"number": 80}}}},
                        {"path": "/x", "pathType": "Prefix",
                         "backend": {"resource": {"kind": "Bucket", "name": "b"}}}
                    ]}},
                    {"host": "b"}
                ]
            }
        }));
        assert_eq!(
            from_ingress(&i).backends,
            vec![
                ("shop".to_string(), "fallback".to_string()),
                ("shop".to_string(), "web".to_string())
            ]
        );
    }

    #[test]
    fn route_backends_are_services_only() {
        let r = route(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"rules": [
                {"backendRefs": [{"name": "web", "port": 80}]},
                {"backendRefs": [
                    {"name": "other", "namespace": "infra", "port": 80},
                    {"group": "example.com", "kind": "Bucket", "name": "web"},
                    {"group": "", "kind": "Service", "name": "web-snooze", "port": 80}
                ]},
                {"matches": [{"path": {"value": "/"}}]}
            ]}
        }));
        assert_eq!(
            from_route("HTTPRoute", &r).backends,
            vec![
                ("shop".to_string(), "web".to_string()),
                ("infra".to_string(), "other".to_string()),
                ("shop".to_string(), "web-snooze".to_string())
            ]
        );
    }

    #[test]
    fn only_routes_to_the_apps_own_service_are_reported() {
        let r = |kind, ns: &str, name: &str, backends: &[(&str, &str)]| Route {
            kind,
            namespace: ns.into(),
            name: name.into(),
            backends: backends
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        };
        let routes = [
            r("Ingress", "shop", "good", &[("shop", "web-snooze")]),
            r(
                "Ingress",
                "shop",
                "old",
                &[("shop", "api"), ("shop", "web")],
            ),
            r("HTTPRoute", "shop", "route", &[("shop", "web")]),
            // Same name in another namespace: another Service.
            r("HTTPRoute", "blog", "elsewhere", &[("blog", "web")]),
        ];
        let f = findings("shop", "web", "web-snooze", &routes);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].starts_with("HTTPRoute shop/route sends traffic to Service web,"));
        assert!(f[1].starts_with("Ingress shop/old sends traffic to Service web,"));
        assert!(f[1].ends_with("Point its backend at web-snooze (same port)."));
        assert!(findings("shop", "web", "web-snooze", &routes[..1]).is_empty());
    }
}
