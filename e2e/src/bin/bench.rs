//! `snooze-bench`: the load generator and measurements behind `bench/datapath.sh`.
//!
//! - `load --url U --connections C --duration D`: closed-loop HTTP/1.1 load over C
//!   keep-alive connections; prints one JSON line with requests/s and latency
//!   percentiles (every latency is kept, so p99.9 is exact).
//! - `hold --url U --requests N`: opens N connections that each send one request and
//!   wait for the answer (for the activator's RSS with N held requests); prints a line
//!   once they are all sent, then waits for the answers until killed.
//! - `coldstart --rounds R`: R cold starts on the local cluster, split into segments
//!   (see `snooze_e2e::coldstart`).
//! - `burst --requests N --max-queued Q`: N simultaneous first requests at a cold
//!   service that holds at most Q; the send → 503 time of the refused ones.
//! - `refuse --listen A`: the floor for `burst --target`: a server that answers every
//!   request's head with 503 and closes, doing nothing else.
//! - `release --requests N --rounds R`: runs the activator's proxy in this process with
//!   one service and no pod, holds N requests, then makes a pod appear and measures,
//!   for each request, the time from the endpoint event to its answer; R cold starts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Load {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value = "5s", value_parser = dur)]
        duration: Duration,
        /// Label printed with the result.
        #[arg(long, default_value = "")]
        label: String,
    },
    Hold {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 10_000)]
        requests: usize,
    },
    /// Cold starts of the test application on the local cluster (needs Snooze
    /// installed and KUBECONFIG; run inside the cluster's network namespace).
    Coldstart {
        #[arg(long, default_value_t = 20)]
        rounds: usize,
        /// The test application's start-up delay.
        #[arg(long, default_value_t = 300)]
        startup_delay_ms: u64,
        /// `periodSeconds` of the test app's readiness probe (Kubernetes' default: 10).
        #[arg(long, default_value_t = 1)]
        readiness_period: i32,
        #[arg(long, default_value = "coldstart-bench")]
        namespace: String,
    },
    /// N simultaneous first requests at a cold service holding at most `max-queued`:
    /// the time from sending to the 503 of each refused one.
    Burst {
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        #[arg(long, default_value_t = 1000)]
        max_queued: u64,
        /// An activator endpoint (IP:port of a cold service) to send the burst to,
        /// instead of an activator in this process (e.g. one in the local cluster).
        #[arg(long)]
        target: Option<std::net::SocketAddr>,
        /// Each client opens its connection at the same moment and is timed from its
        /// connect (as a burst of new clients is); otherwise all connect first and are
        /// timed from sending the request.
        #[arg(long)]
        from_connect: bool,
    },
    /// The floor of a burst's refusals (bench/burst.sh): accepts, reads one request head,
    /// answers 503 and closes, on a runtime shaped like the activator's (0: a worker
    /// per core). What a burst of new clients costs the kernel, the client and tokio
    /// alone, without the activator's admission.
    Refuse {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 0)]
        worker_threads: usize,
        /// The first `hold` connections are read and then held unanswered (until the
        /// client closes, 10 s at most), as the activator holds a cold service's
        /// queue-full of requests; the rest are refused.
        #[arg(long, default_value_t = 0)]
        hold: usize,
    },
    /// The objects of the activator start-up benchmark (bench/startup.sh): ScaledServices
    /// with their status ports, and EndpointSlices of Services none of them names.
    Populate {
        #[arg(long, default_value = "startup-bench")]
        namespace: String,
        #[arg(long, default_value_t = 1000)]
        scaled_services: usize,
        #[arg(long, default_value_t = 20000)]
        slices: usize,
        #[arg(long, default_value_t = 30000)]
        first_port: u16,
    },
    /// A TCP echo server (the backend of bench/tcp.sh).
    TcpEcho {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Bytes pushed through a TCP relay to an echo server and read back, on
    /// `connections` connections for `duration`: MiB/s each way.
    TcpLoad {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long, default_value_t = 8)]
        connections: usize,
        #[arg(long, default_value = "5s", value_parser = dur)]
        duration: Duration,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// A flood of slow clients on an admin port (bench/admin.sh): `connections`
    /// connections from `sources` loopback addresses (127.0.2.1 on), each sending a
    /// head it never finishes, while /readyz is asked from 127.0.0.1 every 100 ms.
    SlowAdmin {
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, default_value_t = 200)]
        sources: usize,
        #[arg(long, default_value_t = 20)]
        probes: usize,
        /// A process whose open file descriptors are counted during the flood.
        #[arg(long)]
        pid: Option<u32>,
    },
    Release {
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        /// Cold starts to measure; the first answer of each gives the "pod ready →
        /// first byte" distribution.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
}

