//! The migration's mesh in a lab of network namespaces ([`crate::netns::Lab`]), each part a
//! real process in its node: dnsmasq as the cluster DNS, and the skyline binary as the
//! registry, the gateway, the bridges and the agents. `skyline demo migration` (in namespaces)
//! and the end-to-end migration test start them the same way, with these functions; each keeps
//! only what is its own (its applications and load, its narration or its assertions).
//!
//! This process gets an address on the lab's bridge ([`HOST`]), so it registers placements and
//! checks readiness directly; every listener a check reaches is on its node's address.
//!
//! | node | host | runs |
//! |---|---|---|
//! | gw | .10 | registry (:8500), gateway (:5041, admin :5050) |
//! | m1 | .11 | agent (outbound 127.0.0.1:5040), organization (:9002), the load |
//! | m2 | .12 | agent, giphy on Mesos (:9001) |
//! | k1 | .21 | bridge (:5041 and the Services' port :8080) |
//! | kp1 | .31 | giphy's pod (:8080) |
//! | kp2 | .32 | the pod that calls organization |
//! | dns | .53 | dnsmasq |

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};

use super::{HttpClient, Placement};
use crate::config::token::Token;
use crate::netns::{Lab, LabError, ProcId};

/// A node of the scenario: its name in the lab and its host number on the lab's subnet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: &'static str,
    pub host: u8,
}

impl Node {
    pub const fn new(name: &'static str, host: u8) -> Self {
        Self { name, host }
    }
}

/// This process, on the lab's bridge (not a namespace).
pub const HOST: u8 = 1;
/// The registry and the gateway.
pub const GW: Node = Node::new("gw", 10);
/// A Mesos node with an agent: organization runs here, and the load calls from here.
pub const M1: Node = Node::new("m1", 11);
/// A Mesos node with an agent: giphy on Mesos runs here.
pub const M2: Node = Node::new("m2", 12);
/// A Kubernetes node with a bridge; the cluster DNS sends Services to it.
pub const K1: Node = Node::new("k1", 21);
/// giphy's pod on Kubernetes.
pub const POD_GIPHY: Node = Node::new("kp1", 31);
/// The pod that calls organization by its cluster DNS name.
pub const POD_CALLER: Node = Node::new("kp2", 32);
/// The cluster DNS (dnsmasq).
pub const DNS: Node = Node::new("dns", 53);

pub const REGISTRY_PORT: u16 = 8500;
pub const INBOUND_PORT: u16 = 5041;
pub const ADMIN_PORT: u16 = 5050;
/// Where an agent's outbound proxy listens, in its node: what applications call.
pub const OUTBOUND: &str = "127.0.0.1:5040";
/// The port of the Kubernetes Services (on the bridges) and of giphy's pod.
pub const SERVICE_PORT: u16 = 8080;
pub const GIPHY_PORT: u16 = 9001;
pub const ORGANIZATION_PORT: u16 = 9002;

/// How long a part may take to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("no dnsmasq on PATH, in /usr/sbin or in /sbin (apt-get install dnsmasq)")]
    NoDnsmasq,
    #[error("cannot start {name} in node {node}")]
    Start {
        name: String,
        node: &'static str,
        #[source]
        source: LabError,
    },
    #[error("{name} was not ready at {url} after {}s; its log:\n     {}", waited.as_secs(), tail(log))]
    NotReady {
        name: String,
        url: String,
        waited: Duration,
        log: String,
    },
}

/// The parts' lab and how they are started. Cheap to make: a borrow of each.
#[derive(Clone, Copy, Debug)]
pub struct Mesh<'a> {
    pub lab: &'a Lab,
    /// The skyline executable.
    pub exe: &'a str,
    /// The environment of every skyline process (the test turns its logs up).
    pub env: &'a [(&'a str, String)],
}

// === impl Mesh ===

