//! `snooze-operator`: leader election, the watches, the controller, the stats streams
//! and the admin server (`/livez`, `/readyz`, `/metrics`).

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use clap::Parser;
use futures::{FutureExt, StreamExt, TryStreamExt};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use parking_lot::Mutex;
use snooze_crds::stats::ServiceRef;
use snooze_crds::{LABEL_SCALED_SERVICE, MANAGER, ScaledService};
use snooze_operator::controller::{self, Activators, Context};
use snooze_operator::metrics::Metrics;
use snooze_operator::ports::{PortAllocator, PortKey};
use snooze_operator::stats::{self, StatsStore};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "Snooze operator: scales ScaledServices to zero and back"
)]
struct Args {
    /// Namespace of the operator and the activators (the release namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "snooze-system")]
    namespace: String,
    /// This pod's name: the leader lease holder identity.
    #[arg(long, env = "POD_NAME", default_value = "snooze-operator")]
    pod_name: String,
    /// Name of the leader Lease.
    #[arg(long, env = "SNOOZE_LEASE_NAME", default_value = "snooze-operator")]
    lease_name: String,
    /// Lease duration in seconds; a new leader takes over at most this long after the
    /// old one stopped renewing.
    #[arg(long, env = "SNOOZE_LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    /// The Service that selects the activator pods.
    #[arg(
        long,
        env = "SNOOZE_ACTIVATOR_SERVICE",
        default_value = "snooze-activator"
    )]
    activator_service: String,
    /// Name of the activator Service port that serves the stats stream.
    #[arg(
        long,
        env = "SNOOZE_ACTIVATOR_ADMIN_PORT_NAME",
        default_value = "admin"
    )]
    activator_admin_port: String,
    /// First and last activator port handed to ScaledService ports.
    #[arg(long, env = "SNOOZE_PORT_RANGE_START", default_value_t = 20000)]
    port_range_start: u16,
    #[arg(long, env = "SNOOZE_PORT_RANGE_END", default_value_t = 29999)]
    port_range_end: u16,
    /// Admin server address: /livez, /readyz, /metrics.
    #[arg(long, env = "SNOOZE_ADMIN_ADDRESS", default_value = "0.0.0.0:9091")]
    admin_address: SocketAddr,
    /// Timeout of every API call.
    #[arg(long, env = "SNOOZE_API_TIMEOUT_SECONDS", default_value_t = 10)]
    api_timeout_seconds: u64,
    /// `json` or `text`.
    #[arg(long, env = "SNOOZE_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

struct Health {
    ready: AtomicBool,
    metrics: Arc<Metrics>,
}

async fn admin(health: Arc<Health>, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("admin accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let h = health.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (code, body) = match req.uri().path() {
                        "/livez" => (200, "ok\n".to_string()),
                        "/readyz" if h.ready.load(Ordering::Relaxed) => {
                            (200, "ready\n".to_string())
                        }
                        "/readyz" => (503, "not ready\n".to_string()),
                        "/metrics" => (200, h.metrics.encode()),
                        _ => (404, "not found\n".to_string()),
                    };
                    let mut r = http::Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = http::StatusCode::from_u16(code).unwrap_or_default();
                    async move { Ok::<_, Infallible>(r) }
                });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Follows the activator Service's EndpointSlices: ready pod IPs and stats addresses.