/// /readyz latencies in µs, `probes` of them 100 ms apart, from 127.0.0.1.
async fn readyz_probes(target: std::net::SocketAddr, probes: usize) -> anyhow::Result<Vec<u32>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut lat = Vec::new();
    for _ in 0..probes {
        let t0 = std::time::Instant::now();
        let mut s = tokio::net::TcpStream::connect(target).await?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            .await?;
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
        let head = String::from_utf8_lossy(&buf[..n]);
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "/readyz: {head}");
        lat.push(t0.elapsed().as_micros() as u32);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lat.sort_unstable();
    Ok(lat)
}

fn open_fds(pid: Option<u32>) -> Option<usize> {
    Some(
        std::fs::read_dir(format!("/proc/{}/fd", pid?))
            .ok()?
            .count(),
    )
}

async fn slow_admin(
    target: std::net::SocketAddr,
    connections: usize,
    sources: usize,
    probes: usize,
    pid: Option<u32>,
) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let before = readyz_probes(target, probes).await?;
    let fds_before = open_fds(pid);
    // The flood, from `sources` addresses 127.0.2.1 on; kept by this process until the end.
    let t0 = std::time::Instant::now();
    let (mut flood, failed) = snooze_e2e::slow::open(target, connections, |i| {
        let n = 1 + i % sources.max(1);
        Some(std::net::Ipv4Addr::new(127, 0, 2 + (n / 250) as u8, (n % 250) as u8 + 1).into())
    })
    .await;
    let opened_in = t0.elapsed();
    let during = readyz_probes(target, probes).await?;
    let fds_during = open_fds(pid);
    let closed = snooze_e2e::slow::closed(&mut flood).await;
    // When the last of them is cut (the header timeout).
    let mut last_cut = Duration::ZERO;
    for c in &mut flood {
        let mut b = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_secs(30), c.read(&mut b)).await;
        last_cut = t0.elapsed();
    }
    println!(
        "{}",
        json!({
            "connections": connections, "sources": sources, "connect_failed": failed,
            "opened_in_s": opened_in.as_secs_f64(),
            "readyz_before_ms": {"p50": percentile(&before, 0.5), "max": percentile(&before, 1.0)},
            "readyz_during_ms": {"p50": percentile(&during, 0.5), "max": percentile(&during, 1.0), "answered_200": during.len()},
            "closed_at_once": closed, "held_open": flood.len() - closed,
            "fds_before": fds_before, "fds_during": fds_during,
            "all_cut_after_s": last_cut.as_secs_f64(),
        })
    );
    Ok(())
}

