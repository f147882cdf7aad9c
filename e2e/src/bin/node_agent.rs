//! `snooze-node-agent`: plays the kubelet for one Node of the local cluster.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::Parser;
use snooze_e2e::agent::{self, AgentConfig};

#[derive(Parser, Debug)]
#[command(about = "Runs the pods bound to one Node as local processes")]
struct Args {
    #[arg(long, env = "SNOOZE_NODE_NAME", default_value = "snooze-node")]
    node_name: String,
    /// The node's InternalIP (an address in the cluster's network namespace).
    #[arg(long, env = "SNOOZE_NODE_IP", default_value = "10.240.0.1")]
    node_ip: String,
    /// JSON file: {"images": {"<repository>[:tag]": "/path/to/executable"}}.
    #[arg(long, env = "SNOOZE_IMAGE_MAP")]
    images: PathBuf,
    #[arg(long, env = "SNOOZE_NODE_STATE_DIR")]
    state_dir: PathBuf,
    #[arg(long, env = "SNOOZE_NODE_LOG_DIR")]
    log_dir: PathBuf,
    /// Host and port pods use to reach the API server.
    #[arg(long, env = "SNOOZE_API_HOST", default_value = "10.240.0.1")]
    api_host: String,
    #[arg(long, env = "SNOOZE_API_PORT", default_value_t = 6443)]
    api_port: u16,
    /// Address of the cluster DNS Service for pods with `dnsPolicy: ClusterFirst`
    /// (unset: pods use the host's resolv.conf).
    #[arg(long, env = "SNOOZE_CLUSTER_DNS")]
    cluster_dns: Option<String>,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    #[arg(long, default_value = "10.244.0.10")]
    pod_ip_start: Ipv4Addr,
    #[arg(long, default_value_t = 65000)]
    pod_ip_count: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let a = Args::parse();
    agent::run(AgentConfig {
        node_name: a.node_name,
        node_ip: a.node_ip,
        images: a.images,
        state_dir: a.state_dir,
        log_dir: a.log_dir,
        api_host: a.api_host,
        api_port: a.api_port,
        cluster_dns: a.cluster_dns,
        cluster_domain: a.cluster_domain,
        pod_ip_start: a.pod_ip_start,
        pod_ip_count: a.pod_ip_count,
        started: agent::now(),
    })
    .await
}
