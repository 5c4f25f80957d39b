//! The seed's migration, end to end, in network namespaces: two Mesos nodes with agents, two
//! Kubernetes nodes with bridges, a gateway node with the registry, a real DNS server (dnsmasq)
//! as the cluster DNS, and applications as real processes — under constant load from a Mesos
//! node calling `localhost:5040/service/giphy/media`.
//!
//! Applications, the load generator and the cluster-DNS caller are this test binary run again
//! inside a namespace (`ip netns exec <ns> <this exe> --exact migration::netns_child`), with
//! the role in `SKYLINE_IT_CHILD`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::support::SKYLINE;
use crate::support::netns::{Lab, ProcId};
use skyline::demo::migration::Placement;
use skyline::demo::migration::mesh::{
    self, DNS, GIPHY_PORT, GW, INBOUND_PORT, K1, M1, M2, Mesh, MeshError, Node, ORGANIZATION_PORT,
    POD_CALLER, POD_GIPHY, SERVICE_PORT,
};
use skyline::registry::client::RegistryClient;
use skyline::serve::{self, Conn, Handler};

const CHILD_ROLE: &str = "SKYLINE_IT_CHILD";
/// The load: requests per second, for the whole scenario.
const RATE: u64 = 200;
/// The load generator stops by itself after this long, whatever happens.
const LOAD_MAX: Duration = Duration::from_secs(150);
/// The gateway's (and the agents') fail-back hold in this scenario.
const HOLD: Duration = Duration::from_secs(3);
/// A second Kubernetes node with a bridge, which the demo does not have: the `phantom`
/// Service targets it.
const K2: Node = Node::new("k2", 22);

// === The children ===

/// Runs as an application, a load generator or a one-shot caller when re-executed in a
/// namespace; does nothing in a normal test run.
#[test]
fn netns_child() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match role.as_str() {
            "app" => run_app().await,
            "load" => run_load().await,
            "call" => run_call().await,
            other => panic!("unknown child role {other}"),
        }
    });
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} is not set"))
}

/// An application that says which platform served it: `<platform> <name> <path>`, status 200,
/// or 500 when `APP_BROKEN` is set. Drains and exits on SIGTERM.
#[derive(Clone)]
struct App {
    platform: String,
    name: String,
    broken: bool,
}

impl Handler for App {
    type Body = Full<Bytes>;

    async fn handle(&self, req: Request<Incoming>, _conn: Conn) -> Response<Full<Bytes>> {
        let mut text = format!("{} {} {}", self.platform, self.name, req.uri().path());
        if let Some(order) = req.headers().get("x-order").and_then(|v| v.to_str().ok()) {
            // Written (stderr: unbuffered, into the process's log) before anything else: a
            // request this process received is on record even if it is killed the next instant.
            eprintln!("GOT {order}");
        }
        if req.method() == http::Method::POST {
            // The body comes back, so the caller can tell it arrived whole.
            use http_body_util::BodyExt;
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            text.push(' ');
            text.push_str(&String::from_utf8_lossy(&body.unwrap_or_default()));
        }
        let mut response = Response::new(Full::new(Bytes::from(text)));
        if self.broken {
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        }
        response
    }
}

async fn run_app() {
    let listen: SocketAddr = env("APP_LISTEN").parse().unwrap();
    let app = App {
        platform: env("APP_PLATFORM"),
        name: env("APP_NAME"),
        broken: std::env::var("APP_BROKEN").is_ok(),
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        term.recv().await;
        stop.cancel();
    });
    let listener = serve::bind(listen).unwrap();
    println!("READY");
    serve::serve(listener, app, shutdown).await;
}

