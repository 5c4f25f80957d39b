//! `--peer-protocol h2`: every request between Skyline proxies (outbound → inbound,
//! outbound → gateway → bridge) travels over a few long-lived HTTP/2 connections per peer,
//! whatever the caller spoke; HTTP/1.1 callers still get HTTP/1.1 answers, upgrades stay on
//! HTTP/1.1. `--peer-protocol mux` (the default): HTTP/1.1 requests travel as streams of one
//! mesh link per peer (`skyline::mux`). The proxies run as processes; a counting TCP relay in
//! front of each peer's listener tells how many connections reached it and which of them
//! spoke HTTP/2 or the mesh link.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::*;
use crate::upgrade::{ClusterDns, WsEcho, exercise, ws_connect};
use skyline::proxy::h2::PEER_CONNECTIONS;
use skyline::serve::{self, Conn, Handler};

/// HTTP/2's connection preface, which a client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// === Relay ===

/// A TCP relay in front of a proxy's listener that counts the connections it accepts and how
/// many of them began with HTTP/2's preface.
struct Relay {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    http2: Arc<AtomicUsize>,
    links: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(ip: &str, to: SocketAddr) -> Self {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, http2, links): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
            Default::default();
        let (count, count_h2, count_links) = (
            Arc::clone(&accepted),
            Arc::clone(&http2),
            Arc::clone(&links),
        );
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let (count_h2, count_links) = (count_h2.clone(), count_links.clone());
                conns.spawn(async move {
                    // The first bytes, up to a preface's length, tell the protocol.
                    let mut first = Vec::new();
                    let mut buf = [0u8; 4096];
                    let prefaces = [PREFACE, skyline::mux::PREFACE];
                    while first.is_empty()
                        || prefaces
                            .iter()
                            .any(|p| first.len() < p.len() && p.starts_with(&first))
                    {
                        match client.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => first.extend_from_slice(&buf[..n]),
                        }
                    }
                    if first.starts_with(PREFACE) {
                        count_h2.fetch_add(1, Ordering::Relaxed);
                    }
                    if first.starts_with(skyline::mux::PREFACE) {
                        count_links.fetch_add(1, Ordering::Relaxed);
                    }
                    let Ok(mut upstream) = TcpStream::connect(to).await else {
                        return;
                    };
                    if upstream.write_all(&first).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        Self {
            addr,
            accepted,
            http2,
            links,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    fn http2(&self) -> usize {
        self.http2.load(Ordering::Relaxed)
    }

    /// Connections that opened with the mesh link's preface.
    fn links(&self) -> usize {
        self.links.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === EchoApp ===

/// An instance that records each request's headers and answers: `/echo` its request body,
/// `/chunked/<n>` [`chunked_body`]`(n)` without a length (so HTTP/1.1 frames it chunked),
/// `/slow/<ms>` after that long, anything else `ok <target>`.
#[derive(Clone)]
struct EchoApp {
    seen: Arc<Mutex<Vec<HeaderMap>>>,
}

/// `n` chunks of 10 000 bytes, each of one letter.
fn chunked_body(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| std::iter::repeat_n(b'a' + (i % 26) as u8, 10_000))
        .collect()
}

/// `len` bytes of a pattern, printable so a reply's text is the bytes.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'!' + (i % 90) as u8).collect()
}

impl Handler for EchoApp {
    type Body = BoxBody<Bytes, Infallible>;

    async fn handle(&self, req: Request<Incoming>, _conn: Conn) -> Response<Self::Body> {
        let (parts, body) = req.into_parts();
        self.seen.lock().unwrap().push(parts.headers.clone());
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path();
        if path == "/echo" {
            return Response::new(Full::new(body).boxed());
        }
        if let Some(n) = path.strip_prefix("/chunked/").and_then(|n| n.parse().ok()) {
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = chunked_body(n)
                .chunks(10_000)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            return Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
        }
        if let Some(ms) = path.strip_prefix("/slow/").and_then(|n| n.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let target = parts
            .uri
            .path_and_query()
            .map_or("/".into(), |p| p.to_string());
        Response::new(Full::new(Bytes::from(format!("ok {target}"))).boxed())
    }
}

/// An [`EchoApp`] listening on `ip`, until `stop`.
fn echo_app(ip: &str, stop: &CancellationToken) -> (SocketAddr, Arc<Mutex<Vec<HeaderMap>>>) {
    let listener = serve::bind(SocketAddr::new(self::ip(ip), 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let app = EchoApp {
        seen: Arc::default(),
    };
    let seen = app.seen.clone();
    tokio::spawn(serve::serve(listener, app, stop.clone()));
    (addr, seen)
}

// === TwoNodes ===

/// Agent a (127.0.0.2, outbound) and agent b (127.0.0.3, inbound on a socket held here, so it
/// can restart), both with `--peer-protocol <protocol>`; node b's inbound port in the catalog
/// is a [`Relay`]'s. Services on b: `web` (the given app), `down` (a port that refuses
/// connections), `probe` (an [`EchoApp`] of its own, asked until the agents route).
struct TwoNodes {
    dir: tempfile::TempDir,
    a: Skyline,
    b: Skyline,
    b_socket: std::net::TcpListener,
    outbound: SocketAddr,
    relay: Relay,
    protocol: &'static str,
    /// Stops `probe`, an [`EchoApp`] that tells when the agents route.
    probe_stop: CancellationToken,
}

impl TwoNodes {
    async fn start(protocol: &'static str, web: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let b_socket = supervised_socket("127.0.0.3");
        let relay = Relay::start("127.0.0.3", b_socket.local_addr().unwrap()).await;
        let down = std::net::TcpListener::bind("127.0.0.3:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let probe_stop = CancellationToken::new();
        let (probe, _) = echo_app("127.0.0.3", &probe_stop);
        let catalog = dir.path().join("catalog.toml");
        std::fs::write(
            &catalog,
            format!(
                "[[node]]\nname = \"a\"\naddress = \"127.0.0.2\"\n\n\
                 [[node]]\nname = \"b\"\naddress = \"127.0.0.3\"\ninbound_port = {}\n\n\
                 [[service]]\nname = \"web\"\nnode = \"b\"\naddress = \"{}\"\nport = {}\n\n\
                 [[service]]\nname = \"down\"\nnode = \"b\"\nport = {}\n\n\
                 [[service]]\nname = \"probe\"\nnode = \"b\"\nport = {}\n",
                relay.addr.port(),
                web.ip(),
                web.port(),
                down.port(),
                probe.port()
            ),
        )
        .unwrap();
        let args = Self::args("a", "127.0.0.2", &dir, protocol, true);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut a = Skyline::start(&args, &[]);
        let started = a.log.wait_for("agent started").await;
        let outbound = started["outbound"].as_str().unwrap().parse().unwrap();
        let b = Self::start_b(&dir, protocol, &b_socket).await;
        let nodes = TwoNodes {
            dir,
            a,
            b,
            b_socket,
            outbound,
            relay,
            protocol,
            probe_stop,
        };
        until_ok(&format!("http://{outbound}/service/probe/")).await;
        nodes
    }

    fn args(
        node: &str,
        ip: &str,
        dir: &tempfile::TempDir,
        protocol: &str,
        outbound: bool,
    ) -> Vec<String> {
        let catalog = dir.path().join("catalog.toml");
        let mut args: Vec<String> = [
            "agent",
            "--node-name",
            node,
            "--node-address",
            ip,
            "--inbound",
            "off",
            "--admin",
            "off",
            "--catalog",
            "file",
            "--catalog-file",
            catalog.to_str().unwrap(),
            "--peer-protocol",
            protocol,
            "--outbound",
        ]
        .map(str::to_owned)
        .to_vec();
        args.push(if outbound {
            format!("{ip}:0")
        } else {
            "off".into()
        });
        args
    }

    /// Starts agent b on its socket (again, after a restart).
    async fn start_b(
        dir: &tempfile::TempDir,
        protocol: &str,
        socket: &std::net::TcpListener,
    ) -> Skyline {
        let args = Self::args("b", "127.0.0.3", dir, protocol, false);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut b = Skyline::start(&args, &[("inbound", socket)]);
        b.log.wait_for("agent started").await;
        b
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}/service/{path}", self.outbound)
    }

    async fn stop(self) {
        for agent in [&self.a, &self.b] {
            agent.sigterm();
        }
        self.a.exited_cleanly().await;
        self.b.exited_cleanly().await;
        self.probe_stop.cancel();
    }
}

/// A GET, a 1 MiB POST and a chunked answer through `url(service)`, each byte-exact, the
/// answers in HTTP/1.1 (the chunked one still chunked).
async fn get_post_and_chunked(url: impl Fn(&str) -> String) {
    let client = Client::new();
    let reply = client.get(&url("web/hello?x=1&y=%20")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "ok /hello?x=1&y=%20");

    let payload = pattern(1 << 20);
    let req = Request::post(url("web/echo"))
        .body(Full::new(Bytes::from(payload.clone())))
        .unwrap();
    let reply = client.send(req).await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), payload.len());
    assert!(
        reply.body.as_bytes() == payload,
        "the 1 MiB body came back intact"
    );
    assert_eq!(
        reply.headers["content-length"], "1048576",
        "{:?}",
        reply.headers
    );

    let reply = client.get(&url("web/chunked/30")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply
            .headers
            .get("transfer-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("chunked"),
        "{:?}",
        reply.headers
    );
    assert!(
        reply.body.as_bytes() == chunked_body(30),
        "the chunked answer is intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_peer_protocol_h2_http1_get_post_and_chunked_answers_cross_outbound_and_inbound_over_http2_byte_exact()
 {
    let stop = CancellationToken::new();
    let (web, _) = echo_app("127.0.0.3", &stop);
    let nodes = TwoNodes::start("h2", web).await;
    get_post_and_chunked(|path| nodes.url(path)).await;
    assert!(nodes.relay.accepted() >= 1);
    assert_eq!(
        nodes.relay.http2(),
        nodes.relay.accepted(),
        "every connection to the inbound speaks HTTP/2"
    );
    nodes.stop().await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_mesh_link_http1_get_post_and_chunked_answers_cross_outbound_and_inbound_on_one_connection_byte_exact()
 {
    let stop = CancellationToken::new();
    let (web, _) = echo_app("127.0.0.3", &stop);
    let nodes = TwoNodes::start("mux", web).await;
    get_post_and_chunked(|path| nodes.url(path)).await;
    assert_eq!(
        (nodes.relay.accepted(), nodes.relay.links()),
        (1, 1),
        "one connection to the inbound, and it is a mesh link"
    );
    nodes.stop().await;
    stop.cancel();
}

/// A frame of the mesh link (`skyline::mux`): kind, payload length (3 bytes), stream id.
fn link_frame(kind: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut frame = vec![kind, len[1], len[2], len[3]];
    frame.extend_from_slice(&id.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The next frame of a raw link: its kind, stream id and payload.
async fn read_frame(link: &mut TcpStream) -> (u8, u32, Vec<u8>) {
    let mut header = [0u8; 8];
    link.read_exact(&mut header).await.unwrap();
    let len = u32::from_be_bytes([0, header[1], header[2], header[3]]) as usize;
    let mut payload = vec![0u8; len];
    link.read_exact(&mut payload).await.unwrap();
    let id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    (header[0], id, payload)
}

/// The bytes of stream `id` read from a raw link until they contain `until` (bounded: 5 s).
async fn stream_bytes(link: &mut TcpStream, id: u32, until: &str) -> String {
    let mut got = Vec::new();
    let read = async {
        while !String::from_utf8_lossy(&got).contains(until) {
            let (kind, of, payload) = read_frame(link).await;
            if kind == 0 && of == id {
                got.extend_from_slice(&payload);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .unwrap_or_else(|_| panic!("stream {id} never said {until:?}: {got:?}"));
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbounds_mesh_link_serves_each_stream_as_a_connection_refuses_smuggled_framing_answers_pings_and_ends_at_a_broken_frame()
 {
    let stop = CancellationToken::new();
    let (web, seen) = echo_app("127.0.0.3", &stop);
    let nodes = TwoNodes::start("mux", web).await;
    seen.lock().unwrap().clear();
    // A peer dialling node b's inbound as another Skyline would.
    let mut link = TcpStream::connect(nodes.b_socket.local_addr().unwrap())
        .await
        .unwrap();
    link.write_all(skyline::mux::PREFACE).await.unwrap();
    let mut answer = vec![0u8; skyline::mux::PREFACE.len()];
    link.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer, skyline::mux::PREFACE, "the inbound speaks the link");

    let get = b"GET /service/web/hello HTTP/1.1\r\nhost: b\r\n\r\n";
    link.write_all(&link_frame(0, 1, get)).await.unwrap();
    let reply = stream_bytes(&mut link, 1, "ok /hello").await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    // On a stream as on a connection: a head with two framings is refused before it is sent on.
    let smuggled = b"POST /service/web/echo HTTP/1.1\r\nhost: b\r\ncontent-length: 5\r\n\
        transfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /service/web/smuggled HTTP/1.1\r\nhost: b\r\n\r\n";
    link.write_all(&link_frame(0, 3, smuggled)).await.unwrap();
    let reply = stream_bytes(&mut link, 3, "\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("x-skyline-error"), "{reply}");

    // A ping (kind 5) on id 0 is answered with its bytes on id 1.
    link.write_all(&link_frame(5, 0, b"ping")).await.unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match read_frame(&mut link).await {
                (5, id, payload) => break (id, payload),
                _ => continue,
            }
        }
    })
    .await
    .expect("the ping was answered");
    assert_eq!(pong, (1, b"ping".to_vec()));

    // A frame of no kind the link knows ends the link.
    link.write_all(&link_frame(9, 5, b"")).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), link.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the inbound closed the link");
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "only the one well-framed request reached the instance"
    );
    nodes.stop().await;
    stop.cancel();
}

/// 50 requests at once from 50 client connections; the connections that reached the inbound.
async fn fifty_at_once(nodes: &TwoNodes) -> usize {
    let before = nodes.relay.accepted();
    let calls = (0..50).map(|i| {
        // A client each: 50 connections to the outbound listener.
        let client = Client::new();
        let url = nodes.url(&format!("web/slow/300?i={i}"));
        async move { client.get(&url).await }
    });
    let replies = futures_util::future::join_all(calls).await;
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, format!("ok /slow/300?i={i}"));
    }
    nodes.relay.accepted() - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_http1_requests_reach_the_inbound_over_the_few_http2_connections_or_one_mesh_link_dialled_once()
 {
    let stop = CancellationToken::new();
    let (web, _) = echo_app("127.0.0.3", &stop);
    let h2 = TwoNodes::start("h2", web).await;
    let h2_conns = h2.relay.accepted() + fifty_at_once(&h2).await;
    assert!(
        h2_conns <= PEER_CONNECTIONS,
        "{h2_conns} connections to the inbound, at most {PEER_CONNECTIONS} expected"
    );
    assert_eq!(h2.relay.http2(), h2.relay.accepted());
    h2.stop().await;

    // On the mesh link: the one link the agents opened to route carries them all.
    let mut mux = TwoNodes::start("mux", web).await;
    assert_eq!(
        fifty_at_once(&mux).await,
        0,
        "no new connection for 50 requests"
    );
    assert_eq!((mux.relay.accepted(), mux.relay.links()), (1, 1));
    // The inbound restarts, and its link with it: fifty first requests to it dial one link
    // between them, not one each.
    mux.b.sigterm();
    let old = std::mem::replace(
        &mut mux.b,
        TwoNodes::start_b(&mux.dir, "mux", &mux.b_socket).await,
    );
    old.exited_cleanly().await;
    assert_eq!(fifty_at_once(&mux).await, 1, "one new connection");
    assert_eq!((mux.relay.accepted(), mux.relay.links()), (2, 2));
    mux.stop().await;

    // The same load over HTTP/1.1 takes a connection per request in flight.
    let http1 = TwoNodes::start("http1", web).await;
    let http1_conns = fifty_at_once(&http1).await;
    assert!(http1_conns > 10, "over HTTP/1.1: {http1_conns} connections");
    assert_eq!(http1.relay.http2(), 0);
    http1.stop().await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_h2_or_mux_peers_a_websocket_upgrade_still_crosses_both_hops_over_http1() {
    for protocol in ["h2", "mux"] {
        let echo = WsEcho::spawn("127.0.0.3:0".parse().unwrap()).await;
        let nodes = TwoNodes::start(protocol, echo.addr).await;
        let ws = ws_connect(nodes.outbound, "ws://mesh/service/web/chat?room=1").await;
        exercise(ws).await;
        let handshakes = echo.handshakes();
        assert_eq!(handshakes.len(), 1, "{handshakes:?}");
        assert_eq!(handshakes[0].0, "/chat?room=1");
        assert_eq!(
            nodes.relay.accepted() - nodes.relay.http2() - nodes.relay.links(),
            1,
            "{protocol}: the upgrade took an HTTP/1.1 connection of its own"
        );
        nodes.stop().await;
    }
}

/// What a caller gets: status, `x-skyline-error`, `x-skyline-unsent` and body.
type Answer = (u16, Option<String>, Option<String>, String);

async fn answer(client: &Client, req: Request<Full<Bytes>>) -> Answer {
    let reply = client.send(req).await.unwrap();
    let header = |name: &str| {
        reply
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    (
        reply.status,
        header("x-skyline-error"),
        header("x-skyline-unsent"),
        reply.body.clone(),
    )
}

/// The mesh errors callers of `nodes` get, and the headers the instance got for one request.
async fn errors_and_headers(
    nodes: &TwoNodes,
    seen: &Mutex<Vec<HeaderMap>>,
) -> (Vec<Answer>, BTreeMap<String, String>) {
    let client = Client::new();
    let get = |path: &str| Request::get(nodes.url(path)).body(Full::default()).unwrap();
    let mut answers = Vec::new();
    answers.push(answer(&client, get("down/")).await);
    let mut late = get("web/slow/3000");
    late.headers_mut()
        .insert("x-skyline-timeout-ms", "300".parse().unwrap());
    answers.push(answer(&client, late).await);
    answers.push(answer(&client, get("nosuch/")).await);

    seen.lock().unwrap().clear();
    let req = Request::get(nodes.url("web/headers?q=1"))
        .header("x-request-id", "fixed-id")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "dropped")
        .header("x-end-to-end", "kept")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body(Full::default())
        .unwrap();
    assert_eq!(client.send(req).await.unwrap().status, 200);
    let headers = seen.lock().unwrap()[0].clone();
    let headers = headers
        .iter()
        .map(|(name, value)| {
            // The time left differs by the milliseconds spent; its presence is the contract.
            // The caller's `Host` (in `x-forwarded-host`) is each mesh's own outbound.
            let value = if name == "x-skyline-timeout-ms" {
                "<ms>".to_owned()
            } else {
                let outbound = nodes.outbound.to_string();
                value.to_str().unwrap().replace(&outbound, "<outbound>")
            };
            (name.to_string(), value)
        })
        .collect();
    (answers, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_gets_the_same_headers_and_callers_the_same_mesh_errors_with_h2_or_mux_peers_as_with_http1()
 {
    let stop = CancellationToken::new();
    let (web, seen) = echo_app("127.0.0.3", &stop);
    let mut results = Vec::new();
    for protocol in ["http1", "h2", "mux"] {
        let nodes = TwoNodes::start(protocol, web).await;
        results.push(errors_and_headers(&nodes, &seen).await);
        assert_eq!(nodes.protocol, protocol);
        let spoke = (nodes.relay.http2() > 0, nodes.relay.links() > 0);
        assert_eq!(spoke, (protocol == "h2", protocol == "mux"), "{protocol}");
        nodes.stop().await;
    }
    let (http1, h2, mux) = (&results[0], &results[1], &results[2]);
    assert_eq!(
        mux, http1,
        "the same mesh errors and headers on the mesh link"
    );
    let codes: Vec<_> = http1.0.iter().map(|a| (a.0, a.1.as_deref())).collect();
    assert_eq!(
        codes,
        [
            (502, Some("upstream-connect")),
            (504, Some("upstream-timeout")),
            (404, Some("unknown-service"))
        ]
    );
    assert_eq!(h2.0, http1.0, "the same mesh errors over both");
    assert_eq!(h2.1, http1.1, "the same headers reach the instance");
    for name in [
        "x-end-to-end",
        "traceparent",
        "x-skyline-hops",
        "x-forwarded-for",
    ] {
        assert!(h2.1.contains_key(name), "{name}: {:?}", h2.1);
    }
    assert_eq!(h2.1["x-request-id"], "fixed-id");
    assert!(!h2.1.contains_key("x-hop"), "{:?}", h2.1);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_peer_protocol_h2_restarting_the_inbound_agent_under_load_fails_no_get_or_put() {
    restart_under_load("h2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_mesh_link_restarting_the_inbound_agent_under_load_fails_no_get_or_put() {
    restart_under_load("mux").await;
}

/// Requests from 4 callers (GETs and PUTs with bodies) while agent b restarts twice with
/// `--peer-protocol <protocol>`: none fails.
async fn restart_under_load(protocol: &'static str) {
    let stop = CancellationToken::new();
    let (web, _) = echo_app("127.0.0.3", &stop);
    let mut nodes = TwoNodes::start(protocol, web).await;
    let load_stop = CancellationToken::new();
    let workers: Vec<JoinHandle<(u64, Vec<String>)>> = (0..4)
        .map(|w| {
            let (client, stop) = (Client::new(), load_stop.clone());
            let (get, put) = (nodes.url("web/slow/20"), nodes.url("web/echo"));
            tokio::spawn(async move {
                let (mut ok, mut failures) = (0, Vec::new());
                // Bounded: at most 60 s, however slow.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                let mut i = 0u64;
                while !stop.is_cancelled() && tokio::time::Instant::now() < deadline {
                    i += 1;
                    let body = format!("put {w} {i}");
                    let req = if i % 2 == 0 {
                        Request::get(&get).body(Full::default())
                    } else {
                        Request::put(&put).body(Full::new(Bytes::from(body.clone())))
                    };
                    match client.send(req.unwrap()).await {
                        Ok(r) if r.status == 200 && (i % 2 == 0 || r.body == body) => ok += 1,
                        other => failures.push(format!("{other:?}")),
                    }
                }
                (ok, failures)
            })
        })
        .collect();
    // Traffic before, during and after two restarts of agent b.
    let relay_before = nodes.relay.accepted();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        nodes.b.sigterm();
        let old = std::mem::replace(
            &mut nodes.b,
            TwoNodes::start_b(&nodes.dir, protocol, &nodes.b_socket).await,
        );
        old.exited_cleanly().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    load_stop.cancel();
    let (mut ok, mut failures) = (0, Vec::new());
    for worker in workers {
        let (n, f) = worker.await.unwrap();
        ok += n;
        failures.extend(f);
    }
    eprintln!(
        "{ok} ok, {} failed; {} connections to the inbound over the restarts",
        failures.len(),
        nodes.relay.accepted() - relay_before
    );
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok >= 50, "the load ran: {ok}");
    assert!(
        nodes.relay.accepted() > relay_before,
        "the outbound opened new connections to the restarted inbound"
    );
    nodes.stop().await;
    stop.cancel();
}

// === Outbound → gateway → bridge → cluster service ===

/// Agent a (no service in its catalog, the gateway as its catch-all) → gateway (127.0.0.6) →
/// bridge (127.0.0.4) → `web.default.svc.cluster.local` (an [`EchoApp`] on 127.0.0.5, found
/// through dnsmasq), all with `--peer-protocol h2`; relays in front of the gateway and the
/// bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_peer_protocol_h2_http1_get_post_and_chunked_answers_cross_outbound_gateway_and_bridge_over_http2()
 {
    through_gateway_and_bridge("h2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_mesh_link_http1_get_post_and_chunked_answers_cross_outbound_gateway_and_bridge_on_one_connection_a_hop()
 {
    through_gateway_and_bridge("mux").await;
}

/// [`get_post_and_chunked`] through an outbound, a gateway and a bridge, all with
/// `--peer-protocol <protocol>`: each hop between them on HTTP/2 connections or one mesh link.
async fn through_gateway_and_bridge(protocol: &'static str) {
    let stop = CancellationToken::new();
    let (web, _) = echo_app("127.0.0.5", &stop);
    let dns = ClusterDns::start(&[("web.default.svc.cluster.local", "127.0.0.5")]).await;
    let dir = tempfile::tempdir().unwrap();
    let bridge_file = dir.path().join("bridge.toml");
    std::fs::write(
        &bridge_file,
        format!(
            "[mesh]\npeer_protocol = \"{protocol}\"\n\n[services.web]\nport = {}\n",
            web.port()
        ),
    )
    .unwrap();
    let mut bridge = Skyline::start(
        &[
            "bridge",
            &format!("--config={}", bridge_file.display()),
            "--listen=127.0.0.4:0",
            "--admin=off",
            &format!("--dns={}", dns.addr),
            "--gateways=127.0.0.1:9",
        ],
        &[],
    );
    let started = bridge.log.wait_for("bridge started").await;
    let bridge_addr = started["listen"].as_str().unwrap().parse().unwrap();
    let to_bridge = Relay::start("127.0.0.4", bridge_addr).await;

    let empty = dir.path().join("empty.toml");
    write_atomically(
        &empty,
        &skyline::catalog::file::render(&skyline::catalog::Snapshot::default()),
    );
    // The gateway takes the setting from its variable.
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_skyline"));
    command
        .args([
            "gateway",
            "--listen=127.0.0.6:0",
            "--admin=off",
            &format!("--catalog-file={}", empty.display()),
            &format!("--bridges={}", to_bridge.addr),
            "--log-format=json",
        ])
        .env("SKYLINE_LOG", "info")
        .env("SKYLINE_PEER_PROTOCOL", protocol);
    let mut gateway = Skyline::spawn(command, &[]);
    let started = gateway.log.wait_for("gateway started").await;
    let gateway_addr = started["gateway"].as_str().unwrap().parse().unwrap();
    let to_gateway = Relay::start("127.0.0.6", gateway_addr).await;

    let catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        "[[node]]\nname = \"a\"\naddress = \"127.0.0.2\"\n",
    )
    .unwrap();
    let mut agent = Skyline::start(
        &[
            "agent",
            "--node-name=a",
            "--node-address=127.0.0.2",
            "--outbound=127.0.0.2:0",
            "--inbound=off",
            "--admin=off",
            "--catalog=file",
            &format!("--catalog-file={}", catalog.display()),
            &format!("--catch-all={}", to_gateway.addr),
            &format!("--peer-protocol={protocol}"),
        ],
        &[],
    );
    let started = agent.log.wait_for("agent started").await;
    let outbound = started["outbound"].as_str().unwrap().to_owned();
    until_ok(&format!("http://{outbound}/service/web/")).await;

    get_post_and_chunked(|path| format!("http://{outbound}/service/{path}")).await;
    for (relay, hop) in [
        (&to_gateway, "outbound → gateway"),
        (&to_bridge, "gateway → bridge"),
    ] {
        assert!(relay.accepted() >= 1, "{hop}");
        if protocol == "mux" {
            assert_eq!(
                (relay.accepted(), relay.links()),
                (1, 1),
                "{hop}: one mesh link"
            );
            continue;
        }
        assert!(
            relay.accepted() <= PEER_CONNECTIONS,
            "{hop}: {}",
            relay.accepted()
        );
        assert_eq!(relay.http2(), relay.accepted(), "{hop} speaks HTTP/2");
    }
    for process in [&agent, &gateway, &bridge] {
        process.sigterm();
    }
    for process in [agent, gateway, bridge] {
        process.exited_cleanly().await;
    }
    stop.cancel();
}

/// An HTTP/2 peer in an inbound's place that refuses every odd stream (`REFUSED_STREAM`) and
/// answers every even one `200 second`; it counts the streams.
async fn refusing_peer(ip: &str) -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(AtomicUsize::new(0));
    let count = streams.clone();
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if count.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let Ok(mut body) = respond.send_response(Response::new(()), false) else {
                        continue;
                    };
                    let _ = body.send_data(Bytes::from_static(b"second"), true);
                }
            });
        }
    });
    (addr, streams, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_peer_refuses_is_sent_again_even_where_no_retry_is_allowed() {
    let (peer, streams, task) = refusing_peer("127.0.0.3").await;
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        format!(
            "[[node]]\nname = \"b\"\naddress = \"127.0.0.3\"\ninbound_port = {}\n\n\
             [[service]]\nname = \"web\"\nnode = \"b\"\nport = 9\n",
            peer.port()
        ),
    )
    .unwrap();
    // No retries: a refused stream goes again because it reached no application, not as a retry.
    let config = dir.path().join("a.toml");
    std::fs::write(
        &config,
        "[resilience]\nretries = 0\n\n[mesh]\npeer_protocol = \"h2\"\n",
    )
    .unwrap();
    let mut a = Skyline::start(
        &[
            "agent",
            &format!("--config={}", config.display()),
            "--node-name=a",
            "--node-address=127.0.0.2",
            "--outbound=127.0.0.2:0",
            "--inbound=off",
            "--admin=off",
            "--catalog=file",
            &format!("--catalog-file={}", catalog.display()),
        ],
        &[],
    );
    let started = a.log.wait_for("agent started").await;
    let outbound = started["outbound"].as_str().unwrap().to_owned();
    let client = Client::new();
    for i in 1..=3 {
        let reply = client
            .get(&format!("http://{outbound}/service/web/x?i={i}"))
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.body, "second");
        assert_eq!(
            streams.load(Ordering::Relaxed),
            2 * i,
            "a refused and an answered stream"
        );
    }
    a.sigterm();
    a.exited_cleanly().await;
    task.abort();
}
