//! Request-driven scaling between 1 and N: a pure function of the per-second load
//! samples from all activators, the replicas, the policy and the time (issue 6).
//!
//! In the spirit of Knative's KPA: the desired replicas follow the load averaged over a
//! stable window; a short panic window reacts to a burst (and, while panicking, never
//! scales down); scale-up is limited by a rate, scale-down by a cooldown and a step.

use std::time::{Duration, SystemTime};

use snooze_crds::ScalingMetric;

/// One second of load for one service, summed over the activators.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: SystemTime,
    /// Requests received and not yet answered (queued ones included).
    pub concurrency: f64,
    /// Requests received so far (a counter summed over activators).
    pub requests: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Autoscale {
    pub metric: ScalingMetric,
    /// Target value of the metric per replica.
    pub target: f64,
    pub stable_window: Duration,
    pub panic_window: Duration,
    /// Panic when the panic-window load needs this many times the ready replicas.
    pub panic_threshold: f64,
    /// At most this factor more replicas per decision.
    pub max_scale_up_rate: f64,
    /// No scale-down until this long after the last change.
    pub scale_down_delay: Duration,
    /// At most this many replicas removed per decision.
    pub max_scale_down_step: i32,
}

impl Default for Autoscale {
    fn default() -> Self {
        Self {
            metric: ScalingMetric::Concurrency,
            target: 100.0,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            panic_threshold: 2.0,
            max_scale_up_rate: 1000.0,
            scale_down_delay: Duration::ZERO,
            max_scale_down_step: 1,
        }
    }
}

/// The replicas now and the bounds for the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    pub current: i32,
    /// Ready pods (the panic threshold compares with them).
    pub ready: i32,
    /// `minReplicas`, raised by an active schedule.
    pub floor: i32,
    pub max: i32,
}

/// What the autoscaler remembers between decisions for one service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScaleState {
    pub last_change: Option<SystemTime>,
    pub panic_since: Option<SystemTime>,
}

/// The load over the last `window`: average concurrency, or request rate from the
/// counter (a counter that went back — an activator restarted — counts from there).
pub fn observed(
    metric: ScalingMetric,
    samples: &[Sample],
    now: SystemTime,
    window: Duration,
) -> Option<f64> {
    let from = now.checked_sub(window)?;
    let in_window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > from && s.at <= now)
        .collect();
    if in_window.is_empty() {
        return None;
    }
    Some(match metric {
        ScalingMetric::Concurrency => {
            in_window.iter().map(|s| s.concurrency).sum::<f64>() / in_window.len() as f64
        }
        ScalingMetric::Rps => {
            // The sample just before the window is the baseline when there is one.
            let base = samples
                .iter()
                .rfind(|s| s.at <= from)
                .or(in_window.first().copied());
            let (Some(first), Some(last)) = (base, in_window.last()) else {
                return None;
            };
            let mut total = 0u64;
            let mut prev = first.requests;
            for s in in_window.iter() {
                total += s.requests.saturating_sub(prev);
                prev = s.requests;
            }
            let secs = last
                .at
                .duration_since(first.at)
                .unwrap_or_default()
                .as_secs_f64();
            if secs <= 0.0 {
                return Some(0.0);
            }
            total as f64 / secs
        }
    })
}

