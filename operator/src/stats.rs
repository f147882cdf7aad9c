//! The leader's side of the stats stream: one long-lived `GET /v1/stats` to every
//! ready activator pod, the latest numbers of each, and wake signals forwarded at once.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use snooze_crds::stats::{Report, STATS_PATH, ServiceRef, ServiceStats, Waker};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::decision::Load;

/// A report older than this makes an activator's numbers stale.
pub const FRESH_FOR: Duration = Duration::from_secs(3);
/// A stream with no line for this long is dropped and reconnected.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest line accepted from an activator.
const MAX_LINE: usize = 16 * 1024 * 1024;

struct ActivatorState {
    instance: u64,
    connected: bool,
    last_report: Instant,
    services: HashMap<ServiceRef, ServiceStats>,
    /// Ports it has an open listener on (None: it has not said, e.g. an older
    /// activator).
    listening: Option<BTreeSet<u16>>,
}

pub struct StatsStore {
    activators: Mutex<HashMap<SocketAddr, ActivatorState>>,
    wake_tx: mpsc::Sender<(ServiceRef, Instant)>,
    /// Activator ports whose set of listening activators changed since the last
    /// [`StatsStore::take_listening_changes`] (bounded by the port range).
    listening_changed: Mutex<BTreeSet<u16>>,
    /// Notified when `listening_changed` gains ports.
    pub listening_notify: Notify,
}

impl StatsStore {
    pub fn new(wake_tx: mpsc::Sender<(ServiceRef, Instant)>) -> Arc<Self> {
        Arc::new(Self {
            activators: Mutex::new(HashMap::new()),
            wake_tx,
            listening_changed: Mutex::new(BTreeSet::new()),
            listening_notify: Notify::new(),
        })
    }

    /// The ports whose listening activators changed since the last call.
    pub fn take_listening_changes(&self) -> BTreeSet<u16> {
        std::mem::take(&mut *self.listening_changed.lock())
    }

    /// Whether the activator whose stats stream is at `addr` serves all of `ports`.
    /// Only a live stream's word counts: an activator that has not reported its
    /// listeners (an older version, or a stream that is down) is assumed to serve them,
    /// as every ready activator opens the listeners of the services it knows.
    pub fn serves(&self, addr: &SocketAddr, ports: &[u16]) -> bool {
        let all = self.activators.lock();
        match all.get(addr) {
            Some(st) if st.connected && st.last_report.elapsed() <= FRESH_FOR => {
                match &st.listening {
                    Some(set) => ports.iter().all(|p| set.contains(p)),
                    None => true,
                }
            }
            _ => true,
        }
    }

    pub fn apply(&self, addr: SocketAddr, report: Report) {
        let received = Instant::now();
        {
            let mut all = self.activators.lock();
            let st = all.entry(addr).or_insert_with(|| ActivatorState {
                instance: report.instance,
                connected: true,
                last_report: received,
                services: HashMap::new(),
                listening: None,
            });
            if report.full || st.instance != report.instance {
                st.services.clear();
            }
            if let Some(ports) = report.listening {
                let next: BTreeSet<u16> = ports.into_iter().collect();
                let changed: Vec<u16> = match &st.listening {
                    Some(prev) => prev.symmetric_difference(&next).copied().collect(),
                    None => next.iter().copied().collect(),
                };
                st.listening = Some(next);
                if !changed.is_empty() {
                    self.listening_changed.lock().extend(changed);
                    self.listening_notify.notify_one();
                }
            }
            st.instance = report.instance;
            st.connected = true;
            st.last_report = received;
            for s in report.services {
                let key = ServiceRef {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                };
                st.services.insert(key, s);
            }
        }
        for w in report.wake {
            // Bounded: a full channel means a wake for it is already queued or handled
            // by the next reconcile (queued > 0 counts as a wake there too).
            let _ = self.wake_tx.try_send((w, received));
        }
    }

    pub fn disconnected(&self, addr: SocketAddr) {
        if let Some(st) = self.activators.lock().get_mut(&addr) {
            st.connected = false;
        }
    }

    pub fn forget(&self, addr: &SocketAddr) {
        self.activators.lock().remove(addr);
    }

    /// Number of activators with a live stream.
    pub fn connected(&self) -> usize {
        self.activators
            .lock()
            .values()
            .filter(|s| s.connected)
            .count()
    }