/// `RATE` requests a second (or `LOAD_RATE`) to `LOAD_URL` until stdin closes or `LOAD_MAX`
/// passes; one line per answer: `LOAD <ms since start> <order> <status> <first word of the body
/// or the mesh error>`, where `<order>` is the request's number, also sent as `x-order`. With
/// `LOAD_METHOD=POST`, each request carries a body of its own, and an answer that does not echo
/// it counts as `bad-echo`.
async fn run_load() {
    let url = env("LOAD_URL");
    let post = std::env::var("LOAD_METHOD").is_ok_and(|m| m == "POST");
    let rate: u64 = std::env::var("LOAD_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(RATE);
    let client = crate::support::Client::new();
    let start = Instant::now();
    println!("LOAD-START");
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    std::thread::spawn(move || {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        let _ = stop_tx.send(true);
    });
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
    let max = LOAD_MAX.as_secs() * rate;
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    for n in 0..max {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop_rx.changed() => break,
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            let body = format!("order-{n}-{}", "x".repeat(200));
            let req = if post {
                Request::post(&url)
                    .header("x-order", n)
                    .body(Full::from(body.clone()))
            } else {
                Request::get(&url)
                    .header("x-order", n)
                    .body(Full::default())
            };
            let req = req.unwrap();
            let line = match client.send(req).await {
                Ok(reply) => {
                    let echoed = !post || reply.status != 200 || reply.body.ends_with(&body);
                    let what = reply
                        .mesh_error()
                        .map(str::to_owned)
                        .unwrap_or_else(|| reply.body.split(' ').next().unwrap_or("").to_owned());
                    let what = if echoed { what } else { "bad-echo".to_owned() };
                    format!("{} {what}", reply.status)
                }
                Err(e) => format!("0 client-error:{}", e.replace(' ', "_")),
            };
            println!("LOAD {} {n} {line}", start.elapsed().as_millis());
            drop(permit);
        });
    }
    // Let the last requests finish (bounded).
    let _ = tokio::time::timeout(Duration::from_secs(10), in_flight.acquire_many(256)).await;
    println!("LOAD-END");
}

/// `CALL_COUNT` GETs of `CALL_URL`, its host resolved through the DNS at `CALL_DNS` (as a pod
/// would); one line per answer: `CALL <status> <body>`.
async fn run_call() {
    let url: http::Uri = env("CALL_URL").parse().unwrap();
    let count: usize = env("CALL_COUNT").parse().unwrap();
    let dns: SocketAddr = env("CALL_DNS").parse().unwrap();
    let resolver = skyline::bridge::resolver(dns).unwrap();
    let host = url.host().unwrap().to_owned();
    let port = url.port_u16().unwrap_or(80);
    let client = crate::support::Client::new();
    for _ in 0..count {
        let ip = resolver
            .lookup_ip(format!("{host}.").as_str())
            .await
            .unwrap()
            .iter()
            .next()
            .unwrap();
        let direct = format!("http://{ip}:{port}{}", url.path());
        let req = Request::get(direct)
            .header("host", format!("{host}:{port}"))
            .body(Full::default())
            .unwrap();
        match client.send(req).await {
            Ok(reply) => println!("CALL {} {}", reply.status, reply.body.trim()),
            Err(e) => println!("CALL 0 {e}"),
        }
    }
}

// === The scenario ===

/// One answer seen by the load generator.
#[derive(Clone, Debug)]
struct Answer {
    at_ms: u64,
    /// The request's number (its `x-order`).
    order: u64,
    status: u16,
    what: String,
}

/// The load generator's answers as they arrive.
struct Load {
    id: ProcId,
    lines: mpsc::Receiver<String>,
    answers: Vec<Answer>,
    started: Instant,
}

impl Load {
    /// Reads what arrived so far.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            let mut parts = line.splitn(5, ' ');
            if parts.next() != Some("LOAD") {
                continue;
            }
            let (Some(ms), Some(order), Some(status), Some(what)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            self.answers.push(Answer {
                at_ms: ms.parse().unwrap_or(0),
                order: order.parse().unwrap_or(u64::MAX),
                status: status.parse().unwrap_or(0),
                what: what.to_owned(),
            });
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Waits (at most `timeout`) until an answer after `since_ms` satisfies `f`; its time.
    fn wait_for(
        &mut self,
        since_ms: u64,
        timeout: Duration,
        f: impl Fn(&Answer) -> bool,
    ) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            self.drain();
            if let Some(a) = self.answers.iter().find(|a| a.at_ms >= since_ms && f(a)) {
                return Some(a.at_ms);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Answers per (status, what) in `[from, to)` ms.
    fn counts(&self, from: u64, to: u64) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for a in self
            .answers
            .iter()
            .filter(|a| a.at_ms >= from && a.at_ms < to)
        {
            *counts
                .entry(format!("{} {}", a.status, a.what))
                .or_insert(0) += 1;
        }
        counts
    }
}

/// The test's side of the scenario: the lab, this test binary for the children, and a
/// runtime for the library's steps, which are async.
struct Scenario {
    lab: Lab,
    exe: String,
    runtime: tokio::runtime::Runtime,
    registry: RegistryClient,
    /// Every skyline process logs at info (the logs explain a failure).
    skyline_env: Vec<(&'static str, String)>,
    /// The lab's registry and admin token.
    token: String,
}

impl Scenario {
    fn new(lab: Lab) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mesh = Mesh {
            lab: &lab,
            exe: SKYLINE,
            env: &[],
        };
        let (registry, token) = (mesh.registry(), mesh.token());
        Self {
            lab,
            exe: std::env::current_exe()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            runtime,
            registry: RegistryClient::new(registry).with_token(Some(token.clone())),
            token: token.expose().to_owned(),
            skyline_env: vec![("SKYLINE_LOG", "info".to_owned())],
        }
    }

