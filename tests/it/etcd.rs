//! The etcd backend against a real three-member etcd cluster (Debian's `/usr/bin/etcd`), started
//! by each test on loopback and killed at its end, even on panic.
//!
//! Instances get into etcd the way they do in production: agents register the services they
//! declare, and an operator registers the others with `skyline register --catalog etcd`. No
//! test writes an instance key by hand; only a node key is deleted by hand, as an operator's
//! `etcdctl del` would, to test what becomes of the instances of a node that is gone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use skyline::agent::{self, AgentHandle, Listeners, Settings};
use skyline::catalog::CatalogSource;
use skyline::catalog::etcd::client::Client as EtcdClient;
use skyline::catalog::etcd::{DEFAULT_PREFIX, EtcdDiscovery, EtcdError, Keys};
use skyline::catalog::{self, Discovery, Health, ServiceName, Subscriber};
use skyline::registration::{Check, Declared};
use skyline::routing::{Lookup, Policy};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::{Client, TestApp, free_port, ip};

/// Where the tests look for etcd; `SKYLINE_TEST_ETCD` overrides.
const ETCD: &str = "/usr/bin/etcd";

/// One cluster at a time: three etcd members per test are plenty for a 2-core machine.
pub(crate) static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// === EtcdCluster ===

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    child: Option<Child>,
}

/// A real etcd cluster on 127.0.0.1. Dropping it kills every member.
pub(crate) struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    _dir: tempfile::TempDir,
}

fn etcd_binary() -> PathBuf {
    let path =
        std::env::var_os("SKYLINE_TEST_ETCD").map_or_else(|| PathBuf::from(ETCD), PathBuf::from);
    assert!(
        path.exists(),
        "etcd is required by the etcd tests and was not found at {}: install Debian's \
         `etcd-server` (scripts/install-deps tests) or set SKYLINE_TEST_ETCD",
        path.display()
    );
    path
}

impl EtcdCluster {
    pub(crate) async fn start(size: usize) -> Self {
        let binary = etcd_binary();
        // tmpfs when there is one: etcd fsyncs every write.
        let dir = if Path::new("/dev/shm").is_dir() {
            tempfile::tempdir_in("/dev/shm").unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let members: Vec<Member> = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port("127.0.0.1"),
                peer_port: free_port("127.0.0.1"),
                data_dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            initial_cluster,
            token: format!("skyline-test-{}", fastrand::u64(..)),
            _dir: dir,
        };
        assert!(binary.exists());
        for i in 0..size {
            cluster.start_member(i);
        }
        cluster.wait_healthy().await;
        cluster
    }

    fn start_member(&mut self, i: usize) {
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {} already runs", m.name);
        std::fs::create_dir_all(&m.data_dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.data_dir.with_extension("log"))
            .unwrap();
        let client_url = format!("http://127.0.0.1:{}", m.client_port);
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new(etcd_binary())
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", ETCD));
        m.child = Some(child);
    }

