//! `skyline demo migration`: the seed's Mesos → Kubernetes migration on one machine, narrated.
//!
//! Everything runs in this process on loopback addresses: the registry, two "Mesos" agents
//! (127.0.0.11, 127.0.0.12), a "Kubernetes" bridge (127.0.0.21) with a tiny cluster DNS
//! (127.0.0.53) that answers `*.svc.cluster.local` like kubedns, the gateway (127.0.0.10), and
//! the giphy and organization applications. A load of [`RATE`] requests a second goes from
//! Mesos node m1 to `/service/giphy/media` while the steps run; one line a second shows the
//! share of traffic per platform. The demo ends by itself after the steps.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, CatalogSource, Listeners, Settings as AgentSettings};
use crate::bridge::{self, Names};
use crate::gateway::{self, policy};
use crate::proxy::{Body, DEFAULT_MAX_HOPS, full};
use crate::registry::{self, RegistryConfig};
use crate::routing::Policy;
use crate::serve::{self, Conn, Handler};

/// Requests a second from the Mesos node to giphy while the demo runs.
pub const RATE: u64 = 200;
/// The fail-back hold of the demo's gateway and agents.
pub const HOLD: Duration = Duration::from_secs(3);

#[derive(clap::Args, Clone, Debug)]
pub struct DemoArgs {
    /// The demonstration to run
    #[arg(value_enum, default_value = "migration")]
    pub which: Which,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Which {
    /// Move giphy from Mesos to Kubernetes and back under load
    Migration,
}

#[derive(Debug, thiserror::Error)]
#[error("the demo could not {step}: {reason}")]
pub struct DemoError {
    step: &'static str,
    reason: String,
}

fn fail(step: &'static str) -> impl FnOnce(String) -> DemoError {
    move |reason| DemoError { step, reason }
}

const fn lo(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

// === The applications ===

/// An application that says which platform serves it.
#[derive(Clone, Debug)]
struct App {
    text: Arc<str>,
    broken: bool,
}

impl Handler for App {
    type Body = Body;

    async fn handle(&self, _req: Request<Incoming>, _conn: Conn) -> Response<Body> {
        let mut response = Response::new(full(self.text.to_string()));
        if self.broken {
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        }
        response
    }
}

/// A running application, stopped with `stop`.
struct Running {
    addr: SocketAddr,
    stop: CancellationToken,
}

fn start_app(
    ip: IpAddr,
    port: u16,
    text: &str,
    tasks: &mut JoinSet<()>,
) -> Result<Running, String> {
    let listener = serve::bind(SocketAddr::new(ip, port)).map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let stop = CancellationToken::new();
    let app = App {
        text: text.into(),
        broken: false,
    };
    tasks.spawn(serve::serve(listener, app, stop.clone()));
    Ok(Running { addr, stop })
}

// === The cluster DNS ===

/// A tiny DNS server that answers A queries for `names` and NXDOMAIN for the rest, like kubedns
/// for `*.svc.cluster.local`. Enough for the demo; the tests use dnsmasq.
async fn cluster_dns(
    socket: UdpSocket,
    names: BTreeMap<String, Ipv4Addr>,
    stop: CancellationToken,
) {
    let mut buf = [0u8; 512];
    loop {
        let (n, peer) = tokio::select! {
            () = stop.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r { Ok(r) => r, Err(_) => continue },
        };
        if let Some(answer) = dns_answer(&buf[..n], &names) {
            let _ = socket.send_to(&answer, peer).await;
        }
    }
}

/// The answer to one DNS query, or `None` for anything that is not a plain query.
fn dns_answer(query: &[u8], names: &BTreeMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question_end = i + 4;
    let question = query.get(12..question_end)?;
    let found = names.get(&labels.join("."));
    let mut out = Vec::with_capacity(question_end + 16);
    out.extend_from_slice(&query[0..2]);
    let rcode = if found.is_some() { 0 } else { 3 };
    out.extend_from_slice(&[0x81 | (query[2] & 0x01), 0x80 | rcode]);
    let answers = u16::from(found.is_some() && qtype == 1);
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&answers.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    if let (Some(ip), 1) = (found, answers) {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

// === The demo ===

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Counts of the load's answers by platform since the last report.
#[derive(Default)]
struct Counts {
    mesos: AtomicU64,
    kubernetes: AtomicU64,
    errors: AtomicU64,
}

impl Counts {
    fn take(&self) -> (u64, u64, u64) {
        (
            self.mesos.swap(0, Ordering::Relaxed),
            self.kubernetes.swap(0, Ordering::Relaxed),
            self.errors.swap(0, Ordering::Relaxed),
        )
    }
}

async fn put(client: &HttpClient, url: String, body: String) -> Result<(), String> {
    let req = Request::put(url)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the registry answered {status}"))
    }
}

/// Registers `service` on node `node` at `ip`, whose inbound proxy listens on `inbound_port`.
async fn register(
    client: &HttpClient,
    registry: SocketAddr,
    node: &str,
    ip: IpAddr,
    inbound_port: u16,
    service: (&str, SocketAddr, &str),
) -> Result<(), String> {
    let (name, addr, platform) = service;
    let body = serde_json::json!({
        "Node": node,
        "Address": ip.to_string(),
        "NodeMeta": {"skyline-inbound-port": inbound_port.to_string()},
        "Service": {
            "ID": format!("{name}-{node}"), "Service": name,
            "Address": addr.ip().to_string(), "Port": addr.port(),
            "Meta": {"platform": platform},
        },
    });
    put(
        client,
        format!("http://{registry}/v1/catalog/register"),
        body.to_string(),
    )
    .await
}

async fn deregister(
    client: &HttpClient,
    registry: SocketAddr,
    node: &str,
    id: &str,
) -> Result<(), String> {
    let body = serde_json::json!({"Node": node, "ServiceID": id});
    put(
        client,
        format!("http://{registry}/v1/catalog/deregister"),
        body.to_string(),
    )
    .await
}

/// Runs the demo, narrating to `out`, until its last step or `shutdown`.
pub async fn run(
    args: DemoArgs,
    shutdown: CancellationToken,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    let Which::Migration = args.which;
    let stop = shutdown.child_token();
    let mut tasks = JoinSet::new();
    let result = scenario(&stop, &mut tasks, out).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    result
}

async fn scenario(
    stop: &CancellationToken,
    tasks: &mut JoinSet<()>,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    let say = |out: &mut dyn Write, text: &str| {
        let _ = writeln!(out, "\n{text}");
        let _ = out.flush();
    };
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let dir = std::env::temp_dir().join(format!("skyline-demo-{}", std::process::id()));

    // The registry.
    let listener = serve::bind(SocketAddr::new(lo(1), 0))
        .map_err(|e| fail("start the registry")(e.to_string()))?;
    let registry = registry::spawn(
        listener,
        RegistryConfig::new(dir.join("registry")),
        stop.clone(),
    )
    .await
    .map_err(|e| fail("start the registry")(e.to_string()))?;
    let reg = registry.addr();

    // The applications: giphy and organization on Mesos, giphy on Kubernetes (started later).
    let giphy_k8s_listener = serve::bind(SocketAddr::new(lo(31), 0))
        .map_err(|e| fail("bind giphy on kubernetes")(e.to_string()))?;
    let k8s_port = giphy_k8s_listener
        .local_addr()
        .map_err(|e| fail("bind giphy")(e.to_string()))?
        .port();
    drop(giphy_k8s_listener);
    let mut giphy_mesos =
        start_app(lo(12), 0, "mesos giphy", tasks).map_err(fail("start giphy on mesos"))?;
    let organization =
        start_app(lo(11), 0, "mesos organization", tasks).map_err(fail("start organization"))?;

    // Two Mesos agents.
    let mut agents = Vec::new();
    for (node, ip) in [("m1", lo(11)), ("m2", lo(12))] {
        let settings = AgentSettings {
            node_name: node.into(),
            node_address: ip,
            outbound: Some(SocketAddr::new(ip, 0)),
            inbound: Some(SocketAddr::new(ip, 0)),
            // m1's admin listener, to watch its metrics while the demo runs.
            admin: (node == "m1").then(|| SocketAddr::new(ip, 0)),
            catalog: CatalogSource::Consul(reg),
            catch_all: Vec::new(),
            policy: Policy {
                include_warning: false,
                fallback_hold: HOLD,
            },
            workers: 1,
            services: Vec::new(),
        };
        let listeners =
            Listeners::bind(&settings).map_err(|e| fail("start an agent")(e.to_string()))?;
        agents.push((node, ip, settings, listeners));
    }
    let mut inbound = BTreeMap::new();
    for (node, ip, _, listeners) in &agents {
        let port = listeners
            .inbound
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or(5041, |a| a.port());
        inbound.insert(*node, (*ip, port));
    }
    let (m1_ip, m1_port) = inbound["m1"];
    let (m2_ip, m2_port) = inbound["m2"];
    register(
        &client,
        reg,
        "m1",
        m1_ip,
        m1_port,
        ("organization", organization.addr, "mesos"),
    )
    .await
    .map_err(fail("register"))?;
    register(
        &client,
        reg,
        "m2",
        m2_ip,
        m2_port,
        ("giphy", giphy_mesos.addr, "mesos"),
    )
    .await
    .map_err(fail("register"))?;

    // The cluster DNS, the bridge and the gateway.
    let dns_socket = UdpSocket::bind(SocketAddr::new(lo(53), 0))
        .await
        .map_err(|e| fail("start the cluster dns")(e.to_string()))?;
    let dns = dns_socket
        .local_addr()
        .map_err(|e| fail("start the cluster dns")(e.to_string()))?;
    let names = BTreeMap::from([(
        "giphy.default.svc.cluster.local".to_owned(),
        Ipv4Addr::new(127, 0, 0, 31),
    )]);
    tasks.spawn(cluster_dns(dns_socket, names, stop.clone()));
    let bridge_listen = SocketAddr::new(lo(21), 0);
    let gateway_listen = serve::bind(SocketAddr::new(lo(10), 0))
        .map_err(|e| fail("bind the gateway")(e.to_string()))?;
    let gateway_addr = gateway_listen
        .local_addr()
        .map_err(|e| fail("bind the gateway")(e.to_string()))?;
    drop(gateway_listen);
    let bridge = bridge::spawn(
        bridge::Settings {
            listen: vec![bridge_listen],
            admin: None,
            dns,
            names: Names {
                port: k8s_port,
                ..Names::default()
            },
            gateways: vec![gateway_addr],
            catalog: None,
            max_hops: DEFAULT_MAX_HOPS,
        },
        stop.clone(),
    )
    .await
    .map_err(|e| fail("start the bridge")(e.to_string()))?;
    let bridge_addr = bridge
        .addrs
        .first()
        .copied()
        .ok_or_else(|| fail("start the bridge")("no listener".into()))?;
    register(
        &client,
        reg,
        "k1",
        lo(21),
        bridge_addr.port(),
        ("skyline-bridge", bridge_addr, "kubernetes"),
    )
    .await
    .map_err(fail("register"))?;
    register(
        &client,
        reg,
        "gw",
        lo(10),
        gateway_addr.port(),
        ("skyline-gateway", gateway_addr, "gateway"),
    )
    .await
    .map_err(fail("register"))?;
    let gateway = gateway::spawn(
        gateway::Settings {
            listen: gateway_addr,
            admin: Some(SocketAddr::new(lo(10), 0)),
            catalog: CatalogSource::Consul(reg),
            upstreams: policy::default_upstreams(),
            routes: BTreeMap::new(),
            default_hold: HOLD,
            max_hops: DEFAULT_MAX_HOPS,
            kv: Some(reg),
            include_warning: false,
            reload: None,
        },
        stop.clone(),
    )
    .await
    .map_err(|e| fail("start the gateway")(e.to_string()))?;
    let mut outbound = None;
    let mut m1_admin = None;
    for (node, _, settings, listeners) in agents {
        let handle = agent::start(settings, listeners, stop.clone())
            .await
            .map_err(|e| fail("start an agent")(e.to_string()))?;
        if node == "m1" {
            outbound = handle.outbound;
            m1_admin = handle.admin;
        }
        tasks.spawn(handle.join());
    }
    let gateway_admin = gateway.admin;
    tasks.spawn(gateway.join());
    tasks.spawn(bridge.join());
    let outbound = outbound.ok_or_else(|| fail("start agent m1")("no outbound listener".into()))?;
    let metrics_url = |admin: Option<SocketAddr>| {
        admin.map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics"))
    };

    say(
        out,
        &format!(
            "Skyline migration demo: registry {reg}, gateway {gateway_addr}, bridge {bridge_addr}, cluster DNS {dns}.\n\
         Mesos node m1 ({m1_ip}) calls http://{outbound}/service/giphy/media {RATE} times a second.\n\
         Metrics while it runs: m1 {}, gateway {}.",
            metrics_url(m1_admin),
            metrics_url(gateway_admin)
        ),
    );

    // The load and its live report.
    let counts = Arc::new(Counts::default());
    let url = format!("http://{outbound}/service/giphy/media");
    let load = tokio::spawn(load(client.clone(), url, counts.clone(), stop.clone()));
    let mut second = 0;
    say(
        out,
        "1. giphy runs on Mesos only: every request is served there.",
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    counts.take();
    wait(out, &counts, 4, &mut second).await;

    say(
        out,
        "2. giphy starts on Kubernetes; Mesos scales giphy to zero (deregistered, then stopped).\n   The gateway fails over to the Kubernetes tier at once.",
    );
    let giphy_k8s = start_app(lo(31), k8s_port, "kubernetes giphy", tasks)
        .map_err(fail("start giphy on kubernetes"))?;
    deregister(&client, reg, "m2", "giphy-m2")
        .await
        .map_err(fail("deregister"))?;
    wait(out, &counts, 2, &mut second).await;
    giphy_mesos.stop.cancel();
    wait(out, &counts, 4, &mut second).await;

    say(
        out,
        &format!(
            "3. Mesos scales giphy up again: traffic falls back after the {}s hold.",
            HOLD.as_secs()
        ),
    );
    giphy_mesos =
        start_app(lo(12), 0, "mesos giphy", tasks).map_err(fail("start giphy on mesos"))?;
    register(
        &client,
        reg,
        "m2",
        m2_ip,
        m2_port,
        ("giphy", giphy_mesos.addr, "mesos"),
    )
    .await
    .map_err(fail("register"))?;
    wait(out, &counts, 6, &mut second).await;

    say(
        out,
        "4. A Kubernetes app calls http://organization.default.svc.cluster.local:8080/members;\n   the Service targets the bridge, which sends it to Mesos through the gateway.",
    );
    let req = Request::get(format!("http://{bridge_addr}/members"))
        .header("host", "organization.default.svc.cluster.local:8080")
        .body(Full::default())
        .map_err(|e| fail("call organization")(e.to_string()))?;
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            say(
                out,
                &format!("   -> {status}: {}", String::from_utf8_lossy(&body).trim()),
            );
        }
        Err(e) => say(out, &format!("   -> failed: {e}")),
    }

    say(
        out,
        "5. A broken giphy version on Kubernetes (answers 500) while Mesos is scaled to zero;\n   scaling Mesos up restores success.",
    );
    deregister(&client, reg, "m2", "giphy-m2")
        .await
        .map_err(fail("deregister"))?;
    giphy_k8s.stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let listener = serve::bind(SocketAddr::new(lo(31), k8s_port))
        .map_err(|e| fail("start broken giphy")(e.to_string()))?;
    let broken = CancellationToken::new();
    tasks.spawn(serve::serve(
        listener,
        App {
            text: "kubernetes giphy (broken)".into(),
            broken: true,
        },
        broken.clone(),
    ));
    wait(out, &counts, 3, &mut second).await;
    register(
        &client,
        reg,
        "m2",
        m2_ip,
        m2_port,
        ("giphy", giphy_mesos.addr, "mesos"),
    )
    .await
    .map_err(fail("register"))?;
    wait(out, &counts, 5, &mut second).await;

    say(
        out,
        "Done: the applications never changed a URL; the mesh moved the traffic.",
    );
    stop.cancel();
    broken.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), load).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Waits `seconds`, writing the traffic share per platform once a second.
async fn wait(out: &mut dyn Write, counts: &Counts, seconds: u64, second: &mut u64) {
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        *second += 1;
        let (m, k, e) = counts.take();
        let total = (m + k + e).max(1);
        let _ = writeln!(
            out,
            "  [{:>2}s] mesos {:>3}%  kubernetes {:>3}%  errors {:>3}   ({} requests)",
            second,
            m * 100 / total,
            k * 100 / total,
            e,
            m + k + e
        );
        let _ = out.flush();
    }
}