    fn mesh(&self) -> Mesh<'_> {
        Mesh {
            lab: &self.lab,
            exe: SKYLINE,
            env: &self.skyline_env,
        }
    }

    /// Runs a step of the library's mesh to its end; panics with its error and log.
    fn must<T>(&self, step: impl Future<Output = Result<T, MeshError>>) -> T {
        self.runtime
            .block_on(step)
            .unwrap_or_else(|e| panic!("{}", skyline::error_chain(&e)))
    }

    /// `curl` in `node`, with the lab's token (the registry and admin listeners want it).
    fn curl(&self, node: Node, method: &str, url: &str, body: &str) -> String {
        let consul = format!("X-Consul-Token: {}", self.token);
        let bearer = format!("Authorization: Bearer {}", self.token);
        self.lab
            .output(
                node.name,
                "curl",
                &[
                    "-s", "-m", "5", "-H", &consul, "-H", &bearer, "-X", method, "--data", body,
                    url,
                ],
                Duration::from_secs(8),
            )
            .unwrap()
    }

    fn register(&self, placement: &Placement) {
        self.runtime
            .block_on(placement.register(&self.registry))
            .unwrap_or_else(|e| panic!("registering {}: {e}", placement.id()));
    }

    fn deregister(&self, placement: &Placement) {
        self.runtime
            .block_on(placement.deregister(&self.registry))
            .unwrap_or_else(|e| panic!("deregistering {}: {e}", placement.id()));
    }

    /// Starts an application in `node` and waits until it says it is ready.
    fn app(&self, name: &str, node: Node, port: u16, platform: &str, broken: bool) -> ProcId {
        self.app_logged(name, node, port, platform, broken).0
    }

    /// [`Self::app`], and the name of its log (its stderr: `GOT <order>` for each request).
    fn app_logged(
        &self,
        name: &str,
        node: Node,
        port: u16,
        platform: &str,
        broken: bool,
    ) -> (ProcId, String) {
        let mut envs = vec![
            (CHILD_ROLE, "app".to_owned()),
            (
                "APP_LISTEN",
                SocketAddr::new(self.mesh().ip(node), port).to_string(),
            ),
            ("APP_PLATFORM", platform.to_owned()),
            ("APP_NAME", name.to_owned()),
        ];
        if broken {
            envs.push(("APP_BROKEN", "1".to_owned()));
        }
        let log = format!("app-{name}-{platform}-{}", fastrand::u32(..));
        let (id, lines) = self
            .lab
            .spawn(&log, node.name, &self.exe, &child_args(), &envs)
            .unwrap();
        assert!(
            mesh::wait_for_line(&lines, "READY", Duration::from_secs(10)),
            "{name} on {} did not start: {}",
            node.name,
            self.lab.log(&log)
        );
        (id, log)
    }

    /// Waits until `url` answers 200 from `node`.
    fn wait_http(&self, node: Node, url: &str, what: &str) {
        for _ in 0..100 {
            let out = self
                .lab
                .output(
                    node.name,
                    "curl",
                    &[
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "-m",
                        "2",
                        url,
                    ],
                    Duration::from_secs(4),
                )
                .unwrap();
            if out.trim() == "200" {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{what} never answered {url}");
    }
}

fn child_args() -> Vec<&'static str> {
    vec![
        "--exact",
        "migration::netns_child",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ]
}

/// The scenarios here give their nodes the same addresses: one lab at a time.
static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn giphy_moves_from_mesos_to_kubernetes_and_back_without_a_failed_request() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new().unwrap_or_else(|e| {
        panic!("this test needs network namespaces (run as root with `ip` available): {e}")
    });
    let nodes = [GW, M1, M2, K1, K2, POD_GIPHY, POD_CALLER, DNS];
    mesh::create_nodes(&lab, &nodes)
        .unwrap_or_else(|e| panic!("this test needs network namespaces: {e}"));
    let scenario = Scenario::new(lab);
    let mesh = scenario.mesh();
    let lab = &scenario.lab;

