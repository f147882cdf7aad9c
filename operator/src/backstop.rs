//! A follower's wakes: the backstop for a leader that cannot act. While another
//! replica leads, a follower keeps its own stats stream from every activator and takes
//! their wake signals too. It reads the workload's replicas at once (above zero: pods
//! are starting, nothing to back up), waits `delay` (the leader patches within
//! milliseconds) and reads them again: still at zero means no leader acted (it crashed
//! and its lease has not expired yet), and the follower wakes it — and the services it
//! needs — through the one door (`replicas::apply`: the write holds only while the replicas
//! are the zero read, so a leader's or another follower's wake meanwhile turns this one into a no-op).
//! A cold request during a leader's crash is so answered about `delay` later than with
//! a leader, not a lease duration later.
//!
//! Must not: decide anything but a wake from zero (every other decision is the
//! leader's), keep caches of ScaledServices (per signal it reads the ScaledService and
//! its /scale, and lists the namespace only when the workload is still at zero), or
//! outlive the follower's term (everything hangs from `stop`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kube::api::ListParams;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use parking_lot::Mutex;
use snooze_crds::ScaledService;
use snooze_crds::stats::ServiceRef;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::activators::{self, Activators};
use crate::config::Args;
use crate::controller::{Discovery, all_needs, older_claimant, policy, scale_api_with};
use crate::decision::{self, Load, Reason};
use crate::group;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::replicas::{self, Applied};
use crate::stats::{self, StatsStore};

/// Wakes checked at once; more signals wait in the channel (bounded, 1,024).
const MAX_RUNNING: usize = 64;
/// Repeated signals for one service within this window are one wake.
const DEDUPE: Duration = Duration::from_secs(5);

struct Backstop {
    client: Client,
    metrics: Arc<Metrics>,
    discovery: Discovery,
    api_timeout: Duration,
    recorder: Recorder,
    started: SystemTime,
}

/// Runs a follower's backstop until `stop`: the activator watch, one stats stream per
/// activator, and the wakes.
pub async fn run(client: Client, args: Args, metrics: Arc<Metrics>, stop: CancellationToken) {
    let (act_tx, mut act_rx) = watch::channel(Activators::default());
    let (wake_tx, mut wake_rx) = mpsc::channel::<(ServiceRef, Instant)>(1024);
    let store = StatsStore::new(wake_tx);
    let (targets_tx, targets_rx) = watch::channel(Vec::new());
    let token_file = (!args.stats_token_file.is_empty())
        .then(|| Arc::new(std::path::PathBuf::from(&args.stats_token_file)));
    let b = Arc::new(Backstop {
        client: client.clone(),
        metrics: metrics.clone(),
        discovery: Mutex::new(HashMap::new()),
        api_timeout: Duration::from_secs(args.api_timeout_seconds),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "snooze-operator".into(),
                instance: Some(args.pod_name.clone()),
            },
        ),
        started: SystemTime::now(),
    });
    let delay = Duration::from_millis(args.follower_wake_delay_ms);
    let watch = activators::watch(
        client,
        args.namespace.clone(),
        args.activator_service.clone(),
        args.activator_admin_port.clone(),
        metrics,
        act_tx,
    );
    let targets = async move {
        loop {
            let t = act_rx.borrow_and_update().stats_addrs.clone();
            targets_tx.send_replace(t);
            if act_rx.changed().await.is_err() {
                return;
            }
        }
    };
    let wakes = async move {
        let mut running = tokio::task::JoinSet::new();
        let mut recent: HashMap<ServiceRef, Instant> = HashMap::new();
        loop {
            tokio::select! {
                w = wake_rx.recv(), if running.len() < MAX_RUNNING => {
                    let Some((key, received)) = w else { return };
                    recent.retain(|_, t| t.elapsed() < DEDUPE);
                    if recent.contains_key(&key) {
                        continue;
                    }
                    recent.insert(key.clone(), Instant::now());
                    let b = b.clone();
                    running.spawn(async move { b.wake(&key, received, delay).await });
                }
                Some(_) = running.join_next() => {}
            }
        }
    };
    // The streams stop with `stop` (their own child tokens); the rest is dropped with
    // this future when `stop` is cancelled.
    tokio::select! {
        _ = stop.cancelled() => {}
        r = watch => warn!("follower: the activator watch ended: {r:?}"),
        _ = targets => {}
        _ = stats::run(store, targets_rx, stop.child_token(), token_file) => {}
        _ = wakes => {}
    }
}