async fn watch_activators(
    client: Client,
    args: Args,
    tx: watch::Sender<Activators>,
) -> anyhow::Result<()> {
    let api: Api<EndpointSlice> = Api::namespaced(client, &args.namespace);
    let cfg = watcher::Config::default().labels(&format!(
        "kubernetes.io/service-name={}",
        args.activator_service
    ));
    let (reader, writer) = reflector::store();
    let mut stream = std::pin::pin!(reflector::reflector(
        writer,
        watcher(api, cfg).default_backoff()
    ));
    loop {
        // The store holds the listed objects only once the initial list is done.
        match stream.try_next().await? {
            None => anyhow::bail!("activator watch ended"),
            Some(watcher::Event::Init) | Some(watcher::Event::InitApply(_)) => continue,
            Some(_) => {}
        }
        let mut ips = Vec::new();
        let mut stats = Vec::new();
        for s in reader.state() {
            let admin_port = s
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(args.activator_admin_port.as_str()))
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok());
            for e in &s.endpoints {
                if e.conditions.as_ref().and_then(|c| c.ready) != Some(true) {
                    continue;
                }
                for a in &e.addresses {
                    ips.push(a.clone());
                    if let (Some(port), Ok(ip)) = (admin_port, a.parse()) {
                        stats.push(SocketAddr::new(ip, port));
                    }
                }
            }
        }
        ips.sort();
        ips.dedup();
        stats.sort();
        stats.dedup();
        tx.send_if_modified(|cur| {
            let next = Activators { ips, stats };
            if *cur != next {
                info!(activators = ?next.ips, "activators changed");
                *cur = next;
                true
            } else {
                false
            }
        });
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let subscriber = tracing_subscriber::fmt().with_env_filter(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "info,kube=warn".into()),
    );
    if args.log_format == "json" {
        subscriber.json().init();
    } else {
        subscriber
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health {
        ready: AtomicBool::new(false),
        metrics: metrics.clone(),
    });
    tokio::spawn(admin(health.clone(), args.admin_address));

    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => return,
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            info!("shutdown requested");
            shutdown.cancel();
            // A second signal ends the process at once.
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            std::process::exit(1);
        });
    }

    // Leader election: followers wait here, ready to take over.
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.namespace)
        .with_identity(&args.pod_name)
        .with_duration(args.lease_duration)
        .with_grace(5)
        .with_field_manager(MANAGER)
        .build()
        .await?;
    let (mut leader_rx, lease_task) = manager.watch().await;
    health.ready.store(true, Ordering::Relaxed);
    info!(identity = %args.pod_name, lease = %args.lease_name, "waiting for the leader lease");
    let leading = tokio::select! {
        r = leader_rx.wait_for(|l| *l) => { r?; true }
        _ = shutdown.cancelled() => false,
    };
    if !leading {
        drop(leader_rx);
        let _ = lease_task.await;
        return Ok(());
    }
    info!("became leader");
    metrics.leader.set(1);
    health.ready.store(false, Ordering::Relaxed);

    let result = lead(
        client,
        args,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
        leader_rx.clone(),
    )
    .await;
    metrics.leader.set(0);
    // Release the lease so a follower takes over at once.
    drop(leader_rx);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(m))) => {
            let _ = m.release().await;
        }
        _ => warn!("lease task did not finish in time"),
    }
    result
}