    // The cluster DNS: giphy is a pod, organization and phantom are Services on the bridges.
    let names = [
        ("giphy.default.svc.cluster.local", POD_GIPHY),
        ("organization.default.svc.cluster.local", K1),
        ("phantom.default.svc.cluster.local", K2),
    ];
    mesh.start_cluster_dns(DNS, &names)
        .unwrap_or_else(|e| panic!("{}", skyline::error_chain(&e)));

    // The registry, with the gateway, the bridges and the Mesos instances in it.
    scenario.must(mesh.start_registry());
    let giphy_m2 = mesh.placement(M2, "giphy", GIPHY_PORT, "mesos");
    for placement in [
        mesh.placement(GW, "skyline-gateway", INBOUND_PORT, "gateway"),
        mesh.placement(K1, "skyline-bridge", INBOUND_PORT, "kubernetes"),
        mesh.placement(K2, "skyline-bridge", INBOUND_PORT, "kubernetes"),
        mesh.placement(M1, "organization", ORGANIZATION_PORT, "mesos"),
        giphy_m2.clone(),
    ] {
        scenario.register(&placement);
    }
    let mut giphy_mesos = scenario.app("giphy", M2, GIPHY_PORT, "mesos", false);
    let _organization = scenario.app("organization", M1, ORGANIZATION_PORT, "mesos", false);

    // The gateway, the bridges and the agents, each ready.
    scenario.must(async {
        mesh.start_gateway(GW, HOLD).await?;
        for node in [K1, K2] {
            mesh.start_bridge(node, DNS).await?;
        }
        for node in [M1, M2] {
            mesh.start_agent(node, HOLD).await?;
        }
        Ok(())
    });
    scenario.wait_http(
        M1,
        "http://127.0.0.1:5040/service/giphy/media",
        "giphy through agent m1",
    );

    // Loop protection: a service neither platform has ends in 404, never bounces.
    for service in ["ghost", "phantom"] {
        let out = lab
            .output(
                M1.name,
                "curl",
                &[
                    "-s",
                    "-m",
                    "5",
                    "-D",
                    "-",
                    &format!("http://127.0.0.1:5040/service/{service}/x"),
                ],
                Duration::from_secs(8),
            )
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 404"), "{service}: {out}");
        assert!(
            out.contains("x-skyline-error: unknown-service"),
            "{service}: {out}"
        );
    }

    // The load, from a Mesos node, for the whole scenario.
    let (load_id, lines) = lab
        .spawn(
            "load",
            M1.name,
            &scenario.exe,
            &child_args(),
            &[
                (CHILD_ROLE, "load".to_owned()),
                (
                    "LOAD_URL",
                    "http://127.0.0.1:5040/service/giphy/media".to_owned(),
                ),
            ],
        )
        .unwrap();
    let started = (0..100).find_map(|_| {
        lines
            .recv_timeout(Duration::from_millis(100))
            .ok()
            .filter(|l| l == "LOAD-START")
            .map(|_| Instant::now())
    });
    let mut load = Load {
        id: load_id,
        lines,
        answers: Vec::new(),
        started: started.expect("the load generator did not start"),
    };
    let mut steps: Vec<(&str, u64, u64)> = Vec::new();
    let mut switches: Vec<(&str, u64)> = Vec::new();

    // a. giphy only on Mesos.
    let a = load.now_ms();
    std::thread::sleep(Duration::from_secs(4));
    let a_end = load.now_ms();
    steps.push(("a. giphy on mesos only", a, a_end));

    // b. giphy started on Kubernetes; Mesos scaled to zero: deregistered, then stopped.
    let giphy_k8s = scenario.app("giphy", POD_GIPHY, SERVICE_PORT, "kubernetes", false);
    let b = load.now_ms();
    scenario.deregister(&giphy_m2);
    let moved = load.wait_for(b, Duration::from_secs(15), |a| a.what == "kubernetes");
    let moved = moved.expect("traffic never moved to kubernetes");
    switches.push(("b. mesos -> kubernetes after scale to zero", moved - b));
    // Every catalog has caught up well before the instance stops (it drains in-flight requests).
    std::thread::sleep(Duration::from_secs(2));
    lab.stop(giphy_mesos).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let b_end = load.now_ms();
    steps.push(("b. scaled to zero on mesos", b, b_end));

