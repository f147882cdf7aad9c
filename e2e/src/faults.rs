//! Fault injection on the local cluster and a load that counts every failed request.
//!
//! The load drives the managed Service's endpoints the way an ingress does: it re-reads
//! the EndpointSlice (keeping what it knew while the API server is away), sends each
//! request on a new connection to one listed activator, and retries a refused connect
//! on the next one (nothing was sent). Every other failure counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::testing::{SNOOZE_NAMESPACE, http_get, ingress_targets, scrape};

/// One failed request: when (since the load started), where, and what happened.
#[derive(Debug, Clone)]
pub struct Failure {
    pub at: Duration,
    pub target: String,
    pub error: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub sent: u64,
    pub ok: u64,
    /// Connects refused and retried on another endpoint (not failures).
    pub refused_retried: u64,
    pub failures: Vec<Failure>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.failures.len()
    }

    /// Failures at or after `t` (since the load started).
    pub fn failed_after(&self, t: Duration) -> Vec<&Failure> {
        self.failures.iter().filter(|f| f.at >= t).collect()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {}, ok {}, failed {}, refused connects retried {}",
            self.sent,
            self.ok,
            self.failures.len(),
            self.refused_retried
        )
    }
}

#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    ok: AtomicU64,
    refused: AtomicU64,
    failures: Mutex<Vec<Failure>>,
}

/// A running load; [`Load::stop`] ends it and reports.
pub struct Load {
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    shared: Arc<Shared>,
    pub started: Instant,
}

impl Load {
    /// `workers` loops, each sending one request and pausing `pause`, for at most
    /// `limit` (and at most `max_requests` in all): bounded in count and time.
    pub async fn start(
        client: &Client,
        ns: &str,
        scaled_service: &str,
        workers: usize,
        pause: Duration,
        limit: Duration,
        max_requests: u64,
    ) -> Load {
        let first = crate::testing::wait_for("load targets", Duration::from_secs(60), || {
            ingress_targets(client, ns, scaled_service, "http")
        })
        .await;
        let targets = Arc::new(Mutex::new(first));
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared::default());
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        // Re-read the slice like an ingress; keep the last list while the API is away.
        let (c, n, s, t, st) = (
            client.clone(),
            ns.to_string(),
            scaled_service.to_string(),
            targets.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            while !st.is_cancelled() {
                if let Ok(Ok(v)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    ingress_targets(&c, &n, &s, "http"),
                )
                .await
                {
                    *t.lock() = v;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = st.cancelled() => {}
                }
            }
        });
        for w in 0..workers {
            let (t, st, sh) = (targets.clone(), stop.clone(), shared.clone());
            tasks.spawn(async move {
                let mut i = w;
                while !st.is_cancelled()
                    && started.elapsed() < limit
                    && sh.sent.load(Ordering::Relaxed) < max_requests
                {
                    sh.sent.fetch_add(1, Ordering::Relaxed);
                    let list = t.lock().clone();
                    let mut last = None;
                    for k in 0..list.len() {
                        let target = &list[(i + k) % list.len()];
                        match http_get(&format!("http://{target}/"), Duration::from_secs(30)).await
                        {
                            Ok((200, _)) => {
                                last = None;
                                break;
                            }
                            Err(e) if e.contains("Connection refused") => {
                                sh.refused.fetch_add(1, Ordering::Relaxed);
                                last = Some((target.clone(), e));
                            }
                            Ok((code, body)) => {
                                last = Some((target.clone(), format!("{code}: {}", body.trim())));
                                break;
                            }
                            Err(e) => {
                                last = Some((target.clone(), e));
                                break;
                            }
                        }
                    }
                    match last {
                        None => {
                            sh.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Some((target, error)) => sh.failures.lock().push(Failure {
                            at: started.elapsed(),
                            target,
                            error,
                        }),
                    }
                    i += 1;
                    tokio::time::sleep(pause).await;
                }
            });
        }
        Load {
            stop,
            tasks,
            shared,
            started,
        }
    }

    /// Requests answered 200 so far.
    pub fn ok(&self) -> u64 {
        self.shared.ok.load(Ordering::Relaxed)
    }

    pub async fn stop(mut self) -> Report {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        Report {
            sent: self.shared.sent.load(Ordering::Relaxed),
            ok: self.shared.ok.load(Ordering::Relaxed),
            refused_retried: self.shared.refused.load(Ordering::Relaxed),
            failures: self.shared.failures.lock().clone(),
        }
    }
}

