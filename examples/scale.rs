//! Scale benchmark: a catalog of 10,000 services × 3 instances on 1,000 nodes, served by etcd and
//! by the embedded registry. Prints the figures recorded in `docs/benchmarks.md`.
//!
//! ```sh
//! cargo build --release --bin skyline && cargo run --release --example scale
//! ```
//!
//! An example rather than a binary of the package: it needs `/usr/bin/etcd`, starts servers and
//! processes, and is not something to ship in the `skyline` release; it also uses dev-dependencies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use skyline::agent::{self, Listeners, Settings};
use skyline::catalog::CatalogSource;
use skyline::catalog::consul::ConsulDiscovery;
use skyline::catalog::etcd::client::{self as etcd, Client as EtcdClient};
use skyline::catalog::etcd::{DEFAULT_PREFIX, EtcdDiscovery, InstanceValue, Keys, NodeValue};
use skyline::catalog::{
    self, Discovery, Health, Instance, Interner, Node, Nodes, ServiceName, Snapshot, file,
};
use skyline::registry::{self, RegistryConfig};
use skyline::routing::{Lookup, Policy, Routes, Table};
use tokio_util::sync::CancellationToken;

/// Services in the catalog: `SCALE_SERVICES` (default 10,000; issue 3's propagation figure uses 1,000).
fn services() -> usize {
    std::env::var("SCALE_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}
const PER_SERVICE: usize = 3;
const NODES: usize = 1_000;
const BUILD_RUNS: usize = 20;
const CHANGES: usize = 200;
const RESYNC_RUNS: usize = 5;

type Http = HttpClient<HttpConnector, Full<Bytes>>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let skyline = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("skyline"))
        .context("no target folder")?;
    if !skyline.exists() {
        bail!(
            "{} is missing: run `cargo build --release --bin skyline` first",
            skyline.display()
        );
    }
    let shm = Path::new("/dev/shm");
    let tmp = if shm.is_dir() {
        tempfile::tempdir_in(shm)?
    } else {
        tempfile::tempdir()?
    };
    let before = own_rss_kib();
    let snapshot = synthetic();
    let with_snapshot = own_rss_kib();
    println!(
        "catalog: {} services, {} instances, {} nodes",
        snapshot.services.len(),
        snapshot.instance_count(),
        snapshot.nodes.len()
    );
    let table = Table::build(&snapshot, "node-7", Policy::default());
    let with_table = own_rss_kib();
    println!(
        "memory (RSS growth of this process): snapshot {:.1} MiB, route table {:.1} MiB",
        mib(with_snapshot.saturating_sub(before)),
        mib(with_table.saturating_sub(with_snapshot))
    );
    drop(table);

    // --- Route table build ---
    let mut builds = Vec::new();
    for _ in 0..BUILD_RUNS {
        let t = Instant::now();
        let table = Table::build(&snapshot, "node-7", Policy::default());
        builds.push(t.elapsed());
        drop(table);
    }
    println!("routing::Table::build: {}", summary(&mut builds));
    let mut clones = Vec::new();
    for _ in 0..BUILD_RUNS {
        let t = Instant::now();
        let copy = snapshot.clone();
        clones.push(t.elapsed());
        drop(copy);
    }
    println!("Snapshot::clone: {}", summary(&mut clones));

    // --- etcd ---
    let etcd = Etcd::start(&tmp.path().join("etcd")).await?;
    let endpoint = etcd.endpoint();
    let t = Instant::now();
    load_etcd(&endpoint, &snapshot).await?;
    println!(
        "etcd: loaded {} keys in {:?}",
        NODES + services() * PER_SERVICE,
        t.elapsed()
    );
    let http: Http = HttpClient::builder(TokioExecutor::new()).build_http();

    // RSS of real agent processes: etcd catalog, and the same catalog from a file as a baseline.
    let rss_etcd = agent_rss(
        &skyline,
        &http,
        &["--catalog", "etcd", "--etcd-endpoints", &endpoint],
    )
    .await?;
    println!("agent RSS, --catalog etcd: {:.1} MiB", mib(rss_etcd));
    let catalog_file = tmp.path().join("catalog.toml");
    std::fs::write(&catalog_file, file::render(&snapshot))?;
    let rss_file = agent_rss(
        &skyline,
        &http,
        &[
            "--catalog",
            "file",
            "--catalog-file",
            catalog_file.to_str().unwrap(),
        ],
    )
    .await?;
    println!("agent RSS, --catalog file: {:.1} MiB", mib(rss_file));

    // One change → the routing change, in an in-process agent following etcd.
    let settings = Settings {
        node_name: "node-7".to_owned(),
        node_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        outbound: None,
        inbound: None,
        admin: None,
        catalog: CatalogSource::Etcd {
            endpoints: vec![endpoint.clone()],
            prefix: DEFAULT_PREFIX.to_owned(),
        },
        catch_all: Vec::new(),
        policy: Policy::default(),
        workers: 1,
        resilience: Default::default(),
        tls: None,
        authz: Default::default(),
        services: Vec::new(),
        access: skyline::access::Settings::off(),
        peer_protocol: Default::default(),
        tokens: Default::default(),
    };
    let token = CancellationToken::new();
    let listeners = Listeners::bind(&settings)?;
    let agent = agent::start(settings, listeners, token.clone()).await?;
    wait_routes(&agent.routes, &format!("svc-{}", services() - 1)).await?;
    let mut client = EtcdClient::new(std::slice::from_ref(&endpoint))?;
    let keys = Keys::new(DEFAULT_PREFIX);
    let mut latencies = Vec::new();
    for k in 0..CHANGES {
        let service = ServiceName::parse(&format!("new-etcd-{k}"))?;
        let value = InstanceValue {
            node: format!("node-{}", k % NODES),
            address: None,
            port: 20_000,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            health: Health::Passing,
            weight: 1,
        };
        let mut version = agent.routes.subscribe();
        let t = Instant::now();
        client
            .put(
                &keys.instance(&service, "1"),
                serde_json::to_vec(&value)?,
                0,
            )
            .await?;
        wait_route_change(&agent.routes, &mut version, service.as_str()).await?;
        latencies.push(t.elapsed());
    }
    println!(
        "etcd: one change -> routing change: {}",
        summary(&mut latencies)
    );
    token.cancel();
    agent.join().await;

    // Full resync: a fresh watcher lists the whole prefix and publishes it.
    let mut resyncs = Vec::new();
    for _ in 0..RESYNC_RUNS {
        let t = Instant::now();
        let first = first_snapshot(EtcdDiscovery::new(vec![endpoint.clone()])).await?;
        let table = Table::build(&first, "node-7", Policy::default());
        resyncs.push(t.elapsed());
        anyhow::ensure!(table.outbound.len() >= services(), "incomplete resync");
    }
    println!(
        "etcd: full resync (list + snapshot + table): {}",
        summary(&mut resyncs)
    );
    drop(etcd);

    // --- Embedded registry ---
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let reg_token = CancellationToken::new();
    let reg = registry::spawn(
        listener,
        RegistryConfig::new(tmp.path().join("registry")),
        reg_token.clone(),
    )
    .await?;
    let addr = reg.addr();
    let t = Instant::now();
    load_registry(&http, addr, &snapshot).await?;
    let mut snapshots = reg.subscribe();
    tokio::time::timeout(
        Duration::from_secs(120),
        snapshots.wait_for(|s| s.instance_count() >= services() * PER_SERVICE),
    )
    .await??;
    println!(
        "registry: registered {} instances in {:?}",
        services() * PER_SERVICE,
        t.elapsed()
    );

    let (publisher, subscriber) = catalog::channel();
    let token = CancellationToken::new();
    tokio::spawn(reg.discovery().run(publisher, token.clone()));
    let routes = Arc::new(Routes::default());
    tokio::spawn(skyline::routing::follow(
        subscriber,
        routes.clone(),
        "node-7".to_owned(),
        Policy::default(),
        tokio::sync::watch::channel(None).0,
    ));
    wait_routes(&routes, &format!("svc-{}", services() - 1)).await?;
    let mut latencies = Vec::new();
    for k in 0..CHANGES {
        let service = format!("new-reg-{k}");
        let body = serde_json::json!({
            "Node": format!("node-{}", k % NODES),
            "Address": node_ip(k % NODES).to_string(),
            "Service": {"ID": format!("{service}-1"), "Service": service, "Port": 20000},
        });
        let mut version = routes.subscribe();
        let t = Instant::now();
        put(&http, addr, "/v1/catalog/register", body).await?;
        wait_route_change(&routes, &mut version, &service).await?;
        latencies.push(t.elapsed());
    }
    println!(
        "registry (embedded, in-process): one change -> routing change: {}",
        summary(&mut latencies)
    );
    token.cancel();

    let mut resyncs = Vec::new();
    for _ in 0..RESYNC_RUNS {
        let t = Instant::now();
        let first = first_snapshot(reg.discovery()).await?;
        let _table = Table::build(&first, "node-7", Policy::default());
        resyncs.push(t.elapsed());
    }
    println!(
        "registry (embedded, in-process): full resync (snapshot + table): {}",
        summary(&mut resyncs)
    );
    let t = Instant::now();
    let first = first_snapshot(ConsulDiscovery::new(addr)).await?;
    let _table = Table::build(&first, "node-7", Policy::default());
    println!(
        "registry over HTTP (consul backend, one watch per service): full resync: {:?} ({} instances)",
        t.elapsed(),
        first.instance_count()
    );
    reg_token.cancel();
    reg.join().await;
    Ok(())
}