    /// Kills member `i` with SIGKILL and waits for it to exit.
    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub(crate) fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    pub(crate) fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.start_member(i);
            }
        }
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    pub(crate) fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    fn live(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].child.is_some())
            .collect()
    }

    /// Each live member's view: (its id, the leader's id), or `None` if it does not answer.
    async fn status(&self, i: usize) -> Option<(u64, u64)> {
        let mut client = EtcdClient::new(&[self.endpoint(i)]).ok()?;
        let status = tokio::time::timeout(Duration::from_secs(3), client.status())
            .await
            .ok()?
            .ok()?;
        let me = status.header?.member_id;
        (status.leader != 0).then_some((me, status.leader))
    }

    /// Waits until every live member answers and they agree on a leader, and a write works.
    pub(crate) async fn wait_healthy(&self) {
        let started = Instant::now();
        loop {
            let mut leaders = Vec::new();
            for i in self.live() {
                leaders.push(self.status(i).await.map(|(_, l)| l));
            }
            let agreed = leaders.iter().all(|l| l.is_some() && *l == leaders[0]);
            if agreed && self.put_raw("skyline-test/health", "ok").await.is_ok() {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "etcd cluster not healthy after 90 s: {leaders:?}; logs in {}",
                self._dir.path().display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The index of the current leader among the live members.
    async fn leader(&self) -> usize {
        let mut ids = BTreeMap::new();
        let mut leader = None;
        for i in self.live() {
            if let Some((me, l)) = self.status(i).await {
                ids.insert(me, i);
                leader = Some(l);
            }
        }
        ids[&leader.expect("a leader")]
    }

    async fn client(&self) -> EtcdClient {
        let live: Vec<String> = self.live().into_iter().map(|i| self.endpoint(i)).collect();
        EtcdClient::new(&live).unwrap()
    }

    async fn put_raw(&self, key: &str, value: &str) -> Result<i64, EtcdError> {
        let mut client = self.client().await;
        client.put(key, value.as_bytes().to_vec(), 0).await
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

// === Helpers ===

async fn start_agent(
    name: &str,
    ip_text: &str,
    endpoints: Vec<String>,
    services: Vec<Declared>,
) -> AgentHandle {
    let ip = ip(ip_text);
    let settings = Settings {
        node_name: name.to_owned(),
        node_address: ip,
        outbound: Some(SocketAddr::new(ip, 0)),
        inbound: Some(SocketAddr::new(ip, 0)),
        admin: Some(SocketAddr::new(ip, 0)),
        catalog: CatalogSource::Etcd {
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
        },
        catch_all: Vec::new(),
        policy: Policy::default(),
        workers: 1,
        resilience: Default::default(),
        tls: None,
        authz: Default::default(),
        access: skyline::access::Settings::off(),
        peer_protocol: Default::default(),
        services,
        tokens: Default::default(),
    };
    let listeners = Listeners::bind(&settings).unwrap();
    agent::start(settings, listeners, CancellationToken::new())
        .await
        .unwrap()
}

/// Service `service` at `addr`, as a `[[service]]` with a 1 s TTL check (a TCP probe of its port
/// every ~330 ms) declares it.
fn declared(service: &str, addr: SocketAddr) -> Declared {
    Declared {
        name: ServiceName::parse(service).unwrap(),
        id: format!("{service}-1"),
        address: Some(addr.ip()),
        port: addr.port(),
        tags: Vec::new(),
        meta: BTreeMap::new(),
        check: Check::Ttl(Duration::from_secs(1)),
        deregister_after: None,
    }
}

/// Agents `a` (127.0.0.2) and `b` (127.0.0.3) on `cluster`, b declaring service `web` at `web`,
/// and both already routing it: a's outbound to b, b's inbound to the instance. (Each agent
/// watches etcd on its own; a may hear of `web` before b does.)
async fn web_on_b(cluster: &EtcdCluster, web: SocketAddr) -> (AgentHandle, AgentHandle) {
    let a = start_agent("a", "127.0.0.2", cluster.endpoints(), Vec::new()).await;
    let b = start_agent(
        "b",
        "127.0.0.3",
        cluster.endpoints(),
        vec![declared("web", web)],
    )
    .await;
    eventually(Duration::from_secs(30), "agents a and b route web", || {
        routes_to(&a, "web") && serves(&b, "web")
    })
    .await;
    (a, b)
}

/// The lease node `node`'s key is bound to (0: none), as etcd has it.
async fn node_lease(cluster: &EtcdCluster, node: &str) -> i64 {
    let mut client = cluster.client().await;
    let key = Keys::new(DEFAULT_PREFIX).node(node);
    let answer = client.range(&key, false).await.unwrap();
    answer.kvs.first().map_or(0, |kv| kv.lease)
}

/// Polls `f` every 20 ms until it holds; panics with `what` after `limit`.
async fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn routes_to(agent: &AgentHandle, service: &str) -> bool {
    matches!(agent.routes.load().outbound(service), Lookup::Route(_))
}

/// Whether `agent`'s inbound proxy routes `service` to a local instance.
fn serves(agent: &AgentHandle, service: &str) -> bool {
    matches!(agent.routes.load().inbound(service), Lookup::Route(_))
}

fn knows(agent: &AgentHandle, service: &str) -> bool {
    !matches!(agent.routes.load().outbound(service), Lookup::Unknown)
}

async fn readyz(client: &Client, agent: &AgentHandle) -> serde_json::Value {
    client
        .get(&format!("http://{}/readyz", agent.admin.unwrap()))
        .await
        .json()
}

/// Requests sent by a few concurrent clients until stopped (or a bound is reached).
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    fn start(url: String, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    let client = Client::new();
                    let started = Instant::now();
                    let (mut ok, mut failed) = (0u64, Vec::new());
                    while !stop.load(Ordering::Relaxed)
                        && ok < 50_000
                        && started.elapsed() < Duration::from_secs(120)
                    {
                        let req = http::Request::get(url.as_str())
                            .body(Default::default())
                            .unwrap();
                        match client.send(req).await {
                            Ok(r) if r.status == 200 => ok += 1,
                            Ok(r) => failed.push(format!("{} {}", r.status, r.body)),
                            Err(e) => failed.push(e),
                        }
                        // A steady trickle, not a flood: the machine also runs etcd.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    (ok, failed)
                })
            })
            .collect();
        Self { stop, tasks }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failed) = (0, Vec::new());
        for task in self.tasks {
            let (o, f) = task.await.unwrap();
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    }
}