/// Replicas the load asks for, between `floor.max(1)` and `max`, with the panic mode,
/// the rate, the cooldown and the step applied. `current` must be at least 1 (waking
/// from zero and sleeping are decided by `decision::decide`).
pub fn desired(
    p: &Autoscale,
    samples: &[Sample],
    r: Replicas,
    state: ScaleState,
    now: SystemTime,
) -> (i32, ScaleState, &'static str) {
    let Replicas {
        current,
        ready,
        floor,
        max,
    } = r;
    let floor = floor.max(1);
    let max = max.max(floor);
    let current = current.max(1);
    let mut state = state;
    let target = p.target.max(0.001);
    let stable = observed(p.metric, samples, now, p.stable_window).unwrap_or(0.0);
    let panic_load = observed(p.metric, samples, now, p.panic_window).unwrap_or(0.0);
    let want_stable = (stable / target).ceil() as i32;
    let want_panic = (panic_load / target).ceil() as i32;
    let ready = ready.max(1);

    if f64::from(want_panic) / f64::from(ready) >= p.panic_threshold && want_panic > current {
        state.panic_since = Some(now);
    }
    let panicking = state
        .panic_since
        .is_some_and(|t| now.duration_since(t).unwrap_or_default() < p.stable_window);
    if !panicking {
        state.panic_since = None;
    }
    let (mut want, mut why) = if panicking {
        (want_panic.max(want_stable).max(current), "Panic")
    } else {
        (want_stable, "Load")
    };

    // Rate limit up, cooldown and step down.
    let up_limit = ((f64::from(current) * p.max_scale_up_rate).ceil() as i32).max(current + 1);
    if want > up_limit {
        want = up_limit;
        why = "ScaleUpRate";
    }
    if want < current {
        let cooling = state
            .last_change
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() < p.scale_down_delay);
        if cooling {
            want = current;
            why = "Cooldown";
        } else if current - want > p.max_scale_down_step.max(1) {
            want = current - p.max_scale_down_step.max(1);
            why = "ScaleDownStep";
        }
    }
    let want = want.clamp(floor, max);
    if want != current {
        state.last_change = Some(now);
    }
    (want, state, why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: u64 = 1_000_000;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + s)
    }

    /// `per_second[i]` in flight at second i (concurrency), or requests in second i (rps).
    fn samples(per_second: &[f64]) -> Vec<Sample> {
        let mut total = 0u64;
        per_second
            .iter()
            .enumerate()
            .map(|(i, v)| {
                total += *v as u64;
                Sample {
                    at: at(i as u64 + 1),
                    concurrency: *v,
                    requests: total,
                }
            })
            .collect()
    }

    fn policy() -> Autoscale {
        Autoscale {
            target: 10.0,
            ..Default::default()
        }
    }

    #[test]
    fn follows_load_over_the_stable_window() {
        let s = samples(&[50.0; 60]);
        let (d, _, why) = desired(
            &policy(),
            &s,
            Replicas {
                current: 4,
                ready: 4,
                floor: 0,
                max: 20,
            },
            ScaleState::default(),
            at(60),
        );
        assert_eq!((d, why), (5, "Load"));
        // From 1 ready replica the same load is a burst (5× the ready capacity): panic.
        let (d, st, why) = desired(
            &policy(),
            &s,
            Replicas {
                current: 1,
                ready: 1,
                floor: 0,
                max: 20,
            },
            ScaleState::default(),
            at(60),
        );
        assert_eq!((d, why), (5, "Panic"));
        assert_eq!(st.panic_since, Some(at(60)));
    }

    #[test]
    fn rps_metric_uses_the_counter_rate() {
        let p = Autoscale {
            metric: ScalingMetric::Rps,
            target: 5.0,
            ..Default::default()
        };
        let s = samples(&[20.0; 60]); // 20 requests per second
        let r = observed(ScalingMetric::Rps, &s, at(60), Duration::from_secs(60)).unwrap();
        assert!((r - 20.0).abs() < 0.5, "{r}");
        assert_eq!(
            desired(
                &p,
                &s,
                Replicas {
                    current: 1,
                    ready: 1,
                    floor: 0,
                    max: 20
                },
                ScaleState::default(),
                at(60)
            )
            .0,
            4
        );
    }

    #[test]
    fn a_burst_panics_and_panic_never_scales_down() {
        let mut load = vec![10.0; 54];
        load.extend([200.0; 6]); // the last 6 s
        let s = samples(&load);
        let (d, st, why) = desired(
            &policy(),
            &s,
            Replicas {
                current: 1,
                ready: 1,
                floor: 0,
                max: 50,
            },
            ScaleState::default(),
            at(60),
        );
        assert_eq!((d, why), (20, "Panic"));
        assert!(st.panic_since.is_some());
        // The burst is gone, but within the stable window it stays at least where it is.
        let mut quiet = load.clone();
        quiet.extend([0.0; 10]);
        let (d2, _, why2) = desired(
            &policy(),
            &samples(&quiet),
            Replicas {
                current: 20,
                ready: 20,
                floor: 0,
                max: 50,
            },
            st,
            at(70),
        );
        assert_eq!((d2, why2), (20, "Panic"));
    }

    #[test]
    fn scale_down_waits_for_the_cooldown_and_goes_step_by_step() {
        let p = Autoscale {
            scale_down_delay: Duration::from_secs(30),
            max_scale_down_step: 2,
            ..policy()
        };
        let s = samples(&[10.0; 60]); // wants 1
        let recent = ScaleState {
            last_change: Some(at(40)),
            panic_since: None,
        };
        assert_eq!(
            desired(
                &p,
                &s,
                Replicas {
                    current: 8,
                    ready: 8,
                    floor: 0,
                    max: 20
                },
                recent,
                at(60)
            )
            .0,
            8
        );
        let old = ScaleState {
            last_change: Some(at(20)),
            panic_since: None,
        };
        let (d, st, why) = desired(
            &p,
            &s,
            Replicas {
                current: 8,
                ready: 8,
                floor: 0,
                max: 20,
            },
            old,
            at(60),
        );
        assert_eq!((d, why), (6, "ScaleDownStep"));
        assert_eq!(st.last_change, Some(at(60)));
    }

    #[test]
    fn scale_up_rate_and_bounds() {
        let p = Autoscale {
            max_scale_up_rate: 2.0,
            panic_threshold: 1000.0,
            ..policy()
        };
        let s = samples(&[1000.0; 60]); // wants 100
        assert_eq!(
            desired(
                &p,
                &s,
                Replicas {
                    current: 3,
                    ready: 3,
                    floor: 0,
                    max: 50
                },
                ScaleState::default(),
                at(60)
            )
            .0,
            6
        );
        assert_eq!(
            desired(
                &p,
                &s,
                Replicas {
                    current: 40,
                    ready: 40,
                    floor: 0,
                    max: 50
                },
                ScaleState::default(),
                at(60)
            )
            .0,
            50
        );
        // The floor (minReplicas or a schedule) holds with no load.
        assert_eq!(
            desired(
                &p,
                &samples(&[0.0; 60]),
                Replicas {
                    current: 3,
                    ready: 3,
                    floor: 3,
                    max: 50
                },
                ScaleState::default(),
                at(60)
            )
            .0,
            3
        );
    }

    fn arb_policy() -> impl Strategy<Value = Autoscale> {
        (
            1.0f64..200.0,
            1u64..120,
            1u64..20,
            1.1f64..5.0,
            1.1f64..100.0,
            0u64..60,
            1i32..5,
        )
            .prop_map(
                |(target, stable, panic, thr, rate, delay, step)| Autoscale {
                    metric: ScalingMetric::Concurrency,
                    target,
                    stable_window: Duration::from_secs(stable.max(panic)),
                    panic_window: Duration::from_secs(panic),
                    panic_threshold: thr,
                    max_scale_up_rate: rate,
                    scale_down_delay: Duration::from_secs(delay),
                    max_scale_down_step: step,
                },
            )
    }

    proptest! {
        #[test]
        fn stays_within_bounds_and_limits(
            p in arb_policy(),
            load in proptest::collection::vec(0.0f64..5000.0, 1..180),
            current in 1i32..200,
            min in 0i32..10,
            extra in 0i32..200,
            schedule_floor in 0i32..20,
        ) {
            let max = min.max(1) + extra;
            let floor = min.max(schedule_floor).min(max);
            let s = samples(&load);
            let now = at(load.len() as u64);
            let (d, _, _) = desired(&p, &s, Replicas { current, ready: current, floor, max }, ScaleState::default(), now);
            prop_assert!(d >= floor.max(1) && d <= max.max(floor.max(1)), "{d} outside [{floor}, {max}]");
            if d > current {
                prop_assert!(d <= ((f64::from(current) * p.max_scale_up_rate).ceil() as i32).max(current + 1).max(floor));
            }
            if d < current && current <= max {
                prop_assert!(current - d <= p.max_scale_down_step, "removed {} > step {}", current - d, p.max_scale_down_step);
            }
        }

        #[test]
        fn constant_load_does_not_flap(p in arb_policy(), level in 0.0f64..3000.0, start in 1i32..60) {
            // Ten minutes of the same load, one decision a second, state carried.
            let mut current = start;
            let mut state = ScaleState::default();
            let mut history = Vec::new();
            let mut directions = Vec::new();
            for sec in 1..=600u64 {
                history.push(Sample { at: at(sec), concurrency: level, requests: 0 });
                let (d, st, _) = desired(&p, &history, Replicas { current, ready: current, floor: 0, max: 1000 }, state, at(sec));
                if d != current {
                    let dir = d > current;
                    if directions.last() != Some(&dir) { directions.push(dir); }
                }
                current = d;
                state = st;
            }
            // It may go up then settle, or come down step by step; it never reverses twice.
            prop_assert!(directions.len() <= 2, "direction changes: {directions:?}");
            let want = ((level / p.target).ceil() as i32).clamp(1, 1000);
            // Settled, unless the cooldown and step make the way down longer than the run.
            let steps_down = ((start - want).max(0) + p.max_scale_down_step - 1) / p.max_scale_down_step;
            let needed = steps_down as u64 * (p.scale_down_delay.as_secs() + 1) + p.stable_window.as_secs();
            if needed < 550 {
                prop_assert!((current - want).abs() <= 1, "settled at {current}, load wants {want}");
            }
        }
    }
}