async fn tcp_echo(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (mut c, _) = l.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = c.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Bytes echoed back within `duration` over `connections` connections, each writing
/// 64 KiB blocks while it reads the echo.
async fn tcp_load(
    target: std::net::SocketAddr,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let end = tokio::time::Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let c = tokio::net::TcpStream::connect(target).await?;
        c.set_nodelay(true)?;
        tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = c.into_split();
            let writer = tokio::spawn(async move {
                let block = vec![7u8; 64 * 1024];
                while tokio::time::Instant::now() < end {
                    if w.write_all(&block).await.is_err() {
                        break;
                    }
                }
                let _ = w.shutdown().await;
            });
            let mut got = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match tokio::time::timeout_at(end + Duration::from_secs(5), r.read(&mut buf)).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                    Ok(Ok(n)) => {
                        if tokio::time::Instant::now() <= end {
                            got += n as u64;
                        }
                    }
                }
            }
            let _ = writer.await;
            got
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total)
}

fn dur(s: &str) -> Result<Duration, String> {
    s.parse::<kube::core::Duration>()
        .map(Into::into)
        .map_err(|e| e.to_string())
}

fn target(url: &str) -> anyhow::Result<(SocketAddr, String, String)> {
    let uri: http::Uri = url.parse()?;
    let host = uri
        .host()
        .ok_or_else(|| anyhow::anyhow!("no host in {url}"))?;
    let port = uri.port_u16().unwrap_or(80);
    let addr: SocketAddr = format!("{host}:{port}").parse()?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    Ok((addr, format!("{host}:{port}"), path))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

async fn connection(
    addr: SocketAddr,
    host: String,
    path: String,
    until: Instant,
) -> (Vec<u32>, u64, u64) {
    let mut lat = Vec::with_capacity(100_000);
    let (mut errors, mut bytes) = (0u64, 0u64);
    while Instant::now() < until {
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut send, conn)) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        else {
            errors += 1;
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < until {
            let req = http::Request::get(path.as_str())
                .header("host", host.as_str())
                .body(Empty::<Bytes>::new())
                .expect("request");
            let t = Instant::now();
            let ok = match send.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    match resp.into_body().collect().await {
                        Ok(b) => {
                            bytes += b.to_bytes().len() as u64;
                            status.is_success()
                        }
                        Err(_) => false,
                    }
                }
                Err(_) => false,
            };
            if ok {
                lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            } else {
                errors += 1;
                break;
            }
        }
    }
    (lat, errors, bytes)
}

async fn load(
    url: &str,
    connections: usize,
    duration: Duration,
    label: &str,
) -> anyhow::Result<()> {
    let (addr, host, path) = target(url)?;
    let start = Instant::now();
    let until = start + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(connection(addr, host.clone(), path.clone(), until)))
        .collect();
    let mut all = Vec::new();
    let (mut errors, mut bytes) = (0, 0);
    for t in tasks {
        let (l, e, b) = t.await?;
        all.extend(l);
        errors += e;
        bytes += b;
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "{}",
        json!({
            "label": label, "url": url, "connections": connections, "seconds": secs,
            "requests": all.len(), "errors": errors, "rps": all.len() as f64 / secs,
            "mb_per_s": bytes as f64 / secs / 1e6,
            "p50_ms": percentile(&all, 0.50), "p99_ms": percentile(&all, 0.99), "p999_ms": percentile(&all, 0.999),
            "max_ms": percentile(&all, 1.0),
        })
    );
    Ok(())
}

