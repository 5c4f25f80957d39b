//! The integration-test harness: real applications and real agents on real loopback sockets.
//!
//! - [`TestApp`]: an HTTP application that says who it is and records what it received.
//! - [`TestMesh`]: agents on loopback "nodes" (127.0.0.2, 127.0.0.3, ...) sharing one catalog
//!   file, which a test rewrites atomically to move services around.
//! - [`Client`] and [`raw`]: a real HTTP client, and a raw TCP one for malformed input.
//! - [`scrape`]: an admin listener's `/metrics`, read over HTTP.

/// The network-namespace lab is the library's, shared with `skyline demo migration`.
pub use skyline::netns;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use skyline::agent::{self, AgentHandle, Listeners, Settings};
use skyline::catalog::CatalogSource;
use skyline::catalog::{Health, Instance, Node, ServiceName, Snapshot, file};
use skyline::proxy::resilience::{Policies, Resilience};
use skyline::routing::Policy;
use skyline::routing::balance::Balance;
use skyline::serve::{self, Conn, Handler};

pub fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

// === TestApp ===

/// What an application received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query, as the application received them.
    pub target: String,
    pub headers: HeaderMap,
    pub body_len: u64,
}

/// A real HTTP application. It answers `<name> <path-and-query>` with status 200, and:
/// - `/bytes/<n>`: streams `n` bytes (for download tests);
/// - `/sink`: reads the whole body, frame by frame, and answers its length (upload tests);
/// - `/slow/<ms>`: answers after that many milliseconds.
///
/// A [`Behaviour`] makes it slow or failing, for fault tests.
pub struct TestApp {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    hits: Arc<AtomicU64>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// How a [`TestApp`] misbehaves.
#[derive(Clone, Copy, Debug, Default)]
pub enum Behaviour {
    #[default]
    Healthy,
    /// Every answer takes this long.
    Slow(Duration),
    /// Every n-th request (1: every one) gets 503.
    Fail503Every(u64),
}

#[derive(Clone)]
struct AppHandler {
    name: Arc<str>,
    seen: Arc<Mutex<Vec<Seen>>>,
    hits: Arc<AtomicU64>,
    behaviour: Behaviour,
}

impl Handler for AppHandler {
    type Body = Either<Zeros, Full<Bytes>>;

    async fn handle(&self, req: Request<Incoming>, _conn: Conn) -> Response<Self::Body> {
        let n = self.hits.fetch_add(1, Ordering::Relaxed) + 1;
        match self.behaviour {
            Behaviour::Healthy => {}
            Behaviour::Slow(time) => tokio::time::sleep(time).await,
            Behaviour::Fail503Every(k) if n % k.max(1) == 0 => {
                let mut response = Response::new(Either::Right(Full::new(Bytes::from("down"))));
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                return response;
            }
            Behaviour::Fail503Every(_) => {}
        }
        let (parts, mut body) = req.into_parts();
        let target = parts
            .uri
            .path_and_query()
            .map_or("/".into(), |pq| pq.to_string());
        let mut body_len = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            body_len += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        self.seen.lock().unwrap().push(Seen {
            method: parts.method.to_string(),
            target: target.clone(),
            headers: parts.headers.clone(),
            body_len,
        });
        let path = parts.uri.path();
        if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse().ok()) {
            return Response::new(Either::Left(Zeros { left: n }));
        }
        if let Some(ms) = path.strip_prefix("/slow/").and_then(|n| n.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let text = if path == "/sink" {
            body_len.to_string()
        } else {
            format!("{} {target}", self.name)
        };
        Response::new(Either::Right(Full::new(Bytes::from(text))))
    }
}

/// A streamed body of zero bytes, produced 64 KiB at a time.
pub struct Zeros {
    pub left: u64,
}

static CHUNK: [u8; 64 * 1024] = [0; 64 * 1024];

impl http_body::Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(CHUNK.len() as u64);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &CHUNK[..n as usize],
        )))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

