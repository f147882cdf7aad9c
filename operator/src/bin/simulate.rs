//! `snooze-simulate`: replays synthetic traffic through the operator's decision
//! functions (the same code the operator runs) with a model of pod start-up, and
//! reports for each policy the cost (replica-seconds) against the requests that waited
//! longer than 100 ms and those refused. Writes an SVG plot per trace.
//!
//!   cargo run -p snooze-operator --bin snooze-simulate -- --out docs/simulation
//!
//! Model, one step per second: requests take `--service-ms` each; a ready replica
//! serves up to `--pod-concurrency` at once; new replicas are ready `--startup` after
//! the scale decision; what cannot be served waits in a queue (refused past
//! `--max-queued` or after `--timeout`). The autoscaler sees in-flight plus queued.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Parser;
use snooze_operator::autoscale::{self, Autoscale, Replicas, Sample, ScaleState};
use snooze_operator::decision::{self, Load, Policy};

#[derive(Parser)]
struct Args {
    /// Folder for the SVG plots and the summary (markdown).
    #[arg(long, default_value = "docs/simulation")]
    out: PathBuf,
    #[arg(long, default_value_t = 100)]
    service_ms: u64,
    #[arg(long, default_value_t = 4)]
    pod_concurrency: u64,
    /// Seconds from a scale-up decision to the new pod being ready.
    #[arg(long, default_value_t = 8)]
    startup: u64,
    #[arg(long, default_value_t = 1000)]
    max_queued: u64,
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

struct Trace {
    name: &'static str,
    title: &'static str,
    /// Requests per second at each second.
    rps: Vec<f64>,
}

fn traces() -> Vec<Trace> {
    // A flash crowd: quiet, then a near-vertical jump to 40× (seed 004), then decay.
    let mut flash = vec![5.0; 600];
    flash.extend((0..300).map(|i| {
        if i < 120 {
            400.0
        } else {
            400.0 * (-(i as f64 - 120.0) / 60.0).exp() + 5.0
        }
    }));
    flash.extend(vec![5.0; 600]);
    // A diurnal curve over 6 hours (a compressed day): 0 at night to 300 rps at noon.
    let day = 6 * 3600;
    let diurnal = (0..day)
        .map(|s| {
            let x = (s as f64 / day as f64) * std::f64::consts::TAU;
            (150.0 * (1.0 - x.cos())).max(0.0)
        })
        .collect();
    // Sparse traffic below 2 requests per second (seed 001): a burst of a few requests
    // every few minutes.
    let sparse = (0..3 * 3600)
        .map(|s| {
            if s % 420 < 3 {
                1.5
            } else if s % 97 == 0 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    vec![
        Trace {
            name: "flash-crowd",
            title: "Flash crowd: 5 → 400 req/s in one second",
            rps: flash,
        },
        Trace {
            name: "diurnal",
            title: "Diurnal curve (6 h): 0 → 300 → 0 req/s",
            rps: diurnal,
        },
        Trace {
            name: "sparse",
            title: "Sparse: under 2 req/s, a few requests every few minutes",
            rps: sparse,
        },
    ]
}

#[derive(Clone)]
enum Kind {
    Snooze(Autoscale, Policy),
    Fixed(i32),
}

struct Named {
    name: &'static str,
    kind: Kind,
}

fn policies(target: u32) -> Vec<Named> {
    let base = Policy {
        min_replicas: 0,
        max_replicas: 50,
        idle_timeout: Duration::from_secs(300),
        wake_replicas: 1,
        max_step: 1,
        paused: false,
        awake_until: None,
        sleep: false,
    };
    let snooze = Autoscale {
        target: f64::from(target),
        ..Autoscale::default()
    };
    let knative_like = Autoscale {
        target: f64::from(target),
        max_scale_down_step: 1000,
        ..Autoscale::default()
    };
    vec![
        Named {
            name: "snooze default",
            kind: Kind::Snooze(snooze, base),
        },
        Named {
            name: "knative-like",
            kind: Kind::Snooze(
                knative_like,
                Policy {
                    idle_timeout: Duration::from_secs(30),
                    max_step: 1000,
                    ..base
                },
            ),
        },
        Named {
            name: "fixed 3 replicas",
            kind: Kind::Fixed(3),
        },
    ]
}

#[derive(Default, Clone)]
struct Outcome {
    replica_seconds: f64,
    requests: f64,
    waited: f64,
    refused: f64,
    replicas: Vec<i32>,
}

fn t(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
}

fn run(args: &Args, trace: &Trace, p: &Named) -> Outcome {
    let per_pod_rps = args.pod_concurrency as f64 * 1000.0 / args.service_ms as f64;
    let mut out = Outcome::default();
    let (mut desired, mut ready): (i32, i32) = match p.kind {
        Kind::Fixed(n) => (n, n),
        Kind::Snooze(..) => (0, 0),
    };
    let mut starting: VecDeque<(u64, i32)> = VecDeque::new(); // (ready at, how many)
    let mut queue: VecDeque<(u64, f64)> = VecDeque::new(); // (arrived at, count)
    let mut queued = 0.0f64;
    let mut history: Vec<Sample> = Vec::new();
    let mut state = ScaleState::default();
    let mut last_request: Option<u64> = None;
    let mut total_requests = 0.0f64;
    for (sec, &rate) in trace.rps.iter().enumerate() {
        let sec = sec as u64;
        while starting.front().is_some_and(|(at, _)| *at <= sec) {
            let (_, n) = starting.pop_front().unwrap_or_default();
            ready += n;
        }
        ready = ready.min(desired.max(0));
        // Arrivals join the queue; the ready replicas serve what they can, oldest first.
        if rate > 0.0 {
            last_request = Some(sec);
            if queued + rate > args.max_queued as f64 {
                let over = queued + rate - args.max_queued as f64;
                out.refused += over.min(rate);
                queue.push_back((sec, (rate - over).max(0.0)));
            } else {
                queue.push_back((sec, rate));
            }
        }
        total_requests += rate;
        out.requests += rate;
        let mut capacity = f64::from(ready.max(0)) * per_pod_rps;
        let mut served_now = 0.0;
        while capacity > 0.0 {
            let Some((arrived, n)) = queue.front_mut() else {
                break;
            };
            let take = n.min(capacity);
            // Served in the second it arrived → no wait beyond the service time;
            // later → waited at least a second.
            if sec > *arrived {
                out.waited += take;
            }
            *n -= take;
            capacity -= take;
            served_now += take;
            if *n <= 1e-9 {
                queue.pop_front();
            }
        }
        // Timeouts.
        while queue.front().is_some_and(|(a, _)| sec - a >= args.timeout) {
            let (_, n) = queue.pop_front().unwrap_or_default();
            out.refused += n;
        }
        queued = queue.iter().map(|(_, n)| n).sum();
        // Requests that arrived with no ready pod and were served later count as waited
        // (above); requests served in their own second but only because of a pod that
        // was just ready are not penalized (start-up is the model's granularity).
        let in_flight = served_now * args.service_ms as f64 / 1000.0 + queued;
        out.replica_seconds += f64::from(desired.max(ready));
        out.replicas.push(desired.max(0));

        if let Kind::Snooze(ap, pol) = &p.kind {
            history.push(Sample {
                at: t(sec),
                concurrency: in_flight,
                requests: total_requests as u64,
            });
            let keep = ap.stable_window.as_secs() + 2;
            if history.len() as u64 > keep {
                history.remove(0);
            }
            let load = Load {
                in_flight: in_flight.ceil() as u64,
                queued: queued.ceil() as u64,
                last_request: last_request.map(t),
                complete: true,
                wake: queued > 0.0 && desired == 0,
                needed: false,
                requests: total_requests as u64,
                timeouts: 0,
                wants: (desired > 0).then(|| {
                    let r = Replicas {
                        current: desired,
                        ready,
                        floor: pol.min_replicas,
                        max: pol.max_replicas,
                    };
                    let (w, next, _) = autoscale::desired(ap, &history, r, state, t(sec));
                    state = next;
                    w
                }),
            };
            let d = decision::decide(pol, desired, &load, t(sec), t(0));
            if d.desired > desired {
                starting.push_back((sec + args.startup, d.desired - desired));
            } else if d.desired < desired {
                ready = ready.min(d.desired);
            }
            desired = d.desired;
        }
    }
    out
}

fn svg(trace: &Trace, results: &[(&Named, Outcome)]) -> String {
    let (w, h, pad) = (900.0, 320.0, 40.0);
    let n = trace.rps.len().max(1) as f64;
    let max_rps = trace.rps.iter().cloned().fold(1.0, f64::max);
    let max_rep = results
        .iter()
        .flat_map(|(_, o)| o.replicas.iter())
        .cloned()
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |i: usize| pad + (i as f64 / n) * (w - 2.0 * pad);
    let y = |v: f64, max: f64| h - pad - (v / max) * (h - 2.0 * pad);
    let step = (trace.rps.len() / 900).max(1);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20" font-size="14" font-weight="bold">{}</text>
<line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="#999"/>
"##,
        trace.title,
        h - pad,
        w - pad,
        h - pad
    );
    let mut pts = String::new();
    for (i, v) in trace.rps.iter().enumerate().step_by(step) {
        let _ = write!(pts, "{:.1},{:.1} ", x(i), y(*v, max_rps));
    }
    let _ = writeln!(
        s,
        r##"<polyline fill="#dde8f5" stroke="#9bb7dd" points="{:.1},{:.1} {pts}{:.1},{:.1}"/>"##,
        x(0),
        h - pad,
        x(trace.rps.len()),
        h - pad
    );
    let colors = ["#d62728", "#2ca02c", "#7f7f7f"];
    for (k, (p, o)) in results.iter().enumerate() {
        let mut pts = String::new();
        for (i, v) in o.replicas.iter().enumerate().step_by(step) {
            let _ = write!(pts, "{:.1},{:.1} ", x(i), y(f64::from(*v), max_rep));
        }
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{pts}"/>"##,
            colors[k % 3]
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" fill="{}">{}: {:.0} replica-s, {:.2}% waited &gt;100 ms, {:.2}% refused</text>"##,
            pad + 10.0,
            45.0 + 16.0 * k as f64,
            colors[k % 3],
            p.name,
            o.replica_seconds,
            100.0 * o.waited / o.requests.max(1.0),
            100.0 * o.refused / o.requests.max(1.0)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{pad}" y="{}" fill="#555">shaded: load (max {max_rps:.0} req/s); lines: replicas (max {max_rep:.0}); {} s</text></svg>"##,
        h - 12.0,
        trace.rps.len()
    );
    s
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let target = (args.pod_concurrency / 2).max(1) as u32;
    let mut md = String::from(
        "| trace | policy | replica-seconds | waited > 100 ms | refused |\n|---|---|---:|---:|---:|\n",
    );
    for trace in traces() {
        let ps = policies(target);
        let results: Vec<(&Named, Outcome)> =
            ps.iter().map(|p| (p, run(&args, &trace, p))).collect();
        for (p, o) in &results {
            let line = format!(
                "| {} | {} | {:.0} | {:.2} % | {:.2} % |\n",
                trace.name,
                p.name,
                o.replica_seconds,
                100.0 * o.waited / o.requests.max(1.0),
                100.0 * o.refused / o.requests.max(1.0)
            );
            print!("{line}");
            md.push_str(&line);
        }
        std::fs::write(
            args.out.join(format!("{}.svg", trace.name)),
            svg(&trace, &results),
        )?;
    }
    std::fs::write(args.out.join("summary.md"), md)?;
    Ok(())
}
