//! Malformed and ambiguous requests are refused with `x-skyline-error: bad-request` and never
//! reach an application. Each probe is raw bytes over TCP, sent to both listeners.

use crate::support::*;

/// (what, raw request, expected status)
fn probes() -> Vec<(&'static str, Vec<u8>, u16)> {
    let head = |extra: &str| format!("POST /service/web/x HTTP/1.1\r\nHost: n\r\n{extra}");
    let mut probes: Vec<(&'static str, Vec<u8>, u16)> = vec![
        (
            "content-length with transfer-encoding",
            head("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").into(),
            400,
        ),
        (
            "transfer-encoding with content-length",
            head("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n").into(),
            400,
        ),
        (
            "duplicate equal content-length",
            head("Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc").into(),
            400,
        ),
        (
            "duplicate different content-length",
            head("Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd").into(),
            400,
        ),
        (
            "content-length list",
            head("Content-Length: 3, 3\r\n\r\nabc").into(),
            400,
        ),
        (
            "signed content-length",
            head("Content-Length: +3\r\n\r\nabc").into(),
            400,
        ),
        (
            "non-numeric content-length",
            head("Content-Length: abc\r\n\r\n").into(),
            400,
        ),
        (
            "obfuscated transfer-encoding",
            head("Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n").into(),
            400,
        ),
        (
            "chunked then identity",
            head("Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n").into(),
            400,
        ),
        (
            "transfer-encoding on http/1.0",
            b"POST /service/web/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "invalid chunk size",
            head("Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n").into(),
            400,
        ),
        (
            "overflowing chunk size",
            head("Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF\r\nabc\r\n0\r\n\r\n").into(),
            400,
        ),
        (
            "chunk without its crlf",
            head("Transfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n").into(),
            400,
        ),
        (
            "bare lf line endings",
            b"GET /service/web/ HTTP/1.1\nHost: n\n\n".to_vec(),
            400,
        ),
        (
            "obs-fold",
            b"GET /service/web/ HTTP/1.1\r\nHost: n\r\nX-A: 1\r\n  folded\r\n\r\n".to_vec(),
            400,
        ),
        (
            "space before colon",
            b"GET /service/web/ HTTP/1.1\r\nHost : n\r\n\r\n".to_vec(),
            400,
        ),
        (
            "nul in a header",
            b"GET /service/web/ HTTP/1.1\r\nHost: n\r\nX-A: a\0b\r\n\r\n".to_vec(),
            400,
        ),
        (
            "invalid service name",
            b"GET /service/Bad!Name/ HTTP/1.1\r\nHost: n\r\n\r\n".to_vec(),
            400,
        ),
        (
            "encoded service name",
            b"GET /service/w%65b/ HTTP/1.1\r\nHost: n\r\n\r\n".to_vec(),
            400,
        ),
        (
            "not a skyline path",
            b"GET /admin HTTP/1.1\r\nHost: n\r\n\r\n".to_vec(),
            400,
        ),
        (
            // Not quite HTTP/2's preface (that one is served as HTTP/2: see grpc.rs).
            "broken http/2 preface over http/1",
            b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n".to_vec(),
            400,
        ),
    ];
    let long_line = format!(
        "GET /service/web/{} HTTP/1.1\r\nHost: n\r\n\r\n",
        "a".repeat(10_000)
    );
    probes.push(("request line too long", long_line.into(), 414));
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    probes.push((
        "too many headers",
        format!("GET /service/web/ HTTP/1.1\r\nHost: n\r\n{many}\r\n").into(),
        431,
    ));
    let huge = format!(
        "GET /service/web/ HTTP/1.1\r\nHost: n\r\nX-Big: {}\r\n\r\n",
        "b".repeat(70_000)
    );
    probes.push(("head too large", huge.into(), 431));
    probes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_on_both_listeners_and_never_forwarded() {
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(place("web", "b", &web))
        .spawn()
        .await;
    let mut failures = Vec::new();
    for listener in [mesh.outbound("a"), mesh.inbound("b")] {
        for (what, bytes, status) in probes() {
            let reply = raw(listener, &bytes).await;
            let first = reply.lines().next().unwrap_or("");
            let ok = first.starts_with(&format!("HTTP/1.1 {status} "))
                && reply
                    .to_ascii_lowercase()
                    .contains("x-skyline-error: bad-request");
            if !ok {
                failures.push(format!("{listener} {what}: got {first:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(
        web.hits(),
        0,
        "no malformed request reached the application"
    );
    mesh.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_behind_a_good_one_is_refused_and_the_connection_closed() {
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(place("web", "b", &web))
        .spawn()
        .await;
    let pipelined = b"GET /service/web/one HTTP/1.1\r\nHost: n\r\n\r\n\
        POST /service/web/two HTTP/1.1\r\nHost: n\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx\
        GET /service/web/three HTTP/1.1\r\nHost: n\r\n\r\n";
    let reply = raw(mesh.outbound("a"), pipelined).await;
    // Bodies have no trailing newline: find status lines anywhere.
    let statuses: Vec<&str> = reply
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &reply[i..i + 12])
        .collect();
    assert_eq!(statuses.len(), 2, "{reply}");
    assert!(statuses[0].starts_with("HTTP/1.1 200"), "{reply}");
    assert!(statuses[1].starts_with("HTTP/1.1 400"), "{reply}");
    let targets: Vec<String> = web.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/one"], "nothing after the bad request is read");
    mesh.stop().await;
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_goes_silent_after_its_preface_is_pinged_then_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = TestMesh::builder().node("a", "127.0.0.2").spawn().await;
    let mut stream = tokio::net::TcpStream::connect(mesh.outbound("a"))
        .await
        .unwrap();
    // The preface and an empty SETTINGS frame; then nothing, not even a PING's answer.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        stream.read_to_end(&mut got),
    )
    .await;
    assert!(
        closed.is_ok(),
        "still open after 60 s ({} bytes read)",
        got.len()
    );
    // Frames came first: the server's SETTINGS and at least one PING (type 6).
    let mut at = 0;
    let mut types = Vec::new();
    while at + 9 <= got.len() {
        let len =
            usize::from(got[at]) << 16 | usize::from(got[at + 1]) << 8 | usize::from(got[at + 2]);
        types.push(got[at + 3]);
        at += 9 + len;
    }
    assert!(
        types.contains(&4) && types.contains(&6),
        "frame types {types:?}"
    );
    println!("closed after {:?}, frames {types:?}", started.elapsed());
    mesh.stop().await;
}
