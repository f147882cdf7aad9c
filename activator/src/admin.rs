//! The activator's admin port: the shared admin server (`/livez`, `/readyz`,
//! `/metrics`) plus the stats stream that the operator leader reads.

use std::sync::Arc;

use futures::StreamExt;
use http::{HeaderValue, Response, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use snooze_runtime::admin::{Admin, BoxError};
use snooze_runtime::auth::TokenCheck;
use tokio::sync::watch;

use crate::dispatch::pool::Pool;
use crate::metrics::Metrics;
use crate::stats::StatsHub;

/// The admin server: ready while `ready` is true; `/metrics` reads the pool's idle
/// connections at scrape time; the stats stream is for the operator alone when `auth`
/// is set (always in the chart); `/metrics` for the readers `metrics_auth` allows, when
/// set (`metrics.authorization` in the chart).
pub fn admin(
    metrics: Arc<Metrics>,
    pool: Arc<Pool>,
    stats: Arc<StatsHub>,
    ready: watch::Receiver<bool>,
    auth: Option<Arc<TokenCheck>>,
    metrics_auth: Option<Arc<TokenCheck>>,
) -> Arc<Admin> {
    let streams = metrics.stats_streams.clone();
    Arc::new(Admin {
        ready,
        metrics: Box::new(move || {
            metrics.pooled_connections.set(pool.idle_count(None) as i64);
            metrics.encode()
        }),
        metrics_auth,
        routes: Some(Box::new(move |req| {
            if req.uri().path() != snooze_crds::stats::STATS_PATH {
                return None;
            }
            let (stats, auth, streams) = (stats.clone(), auth.clone(), streams.clone());
            let headers = req.headers().clone();
            Some(Box::pin(async move {
                if let Some(auth) = auth
                    && let Err(refused) = auth.check(&headers).await
                {
                    return refused;
                }
                // Counted while the response body lives (the client reads it).
                streams.inc();
                let open = OpenStream(streams);
                let s = stats.stream().map(move |b| {
                    let _ = &open;
                    Ok::<_, BoxError>(Frame::data(b))
                });
                let mut r = Response::new(BodyExt::boxed(StreamBody::new(s)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                );
                r
            }))
        })),
    })
}

/// One open stats stream, uncounted when its body is dropped.
struct OpenStream(prometheus_client::metrics::gauge::Gauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}
