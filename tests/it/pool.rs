//! Keep-alive pools to upstreams: reused while open, and a connection the upstream closed while
//! idle never costs a request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;
use skyline::catalog::Health;

/// An upstream that answers `requests_per_conn` requests per connection, then closes it
/// silently (no `connection: close`), as servers with a short keep-alive timeout do.
async fn closing_upstream(ip: &str, requests_per_conn: usize) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind((ip.parse::<std::net::IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                let mut answered = 0;
                while answered < requests_per_conn {
                    let Ok(n) = stream.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                        answered += 1;
                    }
                }
                // Close while the proxy holds the connection idle in its pool.
                tokio::time::sleep(Duration::from_millis(5)).await;
            });
        }
    });
    (addr, connections)
}

fn placement(addr: SocketAddr) -> Placement {
    Placement {
        service: "web",
        node: "b",
        addr,
        health: Health::Passing,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_upstream_connection() {
    let (addr, connections) = closing_upstream("127.0.0.3", usize::MAX).await;
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(placement(addr))
        .spawn()
        .await;
    let client = Client::new();
    for _ in 0..50 {
        assert_eq!(
            client
                .get(&format!("http://{}/service/web/", mesh.outbound("a")))
                .await
                .body,
            "ok"
        );
    }
    assert_eq!(
        connections.load(Ordering::Relaxed),
        1,
        "keep-alive to the instance"
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_idle_connections_never_fails_a_request() {
    let (addr, connections) = closing_upstream("127.0.0.3", 1).await;
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(placement(addr))
        .spawn()
        .await;
    let client = Client::new();
    for i in 0..60u64 {
        let reply = client
            .get(&format!("http://{}/service/web/", mesh.outbound("a")))
            .await;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "ok"),
            "request {i}: {reply:?}"
        );
        // Vary the gap so some requests race the upstream's close.
        tokio::time::sleep(Duration::from_millis(i % 8)).await;
    }
    assert!(
        connections.load(Ordering::Relaxed) >= 60,
        "one connection per request upstream"
    );
    mesh.stop().await;
}
