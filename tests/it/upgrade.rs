//! HTTP/1.1 upgrades through every hop: a real WebSocket client and echo server (tungstenite)
//! through outbound → inbound, and through outbound → gateway → bridge → a cluster service
//! found by a real DNS server (dnsmasq); a raw upgraded protocol for half-close and the idle
//! timeout; a catalog change while a WebSocket is open.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_util::sync::CancellationToken;

use crate::support::*;
use skyline::catalog::CatalogSource;
use skyline::catalog::{Health, Snapshot};

/// The longest any one step of a test may wait.
const STEP: Duration = Duration::from_secs(10);

// === WsEcho ===

/// A WebSocket server that echoes every text and binary message, answers pings (tungstenite
/// does) and the close handshake, and records the target and headers of each handshake.
pub struct WsEcho {
    pub addr: SocketAddr,
    /// `(target, upgrade header, connection header)` of each handshake.
    handshakes: Arc<Mutex<Vec<(String, String, String)>>>,
    task: JoinHandle<()>,
}

impl WsEcho {
    pub async fn spawn(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                conns.spawn(async move {
                    // The callback's error type is tungstenite's, large or not.
                    #[allow(clippy::result_large_err)]
                    let record = |req: &WsRequest, response: WsResponse| {
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .map_or("", |v| v.to_str().unwrap_or(""))
                                .to_owned()
                        };
                        seen.lock().unwrap().push((
                            req.uri().to_string(),
                            header("upgrade"),
                            header("connection"),
                        ));
                        Ok(response)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await
                    else {
                        return;
                    };
                    while let Some(Ok(message)) = ws.next().await {
                        if (message.is_text() || message.is_binary())
                            && ws.send(message).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            handshakes,
            task,
        }
    }

    pub fn handshakes(&self) -> Vec<(String, String, String)> {
        self.handshakes.lock().unwrap().clone()
    }
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub type Ws = WebSocketStream<TcpStream>;

/// A WebSocket client connected through `proxy` to `url` (its host is sent as `Host`).
pub async fn ws_connect(proxy: SocketAddr, url: &str) -> Ws {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (ws, response) = tokio::time::timeout(STEP, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("handshake in time")
        .expect("handshake");
    assert_eq!(response.status(), 101);
    ws
}

/// The next message that is not a pong or ping.
pub async fn next_data(ws: &mut Ws) -> Message {
    loop {
        let message = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("a message in time")
            .expect("the stream goes on")
            .expect("a message");
        if !matches!(message, Message::Ping(_)) {
            return message;
        }
    }
}

/// Large, fragmented and small messages, a ping and the close handshake over `ws`.
pub async fn exercise(mut ws: Ws) {
    // 1 MiB and then some, binary, with every byte value.
    let big: Vec<u8> = (0..(1 << 20) + 7).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::binary(big));

    // A text message in three fragments arrives as one message.
    let parts = ["frag", "ment", "ed ✓"];
    for (i, part) in parts.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(part.as_bytes().to_vec(), opcode, i == parts.len() - 1);
        ws.send(Message::Frame(frame)).await.unwrap();
    }
    assert_eq!(next_data(&mut ws).await, Message::text("fragmented ✓"));

    // Ping and pong.
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::Pong(b"are you there".to_vec().into())
    );

    // Many small messages both ways.
    for i in 0..50 {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
    }
    for i in 0..50 {
        assert_eq!(next_data(&mut ws).await, Message::text(format!("m{i}")));
    }

    // The close handshake: our close is answered with one, then the stream ends.
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    match next_data(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected a close frame, got {other:?}"),
    }
    let end = tokio::time::timeout(STEP, ws.next())
        .await
        .expect("the end in time");
    assert!(end.is_none(), "{end:?}");
}

fn web(addr: SocketAddr) -> Placement {
    Placement {
        service: "web",
        node: "b",
        addr,
        health: Health::Passing,
    }
}

async fn two_hops(app: SocketAddr, policies: skyline::proxy::resilience::Policies) -> TestMesh {
    TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .place(web(app))
        .resilience(policies)
        .spawn()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_carries_large_fragmented_messages_pings_and_the_close_through_both_hops() {
    let echo = WsEcho::spawn("127.0.0.3:0".parse().unwrap()).await;
    let mesh = two_hops(echo.addr, Default::default()).await;
    let ws = ws_connect(mesh.outbound("a"), "ws://mesh/service/web/chat?room=1").await;
    exercise(ws).await;
    let handshakes = echo.handshakes();
    assert_eq!(handshakes.len(), 1, "{handshakes:?}");
    let (target, upgrade, connection) = &handshakes[0];
    assert_eq!(target, "/chat?room=1");
    assert_eq!(upgrade, "websocket");
    assert!(connection.eq_ignore_ascii_case("upgrade"), "{connection}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_survives_its_service_leaving_the_catalog() {
    let echo = WsEcho::spawn("127.0.0.3:0".parse().unwrap()).await;
    let mesh = two_hops(echo.addr, Default::default()).await;
    let mut ws = ws_connect(mesh.outbound("a"), "ws://mesh/service/web/chat").await;
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("before"));

    // Every agent routes without `web` now: new requests fail, the open WebSocket goes on.
    mesh.set_catalog_and_wait(&[]).await;
    let reply = Client::new()
        .get(&format!("http://{}/service/web/", mesh.outbound("a")))
        .await;
    assert!(reply.mesh_error().is_some(), "{reply:?}");
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("after"));
    exercise(ws).await;
    mesh.stop().await;
}

// === Raw upgraded protocol ===

/// An application speaking a made-up protocol after `101`: it reads everything the client
/// sends until the client's end of stream, then answers `got <n>: <bytes>` and closes. With
/// `silent`, it answers nothing and keeps the connection open until the client closes.
fn spawn_raw_app(ip: IpAddr, silent: bool) -> (SocketAddr, JoinHandle<()>) {
    let std_listener = std::net::TcpListener::bind((ip, 0)).unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(std_listener).unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            conns.spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: rawecho\r\nConnection: Upgrade\r\n\r\n";
                if stream.write_all(switch).await.is_err() {
                    return;
                }
                let mut got = Vec::new();
                if stream.read_to_end(&mut got).await.is_err() || silent {
                    return;
                }
                let mut answer = format!("got {}: ", got.len()).into_bytes();
                answer.extend_from_slice(&got);
                let _ = stream.write_all(&answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// Sends the upgrade request for `rawecho` to `proxy` and reads the `101` head.
async fn raw_upgrade(proxy: SocketAddr) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream
        .write_all(
            b"GET /service/web/raw HTTP/1.1\r\nHost: mesh\r\nConnection: Upgrade\r\nUpgrade: rawecho\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(STEP, stream.read(&mut byte))
            .await
            .expect("the answer in time")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed inside the answer: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    (stream, String::from_utf8(head).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_upgraded_connection_still_carries_the_answer_back_through_both_hops() {
    let (app, task) = spawn_raw_app(ip("127.0.0.3"), false);
    let mesh = two_hops(app, Default::default()).await;
    let (mut stream, head) = raw_upgrade(mesh.outbound("a")).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: rawecho\r\n"), "{head}");
    assert!(lower.contains("connection: upgrade\r\n"), "{head}");

    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 256) as u8).collect();
    stream.write_all(&payload).await.unwrap();
    // Our end of stream must reach the application through both hops; only then it answers.
    stream.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut back))
        .await
        .expect("the answer in time")
        .unwrap();
    let mut expected = b"got 300000: ".to_vec();
    expected.extend_from_slice(&payload);
    assert_eq!(back.len(), expected.len());
    assert!(back == expected, "the answer after the half-close differs");
    mesh.stop().await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upgraded_connection_is_closed_after_the_idle_timeout() {
    let (app, task) = spawn_raw_app(ip("127.0.0.3"), true);
    let idle = Duration::from_millis(600);
    let mesh = two_hops(app, policies(|r| r.idle_timeout = idle)).await;
    let (mut stream, head) = raw_upgrade(mesh.outbound("a")).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let opened = tokio::time::Instant::now();
    // Traffic keeps the tunnel open: bytes every 200 ms for well over the idle timeout.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stream.write_all(b"tick").await.unwrap();
    }
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut byte)).await;
    assert!(early.is_err(), "closed while busy: {early:?}");
    // Then silence: the mesh closes it (the application never would).
    let quiet = tokio::time::Instant::now();
    let read = tokio::time::timeout(STEP, stream.read(&mut byte))
        .await
        .expect("closed by the idle timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = quiet.elapsed();
    assert!(waited >= idle - Duration::from_millis(50), "{waited:?}");
    assert!(opened.elapsed() >= Duration::from_millis(1600));
    mesh.stop().await;
    task.abort();
}