    // c. Mesos scaled up again: traffic falls back after the hold.
    giphy_mesos = scenario.app("giphy", M2, GIPHY_PORT, "mesos", false);
    let c = load.now_ms();
    scenario.register(&giphy_m2);
    let back = load.wait_for(c, Duration::from_secs(20), |a| a.what == "mesos");
    let back = back.expect("traffic never fell back to mesos");
    switches.push(("c. kubernetes -> mesos after scale up", back - c));
    std::thread::sleep(Duration::from_secs(4));
    let c_end = load.now_ms();
    steps.push(("c. scaled up on mesos", c, c_end));

    // d. A Kubernetes app calls the Mesos organization service by its cluster DNS name.
    let d = load.now_ms();
    let (call, call_lines) = lab
        .spawn(
            "call",
            POD_CALLER.name,
            &scenario.exe,
            &child_args(),
            &[
                (CHILD_ROLE, "call".to_owned()),
                (
                    "CALL_URL",
                    "http://organization.default.svc.cluster.local:8080/members".to_owned(),
                ),
                ("CALL_COUNT", "20".to_owned()),
                ("CALL_DNS", mesh.dns(DNS).to_string()),
            ],
        )
        .unwrap();
    assert!(
        lab.wait(call, Duration::from_secs(30)),
        "the kubernetes caller did not finish"
    );
    let calls: Vec<String> = call_lines
        .try_iter()
        .filter(|l| l.starts_with("CALL "))
        .collect();
    assert_eq!(calls.len(), 20, "{calls:?}\n{}", lab.log("call"));
    for call in &calls {
        assert_eq!(call, "CALL 200 mesos organization /members");
    }
    let d_end = load.now_ms();
    steps.push(("d. kubernetes calls organization on mesos", d, d_end));
    load.drain();
    let failed_a_to_d: Vec<Answer> = load
        .answers
        .iter()
        .filter(|x| x.at_ms < d_end && x.status != 200)
        .cloned()
        .collect();

    // e. A broken Kubernetes version while Mesos is scaled to zero, then Mesos back.
    let e = load.now_ms();
    scenario.deregister(&giphy_m2);
    std::thread::sleep(Duration::from_secs(2));
    lab.stop(giphy_mesos).unwrap();
    lab.stop(giphy_k8s).unwrap();
    let _broken = scenario.app("giphy", POD_GIPHY, SERVICE_PORT, "kubernetes", true);
    let broke = load.wait_for(e, Duration::from_secs(10), |a| a.status == 500);
    let broke = broke.expect("the broken kubernetes version never answered");
    std::thread::sleep(Duration::from_secs(2));
    let _giphy_mesos = scenario.app("giphy", M2, GIPHY_PORT, "mesos", false);
    let restore = load.now_ms();
    scenario.register(&giphy_m2);
    let restored = load.wait_for(restore, Duration::from_secs(20), |a| a.what == "mesos");
    let restored = restored.expect("scaling mesos up did not restore success");
    switches.push((
        "e. broken kubernetes -> mesos after scale up",
        restored - restore,
    ));
    std::thread::sleep(Duration::from_secs(3));
    let e_end = load.now_ms();
    steps.push(("e. broken kubernetes version, then mesos back", e, e_end));
    lab.close_stdin(load.id);
    assert!(
        lab.wait(load.id, Duration::from_secs(20)),
        "the load generator did not stop"
    );
    load.drain();

    // The report.
    println!(
        "\nmigration scenario, {} answers at ~{RATE}/s:",
        load.answers.len()
    );
    for (name, from, to) in &steps {
        println!(
            "  {name:<48} {:>6} ms  {:?}",
            to - from,
            load.counts(*from, *to)
        );
    }
    for (name, ms) in &switches {
        println!("  switch {name:<48} {ms:>6} ms");
    }
    let routes_url = format!("http://{}/routes", mesh.admin(GW));
    let gateway_routes = scenario.curl(GW, "GET", &routes_url, "");
    let routes: serde_json::Value = serde_json::from_str(&gateway_routes).unwrap_or_default();
    println!(
        "  gateway /routes giphy: {}",
        routes["services"]["giphy"]["state"]
    );

