//! The activator's side of the stats stream (see `snooze_crds::stats`): a report every
//! second with the services whose numbers changed, a full one on connect, and one at
//! once when a request finds no ready pod (`wake`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use snooze_crds::stats::{Report, ServiceRef, ServiceStats};
use tokio::sync::{broadcast, watch};
use tokio::time::{Interval, MissedTickBehavior};

use crate::table::{ServiceEntry, Table};

pub struct StatsHub {
    table: Arc<Table>,
    activator: String,
    instance: u64,
    wake_tx: broadcast::Sender<ServiceRef>,
    /// Ports with an open listener (sorted).
    listening: watch::Sender<Vec<u16>>,
    interval: Duration,
}

impl StatsHub {
    pub fn new(table: Arc<Table>, activator: String, interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            table,
            activator,
            instance: rand::random(),
            wake_tx: broadcast::channel(1024).0,
            listening: watch::channel(Vec::new()).0,
            interval,
        })
    }

    /// Tells the operator at once that `svc` has requests waiting for a pod.
    pub fn wake(&self, svc: &ServiceEntry) {
        svc.metrics.wakes.inc();
        let _ = self.wake_tx.send(svc.key.clone());
    }

    /// Records the ports with an open listener; a change is reported at once.
    pub fn set_listening(&self, mut ports: Vec<u16>) {
        ports.sort_unstable();
        self.listening.send_if_modified(|cur| {
            if *cur != ports {
                *cur = ports;
                true
            } else {
                false
            }
        });
    }

    fn report(
        &self,
        full: bool,
        last: &mut HashMap<ServiceRef, ServiceStats>,
        wake: Vec<ServiceRef>,
        listening: Option<Vec<u16>>,
    ) -> Bytes {
        crate::admit::sync_wall_clock();
        let services = self.table.services();
        let mut out = Vec::new();
        let mut seen = HashMap::with_capacity(services.len());
        for s in services {
            let st = s.stats();
            if full || last.get(&s.key) != Some(&st) {
                out.push(st.clone());
            }
            seen.insert(s.key.clone(), st);
        }
        *last = seen;
        let report = Report {
            activator: self.activator.clone(),
            instance: self.instance,
            full,
            services: out,
            wake,
            listening,
        };
        let mut line = serde_json::to_vec(&report).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }

    /// The body of one `GET /v1/stats` response; ends when the client goes away.
    pub fn stream(self: Arc<Self>) -> impl Stream<Item = Bytes> + Send + 'static {
        struct State {
            hub: Arc<StatsHub>,
            last: HashMap<ServiceRef, ServiceStats>,
            tick: Interval,
            wake_rx: broadcast::Receiver<ServiceRef>,
            listening_rx: watch::Receiver<Vec<u16>>,
            first: bool,
        }
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let state = State {
            wake_rx: self.wake_tx.subscribe(),
            listening_rx: self.listening.subscribe(),
            hub: self,
            last: HashMap::new(),
            tick,
            first: true,
        };
        futures::stream::unfold(state, |mut st| async move {
            if st.first {
                st.first = false;
                st.tick.reset();
                let ports = st.listening_rx.borrow_and_update().clone();
                let line = st.hub.report(true, &mut st.last, vec![], Some(ports));
                return Some((line, st));
            }
            let line = tokio::select! {
                _ = st.tick.tick() => st.hub.report(false, &mut st.last, vec![], None),
                r = st.listening_rx.changed() => match r {
                    Ok(()) => {
                        let ports = st.listening_rx.borrow_and_update().clone();
                        st.hub.report(false, &mut st.last, vec![], Some(ports))
                    }
                    Err(_) => return None,
                },
                w = st.wake_rx.recv() => match w {
                    Ok(first) => {
                        let mut wake = vec![first];
                        while let Ok(more) = st.wake_rx.try_recv() {
                            if !wake.contains(&more) { wake.push(more); }
                        }
                        st.hub.report(false, &mut st.last, wake, None)
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let ports = st.listening_rx.borrow_and_update().clone();
                        st.hub.report(true, &mut st.last, vec![], Some(ports))
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            };
            Some((line, st))
        })
    }
}