impl Backstop {
    fn count(&self, outcome: &'static str) {
        self.metrics
            .follower_wakes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Checks one wake signal: wakes the service, and every service it needs, where
    /// it was at zero when the signal came and still is `delay` later.
    async fn wake(&self, key: &ServiceRef, received: Instant, delay: Duration) {
        let api: Api<ScaledService> = Api::namespaced(self.client.clone(), &key.namespace);
        // The common case first: a leader acted and the workload is up. Two GETs (the
        // ScaledService, its /scale) answer that; the namespace's list, for the needs
        // and the claimants, only when it is still at zero (100 wakes in a namespace of
        // 1,000 ScaledServices were 100 lists of 1,000 objects). Read once at once: a
        // workload above zero when the signal came (its pods still starting: a request
        // waits for them, which is what the signal says) has nothing to back up, and
        // reading it only after the delay took a leader's sleep within that delay (a
        // sleep by hand right after the request) for a wake no leader made, and woke
        // it again.
        for again in [false, true] {
            if again {
                tokio::time::sleep(delay.saturating_sub(received.elapsed())).await;
            }
            match self.acted(&api, key).await {
                Ok(true) => return self.count("awake"),
                Ok(false) => {}
                Err(why) => return self.failed(key, &why),
            }
        }
        let list =
            match tokio::time::timeout(self.api_timeout, api.list(&ListParams::default())).await {
                Ok(Ok(l)) => l.items.into_iter().map(Arc::new).collect::<Vec<_>>(),
                Ok(Err(e)) => return self.failed(key, &format!("listing ScaledServices: {e}")),
                Err(_) => return self.failed(key, "listing ScaledServices timed out"),
            };
        let (needs, names) = all_needs(&list).remove(&key.namespace).unwrap_or_default();
        if !names.contains(&key.name) {
            return self.count("skipped");
        }
        let mut members = group::closure(&needs, &key.name, |n| names.contains(n)).members;
        members.insert(key.name.clone());
        let all = &list;
        let each = members.into_iter().map(|name| async move {
            let Some(ss) = all.iter().find(|s| s.name_any() == name) else {
                return;
            };
            self.wake_one(ss, all, received).await;
        });
        futures::future::join_all(each).await;
    }

    /// Whether the service's workload is already above zero (someone acted on the wake):
    /// Err when that cannot be read now.
    async fn acted(&self, api: &Api<ScaledService>, key: &ServiceRef) -> Result<bool, String> {
        let ss = match tokio::time::timeout(self.api_timeout, api.get_opt(&key.name)).await {
            Ok(Ok(Some(ss))) => ss,
            // Gone: nothing to wake (the list below says "skipped").
            Ok(Ok(None)) => return Ok(false),
            Ok(Err(e)) => return Err(format!("reading the ScaledService: {e}")),
            Err(_) => return Err("reading the ScaledService timed out".into()),
        };
        let scale = match scale_api_with(&self.client, &self.discovery, self.api_timeout, &ss).await
        {
            Ok(Ok(api)) => api,
            // A target Snooze cannot scale: the list path counts it as skipped.
            Ok(Err(_)) => return Ok(false),
            Err(e) => return Err(format!("discovery: {e}")),
        };
        let workload = &ss.spec.scale_target_ref.name;
        match replicas::read(&scale, workload, self.api_timeout).await {
            Ok(r) => Ok(r.replicas > 0),
            Err(e) => Err(format!("reading the replicas of {workload}: {e}")),
        }
    }

    fn failed(&self, key: &ServiceRef, why: &str) {
        warn!(namespace = %key.namespace, name = %key.name, "follower wake: {why}");
        self.count("failed");
    }

    async fn wake_one(&self, ss: &ScaledService, all: &[Arc<ScaledService>], received: Instant) {
        let key = ServiceRef {
            namespace: ss.namespace().unwrap_or_default(),
            name: ss.name_any(),
        };
        if ss.metadata.deletion_timestamp.is_some() || older_claimant(all, ss).is_some() {
            return self.count("skipped");
        }
        let api = match scale_api_with(&self.client, &self.discovery, self.api_timeout, ss).await {
            Ok(Ok(api)) => api,
            Ok(Err(_)) => return self.count("skipped"),
            Err(e) => return self.failed(&key, &format!("discovery: {e}")),
        };
        let pol = policy(ss);
        let load = Load {
            wake: true,
            ..Default::default()
        };
        // The same rule as the leader's wake: only ever raises from zero.
        let decide = |now: i32| {
            let d = decision::decide(&pol, now, &load, SystemTime::now(), self.started);
            (d.reason == Reason::Wake).then_some((d.desired, d.reason))
        };
        let workload = &ss.spec.scale_target_ref.name;
        match replicas::apply(&api, workload, None, self.api_timeout, decide).await {
            Ok((Applied::Changed { from, to, .. }, _)) => {
                self.count("woken");
                let waited = received.elapsed().as_millis();
                info!(namespace = %key.namespace, name = %key.name, from, to, waited_ms = waited,
                    "woken by a follower: no leader had acted on the wake signal");
                self.metrics
                    .scale_actions
                    .get_or_create(&crate::metrics::ScaleLabels {
                        reason: Reason::Wake.as_str(),
                    })
                    .inc();
                let ev = Event {
                    type_: EventType::Normal,
                    reason: "Woken".into(),
                    note: Some(format!(
                        "scaled {workload} from {from} to {to}: a request arrived and no leader acted within {waited} ms (woken by a follower)"
                    )),
                    action: "Wake".into(),
                    secondary: None,
                };
                if let Err(e) = self.recorder.publish(&ev, &ss.object_ref(&())).await {
                    warn!("publishing event: {e}");
                }
            }
            Ok((Applied::Unchanged { replicas }, _)) => {
                self.count(if replicas > 0 { "awake" } else { "skipped" })
            }
            Err(e) => self.failed(&key, &format!("writing the replicas of {workload}: {e}")),
        }
    }
}