impl Mesh<'_> {
    pub fn ip(&self, node: Node) -> IpAddr {
        self.lab.ip(node.host)
    }

    /// Where the registry listens (on [`GW`]).
    pub fn registry(&self) -> SocketAddr {
        SocketAddr::new(self.ip(GW), REGISTRY_PORT)
    }

    /// The token of the lab's registry and admin listeners, which listen on the lab's subnet
    /// (not loopback) and so require one: made from the lab's own folder name, the same for
    /// every process and every `Mesh` of one lab (the subnet is reachable from this host only).
    pub fn token(&self) -> Token {
        let dir = self.lab.dir().file_name().unwrap_or_default();
        let name: String = dir
            .to_string_lossy()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        Token::new(&format!("skyline-demo-{name}"))
            .unwrap_or_else(|_| unreachable!("letters and digits make a token"))
    }

    /// Where `node`'s admin listener is (the gateway's, a bridge's or an agent's).
    pub fn admin(&self, node: Node) -> SocketAddr {
        SocketAddr::new(self.ip(node), ADMIN_PORT)
    }

    /// Where `node`'s inbound proxy (or bridge, or gateway) listens.
    pub fn inbound(&self, node: Node) -> SocketAddr {
        SocketAddr::new(self.ip(node), INBOUND_PORT)
    }

    /// Where the cluster DNS in `node` answers.
    pub fn dns(&self, node: Node) -> SocketAddr {
        SocketAddr::new(self.ip(node), 53)
    }

    /// `service` listening at `port` on `node`, as the catalog gets it.
    pub fn placement(
        &self,
        node: Node,
        service: &'static str,
        port: u16,
        platform: &'static str,
    ) -> Placement {
        Placement {
            node: node.name,
            node_ip: self.ip(node),
            inbound_port: INBOUND_PORT,
            service,
            addr: SocketAddr::new(self.ip(node), port),
            platform,
        }
    }

    /// dnsmasq in `node` as the cluster DNS: it answers `names` (such as
    /// `giphy.default.svc.cluster.local`) with their nodes' addresses, any other name under
    /// `cluster.local` with NXDOMAIN, and asks no one else.
    pub fn start_cluster_dns(
        &self,
        node: Node,
        names: &[(&str, Node)],
    ) -> Result<ProcId, MeshError> {
        let dnsmasq = dnsmasq().ok_or(MeshError::NoDnsmasq)?;
        let pid_file = self.lab.dir().join("dnsmasq.pid");
        let mut args = vec![
            "--no-daemon".to_owned(),
            "--no-resolv".to_owned(),
            "--no-hosts".to_owned(),
            "--conf-file=/dev/null".to_owned(),
            "--port=53".to_owned(),
            "--bind-interfaces".to_owned(),
            format!("--listen-address={}", self.ip(node)),
            format!("--pid-file={}", pid_file.display()),
            "--local=/cluster.local/".to_owned(),
        ];
        args.extend(
            names
                .iter()
                .map(|(name, at)| format!("--address=/{name}/{}", self.ip(*at))),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn("dnsmasq", node, &dnsmasq.to_string_lossy(), &args, &[])
    }

    /// The registry in [`GW`] at [`Mesh::registry`], its data in the lab's folder; returns once
    /// it answers.
    pub async fn start_registry(&self) -> Result<ProcId, MeshError> {
        let data = self.lab.dir().join("registry");
        let listen = self.registry().to_string();
        let args = [
            "registry",
            "--listen",
            &listen,
            "--data-dir",
            &data.to_string_lossy(),
        ];
        let id = self.skyline("registry", GW, &args)?;
        let url = format!("http://{listen}/v1/catalog/services");
        self.ready("registry", &url, |_| true).await?;
        Ok(id)
    }

    /// The gateway in `node`, following the registry, failing back after `hold`; returns once
    /// it is ready.
    pub async fn start_gateway(&self, node: Node, hold: Duration) -> Result<ProcId, MeshError> {
        let (listen, admin) = (self.inbound(node).to_string(), self.admin(node).to_string());
        let (registry, hold) = (self.registry().to_string(), duration_flag(hold));
        let args = [
            "gateway", "--listen", &listen, "--admin", &admin, "--consul", &registry, "--hold",
            &hold,
        ];
        let id = self.skyline("gateway", node, &args)?;
        self.ready("gateway", &format!("http://{admin}/readyz"), |_| true)
            .await?;
        Ok(id)
    }

    /// The bridge in `node`, on the inbound port and the Services' port, resolving through the
    /// cluster DNS in `dns`; returns once it is up.
    pub async fn start_bridge(&self, node: Node, dns: Node) -> Result<ProcId, MeshError> {
        let ip = self.ip(node);
        let listen = format!("{ip}:{INBOUND_PORT},{ip}:{SERVICE_PORT}");
        let admin = self.admin(node).to_string();
        let (dns, registry) = (self.dns(dns).to_string(), self.registry().to_string());
        let args = [
            "bridge", "--listen", &listen, "--admin", &admin, "--dns", &dns, "--consul", &registry,
        ];
        let name = format!("bridge-{}", node.name);
        let id = self.skyline(&name, node, &args)?;
        self.ready(&name, &format!("http://{admin}/healthz"), |_| true)
            .await?;
        Ok(id)
    }

    /// The agent of `node`, following the registry, a service routable again going through the
    /// gateway for `hold`; returns once it is ready.
    pub async fn start_agent(&self, node: Node, hold: Duration) -> Result<ProcId, MeshError> {
        let (address, inbound) = (self.ip(node).to_string(), self.inbound(node).to_string());
        let (admin, registry) = (self.admin(node).to_string(), self.registry().to_string());
        let hold = duration_flag(hold);
        let args = [
            "agent",
            "--node-name",
            node.name,
            "--node-address",
            &address,
            "--outbound",
            OUTBOUND,
            "--inbound",
            &inbound,
            "--admin",
            &admin,
            "--catalog",
            "consul",
            "--consul",
            &registry,
            "--fallback-hold",
            &hold,
        ];
        let name = format!("agent-{}", node.name);
        let id = self.skyline(&name, node, &args)?;
        self.ready(&name, &format!("http://{admin}/readyz"), |_| true)
            .await?;
        Ok(id)
    }

    /// Waits until the agent of `node` has an outbound route to `service`.
    pub async fn wait_routed(&self, node: Node, service: &str) -> Result<(), MeshError> {
        let url = format!("http://{}/routes", self.admin(node));
        let routed = |body: &[u8]| {
            serde_json::from_slice::<serde_json::Value>(body)
                .is_ok_and(|routes| !routes["outbound"][service].is_null())
        };
        self.ready(&format!("agent-{}", node.name), &url, routed)
            .await
    }

    /// `skyline args` in `node` as process `name`, with [`Mesh::env`].
    fn skyline(&self, name: &str, node: Node, args: &[&str]) -> Result<ProcId, MeshError> {
        let token = self.token().expose().to_owned();
        let mut env = self.env.to_vec();
        env.push(("SKYLINE_REGISTRY_TOKEN", token.clone()));
        env.push(("SKYLINE_ADMIN_TOKEN", token));
        self.spawn(name, node, self.exe, args, &env)
    }

    /// Starts `program args` in `node` as process `name` (its log: `<lab>/<name>.log`).
    fn spawn(
        &self,
        name: &str,
        node: Node,
        program: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> Result<ProcId, MeshError> {
        let (id, _stdout) = self
            .lab
            .spawn(name, node.name, program, args, env)
            .map_err(|source| MeshError::Start {
                name: name.to_owned(),
                node: node.name,
                source,
            })?;
        Ok(id)
    }

    /// Waits (at most [`START_TIMEOUT`]) until `url` answers 200 with a body that `check`
    /// accepts; else an error with process `name`'s log.
    async fn ready(
        &self,
        name: &str,
        url: &str,
        check: impl Fn(&[u8]) -> bool,
    ) -> Result<(), MeshError> {
        let http = super::http_client();
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if get(&http, url, &self.token())
                .await
                .is_some_and(|body| check(&body))
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(MeshError::NotReady {
            name: name.to_owned(),
            url: url.to_owned(),
            waited: START_TIMEOUT,
            log: self.lab.log(name),
        })
    }
}

/// Creates `nodes` in `lab` and puts this process on the lab's bridge at [`HOST`].
pub fn create_nodes(lab: &Lab, nodes: &[Node]) -> Result<(), LabError> {
    for node in nodes {
        lab.node(node.name, node.host)?;
    }
    lab.attach_host(HOST)
}

/// Waits (at most `timeout`) for a process's stdout to say `line` (an application's "I
/// listen"); whether it did.
pub fn wait_for_line(lines: &mpsc::Receiver<String>, line: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(said) if said == line => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// The body of a 200 answer to `GET url` (with the lab's token, which the registry and admin
/// listeners want), if any within two seconds.
async fn get(http: &HttpClient, url: &str, token: &Token) -> Option<bytes::Bytes> {
    let req = http::Request::get(url)
        .header("x-consul-token", token.expose())
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.expose()),
        )
        .body(Full::default())
        .ok()?;
    tokio::time::timeout(Duration::from_secs(2), async {
        let resp = http.request(req).await.ok()?;
        if resp.status() != http::StatusCode::OK {
            return None;
        }
        Some(resp.into_body().collect().await.ok()?.to_bytes())
    })
    .await
    .ok()?
}

/// A duration as the roles' flags take it (`3000ms`).
fn duration_flag(duration: Duration) -> String {
    format!("{}ms", duration.as_millis())
}

/// dnsmasq on `PATH`, or in the sbin folders a user's `PATH` often lacks.
pub fn dnsmasq() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("dnsmasq"))
        .find(|candidate| candidate.is_file())
}

/// The last lines of a log, for an error message.
pub fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(10);
    let tail = lines[from..].join("\n     ");
    if tail.is_empty() {
        "(empty log)".into()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_reads_back_as_the_same_duration() {
        for hold in [Duration::from_secs(3), Duration::from_millis(500)] {
            let flag = duration_flag(hold);
            assert_eq!(crate::config::parse_duration_setting(&flag), Ok(hold));
        }
    }

    #[test]
    fn a_log_tail_keeps_the_last_ten_lines() {
        let log: String = (1..=12).map(|i| format!("line {i}\n")).collect();
        let tail = tail(&log);
        assert!(tail.starts_with("line 3\n"), "{tail}");
        assert!(tail.ends_with("line 12"), "{tail}");
        assert_eq!(super::tail(""), "(empty log)");
    }
}
