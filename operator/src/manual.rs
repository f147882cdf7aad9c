//! Steering by hand: the `snooze.dev/paused`, `snooze.dev/wake-until` and
//! `snooze.dev/sleep` annotations (`snooze_crds::annotations`), read into what the
//! decision needs, and "why is it awake?" in one line. Pure.
//!
//! Annotations rather than spec fields: they are what `kubectl annotate`, the
//! `kubectl snooze` plugin and GitOps tools set without owning the spec (KEDA's
//! `autoscaling.keda.sh/paused`, Flux's `reconcile.fluxcd.io/requestedAt` are the same
//! pattern); the status acknowledges each.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use snooze_crds::annotations::{PAUSED, SLEEP, WAKE_UNTIL};
use snooze_crds::{ActivityEntry, ScaledService};

/// What the annotations ask for now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manual {
    pub paused: bool,
    /// A valid `wake-until` time (past ones included: the idle clock runs from it).
    pub awake_until: Option<SystemTime>,
    /// A `sleep` value not yet acted on (`status.handledSleep` differs).
    pub sleep: Option<String>,
    /// Annotations whose value is not understood: said in a Warning event, ignored.
    pub invalid: Vec<String>,
}

/// Reads the annotations of `ss` (values trimmed; `paused` is `"true"` or `"false"`).
pub fn read(ss: &ScaledService) -> Manual {
    let empty = BTreeMap::new();
    let a = ss.metadata.annotations.as_ref().unwrap_or(&empty);
    let mut m = Manual::default();
    match a.get(PAUSED).map(|v| v.trim()) {
        None | Some("false") | Some("") => {}
        Some("true") => m.paused = true,
        Some(v) => m
            .invalid
            .push(format!("{PAUSED}: {v:?} is neither \"true\" nor \"false\"")),
    }
    if let Some(v) = a
        .get(WAKE_UNTIL)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
    {
        match v.parse::<jiff::Timestamp>() {
            Ok(t) => m.awake_until = Some(t.into()),
            Err(e) => m.invalid.push(format!(
                "{WAKE_UNTIL}: {v:?} is not an RFC 3339 time such as 2026-12-03T18:30:00Z ({e})"
            )),
        }
    }
    let handled = ss.status.as_ref().and_then(|s| s.handled_sleep.as_deref());
    if let Some(v) = a.get(SLEEP).filter(|v| !v.trim().is_empty())
        && handled != Some(v.as_str())
    {
        m.sleep = Some(v.clone());
    }
    m
}

/// What holds an awake service up, for `status.awakeBecause`, in order: paused, a
/// wake-until, the services that need it, `minReplicas`, the top client. `None` when
/// asleep. Requests in flight are not looked at: they change every second, and the
/// status must not (a stream still open holds the service past `sleepsAt`, and its
/// client is the top one).
pub struct Holders<'a> {
    pub replicas: i32,
    pub paused: bool,
    pub awake_until: Option<SystemTime>,
    pub needed_by: &'a [String],
    pub min_replicas: i32,
    pub activity: &'a [ActivityEntry],
}

impl Holders<'_> {
    /// Whether only requests keep it awake: then it sleeps at the idle deadline.
    pub fn requests_only(&self, now: SystemTime) -> bool {
        self.replicas > 0
            && !self.paused
            && self.awake_until.is_none_or(|t| t <= now)
            && self.needed_by.is_empty()
            && self.min_replicas <= 0
    }

    pub fn because(&self, now: SystemTime) -> Option<String> {
        if self.paused {
            return Some(format!("paused ({PAUSED})"));
        }
        if self.replicas <= 0 {
            return None;
        }
        if let Some(t) = self.awake_until.filter(|t| *t > now) {
            let t = jiff::Timestamp::try_from(t)
                .unwrap_or_default()
                .round(jiff::Unit::Second)
                .unwrap_or_default();
            return Some(format!("woken until {t} ({WAKE_UNTIL})"));
        }
        if !self.needed_by.is_empty() {
            return Some(format!("needed by {}", self.needed_by.join(", ")));
        }
        if self.min_replicas > 0 {
            return Some(format!("minReplicas {}", self.min_replicas));
        }
        self.activity.first().map(ActivityEntry::summary)
    }
}