/// The process of each running container of the pods matching `selector` in `ns`:
/// (pod, pid), from the node agent's container IDs (`snooze://PID`).
pub async fn container_pids(client: &Client, ns: &str, selector: &str) -> Vec<(String, i32)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let Ok(list) = pods.list(&ListParams::default().labels(selector)).await else {
        return vec![];
    };
    let mut out = Vec::new();
    for p in list.items {
        for cs in p
            .status
            .iter()
            .flat_map(|s| s.container_statuses.iter().flatten())
        {
            if cs.state.as_ref().and_then(|s| s.running.as_ref()).is_none() {
                continue;
            }
            if let Some(pid) = cs
                .container_id
                .as_deref()
                .and_then(|id| id.strip_prefix("snooze://"))
                .and_then(|p| p.parse().ok())
            {
                out.push((p.name_any(), pid));
            }
        }
    }
    out.sort();
    out
}

/// Snooze's own processes (operator and activator containers).
pub async fn snooze_pids(client: &Client) -> Vec<(String, i32)> {
    container_pids(client, SNOOZE_NAMESPACE, "app.kubernetes.io/name=snooze").await
}

/// Whether process `pid` still runs.
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// SIGKILLs a container process that the local cluster started.
pub fn kill9(pid: i32) {
    // SAFETY: a plain kill(2) of a process of this test's cluster.
    let r = unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(r, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
}

/// `kill -9 pid`, where the process may be gone already (its pod was just deleted and
/// the node agent may have stopped it first).
pub fn kill9_unless_gone(pid: i32) {
    // SAFETY: a plain kill(2) of a process of this test's cluster.
    let r = unsafe { libc::kill(pid, libc::SIGKILL) };
    let e = std::io::Error::last_os_error();
    assert!(
        r == 0 || e.raw_os_error() == Some(libc::ESRCH),
        "kill -9 {pid}: {e}"
    );
}

/// The node agent's pid (the local cluster's own process).
pub fn node_agent_pid() -> Option<i32> {
    let dir = std::env::var("SNOOZE_CLUSTER_DIR").unwrap_or_else(|_| "/tmp/snooze-cluster".into());
    std::fs::read_to_string(format!("{dir}/node-agent.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Runs `cluster.sh` with `cmd` (`apiserver-stop`, `apiserver-start`).
pub async fn cluster(cmd: &str) {
    let script = crate::testing::repo_path("e2e/cluster/cluster.sh");
    let out = tokio::process::Command::new("bash")
        .arg(script)
        .arg(cmd)
        .output()
        .await
        .expect("run cluster.sh");
    assert!(
        out.status.success(),
        "cluster.sh {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Each operator pod's view of itself: (pod, leader metric), from its admin port.
/// A pod that does not answer is left out.
pub async fn operator_leadership(client: &Client) -> Vec<(String, bool)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), SNOOZE_NAMESPACE);
    let Ok(list) = pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
    else {
        return vec![];
    };
    let mut out = Vec::new();
    for p in list.items {
        let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            continue;
        };
        if let Ok((200, body)) =
            scrape(&format!("http://{ip}:9091/metrics"), Duration::from_secs(1)).await
        {
            let leader = body.lines().any(|l| l.trim() == "snooze_operator_leader 1");
            out.push((p.name_any(), leader));
        }
    }
    out
}