    // Zero failed requests across a–d; every step answered by the expected platform.
    assert!(
        failed_a_to_d.is_empty(),
        "{} failed requests in a-d, first {:?}\ngateway log: {}",
        failed_a_to_d.len(),
        &failed_a_to_d[..failed_a_to_d.len().min(5)],
        lab.log("gateway")
    );
    let a_counts = load.counts(a, a_end);
    assert_eq!(
        a_counts.keys().collect::<Vec<_>>(),
        ["200 mesos"],
        "{a_counts:?}"
    );
    assert!(
        a_counts["200 mesos"] > 4 * RATE as usize / 2,
        "the load kept its rate: {a_counts:?}"
    );
    let settled = load.counts(moved + 500, b_end);
    assert_eq!(
        settled.keys().collect::<Vec<_>>(),
        ["200 kubernetes"],
        "{settled:?}"
    );
    let (_, c_switch) = switches[1];
    assert!(
        (2500..10_000).contains(&c_switch),
        "fall-back to mesos waits for the {HOLD:?} hold: {c_switch} ms"
    );
    let settled = load.counts(back + 500, c_end);
    assert_eq!(
        settled.keys().collect::<Vec<_>>(),
        ["200 mesos"],
        "{settled:?}"
    );
    let broken = load.counts(broke, restore);
    assert!(
        broken.get("500 kubernetes").is_some_and(|&n| n > 0),
        "{broken:?}"
    );
    let after = load.counts(restored + 500, e_end);
    assert_eq!(after.keys().collect::<Vec<_>>(), ["200 mesos"], "{after:?}");
}

