//! What the status says, as pure functions of what the reconcile read: why a
//! ScaledService cannot be programmed, and its `Ready` and `Active` conditions.

use std::time::{Duration, SystemTime};

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
    None
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

/// Whether `status.lastRequestTime` is rewritten: at most every 10 s (each write is an
/// API call), always when it was never set.
pub fn show_last_request(shown: Option<SystemTime>, last: SystemTime) -> bool {
    shown.is_none_or(|s| last >= s + Duration::from_secs(10))
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
    fn references_are_checked_in_order() {
        let bad_schedule = json!([{"cron": "not a cron", "duration": "1h", "minReplicas": 1}]);
        // (the ScaledService, conflicting owner, Service found, reason, text)
        type Case<'a> = (
            ScaledService,
            Option<&'a str>,
            bool,
            Option<&'a str>,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (ss(json!([])), None, true, None, ""),
            (
                ss(json!([])),
                None,
                false,
                Some("ServiceNotFound"),
                "Service web-svc not found in namespace shop",
            ),
            (
                ss(json!([])),
                Some("older"),
                false,
                Some("Conflict"),
                "Deployment web is already scaled by ScaledService older",
            ),
            (
                ss(bad_schedule.clone()),
                None,
                false,
                Some("InvalidSchedule"),
                "",
            ),
            (ss(bad_schedule), Some("older"), true, Some("Conflict"), ""),
        ];
        for (ss, conflict, found, reason, text) in cases {
            let p = references_problem(&ss, conflict, found);
            assert_eq!(p.as_ref().map(|p| p.reason), reason, "{p:?}");
            if let Some(p) = p {
                assert!(p.message.contains(text), "{p:?} lacks {text:?}");
            }
        }
    }

    #[test]
    fn conditions_tell_the_state() {
        let ports = [PortStatus {
            name: Some("http".into()),
            port: 80,
            activator_port: 20000,
            app_protocol: None,
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
    fn last_request_is_shown_at_most_every_10s() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert!(show_last_request(None, t));
        assert!(!show_last_request(Some(t), t + Duration::from_secs(9)));
        assert!(show_last_request(Some(t), t + Duration::from_secs(10)));
        assert!(!show_last_request(Some(t), t - Duration::from_secs(1)));
    }
}
