//! `snooze-activator`: wiring only (see the library docs and DESIGN.md).

use std::sync::Arc;

use clap::Parser;
use snooze_activator::accept::{Listeners, ServerLimits};
use snooze_activator::admit::Admission;
use snooze_activator::config::{self, Args};
use snooze_activator::dispatch::Proxy;
use snooze_activator::dispatch::pool::Pool;
use snooze_activator::metrics::Metrics;
use snooze_activator::stats::StatsHub;
use snooze_activator::table::Table;
use snooze_activator::{admin, watch};
use snooze_runtime::auth::{Allowed, TokenCheck};
use snooze_runtime::supervisor::Supervisor;
use tracing::{error, info, warn};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    snooze_runtime::init_logging(&args.log_format);
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
    let shutdown = snooze_runtime::shutdown::on_signal()?;
    let metrics = Arc::new(Metrics::new());
    snooze_activator::activity::set_enabled(args.activity_summary);
    let mut table = Table::new(metrics.clone(), args.max_queued_total);
    if args.max_queued_per_service > 0 {
        table.max_queued_per_service = args.max_queued_per_service;
    }
    let table = Arc::new(table);
    let stats = StatsHub::new(table.clone(), args.pod_name.clone(), args.stats_interval);
    let pool = Pool::new(args.connect_timeout, 256);
    let proxy = Arc::new(Proxy {
        admit: Admission {
            table: table.clone(),
            stats: stats.clone(),
        },
        pool: pool.clone(),
        response_timeout: args.response_timeout,
    });
    let limits = ServerLimits {
        header_read_timeout: args.header_read_timeout,
        max_header_bytes: args.max_header_bytes,
        max_connections: match args.max_connections {
            0 => config::default_max_connections(config::open_file_limit()),
            n => n,
        },
        send_timeout: args.send_timeout,
        trusted_proxies: args.trusted_proxies.clone(),
        ..Default::default()
    };
    tracing::info!(
        max_connections = limits.max_connections,
        open_files = ?config::open_file_limit(),
        "client connections capped"
    );
    let listeners = Listeners::new(proxy, args.listen_address, limits);
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Supervisor::new();
    let client = match &args.static_config {
        Some(_) => None,
        None => Some(kube::Client::try_default().await?),
    };
    let auth = match (&client, args.stats_reader.as_str()) {
        (Some(c), reader) if !reader.is_empty() => Some(Arc::new(TokenCheck::new(
            c.clone(),
            &args.stats_audience,
            Allowed::User(reader.to_string()),
            "the stats stream",
        ))),
        (Some(_), _) => {
            warn!("--stats-reader is not set: any client may read the stats stream");
            None
        }
        (None, _) => None,
    };
    let metrics_auth = match (&client, args.metrics_audience.as_str()) {
        (Some(c), aud) if !aud.is_empty() => Some(Arc::new(TokenCheck::new(
            c.clone(),
            aud,
            Allowed::MayGet("/metrics".into()),
            "/metrics",
        ))),
        _ => None,
    };
    let admin = admin::admin(
        metrics.clone(),
        pool.clone(),
        stats,
        ready_rx,
        auth,
        metrics_auth,
    );
    let admin_listener = tokio::net::TcpListener::bind(args.admin_address).await?;
    tasks.spawn("admin server", admin.serve(admin_listener));
    info!(admin = %args.admin_address, listen = %args.listen_address, "activator starting");

    if let Some(path) = &args.static_config {
        let routes = config::load_static(path, &table)?;
        if let Some((port, e)) = listeners.sync(&routes).await.into_iter().next() {
            anyhow::bail!("cannot listen on port {port}: {e}");
        }
        ready_tx.send_replace(true);
    } else if let Some(client) = client {
        let (ss_tx, mut ss_rx) = tokio::sync::watch::channel(false);
        let (eps_tx, mut eps_rx) = tokio::sync::watch::channel(false);
        let m = metrics.clone();
        let (c, t, l, probing) = (
            client.clone(),
            table.clone(),
            listeners.clone(),
            args.activation_probing,
        );
        let watch_ss = watch::scaled_services(c, t, l, m, probing, ss_tx);
        tasks.spawn("scaledservice watch", watch_ss);
        let watch_eps = watch::endpoint_slices(client, table, pool, metrics, eps_tx);
        tasks.spawn("endpointslice watch", watch_eps);
        let ready_tx = ready_tx.clone();
        tasks.spawn("readiness", async move {
            ss_rx.wait_for(|v| *v).await?;
            eps_rx.wait_for(|v| *v).await?;
            info!("watches synced; ready");
            ready_tx.send_replace(true);
            std::future::pending().await
        });
    }

    let failed = tokio::select! {
        _ = shutdown.cancelled() => None,
        (task, r) = tasks.first_ended() => {
            error!(task, "a task ended ({r:?}); shutting down");
            Some(task)
        }
    };
    // Not ready at once; keep serving while endpoints move away; then drain. A second
    // signal ends the process at once (snooze_runtime::shutdown).
    info!(drain_delay = ?args.drain_delay, "shutting down: not ready");
    ready_tx.send_replace(false);
    tokio::time::sleep(args.drain_delay).await;
    let drained = listeners.drain(args.grace_period).await;
    info!(drained, "stopped");
    tasks.shutdown().await;
    match failed {
        Some(task) => Err(anyhow::anyhow!("{task} ended")),
        None => Ok(()),
    }
}
