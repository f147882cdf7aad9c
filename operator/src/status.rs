//! What the status says, as pure functions of what the reconcile read: why a
//! ScaledService cannot be programmed, and its `Ready` and `Active` conditions.

use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use snooze_crds::{PortStatus, ScaledService};

/// Why a ScaledService cannot be programmed; shown as `Ready=False` with a Warning
/// event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// The first problem with what the ScaledService names, in this order: another
/// (older) ScaledService scales the workload; a schedule is invalid; the backend
/// Service is missing (`service_found` is not looked at under a conflict). The scale
/// target itself is checked after, through the API.
pub fn references_problem(
    ss: &ScaledService,
    conflict_owner: Option<&str>,
    service_found: bool,
    service_selects_pods: bool,
) -> Option<Problem> {
    let ns = ss.metadata.namespace.as_deref().unwrap_or_default();
    let target = &ss.spec.scale_target_ref;
    if let Some(owner) = conflict_owner {
        return Some(Problem {
            reason: "Conflict",
            message: format!(
                "{} {} is already scaled by ScaledService {owner}",
                target.kind, target.name
            ),
        });
    }
    if let Err(e) = crate::schedule::validate(&ss.spec.schedules) {
        return Some(Problem {
            reason: "InvalidSchedule",
            message: e,
        });
    }
    if !service_found {
        return Some(Problem {
            reason: "ServiceNotFound",
            message: format!("Service {} not found in namespace {ns}", ss.spec.service),
        });
    }
    // The activator forwards only to the pods the EndpointSlice controller lists for a
    // Service's selector: hand-written endpoints (a selector-less Service) could name
    // any address, another tenant's pod included.
    if !service_selects_pods {
        return Some(Problem {
            reason: "ServiceWithoutSelector",
            message: format!(
                "Service {} in namespace {ns} has no selector: Snooze forwards only to the pods a Service selects, never to hand-written endpoints",
                ss.spec.service
            ),
        });
    }
    None
}

/// `spec.ports` entries that name no port of the backend Service (by name, or number
/// for an unnamed port): said at once rather than silently served as HTTP.
pub fn ports_problem(ss: &ScaledService, backend_ports: &[(Option<&str>, i32)]) -> Option<Problem> {
    let known: Vec<String> = backend_ports
        .iter()
        .map(|(n, p)| crate::objects::port_id(*n, *p))
        .collect();
    let unknown: Vec<&str> = ss
        .spec
        .ports
        .iter()
        .map(|p| p.name.as_str())
        .filter(|n| !known.iter().any(|k| k == n))
        .collect();
    if unknown.is_empty() {
        return None;
    }
    Some(Problem {
        reason: "UnknownPort",
        message: format!(
            "spec.ports names {} but Service {} has only the ports {}",
            unknown.join(", "),
            ss.spec.service,
            known.join(", ")
        ),
    })
}

/// Whether `meta` names this ScaledService (its uid) among its owners: only what the
/// ScaledService created is its to change or delete.
pub fn owned_by(meta: &ObjectMeta, ss: &ScaledService) -> bool {
    let Some(uid) = ss.metadata.uid.as_deref() else {
        return false;
    };
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == uid && o.kind == "ScaledService")
}

/// The managed Service's name (`<name>-snooze`) held by a Service or EndpointSlice
/// this ScaledService did not create: it is left untouched (never taken over, never
/// deleted with the ScaledService) and the ScaledService says so.
pub fn name_taken(
    ss: &ScaledService,
    service: Option<&ObjectMeta>,
    slice: Option<&ObjectMeta>,
) -> Option<Problem> {
    let name = ss.managed_service_name();
    let ns = ss.metadata.namespace.as_deref().unwrap_or_default();
    let kind = match (service, slice) {
        (Some(m), _) if !owned_by(m, ss) => "Service",
        (_, Some(m)) if !owned_by(m, ss) => "EndpointSlice",
        _ => return None,
    };
    Some(Problem {
        reason: "ManagedNameTaken",
        message: format!(
            "{kind} {name} in namespace {ns} exists and was not created by this ScaledService: Snooze leaves it untouched; delete or rename it, or rename the ScaledService"
        ),
    })
}

