//! Slow clients: connections that send a request head and never finish it (a flood on
//! an admin port, for the tenancy test's pod and bench/admin.sh).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Opens `n` connections to `addr`, one after another, each bound to `source(i)` when
/// it names an address, each sending a head it never finishes. Returns the connected
/// ones and how many could not connect (within 2 s each).
pub async fn open(
    addr: SocketAddr,
    n: usize,
    source: impl Fn(usize) -> Option<IpAddr>,
) -> (Vec<TcpStream>, usize) {
    let mut open = Vec::with_capacity(n);
    let mut failed = 0usize;
    for i in 0..n {
        let connect = async {
            let s = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if let Some(from) = source(i) {
                s.bind(SocketAddr::new(from, 0))?;
            }
            let mut c = s.connect(addr).await?;
            // Connected is opened: a server that closes it at once may make the write
            // fail, which is what is being counted.
            let _ = c.write_all(b"GET /readyz HTTP/1.1\r\nhost: x").await;
            Ok::<_, std::io::Error>(c)
        };
        match tokio::time::timeout(Duration::from_secs(2), connect).await {
            Ok(Ok(c)) => open.push(c),
            _ => failed += 1,
        }
    }
    (open, failed)
}

/// How many of `conns` the server has closed (a read that ends at once).
pub async fn closed(conns: &mut [TcpStream]) -> usize {
    let mut closed = 0;
    for c in conns {
        let mut b = [0u8; 1];
        if matches!(
            tokio::time::timeout(Duration::from_millis(1), c.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        ) {
            closed += 1;
        }
    }
    closed
}
