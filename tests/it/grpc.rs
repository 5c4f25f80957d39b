//! HTTP/2 and gRPC through both hops of `skyline agent` processes: an application's h2c
//! (prior knowledge) connection to its outbound listener, h2c between the hops, and h2c to an
//! instance registered with meta `protocol = "h2c"` (HTTP/1.1 to any other).
//!
//! A real tonic server and client (the test service of `proto/test/echo.proto`), curl with
//! `--http2-prior-knowledge`, and HTTP/1.1 clients on the same port.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};

use crate::support::*;

pub(crate) mod pb {
    #![allow(clippy::all, clippy::unwrap_used, clippy::expect_used)]
    include!(concat!(env!("OUT_DIR"), "/skyline.test.rs"));
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

/// gRPC's default message limit is 4 MiB; the large-message test sends a 4 MiB payload.
pub(crate) const MAX_MESSAGE: usize = 16 << 20;

// === The gRPC test server ===

#[derive(Default)]
struct EchoService;

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

fn failure(req: &EchoRequest) -> Option<Status> {
    (req.fail_with != 0).then(|| Status::new(Code::from(req.fail_with), req.message.clone()))
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let req = request.into_inner();
        if req.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(req.delay_ms.into())).await;
        }
        if let Some(status) = failure(&req) {
            return Err(status);
        }
        Ok(tonic::Response::new(EchoReply {
            message: req.message,
            payload: req.payload,
            index: 0,
        }))
    }

    type ServerStreamStream = ReplyStream;

    /// `count` replies, then the request's failure (if any) as the final status.
    async fn server_stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        let req = request.into_inner();
        let message = req.message.clone();
        let replies = (0..req.count).map(move |i| {
            Ok(EchoReply {
                message: format!("{message} #{i}"),
                payload: Vec::new(),
                index: i,
            })
        });
        let end = failure(&req).map(Err);
        let stream = tokio_stream::iter(replies.chain(end));
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    /// One reply: how many requests came and their payload bytes in all.
    async fn client_stream(
        &self,
        request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let mut requests = request.into_inner();
        let (mut count, mut bytes) = (0u32, 0usize);
        while let Some(req) = requests.next().await {
            let req = req?;
            count += 1;
            bytes += req.payload.len();
        }
        Ok(tonic::Response::new(EchoReply {
            message: format!("{count} requests, {bytes} bytes"),
            payload: Vec::new(),
            index: count,
        }))
    }

    type BidiStream = ReplyStream;

    /// A reply to each request as it comes.
    async fn bidi(
        &self,
        request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut index = 0;
            while let Some(req) = requests.next().await {
                let reply = req.map(|req| EchoReply {
                    message: format!("echo {}", req.message),
                    payload: Vec::new(),
                    index,
                });
                index += 1;
                if tx.send(reply).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

// === The recording gRPC server: how each call ended, as the server saw it ===

/// What the recording server saw: one line per call that ended without its answer going out
/// (the client cancelled), and how many calls are still running in it.
struct Recorded {
    events: tokio::sync::mpsc::UnboundedReceiver<String>,
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Recorded {
    /// Waits (bounded: 10 s) for an event that contains `what`; the time it took.
    async fn wait_for(&mut self, what: &str) -> Duration {
        let started = std::time::Instant::now();
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(event) = self.events.recv().await {
                if event.contains(what) {
                    return;
                }
            }
            panic!("the recording server stopped");
        })
        .await;
        assert!(
            found.is_ok(),
            "the server never saw {what:?} within 10 s: the cancellation did not reach it"
        );
        started.elapsed()
    }

    /// Waits (bounded: 10 s) until no call runs in the server.
    async fn wait_idle(&self) {
        for _ in 0..1000 {
            if self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{} calls still run in the server",
            self.in_flight.load(std::sync::atomic::Ordering::SeqCst)
        );
    }
}

/// Counts a call in flight until dropped; then records `event` unless disarmed (the answer
/// went out).
struct CallGuard {
    event: Option<String>,
    events: tokio::sync::mpsc::UnboundedSender<String>,
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CallGuard {
    fn new(recorder: &Recorder, event: String) -> Self {
        recorder
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self {
            event: Some(event),
            events: recorder.events.clone(),
            in_flight: recorder.in_flight.clone(),
        }
    }

    fn answered(mut self) {
        self.event = None;
    }

    fn record(&mut self, event: String) {
        self.event = Some(event);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if let Some(event) = self.event.take() {
            let _ = self.events.send(event);
        }
        self.in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The test service, with calls that last until the client goes away: `ServerStream` sends a
/// reply every `delay_ms` until its stream is dropped; `Bidi` echoes each request and, once the
/// requests end, sends a reply every 10 ms until its stream is dropped; `Unary` waits
/// `delay_ms` before answering.
struct Recorder {
    events: tokio::sync::mpsc::UnboundedSender<String>,
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl Echo for Recorder {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let req = request.into_inner();
        let guard = CallGuard::new(self, format!("unary {}: dropped unanswered", req.message));
        tokio::time::sleep(Duration::from_millis(req.delay_ms.into())).await;
        guard.answered();
        Ok(tonic::Response::new(EchoReply {
            message: req.message,
            payload: Vec::new(),
            index: 0,
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        let req = request.into_inner();
        let mut guard = CallGuard::new(self, format!("server_stream {}: ended", req.message));
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for index in 0.. {
                let reply = EchoReply {
                    message: format!("{} #{index}", req.message),
                    payload: Vec::new(),
                    index,
                };
                if tx.send(Ok(reply)).await.is_err() {
                    guard.record(format!(
                        "server_stream {}: the client went away after {index} replies",
                        req.message
                    ));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(req.delay_ms.into())).await;
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn client_stream(
        &self,
        _: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        Err(Status::unimplemented("not recorded"))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        let mut requests = request.into_inner();
        let mut guard = CallGuard::new(self, "bidi: ended".to_owned());
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut requests_end = None;
            for index in 0.. {
                let message = match requests_end {
                    None => match requests.next().await {
                        Some(Ok(req)) => format!("echo {}", req.message),
                        Some(Err(status)) => {
                            requests_end = Some(format!("failed ({:?})", status.code()));
                            continue;
                        }
                        None => {
                            requests_end = Some("ended".to_owned());
                            continue;
                        }
                    },
                    Some(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        "tick".to_owned()
                    }
                };
                let reply = EchoReply {
                    message,
                    payload: Vec::new(),
                    index,
                };
                if tx.send(Ok(reply)).await.is_err() {
                    let requests = requests_end.as_deref().unwrap_or("still open");
                    guard.record(format!("bidi: the client went away (requests {requests})"));
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The recording server on `ip`, until the token is cancelled.
async fn recording_server(ip: &str, stop: CancellationToken) -> (SocketAddr, Recorded) {
    let listener = tokio::net::TcpListener::bind((self::ip(ip), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    let in_flight = std::sync::Arc::default();
    let recorder = Recorder {
        events,
        in_flight: std::sync::Arc::clone(&in_flight),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(recorder))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            ),
    );
    (
        addr,
        Recorded {
            events: rx,
            in_flight,
        },
    )
}

/// The tonic server on `ip`, until the token is cancelled.
pub(crate) async fn grpc_server(ip: &str, stop: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((self::ip(ip), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let service = EchoServer::new(EchoService)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            ),
    );
    addr
}

/// An HTTP/2-only (h2c prior knowledge) server on `ip` that answers `h2 <version>
/// <path-and-query>`, then ` grpc-timeout=<value>`, ` body=<body>` and
/// ` trailers=<name>=<value>,...` when the request had them, and refuses anything but HTTP/2: the test's proof that the last hop spoke HTTP/2
/// to it.
async fn h2_only_server(ip: &str, stop: CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind((self::ip(ip), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => accepted.unwrap(),
            };
            let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let mut text = format!(
                    "h2 {:?} {}",
                    req.version(),
                    req.uri().path_and_query().map_or("/", |p| p.as_str())
                );
                if let Some(timeout) = req.headers().get("grpc-timeout") {
                    text.push_str(&format!(" grpc-timeout={}", timeout.to_str().unwrap()));
                }
                let body = match req.into_body().collect().await {
                    Ok(body) => body,
                    Err(e) => {
                        let failed = Full::new(Bytes::from(format!("body failed: {e}")));
                        return Ok::<_, Infallible>(Response::new(failed));
                    }
                };
                let trailers = body.trailers().map(|t| {
                    let mut all: Vec<String> = t
                        .iter()
                        .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("?")))
                        .collect();
                    all.sort();
                    all.join(",")
                });
                let bytes = body.to_bytes();
                if !bytes.is_empty() {
                    text.push_str(&format!(" body={}", String::from_utf8_lossy(&bytes)));
                }
                if let Some(trailers) = trailers {
                    text.push_str(&format!(" trailers={trailers}"));
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

// === The mesh: two agent processes ===

/// Agents for node a (127.0.0.2) and b (127.0.0.3) as `skyline agent` processes sharing a
/// catalog file, with on b: `grpc-echo` (tonic, h2c), `grpc-rec` (the recording tonic server,
/// h2c), `h2web` (HTTP/2 only, h2c), `web` (an HTTP/1.1 TestApp) and `grpc-down` (h2c, nothing
/// listening).
struct GrpcMesh {
    _dir: tempfile::TempDir,
    agents: Vec<Skyline>,
    outbound_a: String,
    web: TestApp,
    recorded: Recorded,
    stop: CancellationToken,
}

impl GrpcMesh {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// The mesh, node a's agent with `catch_all` as its catch-all when given.
    async fn start_with(catch_all: Option<&str>) -> Self {
        let stop = CancellationToken::new();
        let grpc = grpc_server("127.0.0.3", stop.clone()).await;
        let (rec, recorded) = recording_server("127.0.0.3", stop.clone()).await;
        let h2web = h2_only_server("127.0.0.3", stop.clone()).await;
        let web = TestApp::spawn("web@b", ip("127.0.0.3"));
        // A port that refuses connections: bound, then closed.
        let down = std::net::TcpListener::bind("127.0.0.3:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let catalog = dir.path().join("catalog.toml");
        let text = |a: u16, b: u16| {
            format!(
                "[[node]]\nname = \"a\"\naddress = \"127.0.0.2\"\ninbound_port = {a}\n\n\
                 [[node]]\nname = \"b\"\naddress = \"127.0.0.3\"\ninbound_port = {b}\n\n\
                 [[service]]\nname = \"grpc-echo\"\nnode = \"b\"\nport = {}\n\
                 meta = {{ protocol = \"h2c\" }}\n\n\
                 [[service]]\nname = \"h2web\"\nnode = \"b\"\nport = {}\ntags = [\"h2c\"]\n\n\
                 [[service]]\nname = \"grpc-down\"\nnode = \"b\"\nport = {}\n\
                 meta = {{ protocol = \"h2c\" }}\n\n\
                 [[service]]\nname = \"grpc-rec\"\nnode = \"b\"\nport = {}\n\
                 meta = {{ protocol = \"h2c\" }}\n\n\
                 [[service]]\nname = \"web\"\nnode = \"b\"\nport = {}\n",
                grpc.port(),
                h2web.port(),
                down.port(),
                rec.port(),
                web.addr.port()
            )
        };
        std::fs::write(&catalog, text(1, 1)).unwrap();
        let mut agents = Vec::new();
        let mut inbound_ports = Vec::new();
        let mut outbound_a = String::new();
        for (node, ip) in [("a", "127.0.0.2"), ("b", "127.0.0.3")] {
            let outbound = format!("{ip}:0");
            let args = [
                "agent",
                "--node-name",
                node,
                "--node-address",
                ip,
                "--outbound",
                &outbound,
                "--inbound",
                &outbound,
                "--admin",
                "off",
                "--catalog",
                "file",
                "--catalog-file",
                catalog.to_str().unwrap(),
            ];
            let mut args = args.to_vec();
            let flag = catch_all.map(|c| format!("--catch-all={c}"));
            if let (Some(flag), "a") = (&flag, node) {
                args.push(flag.as_str());
            }
            let mut agent = Skyline::start(&args, &[]);
            let started = agent.log.wait_for("agent started").await;
            let inbound: SocketAddr = started["inbound"].as_str().unwrap().parse().unwrap();
            inbound_ports.push(inbound.port());
            if node == "a" {
                outbound_a = started["outbound"].as_str().unwrap().to_owned();
            }
            agents.push(agent);
        }
        write_atomically(&catalog, &text(inbound_ports[0], inbound_ports[1]));
        let mesh = GrpcMesh {
            _dir: dir,
            agents,
            outbound_a,
            web,
            recorded,
            stop,
        };
        // Bounded: the agents poll the catalog file every 50 ms.
        let client = Client::new();
        let url = format!("http://{}/service/web/", mesh.outbound_a);
        for _ in 0..400 {
            if let Ok(reply) = client.get_result(&url).await {
                if reply.status == 200 {
                    return mesh;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the agents never routed web");
    }

    /// A gRPC client of `service` through node a's outbound listener.
    async fn client(&self, service: &str) -> EchoClient<tonic::transport::Channel> {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.outbound_a))
                .unwrap()
                .connect()
                .await
                .unwrap();
        let origin = format!("http://{}/service/{service}", self.outbound_a)
            .parse()
            .unwrap();
        EchoClient::with_origin(channel, origin)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    async fn stop(self) {
        for agent in &self.agents {
            agent.sigterm();
        }
        for agent in self.agents {
            agent.exited_cleanly().await;
        }
        self.stop.cancel();
        self.web.stop().await;
    }
}

pub(crate) fn request(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
        ..EchoRequest::default()
    }
}

/// `curl --http2-prior-knowledge` of `url`: the status line's protocol and status, and the body.
async fn curl_h2(url: &str) -> (String, String) {
    curl(&["--http2-prior-knowledge"], url).await
}

/// `curl <args> <url>` as a process: the status line's protocol and status, and the body.
async fn curl(args: &[&str], url: &str) -> (String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D", "-"])
        .args(args)
        .arg(url)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (
        head.lines().next().unwrap().trim().to_owned(),
        body.to_owned(),
    )
}

// === Tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_calls_and_a_4_mib_message_cross_both_hops_over_h2c() {
    let mesh = GrpcMesh::start().await;
    let mut client = mesh.client("grpc-echo").await;
    let reply = client.unary(request("hello")).await.unwrap();
    assert_eq!(reply.get_ref().message, "hello");

    let payload: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    let big = EchoRequest {
        payload: payload.clone(),
        ..request("big")
    };
    let reply = client.unary(big).await.unwrap().into_inner();
    assert_eq!(reply.payload.len(), payload.len());
    assert!(
        reply.payload == payload,
        "the 4 MiB payload comes back intact"
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_server_client_and_bidi_streams_cross_both_hops_and_end_with_status_ok() {
    let mesh = GrpcMesh::start().await;
    let mut client = mesh.client("grpc-echo").await;

    let call = EchoRequest {
        count: 5,
        ..request("tick")
    };
    let mut stream = client.server_stream(call).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        got.push(reply.message);
    }
    assert_eq!(got, ["tick #0", "tick #1", "tick #2", "tick #3", "tick #4"]);
    let trailers = stream.trailers().await.unwrap().unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");

    let uploads = (0..10).map(|i| EchoRequest {
        payload: vec![7; 1000],
        ..request(&i.to_string())
    });
    let reply = client
        .client_stream(tokio_stream::iter(uploads))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "10 requests, 10000 bytes");

    // Each reply comes back before the next request is sent: both directions stream at once
    // through both hops, nothing waits for the other side's end.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .bidi(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..5u32 {
        tx.send(request(&format!("ping {i}"))).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .expect("a reply before the next request")
            .unwrap()
            .unwrap();
        assert_eq!(reply.message, format!("echo ping {i}"));
        assert_eq!(reply.index, i);
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_error_status_from_the_server_reaches_the_client_in_its_trailers() {
    let mesh = GrpcMesh::start().await;
    let mut client = mesh.client("grpc-echo").await;
    let failing = EchoRequest {
        fail_with: Code::PermissionDenied as i32,
        ..request("no entry for you")
    };
    let status = client.unary(failing.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "no entry for you");
    assert!(status.metadata().get("x-skyline-error").is_none());

    // After messages: the status travels in trailers proper, after the stream's data.
    let call = EchoRequest {
        count: 2,
        fail_with: Code::ResourceExhausted as i32,
        ..request("quota")
    };
    let mut stream = client.server_stream(call).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().message, "quota #0");
    assert_eq!(stream.message().await.unwrap().unwrap().message, "quota #1");
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "quota");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_errors_to_grpc_calls_are_grpc_statuses_with_the_mesh_error_kept() {
    let mesh = GrpcMesh::start().await;

    let status = mesh
        .client("no-such-service")
        .await
        .unary(request("x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(
        status.metadata().get("x-skyline-error").unwrap(),
        "unknown-service"
    );

    let status = mesh
        .client("grpc-down")
        .await
        .unary(request("x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.metadata().get("x-skyline-error").unwrap(),
        "upstream-connect"
    );

    // The caller's deadline is the request's: `x-skyline-timeout-ms`, as for HTTP/1.1 ...
    let mut slow = tonic::Request::new(EchoRequest {
        delay_ms: 5_000,
        ..request("slow")
    });
    slow.metadata_mut()
        .insert("x-skyline-timeout-ms", "300".parse().unwrap());
    let started = std::time::Instant::now();
    let status = mesh
        .client("grpc-echo")
        .await
        .unary(slow)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        status.metadata().get("x-skyline-error").unwrap(),
        "upstream-timeout"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // ... and gRPC's own `grpc-timeout` (sent by hand: tonic's client would time out first).
    let stream = tokio::net::TcpStream::connect(&mesh.outbound_a)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let message = prost::Message::encode_to_vec(&EchoRequest {
        delay_ms: 5_000,
        ..request("slow")
    });
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let req = Request::post(format!(
        "http://{}/service/grpc-echo/skyline.test.Echo/Unary",
        mesh.outbound_a
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "300m")
    .body(Full::new(Bytes::from(frame)))
    .unwrap();
    let started = std::time::Instant::now();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["grpc-status"], "4", "{h:?}");
    assert_eq!(h["x-skyline-error"], "upstream-timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_http2_prior_knowledge_reaches_http1_and_h2c_instances_and_http1_callers_share_the_port()
 {
    let mesh = GrpcMesh::start().await;
    let (status, body) = curl_h2(&format!("http://{}/service/web/a/b?c=d", mesh.outbound_a)).await;
    assert_eq!(status, "HTTP/2 200");
    assert_eq!(
        body, "web@b /a/b?c=d",
        "HTTP/2 to the mesh, HTTP/1.1 to the instance"
    );
    let seen = mesh.web.seen().pop().unwrap();
    assert_eq!(seen.headers["x-skyline-hops"], "1");
    assert_eq!(seen.headers["x-forwarded-host"], mesh.outbound_a.as_str());
    assert_eq!(seen.headers["x-request-id"].len(), 32);

    let (status, body) = curl_h2(&format!("http://{}/service/h2web/x?y=1", mesh.outbound_a)).await;
    assert_eq!(status, "HTTP/2 200");
    assert_eq!(
        body, "h2 HTTP/2.0 /x?y=1",
        "HTTP/2 all the way to the h2c instance"
    );

    let (status, _) = curl_h2(&format!("http://{}/service/nowhere/", mesh.outbound_a)).await;
    assert_eq!(
        status, "HTTP/2 404",
        "a plain HTTP/2 request gets the HTTP mesh error"
    );

    // HTTP/1.1 callers on the same port, on the express lane and through hyper (a body).
    let client = Client::new();
    let reply = client
        .get(&format!("http://{}/service/web/plain", mesh.outbound_a))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "web@b /plain");
    let req = Request::post(format!("http://{}/service/web/sink", mesh.outbound_a))
        .body(Full::new(Bytes::from_static(b"12345")))
        .unwrap();
    let reply = client.send(req).await.unwrap();
    assert_eq!(reply.body, "5");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_requests_on_one_http2_connection_each_get_their_own_answer() {
    // One client connection, twenty streams at once, through both hops to an h2c instance.
    let mesh = GrpcMesh::start().await;
    let stream = tokio::net::TcpStream::connect(&mesh.outbound_a)
        .await
        .unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut sender = sender.clone();
        let url = format!("http://{}/service/h2web/call/{i}", mesh.outbound_a);
        calls.spawn(async move {
            let req = Request::get(url).body(Full::<Bytes>::default()).unwrap();
            let response = sender.send_request(req).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (i, body)
        });
    }
    let mut answered = 0;
    while let Some(done) = calls.join_next().await {
        let (i, body) = done.unwrap();
        assert_eq!(body, format!("h2 HTTP/2.0 /call/{i}"));
        answered += 1;
    }
    assert_eq!(answered, 20);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_http2_preface_closes_the_connection_and_reaches_no_instance() {
    let mesh = GrpcMesh::start().await;
    let hits = mesh.web.hits();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend_from_slice(b"GET /service/web/ HTTP/1.1\r\nHost: n\r\n\r\n");
    let started = std::time::Instant::now();
    let reply = raw(mesh.outbound_a.parse().unwrap(), &bytes).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the agent closes the connection (raw gives up after 5 s)"
    );
    assert!(
        !reply.contains("HTTP/1.1"),
        "answered as HTTP/2, not HTTP/1: {reply:?}"
    );
    assert_eq!(mesh.web.hits(), hits, "nothing reached the instance");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_caller_reaches_an_h2c_only_instance_which_answers_over_http2() {
    let mesh = GrpcMesh::start().await;
    // curl speaking HTTP/1.1: a body-less GET (the express lane at the outbound proxy) and a
    // POST with a body (hyper's path); the h2c-only server sees HTTP/2 and answers both.
    let url = format!("http://{}/service/h2web/x?y=1", mesh.outbound_a);
    let (status, body) = curl(&["--http1.1"], &url).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "h2 HTTP/2.0 /x?y=1");
    let (status, body) = curl(&["--http1.1", "--data-binary", "hello"], &url).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "h2 HTTP/2.0 /x?y=1 body=hello");
    // A chunked body of unknown length too.
    let (status, body) = curl(
        &[
            "--http1.1",
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            "in chunks",
        ],
        &url,
    )
    .await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "h2 HTTP/2.0 /x?y=1 body=in chunks");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_caller_reaches_an_http1_instance_with_its_request_body() {
    let mesh = GrpcMesh::start().await;
    let url = format!("http://{}/service/web/sink", mesh.outbound_a);
    let (status, body) = curl(&["--http2-prior-knowledge", "--data-binary", "12345"], &url).await;
    assert_eq!(status, "HTTP/2 200");
    assert_eq!(body, "5", "the HTTP/1.1-only instance read the 5-byte body");
    let seen = mesh.web.seen().pop().unwrap();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body_len, 5);
    mesh.stop().await;
}

/// An HTTP/2 request to node a's outbound listener with body `hello` and trailer
/// `x-check: done`, its `content-length` declared when `declared`; the answer's body.
async fn send_with_trailers(outbound: &str, path: &str, declared: bool) -> String {
    let stream = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-check", "done".parse().unwrap());
    let frames = vec![
        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(b"hello"))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
    let mut req = Request::post(format!("http://{outbound}{path}"));
    if declared {
        req = req.header("content-length", "5");
    }
    let response = sender.send_request(req.body(body).unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_after_a_small_http2_body_reach_the_instance_when_a_catch_all_is_set() {
    // With a catch-all the outbound proxy keeps a small body of declared length in memory, to
    // send it on to the catch-all should the instance's node not forward it: the trailers
    // that followed the body are kept with it.
    let mesh = GrpcMesh::start_with(Some("127.0.0.1:9")).await;
    for declared in [true, false] {
        let body = send_with_trailers(&mesh.outbound_a, "/service/h2web/t", declared).await;
        assert_eq!(
            body, "h2 HTTP/2.0 /t body=hello trailers=x-check=done",
            "content-length declared: {declared}"
        );
    }
    // gRPC through that agent, with a catch-all set, still ends with its status.
    let mut client = mesh.client("grpc-echo").await;
    assert_eq!(
        client.unary(request("hi")).await.unwrap().get_ref().message,
        "hi"
    );
    mesh.stop().await;
}

// === Outbound → gateway → bridge → cluster service ===

/// The catch-all path as processes: an agent for node a (127.0.0.2) whose catalog knows no
/// service and whose catch-all is a gateway (127.0.0.6, an empty catalog), whose Kubernetes
/// tier is a bridge (127.0.0.4), which resolves names through dnsmasq to the "cluster"
/// (127.0.0.5): `grpc-echo` (tonic; no protocol configured: gRPC calls go over h2c), `h2web`
/// (HTTP/2 only, `protocol = "h2c"` in the bridge's file), `web` (an HTTP/1.1 TestApp) and
/// `grpc-down` (a port that refuses connections).
struct ClusterGrpc {
    _dir: tempfile::TempDir,
    _dns: crate::upgrade::ClusterDns,
    processes: Vec<Skyline>,
    outbound: String,
    web: TestApp,
    /// `grpc-rec` (the recording tonic server, no protocol configured).
    recorded: Recorded,
    stop: CancellationToken,
}

impl ClusterGrpc {
    async fn start() -> Self {
        let stop = CancellationToken::new();
        let grpc = grpc_server("127.0.0.5", stop.clone()).await;
        let (rec, recorded) = recording_server("127.0.0.5", stop.clone()).await;
        let h2web = h2_only_server("127.0.0.5", stop.clone()).await;
        let web = TestApp::spawn("web@k8s", ip("127.0.0.5"));
        // A port that refuses connections: bound, then closed.
        let down = std::net::TcpListener::bind("127.0.0.5:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let dns = crate::upgrade::ClusterDns::start(&[
            ("grpc-echo.default.svc.cluster.local", "127.0.0.5"),
            ("h2web.default.svc.cluster.local", "127.0.0.5"),
            ("web.default.svc.cluster.local", "127.0.0.5"),
            ("grpc-down.default.svc.cluster.local", "127.0.0.5"),
            ("grpc-rec.default.svc.cluster.local", "127.0.0.5"),
        ])
        .await;
        let dir = tempfile::tempdir().unwrap();
        let bridge_file = dir.path().join("bridge.toml");
        std::fs::write(
            &bridge_file,
            format!(
                "[bridge]\nport = {}\n\n[services.h2web]\nport = {}\nprotocol = \"h2c\"\n\n\
                 [services.web]\nport = {}\n\n[services.grpc-down]\nport = {}\n\n\
                 [services.grpc-rec]\nport = {}\n",
                grpc.port(),
                h2web.port(),
                web.addr.port(),
                down.port(),
                rec.port()
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
        let bridge_addr = started["listen"].as_str().unwrap().to_owned();

        let empty = dir.path().join("empty.toml");
        write_atomically(
            &empty,
            &skyline::catalog::file::render(&skyline::catalog::Snapshot::default()),
        );
        let mut gateway = Skyline::start(
            &[
                "gateway",
                "--listen=127.0.0.6:0",
                "--admin=off",
                &format!("--catalog-file={}", empty.display()),
                &format!("--bridges={bridge_addr}"),
            ],
            &[],
        );
        let started = gateway.log.wait_for("gateway started").await;
        let gateway_addr = started["gateway"].as_str().unwrap().to_owned();

        let catalog = dir.path().join("catalog.toml");
        std::fs::write(
            &catalog,
            "[[node]]\nname = \"a\"\naddress = \"127.0.0.2\"\n",
        )
        .unwrap();
        let mut agent = Skyline::start(
            &[
                "agent",
                "--node-name",
                "a",
                "--node-address",
                "127.0.0.2",
                "--outbound",
                "127.0.0.2:0",
                "--inbound",
                "127.0.0.2:0",
                "--admin",
                "off",
                "--catalog",
                "file",
                "--catalog-file",
                catalog.to_str().unwrap(),
                &format!("--catch-all={gateway_addr}"),
            ],
            &[],
        );
        let started = agent.log.wait_for("agent started").await;
        let outbound = started["outbound"].as_str().unwrap().to_owned();
        let path = ClusterGrpc {
            _dir: dir,
            _dns: dns,
            processes: vec![agent, gateway, bridge],
            outbound,
            web,
            recorded,
            stop,
        };
        // Bounded: until the whole path answers.
        let client = Client::new();
        let url = format!("http://{}/service/web/", path.outbound);
        for _ in 0..400 {
            if let Ok(reply) = client.get_result(&url).await {
                if reply.status == 200 {
                    return path;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the catch-all path never reached web");
    }

    /// A gRPC client of `service` through the agent's outbound listener.
    async fn client(&self, service: &str) -> EchoClient<tonic::transport::Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.outbound))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let origin = format!("http://{}/service/{service}", self.outbound)
            .parse()
            .unwrap();
        EchoClient::with_origin(channel, origin)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    async fn stop(self) {
        for process in &self.processes {
            process.sigterm();
        }
        for process in self.processes {
            process.exited_cleanly().await;
        }
        self.stop.cancel();
        self.web.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_every_streaming_kind_cross_outbound_gateway_and_bridge_with_their_statuses()
{
    let path = ClusterGrpc::start().await;
    let mut client = path.client("grpc-echo").await;
    let reply = client.unary(request("hello")).await.unwrap();
    assert_eq!(reply.get_ref().message, "hello");

    let call = EchoRequest {
        count: 3,
        ..request("tick")
    };
    let mut stream = client.server_stream(call).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        got.push(reply.message);
    }
    assert_eq!(got, ["tick #0", "tick #1", "tick #2"]);
    let trailers = stream.trailers().await.unwrap().unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");

    let uploads = (0..10).map(|i| EchoRequest {
        payload: vec![7; 1000],
        ..request(&i.to_string())
    });
    let reply = client
        .client_stream(tokio_stream::iter(uploads))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.message, "10 requests, 10000 bytes");

    // Each reply comes back before the next request is sent, through all three proxies.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .bidi(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..5u32 {
        tx.send(request(&format!("ping {i}"))).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .expect("a reply before the next request")
            .unwrap()
            .unwrap();
        assert_eq!(reply.message, format!("echo ping {i}"));
        assert_eq!(reply.index, i);
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());

    // The server's error statuses, in trailers-only answers and after messages.
    let failing = EchoRequest {
        fail_with: Code::PermissionDenied as i32,
        ..request("no entry for you")
    };
    let status = client.unary(failing).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "no entry for you");
    assert!(status.metadata().get("x-skyline-error").is_none());
    let call = EchoRequest {
        count: 2,
        fail_with: Code::ResourceExhausted as i32,
        ..request("quota")
    };
    let mut stream = client.server_stream(call).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().message, "quota #0");
    assert_eq!(stream.message().await.unwrap().unwrap().message, "quota #1");
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(status.message(), "quota");
    path.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_6_mib_grpc_message_crosses_outbound_gateway_and_bridge_both_ways_intact() {
    let path = ClusterGrpc::start().await;
    let mut client = path.client("grpc-echo").await;
    let payload: Vec<u8> = (0..6 << 20).map(|i: u32| (i % 251) as u8).collect();
    let big = EchoRequest {
        payload: payload.clone(),
        ..request("big")
    };
    let started = std::time::Instant::now();
    let reply = client.unary(big).await.unwrap().into_inner();
    eprintln!(
        "6 MiB each way through three proxies: {:?}",
        started.elapsed()
    );
    assert_eq!(reply.payload.len(), payload.len());
    assert!(
        reply.payload == payload,
        "the 6 MiB payload comes back intact"
    );
    path.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_deadlines_expire_through_outbound_gateway_and_bridge_as_deadline_exceeded() {
    let path = ClusterGrpc::start().await;
    // The mesh's deadline (`x-skyline-timeout-ms`) ...
    let mut slow = tonic::Request::new(EchoRequest {
        delay_ms: 5_000,
        ..request("slow")
    });
    slow.metadata_mut()
        .insert("x-skyline-timeout-ms", "300".parse().unwrap());
    let started = std::time::Instant::now();
    let status = path
        .client("grpc-echo")
        .await
        .unary(slow)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        status.metadata().get("x-skyline-error").unwrap(),
        "upstream-timeout"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // ... and gRPC's own `grpc-timeout`, sent by hand (tonic's client would time out first).
    let stream = tokio::net::TcpStream::connect(&path.outbound)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let message = prost::Message::encode_to_vec(&EchoRequest {
        delay_ms: 5_000,
        ..request("slow")
    });
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let req = Request::post(format!(
        "http://{}/service/grpc-echo/skyline.test.Echo/Unary",
        path.outbound
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "300m")
    .body(Full::new(Bytes::from(frame)))
    .unwrap();
    let started = std::time::Instant::now();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["grpc-status"], "4", "{h:?}");
    assert_eq!(h["x-skyline-error"], "upstream-timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    path.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_callers_reach_http1_and_h2c_only_cluster_services_through_gateway_and_bridge()
 {
    let path = ClusterGrpc::start().await;
    // HTTP/1.1 all the way to the bridge, then HTTP/2 to the h2c-only Service.
    let url = format!("http://{}/service/h2web/x?y=1", path.outbound);
    let (status, body) = curl(&["--http1.1"], &url).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "h2 HTTP/2.0 /x?y=1");
    let (status, body) = curl(&["--http1.1", "--data-binary", "hello"], &url).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "h2 HTTP/2.0 /x?y=1 body=hello");
    // HTTP/2 all the way.
    let (status, body) = curl_h2(&url).await;
    assert_eq!(status, "HTTP/2 200");
    assert_eq!(body, "h2 HTTP/2.0 /x?y=1");
    // HTTP/2 to the bridge, then HTTP/1.1 to the HTTP/1.1 Service, a body included.
    let url = format!("http://{}/service/web/sink", path.outbound);
    let (status, body) = curl(&["--http2-prior-knowledge", "--data-binary", "12345"], &url).await;
    assert_eq!(status, "HTTP/2 200");
    assert_eq!(body, "5");
    let seen = path.web.seen().pop().unwrap();
    assert_eq!(
        (seen.method.as_str(), seen.target.as_str()),
        ("POST", "/sink")
    );
    // Trailers after a small HTTP/2 body reach the h2c Service through every hop.
    let body = send_with_trailers(&path.outbound, "/service/h2web/t", true).await;
    assert_eq!(body, "h2 HTTP/2.0 /t body=hello trailers=x-check=done");
    path.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_errors_beyond_the_gateway_reach_grpc_clients_as_grpc_statuses() {
    let path = ClusterGrpc::start().await;
    // Neither the catalog nor the cluster DNS knows it: the bridge's 404 ...
    let status = path
        .client("no-such-service")
        .await
        .unary(request("x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(
        status.metadata().get("x-skyline-error").unwrap(),
        "unknown-service"
    );
    // ... and its refused connection to the Service.
    let status = path
        .client("grpc-down")
        .await
        .unary(request("x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.metadata().get("x-skyline-error").unwrap(),
        "upstream-connect"
    );
    path.stop().await;
}

/// A body-less HTTP/2 request for `path` with `grpc-timeout: 5S` (and `x-skyline-timeout-ms:
/// <mesh_ms>` when given) to `outbound`; the answer's body.
async fn get_h2_with_grpc_timeout(outbound: &str, path: &str, mesh_ms: Option<u64>) -> String {
    let stream = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(format!("http://{outbound}{path}")).header("grpc-timeout", "5S");
    if let Some(ms) = mesh_ms {
        req = req.header("x-skyline-timeout-ms", ms);
    }
    let req = req.body(Full::<Bytes>::default()).unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// The milliseconds of the `grpc-timeout=<n>m` the h2-only server reported in `answer`.
fn reported_grpc_timeout_ms(answer: &str) -> u64 {
    let value = answer
        .split(' ')
        .find_map(|w| w.strip_prefix("grpc-timeout="))
        .unwrap_or_else(|| panic!("no grpc-timeout reached the server: {answer}"));
    value
        .strip_suffix('m')
        .unwrap_or_else(|| panic!("not in milliseconds: {value}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_gets_the_time_left_of_the_request_deadline_as_its_grpc_timeout() {
    let mesh = GrpcMesh::start().await;
    // 5 s given: the server gets at most that, in milliseconds (each hop passes on what is left
    // from when the request reached it).
    let answer = get_h2_with_grpc_timeout(&mesh.outbound_a, "/service/h2web/d", None).await;
    let ms = reported_grpc_timeout_ms(&answer);
    assert!((3_000..=5_000).contains(&ms), "{answer}");
    // A shorter mesh deadline wins, and the server is told so rather than the caller's 5 s.
    let answer = get_h2_with_grpc_timeout(&mesh.outbound_a, "/service/h2web/d", Some(2_000)).await;
    let ms = reported_grpc_timeout_ms(&answer);
    assert!((1_000..=2_000).contains(&ms), "{answer}");
    mesh.stop().await;

    let path = ClusterGrpc::start().await;
    let answer = get_h2_with_grpc_timeout(&path.outbound, "/service/h2web/d", Some(2_000)).await;
    let ms = reported_grpc_timeout_ms(&answer);
    assert!(
        (1_000..=2_000).contains(&ms),
        "through gateway and bridge: {answer}"
    );
    path.stop().await;
}

// === Cancellations ===

/// A client (one HTTP/2 connection) cancels a server-streaming call, a bidi call and a unary
/// call mid-way; each time the server sees its call end within a bounded time (its reply stream
/// dropped, its handler dropped unanswered), no call is left running in it, and the next call on
/// the same connection is answered.
async fn cancelled_calls_end_at_the_server(
    mut client: EchoClient<tonic::transport::Channel>,
    recorded: &mut Recorded,
) {
    // Server streaming: endless replies, every 10 ms; three read, then the stream dropped.
    let call = EchoRequest {
        delay_ms: 10,
        ..request("ticks")
    };
    let mut stream = client.server_stream(call).await.unwrap().into_inner();
    for i in 0..3 {
        let reply = stream.message().await.unwrap().unwrap();
        assert_eq!(reply.message, format!("ticks #{i}"));
    }
    drop(stream);
    let took = recorded
        .wait_for("server_stream ticks: the client went away")
        .await;
    eprintln!("server streaming: the server saw the cancellation after {took:?}");
    let reply = client.unary(request("after the stream")).await.unwrap();
    assert_eq!(reply.get_ref().message, "after the stream");

    // Bidi: two requests echoed, then the call dropped with its request stream still open.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .bidi(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..2 {
        tx.send(request(&format!("ping {i}"))).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .expect("an echo")
            .unwrap()
            .unwrap();
        assert_eq!(reply.message, format!("echo ping {i}"));
    }
    drop(replies);
    drop(tx);
    let took = recorded.wait_for("bidi: the client went away").await;
    eprintln!("bidi: the server saw the cancellation after {took:?}");
    let reply = client.unary(request("after bidi")).await.unwrap();
    assert_eq!(reply.get_ref().message, "after bidi");

    // Unary: the server would answer after 30 s; the caller gives up after 300 ms.
    let slow = EchoRequest {
        delay_ms: 30_000,
        ..request("slow")
    };
    let gave_up = tokio::time::timeout(Duration::from_millis(300), client.unary(slow)).await;
    assert!(gave_up.is_err(), "answered before the caller gave up");
    let took = recorded.wait_for("unary slow: dropped unanswered").await;
    eprintln!("unary: the server saw the cancellation after {took:?}");

    recorded.wait_idle().await;
    let reply = client.unary(request("still here")).await.unwrap();
    assert_eq!(reply.get_ref().message, "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_streaming_and_unary_calls_end_at_the_server_through_both_hops_and_the_connection_serves_on()
 {
    let mut mesh = GrpcMesh::start().await;
    let client = mesh.client("grpc-rec").await;
    cancelled_calls_end_at_the_server(client, &mut mesh.recorded).await;
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_streaming_and_unary_calls_end_at_the_server_through_outbound_gateway_and_bridge()
{
    let mut path = ClusterGrpc::start().await;
    let client = path.client("grpc-rec").await;
    cancelled_calls_end_at_the_server(client, &mut path.recorded).await;
    path.stop().await;
}

// === Health checks of h2c-only instances ===

/// The status and output of `service`'s first check in the registry at `registry`, if it has an
/// instance.
async fn check_of(
    registry: &skyline::registry::client::RegistryClient,
    service: &str,
) -> Option<(String, String)> {
    let body = registry
        .get(&format!("/v1/health/service/{service}"))
        .await
        .ok()?;
    let entries: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let check = entries.get(0)?["Checks"]
        .as_array()?
        .iter()
        .find(|c| c["ServiceName"] == service)?
        .clone();
    Some((
        check["Status"].as_str()?.to_owned(),
        check["Output"].as_str()?.to_owned(),
    ))
}

/// Waits (bounded: 10 s) until `service`'s check is `status` after a probe ran (its output is
/// set: `skyline register --node` registers the check as passing before any probe); its output.
async fn check_becomes(
    registry: &skyline::registry::client::RegistryClient,
    service: &str,
    status: &str,
) -> String {
    let mut last = None;
    for _ in 0..500 {
        last = check_of(registry, service).await;
        if let Some((now, output)) = &last {
            if now == status && !output.is_empty() {
                return output.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{service}'s check never became {status}: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_only_grpc_server_registered_with_an_http_or_h2ping_check_goes_passing_and_is_routed()
 {
    let stop = CancellationToken::new();
    // tonic's server speaks only HTTP/2 (prior knowledge): an HTTP/1.1 check cannot pass.
    let grpc = grpc_server("127.0.0.3", stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    // Ports picked ahead: the registry's, and the inbound proxy's, which the node's registration
    // names (outbound calls reach a node's instances through its inbound proxy).
    let free = || {
        let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        l.local_addr().unwrap()
    };
    let (registry_addr, inbound) = (free(), free());
    let mut agent = Skyline::start(
        &[
            "agent",
            "--node-name=a",
            "--node-address=127.0.0.2",
            "--outbound=127.0.0.2:0",
            &format!("--inbound={inbound}"),
            "--admin=off",
            "--catalog=embedded",
            &format!("--registry={registry_addr}"),
            &format!("--data-dir={}", dir.path().join("data").display()),
        ],
        &[],
    );
    let started = agent.log.wait_for("agent started").await;
    let outbound = started["outbound"].as_str().unwrap().to_owned();
    let registry = skyline::registry::client::RegistryClient::new(registry_addr);

    // `skyline register` with an HTTP check (`GET /`: tonic answers any path), once with meta
    // `protocol = "h2c"` and once without.
    let port = grpc.port().to_string();
    for (name, meta) in [("grpc-echo", Some("protocol=h2c")), ("grpc-plain", None)] {
        let mut register = std::process::Command::new(env!("CARGO_BIN_EXE_skyline"));
        register.args(["register", "--registry", &registry_addr.to_string()]);
        register.args(["--name", name, "--address", "127.0.0.3", "--port", &port]);
        register.args(["--node", "a", "--node-address", "127.0.0.2"]);
        register.args(["--inbound-port", &inbound.port().to_string()]);
        register.args(["--http", "/", "--interval", "200ms", "--timeout", "2s"]);
        if let Some(meta) = meta {
            register.args(["--meta", meta]);
        }
        let out = register.output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let output = check_becomes(&registry, "grpc-echo", "passing").await;
    assert!(output.contains("(h2c): 200"), "checked over h2c: {output}");
    let output = check_becomes(&registry, "grpc-plain", "critical").await;
    assert!(
        !output.contains("h2c"),
        "without the protocol, checked over HTTP/1.1: {output}"
    );

    // Consul's H2PING check over h2c (`H2PingUseTLS` false), by the Consul API.
    let service = serde_json::json!({
        "Name": "grpc-ping",
        "Address": "127.0.0.3",
        "Port": grpc.port(),
        "Meta": { "protocol": "h2c" },
        "Check": {
            "H2PING": format!("127.0.0.3:{port}"),
            "H2PingUseTLS": false,
            "Interval": "200ms",
        },
    });
    registry
        .put_json("/v1/agent/service/register", &service)
        .await
        .unwrap();
    let output = check_becomes(&registry, "grpc-ping", "passing").await;
    assert!(output.contains("HTTP2 ping was successful"), "{output}");
    // Consul's default for H2PING is TLS, which this registry does not do: refused, with why.
    let over_tls = serde_json::json!({
        "Name": "grpc-tls",
        "Port": grpc.port(),
        "Check": { "H2PING": format!("127.0.0.3:{port}"), "Interval": "1s" },
    });
    let refused = registry
        .put_json("/v1/agent/service/register", &over_tls)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("H2PingUseTLS"), "{refused}");
    // An H2PING to a server that does not speak HTTP/2 fails.
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let http1 = serde_json::json!({
        "Name": "web",
        "Port": web.addr.port(),
        "Check": {
            "H2PING": web.addr.to_string(),
            "H2PingUseTLS": false,
            "Interval": "200ms",
        },
    });
    registry
        .put_json("/v1/agent/service/register", &http1)
        .await
        .unwrap();
    check_becomes(&registry, "web", "critical").await;

    // The passing instances are routed, over h2c; the critical one is not.
    for service in ["grpc-echo", "grpc-ping"] {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let origin = format!("http://{outbound}/service/{service}")
            .parse()
            .unwrap();
        let mut client = EchoClient::with_origin(channel, origin);
        let mut reply = Err(Status::unknown("never called"));
        for _ in 0..400 {
            reply = client.unary(request(service)).await;
            if reply.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let reply = reply.unwrap_or_else(|e| panic!("{service} is not routed: {e:?}"));
        assert_eq!(reply.into_inner().message, service);
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let origin = format!("http://{outbound}/service/grpc-plain")
        .parse()
        .unwrap();
    let status = EchoClient::with_origin(channel, origin)
        .unary(request("x"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    agent.sigterm();
    agent.exited_cleanly().await;
    stop.cancel();
    web.stop().await;
}