/// When an awake service held up by requests only sleeps: `since` (its idle clock's
/// start) plus the idle timeout, rounded up to the second (the status shows seconds).
pub fn sleeps_at(since: SystemTime, idle: Duration) -> SystemTime {
    let at = since + idle;
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ss(annotations: serde_json::Value, handled: Option<&str>) -> ScaledService {
        serde_json::from_value(json!({
            "apiVersion": "snooze.dev/v1alpha1", "kind": "ScaledService",
            "metadata": {"name": "web", "namespace": "shop", "annotations": annotations},
            "spec": {"scaleTargetRef": {"name": "web"}, "service": "web"},
            "status": {"handledSleep": handled},
        }))
        .unwrap()
    }

    #[test]
    fn annotations_are_read_and_bad_values_said() {
        let m = read(&ss(
            json!({PAUSED: "true", WAKE_UNTIL: "2026-12-03T18:30:00Z", SLEEP: "a"}),
            None,
        ));
        assert!(m.paused);
        assert_eq!(
            m.awake_until,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_322_600))
        );
        assert_eq!(m.sleep.as_deref(), Some("a"));
        assert!(m.invalid.is_empty());
        // A handled sleep is not asked again; a new value is.
        assert_eq!(read(&ss(json!({SLEEP: "a"}), Some("a"))).sleep, None);
        assert_eq!(
            read(&ss(json!({SLEEP: "b"}), Some("a"))).sleep.as_deref(),
            Some("b")
        );
        let m = read(&ss(
            json!({PAUSED: "yes", WAKE_UNTIL: "in 30 minutes"}),
            None,
        ));
        assert!(!m.paused && m.awake_until.is_none());
        assert_eq!(m.invalid.len(), 2, "{:?}", m.invalid);
        assert!(m.invalid[1].contains("RFC 3339"));
    }

    #[test]
    fn why_it_is_awake_in_order() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let top = ActivityEntry {
            client: "10.0.0.5".into(),
            user_agent: Some("kube-probe/1.33".into()),
            method: "GET".into(),
            path: Some("/healthz".into()),
            count: 120,
            last_seen: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::UNIX_EPOCH,
            ),
        };
        let needed = vec!["web".to_string()];
        let mut h = Holders {
            replicas: 1,
            paused: false,
            awake_until: None,
            needed_by: &[],
            min_replicas: 0,
            activity: std::slice::from_ref(&top),
        };
        assert_eq!(
            h.because(now).as_deref(),
            Some("kube-probe/1.33 GET /healthz ×120 from 10.0.0.5")
        );
        assert!(h.requests_only(now));
        h.needed_by = &needed;
        assert_eq!(h.because(now).as_deref(), Some("needed by web"));
        assert!(!h.requests_only(now));
        h.awake_until = Some(now + Duration::from_secs(60));
        assert!(
            h.because(now)
                .unwrap()
                .starts_with("woken until 1970-01-01T00:17:40Z")
        );
        h.paused = true;
        assert!(h.because(now).unwrap().starts_with("paused"));
        h.paused = false;
        h.replicas = 0;
        assert_eq!(h.because(now), None);
    }

    #[test]
    fn sleeps_at_rounds_up_to_the_second() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(10_250);
        assert_eq!(
            sleeps_at(t, Duration::from_secs(30)),
            SystemTime::UNIX_EPOCH + Duration::from_secs(41)
        );
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        assert_eq!(
            sleeps_at(t, Duration::from_secs(30)),
            SystemTime::UNIX_EPOCH + Duration::from_secs(40)
        );
    }
}