/// Starts a load generator (see [`run_load`]) in node `node` and waits until it runs.
fn start_load(
    scenario: &Scenario,
    name: &str,
    node: Node,
    envs: &[(&'static str, String)],
) -> Load {
    let mut all = vec![(CHILD_ROLE, "load".to_owned())];
    all.extend(envs.iter().cloned());
    let (id, lines) = scenario
        .lab
        .spawn(name, node.name, &scenario.exe, &child_args(), &all)
        .unwrap();
    let started = (0..100).find_map(|_| {
        lines
            .recv_timeout(Duration::from_millis(100))
            .ok()
            .filter(|l| l == "LOAD-START")
            .map(|_| Instant::now())
    });
    Load {
        id,
        lines,
        answers: Vec::new(),
        started: started.expect("the load generator did not start"),
    }
}

/// Answers that are not a 200, in `[from, to)` ms.
fn failed(load: &Load, from: u64, to: u64) -> Vec<Answer> {
    load.answers
        .iter()
        .filter(|a| a.at_ms >= from && a.at_ms < to && (a.status != 200 || a.what == "bad-echo"))
        .cloned()
        .collect()
}

#[test]
fn killing_the_last_mesos_instance_before_the_catalog_knows_fails_no_get_nor_any_post_it_never_received_and_a_broken_kubernetes_is_left_within_a_second_of_mesos_coming_back()
 {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let lab = Lab::new().unwrap_or_else(|e| {
        panic!("this test needs network namespaces (run as root with `ip` available): {e}")
    });
    let nodes = [GW, M1, M2, K1, POD_GIPHY, DNS];
    mesh::create_nodes(&lab, &nodes)
        .unwrap_or_else(|e| panic!("this test needs network namespaces: {e}"));
    let scenario = Scenario::new(lab);
    let mesh = scenario.mesh();
    let lab = &scenario.lab;
    mesh.start_cluster_dns(DNS, &[("giphy.default.svc.cluster.local", POD_GIPHY)])
        .unwrap_or_else(|e| panic!("{}", skyline::error_chain(&e)));
    scenario.must(mesh.start_registry());
    let giphy_m2 = mesh.placement(M2, "giphy", GIPHY_PORT, "mesos");
    for placement in [
        mesh.placement(GW, "skyline-gateway", INBOUND_PORT, "gateway"),
        mesh.placement(K1, "skyline-bridge", INBOUND_PORT, "kubernetes"),
        giphy_m2.clone(),
    ] {
        scenario.register(&placement);
    }
    let (giphy_mesos, giphy_mesos_log) =
        scenario.app_logged("giphy", M2, GIPHY_PORT, "mesos", false);
    let giphy_k8s = scenario.app("giphy", POD_GIPHY, SERVICE_PORT, "kubernetes", false);
    scenario.must(async {
        mesh.start_gateway(GW, HOLD).await?;
        mesh.start_bridge(K1, DNS).await?;
        for node in [M1, M2] {
            mesh.start_agent(node, HOLD).await?;
        }
        Ok(())
    });
    let url = "http://127.0.0.1:5040/service/giphy/media";
    scenario.wait_http(M1, url, "giphy through agent m1");

    // A cluster DNS name in any case names the same service.
    let upper = lab
        .output(
            M1.name,
            "curl",
            &[
                "-s",
                "-m",
                "5",
                "-H",
                "Host: Giphy.default.svc.cluster.local",
                "http://127.0.0.1:5040/media",
            ],
            Duration::from_secs(8),
        )
        .unwrap();
    assert_eq!(upper, "mesos giphy /media");
    // A service no platform has: agent -> gateway -> bridge -> NXDOMAIN, and the 404 says so
    // (the agent has a catch-all: the gateway).
    let ghost = lab
        .output(
            M1.name,
            "curl",
            &[
                "-s",
                "-m",
                "5",
                "-D",
                "-",
                "http://127.0.0.1:5040/service/ghost/x",
            ],
            Duration::from_secs(8),
        )
        .unwrap();
    assert!(ghost.starts_with("HTTP/1.1 404"), "{ghost}");
    assert!(
        ghost.contains("x-skyline-error: unknown-service"),
        "{ghost}"
    );
    assert!(!ghost.contains("no catch-all"), "{ghost}");
    assert!(ghost.contains("kubernetes cluster dns"), "{ghost}");

    // 200 GETs and 100 POSTs with a body a second, from a Mesos node, for the whole test.
    let mut gets = start_load(&scenario, "load-get", M1, &[("LOAD_URL", url.to_owned())]);
    let mut posts = start_load(
        &scenario,
        "load-post",
        M1,
        &[
            ("LOAD_URL", url.to_owned()),
            ("LOAD_METHOD", "POST".to_owned()),
            ("LOAD_RATE", "100".to_owned()),
        ],
    );
    let on_mesos = |load: &mut Load| {
        let since = load.now_ms();
        load.wait_for(since, Duration::from_secs(10), |a| a.what == "mesos")
    };
    assert!(
        on_mesos(&mut gets).is_some() && on_mesos(&mut posts).is_some(),
        "GETs {:?}, POSTs {:?}",
        gets.counts(0, u64::MAX),
        posts.counts(0, u64::MAX)
    );
    std::thread::sleep(Duration::from_secs(2));

    // a. The last Mesos instance is killed; the catalog still says it is passing.
    let (kill_get, kill_post) = (gets.now_ms(), posts.now_ms());
    lab.kill(giphy_mesos).unwrap();
    let moved_get = gets.wait_for(kill_get, Duration::from_secs(10), |a| {
        a.what == "kubernetes"
    });
    let moved_post = posts.wait_for(kill_post, Duration::from_secs(10), |a| {
        a.what == "kubernetes"
    });
    let (moved_get, moved_post) = (
        moved_get.expect("gets never moved to kubernetes"),
        moved_post.expect("posts never moved to kubernetes"),
    );
    std::thread::sleep(Duration::from_secs(5));
    let (a_get_end, a_post_end) = (gets.now_ms(), posts.now_ms());
    gets.drain();
    posts.drain();
    let a_gets = gets.counts(kill_get, a_get_end);
    let a_posts = posts.counts(kill_post, a_post_end);
    let a_failed_gets = failed(&gets, 0, a_get_end);
    let a_failed_posts = failed(&posts, 0, a_post_end);

    // b. The catalog learns; a broken Kubernetes version answers 500; Mesos comes back.
    scenario.deregister(&giphy_m2);
    lab.stop(giphy_k8s).unwrap();
    let _broken = scenario.app("giphy", POD_GIPHY, SERVICE_PORT, "kubernetes", true);
    let b = gets.now_ms();
    let broke = gets.wait_for(b, Duration::from_secs(10), |a| a.status == 500);
    broke.expect("the broken kubernetes version never answered");
    std::thread::sleep(Duration::from_secs(2));
    let _giphy_mesos = scenario.app("giphy", M2, GIPHY_PORT, "mesos", false);
    let (restore_get, restore_post) = (gets.now_ms(), posts.now_ms());
    scenario.register(&giphy_m2);
    let restored_get = gets.wait_for(restore_get, Duration::from_secs(20), |a| a.what == "mesos");
    let restored_post =
        posts.wait_for(restore_post, Duration::from_secs(20), |a| a.what == "mesos");
    let restored_get = restored_get.expect("scaling mesos up did not restore gets");
    let restored_post = restored_post.expect("scaling mesos up did not restore posts");
    std::thread::sleep(Duration::from_secs(4));
    let (end_get, end_post) = (gets.now_ms(), posts.now_ms());
    for load in [&gets, &posts] {
        lab.close_stdin(load.id);
    }
    for load in [&mut gets, &mut posts] {
        assert!(
            lab.wait(load.id, Duration::from_secs(20)),
            "a load generator did not stop"
        );
        load.drain();
    }
    // The last 500 came from Kubernetes; after it, every answer is Mesos' 200.
    let last_500 = |load: &Load, from: u64| {
        load.answers
            .iter()
            .filter(|a| a.at_ms >= from && a.status == 500)
            .map(|a| a.at_ms)
            .max()
    };
    let (b_get_500, b_post_500) = (
        gets.counts(restore_get, end_get),
        posts.counts(restore_post, end_post),
    );

    println!("\nkilled before the catalog knew, ~{RATE}/s GET + 100/s POST:");
    println!(
        "  a. GET  {} failed of {} answers {a_gets:?}; on kubernetes after {} ms",
        a_failed_gets.len(),
        a_gets.values().sum::<usize>(),
        moved_get - kill_get
    );
    println!(
        "  a. POST {} failed of {} answers {a_posts:?} (at {:?} ms, killed at {kill_post} ms); on kubernetes after {} ms",
        a_failed_posts.len(),
        a_posts.values().sum::<usize>(),
        a_failed_posts.iter().map(|a| a.at_ms).collect::<Vec<_>>(),
        moved_post - kill_post
    );
    println!(
        "  b. broken kubernetes left for mesos: GET after {} ms {b_get_500:?}, POST after {} ms {b_post_500:?}",
        restored_get - restore_get,
        restored_post - restore_post
    );
    println!(
        "  b. last 500 after mesos came back: GET {:?} ms, POST {:?} ms",
        last_500(&gets, restore_get).map(|t| t.saturating_sub(restore_get)),
        last_500(&posts, restore_post).map(|t| t.saturating_sub(restore_post)),
    );

    // A POST the instance had already received when it was killed may have been processed: it
    // is not sent again (a GET is). Only such requests may fail, and the killed instance's own
    // record says which it received; every other POST (refused, never sent) must succeed.
    let received: std::collections::HashSet<u64> = lab
        .log(&giphy_mesos_log)
        .lines()
        .filter_map(|l| l.strip_prefix("GOT ")?.trim().parse().ok())
        .collect();
    let unsent_failed: Vec<&Answer> = a_failed_posts
        .iter()
        .filter(|a| !received.contains(&a.order))
        .collect();
    println!(
        "  a. POST failed after the killed instance received them: {}; failed without reaching it: {}",
        a_failed_posts.len() - unsent_failed.len(),
        unsent_failed.len()
    );
    assert!(
        a_failed_gets.is_empty() && unsent_failed.is_empty(),
        "failed GETs {:?}, POSTs {:?} (killed at {kill_get} / {kill_post} ms)\nmesh errors: {:#?}",
        &a_failed_gets[..a_failed_gets.len().min(5)],
        &a_failed_posts[..a_failed_posts.len().min(5)],
        ["agent-m1", "agent-m2", "gateway"].map(|name| {
            let log = lab.log(name);
            let errors: Vec<&str> = log.lines().filter(|l| l.contains("mesh error")).collect();
            format!("{name}: {}", errors.join("\n"))
        })
    );
    assert!(
        a_gets.get("200 kubernetes").is_some_and(|&n| n > 0),
        "{a_gets:?}"
    );
    for (load, restore) in [(&gets, restore_get), (&posts, restore_post)] {
        let last = last_500(load, restore).map_or(0, |t| t.saturating_sub(restore));
        assert!(
            last < 1000,
            "the broken tier kept traffic {last} ms after mesos was back"
        );
    }
    let settled = gets.counts(restored_get + 1000, end_get);
    assert_eq!(
        settled.keys().collect::<Vec<_>>(),
        ["200 mesos"],
        "{settled:?}"
    );
    let settled = posts.counts(restored_post + 1000, end_post);
    assert_eq!(
        settled.keys().collect::<Vec<_>>(),
        ["200 mesos"],
        "{settled:?}"
    );
}