    /// The load of one service summed over `activators` (the ready activator pods).
    /// `complete` is false when any of them has not reported recently.
    pub fn load(&self, key: &ServiceRef, activators: &[SocketAddr]) -> Load {
        let all = self.activators.lock();
        let now = Instant::now();
        let mut load = Load {
            complete: true,
            ..Default::default()
        };
        let mut last_ms = 0u64;
        for addr in activators {
            match all.get(addr) {
                Some(st) if st.connected && now.duration_since(st.last_report) <= FRESH_FOR => {}
                _ => load.complete = false,
            }
        }
        // Numbers of every activator we know count, stale or not (never lose load).
        for st in all.values() {
            if let Some(s) = st.services.get(key) {
                load.in_flight += s.in_flight;
                load.queued += s.queued;
                load.requests += s.requests;
                load.timeouts += s.timeouts;
                last_ms = last_ms.max(s.last_request_ms);
            }
        }
        if last_ms > 0 {
            load.last_request = Some(UNIX_EPOCH + Duration::from_millis(last_ms));
        }
        load
    }
}

impl StatsStore {
    /// Who kept one service awake, merged over every activator that reported it (the
    /// same client through two activators is one entry): most requests first, at most
    /// `top`.
    pub fn activity(&self, key: &ServiceRef, top: usize) -> Vec<Waker> {
        let all = self.activators.lock();
        let mut merged: Vec<Waker> = Vec::new();
        for st in all.values() {
            let Some(s) = st.services.get(key) else {
                continue;
            };
            for w in &s.activity {
                match merged.iter_mut().find(|m| {
                    m.client == w.client
                        && m.user_agent == w.user_agent
                        && m.method == w.method
                        && m.path == w.path
                }) {
                    Some(m) => {
                        m.count += w.count;
                        m.last_ms = m.last_ms.max(w.last_ms);
                    }
                    None => merged.push(w.clone()),
                }
            }
        }
        merged.sort_by(|a, b| b.count.cmp(&a.count).then(b.last_ms.cmp(&a.last_ms)));
        merged.truncate(top);
        merged
    }
}

