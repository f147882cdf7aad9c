//! A failed wake, told in the status: when held requests got 504 because no pod became
//! ready within `activation.timeout`, the operator reads the workload's pods and says
//! why, in a Warning event and in the `WakeSucceeded` condition (kept until a pod is
//! ready again). Pure: the controller lists the pods and writes what this returns.

use k8s_openapi::api::core::v1::Pod;

/// Condition type: False with the pods' reason after an activation timeout; True again
/// once a pod is ready. Absent until a wake first fails.
pub const CONDITION: &str = "WakeSucceeded";
/// Reason of the Warning event.
pub const EVENT_REASON: &str = "ActivationTimeout";

/// New activation timeouts since the operator last looked, and the count to remember.
/// The first look (`seen` None) only takes the count in: those timeouts happened before
/// this leader. A count that went down (an activator restarted) starts over from it.
pub fn new_timeouts(seen: Option<u64>, now: u64) -> (u64, u64) {
    match seen {
        Some(s) if now > s => (now - s, now),
        _ => (0, now),
    }
}

/// What the pods say about why none is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    /// A condition reason (CamelCase): `NoPods`, `Unschedulable`, `ImagePullBackOff`,
    /// `ErrImagePull`, `CrashLoopBackOff`, `CreateContainerConfigError`, `NotReady`,
    /// `Starting`, `ReadyLate`.
    pub reason: String,
    pub message: String,
}

/// How telling each finding is: the most telling one across the pods is reported.
fn rank(reason: &str) -> u8 {
    match reason {
        "Unschedulable" => 6,
        "ImagePullBackOff" | "ErrImagePull" | "InvalidImageName" => 5,
        "CrashLoopBackOff" => 4,
        "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError" => 4,
        "NotReady" => 2,
        "ReadyLate" => 0,
        _ => 1,
    }
}

/// One pod's finding: (reason, message).
fn pod_finding(pod: &Pod) -> Option<(String, String)> {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    let status = pod.status.as_ref()?;
    if let Some(c) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        let reason = c.reason.clone().unwrap_or_else(|| "Unschedulable".into());
        let why = c.message.clone().unwrap_or_default();
        return Some((reason, format!("pod {name} cannot be scheduled: {why}")));
    }
    let mut best: Option<(String, String)> = None;
    for cs in status.container_statuses.iter().flatten() {
        let state = cs.state.as_ref();
        let finding = if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.clone().unwrap_or_else(|| "Waiting".into());
            let mut msg = format!("pod {name}, container {}: {reason}", cs.name);
            if let Some(m) = w.message.as_deref().filter(|m| !m.is_empty()) {
                msg.push_str(&format!(" ({m})"));
            }
            if cs.restart_count > 0 {
                msg.push_str(&format!(", {} restart(s)", cs.restart_count));
            }
            (reason, msg)
        } else if state.and_then(|s| s.running.as_ref()).is_some() && !cs.ready {
            (
                "NotReady".to_string(),
                format!(
                    "pod {name}, container {}: running but not ready (its readiness probe fails)",
                    cs.name
                ),
            )
        } else {
            continue;
        };
        if best
            .as_ref()
            .is_none_or(|(r, _)| rank(&finding.0) > rank(r))
        {
            best = Some(finding);
        }
    }
    let statuses = status.container_statuses.as_deref().unwrap_or_default();
    if best.is_none() && !statuses.is_empty() && statuses.iter().all(|c| c.ready) {
        return Some((
            "ReadyLate".into(),
            format!(
                "pod {name} is ready now: it became ready after the requests' deadline, or every pod was at activation.podConcurrency"
            ),
        ));
    }
    best.or_else(|| {
        let phase = status.phase.as_deref().unwrap_or("Pending");
        Some(("Starting".into(), format!("pod {name} is {phase}")))
    })
}

