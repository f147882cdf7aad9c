//! The leader's work: the watches, the controller, the stats streams, the autoscaler
//! tick and the wake path, under one supervisor; the stats streams' per-activator
//! tasks (spawned) hang from the term's token, which a drop guard cancels. Dropping the
//! future returned by [`lead`] so stops every one of them, which is how a replica that
//! loses the lease stops acting at once.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::controller::{self as kcontroller, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use parking_lot::Mutex;
use snooze_crds::stats::ServiceRef;
use snooze_crds::{LABEL_SCALED_SERVICE, MANAGER, ScaledService};
use snooze_runtime::supervisor::Supervisor;
use snooze_runtime::watch::resilient;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::activators::{self, Activators};
use crate::caches::{self, Caches};
use crate::config::Args;
use crate::controller::{self, Context};
use crate::metrics::Metrics;
use crate::ports::{PortAllocator, PortKey};
use crate::stats::{self, StatsStore};

/// The port allocator seeded from the statuses, oldest ScaledService first (retried
/// until the API server answers).
async fn seed_ports(api: &Api<ScaledService>, args: &Args) -> PortAllocator {
    let mut existing = loop {
        match api.list(&Default::default()).await {
            Ok(l) => break l.items,
            Err(e) => {
                warn!("listing ScaledServices to seed the port allocator: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut alloc = PortAllocator::with_namespace_limit(
        args.port_range_start..=args.port_range_end,
        args.max_ports_per_namespace,
    );
    existing.sort_by_key(|s| (s.metadata.creation_timestamp.clone(), s.name_any()));
    for ss in &existing {
        for p in ss.status.iter().flat_map(|s| s.ports.iter()) {
            let id = crate::objects::port_id(p.name.as_deref(), p.port);
            if let Ok(port) = u16::try_from(p.activator_port) {
                let key = PortKey::new(&ss.namespace().unwrap_or_default(), &ss.name_any(), &id);
                if !alloc.claim(key, port) {
                    warn!(name = %ss.name_any(), port, "activator port taken by an older ScaledService; reassigning");
                }
            }
        }
    }
    alloc
}

/// Leads until `stop` or until a task ends; `ready` goes true once the caches synced.
pub async fn lead(
    client: Client,
    args: Args,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let ss_api: Api<ScaledService> = Api::all(client.clone());
    let alloc = seed_ports(&ss_api, &args).await;
    let mut tasks = Supervisor::new();

    let (act_tx, act_rx) = watch::channel(Activators::default());
    tasks.spawn(
        "activator watch",
        activators::watch(
            client.clone(),
            args.namespace.clone(),
            args.activator_service.clone(),
            args.activator_admin_port.clone(),
            metrics.clone(),
            act_tx,
        ),
    );

    let (wake_tx, mut wake_rx) = mpsc::channel::<(ServiceRef, Instant)>(1024);
    let stats_store = StatsStore::new(wake_tx);
    let (targets_tx, targets_rx) = watch::channel(Vec::new());
    let mut act = act_rx.clone();
    tasks.spawn("stats targets", async move {
        loop {
            let t = act.borrow_and_update().stats_addrs.clone();
            targets_tx.send_replace(t);
            act.changed().await?;
        }
    });
    // Everything of this leadership term stops with it, however `lead` ends (returns,
    // fails, or is dropped when the lease is lost): the term's token is cancelled when
    // this guard drops, and every task not under the supervisor hangs from it.
    let term = stop.child_token();
    let _term_ends = term.clone().drop_guard();
    let (store, st) = (stats_store.clone(), term.child_token());
    let token_file = (!args.stats_token_file.is_empty())
        .then(|| std::sync::Arc::new(std::path::PathBuf::from(&args.stats_token_file)));
    tasks.spawn("stats streams", async move {
        stats::run(store, targets_rx, st, token_file).await;
        Ok(())
    });
    let (store, m) = (stats_store.clone(), metrics.clone());
    tasks.spawn("stats gauge", async move {
        loop {
            m.stats_streams.set(store.connected() as i64);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });

    // What a reconcile reads, from caches (`caches.rs`): one watch each, whose stream
    // also triggers the reconciles.
    let (slice_reader, slice_writer) = reflector::store::<EndpointSlice>();
    let (svc_reader, svc_writer) = reflector::store::<Service>();
    let (managed_reader, managed_writer) = reflector::store::<EndpointSlice>();
    let caches = Arc::new(Caches::new(
        client.clone(),
        metrics.clone(),
        term.clone(),
        svc_reader,
        managed_reader,
        slice_reader,
    ));
    // Backend EndpointSlices (ready replicas, indexed by Service; a change triggers the
    // ScaledService).
    let m = metrics.clone();
    let index = caches.clone();
    let slice_stream = resilient(
        reflector::reflector(
            slice_writer,
            watcher(
                Api::<EndpointSlice>::all(client.clone()),
                watcher::Config::default().labels(
                    "endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io",
                ),
            )
            .default_backoff()
            .modify(caches::trim_slice),
        )
        .touched_objects(),
        "backend-endpointslices",
        move || m.watch_error("backend-endpointslices"),
    )
    .inspect(move |s| index.index_slice(s))
    .map(Ok::<_, watcher::Error>);

    // The ScaledServices, trimmed before they are stored (`caches::trim_scaled_service`):
    // the controller's store holds every one for the leader's whole term.
    let (store, ss_writer) = reflector::store::<ScaledService>();
    let ss_stream = watcher(ss_api, watcher::Config::default())
        .default_backoff()
        .modify(caches::trim_scaled_service)
        .reflect(ss_writer)
        .applied_objects();
    let controller = Controller::for_stream(ss_stream, store.clone())
        .with_config(kcontroller::Config::default().concurrency(args.max_concurrent_reconciles));
    let by_service = {
        let store = store.clone();
        move |ns: Option<String>, svc: Option<String>| scaled_services_of(&store, ns, svc)
    };
    let by_service2 = by_service.clone();
    // Every Service, full (backend Services are read whole; managed ones carry the
    // ScaledService's name in a label): a change triggers the ScaledService that
    // manages it or uses it as its backend.
    let m = metrics.clone();
    let service_stream = resilient(
        reflector::reflector(
            svc_writer,
            watcher(
                Api::<Service>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .modify(caches::trim_service),
        )
        .touched_objects(),
        "services",
        move || m.watch_error("services"),
    )
    .map(Ok::<_, watcher::Error>);
    // The managed EndpointSlices (owned by their ScaledService).
    let m = metrics.clone();
    let managed_slice_stream = resilient(
        reflector::reflector(
            managed_writer,
            watcher(
                Api::<EndpointSlice>::all(client.clone()),
                watcher::Config::default()
                    .labels(&format!("endpointslice.kubernetes.io/managed-by={MANAGER}")),
            )
            .default_backoff()
            .modify(caches::trim_slice),
        )
        .touched_objects(),
        "managed-endpointslices",
        move || m.watch_error("managed-endpointslices"),
    )
    .map(Ok::<_, watcher::Error>);

    let (trigger_tx, mut trigger_rx) = mpsc::channel::<ObjectRef<ScaledService>>(1024);
    let trigger_stream = futures::stream::poll_fn(move |cx| trigger_rx.poll_recv(cx));
    let activator_stream = futures::stream::unfold(act_rx.clone(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });

    let ctx = Arc::new(Context {
        client: client.clone(),
        store: store.clone(),
        caches,
        ports: Mutex::new(alloc),
        stats: stats_store,
        activators: act_rx,
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "snooze-operator".into(),
                instance: Some(args.pod_name.clone()),
            },
        ),
        metrics: metrics.clone(),
        started: SystemTime::now(),
        discovery: Mutex::new(HashMap::new()),
        api_timeout: Duration::from_secs(args.api_timeout_seconds),
        services: Mutex::new(HashMap::new()),
        routes: Mutex::new(HashMap::new()),
        routes_listing: Mutex::new(HashMap::new()),
        max_queued_per_service: args.max_queued_per_service,
    });

    // The autoscaler: once a second, follow the load (writes only on change).
    let (c, t) = (ctx.clone(), trigger_tx.clone());
    tasks.spawn("autoscaler", async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            controller::autoscale_tick(&c, &t).await;
        }
    });

    // An activator opened or closed listeners: reconcile the services on those ports
    // (their managed EndpointSlice lists an activator only once it listens).
    let (c, t) = (ctx.clone(), trigger_tx.clone());
    tasks.spawn("listening changes", async move {
        loop {
            c.stats.listening_notify.notified().await;
            let owners: BTreeSet<(String, String)> = {
                let ports = c.ports.lock();
                c.stats
                    .take_listening_changes()
                    .into_iter()
                    .filter_map(|p| ports.owner(p))
                    .map(|k| (k.namespace.clone(), k.name.clone()))
                    .collect()
            };
            for (ns, name) in owners {
                t.send(ObjectRef::new(&name).within(&ns)).await?;
            }
        }
    });

    // Wake signals: scale at once, then reconcile for the status. Each wake runs in
    // this task's own set, so it stops with the leadership.
    let (c, t) = (ctx.clone(), trigger_tx.clone());
    tasks.spawn("wakes", async move {
        let mut running = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                w = wake_rx.recv() => {
                    let Some((key, received)) = w else { return Ok(()) };
                    let (c, t) = (c.clone(), t.clone());
                    running.spawn(async move {
                        if let Err(e) = controller::wake(&c, &key, received).await {
                            warn!(service = ?key, "wake: {e}");
                        }
                        let _ = t.try_send(ObjectRef::new(&key.name).within(&key.namespace));
                    });
                }
                Some(_) = running.join_next() => {}
            }
        }
    });

    // Ready once the controller's cache has synced. Polled with a timeout: the store's
    // readiness future wakes only its last waiter (the controller's own).
    let ready_store = store.clone();
    tasks.spawn("readiness", async move {
        while tokio::time::timeout(Duration::from_millis(200), ready_store.wait_until_ready())
            .await
            .is_err()
        {}
        info!("caches synced; ready");
        ready.send_replace(true);
        std::future::pending().await
    });

    let m = metrics.clone();
    let run = controller
        .owns_stream(managed_slice_stream)
        .watches_stream(slice_stream, move |s: EndpointSlice| {
            by_service(
                s.namespace(),
                s.labels().get("kubernetes.io/service-name").cloned(),
            )
        })
        .watches_stream(service_stream, move |s: Service| {
            let mut refs = by_service2(s.namespace(), Some(s.name_any()));
            if let (Some(owner), Some(ns)) = (s.labels().get(LABEL_SCALED_SERVICE), s.namespace()) {
                refs.push(ObjectRef::new(owner).within(&ns));
            }
            refs
        })
        .reconcile_all_on(activator_stream)
        .reconcile_on(trigger_stream)
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(move |r| {
            // Reconcile errors are counted by the error policy; a watch error of the
            // controller's own watches is logged and counted here, and it goes on.
            if let Err(kcontroller::Error::QueueError(e)) = r {
                warn!("controller watch error (retrying with back-off): {e}");
                m.watch_error("controller");
            }
            std::future::ready(())
        });
    tokio::select! {
        _ = run => info!("controller stopped"),
        (task, r) = tasks.first_ended() => warn!(task, "a leader task ended: {r:?}"),
    }
    tasks.shutdown().await;
    Ok(())
}

fn scaled_services_of(
    store: &Store<ScaledService>,
    ns: Option<String>,
    svc: Option<String>,
) -> Vec<ObjectRef<ScaledService>> {
    let (Some(ns), Some(svc)) = (ns, svc) else {
        return vec![];
    };
    store
        .state()
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(ns.as_str()) && s.spec.service == svc)
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}