// === Gateway and bridge ===

/// dnsmasq on loopback as the cluster DNS, answering each `(name, ip)` and NXDOMAIN for the
/// rest of `cluster.local`; killed on drop.
pub(crate) struct ClusterDns {
    pub(crate) addr: SocketAddr,
    _child: tokio::process::Child,
}

impl ClusterDns {
    /// Starts dnsmasq and waits until it answers the first name. dnsmasq binds its port on UDP
    /// and TCP; the free UDP port picked here can be taken on TCP by another test's listener, in
    /// which case dnsmasq exits at once and is started again on another port.
    pub(crate) async fn start(names: &[(&str, &str)]) -> Self {
        let dnsmasq = skyline::demo::migration::mesh::dnsmasq()
            .expect("dnsmasq (scripts/install-deps installs it)");
        let (first, _) = names[0];
        for _start in 0..10 {
            let port = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut args = vec![
                "--no-daemon".to_owned(),
                "--no-resolv".to_owned(),
                "--no-hosts".to_owned(),
                "--conf-file=/dev/null".to_owned(),
                format!("--port={port}"),
                "--bind-interfaces".to_owned(),
                "--listen-address=127.0.0.1".to_owned(),
                "--pid-file=".to_owned(),
                "--local=/cluster.local/".to_owned(),
            ];
            args.extend(names.iter().map(|(n, ip)| format!("--address=/{n}/{ip}")));
            let mut child = tokio::process::Command::new(&dnsmasq)
                .args(&args)
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("dnsmasq starts");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let resolver = skyline::bridge::resolver(addr).unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while tokio::time::Instant::now() < deadline {
                if resolver.lookup_ip(format!("{first}.")).await.is_ok() {
                    return Self {
                        addr,
                        _child: child,
                    };
                }
                if child.try_wait().ok().flatten().is_some() {
                    break; // its port was taken: start again on another
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("dnsmasq does not answer");
    }
}

/// The path to a cluster service: a bridge on 127.0.0.4 that resolves names with `dns` and
/// sends to their `port`, and a gateway on 127.0.0.6 (with an empty catalog) whose Kubernetes
/// tier is that bridge.
pub(crate) struct ClusterPath {
    pub(crate) gateway: skyline::gateway::GatewayHandle,
    pub(crate) bridge: skyline::bridge::BridgeHandle,
    _dir: tempfile::TempDir,
}

impl ClusterPath {
    pub(crate) async fn start(dns: &ClusterDns, port: u16) -> Self {
        let bridge = skyline::bridge::spawn(
            skyline::bridge::Settings {
                listen: vec!["127.0.0.4:0".parse().unwrap()],
                admin: None,
                dns: dns.addr,
                names: skyline::bridge::Names {
                    port,
                    ..Default::default()
                },
                gateways: vec!["127.0.0.1:9".parse().unwrap()],
                catalog: None,
                max_hops: 8,
                resilience: Default::default(),
                tls: None,
                authz: Default::default(),
                kv: None,
                reload: None,
                access: skyline::access::Settings::off(),
                peer_protocol: Default::default(),
                tokens: Default::default(),
            },
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let catalog = dir.path().join("catalog.toml");
        write_atomically(
            &catalog,
            &skyline::catalog::file::render(&Snapshot::default()),
        );
        let gateway = skyline::gateway::spawn(
            skyline::gateway::Settings {
                listen: "127.0.0.6:0".parse().unwrap(),
                admin: None,
                catalog: CatalogSource::File(catalog),
                upstreams: BTreeMap::from([(
                    skyline::contract::KUBERNETES.to_owned(),
                    skyline::gateway::policy::Upstream {
                        pool: skyline::gateway::policy::Pool::Addresses(bridge.addrs.clone()),
                        bridge: true,
                    },
                )]),
                routes: BTreeMap::new(),
                default_hold: Duration::from_millis(100),
                max_hops: 8,
                kv: None,
                include_warning: false,
                reload: None,
                resilience: Default::default(),
                tls: None,
                authz: Default::default(),
                access: skyline::access::Settings::off(),
                peer_protocol: Default::default(),
                tokens: Default::default(),
            },
            CancellationToken::new(),
        )
        .await
        .unwrap();
        Self {
            gateway,
            bridge,
            _dir: dir,
        }
    }

    pub(crate) async fn stop(self) {
        self.gateway.shutdown();
        self.gateway.join().await;
        self.bridge.shutdown();
        self.bridge.join().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_passes_outbound_gateway_and_bridge_to_a_cluster_service() {
    let echo = WsEcho::spawn("127.0.0.5:0".parse().unwrap()).await;
    let dns = ClusterDns::start(&[("chat.default.svc.cluster.local", "127.0.0.5")]).await;
    let path = ClusterPath::start(&dns, echo.addr.port()).await;
    let gateway = &path.gateway;
    // `chat` is unknown to the agent's catalog: it goes to the catch-all, the gateway.
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .catch_all(gateway.addr)
        .spawn()
        .await;
    let ws = ws_connect(mesh.outbound("a"), "ws://mesh/service/chat/live").await;
    exercise(ws).await;
    let handshakes = echo.handshakes();
    assert_eq!(handshakes.len(), 1, "{handshakes:?}");
    assert_eq!(handshakes[0].0, "/live");
    assert_eq!(handshakes[0].1, "websocket");
    mesh.stop().await;
    path.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_does_not_wait_for_open_websockets_and_closes_them_when_the_drain_ends() {
    let echo = WsEcho::spawn("127.0.0.3:0".parse().unwrap()).await;
    let mesh = two_hops(echo.addr, Default::default()).await;
    let mut ws = ws_connect(mesh.outbound("a"), "ws://mesh/service/web/chat").await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("hi"));
    // Well below the drain's 10 s limit: the open WebSocket does not hold the drain up.
    tokio::time::timeout(Duration::from_secs(5), mesh.stop())
        .await
        .expect("both agents stop without waiting for the WebSocket");
    let end = tokio::time::timeout(STEP, ws.next())
        .await
        .expect("the WebSocket is closed once the drain ended");
    assert!(matches!(end, None | Some(Err(_))), "{end:?}");
}