/// A TCP forwarder to one etcd member that the test can cut and restore, to disconnect a
/// watcher while the cluster itself keeps running.
struct Cut {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    task: JoinHandle<()>,
}

impl Cut {
    async fn to(target: String) -> Self {
        let target: SocketAddr = target.trim_start_matches("http://").parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(tokio::sync::watch::Sender::new(0u64));
        let (o, g) = (open.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is closed at once
                }
                let mut cut = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            open,
            generation,
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every forwarded connection and refuses new ones.
    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start_discovery(endpoints: Vec<String>) -> (Subscriber, CancellationToken) {
    let (publisher, subscriber) = catalog::channel();
    let token = CancellationToken::new();
    let discovery = EtcdDiscovery::new(endpoints);
    tokio::spawn(discovery.run(publisher, token.clone()));
    (subscriber, token)
}

async fn wait_catalog(rx: &mut Subscriber, what: &str, f: impl Fn(&catalog::CatalogState) -> bool) {
    let limit = Duration::from_secs(60);
    if tokio::time::timeout(limit, rx.wait_for(|s| f(s)))
        .await
        .is_err()
    {
        panic!(
            "{what}: not within {limit:?}; last state: {:?}",
            *rx.borrow()
        );
    }
}

fn has(state: &catalog::CatalogState, service: &str) -> bool {
    state
        .snapshot
        .as_ref()
        .is_some_and(|s| s.services.contains_key(service))
}

/// `skyline register --catalog etcd` of instance `id` of `service` on `node` (created at
/// 127.0.0.3:7041 unless it is registered already), as an operator registers it.
async fn register(cluster: &EtcdCluster, service: &str, id: &str, node: &str, port: u16) {
    skyline_etcd(
        cluster,
        &[
            "register",
            "--name",
            service,
            "--id",
            id,
            "--node",
            node,
            "--port",
            &port.to_string(),
            "--node-address",
            "127.0.0.3",
            "--inbound-port",
            "7041",
        ],
    )
    .await;
}

/// `skyline deregister <id> --catalog etcd`.
async fn deregister(cluster: &EtcdCluster, id: &str) {
    skyline_etcd(cluster, &["deregister", id]).await;
}

/// Runs `skyline <args> --catalog etcd` against `cluster`; fails the test if it fails.
async fn skyline_etcd(cluster: &EtcdCluster, args: &[&str]) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_skyline"))
        .args(args)
        .args(["--catalog", "etcd", "--etcd-endpoints"])
        .arg(cluster.endpoints().join(","))
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "skyline {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

// === Tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_routes_through_both_hops_to_a_service_another_agent_declares_in_etcd() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = EtcdCluster::start(3).await;
    let app = TestApp::spawn("web", ip("127.0.0.3"));
    let (a, b) = web_on_b(&cluster, app.addr).await;

    let client = Client::new();
    let reply = client
        .get(&format!(
            "http://{}/service/web/hello?x=1",
            a.outbound.unwrap()
        ))
        .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body, "web /hello?x=1");
    let ready = readyz(&client, &a).await;
    assert_eq!(ready["catalog_error"], serde_json::Value::Null, "{ready}");
    assert_eq!(ready["services"], 1, "{ready}");
    assert!(
        ready["catalog"].as_str().unwrap().starts_with("etcd:"),
        "{ready}"
    );
    assert_ne!(
        node_lease(&cluster, "b").await,
        0,
        "b's node is under a lease"
    );

    // The application stops: b's check fails and the other agent sees web critical.
    app.stop().await;
    eventually(
        Duration::from_secs(30),
        "critical web is not routed",
        || matches!(a.routes.load().outbound("web"), Lookup::NoHealthy),
    )
    .await;
    let web = a.catalog.borrow().snapshot.clone().unwrap().services["web"].clone();
    assert_eq!(web[0].health, Health::Critical);