impl TestApp {
    /// Starts an application named `name` on `ip`, port chosen by the kernel.
    pub fn spawn(name: &str, ip: IpAddr) -> Self {
        Self::spawn_with(name, ip, Behaviour::Healthy)
    }

    pub fn spawn_with(name: &str, ip: IpAddr, behaviour: Behaviour) -> Self {
        let listener = serve::bind(SocketAddr::new(ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hits = Arc::new(AtomicU64::new(0));
        let handler = AppHandler {
            name: name.into(),
            seen: seen.clone(),
            hits: hits.clone(),
            behaviour,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve::serve(listener, handler, shutdown.clone()));
        Self {
            addr,
            seen,
            hits,
            shutdown,
            task,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

// === TestMesh ===

/// One instance in the catalog: service `service` served by `app` on node `node`.
#[derive(Clone, Debug)]
pub struct Placement {
    pub service: &'static str,
    pub node: &'static str,
    pub addr: SocketAddr,
    pub health: Health,
}

pub fn place(service: &'static str, node: &'static str, app: &TestApp) -> Placement {
    Placement {
        service,
        node,
        addr: app.addr,
        health: Health::Passing,
    }
}

/// Agents on loopback nodes, sharing one catalog file.
pub struct TestMesh {
    pub dir: tempfile::TempDir,
    pub agents: BTreeMap<&'static str, AgentHandle>,
    nodes: BTreeMap<&'static str, Node>,
}

pub struct TestMeshBuilder {
    nodes: Vec<(&'static str, IpAddr)>,
    placements: Vec<Placement>,
    catch_all: Vec<SocketAddr>,
    resilience: Policies,
}

impl TestMesh {
    pub fn builder() -> TestMeshBuilder {
        TestMeshBuilder {
            nodes: Vec::new(),
            placements: Vec::new(),
            catch_all: Vec::new(),
            resilience: Policies::default(),
        }
    }

    pub fn catalog_path(&self) -> PathBuf {
        self.dir.path().join("catalog.toml")
    }

    /// Rewrites the catalog atomically (write + rename, as configuration tools do).
    pub fn set_catalog(&self, placements: &[Placement]) {
        write_atomically(
            &self.catalog_path(),
            &file::render(&self.snapshot(placements)),
        );
    }

    /// Rewrites the catalog and waits until every agent routes with it.
    pub async fn set_catalog_and_wait(&self, placements: &[Placement]) {
        let expected = self.snapshot(placements);
        self.set_catalog(placements);
        for agent in self.agents.values() {
            let mut rx = agent.catalog.clone();
            tokio::time::timeout(
                Duration::from_secs(10),
                rx.wait_for(|s| s.snapshot.as_deref() == Some(&expected)),
            )
            .await
            .expect("agents pick up the catalog")
            .unwrap();
        }
        // The route table follows the catalog in the same task turn; give it one.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    fn snapshot(&self, placements: &[Placement]) -> Snapshot {
        let mut services: BTreeMap<ServiceName, Vec<Instance>> = BTreeMap::new();
        for (i, p) in placements.iter().enumerate() {
            let service = ServiceName::parse(p.service).unwrap();
            services.entry(service.clone()).or_default().push(Instance {
                id: format!("{}-{i}", p.service),
                service,
                node: p.node.into(),
                address: p.addr.ip(),
                port: p.addr.port(),
                tags: Vec::new().into(),
                meta: Default::default(),
                health: p.health,
                weight: 1,
            });
        }
        Snapshot {
            nodes: Arc::new(
                self.nodes
                    .iter()
                    .map(|(k, v)| ((*k).into(), v.clone()))
                    .collect(),
            ),
            services: services.into_iter().map(|(s, i)| (s, i.into())).collect(),
        }
    }

    /// The outbound address of node `name`'s agent: where its applications send requests.
    pub fn outbound(&self, name: &str) -> SocketAddr {
        self.agents[name].outbound.unwrap()
    }

    pub fn inbound(&self, name: &str) -> SocketAddr {
        self.agents[name].inbound.unwrap()
    }

    pub fn admin(&self, name: &str) -> SocketAddr {
        self.agents[name].admin.unwrap()
    }

    pub async fn stop(self) {
        for agent in self.agents.into_values() {
            agent.shutdown();
            agent.join().await;
        }
    }
}

impl TestMeshBuilder {
    /// A node with an agent whose listeners bind `ip`.
    pub fn node(mut self, name: &'static str, ip: &str) -> Self {
        self.nodes.push((name, self::ip(ip)));
        self
    }

    pub fn place(mut self, placement: Placement) -> Self {
        self.placements.push(placement);
        self
    }

    pub fn catch_all(mut self, addr: SocketAddr) -> Self {
        self.catch_all.push(addr);
        self
    }

    /// The agents' timeouts, retries, balancing and ejection.
    pub fn resilience(mut self, policies: Policies) -> Self {
        self.resilience = policies;
        self
    }

    pub async fn spawn(self) -> TestMesh {
        let dir = tempfile::tempdir().unwrap();
        let catalog = dir.path().join("catalog.toml");
        let mut bound = Vec::new();
        let mut nodes = BTreeMap::new();
        for (name, ip) in &self.nodes {
            let settings = Settings {
                node_name: (*name).to_owned(),
                node_address: *ip,
                outbound: Some(SocketAddr::new(*ip, 0)),
                inbound: Some(SocketAddr::new(*ip, 0)),
                admin: Some(SocketAddr::new(*ip, 0)),
                catalog: CatalogSource::File(catalog.clone()),
                catch_all: self.catch_all.clone(),
                policy: Policy::default(),
                workers: 1,
                resilience: self.resilience.clone(),
                access: skyline::access::Settings::off(),
                peer_protocol: Default::default(),
                services: Vec::new(),
                tls: None,
                authz: Default::default(),
                tokens: Default::default(),
            };
            let listeners = Listeners::bind(&settings).unwrap();
            let port = listeners
                .inbound
                .as_ref()
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            nodes.insert(
                *name,
                Node {
                    name: (*name).into(),
                    address: *ip,
                    inbound_port: port,
                    meta: Default::default(),
                },
            );
            bound.push((*name, settings, listeners));
        }
        let mut mesh = TestMesh {
            dir,
            agents: BTreeMap::new(),
            nodes,
        };
        mesh.set_catalog(&self.placements);
        for (name, settings, listeners) in bound {
            let agent = agent::start(settings, listeners, CancellationToken::new())
                .await
                .unwrap();
            mesh.agents.insert(name, agent);
        }
        mesh
    }
}

/// Policies with `change` applied to the defaults, for every service.
pub fn policies(change: impl FnOnce(&mut Resilience)) -> Policies {
    let mut default = Resilience::default();
    change(&mut default);
    Policies {
        default: std::sync::Arc::new(default),
        ..Policies::default()
    }
}

/// Plain weighted round robin, for tests that count exact shares.
pub fn round_robin() -> Policies {
    policies(|r| r.balance = Balance::RoundRobin)
}

pub fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// === Client ===

/// A real HTTP/1.1 client with a keep-alive pool, as an application would use.
#[derive(Clone)]
pub struct Client {
    inner: HyperClient<HttpConnector, Full<Bytes>>,
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    pub fn mesh_error(&self) -> Option<&str> {
        self.headers
            .get("x-skyline-error")
            .map(|v| v.to_str().unwrap())
    }
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Self {
        Self {
            inner: HyperClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// A client that drops a pooled connection once it has been idle for `idle`.
    pub fn with_idle_timeout(idle: Duration) -> Self {
        Self {
            inner: HyperClient::builder(TokioExecutor::new())
                .pool_idle_timeout(idle)
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build_http(),
        }
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Reply, String> {
        let response = tokio::time::timeout(Duration::from_secs(30), self.inner.request(req))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    pub async fn get(&self, url: &str) -> Reply {
        let req = Request::get(url).body(Full::default()).unwrap();
        self.send(req).await.unwrap()
    }
}

// === raw ===

/// Sends `bytes` over a fresh TCP connection and returns everything the server sent back until
/// it closed the connection (or 5 s passed).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

// === Load ===

/// What a run of [`load`] saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub sent: u64,
    /// Answers by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests without an answer, with the first few reasons.
    pub errors: u64,
    pub reasons: Vec<String>,
}

impl LoadReport {
    /// Requests that did not get a 2xx answer.
    pub fn failed(&self) -> u64 {
        self.errors
            + self
                .statuses
                .iter()
                .filter(|(s, _)| !(200..300).contains(*s))
                .map(|(_, n)| n)
                .sum::<u64>()
    }
}

/// GETs `url` from `workers` keep-alive clients for `time`, each pausing `pause` between
/// requests. Bounded in time and in count (10,000 per worker).
pub async fn load(url: &str, workers: usize, time: Duration, pause: Duration) -> LoadReport {
    let deadline = tokio::time::Instant::now() + time;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url) = (Client::new(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut report = LoadReport::default();
            for _ in 0..10_000 {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                report.sent += 1;
                let req = Request::get(&url).body(Full::default()).unwrap();
                match client.send(req).await {
                    Ok(reply) => *report.statuses.entry(reply.status).or_default() += 1,
                    Err(e) => {
                        report.errors += 1;
                        if report.reasons.len() < 5 {
                            report.reasons.push(e);
                        }
                    }
                }
                tokio::time::sleep(pause).await;
            }
            report
        }));
    }
    let mut total = LoadReport::default();
    for task in tasks {
        let r = task.await.unwrap();
        total.sent += r.sent;
        total.errors += r.errors;
        total.reasons.extend(r.reasons);
        for (s, n) in r.statuses {
            *total.statuses.entry(s).or_default() += n;
        }
    }
    total
}

// === scrape ===

/// One scrape of an admin listener's `/metrics`.
pub struct Scrape {
    pub text: String,
}

impl Scrape {
    /// The value of the sample `series` (name and labels exactly as exposed, such as
    /// `skyline_requests_total{role="outbound",service="web",code="200",error=""}`).
    pub fn value(&self, series: &str) -> Option<f64> {
        self.text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// [`Scrape::value`], 0 when the series does not exist (yet).
    pub fn count(&self, series: &str) -> f64 {
        self.value(series).unwrap_or(0.0)
    }
}

/// A JSON log line's level (`WARN`, `INFO`, ...) and message.
#[derive(Debug, PartialEq, Eq)]
pub struct Logged {
    pub level: String,
    pub message: String,
}

/// The stderr lines of a child process, drained as they come so the child never blocks on a
/// full pipe.
pub struct StderrLog(tokio::sync::mpsc::UnboundedReceiver<String>);

impl StderrLog {
    /// Takes over `child`'s piped stderr.
    pub fn follow(child: &mut tokio::process::Child) -> Self {
        use tokio::io::AsyncBufReadExt;
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = tx.send(line);
            }
        });
        Self(rx)
    }

    /// The next line; `None` once the child has closed stderr.
    pub async fn next(&mut self) -> Option<String> {
        self.0.recv().await
    }

    /// The `fields` of the first JSON log line whose message is `message` (bounded: 20 s).
    pub async fn wait_for(&mut self, message: &str) -> serde_json::Value {
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = self.0.recv().await {
                if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
                    if json["fields"]["message"] == message {
                        return Some(json["fields"].clone());
                    }
                }
            }
            None
        });
        found
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("no log line {message:?}"))
    }