/// A condition's status, reason and message.
pub type Verdict = (bool, &'static str, String);

/// `Ready`: programmed once at least one ready activator listens on the ports.
pub fn ready(
    serving: usize,
    ready_activators: usize,
    managed: &str,
    backend: &str,
    ports: &[PortStatus],
) -> Verdict {
    let list: Vec<String> = ports
        .iter()
        .map(|p| format!("{}→{}", p.port, p.activator_port))
        .collect();
    if serving == 0 {
        (
            false,
            "NoActivator",
            format!(
                "no ready activator listens on ports {} yet ({ready_activators} ready activator(s)); Service {managed} has no endpoint until one does",
                list.join(", ")
            ),
        )
    } else {
        (
            true,
            "Programmed",
            format!(
                "Service {managed} routes to {backend} through {serving} activator(s) (ports {})",
                list.join(", ")
            ),
        )
    }
}

/// `Active`: the workload has ready replicas; asleep at zero; waking otherwise.
pub fn active(ready_replicas: i32, replicas: i32) -> Verdict {
    match (ready_replicas, replicas) {
        (r, _) if r > 0 => (true, "ReplicasReady", format!("{r} ready replica(s)")),
        (_, 0) => (
            false,
            "ScaledToZero",
            "asleep: the next request wakes it".to_string(),
        ),
        (_, n) => (
            false,
            "Waking",
            format!("waiting for {n} replica(s) to become ready"),
        ),
    }
}

/// How stale `status.lastRequestTime` may be while requests keep coming: it is
/// rewritten at most once a minute per service (each write is an API call and a
/// reconcile: at 1,000 busy services, 17 a second instead of 100), at once when it was
/// never set, and once the service has been quiet for [`quiet`] (so `sleepsAt`, computed
/// from it, is exact before the service sleeps). `activity` and `awakeBecause` are
/// rewritten with it.
pub const LAST_REQUEST_RESOLUTION: Duration = Duration::from_secs(60);

/// How long without a request before the shown last request is made exact: half the
/// idle timeout. Not less: each quiet gap that long is a rewrite, so a service whose
/// requests come in bursts would otherwise rewrite its status after every gap (with
/// 30 s, a client polling every 40 s under a one-hour idle timeout rewrote it every
/// 40 s); until then the shown value is at most a minute behind.
pub fn quiet(idle: Duration) -> Duration {
    idle / 2
}

/// Whether `status.lastRequestTime` is rewritten (see [`LAST_REQUEST_RESOLUTION`]). The
/// status keeps whole seconds: a newer request within the shown second is not news.
pub fn show_last_request(
    shown: Option<SystemTime>,
    last: SystemTime,
    now: SystemTime,
    idle: Duration,
) -> bool {
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    };
    match shown {
        None => true,
        Some(s) if secs(last) <= secs(s) => false,
        Some(s) => {
            last >= s + LAST_REQUEST_RESOLUTION
                || now.duration_since(last).unwrap_or_default() >= quiet(idle)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ss(schedules: serde_json::Value) -> ScaledService {
        serde_json::from_value(json!({
            "apiVersion": "snooze.dev/v1alpha1", "kind": "ScaledService",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"scaleTargetRef": {"name": "web"}, "service": "web-svc", "schedules": schedules},
        }))
        .unwrap()
    }

    #[test]
    fn a_spec_port_the_service_lacks_is_unknown_port() {
        let with_ports = |ports: serde_json::Value| -> ScaledService {
            serde_json::from_value(json!({
                "apiVersion": "snooze.dev/v1alpha1", "kind": "ScaledService",
                "metadata": {"name": "db", "namespace": "shop"},
                "spec": {"scaleTargetRef": {"name": "db"}, "service": "db", "ports": ports},
            }))
            .unwrap()
        };
        let backend = [(Some("postgres"), 5432), (None, 9187)];
        let ok = with_ports(
            json!([{"name": "postgres", "protocol": "TCP"}, {"name": "9187", "protocol": "HTTP"}]),
        );
        assert_eq!(ports_problem(&ok, &backend), None);
        let bad = with_ports(json!([{"name": "postgress", "protocol": "TCP"}]));
        let p = ports_problem(&bad, &backend).expect("a problem");
        assert_eq!(p.reason, "UnknownPort");
        assert!(
            p.message.contains("postgress") && p.message.contains("postgres, 9187"),
            "{}",
            p.message
        );
    }

    #[test]
    fn references_are_checked_in_order() {
        let bad_schedule = json!([{"cron": "not a cron", "duration": "1h", "minReplicas": 1}]);
        // (the ScaledService, conflicting owner, Service found, Service has a selector,
        // reason, text)
        type Case<'a> = (
            ScaledService,
            Option<&'a str>,
            bool,
            bool,
            Option<&'a str>,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (ss(json!([])), None, true, true, None, ""),
            (
                ss(json!([])),
                None,
                false,
                false,
                Some("ServiceNotFound"),
                "Service web-svc not found in namespace shop",
            ),
            (
                ss(json!([])),
                None,
                true,
                false,
                Some("ServiceWithoutSelector"),
                "Service web-svc in namespace shop has no selector",
            ),
            (
                ss(json!([])),
                Some("older"),
                false,
                false,
                Some("Conflict"),
                "Deployment web is already scaled by ScaledService older",
            ),
            (
                ss(bad_schedule.clone()),
                None,
                false,
                false,
                Some("InvalidSchedule"),
                "",
            ),
            (
                ss(bad_schedule),
                Some("older"),
                true,
                true,
                Some("Conflict"),
                "",
            ),
        ];
        for (ss, conflict, found, selects, reason, text) in cases {
            let p = references_problem(&ss, conflict, found, selects);
            assert_eq!(p.as_ref().map(|p| p.reason), reason, "{p:?}");
            if let Some(p) = p {
                assert!(p.message.contains(text), "{p:?} lacks {text:?}");
            }
        }
    }

    #[test]
    fn only_what_it_created_is_its_own() {
        let mut me = ss(json!([]));
        me.metadata.uid = Some("uid-1".into());
        let meta = |owner: Option<(&str, &str)>| -> ObjectMeta {
            serde_json::from_value(json!({
                "name": "web-snooze",
                "ownerReferences": owner.map(|(kind, uid)| vec![json!({
                    "apiVersion": "snooze.dev/v1alpha1", "kind": kind, "name": "web",
                    "uid": uid, "controller": true,
                })]),
            }))
            .unwrap()
        };
        let mine = meta(Some(("ScaledService", "uid-1")));
        let users = meta(None);
        let other = meta(Some(("ScaledService", "uid-2")));
        let lookalike = meta(Some(("Deployment", "uid-1")));
        assert!(owned_by(&mine, &me));
        for m in [&users, &other, &lookalike] {
            assert!(!owned_by(m, &me), "{m:?}");
        }
        assert_eq!(name_taken(&me, None, None), None);
        assert_eq!(name_taken(&me, Some(&mine), Some(&mine)), None);
        let p = name_taken(&me, Some(&users), None).expect("a Service of the user's");
        assert_eq!(p.reason, "ManagedNameTaken");
        assert!(
            p.message
                .starts_with("Service web-snooze in namespace shop exists"),
            "{}",
            p.message
        );
        let p = name_taken(&me, Some(&mine), Some(&other)).expect("another's slice");
        assert!(
            p.message.starts_with("EndpointSlice web-snooze"),
            "{}",
            p.message
        );
        // Without its own uid (not yet created), nothing is its own.
        me.metadata.uid = None;
        assert!(name_taken(&me, Some(&mine), None).is_some());
    }

    #[test]
    fn conditions_tell_the_state() {
        let ports = [PortStatus {
            name: Some("http".into()),
            port: 80,
            activator_port: 20000,
            app_protocol: None,
            tcp: None,
        }];
        let cases: Vec<(Verdict, bool, &str, &str)> = vec![
            (
                ready(2, 2, "web-snooze", "web", &ports),
                true,
                "Programmed",
                "through 2 activator(s) (ports 80→20000)",
            ),
            (
                ready(0, 3, "web-snooze", "web", &ports),
                false,
                "NoActivator",
                "(3 ready activator(s))",
            ),
            (active(2, 2), true, "ReplicasReady", "2 ready replica(s)"),
            (active(0, 0), false, "ScaledToZero", "next request wakes it"),
            (active(0, 1), false, "Waking", "waiting for 1 replica(s)"),
            (active(1, 0), true, "ReplicasReady", "1 ready"),
        ];
        for ((ok, reason, msg), want_ok, want_reason, text) in cases {
            assert_eq!((ok, reason), (want_ok, want_reason), "{msg}");
            assert!(msg.contains(text), "{msg} lacks {text:?}");
        }
    }

    #[test]
    fn last_request_is_shown_at_most_once_a_minute_and_exact_once_quiet() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let idle = Duration::from_secs(300);
        let s = |n| Duration::from_secs(n);
        // Busy (the last request just now): once a minute.
        assert!(show_last_request(None, t, t, idle));
        assert!(!show_last_request(Some(t), t + s(59), t + s(59), idle));
        assert!(show_last_request(Some(t), t + s(60), t + s(60), idle));
        assert!(!show_last_request(Some(t), t - s(1), t, idle));
        // Quiet for half the idle timeout: made exact.
        assert!(!show_last_request(Some(t), t + s(5), t + s(154), idle));
        assert!(show_last_request(Some(t), t + s(5), t + s(155), idle));
        assert!(show_last_request(Some(t), t + s(5), t + s(15), s(20)));
        // Bursts with quiet gaps between them (a request every 40 s under a one-hour
        // idle timeout): a rewrite a minute at most, not one per gap.
        let hour = s(3600);
        let mut shown = t;
        let mut writes = 0;
        for n in 1..=30u64 {
            let last = t + s(40 * n);
            for now in (40 * n..40 * (n + 1)).map(|x| t + s(x)) {
                if show_last_request(Some(shown), last, now, hour) {
                    shown = last;
                    writes += 1;
                }
            }
        }
        assert!(writes <= 20, "{writes} rewrites in 20 minutes");
        // Within the shown second: nothing new.
        let ms = t + Duration::from_millis(900);
        assert!(!show_last_request(Some(t), ms, t + s(100), idle));
    }
}
