//! The node agent: plays the kubelet for the pods bound to one Node, running each
//! container as a local process. See DESIGN.md, "The local cluster".

pub mod container;
pub mod node;
pub mod pod;
pub mod spec;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, ResourceExt};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub const NODE_CPU: u32 = 16;
pub const NODE_MEMORY_BYTES: u64 = 64 * 1024 * 1024 * 1024;
/// Room for `bench/scale.sh --api`'s 1,000 busy services (one pod each) beside the
/// add-ons' and Snooze's own pods (at 1,000, seven of them stayed Pending).
pub const NODE_PODS: u32 = 1200;

pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub node_ip: String,
    /// JSON file mapping images to executables (see `spec::ImageMap`).
    pub images: PathBuf,
    /// Per-pod volume folders live under `<state_dir>/pods/<uid>`.
    pub state_dir: PathBuf,
    /// Container output goes to `<log_dir>/<namespace>_<pod>_<container>.log`.
    pub log_dir: PathBuf,
    /// Where pods reach the API server (KUBERNETES_SERVICE_HOST/PORT). There is no
    /// kube-proxy, so this is the API server's own address rather than a ClusterIP.
    pub api_host: String,
    pub api_port: u16,
    /// The cluster DNS Service's address that pods with `dnsPolicy: ClusterFirst` get
    /// in their resolv.conf (the kubelet's `--cluster-dns`); `None`: the host's file.
    pub cluster_dns: Option<String>,
    /// The kubelet's `--cluster-domain`, for the search path.
    pub cluster_domain: String,
    /// First pod IP and how many there are.
    pub pod_ip_start: Ipv4Addr,
    pub pod_ip_count: u32,
    pub started: Time,
}

impl AgentConfig {
    /// The variables every container gets before its own `env` (as the kubelet sets
    /// the `kubernetes` service's variables).
    pub fn base_env(&self, _pod: &Pod) -> Vec<(String, String)> {
        let (h, p) = (&self.api_host, self.api_port);
        vec![
            ("KUBERNETES_SERVICE_HOST".into(), h.clone()),
            ("KUBERNETES_SERVICE_PORT".into(), p.to_string()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".into(), p.to_string()),
            ("KUBERNETES_PORT".into(), format!("tcp://{h}:{p}")),
            ("KUBERNETES_PORT_443_TCP".into(), format!("tcp://{h}:{p}")),
            ("KUBERNETES_PORT_443_TCP_PROTO".into(), "tcp".into()),
            ("KUBERNETES_PORT_443_TCP_PORT".into(), p.to_string()),
            ("KUBERNETES_PORT_443_TCP_ADDR".into(), h.clone()),
        ]
    }
}

/// Pod IPs: handed out in turn (so a freed address is not reused at once), unique
/// among live pods. The range is routed to the loopback device of the cluster's
/// network namespace, so any address of it can be bound.
pub struct IpPool {
    start: u32,
    count: u32,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    next: u32,
    by_uid: HashMap<String, u32>,
    used: HashSet<u32>,
}

impl IpPool {
    pub fn new(start: Ipv4Addr, count: u32) -> Self {
        Self {
            start: u32::from(start),
            count: count.max(1),
            state: Mutex::new(PoolState::default()),
        }
    }

    pub fn allocate(&self, uid: &str) -> String {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ip) = s.by_uid.get(uid) {
            return Ipv4Addr::from(*ip).to_string();
        }
        let mut ip = self.start;
        for _ in 0..self.count {
            ip = self.start + s.next % self.count;
            s.next = s.next.wrapping_add(1);
            if !s.used.contains(&ip) {
                break;
            }
        }
        s.used.insert(ip);
        s.by_uid.insert(uid.to_string(), ip);
        Ipv4Addr::from(ip).to_string()
    }

    pub fn release(&self, uid: &str) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ip) = s.by_uid.remove(uid) {
            s.used.remove(&ip);
        }
    }
}

/// Registers the node and runs the pods bound to it until the process is stopped.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(cfg.state_dir.join("pods"))?;
    std::fs::create_dir_all(&cfg.log_dir)?;
    let client = kube::Client::try_default().await?;
    let node = node::register(&client, &cfg).await?;
    info!(node = %cfg.node_name, ip = %cfg.node_ip, "node registered");
    tokio::spawn(node::heartbeat(
        client.clone(),
        cfg.clone(),
        node::uid(&node),
    ));

    let pool = Arc::new(IpPool::new(cfg.pod_ip_start, cfg.pod_ip_count));
    let api: Api<Pod> = Api::all(client.clone());
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", cfg.node_name));
    let mut events = std::pin::pin!(watcher::watcher(api, wc).default_backoff());
    let mut workers: HashMap<String, watch::Sender<Option<Pod>>> = HashMap::new();
    let mut listed: HashSet<String> = HashSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();

    loop {
        tokio::select! {
            ev = events.next() => {
                // A watch error (API server restart, 410 Gone) is retried with
                // back-off; the pods keep running meanwhile. Never fatal.
                let ev = match ev {
                    None => break,
                    Some(Err(e)) => { warn!("pod watch error (retrying): {e}"); continue; }
                    Some(Ok(ev)) => ev,
                };
                match ev {
                    Event::Init => listed.clear(),
                    Event::InitApply(p) | Event::Apply(p) => {
                        let uid = p.uid().unwrap_or_default();
                        listed.insert(uid.clone());
                        if let Some(tx) = workers.get(&uid) {
                            let _ = tx.send(Some(p));
                        } else {
                            let (tx, rx) = watch::channel(Some(p));
                            workers.insert(uid.clone(), tx);
                            let w = pod::PodWorker { cfg: cfg.clone(), client: client.clone(), pool: pool.clone(), rx };
                            let done = done_tx.clone();
                            tokio::spawn(async move { w.run().await; let _ = done.send(uid); });
                        }
                    }
                    Event::Delete(p) => {
                        if let Some(tx) = workers.get(&p.uid().unwrap_or_default()) {
                            let _ = tx.send(None);
                        }
                    }
                    Event::InitDone => {
                        for (uid, tx) in &workers {
                            if !listed.contains(uid) {
                                let _ = tx.send(None);
                            }
                        }
                    }
                }
            }
            Some(uid) = done_rx.recv() => { workers.remove(&uid); }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_pool_unique_and_cycling() {
        let pool = IpPool::new(Ipv4Addr::new(10, 244, 0, 10), 3);
        let a = pool.allocate("a");
        let b = pool.allocate("b");
        assert_eq!(a, "10.244.0.10");
        assert_eq!(b, "10.244.0.11");
        assert_eq!(pool.allocate("a"), a);
        pool.release("a");
        // The freed address is not reused next; the one after b is.
        assert_eq!(pool.allocate("c"), "10.244.0.12");
        assert_eq!(pool.allocate("d"), "10.244.0.10");
    }
}
