//! The demo's nodes in this process, on loopback addresses: the registry (127.0.0.1), two
//! Mesos agents (127.0.0.11, 127.0.0.12), a Kubernetes bridge (127.0.0.21) with a tiny cluster
//! DNS (127.0.0.53) that answers `*.svc.cluster.local` like kubedns, the gateway (127.0.0.10),
//! and the giphy and organization applications (giphy on Kubernetes at 127.0.0.31).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::{
    App, Counts, DemoError, HOLD, HttpClient, ORGANIZATION_TEXT, Placement, Platform, RATE, Site,
    fail, giphy_text,
};
use crate::agent::{self, Listeners, Settings as AgentSettings};
use crate::bridge::{self, Names};
use crate::catalog::CatalogSource;
use crate::gateway::{self, policy};
use crate::proxy::DEFAULT_MAX_HOPS;
use crate::registry::client::RegistryClient;
use crate::registry::{self, RegistryConfig};
use crate::routing::Policy;
use crate::serve;

/// How long stopping takes at most: an application's drain, or the whole teardown.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

const fn lo(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A port free on `ip` now, for a server started later at a known address.
fn free_port(ip: IpAddr, what: &'static str) -> Result<u16, DemoError> {
    let listener = serve::bind(SocketAddr::new(ip, 0)).map_err(|e| fail(what)(e.to_string()))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| fail(what)(e.to_string()))
}

/// A running application, stopped with `stop`.
struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

fn start_app(addr: SocketAddr, text: &str, broken: bool) -> Result<Running, String> {
    let listener = serve::bind(addr).map_err(|e| format!("{addr}: {e}"))?;
    let stop = CancellationToken::new();
    let app = App {
        text: text.into(),
        broken,
    };
    let task = tokio::spawn(serve::serve(listener, app, stop.clone()));
    Ok(Running { stop, task })
}

pub(super) struct Loopback {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    dir: PathBuf,
    registry: RegistryClient,
    http: HttpClient,
    banner: String,
    outbound: SocketAddr,
    gateway: SocketAddr,
    bridge: SocketAddr,
    giphy_on_mesos: Placement,
    giphy_on_kubernetes: SocketAddr,
    giphy: BTreeMap<Platform, Running>,
    organization: Running,
}

// === impl Loopback ===

