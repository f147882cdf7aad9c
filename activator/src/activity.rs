//! Who keeps a service awake: per service, a small bounded summary of the requests that
//! counted as activity in the current idle window, grouped by who sent them (client
//! address, User-Agent, method, path without the query). The operator merges the
//! activators' summaries into `status.activity` (DESIGN.md, "Why is it awake, when will it sleep, and by hand").
//!
//! Bounded whatever the traffic: at most [`MAX_CLIENTS`] entries per service, each field
//! cut at [`MAX_FIELD`] bytes. A new client when the summary is full takes the place of
//! one whose last request left the idle window, else of the one with the fewest
//! requests (the oldest of them): a client sending more than about one request in
//! [`MAX_CLIENTS`] (a probe, a cron job) stays listed however many one-off clients come,
//! and they take turns in the other places. Counts of listed entries are exact since
//! they were listed.
//!
//! Must not: keep bodies, query strings or headers other than these.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use snooze_crds::stats::Waker;

/// Most entries per service in one activator.
pub const MAX_CLIENTS: usize = 16;
/// Longest User-Agent or path kept, in bytes.
pub const MAX_FIELD: usize = 128;

static ON: AtomicBool = AtomicBool::new(true);

/// Turns the summaries on or off for the whole process (`--activity-summary`).
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether requests are recorded.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// One request (or TCP connection) that counted as activity, as the data path saw it.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub client: IpAddr,
    pub agent: &'a [u8],
    pub method: &'a [u8],
    /// The request target's path; what follows `?` or `#` is never kept.
    pub path: &'a [u8],
}

impl<'a> Seen<'a> {
    /// A TCP connection: no agent, method `TCP`, no path.
    pub fn tcp(client: IpAddr) -> Self {
        Self {
            client,
            agent: b"",
            method: b"TCP",
            path: b"",
        }
    }

    /// The client behind a trusted proxy: the last address of its `X-Forwarded-For`
    /// (the one the proxy added); `peer` otherwise, or when that is not an address.
    pub fn client_of(peer: IpAddr, trusted: bool, forwarded_for: Option<&[u8]>) -> IpAddr {
        if !trusted {
            return peer;
        }
        forwarded_for
            .and_then(|v| v.rsplit(|b| *b == b',').next())
            .and_then(|last| std::str::from_utf8(last).ok())
            .and_then(|s| s.trim().parse::<IpAddr>().ok())
            .map_or(peer, |ip| ip.to_canonical())
    }
}

fn cut(b: &[u8]) -> &[u8] {
    &b[..b.len().min(MAX_FIELD)]
}

fn path_only(target: &[u8]) -> &[u8] {
    let end = target
        .iter()
        .position(|b| *b == b'?' || *b == b'#')
        .unwrap_or(target.len());
    cut(&target[..end])
}

struct Entry {
    client: IpAddr,
    agent: Box<[u8]>,
    method: Box<[u8]>,
    path: Box<[u8]>,
    count: u64,
    last_ms: u64,
}

/// The summary of one service in one activator.
#[derive(Default)]
pub struct Activity {
    entries: Vec<Entry>,
}