/// Keeps one stream open to each address in `targets`.
pub async fn run(
    store: Arc<StatsStore>,
    mut targets: watch::Receiver<Vec<SocketAddr>>,
    shutdown: CancellationToken,
    token_file: Option<Arc<PathBuf>>,
) {
    let mut running: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    loop {
        let want: Vec<SocketAddr> = targets.borrow_and_update().clone();
        running.retain(|addr, token| {
            if want.contains(addr) {
                true
            } else {
                token.cancel();
                store.forget(addr);
                false
            }
        });
        for addr in want {
            running.entry(addr).or_insert_with(|| {
                let token = shutdown.child_token();
                tokio::spawn(follow(
                    store.clone(),
                    addr,
                    token.clone(),
                    token_file.clone(),
                ));
                token
            });
        }
        tokio::select! {
            r = targets.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn follow(
    store: Arc<StatsStore>,
    addr: SocketAddr,
    cancel: CancellationToken,
    token_file: Option<Arc<PathBuf>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let r = tokio::select! {
            r = stream_once(&store, addr, token_file.as_deref()) => r,
            _ = cancel.cancelled() => return,
        };
        store.disconnected(addr);
        match r {
            Ok(()) => debug!(%addr, "stats stream ended"),
            Err(e) => debug!(%addr, "stats stream: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(3));
    }
}

async fn stream_once(
    store: &StatsStore,
    addr: SocketAddr,
    token_file: Option<&PathBuf>,
) -> anyhow::Result<()> {
    // Read at every connection: the kubelet rotates the projected token.
    let token = match token_file {
        Some(f) => match tokio::fs::read_to_string(f).await {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) => {
                debug!(file = %f.display(), "stats token: {e}; connecting without one");
                None
            }
        },
        None => None,
    };
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await??;
    stream.set_nodelay(true)?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::get(STATS_PATH).header(http::header::HOST, addr.to_string());
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::<bytes::Bytes>::new())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await??;
    if matches!(resp.status().as_u16(), 401 | 403) {
        warn!(%addr, status = %resp.status(), "the activator refused the stats stream: is the projected token (--stats-token-file) mounted, and --stats-reader this ServiceAccount?");
    }
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    info!(%addr, "stats stream connected");
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(IDLE_TIMEOUT, body.frame()).await {
            Err(_) => anyhow::bail!("no report for {IDLE_TIMEOUT:?}"),
            Ok(None) => return Ok(()),
            Ok(Some(f)) => f?,
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line = buf.split_to(i + 1);
            match serde_json::from_slice::<Report>(&line[..i]) {
                Ok(r) => store.apply(addr, r),
                Err(e) => debug!(%addr, "bad stats line: {e}"),
            }
        }
        if buf.len() > MAX_LINE {
            buf.advance(buf.len());
            anyhow::bail!("stats line over {MAX_LINE} bytes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(instance: u64, full: bool, services: Vec<ServiceStats>) -> Report {
        Report {
            activator: "a".into(),
            instance,
            full,
            services,
            wake: vec![],
            listening: None,
        }
    }

    fn st(name: &str, in_flight: u64, last: u64) -> ServiceStats {
        ServiceStats {
            namespace: "ns".into(),
            name: name.into(),
            in_flight,
            queued: 0,
            requests: 1,
            last_request_ms: last,
            timeouts: 0,
            activity: vec![],
        }
    }

    #[test]
    fn activity_is_merged_over_activators() {
        let (tx, _rx) = mpsc::channel(8);
        let s = StatsStore::new(tx);
        let w = |client: &str, count, last_ms| Waker {
            client: client.into(),
            user_agent: "probe".into(),
            method: "GET".into(),
            path: "/".into(),
            count,
            last_ms,
        };
        let mut a = st("web", 0, 1);
        a.activity = vec![w("10.0.0.1", 3, 100), w("10.0.0.2", 1, 50)];
        let mut b = st("web", 0, 1);
        b.activity = vec![w("10.0.0.1", 4, 200), w("10.0.0.3", 5, 10)];
        s.apply("10.1.0.1:9090".parse().unwrap(), report(1, true, vec![a]));
        s.apply("10.1.0.2:9090".parse().unwrap(), report(2, true, vec![b]));
        let key = ServiceRef {
            namespace: "ns".into(),
            name: "web".into(),
        };
        let m = s.activity(&key, 2);
        assert_eq!(m, vec![w("10.0.0.1", 7, 200), w("10.0.0.3", 5, 10)]);
    }

    #[test]
    fn load_sums_activators_and_needs_all_fresh() {
        let (tx, _rx) = mpsc::channel(8);
        let s = StatsStore::new(tx);
        let a: SocketAddr = "10.0.0.1:9090".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:9090".parse().unwrap();
        let key = ServiceRef {
            namespace: "ns".into(),
            name: "web".into(),
        };
        s.apply(a, report(1, true, vec![st("web", 2, 1000)]));
        let l = s.load(&key, &[a, b]);
        assert!(!l.complete, "b has not reported");
        s.apply(b, report(2, true, vec![st("web", 3, 5000)]));
        let l = s.load(&key, &[a, b]);
        assert!(l.complete);
        assert_eq!(l.in_flight, 5);
        assert_eq!(
            l.last_request,
            Some(UNIX_EPOCH + Duration::from_millis(5000))
        );
        // A delta report only changes what it lists.
        s.apply(a, report(1, false, vec![st("web", 0, 1000)]));
        assert_eq!(s.load(&key, &[a, b]).in_flight, 3);
        s.disconnected(b);
        assert!(!s.load(&key, &[a, b]).complete);
    }

    #[test]
    fn wake_is_forwarded_at_once() {
        let (tx, mut rx) = mpsc::channel(8);
        let s = StatsStore::new(tx);
        let mut r = report(1, false, vec![]);
        r.wake = vec![ServiceRef {
            namespace: "ns".into(),
            name: "web".into(),
        }];
        s.apply("10.0.0.1:9090".parse().unwrap(), r);
        assert_eq!(rx.try_recv().unwrap().0.name, "web");
    }

    #[test]
    fn serves_only_reported_ports_of_a_live_stream() {
        let (tx, _rx) = mpsc::channel(8);
        let s = StatsStore::new(tx);
        let a: SocketAddr = "10.0.0.1:9090".parse().unwrap();
        // Never heard of, or not saying: assumed to serve (ready activators open the
        // listeners of every service they know before they report ready).
        assert!(s.serves(&a, &[20000]));
        s.apply(a, report(1, true, vec![]));
        assert!(s.serves(&a, &[20000]));
        assert!(s.take_listening_changes().is_empty());

        let mut r = report(1, true, vec![]);
        r.listening = Some(vec![20000]);
        s.apply(a, r);
        assert!(s.serves(&a, &[20000]));
        assert!(!s.serves(&a, &[20000, 20001]), "20001 is not open yet");
        assert_eq!(s.take_listening_changes(), BTreeSet::from([20000]));

        // A delta report without `listening` leaves the set as it was.
        s.apply(a, report(1, false, vec![]));
        assert!(!s.serves(&a, &[20001]));
        let mut r = report(1, false, vec![]);
        r.listening = Some(vec![20001]);
        s.apply(a, r);
        assert!(s.serves(&a, &[20001]) && !s.serves(&a, &[20000]));
        assert_eq!(s.take_listening_changes(), BTreeSet::from([20000, 20001]));
        assert!(s.take_listening_changes().is_empty());

        // A stream that is down is not trusted either way.
        s.disconnected(a);
        assert!(s.serves(&a, &[20000]));
    }
}