async fn hold(url: &str, n: usize) -> anyhow::Result<()> {
    let (addr, host, path) = target(url)?;
    let sent = Arc::new(tokio::sync::Semaphore::new(0));
    for _ in 0..n {
        let (host, path, sent) = (host.clone(), path.clone(), sent.clone());
        tokio::spawn(async move {
            let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                return;
            };
            let Ok((mut s, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
            else {
                return;
            };
            tokio::spawn(conn);
            let req = http::Request::get(path.as_str())
                .header("host", host.as_str())
                .body(Empty::<Bytes>::new())
                .expect("request");
            let fut = s.send_request(req);
            sent.add_permits(1);
            let _ = fut.await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(120), sent.acquire_many(n as u32)).await;
    println!("{}", json!({"held": n}));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(())
}

/// The activator's proxy and listeners in this process, with one service (no pod yet)
/// on a free port: (port, service, listeners).
async fn one_service_activator(
    settings: snooze_activator::table::Settings,
) -> anyhow::Result<(
    u16,
    Arc<snooze_activator::table::ServiceEntry>,
    Arc<snooze_activator::accept::Listeners>,
)> {
    use snooze_activator::{
        accept::*, admit::Admission, dispatch::pool::Pool, dispatch::*, metrics::Metrics,
        stats::StatsHub, table::*,
    };
    let table = Arc::new(Table::new(Arc::new(Metrics::new()), 1_000_000));
    let stats = StatsHub::new(table.clone(), "bench".into(), Duration::from_secs(1));
    let proxy = Arc::new(Proxy {
        admit: Admission {
            table: table.clone(),
            stats,
        },
        pool: Pool::new(Duration::from_secs(2), 256),
        response_timeout: Duration::from_secs(60),
    });
    let listeners = Listeners::new(proxy, "127.0.0.1".parse()?, ServerLimits::default());
    let key = snooze_crds::stats::ServiceRef {
        namespace: "bench".into(),
        name: "web".into(),
    };
    let svc = table.upsert(key, "web", settings);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let route = Arc::new(Route {
        service: svc.clone(),
        port_name: String::new(),
        h2c: false,
        tcp: None,
    });
    listeners.sync(&[(port, route)].into()).await;
    Ok((port, svc, listeners))
}

/// One cold start: hold `n` requests, make a pod appear, and return each request's
/// time from the endpoint event to its answer (sorted, microseconds).
async fn release(n: usize) -> anyhow::Result<Vec<u32>> {
    let (port, svc, listeners) = one_service_activator(snooze_activator::table::Settings {
        max_queued: 1_000_000,
        ..Default::default()
    })
    .await?;
    // The backend: a minimal in-process hyper server.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    for _ in 0..n {
        let tx = tx.clone();
        tokio::spawn(async move {
            let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return;
            };
            let Ok((mut s, conn)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
            else {
                return;
            };
            tokio::spawn(conn);
            let req = http::Request::get("/")
                .header("host", "bench")
                .body(Empty::<Bytes>::new())
                .expect("request");
            match s.send_request(req).await {
                Ok(resp) if resp.status().is_success() => {
                    let _ = tx.send(Instant::now());
                }
                Ok(resp) => {
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    eprintln!("release: {}", String::from_utf8_lossy(&body).trim());
                }
                Err(e) => eprintln!("release: client error: {e}"),
            }
        });
    }
    drop(tx);
    let start = Instant::now();
    while svc.queued.load(std::sync::atomic::Ordering::Relaxed) < n as u64 {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "only {} held",
            svc.queued.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    svc.set_endpoints(vec![(
        backend_addr.ip(),
        vec![(String::new(), backend_addr.port())],
    )]);
    let mut lat = Vec::with_capacity(n);
    while let Some(t) = rx.recv().await {
        lat.push(t.duration_since(t0).as_micros() as u32);
    }
    lat.sort_unstable();
    listeners.drain(Duration::from_millis(100)).await;
    Ok(lat)
}

/// The in-process activator with one cold service (no pod) holding at most
/// `max_queued`; `n` clients connect and send their first request at once. Returns the
/// send → 503 times (µs) of the refused ones and how many were held.
///
/// The activator runs on a runtime of its own with one worker and the clients on a
/// single-threaded one (their own thread): one core each, as two processes on two
/// machines would be. Sharing one runtime (2,000 client tasks in the activator's
/// scheduler queue) or four threads on two cores put tens of ms of scheduling noise
/// into the measure (p99 9–46 ms from run to run; 15–17 ms like this).
fn burst(n: usize, max_queued: u64) -> anyhow::Result<(Vec<u32>, usize)> {
    let activator = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (port, svc, listeners) =
        activator.block_on(one_service_activator(snooze_activator::table::Settings {
            max_queued,
            timeout: Duration::from_secs(10),
            ..Default::default()
        }))?;
    // The most requests held at once (sampled every millisecond while the burst runs).
    let most_held = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (svc, most_held) = (svc.clone(), most_held.clone());
        activator.spawn(async move {
            loop {
                let q = svc.queued.load(std::sync::atomic::Ordering::Relaxed);
                most_held.fetch_max(q, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let clients = std::thread::spawn(move || -> anyhow::Result<Vec<u32>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let refused = rt.block_on(burst_clients(([127, 0, 0, 1], port).into(), n, false))?;
        Ok(refused.into_iter().map(|(_, total)| total).collect())
    });
    let refused = clients
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
    sampler.abort();
    let held = most_held.load(std::sync::atomic::Ordering::Relaxed) as usize;
    activator.block_on(listeners.drain(Duration::from_millis(100)));
    Ok((refused, held))
}

/// `n` first requests at once to `addr`; for each refused one, the times (µs) to its
/// connection established and to its 503: from sending (all connected first: the
/// connect time is 0) or, with `from_connect`, from each client's connect (all
/// connecting at the same moment).
async fn burst_clients(
    addr: std::net::SocketAddr,
    n: usize,
    from_connect: bool,
) -> anyhow::Result<Vec<(u32, u32)>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut streams = Vec::with_capacity(n);
    if !from_connect {
        for _ in 0..n {
            streams.push(Some(tokio::net::TcpStream::connect(addr).await?));
        }
    } else {
        streams.resize_with(n, || None);
    }
    let go = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = tokio::task::JoinSet::new();
    for s in streams {
        let go = go.clone();
        tasks.spawn(async move {
            go.wait().await;
            let t0 = Instant::now();
            let mut s = match s {
                Some(s) => s,
                None => tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                .ok()?
                .ok()?,
            };
            let connected = t0.elapsed().as_micros() as u32;
            s.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")
                .await
                .ok()?;
            let mut buf = [0u8; 12];
            // A held request gets nothing until the activation timeout: not waited for.
            match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await {
                Ok(Ok(_)) if &buf[9..12] == b"503" => {
                    Some((connected, t0.elapsed().as_micros() as u32))
                }
                _ => None,
            }
        });
    }
    let mut refused = Vec::new();
    while let Some(r) = tasks.join_next().await {
        refused.extend(r.ok().flatten());
    }
    Ok(refused)
}

/// `snooze-bench refuse`: accept, read one head (up to 8 KiB), answer 503, close (the
/// first `hold` connections: hold instead); on its own runtime of `workers` threads (0:
/// one per core; 1: current-thread, as the activator's flag does), on the activator's
/// own listener (`accept::listen`: its accept queue; tokio's default of 1,024 drops a
/// burst's SYNs, which come back a second later). Runs until killed.
fn refuse_server(listen: SocketAddr, workers: usize, hold: usize) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut rt = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if workers > 1 {
            b.worker_threads(workers);
        }
        b
    };
    rt.enable_all().build()?.block_on(async move {
        let l = snooze_activator::accept::listen(listen)?;
        println!("refusing on {}", l.local_addr()?);
        let mut accepted = 0usize;
        loop {
            let mut s = match l.accept().await {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of descriptors, say: wait, as a server would, not spin.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            };
            accepted += 1;
            let held = accepted <= hold;
            tokio::spawn(async move {
                let mut head = Vec::with_capacity(512);
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                if held {
                    let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            });
        }
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match args.cmd {
            Cmd::Load {
                url,
                connections,
                duration,
                label,
            } => load(&url, connections, duration, &label).await,
            Cmd::Hold { url, requests } => hold(&url, requests).await,
            Cmd::Coldstart {
                rounds,
                startup_delay_ms,
                readiness_period,
                namespace,
            } => {
                snooze_e2e::coldstart::run(rounds, startup_delay_ms, readiness_period, &namespace).await
            }
            Cmd::Populate {
                namespace,
                scaled_services,
                slices,
                first_port,
            } => {
                snooze_e2e::startup::populate(&namespace, scaled_services, slices, first_port)
                    .await
            }
            Cmd::Burst {
                requests,
                max_queued,
                target,
                from_connect,
            } => {
                let (times, held) = match target {
                    Some(addr) => (burst_clients(addr, requests, from_connect).await?, 0),
                    None => {
                        let (refused, held) =
                            tokio::task::spawn_blocking(move || burst(requests, max_queued))
                                .await??;
                        (refused.into_iter().map(|t| (0, t)).collect(), held)
                    }
                };
                // The 503 times, the connect times, and what came after the connect
                // (each sorted on its own: percentiles of each part).
                let sorted = |f: &dyn Fn(&(u32, u32)) -> u32| {
                    let mut v: Vec<u32> = times.iter().map(f).collect();
                    v.sort_unstable();
                    v
                };
                let refused = sorted(&|t| t.1);
                let connect = sorted(&|t| t.0);
                let after = sorted(&|t| t.1 - t.0);
                println!(
                    "{}",
                    json!({
                        "requests": requests, "max_queued": max_queued, "held": held, "refused_503": refused.len(),
                        "503_p50_ms": percentile(&refused, 0.5), "503_p99_ms": percentile(&refused, 0.99),
                        "503_max_ms": percentile(&refused, 1.0),
                        "connect_p50_ms": percentile(&connect, 0.5), "connect_p99_ms": percentile(&connect, 0.99),
                        "after_connect_p50_ms": percentile(&after, 0.5), "after_connect_p99_ms": percentile(&after, 0.99),
                    })
                );
                Ok(())
            }
            Cmd::Refuse {
                listen,
                worker_threads,
                hold,
            } => {
                tokio::task::spawn_blocking(move || refuse_server(listen, worker_threads, hold))
                    .await?
            }
            Cmd::SlowAdmin {
                target,
                connections,
                sources,
                probes,
                pid,
            } => slow_admin(target, connections, sources, probes, pid).await,
            Cmd::TcpEcho { listen } => tcp_echo(listen).await,
            Cmd::TcpLoad {
                target,
                connections,
                duration,
                label,
            } => {
                let bytes = tcp_load(target, connections, duration).await?;
                let mib = bytes as f64 / (1024.0 * 1024.0);
                println!(
                    "{}",
                    json!({
                        "label": label,
                        "mib": mib,
                        "mib_per_s": mib / duration.as_secs_f64(),
                    })
                );
                Ok(())
            }
            Cmd::Release { requests, rounds } => {
                let mut firsts = Vec::new();
                let mut all = Vec::new();
                let mut spreads = Vec::new();
                let mut answered = 0;
                for _ in 0..rounds.max(1) {
                    let lat = release(requests).await?;
                    answered += lat.len();
                    firsts.extend(lat.first().copied());
                    // The slowest answer after the first, in ms (SYN retransmits show
                    // here as ~1,000 ms).
                    if let (Some(a), Some(b)) = (lat.first(), lat.last()) {
                        spreads.push(f64::from(b - a) / 1000.0);
                    }
                    all.extend(lat);
                }
                firsts.sort_unstable();
                all.sort_unstable();
                println!(
                    "{}",
                    json!({
                        "rounds": rounds, "held_per_round": requests, "answered": answered,
                        "first_byte_p50_ms": percentile(&firsts, 0.5), "first_byte_p99_ms": percentile(&firsts, 0.99),
                        "all_p50_ms": percentile(&all, 0.5), "all_p99_ms": percentile(&all, 0.99), "all_max_ms": percentile(&all, 1.0),
                        "slowest_after_first_ms_per_round": spreads,
                    })
                );
                Ok(())
            }
        }
    })
}
