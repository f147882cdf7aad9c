//! The scaling decision: a pure function of the policy, the replicas, the load the
//! activators report and the time. The operator applies it on every reconcile and at
//! once on a wake signal.

use std::time::{Duration, SystemTime};

/// What all activators together report for one service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub in_flight: u64,
    pub queued: u64,
    /// The most recent request any activator saw.
    pub last_request: Option<SystemTime>,
    /// True when every activator has reported recently; scaling to zero needs it.
    pub complete: bool,
    /// An activator asked to wake this service just now.
    pub wake: bool,
    /// An awake ScaledService needs this one (`spec.needs`): it wakes, and does not
    /// sleep.
    pub needed: bool,
    /// Requests received, summed over the activators (a counter).
    pub requests: u64,
    /// Requests answered 504 after the activation timeout, summed over the
    /// activators (a counter; it drops when an activator restarts).
    pub timeouts: u64,
    /// Replicas the autoscaler derives from the recent load (see `autoscale`), when
    /// it has decided; `None` keeps the current replicas while awake.
    pub wants: Option<i32>,
}

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub idle_timeout: Duration,
    /// Replicas to start on a wake from zero.
    pub wake_replicas: i32,
    /// Most replicas removed per decision, going to sleep too.
    pub max_step: i32,
    /// `snooze.dev/paused`: the replicas are left as they are.
    pub paused: bool,
    /// `snooze.dev/wake-until`: awake until then (woken if asleep); the idle clock
    /// runs from it after.
    pub awake_until: Option<SystemTime>,
    /// A `snooze.dev/sleep` not yet acted on: down to `minReplicas` at once, as soon
    /// as nothing holds the service (requests, needs, a wake-until).
    pub sleep: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Requests are waiting and the workload is at zero.
    Wake,
    /// No request for `idleTimeout`.
    Idle,
    /// Raised to `minReplicas`.
    MinReplicas,
    /// Lowered to `maxReplicas`.
    MaxReplicas,
    /// Following the load between 1 and `maxReplicas` (the autoscaler).
    Load,
    /// Put to sleep by hand (`snooze.dev/sleep`).
    Sleep,
    /// Nothing to change.
    Steady,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Wake => "Wake",
            Reason::Idle => "Idle",
            Reason::MinReplicas => "MinReplicas",
            Reason::MaxReplicas => "MaxReplicas",
            Reason::Load => "Load",
            Reason::Sleep => "Sleep",
            Reason::Steady => "Steady",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub desired: i32,
    pub reason: Reason,
    /// When the decision may change with no new event (the idle deadline).
    pub recheck_in: Option<Duration>,
}

/// The replicas a deleted ScaledService gives its workload back: the ones it had when
/// Snooze took it over, 0 included; 1 when that was never recorded (so it runs).
pub fn restore_replicas(original: Option<i32>) -> i32 {
    original.map_or(1, |o| o.max(0))
}

/// Each activator's share of a service's queue bound: the bound holds per service
/// whichever activators the ingress picks (rounded up; at least 1).
pub fn queue_share(max_queued: u32, activators: usize) -> i32 {
    let n = u32::try_from(activators.max(1)).unwrap_or(u32::MAX);
    i32::try_from(max_queued.div_ceil(n).max(1)).unwrap_or(i32::MAX)
}

