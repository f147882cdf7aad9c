//! The admin server of both binaries: `/livez`, `/readyz` (from a `watch` flag),
//! `/metrics` (OpenMetrics text from the binary's registry) and any routes of the
//! binary's own (the activator's stats stream).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
/// A binary's own routes: `None` for a path it does not serve.
pub type Routes = Box<dyn Fn(&Request<Incoming>) -> Option<Response<Body>> + Send + Sync>;

/// A short plain-text answer.
pub fn text(status: StatusCode, msg: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(msg.into()).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub struct Admin {
    /// True while the process should receive work.
    pub ready: watch::Receiver<bool>,
    /// The metrics in OpenMetrics text.
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
    pub routes: Option<Routes>,
}

impl Admin {
    pub fn handle(&self, req: &Request<Incoming>) -> Response<Body> {
        if let Some(r) = self.routes.as_ref().and_then(|f| f(req)) {
            return r;
        }
        match req.uri().path() {
            "/livez" => text(StatusCode::OK, "ok\n"),
            "/readyz" if *self.ready.borrow() => text(StatusCode::OK, "ready\n"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            "/metrics" => {
                let mut r = text(StatusCode::OK, (self.metrics)());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Serves until the task is dropped; accept errors are logged and retried.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> anyhow::Result<()> {
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