    /// The JSON log lines read until `done` holds for those read so far (bounded: 20 s), in
    /// order.
    pub async fn until(&mut self, done: impl Fn(&[Logged]) -> bool) -> Vec<Logged> {
        let mut seen = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), async {
            while !done(&seen) {
                let Some(line) = self.0.recv().await else {
                    return;
                };
                if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
                    if let Some(message) = json["fields"]["message"].as_str() {
                        let level = json["level"].as_str().unwrap_or_default().to_owned();
                        let message = message.to_owned();
                        seen.push(Logged { level, message });
                    }
                }
            }
        });
        let finished = read.await.is_ok() && done(&seen);
        assert!(
            finished,
            "the log never showed what was awaited; saw {seen:?}"
        );
        seen
    }

    /// The JSON log lines read until each of `messages` has been seen (bounded: 20 s).
    pub async fn until_all(&mut self, messages: &[&str]) -> Vec<Logged> {
        self.until(|seen| {
            messages
                .iter()
                .all(|m| seen.iter().any(|s| s.message == *m))
        })
        .await
    }
}

/// Nodes a (127.0.0.2), b and c, with applications on b and c and `web` placed on b only (c is
/// there for a catalog change to move `web` to).
pub async fn mesh_with_b_and_c() -> (TestMesh, TestApp, TestApp) {
    let b = TestApp::spawn("b", ip("127.0.0.3"));
    let c = TestApp::spawn("c", ip("127.0.0.4"));
    let mesh = TestMesh::builder()
        .node("a", "127.0.0.2")
        .node("b", "127.0.0.3")
        .node("c", "127.0.0.4")
        .place(place("web", "b", &b))
        .spawn()
        .await;
    (mesh, b, c)
}