    // A graceful shutdown revokes the lease: the instance is gone long before the 10 s TTL.
    let stopping = Instant::now();
    b.shutdown();
    b.join().await;
    eventually(Duration::from_secs(5), "web vanishes after revoke", || {
        !knows(&a, "web")
    })
    .await;
    assert!(stopping.elapsed() < Duration::from_secs(5));
    let reply = client
        .get(&format!("http://{}/service/web/hello", a.outbound.unwrap()))
        .await;
    assert_eq!(reply.mesh_error(), Some("unknown-service"), "{reply:?}");
    assert_eq!(node_lease(&cluster, "b").await, 0, "b's node key is gone");
    a.shutdown();
    a.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_follower_then_the_leader_under_load_fails_no_request_and_changes_no_route() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = EtcdCluster::start(3).await;
    let app = TestApp::spawn("web", ip("127.0.0.3"));
    let (a, b) = web_on_b(&cluster, app.addr).await;
    let lease = node_lease(&cluster, "b").await;
    assert_ne!(lease, 0);
    let catalog_before = a.catalog.borrow().snapshot.clone().unwrap();
    let routes_before = routing_view(&a);
    let url = format!("http://{}/service/web/x", a.outbound.unwrap());

    for victim in ["follower", "leader"] {
        let load = Load::start(url.clone(), 4);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let leader = cluster.leader().await;
        let i = if victim == "leader" {
            leader
        } else {
            (leader + 1) % 3
        };
        cluster.kill(i);
        // The two survivors elect (or keep) a leader; the mesh goes on meanwhile.
        cluster.wait_healthy().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (ok, failed) = load.finish().await;
        assert!(ok > 0, "the load ran");
        assert!(
            failed.is_empty(),
            "{} of {} requests failed after killing the {victim}: {:?}",
            failed.len(),
            ok + failed.len() as u64,
            &failed[..failed.len().min(5)]
        );
        let catalog_now = a.catalog.borrow().snapshot.clone().unwrap();
        assert_eq!(*catalog_now, *catalog_before, "after killing the {victim}");
        assert_eq!(
            routing_view(&a),
            routes_before,
            "after killing the {victim}"
        );
        cluster.start_member(i);
        cluster.wait_healthy().await;
    }
    assert_eq!(
        node_lease(&cluster, "b").await,
        lease,
        "the first lease was kept through both failovers"
    );
    for agent in [a, b] {
        agent.shutdown();
        agent.join().await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_any_one_member_down_an_agent_never_reports_the_catalog_unreachable_and_routes_new_services()
 {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = EtcdCluster::start(3).await;
    let apps: Vec<TestApp> = (0..4)
        .map(|i| TestApp::spawn(&format!("s{i}"), ip("127.0.0.3")))
        .collect();
    let (a, b) = web_on_b(&cluster, apps[0].addr).await;
    // Every state the agent's catalog goes through, read as it changes.
    let mut rx = a.catalog.clone();
    let errors = tokio::spawn(async move {
        let mut seen = Vec::new();
        while rx.changed().await.is_ok() {
            if let Some(error) = rx.borrow_and_update().error.clone() {
                seen.push(error);
            }
        }
        seen
    });
    let client = Client::new();
    let mut services = vec![declared("web", apps[0].addr)];
    // Each member in turn, so one of them is the member the agent watches from.
    for i in 0..3 {
        cluster.kill(i);
        let name = format!("new-{i}");
        services.push(declared(&name, apps[i + 1].addr));
        b.declared.send_replace(services.clone());
        // b declares it: a's outbound routes it to b, and b's inbound (whose own watch may be
        // failing over from the member just killed) to the instance.
        eventually(
            Duration::from_secs(30),
            &format!("a and b route {name} with member {i} down"),
            || routes_to(&a, &name) && serves(&b, &name),
        )
        .await;
        let reply = client
            .get(&format!("http://{}/service/{name}/x", a.outbound.unwrap()))
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let ready = readyz(&client, &a).await;
        assert_eq!(ready["catalog_error"], serde_json::Value::Null, "{ready}");
        cluster.start_member(i);
        cluster.wait_healthy().await;
    }
    assert_eq!(readyz(&client, &a).await["services"], 4);
    for agent in [a, b] {
        agent.shutdown();
        agent.join().await;
    }
    let errors = errors.await.unwrap();
    assert!(
        errors.is_empty(),
        "the catalog was reported unreachable: {errors:?}"
    );
    for app in apps {
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_goes_on_while_etcd_is_down_and_catches_up_after_a_restart() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = EtcdCluster::start(3).await;
    let web = TestApp::spawn("web", ip("127.0.0.3"));
    let late = TestApp::spawn("late", ip("127.0.0.3"));
    let (a, b) = web_on_b(&cluster, web.addr).await;
    let client = Client::new();
    let url = format!("http://{}/service/web/x", a.outbound.unwrap());

    cluster.kill_all();
    let mut rx = a.catalog.clone();
    wait_catalog(&mut rx, "the outage is reported", |s| s.error.is_some()).await;
    let ready = readyz(&client, &a).await;
    assert_eq!(ready["ready"], true, "{ready}");
    assert!(
        ready["catalog_error"]
            .as_str()
            .is_some_and(|e| e.contains("etcd")),
        "{ready}"
    );
    for _ in 0..20 {
        let reply = client.get(&url).await;
        assert_eq!(
            reply.status, 200,
            "routing from the last good catalog: {reply:?}"
        );
    }

    cluster.restart_all();
    cluster.wait_healthy().await;
    // A service agent b declares after the restart reaches agent a.
    b.declared
        .send_replace(vec![declared("web", web.addr), declared("late", late.addr)]);
    eventually(Duration::from_secs(60), "agents a and b route late", || {
        routes_to(&a, "late") && serves(&b, "late")
    })
    .await;
    let reply = client
        .get(&format!("http://{}/service/late/y", a.outbound.unwrap()))
        .await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "late /y"));
    assert_eq!(
        client.get(&url).await.status,
        200,
        "web survived the outage"
    );
    wait_catalog(&mut rx, "the error clears", |s| s.error.is_none()).await;
    assert_eq!(
        readyz(&client, &a).await["catalog_error"],
        serde_json::Value::Null
    );

    for agent in [a, b] {
        agent.shutdown();
        agent.join().await;
    }
    web.stop().await;
    late.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_resumes_without_missing_events_and_lists_again_after_a_compaction() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = EtcdCluster::start(3).await;
    let mut client = cluster.client().await;
    register(&cluster, "one", "one-1", "b", 9001).await;

    let cut = Cut::to(cluster.endpoint(0)).await;
    let (mut rx, token) = start_discovery(vec![cut.endpoint()]);
    wait_catalog(&mut rx, "the first list", |s| has(s, "one")).await;

    // Disconnected, events happen; the watch resumes at last + 1 and sees every one of them.
    cut.cut();
    wait_catalog(&mut rx, "the cut is noticed", |s| s.error.is_some()).await;
    register(&cluster, "two", "two-1", "b", 9002).await;
    register(&cluster, "three", "three-1", "b", 9003).await;
    deregister(&cluster, "one-1").await;
    cut.restore();
    wait_catalog(&mut rx, "resumed with every event", |s| {
        s.error.is_none() && has(s, "two") && has(s, "three") && !has(s, "one")
    })
    .await;

    // Disconnected again; this time the history it would resume from is compacted away.
    cut.cut();
    wait_catalog(&mut rx, "the second cut is noticed", |s| s.error.is_some()).await;
    register(&cluster, "four", "four-1", "b", 9004).await;
    deregister(&cluster, "two-1").await;
    let revision = cluster.put_raw("skyline-test/bump", "1").await.unwrap();
    client.compact(revision).await.unwrap();
    cut.restore();
    wait_catalog(&mut rx, "listed again after the compaction", |s| {
        s.error.is_none() && has(s, "four") && has(s, "three") && !has(s, "two")
    })
    .await;
    let snapshot = rx.borrow().snapshot.clone().unwrap();
    assert_eq!(snapshot.instance_count(), 2);
    assert_eq!(snapshot.services["four"][0].port, 9004);
    assert_eq!(
        snapshot.services["four"][0].address,
        ip("127.0.0.3"),
        "an instance without an address listens on its node's"
    );
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_whose_node_key_is_missing_are_not_routed() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = EtcdCluster::start(3).await;
    register(&cluster, "orphan", "orphan-1", "nowhere", 9001).await;
    let (mut rx, token) = start_discovery(cluster.endpoints());
    wait_catalog(&mut rx, "the first list", |s| has(s, "orphan")).await;
    // An operator deletes the node (`etcdctl del`): its instance key stays, orphaned.
    let keys = Keys::new(DEFAULT_PREFIX);
    let mut client = cluster.client().await;
    client.delete(&keys.node("nowhere"), false).await.unwrap();
    wait_catalog(&mut rx, "the node leaves", |s| !has(s, "orphan")).await;
    let orphaned = client
        .range(
            &keys.instance(&ServiceName::parse("orphan").unwrap(), "orphan-1"),
            false,
        )
        .await
        .unwrap();
    assert_eq!(orphaned.kvs.len(), 1, "the instance key is still there");
    // Registered again, the node comes back and with it the instance.
    register(&cluster, "orphan", "orphan-1", "nowhere", 9001).await;
    wait_catalog(&mut rx, "the node is back", |s| has(s, "orphan")).await;
    token.cancel();
}

/// The agent's routes as JSON, without what the proxy learns per endpoint (latency, load),
/// which changes with every request.
fn routing_view(agent: &AgentHandle) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.remove("state");
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(&*agent.routes.load_full()).unwrap();
    strip(&mut v);
    v
}