impl Activity {
    /// Counts one request. `window_ms` gives the service's idle timeout (called only
    /// when the summary is full): an entry whose last request is older no longer holds
    /// the service awake.
    pub fn record(&mut self, seen: &Seen, now_ms: u64, window_ms: impl FnOnce() -> u64) {
        let (agent, path) = (cut(seen.agent), path_only(seen.path));
        let method = cut(seen.method);
        if let Some(e) = self.entries.iter_mut().find(|e| {
            e.client == seen.client
                && *e.path == *path
                && *e.agent == *agent
                && *e.method == *method
        }) {
            e.count += 1;
            e.last_ms = e.last_ms.max(now_ms);
            return;
        }
        if self.entries.len() >= MAX_CLIENTS {
            let cutoff = now_ms.saturating_sub(window_ms());
            let victim = match self.entries.iter().position(|e| e.last_ms < cutoff) {
                Some(i) => i,
                None => {
                    let (i, _) = self
                        .entries
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, e)| (e.count, e.last_ms))
                        .expect("the summary is full, so not empty");
                    i
                }
            };
            self.entries.swap_remove(victim);
        }
        self.entries.push(Entry {
            client: seen.client,
            agent: agent.into(),
            method: method.into(),
            path: path.into(),
            count: 1,
            last_ms: now_ms,
        });
    }

    /// The entries whose last request is within the window, most requests first;
    /// older ones are dropped.
    pub fn snapshot(&mut self, now_ms: u64, window_ms: u64) -> Vec<Waker> {
        let cutoff = now_ms.saturating_sub(window_ms);
        self.entries.retain(|e| e.last_ms >= cutoff);
        let mut out: Vec<Waker> = self
            .entries
            .iter()
            .map(|e| Waker {
                client: e.client.to_string(),
                user_agent: String::from_utf8_lossy(&e.agent).into_owned(),
                method: String::from_utf8_lossy(&e.method).into_owned(),
                path: String::from_utf8_lossy(&e.path).into_owned(),
                count: e.count,
                last_ms: e.last_ms,
            })
            .collect();
        out.sort_by(|a, b| b.count.cmp(&a.count).then(b.last_ms.cmp(&a.last_ms)));
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen<'a>(ip: &str, agent: &'a [u8], path: &'a [u8]) -> Seen<'a> {
        Seen {
            client: ip.parse().unwrap(),
            agent,
            method: b"GET",
            path,
        }
    }

    #[test]
    fn groups_by_client_agent_method_and_path_without_query() {
        let mut a = Activity::default();
        for i in 0..5 {
            a.record(
                &seen("10.0.0.1", b"kube-probe/1.33", b"/healthz?x=1"),
                1000 + i,
                || 60_000,
            );
        }
        a.record(&seen("10.0.0.2", b"curl/8", b"/"), 2000, || 60_000);
        let s = a.snapshot(3000, 60_000);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (
                s[0].client.as_str(),
                s[0].user_agent.as_str(),
                s[0].path.as_str()
            ),
            ("10.0.0.1", "kube-probe/1.33", "/healthz")
        );
        assert_eq!((s[0].count, s[0].last_ms), (5, 1004));
        assert_eq!(s[1].count, 1);
    }

    #[test]
    fn bounded_and_a_steady_client_stays_listed_under_100000_distinct_clients() {
        let mut a = Activity::default();
        let long = vec![b'x'; 10_000];
        for i in 0..100_000u32 {
            // A probe every 10 requests, and a flood of one-off clients with long
            // agents and paths.
            if i % 10 == 0 {
                a.record(
                    &seen("10.0.0.9", b"kube-probe/1.33", b"/healthz"),
                    u64::from(i),
                    || 1 << 40,
                );
            }
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            a.record(
                &Seen {
                    client: ip,
                    agent: &long,
                    method: b"GET",
                    path: &long,
                },
                u64::from(i),
                || 1 << 40,
            );
            assert!(a.len() <= MAX_CLIENTS);
        }
        let s = a.snapshot(100_000, 1 << 40);
        assert!(s.len() <= MAX_CLIENTS);
        assert_eq!(s[0].user_agent, "kube-probe/1.33");
        assert_eq!(s[0].count, 10_000);
        assert!(
            s.iter()
                .all(|w| w.path.len() <= MAX_FIELD && w.user_agent.len() <= MAX_FIELD)
        );
    }

    #[test]
    fn entries_leave_with_the_idle_window() {
        let mut a = Activity::default();
        a.record(&seen("10.0.0.1", b"a", b"/"), 1_000, || 10_000);
        a.record(&seen("10.0.0.2", b"b", b"/"), 9_000, || 10_000);
        let s = a.snapshot(15_000, 10_000);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].user_agent, "b");
        // A full summary gives an expired entry's place first.
        let mut a = Activity::default();
        a.record(&seen("10.0.0.1", b"old", b"/"), 0, || 10_000);
        a.record(&seen("10.0.0.1", b"old", b"/"), 0, || 10_000);
        for i in 0..MAX_CLIENTS as u8 - 1 {
            a.record(&seen("10.0.1.1", &[b'a' + i], b"/"), 20_000, || 10_000);
            a.record(&seen("10.0.1.1", &[b'a' + i], b"/"), 20_000, || 10_000);
        }
        a.record(&seen("10.0.2.1", b"new", b"/"), 20_001, || 10_000);
        let s = a.snapshot(20_001, 10_000);
        assert!(s.iter().any(|w| w.user_agent == "new"));
        assert!(!s.iter().any(|w| w.user_agent == "old"));
    }

    #[test]
    fn forwarded_client_only_from_a_trusted_proxy() {
        let peer: IpAddr = "10.1.0.1".parse().unwrap();
        let xff: &[u8] = b"203.0.113.7, 198.51.100.2";
        assert_eq!(Seen::client_of(peer, false, Some(xff)), peer);
        assert_eq!(
            Seen::client_of(peer, true, Some(xff)),
            "198.51.100.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(Seen::client_of(peer, true, Some(b"junk")), peer);
        assert_eq!(Seen::client_of(peer, true, None), peer);
    }
}
