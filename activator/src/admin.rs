//! The admin port: `/livez`, `/readyz`, `/metrics` and the stats stream for the
//! operator.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::StreamExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

use crate::metrics::Metrics;
use crate::proxy::{Body, text};
use crate::stats::StatsHub;

pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub stats: Arc<StatsHub>,
    /// True once the watches have synced and until shutdown begins.
    pub ready: watch::Receiver<bool>,
}

impl Admin {
    fn handle(&self, req: &Request<Incoming>) -> Response<Body> {
        match req.uri().path() {
            "/livez" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => {
                if *self.ready.borrow() {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
                }
            }
            "/metrics" => {
                let mut r = text(StatusCode::OK, self.metrics.encode());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            snooze_crds::stats::STATS_PATH => {
                let s = self
                    .stats
                    .clone()
                    .stream()
                    .map(|b| Ok::<_, crate::proxy::BoxError>(Frame::data(b)));
                let mut r = Response::new(BodyExt::boxed(StreamBody::new(s)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-ndjson"),
                );
                r
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!("admin accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let r = me.handle(&req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
