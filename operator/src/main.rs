//! `snooze-operator`: wiring only. Every replica serves its admin port and campaigns
//! for the leader Lease (`lead.rs`); the leader runs the controller and the rest of
//! `run::lead` until it stops or loses the lease, and then campaigns again.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use snooze_operator::backstop;
use snooze_operator::config::Args;
use snooze_operator::lead::{Elector, Settings};
use snooze_operator::metrics::Metrics;
use snooze_operator::run::lead;
use snooze_runtime::admin::Admin;
use snooze_runtime::auth::{Allowed, TokenCheck};
use snooze_runtime::supervisor::Supervisor;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    snooze_runtime::init_logging(&args.log_format);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    if !args.check_services.is_empty() {
        return snooze_operator::check::run(client, &args.namespace, &args.check_services).await;
    }
    let shutdown = snooze_runtime::shutdown::on_signal()?;
    let metrics = Arc::new(Metrics::new());
    let (ready_tx, ready_rx) = watch::channel(false);
    let m = metrics.clone();
    let admin = Arc::new(Admin {
        ready: ready_rx,
        metrics: Box::new(move || m.encode()),
        routes: None,
        metrics_auth: (!args.metrics_audience.is_empty()).then(|| {
            Arc::new(TokenCheck::new(
                client.clone(),
                &args.metrics_audience,
                Allowed::MayGet("/metrics".into()),
                "/metrics",
            ))
        }),
    });
    let mut tasks = Supervisor::new();
    let listener = tokio::net::TcpListener::bind(args.admin_address).await?;
    tasks.spawn("admin server", admin.serve(listener));

    let settings = Settings::new(
        &args.namespace,
        &args.lease_name,
        &args.pod_name,
        Duration::from_secs(args.lease_duration),
    );
    let (leading_tx, mut leading) = watch::channel(false);
    let elector_stop = CancellationToken::new();
    let elector = Elector::new(client.clone(), settings);
    let elector_task = tokio::spawn(elector.run(leading_tx, elector_stop.clone()));
    info!(identity = %args.pod_name, lease = %args.lease_name, "waiting for the leader lease");

    let mut failed = None;
    loop {
        // A follower is ready: it is waiting to take over, and takes the activators'
        // wake signals as the backstop of a leader that cannot act (`backstop.rs`).
        ready_tx.send_replace(true);
        let following = shutdown.child_token();
        let backstop = (args.follower_wake_delay_ms > 0).then(|| {
            tokio::spawn(backstop::run(
                client.clone(),
                args.clone(),
                metrics.clone(),
                following.clone(),
            ))
        });
        let outcome = tokio::select! {
            r = leading.wait_for(|l| *l) => r.map(|_| None).map_err(anyhow::Error::from),
            _ = shutdown.cancelled() => Ok(Some(None)),
            (task, r) = tasks.first_ended() => Ok(Some(Some((task, r)))),
        };
        // The follower's term ends before the leader's begins.
        following.cancel();
        if let Some(b) = backstop
            && tokio::time::timeout(Duration::from_secs(2), b)
                .await
                .is_err()
        {
            warn!("the follower's backstop did not stop within 2s");
        }
        match outcome? {
            None => {}
            Some(f) => {
                failed = f;
                break;
            }
        }
        info!("became leader");
        metrics.leader.set(1);
        metrics.leader_transitions.inc();
        ready_tx.send_replace(false);
        let stop = shutdown.child_token();
        let work = lead(
            client.clone(),
            args.clone(),
            metrics.clone(),
            ready_tx.clone(),
            stop.clone(),
        );
        tokio::pin!(work);
        tokio::select! {
            r = &mut work => if let Err(e) = r { warn!("leading ended: {e}") },
            // Lost (or could not renew in time): stop acting at once, by dropping
            // every task of the leader, and campaign again.
            _ = leading.wait_for(|l| !*l) => error!("lost the leader lease; stepping down"),
            // Shutdown: let the controller finish its reconciles (bounded).
            _ = shutdown.cancelled() => {
                if tokio::time::timeout(Duration::from_secs(10), &mut work).await.is_err() {
                    warn!("the controller did not stop within 10s");
                }
            }
        }
        metrics.leader.set(0);
        metrics.leader_transitions.inc();
        if shutdown.is_cancelled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ready_tx.send_replace(false);
    // Release the lease (if held) so a follower takes over at once.
    elector_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(5), elector_task)
        .await
        .is_err()
    {
        warn!("the lease was not released within 5s");
    }
    tasks.shutdown().await;
    match failed {
        Some((task, r)) => Err(anyhow::anyhow!("{task} ended: {r:?}")),
        None => Ok(()),
    }
}
