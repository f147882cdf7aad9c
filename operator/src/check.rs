//! `snooze-operator --check-services A,B`: the chart's `helm test`. For each named
//! Service in the pod's namespace, every ready endpoint of its EndpointSlices must
//! answer `GET /readyz` on the port named `admin` with 200, and there must be at least
//! one. Endpoints, not the ClusterIP: it works with or without kube-proxy and DNS.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client};

/// The `admin` addresses of the ready endpoints of `service` (pure).
pub fn admin_addresses(slices: &[EndpointSlice]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in slices {
        let Some(port) = s
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("admin"))
            .and_then(|p| u16::try_from(p.port?).ok())
        else {
            continue;
        };
        for e in &s.endpoints {
            if e.conditions.as_ref().and_then(|c| c.ready) != Some(true) {
                continue;
            }
            for a in &e.addresses {
                if let Ok(ip) = a.parse() {
                    out.push(SocketAddr::new(ip, port));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

async fn readyz(addr: SocketAddr) -> Result<u16, String> {
    let go = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get("/readyz")
            .header("host", addr.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    };
    tokio::time::timeout(Duration::from_secs(5), go)
        .await
        .map_err(|_| "no answer within 5s".to_string())?
}

/// Checks every Service; an error names what failed.
pub async fn run(client: Client, namespace: &str, services: &[String]) -> anyhow::Result<()> {
    let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
    let mut failed = Vec::new();
    for svc in services {
        let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={svc}"));
        let addrs = admin_addresses(&api.list(&lp).await?.items);
        if addrs.is_empty() {
            failed.push(format!("{svc}: no ready endpoint"));
        }
        for a in addrs {
            match readyz(a).await {
                Ok(200) => println!("{svc}: {a} ready"),
                Ok(code) => failed.push(format!("{svc}: {a} answered {code}")),
                Err(e) => failed.push(format!("{svc}: {a}: {e}")),
            }
        }
    }
    anyhow::ensure!(failed.is_empty(), "{}", failed.join("; "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_ready_endpoints_on_the_admin_port() {
        let slices: Vec<EndpointSlice> = serde_json::from_value(json!([
            {"metadata": {"name": "a"}, "addressType": "IPv4",
             "ports": [{"name": "admin", "port": 9090}, {"name": "other", "port": 1}],
             "endpoints": [
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}}]},
            {"metadata": {"name": "b"}, "addressType": "IPv4",
             "ports": [{"name": "http", "port": 80}],
             "endpoints": [{"addresses": ["10.0.0.9"], "conditions": {"ready": true}}]}
        ]))
        .unwrap();
        let got: Vec<String> = admin_addresses(&slices)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, vec!["10.0.0.1:9090", "10.0.0.2:9090"]);
    }
}