/// Decides the replicas. `idle_since` is when the idle clock starts if no request was
/// ever seen (the time Snooze took the workload over).
pub fn decide(
    policy: &Policy,
    current: i32,
    load: &Load,
    now: SystemTime,
    idle_since: SystemTime,
) -> Decision {
    let floor = policy.min_replicas.max(0);
    let ceiling = policy.max_replicas.max(floor).max(1);
    let held = policy.awake_until.filter(|t| *t > now);
    let busy = load.in_flight > 0 || load.queued > 0 || load.wake || load.needed || held.is_some();
    let steady = |desired: i32, recheck_in| Decision {
        desired,
        reason: Reason::Steady,
        recheck_in,
    };
    if policy.paused {
        return steady(current, None);
    }
    if policy.sleep && !busy && current > floor {
        return Decision {
            desired: floor,
            reason: Reason::Sleep,
            recheck_in: None,
        };
    }

    if current <= 0 {
        if busy {
            let desired = policy.wake_replicas.max(floor).max(1).min(ceiling);
            return Decision {
                desired,
                reason: Reason::Wake,
                recheck_in: None,
            };
        }
        if floor > 0 {
            return Decision {
                desired: floor,
                reason: Reason::MinReplicas,
                recheck_in: None,
            };
        }
        return steady(0, None);
    }
    if current < floor {
        return Decision {
            desired: floor,
            reason: Reason::MinReplicas,
            recheck_in: None,
        };
    }
    if current > ceiling {
        return Decision {
            desired: ceiling,
            reason: Reason::MaxReplicas,
            recheck_in: None,
        };
    }
    // Awake: follow the load, never below 1 while awake.
    let step = policy.max_step.max(1);
    let follow = |recheck_in| match load
        .wants
        .map(|w| w.max(current - step).clamp(floor.max(1), ceiling))
    {
        Some(w) if w != current => Decision {
            desired: w,
            reason: Reason::Load,
            recheck_in,
        },
        _ => steady(current, recheck_in),
    };
    if busy {
        let recheck = held.map_or(policy.idle_timeout, |t| {
            t.duration_since(now)
                .unwrap_or_default()
                .min(policy.idle_timeout)
        });
        return follow(Some(recheck));
    }
    let since = load
        .last_request
        .map_or(idle_since, |t| t.max(idle_since))
        .max(policy.awake_until.unwrap_or(idle_since));
    let idle_for = now.duration_since(since).unwrap_or_default();
    if idle_for >= policy.idle_timeout {
        if !load.complete {
            // Some activator has not reported: it may have requests. Look again soon.
            return steady(current, Some(Duration::from_secs(2)));
        }
        if current > floor {
            // Step by step, like any scale-down: N → … → 1 → 0.
            let desired = (current - policy.max_step.max(1)).max(floor);
            return Decision {
                desired,
                reason: Reason::Idle,
                recheck_in: (desired > floor).then_some(Duration::from_secs(1)),
            };
        }
        return steady(current, None);
    }
    follow(Some(policy.idle_timeout - idle_for))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_bound_is_shared_by_the_activators() {
        for (max, n, want) in [
            (100, 2, 50),
            (1000, 3, 334),
            (100, 0, 100),
            (1, 4, 1),
            (100, 1, 100),
        ] {
            assert_eq!(queue_share(max, n), want, "{max} over {n}");
        }
    }

    #[test]
    fn deleting_restores_what_the_workload_had() {
        for (original, want) in [(Some(0), 0), (Some(3), 3), (None, 1), (Some(-1), 0)] {
            assert_eq!(restore_replicas(original), want, "{original:?}");
        }
    }

    const T0: u64 = 1_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    fn policy(min: i32, max: i32) -> Policy {
        Policy {
            min_replicas: min,
            max_replicas: max,
            idle_timeout: Duration::from_secs(300),
            wake_replicas: 1,
            max_step: 1,
            paused: false,
            awake_until: None,
            sleep: false,
        }
    }

    #[test]
    fn by_hand_pause_sleep_and_wake_until() {
        let idle = at(0);
        // Paused: nothing changes, whatever the load or the idle clock.
        let p = Policy {
            paused: true,
            ..policy(0, 5)
        };
        assert_eq!(
            decide(&p, 0, &load(0, 3, None, true), at(1), idle).desired,
            0
        );
        assert_eq!(
            decide(&p, 3, &load(0, 0, Some(0), false), at(900), idle).desired,
            3
        );
        // Sleep now: down to the floor at once, not step by step; held while requests
        // are in flight or a needer is awake.
        let p = Policy {
            sleep: true,
            ..policy(0, 5)
        };
        let d = decide(&p, 3, &load(0, 0, Some(0), false), at(10), idle);
        assert_eq!((d.desired, d.reason), (0, Reason::Sleep));
        assert_eq!(
            decide(&p, 3, &load(1, 0, Some(10), false), at(10), idle).reason,
            Reason::Steady
        );
        let needed = Load {
            needed: true,
            ..load(0, 0, Some(0), false)
        };
        assert_eq!(decide(&p, 1, &needed, at(10), idle).desired, 1);
        let p = Policy {
            sleep: true,
            ..policy(1, 5)
        };
        assert_eq!(
            decide(&p, 3, &load(0, 0, Some(0), false), at(10), idle).desired,
            1
        );
        // Wake until: woken from zero, kept past the idle timeout until then, and the
        // idle clock runs from it.
        let p = Policy {
            awake_until: Some(at(1000)),
            ..policy(0, 5)
        };
        let d = decide(&p, 0, &load(0, 0, None, false), at(10), idle);
        assert_eq!((d.desired, d.reason), (1, Reason::Wake));
        let d = decide(&p, 1, &load(0, 0, Some(0), false), at(900), idle);
        assert_eq!(
            (d.desired, d.recheck_in),
            (1, Some(Duration::from_secs(100)))
        );
        assert_eq!(
            decide(&p, 1, &load(0, 0, Some(0), false), at(1200), idle).desired,
            1
        );
        let d = decide(&p, 1, &load(0, 0, Some(0), false), at(1300), idle);
        assert_eq!((d.desired, d.reason), (0, Reason::Idle));
    }

    fn load(in_flight: u64, queued: u64, last: Option<u64>, wake: bool) -> Load {
        Load {
            in_flight,
            queued,
            last_request: last.map(at),
            complete: true,
            wake,
            ..Default::default()
        }
    }

    #[test]
    fn table() {
        // (name, min, max, current, load, now, want desired, want reason)
        let cases = [
            (
                "idle past timeout steps down",
                0,
                5,
                2,
                load(0, 0, Some(0), false),
                300,
                1,
                Reason::Idle,
            ),
            (
                "idle past timeout at one sleeps",
                0,
                5,
                1,
                load(0, 0, Some(0), false),
                300,
                0,
                Reason::Idle,
            ),
            (
                "idle but not long enough keeps",
                0,
                5,
                2,
                load(0, 0, Some(0), false),
                299,
                2,
                Reason::Steady,
            ),
            (
                "in flight keeps even when last request is old",
                0,
                5,
                1,
                load(3, 0, Some(0), false),
                900,
                1,
                Reason::Steady,
            ),
            (
                "queued keeps",
                0,
                5,
                1,
                load(0, 1, Some(0), false),
                900,
                1,
                Reason::Steady,
            ),
            (
                "wake from zero",
                0,
                5,
                0,
                load(0, 1, Some(900), true),
                900,
                1,
                Reason::Wake,
            ),
            (
                "in flight at zero wakes too",
                0,
                5,
                0,
                load(1, 0, None, false),
                900,
                1,
                Reason::Wake,
            ),
            (
                "asleep and quiet stays asleep",
                0,
                5,
                0,
                load(0, 0, Some(0), false),
                900,
                0,
                Reason::Steady,
            ),
            (
                "min>0 never goes below min",
                2,
                5,
                3,
                load(0, 0, Some(0), false),
                900,
                2,
                Reason::Idle,
            ),
            (
                "min>0 at min stays",
                2,
                5,
                2,
                load(0, 0, Some(0), false),
                900,
                2,
                Reason::Steady,
            ),
            (
                "min>0 from zero raises to min",
                2,
                5,
                0,
                load(0, 0, None, false),
                900,
                2,
                Reason::MinReplicas,
            ),
            (
                "wake with min>0 starts min",
                3,
                5,
                0,
                load(0, 1, None, true),
                10,
                3,
                Reason::Wake,
            ),
            (
                "above max is lowered",
                0,
                2,
                4,
                load(1, 0, Some(900), false),
                900,
                2,
                Reason::MaxReplicas,
            ),
            (
                "below min is raised",
                2,
                5,
                1,
                load(1, 0, Some(900), false),
                900,
                2,
                Reason::MinReplicas,
            ),
        ];
        for (name, min, max, current, l, now, want, reason) in cases {
            let d = decide(&policy(min, max), current, &l, at(now), at(0));
            assert_eq!((d.desired, d.reason), (want, reason), "{name}: {d:?}");
        }
    }

    #[test]
    fn no_request_ever_counts_from_takeover() {
        let p = policy(0, 3);
        let quiet = load(0, 0, None, false);
        assert_eq!(decide(&p, 1, &quiet, at(100), at(0)).desired, 1);
        assert_eq!(
            decide(&p, 1, &quiet, at(100), at(0)).recheck_in,
            Some(Duration::from_secs(200))
        );
        assert_eq!(decide(&p, 1, &quiet, at(300), at(0)).desired, 0);
    }

    #[test]
    fn incomplete_stats_never_scale_to_zero() {
        let mut l = load(0, 0, Some(0), false);
        l.complete = false;
        let d = decide(&policy(0, 3), 1, &l, at(1000), at(0));
        assert_eq!(d.desired, 1);
        assert_eq!(d.recheck_in, Some(Duration::from_secs(2)));
    }

    #[test]
    fn awake_follows_the_autoscaler_within_bounds() {
        let mut l = load(30, 0, Some(100), false);
        l.wants = Some(4);
        let d = decide(&policy(0, 3), 1, &l, at(100), at(0));
        assert_eq!((d.desired, d.reason), (3, Reason::Load), "capped at max");
        l.wants = Some(0);
        let d = decide(&policy(2, 5), 3, &l, at(100), at(0));
        assert_eq!((d.desired, d.reason), (2, Reason::Load), "not below min");
        let d = decide(&policy(0, 5), 4, &l, at(100), at(0));
        assert_eq!(d.desired, 3, "one step at a time");
        // Idle wins over the autoscaler: sleep after idleTimeout.
        let mut quiet = load(0, 0, Some(0), false);
        quiet.wants = Some(1);
        assert_eq!(decide(&policy(0, 5), 1, &quiet, at(400), at(0)).desired, 0);
    }

    #[test]
    fn wake_respects_wake_replicas_and_max() {
        let mut p = policy(0, 3);
        p.wake_replicas = 5;
        let d = decide(&p, 0, &load(0, 2, None, true), at(0), at(0));
        assert_eq!(d.desired, 3);
    }

    proptest::proptest! {
        #[test]
        fn never_sleeps_with_work_and_stays_in_bounds(
            min in 0i32..5,
            extra in 0i32..10,
            current in 0i32..20,
            in_flight in 0u64..3,
            queued in 0u64..3,
            wake in proptest::bool::ANY,
            wants in proptest::option::of(0i32..30),
            last in proptest::option::of(0u64..1000),
            now in 0u64..2000,
            complete in proptest::bool::ANY,
        ) {
            let max = min.max(1) + extra;
            let l = Load { in_flight, queued, last_request: last.map(at), complete, wake, needed: false, requests: 0, timeouts: 0, wants };
            let d = decide(&policy(min, max), current, &l, at(now), at(0));
            if in_flight > 0 || queued > 0 || wake {
                proptest::prop_assert!(d.desired >= 1, "{d:?} with work waiting");
            }
            proptest::prop_assert!(d.desired >= min && d.desired <= max, "{d:?} outside [{min}, {max}]");
            if d.desired < current {
                proptest::prop_assert!(current - d.desired <= 1 || current > max, "{d:?} from {current}: more than one step");
            }
        }
    }
}
