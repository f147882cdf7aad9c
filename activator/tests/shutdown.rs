//! The activator binary's shutdown: on SIGTERM it reports not ready at once, keeps
//! serving for the drain delay, lets in-flight requests finish, and exits cleanly.

use std::convert::Infallible;
use std::net::TcpListener as StdListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_turns_not_ready() {
    // A backend whose /slow answers after 1.5 s.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_port = backend.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_millis(1500)).await;
                        }
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"done",
                        ))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let (port, admin) = (free_port(), free_port());
    let cfg = std::env::temp_dir().join(format!("snooze-shutdown-{port}.json"));
    std::fs::write(
        &cfg,
        format!(r#"{{"services": [{{"namespace": "t", "name": "web", "port": {port}, "endpoints": ["127.0.0.1:{backend_port}"]}}]}}"#),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_snooze-activator"))
        .args([
            "--static-config",
            cfg.to_str().unwrap(),
            "--listen-address",
            "127.0.0.1",
        ])
        .args([
            "--admin-address",
            &format!("127.0.0.1:{admin}"),
            "--drain-delay",
            "1s",
            "--grace-period",
            "5s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while get(admin, "/readyz").await.map(|r| r.0) != Ok(200) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "activator never ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let slow = tokio::spawn(get(port, "/slow"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get(admin, "/readyz").await.unwrap().0,
        503,
        "not ready right after SIGTERM"
    );
    // Still serving during the drain delay.
    assert_eq!(get(port, "/").await.unwrap(), (200, "done".to_string()));
    // The request in flight when SIGTERM came is answered.
    assert_eq!(slow.await.unwrap().unwrap(), (200, "done".to_string()));
    // And the process exits by itself, cleanly, well within drain delay + grace.
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(8),
            "still running 8s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_file(cfg);
}