impl Loopback {
    /// Starts the registry, the applications, the cluster DNS, the bridge, the gateway and the
    /// agents, and registers them.
    pub(super) async fn start() -> Result<Self, DemoError> {
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let dir = std::env::temp_dir().join(format!("skyline-demo-{}", std::process::id()));

        let listener = serve::bind(SocketAddr::new(lo(1), 0))
            .map_err(|e| fail("start the registry")(e.to_string()))?;
        let handle = registry::spawn(
            listener,
            RegistryConfig::new(dir.join("registry")),
            stop.clone(),
        )
        .await
        .map_err(|e| fail("start the registry")(e.to_string()))?;
        let reg = handle.addr();
        tasks.spawn(handle.join());
        let registry = RegistryClient::new(reg);

        // The applications: giphy and organization on Mesos; giphy on Kubernetes starts later.
        let giphy_on_kubernetes =
            SocketAddr::new(lo(31), free_port(lo(31), "bind giphy on kubernetes")?);
        let giphy_on_mesos_addr = SocketAddr::new(lo(12), free_port(lo(12), "bind giphy")?);
        let giphy_mesos = start_app(
            giphy_on_mesos_addr,
            giphy_text(Platform::Mesos, false),
            false,
        )
        .map_err(fail("start giphy on mesos"))?;
        let organization_addr = SocketAddr::new(lo(11), free_port(lo(11), "bind organization")?);
        let organization = start_app(organization_addr, ORGANIZATION_TEXT, false)
            .map_err(fail("start organization"))?;

        // Two Mesos agents, bound now so that their inbound ports can be registered.
        let mut agents = Vec::new();
        let mut inbound = BTreeMap::new();
        for (node, ip) in [("m1", lo(11)), ("m2", lo(12))] {
            let settings = agent_settings(node, ip, reg);
            let listeners =
                Listeners::bind(&settings).map_err(|e| fail("start an agent")(e.to_string()))?;
            let port = listeners
                .inbound
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .map_or(5041, |a| a.port());
            inbound.insert(node, port);
            agents.push((node, settings, listeners));
        }
        let organization_on_mesos = Placement {
            node: "m1",
            node_ip: lo(11),
            inbound_port: inbound["m1"],
            service: "organization",
            addr: organization_addr,
            platform: "mesos",
        };
        let giphy_on_mesos = Placement {
            node: "m2",
            node_ip: lo(12),
            inbound_port: inbound["m2"],
            service: "giphy",
            addr: giphy_on_mesos_addr,
            platform: "mesos",
        };
        organization_on_mesos.register(&registry).await?;
        giphy_on_mesos.register(&registry).await?;

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
        let gateway_addr = SocketAddr::new(lo(10), free_port(lo(10), "bind the gateway")?);
        let bridge = bridge::spawn(
            bridge::Settings {
                listen: vec![SocketAddr::new(lo(21), 0)],
                admin: None,
                dns,
                names: Names {
                    port: giphy_on_kubernetes.port(),
                    ..Names::default()
                },
                gateways: vec![gateway_addr],
                catalog: None,
                max_hops: DEFAULT_MAX_HOPS,
                resilience: Default::default(),
                tls: None,
                authz: Default::default(),
                kv: None,
                reload: None,
                // The demo tells its own story; access lines would drown it.
                access: crate::access::Settings::off(),
                peer_protocol: Default::default(),
                tokens: Default::default(),
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
        tasks.spawn(bridge.join());
        for placement in [
            Placement {
                node: "k1",
                node_ip: lo(21),
                inbound_port: bridge_addr.port(),
                service: "skyline-bridge",
                addr: bridge_addr,
                platform: "kubernetes",
            },
            Placement {
                node: "gw",
                node_ip: lo(10),
                inbound_port: gateway_addr.port(),
                service: "skyline-gateway",
                addr: gateway_addr,
                platform: "gateway",
            },
        ] {
            placement.register(&registry).await?;
        }
        let gateway = gateway::spawn(
            gateway::Settings {
                listen: gateway_addr,
                admin: None,
                catalog: CatalogSource::Consul(reg),
                upstreams: policy::default_upstreams(),
                routes: BTreeMap::new(),
                default_hold: HOLD,
                max_hops: DEFAULT_MAX_HOPS,
                kv: Some(reg),
                include_warning: false,
                reload: None,
                resilience: Default::default(),
                tls: None,
                authz: Default::default(),
                // The demo tells its own story; access lines would drown it.
                access: crate::access::Settings::off(),
                peer_protocol: Default::default(),
                tokens: Default::default(),
            },
            stop.clone(),
        )
        .await
        .map_err(|e| fail("start the gateway")(e.to_string()))?;
        tasks.spawn(gateway.join());

        let mut outbound = None;
        for (node, settings, listeners) in agents {
            let handle = agent::start(settings, listeners, stop.clone())
                .await
                .map_err(|e| fail("start an agent")(e.to_string()))?;
            if node == "m1" {
                outbound = handle.outbound;
            }
            tasks.spawn(handle.join());
        }
        let outbound =
            outbound.ok_or_else(|| fail("start agent m1")("no outbound listener".into()))?;

        let banner = format!(
            "Skyline migration demo on loopback addresses, in this process: registry {reg}, gateway {gateway_addr}, bridge {bridge_addr}, cluster DNS {dns}.\n\
             Mesos node m1 (127.0.0.11) calls http://{outbound}/service/giphy/media {RATE} times a second."
        );
        Ok(Self {
            stop,
            tasks,
            dir,
            registry,
            http: super::http_client(),
            banner,
            outbound,
            gateway: gateway_addr,
            bridge: bridge_addr,
            giphy_on_mesos,
            giphy_on_kubernetes,
            giphy: BTreeMap::from([(Platform::Mesos, giphy_mesos)]),
            organization,
        })
    }
}

fn agent_settings(node: &str, ip: IpAddr, registry: SocketAddr) -> AgentSettings {
    AgentSettings {
        node_name: node.into(),
        node_address: ip,
        outbound: Some(SocketAddr::new(ip, 0)),
        inbound: Some(SocketAddr::new(ip, 0)),
        admin: None,
        catalog: CatalogSource::Consul(registry),
        catch_all: Vec::new(),
        policy: Policy {
            include_warning: false,
            fallback_hold: HOLD,
        },
        workers: 1,
        resilience: Default::default(),
        tls: None,
        authz: Default::default(),
        services: Vec::new(),
        access: crate::access::Settings::off(),
        peer_protocol: Default::default(),
        tokens: Default::default(),
    }
}

async fn stop_app(app: Running) {
    app.stop.cancel();
    let _ = tokio::time::timeout(STOP_TIMEOUT, app.task).await;
}

impl Site for Loopback {
    fn banner(&self) -> String {
        self.banner.clone()
    }

    fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    fn giphy_on_mesos(&self) -> &Placement {
        &self.giphy_on_mesos
    }

    async fn start_load(&mut self, counts: Arc<Counts>) -> Result<(), DemoError> {
        let url = format!("http://{}/service/giphy/media", self.outbound);
        let record = move |outcome| counts.add(outcome);
        self.tasks
            .spawn(super::load(url, RATE, record, self.stop.clone()));
        Ok(())
    }

    async fn start_gateway_load(&mut self, counts: Arc<Counts>) -> Result<(), DemoError> {
        let url = format!("http://{}/service/giphy/media", self.gateway);
        let record = move |outcome| counts.add(outcome);
        self.tasks
            .spawn(super::load(url, RATE, record, self.stop.clone()));
        Ok(())
    }

    async fn start_giphy(&mut self, platform: Platform, broken: bool) -> Result<(), DemoError> {
        let addr = match platform {
            Platform::Mesos => self.giphy_on_mesos.addr,
            Platform::Kubernetes => self.giphy_on_kubernetes,
        };
        let app =
            start_app(addr, giphy_text(platform, broken), broken).map_err(fail("start giphy"))?;
        if let Some(old) = self.giphy.insert(platform, app) {
            stop_app(old).await;
        }
        Ok(())
    }

    async fn stop_giphy(&mut self, platform: Platform) -> Result<(), DemoError> {
        if let Some(app) = self.giphy.remove(&platform) {
            stop_app(app).await;
        }
        Ok(())
    }

    async fn call_organization(&mut self) -> Result<String, DemoError> {
        // The pod resolved the Service's name to the bridge; it sends the name as `Host`.
        Ok(super::ask(
            &self.http,
            self.bridge,
            "organization.default.svc.cluster.local:8080",
            "/members",
        )
        .await)
    }

    async fn teardown(mut self) {
        self.stop.cancel();
        for (_, app) in std::mem::take(&mut self.giphy) {
            app.stop.cancel();
        }
        self.organization.stop.cancel();
        let _ = tokio::time::timeout(STOP_TIMEOUT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// === The cluster DNS ===

/// A tiny DNS server that answers A queries for `names` and NXDOMAIN for the rest, like kubedns
/// for `*.svc.cluster.local`. Enough for the loopback demo; namespaces use dnsmasq.
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