// === The synthetic catalog ===

fn node_ip(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, (n / 250) as u8, (n % 250) as u8 + 1, 1))
}

/// The catalog as a backend builds it: node names, meta and tags shared through an interner.
fn synthetic() -> Snapshot {
    let mut interner = Interner::default();
    let mut nodes = Nodes::new();
    for n in 0..NODES {
        let name = interner.node(&format!("node-{n}"));
        nodes.insert(
            name.clone(),
            Node {
                name,
                address: node_ip(n),
                inbound_port: 5041,
                meta: interner.meta(BTreeMap::new()),
            },
        );
    }
    let mut snapshot = Snapshot {
        nodes: Arc::new(nodes),
        ..Snapshot::default()
    };
    for s in 0..services() {
        let service = ServiceName::parse(&format!("svc-{s}")).unwrap();
        let instances = (0..PER_SERVICE)
            .map(|k| {
                let n = (s * PER_SERVICE + k) % NODES;
                Instance {
                    id: format!("svc-{s}-{k}"),
                    service: service.clone(),
                    node: interner.node(&format!("node-{n}")),
                    address: node_ip(n),
                    port: 10_000 + (s % 50_000) as u16,
                    tags: interner.tags(Vec::new()),
                    meta: interner.meta(BTreeMap::from([(
                        "platform".to_owned(),
                        "mesos".to_owned(),
                    )])),
                    health: Health::Passing,
                    weight: 1,
                }
            })
            .collect();
        snapshot.services.insert(service, instances);
    }
    snapshot
}