/// `GET /metrics` on the admin listener `admin`; checks the Prometheus text content type.
pub async fn scrape(admin: SocketAddr) -> Scrape {
    let reply = Client::new().get(&format!("http://{admin}/metrics")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    Scrape { text: reply.body }
}

// === Processes ===

/// This build's `skyline` binary.
pub const SKYLINE: &str = env!("CARGO_BIN_EXE_skyline");

impl Client {
    /// [`Client::get`] that returns a failure instead of panicking on it.
    pub async fn get_result(&self, url: &str) -> Result<Reply, String> {
        let req = Request::get(url).body(Full::default()).unwrap();
        self.send(req).await
    }
}

/// A `skyline` process with JSON logs; stderr keeps being drained so it never blocks.
pub struct Skyline {
    pub child: tokio::process::Child,
    pub log: StderrLog,
}

impl Skyline {
    /// Starts `skyline registry` (node name `registry`) on a free loopback port with its data
    /// in `dir/registry`, and waits until it serves; returns it and its address.
    pub async fn registry(dir: &std::path::Path) -> (Self, String) {
        let addr = free_addr("127.0.0.1");
        (Self::registry_at(&addr, &dir.join("registry")).await, addr)
    }

    /// Starts `skyline registry` (node name `registry`) on `addr` with its data in `data`, and
    /// waits until it serves.
    pub async fn registry_at(addr: &str, data: &std::path::Path) -> Self {
        let data = data.to_str().unwrap();
        let args = ["registry", "--listen", addr, "--data-dir", data];
        let mut registry = Self::start(&[&args[..], &["--node-name", "registry"]].concat(), &[]);
        registry.log.wait_for("registry started").await;
        registry
    }

    /// Starts `skyline <args>` (this build's binary) with JSON logs at level info; with
    /// `sockets`, as systemd would (see [`Skyline::spawn`]).
    pub fn start(args: &[&str], sockets: &[(&str, &std::net::TcpListener)]) -> Self {
        let mut command = std::process::Command::new(SKYLINE);
        command
            .args(args)
            .args(["--log-format", "json"])
            .env("SKYLINE_LOG", "info");
        Self::spawn(command, sockets)
    }

    /// Spawns `command` (program, arguments and environment as given; it must log JSON); with
    /// `sockets`, as systemd would: each socket at fd 3, 4, ..., named in `LISTEN_FDNAMES`, and
    /// `LISTEN_PID` set to the process's own pid (a shell sets it, then execs the program in its
    /// place).
    pub fn spawn(
        command: std::process::Command,
        sockets: &[(&str, &std::net::TcpListener)],
    ) -> Self {
        use command_fds::{CommandFdExt, FdMapping};
        let mut command = if sockets.is_empty() {
            command
        } else {
            let mut sh = std::process::Command::new("sh");
            sh.arg("-c")
                .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
                .arg(command.get_program())
                .args(command.get_args());
            for (key, value) in command.get_envs() {
                match value {
                    Some(value) => sh.env(key, value),
                    None => sh.env_remove(key),
                };
            }
            let names: Vec<&str> = sockets.iter().map(|(name, _)| *name).collect();
            let mappings = sockets
                .iter()
                .enumerate()
                .map(|(i, (_, socket))| FdMapping {
                    parent_fd: std::os::fd::OwnedFd::from(socket.try_clone().unwrap()),
                    child_fd: 3 + i as i32,
                })
                .collect();
            sh.env("LISTEN_FDS", sockets.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"))
                .fd_mappings(mappings)
                .unwrap();
            sh
        };
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = tokio::process::Command::from(command)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = StderrLog::follow(&mut child);
        Self { child, log }
    }

    pub fn sigterm(&self) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (bounded: 20 s) and asserts it exited cleanly.
    pub async fn exited_cleanly(mut self) {
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the process exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "{status}");
    }
}

/// A port on `ip` that nothing listens on now, for a process the test starts (and may restart)
/// on it.
///
/// Binding `:0` and closing would hand out a port from the kernel's ephemeral range, where any
/// outgoing connection of this run (hundreds per test) can be given it before the process binds.
/// These ports come from just below that range instead, which `connect` never picks, and from a
/// counter, so no two tests of this run get the same one; a bind checks each is free now.
pub fn free_port(ip: &str) -> u16 {
    use std::sync::OnceLock;
    use std::sync::atomic::AtomicU32;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static EPHEMERAL: OnceLock<u32> = OnceLock::new();
    let ephemeral = *EPHEMERAL.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32768)
    });
    let span = ephemeral.saturating_sub(1024).min(10_000);
    if span < 100 {
        // No room below the ephemeral range: the kernel's choice.
        let socket = std::net::TcpListener::bind(format!("{ip}:0")).unwrap();
        return socket.local_addr().unwrap().port();
    }
    // Runs started side by side (two checkouts) begin at different places.
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = ephemeral - span + start.wrapping_add(n) % span;
        let port = u16::try_from(port).expect("below the ephemeral range");
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip} below {ephemeral}");
}