async fn lead(
    client: Client,
    args: Args,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
    mut leader_rx: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let api_timeout = Duration::from_secs(args.api_timeout_seconds);
    let ss_api: Api<ScaledService> = Api::all(client.clone());

    // Seed the port allocator from the statuses, oldest first, before reconciling.
    let mut alloc = PortAllocator::new(args.port_range_start..=args.port_range_end);
    let mut existing = ss_api.list(&Default::default()).await?.items;
    existing.sort_by_key(|s| (s.metadata.creation_timestamp.clone(), s.name_any()));
    for ss in &existing {
        for p in ss.status.iter().flat_map(|s| s.ports.iter()) {
            let id = snooze_operator::objects::port_id(p.name.as_deref(), p.port);
            if let Ok(port) = u16::try_from(p.activator_port) {
                let key = PortKey::new(&ss.namespace().unwrap_or_default(), &ss.name_any(), &id);
                if !alloc.claim(key, port) {
                    warn!(name = %ss.name_any(), port, "activator port taken by an older ScaledService; reassigning");
                }
            }
        }
    }

    let (act_tx, act_rx) = watch::channel(Activators::default());
    let mut background = tokio::task::JoinSet::new();
    background.spawn(watch_activators(client.clone(), args.clone(), act_tx));

    let (wake_tx, mut wake_rx) = mpsc::channel::<(ServiceRef, Instant)>(1024);
    let stats_store = StatsStore::new(wake_tx);
    let (targets_tx, targets_rx) = watch::channel(Vec::new());
    {
        let mut act = act_rx.clone();
        background.spawn(async move {
            loop {
                let t = act.borrow_and_update().stats.clone();
                targets_tx.send_replace(t);
                act.changed().await?;
            }
        });
    }
    tokio::spawn(stats::run(
        stats_store.clone(),
        targets_rx,
        shutdown.child_token(),
    ));
    {
        let store = stats_store.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                metrics.stats_streams.set(store.connected() as i64);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    // Backend EndpointSlices (ready replicas; a change triggers the ScaledService).
    let (slice_reader, slice_writer) = reflector::store::<EndpointSlice>();
    let slice_stream = reflector::reflector(
        slice_writer,
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default()
                .labels("endpointslice.kubernetes.io/managed-by=endpointslice-controller.k8s.io"),
        )
        .default_backoff(),
    )
    .touched_objects();

    let controller = Controller::new(ss_api, watcher::Config::default());
    let store = controller.store();
    let by_service = {
        let store = store.clone();
        move |ns: Option<String>, svc: Option<String>| -> Vec<ObjectRef<ScaledService>> {
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
    };
    let by_service2 = by_service.clone();
    let service_stream = watcher(
        Api::<PartialObjectMeta<Service>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();

    let (trigger_tx, mut trigger_rx) = mpsc::channel::<ObjectRef<ScaledService>>(1024);
    let trigger_stream = futures::stream::poll_fn(move |cx| trigger_rx.poll_recv(cx));
    let activator_stream = futures::stream::unfold(act_rx.clone(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });

    let ctx = Arc::new(Context {
        client: client.clone(),
        store: store.clone(),
        slices: slice_reader,
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
        api_timeout,
        waking: Mutex::new(HashMap::new()),
        history: Mutex::new(HashMap::new()),
        scale_state: Mutex::new(HashMap::new()),
        replicas: Mutex::new(HashMap::new()),
        last_scale: Mutex::new(HashMap::new()),
    });
    // The autoscaler: once a second, follow the load (writes only on change).
    {
        let ctx = ctx.clone();
        let trigger_tx = trigger_tx.clone();
        let stop = shutdown.child_token();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => controller::autoscale_tick(&ctx, &trigger_tx).await,
                    _ = stop.cancelled() => return,
                }
            }
        });
    }

    // An activator opened or closed listeners: reconcile the services on those ports
    // (their managed EndpointSlice lists an activator only once it listens).
    {
        let ctx = ctx.clone();
        let trigger_tx = trigger_tx.clone();
        tokio::spawn(async move {
            loop {
                ctx.stats.listening_notify.notified().await;
                let owners: BTreeSet<(String, String)> = {
                    let ports = ctx.ports.lock();
                    ctx.stats
                        .take_listening_changes()
                        .into_iter()
                        .filter_map(|p| ports.owner(p))
                        .map(|k| (k.namespace.clone(), k.name.clone()))
                        .collect()
                };
                for (ns, name) in owners {
                    if trigger_tx
                        .send(ObjectRef::new(&name).within(&ns))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
    }

    // Wake signals: scale at once, then reconcile for the status.
    {
        let ctx = ctx.clone();
        let trigger_tx = trigger_tx.clone();
        tokio::spawn(async move {
            while let Some((key, received)) = wake_rx.recv().await {
                let ctx = ctx.clone();
                let trigger_tx = trigger_tx.clone();
                tokio::spawn(async move {
                    match controller::wake(&ctx, &key, received).await {
                        Ok(_) => {}
                        Err(e) => warn!(service = ?key, "wake: {e}"),
                    }
                    let _ = trigger_tx.try_send(ObjectRef::new(&key.name).within(&key.namespace));
                });
            }
        });
    }

    let ready_store = store.clone();
    let health2 = health.clone();
    tokio::spawn(async move {
        // Polled with a timeout: the store's readiness future wakes only its last
        // waiter (the controller's own), so a second waiter must poll again.
        loop {
            match tokio::time::timeout(Duration::from_millis(200), ready_store.wait_until_ready())
                .await
            {
                Ok(Ok(())) => {
                    info!("caches synced; ready");
                    health2.ready.store(true, Ordering::Relaxed);
                    return;
                }
                Ok(Err(e)) => {
                    error!("controller cache never synced: {e}");
                    return;
                }
                Err(_) => continue,
            }
        }
    });

    let stop = {
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = leader_rx.wait_for(|l| !*l) => { error!("lost the leader lease"); }
            }
        }
    };
    let run = controller
        .owns(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().labels(LABEL_SCALED_SERVICE),
        )
        .owns(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default()
                .labels(&format!("endpointslice.kubernetes.io/managed-by={MANAGER}")),
        )
        .watches_stream(slice_stream, move |s: EndpointSlice| {
            by_service(
                s.namespace(),
                s.labels().get("kubernetes.io/service-name").cloned(),
            )
        })
        .watches_stream(service_stream, move |s| {
            by_service2(s.namespace(), Some(s.name_any()))
        })
        .reconcile_all_on(activator_stream)
        .reconcile_on(trigger_stream)
        .graceful_shutdown_on(stop)
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|_| async {})
        .boxed();
    tokio::select! {
        _ = run => {}
        r = background.join_next() => {
            error!("a background watch ended: {r:?}");
        }
    }
    health.ready.store(false, Ordering::Relaxed);
    info!("controller stopped");
    Ok(())
}