/// Why none of `pods` (the pods the backend Service selects) is ready.
pub fn diagnose(pods: &[Pod]) -> Diagnosis {
    let live: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    if live.is_empty() {
        return Diagnosis {
            reason: "NoPods".into(),
            message: "the workload has no pod (see its ReplicaSet's events: quota, admission)"
                .into(),
        };
    }
    let mut best: Option<(String, String)> = None;
    for p in &live {
        if let Some(f) = pod_finding(p)
            && best.as_ref().is_none_or(|(r, _)| rank(&f.0) > rank(r))
        {
            best = Some(f);
        }
    }
    let (reason, message) = best.unwrap_or_else(|| ("Starting".into(), "pods starting".into()));
    let message = if live.len() > 1 {
        format!("{message} ({} pods)", live.len())
    } else {
        message
    };
    Diagnosis { reason, message }
}

/// The Warning event's and the condition's message.
pub fn message(timeouts: u64, timeout: std::time::Duration, d: &Diagnosis) -> String {
    format!(
        "{timeouts} request(s) got 504 after waiting {}s for a ready pod (activation.timeout): {}",
        timeout.as_secs_f64(),
        d.message
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn running_not_ready(name: &str) -> Pod {
        pod(json!({
            "metadata": {"name": name},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "app", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
                "state": {"running": {}}
            }]}
        }))
    }

    fn waiting(name: &str, reason: &str, restarts: i32) -> Pod {
        pod(json!({
            "metadata": {"name": name},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "app", "ready": false, "restartCount": restarts, "image": "x", "imageID": "",
                "state": {"waiting": {"reason": reason, "message": "back-off 10s"}}
            }]}
        }))
    }

    fn unschedulable(name: &str) -> Pod {
        pod(json!({
            "metadata": {"name": name},
            "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/1 nodes are available: 1 Insufficient cpu."
            }]}
        }))
    }

    #[test]
    fn the_most_telling_reason_of_the_pods() {
        let cases: Vec<(Vec<Pod>, &str, &str)> = vec![
            (vec![], "NoPods", "no pod"),
            (
                vec![running_not_ready("a")],
                "NotReady",
                "readiness probe fails",
            ),
            (
                vec![waiting("a", "CrashLoopBackOff", 3)],
                "CrashLoopBackOff",
                "3 restart(s)",
            ),
            (
                vec![waiting("a", "ImagePullBackOff", 0)],
                "ImagePullBackOff",
                "container app",
            ),
            (
                vec![unschedulable("a")],
                "Unschedulable",
                "Insufficient cpu",
            ),
            (
                vec![running_not_ready("a"), waiting("b", "CrashLoopBackOff", 1)],
                "CrashLoopBackOff",
                "(2 pods)",
            ),
            (
                vec![running_not_ready("a"), unschedulable("b")],
                "Unschedulable",
                "pod b",
            ),
            (
                vec![pod(
                    json!({"metadata": {"name": "a"}, "status": {"phase": "Pending"}}),
                )],
                "Starting",
                "pod a is Pending",
            ),
        ];
        for (pods, reason, text) in cases {
            let d = diagnose(&pods);
            assert_eq!(d.reason, reason, "{d:?}");
            assert!(d.message.contains(text), "{d:?} lacks {text:?}");
        }
    }

    #[test]
    fn only_new_timeouts_are_told() {
        assert_eq!(
            new_timeouts(None, 5),
            (0, 5),
            "first look takes the count in"
        );
        assert_eq!(new_timeouts(Some(5), 5), (0, 5));
        assert_eq!(new_timeouts(Some(5), 8), (3, 8));
        assert_eq!(new_timeouts(Some(8), 2), (0, 2), "an activator restarted");
    }

    #[test]
    fn the_message_says_how_many_and_how_long() {
        let d = Diagnosis {
            reason: "NotReady".into(),
            message: "pod a, container app: running but not ready".into(),
        };
        let m = message(4, std::time::Duration::from_secs(10), &d);
        assert!(
            m.starts_with("4 request(s) got 504 after waiting 10s"),
            "{m}"
        );
    }
}