// === Measuring ===

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (n = {})",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(samples[samples.len() - 1]),
        samples.len()
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// This process's resident set, in KiB.
fn own_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn wait_routes(routes: &Routes, service: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    while !matches!(routes.load().outbound(service), Lookup::Route(_)) {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("{service} not routed within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn wait_route_change(
    routes: &Routes,
    version: &mut tokio::sync::watch::Receiver<u64>,
    service: &str,
) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !matches!(routes.load().outbound(service), Lookup::Route(_)) {
            version.changed().await?;
        }
        Ok::<_, anyhow::Error>(())
    })
    .await
    .with_context(|| format!("{service} not routed within 30 s"))?
}

async fn first_snapshot(discovery: impl Discovery) -> anyhow::Result<Arc<Snapshot>> {
    let (publisher, mut subscriber) = catalog::channel();
    let token = CancellationToken::new();
    let task = tokio::spawn(discovery.run(publisher, token.clone()));
    let state = tokio::time::timeout(
        Duration::from_secs(300),
        subscriber.wait_for(|s| s.snapshot.is_some()),
    )
    .await??
    .clone();
    token.cancel();
    let _ = task.await;
    state.snapshot.context("no snapshot")
}

/// Starts `skyline agent` with `args`, waits until it routes the whole catalog, reads its RSS.
async fn agent_rss(skyline: &Path, http: &Http, args: &[&str]) -> anyhow::Result<u64> {
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut child = tokio::process::Command::new(skyline)
        .arg("agent")
        .args(["--node-name", "node-7", "--node-address", "127.0.0.1"])
        .args(["--outbound", &format!("127.0.0.1:{}", free_port())])
        .args(["--inbound", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin", &admin.to_string()])
        .args(args)
        .env("SKYLINE_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("no pid")?;
    let started = Instant::now();
    loop {
        let ready = get_json(http, admin, "/readyz").await.ok();
        if ready.as_ref().and_then(|r| r["services"].as_u64()) == Some(services() as u64) {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("agent not ready with the whole catalog: {ready:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the allocator settle after the first table was built.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    child.start_kill()?;
    child.wait().await?;
    Ok(rss)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

async fn get_json(http: &Http, addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let req = http::Request::get(format!("http://{addr}{path}")).body(Full::default())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req)).await??;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}

async fn put(
    http: &Http,
    addr: SocketAddr,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<()> {
    let req = http::Request::put(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), http.request(req)).await??;
    let status = resp.status();
    let text = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status.is_success(), "PUT {path}: {status} {text:?}");
    Ok(())
}

async fn load_registry(http: &Http, addr: SocketAddr, snapshot: &Snapshot) -> anyhow::Result<()> {
    let bodies: Vec<serde_json::Value> = snapshot
        .services
        .values()
        .flat_map(|i| i.iter())
        .map(|i| {
            serde_json::json!({
                "Node": i.node,
                "Address": snapshot.nodes[&i.node].address.to_string(),
                "Service": {"ID": i.id, "Service": i.service.as_str(), "Port": i.port,
                            "Meta": i.meta},
            })
        })
        .collect();
    let chunks: Vec<Vec<serde_json::Value>> = bodies.chunks(1000).map(<[_]>::to_vec).collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            for body in chunk {
                put(&http, addr, "/v1/catalog/register", body).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

// === etcd ===

struct Etcd {
    child: std::process::Child,
    port: u16,
}

impl Etcd {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let binary = PathBuf::from("/usr/bin/etcd");
        anyhow::ensure!(
            binary.exists(),
            "/usr/bin/etcd is missing: apt-get install etcd-server"
        );
        let (port, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = std::process::Command::new(binary)
            .arg("--data-dir")
            .arg(dir)
            .args(["--name", "bench"])
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let etcd = Self { child, port };
        let started = Instant::now();
        loop {
            let mut c = EtcdClient::new(&[etcd.endpoint()])?;
            if c.status().await.is_ok_and(|s| s.leader != 0) {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "etcd did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(etcd)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes every node and instance, 128 puts per transaction (etcd's `--max-txn-ops`), under one
/// lease per node as agents would.
async fn load_etcd(endpoint: &str, snapshot: &Snapshot) -> anyhow::Result<()> {
    let mut client = EtcdClient::new(&[endpoint.to_owned()])?;
    let keys = Keys::new(DEFAULT_PREFIX);
    let mut leases = BTreeMap::new();
    let mut entries: Vec<(String, Vec<u8>, i64)> = Vec::new();
    for node in snapshot.nodes.values() {
        let lease = client.lease_grant(3600).await?;
        leases.insert(node.name.clone(), lease);
        entries.push((
            keys.node(&node.name),
            serde_json::to_vec(&NodeValue::of(node))?,
            lease,
        ));
    }
    for i in snapshot.services.values().flat_map(|i| i.iter()) {
        entries.push((
            keys.instance(&i.service, &i.id),
            serde_json::to_vec(&InstanceValue::of(i, &i.node))?,
            leases[&i.node],
        ));
    }
    for chunk in entries.chunks(128) {
        let ops = chunk
            .iter()
            .map(|(k, v, l)| etcd::put(k, v.clone(), *l))
            .collect();
        client.txn(etcd::txn(ops)).await?;
    }
    Ok(())
}
