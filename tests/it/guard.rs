//! The framing guard in front of a real hyper HTTP/1 server, wired the way the listener must
//! wire it: the service counts requests and answers `rejection_for(index)` itself.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use skyline::http1::guard::{Guarded, Limits, Verdicts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn answer(
    req: Request<Incoming>,
    index: u64,
    verdicts: Verdicts,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // A service that is not ready on its first poll, like the real forwarder.
    tokio::time::sleep(Duration::from_millis(5)).await;
    if let Some(rejection) = verdicts.rejection_for(index) {
        let mut resp = Response::new(Full::new(Bytes::from(rejection.reason)));
        *resp.status_mut() = rejection.status;
        resp.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        return Ok(resp);
    }
    let path = req.uri().path().to_owned();
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        // The forwarder checks the verdicts when a body fails.
        Err(_) => {
            let reason = verdicts
                .rejection_for(index)
                .map_or("body error", |r| r.reason);
            let mut resp = Response::new(Full::new(Bytes::from(reason)));
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            return Ok(resp);
        }
    };
    Ok(Response::new(Full::new(Bytes::from(format!(
        "{path} {}",
        body.len()
    )))))
}

/// Serves one connection through the guard; returns the server address.
async fn spawn_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (guarded, verdicts) = Guarded::new(socket, Limits::default());
                let counter = Arc::new(AtomicU64::new(0));
                let service = service_fn(move |req| {
                    let index = counter.fetch_add(1, Ordering::Relaxed);
                    answer(req, index, verdicts.clone())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(Limits::default().max_head * 2)
                    .serve_connection(TokioIo::new(guarded), service)
                    .await;
            });
        }
    });
    addr
}

/// Sends raw bytes and reads until the server closes (or 5 s pass).
async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn statuses(response: &str) -> Vec<&str> {
    response
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|r| r.get(..3).unwrap_or(r))
        .collect()
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_answered_400_and_closed() {
    let addr = spawn_server().await;
    let response = exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&response), ["400"], "{response}");
    assert!(
        response.contains("content-length with transfer-encoding"),
        "{response}"
    );
    assert!(!response.contains("/smuggled"), "{response}");
}

#[tokio::test]
async fn pipelined_valid_requests_are_answered_before_the_bad_one() {
    let addr = spawn_server().await;
    let response = exchange(
        addr,
        b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nPOST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /three HTTP/1.1\nHost: a\r\n\r\nGET /four HTTP/1.1\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&response), ["200", "200", "400"], "{response}");
    assert!(
        response.contains("/one 0") && response.contains("/two 3"),
        "{response}"
    );
    assert!(
        response.contains("bare lf in head") && !response.contains("/four"),
        "{response}"
    );
}

#[tokio::test]
async fn oversized_heads_get_431_and_414() {
    let addr = spawn_server().await;
    let many = format!(
        "GET / HTTP/1.1\r\n{}\r\n",
        (0..101)
            .map(|i| format!("x-{i}: v\r\n"))
            .collect::<String>()
    );
    assert_eq!(statuses(&exchange(addr, many.as_bytes()).await), ["431"]);
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
    assert_eq!(statuses(&exchange(addr, long.as_bytes()).await), ["414"]);
}

#[tokio::test]
async fn a_broken_chunked_body_is_answered_400() {
    let addr = spawn_server().await;
    let response = exchange(
        addr,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF\r\n",
    )
    .await;
    assert_eq!(statuses(&response), ["400"], "{response}");
    assert!(response.contains("chunk size overflow"), "{response}");
}

#[tokio::test]
async fn valid_chunked_request_with_trailers_is_served() {
    let addr = spawn_server().await;
    let response = exchange(
        addr,
        b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;x=y\r\nhello\r\n0\r\nX-T: v\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&response), ["200"], "{response}");
    assert!(response.ends_with("/c 5"), "{response}");
}