/// `ip:port` with a [`free_port`].
pub fn free_addr(ip: &str) -> String {
    format!("{ip}:{}", free_port(ip))
}

/// A listening socket as a supervisor holds it: bound once, with a deep backlog for the
/// connections that arrive while no process accepts.
pub fn supervised_socket(ip: &str) -> std::net::TcpListener {
    let addr: SocketAddr = format!("{ip}:0").parse().unwrap();
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&addr.into()).unwrap();
    socket.listen(1024).unwrap();
    socket.into()
}

pub fn port(socket: &std::net::TcpListener) -> u16 {
    socket.local_addr().unwrap().port()
}

/// The agent's `/readyz` at `admin` until `done` holds for it (bounded: 30 s).
pub async fn readyz_until(
    admin: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let url = format!("http://{admin}/readyz");
    let client = Client::new();
    let mut ready = serde_json::Value::Null;
    for _ in 0..150 {
        ready = client.get(&url).await.json();
        if done(&ready) {
            return ready;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{url} never reached the expected state; last {ready}");
}

/// Waits until `url` answers 200 (bounded: 20 s).
pub async fn until_ok(url: &str) {
    let client = Client::new();
    for _ in 0..400 {
        if let Ok(reply) = client.get_result(url).await {
            if reply.status == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never answered 200");
}
