//! `snooze-activator`: see the library docs and DESIGN.md.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use snooze_activator::admin::{self, Admin};
use snooze_activator::listeners::{Listeners, ServerLimits};
use snooze_activator::metrics::Metrics;
use snooze_activator::pool::Pool;
use snooze_activator::proxy::{Proxy, Route};
use snooze_activator::stats::StatsHub;
use snooze_activator::table::{Settings, Table};
use snooze_crds::stats::ServiceRef;
use tokio::sync::watch;
use tracing::{error, info};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Snooze activator: holds requests while a workload sleeps and forwards them once it is awake"
)]
struct Args {
    /// Address the service listeners bind (the pod IP in the chart).
    #[arg(long, env = "SNOOZE_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    listen_address: IpAddr,
    /// Address of the admin server: /livez, /readyz, /metrics and the stats stream.
    #[arg(long, env = "SNOOZE_ADMIN_ADDRESS", default_value = "0.0.0.0:9090")]
    admin_address: SocketAddr,
    /// This pod's name, reported to the operator.
    #[arg(long, env = "POD_NAME", default_value = "activator")]
    pod_name: String,
    /// Tokio worker threads; 0 uses one per core. 1 runs everything on one thread
    /// (tokio's current-thread scheduler, about 1 µs less CPU per request than a
    /// multi-thread runtime with one worker).
    #[arg(long, env = "SNOOZE_WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
    /// Most requests held across all services at once.
    #[arg(long, env = "SNOOZE_MAX_QUEUED_TOTAL", default_value_t = 20_000)]
    max_queued_total: u64,
    /// Clients must send their request headers within this time (e.g. 10s).
    #[arg(long, env = "SNOOZE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = duration)]
    header_read_timeout: Duration,
    /// Largest request head in bytes; larger ones get 431.
    #[arg(long, env = "SNOOZE_MAX_HEADER_BYTES", default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// Longest wait for a pod's response headers.
    #[arg(long, env = "SNOOZE_RESPONSE_TIMEOUT", default_value = "5m", value_parser = duration)]
    response_timeout: Duration,
    /// Timeout of a TCP connect to a pod.
    #[arg(long, env = "SNOOZE_CONNECT_TIMEOUT", default_value = "2s", value_parser = duration)]
    connect_timeout: Duration,
    /// After SIGTERM: keep serving (not ready) this long so endpoints move away.
    #[arg(long, env = "SNOOZE_DRAIN_DELAY", default_value = "5s", value_parser = duration)]
    drain_delay: Duration,
    /// After the drain delay: wait this long for in-flight requests to finish.
    #[arg(long, env = "SNOOZE_GRACE_PERIOD", default_value = "20s", value_parser = duration)]
    grace_period: Duration,
    /// Interval of the stats reports to the operator.
    #[arg(long, env = "SNOOZE_STATS_INTERVAL", default_value = "1s", value_parser = duration)]
    stats_interval: Duration,
    /// Serve the services in this JSON file instead of watching the API server
    /// (benchmarks and local runs): {"services": [{"namespace", "name", "port",
    /// "endpoints": ["127.0.0.1:8080"], "timeout": "60s", "maxQueuedRequests": 1000,
    /// "podConcurrency": 0, "h2c": false}]}.
    #[arg(long, env = "SNOOZE_STATIC_CONFIG")]
    static_config: Option<PathBuf>,
    /// `json` or `text`.
    #[arg(long, env = "SNOOZE_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

fn duration(s: &str) -> Result<Duration, String> {
    s.parse::<kube::core::Duration>()
        .map(Into::into)
        .map_err(|e| format!("{s:?}: {e}"))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StaticService {
    namespace: String,
    name: String,
    port: u16,
    #[serde(default)]
    endpoints: Vec<SocketAddr>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    max_queued_requests: Option<u64>,
    #[serde(default)]
    pod_concurrency: Option<usize>,
    #[serde(default)]
    h2c: bool,
}

#[derive(serde::Deserialize)]
struct StaticConfig {
    services: Vec<StaticService>,
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
    let mut rt = if args.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if args.worker_threads > 1 {
            b.worker_threads(args.worker_threads);
        }
        b
    };
    rt.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let table = Arc::new(Table::new(metrics.clone(), args.max_queued_total));
    let stats = StatsHub::new(table.clone(), args.pod_name.clone(), args.stats_interval);
    let proxy = Arc::new(Proxy {
        table: table.clone(),
        pool: Pool::new(args.connect_timeout, 256),
        stats: stats.clone(),
        response_timeout: args.response_timeout,
    });
    let listeners = Listeners::new(
        proxy,
        args.listen_address,
        ServerLimits {
            header_read_timeout: args.header_read_timeout,
            max_header_bytes: args.max_header_bytes,
            ..Default::default()
        },
    );
    let (ready_tx, ready_rx) = watch::channel(false);
    let admin = Arc::new(Admin {
        metrics,
        stats,
        ready: ready_rx,
    });
    let admin_listener = admin::bind(args.admin_address).await?;
    tokio::spawn(admin.serve(admin_listener));
    info!(admin = %args.admin_address, listen = %args.listen_address, "activator starting");

    let mut tasks = tokio::task::JoinSet::new();
    if let Some(path) = &args.static_config {
        let cfg: StaticConfig = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        let mut desired = std::collections::HashMap::new();
        for s in cfg.services {
            let settings = Settings {
                timeout: match &s.timeout {
                    Some(t) => duration(t).map_err(anyhow::Error::msg)?,
                    None => Settings::default().timeout,
                },
                max_queued: s.max_queued_requests.unwrap_or(1000),
                pod_concurrency: s.pod_concurrency.unwrap_or(0),
            };
            let key = ServiceRef {
                namespace: s.namespace,
                name: s.name.clone(),
            };
            let svc = table.upsert(key, &s.name, settings);
            svc.set_endpoints(
                s.endpoints
                    .iter()
                    .map(|a| (a.ip(), vec![(String::new(), a.port())]))
                    .collect(),
            );
            desired.insert(
                s.port,
                Arc::new(Route {
                    service: svc,
                    port_name: String::new(),
                    h2c: s.h2c,
                }),
            );
        }
        if let Some((port, e)) = listeners.sync(&desired).await.into_iter().next() {
            anyhow::bail!("cannot listen on port {port}: {e}");
        }
        ready_tx.send_replace(true);
    } else {
        let client = kube::Client::try_default().await?;
        let (ss_tx, mut ss_rx) = watch::channel(false);
        let (eps_tx, mut eps_rx) = watch::channel(false);
        tasks.spawn(snooze_activator::watch::scaled_services(
            client.clone(),
            table.clone(),
            listeners.clone(),
            ss_tx,
        ));
        tasks.spawn(snooze_activator::watch::endpoint_slices(
            client,
            table.clone(),
            eps_tx,
        ));
        let ready_tx = ready_tx.clone();
        tokio::spawn(async move {
            let _ = ss_rx.wait_for(|v| *v).await;
            let _ = eps_rx.wait_for(|v| *v).await;
            info!("watches synced; ready");
            ready_tx.send_replace(true);
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let reason = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
        // In static mode there is no watch: the branch is disabled.
        Some(r) = tasks.join_next() => {
            error!("a watch ended: {r:?}");
            return Err(anyhow::anyhow!("watch ended: {r:?}"));
        }
    };
    // Not ready at once; keep serving while endpoints move away; then drain.
    info!(reason, drain_delay = ?args.drain_delay, "shutting down: not ready");
    ready_tx.send_replace(false);
    tokio::select! {
        _ = tokio::time::sleep(args.drain_delay) => {}
        _ = term.recv() => { info!("second signal: exiting now"); return Ok(()); }
    }
    let drained = tokio::select! {
        d = listeners.drain(args.grace_period) => d,
        _ = term.recv() => { info!("second signal: exiting now"); return Ok(()); }
    };
    info!(drained, "stopped");
    Ok(())
}