/// `RATE` requests a second to `url` until `stop`, counted by the platform that answered.
async fn load(client: HttpClient, url: String, counts: Arc<Counts>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(128));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            counts.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (client, counts) = (client.clone(), counts.clone());
        let Ok(req) = Request::get(url.as_str()).body(Full::default()) else {
            return;
        };
        tokio::spawn(async move {
            let answer = tokio::time::timeout(Duration::from_secs(5), async {
                let resp = client.request(req).await.ok()?;
                let ok = resp.status() == StatusCode::OK;
                let body = resp.into_body().collect().await.ok()?.to_bytes();
                Some((ok, body))
            })
            .await
            .ok()
            .flatten();
            let counter = match answer {
                Some((true, body)) if body.starts_with(b"mesos") => &counts.mesos,
                Some((true, body)) if body.starts_with(b"kubernetes") => &counts.kubernetes,
                _ => &counts.errors,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_dns_answers_known_names_and_nxdomain_for_the_rest() {
        let names = BTreeMap::from([(
            "giphy.default.svc.cluster.local".to_owned(),
            Ipv4Addr::new(127, 0, 0, 31),
        )]);
        let query = |name: &str| {
            let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
            for label in name.split('.') {
                q.push(label.len() as u8);
                q.extend_from_slice(label.as_bytes());
            }
            q.extend_from_slice(&[0, 0, 1, 0, 1]);
            q
        };
        let a = dns_answer(&query("giphy.default.svc.cluster.local"), &names).unwrap();
        assert_eq!(&a[0..2], &[0x12, 0x34]);
        assert_eq!(a[3] & 0x0f, 0, "NOERROR");
        assert_eq!(&a[a.len() - 4..], &[127, 0, 0, 31]);
        let nx = dns_answer(&query("ghost.default.svc.cluster.local"), &names).unwrap();
        assert_eq!(nx[3] & 0x0f, 3, "NXDOMAIN");
    }
}
