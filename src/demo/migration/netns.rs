//! The demo's nodes in network namespaces ([`crate::netns::Lab`]), one per node on a private
//! subnet, each part a real process: this binary as `skyline registry`, `gateway`, `bridge`,
//! `agent` and `demo app|load|call`, and dnsmasq as the cluster DNS. This process gets an
//! address on the lab's bridge, so it registers and checks readiness directly.
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

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};

use super::{
    Counts, DemoError, HOLD, HttpClient, ORGANIZATION_TEXT, Outcome, Placement, Platform, RATE,
    Site, child, fail, giphy_text,
};
use crate::netns::{Lab, LabError, ProcId};
use crate::registry::client::RegistryClient;

// Hosts on the lab's subnet.
/// This process, on the lab's bridge.
const HOST: u8 = 1;
const GW: u8 = 10;
const M1: u8 = 11;
const M2: u8 = 12;
const K1: u8 = 21;
const POD_GIPHY: u8 = 31;
const POD_CALLER: u8 = 32;
const DNS: u8 = 53;
const NODES: [(&str, u8); 7] = [
    ("gw", GW),
    ("m1", M1),
    ("m2", M2),
    ("k1", K1),
    ("kp1", POD_GIPHY),
    ("kp2", POD_CALLER),
    ("dns", DNS),
];

const REGISTRY_PORT: u16 = 8500;
const INBOUND_PORT: u16 = 5041;
const ADMIN_PORT: u16 = 5050;
/// The port of the Kubernetes Services (on the bridge) and of giphy's pod.
const SERVICE_PORT: u16 = 8080;
const GIPHY_PORT: u16 = 9001;
const ORGANIZATION_PORT: u16 = 9002;

/// How long a part may take to start listening or become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A lab ready for the demo, and the dnsmasq to run in it.
pub(super) struct Prepared {
    lab: Lab,
    dnsmasq: PathBuf,
}

/// Whether namespaces can be used here: root, `ip` that works, dnsmasq, and a lab (a bridge)
/// actually made. The reason when not.
pub(super) fn prepare() -> Result<Prepared, String> {
    match effective_uid() {
        Some(0) => {}
        Some(uid) => return Err(format!("they need root, and this runs as uid {uid}")),
        None => return Err("they need root, and /proc/self/status does not say who runs".into()),
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(format!(
                "`ip netns list` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Err(e) => return Err(format!("they need iproute2's `ip` ({e})")),
    }
    let dnsmasq = find_program("dnsmasq").ok_or_else(|| {
        "they need dnsmasq as the cluster DNS (apt-get install dnsmasq)".to_owned()
    })?;
    let lab = Lab::new().map_err(|e| crate::error_chain(&e))?;
    Ok(Prepared { lab, dnsmasq })
}

/// The effective uid, from `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_effective_uid(&status)
}

fn parse_effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `program` on `PATH`, or in the sbin folders a user's `PATH` often lacks.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The demo's nodes in a lab.
pub(super) struct Namespaces {
    lab: Arc<Lab>,
    exe: String,
    registry: RegistryClient,
    http: HttpClient,
    banner: String,
    giphy_on_mesos: Placement,
    giphy: BTreeMap<Platform, ProcId>,
    load: Option<ProcId>,
}

/// Runs `work` on the lab on a blocking thread (it runs `ip` and waits for processes).
async fn on_lab<T: Send + 'static>(
    lab: &Arc<Lab>,
    work: impl FnOnce(&Lab) -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let lab = lab.clone();
    tokio::task::spawn_blocking(move || work(&lab))
        .await
        .map_err(|e| e.to_string())?
}

fn lab_error(e: LabError) -> String {
    crate::error_chain(&e)
}

/// The last lines of a log, for an error message.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(10);
    let tail = lines[from..].join("\n     ");
    if tail.is_empty() {
        "(empty log)".into()
    } else {
        tail
    }
}

// === impl Namespaces ===

impl Namespaces {
    /// Creates the nodes, starts every part in its node and waits until each is ready.
    pub(super) async fn start(prepared: Prepared) -> Result<Self, DemoError> {
        let Prepared { lab, dnsmasq } = prepared;
        let lab = Arc::new(lab);
        on_lab(&lab, |lab| {
            for (name, host) in NODES {
                lab.node(name, host).map_err(lab_error)?;
            }
            lab.attach_host(HOST).map_err(lab_error)
        })
        .await
        .map_err(fail("create the network namespaces"))?;
        let exe = std::env::current_exe()
            .map_err(|e| fail("find its own executable")(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let registry_addr = SocketAddr::new(lab.ip(GW), REGISTRY_PORT);
        let mut site = Self {
            registry: RegistryClient::new(registry_addr),
            http: super::http_client(),
            banner: String::new(),
            giphy_on_mesos: Placement {
                node: "m2",
                node_ip: lab.ip(M2),
                inbound_port: INBOUND_PORT,
                service: "giphy",
                addr: SocketAddr::new(lab.ip(M2), GIPHY_PORT),
                platform: "mesos",
            },
            giphy: BTreeMap::new(),
            load: None,
            lab,
            exe,
        };
        site.start_dns(&dnsmasq)?;
        site.start_registry().await?;
        site.register_all().await?;
        site.start_giphy(Platform::Mesos, false).await?;
        let ip = |host| site.ip(host);
        let organization = SocketAddr::new(ip(M1), ORGANIZATION_PORT);
        site.start_app("organization", "m1", organization, ORGANIZATION_TEXT, false)
            .await?;
        site.start_mesh().await?;
        let gateway = SocketAddr::new(ip(GW), INBOUND_PORT);
        let bridge = SocketAddr::new(ip(K1), INBOUND_PORT);
        let banner = format!(
            "Skyline migration demo in network namespaces, one per node on {}/24, each part a process: registry {registry_addr}, gateway {gateway}, bridge {bridge}, cluster DNS (dnsmasq) {}:53.\n\
             Mesos node m1 ({}) calls http://localhost:5040/service/giphy/media {RATE} times a second.\n\
             Look on while it runs: curl http://{}:{ADMIN_PORT}/routes (the gateway's choice per service).",
            ip(0),
            ip(DNS),
            ip(M1),
            ip(GW),
        );
        site.banner = banner;
        Ok(site)
    }

    fn ip(&self, host: u8) -> IpAddr {
        self.lab.ip(host)
    }

    /// Starts `args` in `node` as process `name` (its log: `<lab>/<name>.log`).
    fn spawn(
        &self,
        name: &str,
        node: &str,
        program: &str,
        args: &[&str],
    ) -> Result<(ProcId, std::sync::mpsc::Receiver<String>), DemoError> {
        self.lab
            .spawn(name, node, program, args, &[])
            .map_err(|e| fail("start a process in a namespace")(lab_error(e)))
    }

    fn start_dns(&self, dnsmasq: &Path) -> Result<(), DemoError> {
        let ip = |host| self.ip(host).to_string();
        let pid_file = self.lab.dir().join("dnsmasq.pid");
        self.spawn(
            "dnsmasq",
            "dns",
            &dnsmasq.to_string_lossy(),
            &[
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--port=53",
                "--bind-interfaces",
                &format!("--listen-address={}", ip(DNS)),
                &format!("--pid-file={}", pid_file.display()),
                "--local=/cluster.local/",
                &format!(
                    "--address=/giphy.default.svc.cluster.local/{}",
                    ip(POD_GIPHY)
                ),
                &format!(
                    "--address=/organization.default.svc.cluster.local/{}",
                    ip(K1)
                ),
            ],
        )?;
        Ok(())
    }

    async fn start_registry(&self) -> Result<(), DemoError> {
        let data = self.lab.dir().join("registry");
        let listen = self.registry.addr().to_string();
        self.spawn(
            "registry",
            "gw",
            &self.exe,
            &[
                "registry",
                "--listen",
                &listen,
                "--data-dir",
                &data.to_string_lossy(),
            ],
        )?;
        let url = format!("http://{listen}/v1/catalog/services");
        self.ready("registry", &url, |_| true).await
    }

    /// The gateway, the bridge, and the Mesos instances in the catalog.
    async fn register_all(&self) -> Result<(), DemoError> {
        let on = |node, host, service, port, platform| Placement {
            node,
            node_ip: self.ip(host),
            inbound_port: INBOUND_PORT,
            service,
            addr: SocketAddr::new(self.ip(host), port),
            platform,
        };
        for placement in [
            on("gw", GW, "skyline-gateway", INBOUND_PORT, "gateway"),
            on("k1", K1, "skyline-bridge", INBOUND_PORT, "kubernetes"),
            on("m1", M1, "organization", ORGANIZATION_PORT, "mesos"),
            self.giphy_on_mesos.clone(),
        ] {
            placement.register(&self.registry).await?;
        }
        Ok(())
    }

    /// The gateway, the bridge and the agents, each ready, and giphy routable from m1.
    async fn start_mesh(&self) -> Result<(), DemoError> {
        let ip = |host| self.ip(host).to_string();
        let consul = self.registry.addr().to_string();
        let hold = format!("{}s", HOLD.as_secs());
        let gateway_admin = format!("{}:{ADMIN_PORT}", ip(GW));
        self.spawn(
            "gateway",
            "gw",
            &self.exe,
            &[
                "gateway",
                "--listen",
                &format!("{}:{INBOUND_PORT}", ip(GW)),
                "--admin",
                &gateway_admin,
                "--consul",
                &consul,
                "--hold",
                &hold,
            ],
        )?;
        let bridge_admin = format!("{}:{ADMIN_PORT}", ip(K1));
        self.spawn(
            "bridge",
            "k1",
            &self.exe,
            &[
                "bridge",
                "--listen",
                &format!("{0}:{INBOUND_PORT},{0}:{SERVICE_PORT}", ip(K1)),
                "--admin",
                &bridge_admin,
                "--dns",
                &format!("{}:53", ip(DNS)),
                "--consul",
                &consul,
            ],
        )?;
        for (node, host) in [("m1", M1), ("m2", M2)] {
            self.spawn(
                &format!("agent-{node}"),
                node,
                &self.exe,
                &[
                    "agent",
                    "--node-name",
                    node,
                    "--node-address",
                    &ip(host),
                    "--outbound",
                    "127.0.0.1:5040",
                    "--inbound",
                    &format!("{}:{INBOUND_PORT}", ip(host)),
                    "--admin",
                    &format!("{}:{ADMIN_PORT}", ip(host)),
                    "--catalog",
                    "consul",
                    "--consul",
                    &consul,
                    "--fallback-hold",
                    &hold,
                ],
            )?;
        }
        let giphy_routed = |routes: &serde_json::Value| !routes["outbound"]["giphy"].is_null();
        for (what, url) in [
            ("gateway", format!("http://{gateway_admin}/readyz")),
            ("bridge", format!("http://{bridge_admin}/healthz")),
            ("agent-m2", format!("http://{}:{ADMIN_PORT}/readyz", ip(M2))),
        ] {
            self.ready(what, &url, |_| true).await?;
        }
        let m1_routes = format!("http://{}:{ADMIN_PORT}/routes", ip(M1));
        self.ready("agent-m1", &m1_routes, giphy_routed).await
    }

    /// Waits (at most [`START_TIMEOUT`]) until `url` answers 200 with JSON that `check`
    /// accepts; else an error with the end of `what`'s log.
    async fn ready(
        &self,
        what: &'static str,
        url: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<(), DemoError> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(json) = self.get_json(url).await {
                if check(&json) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(fail("start the mesh")(format!(
            "{what} was not ready at {url} after {}s; its log:\n     {}",
            START_TIMEOUT.as_secs(),
            tail(&self.lab.log(what))
        )))
    }

    /// The JSON body of a 200 answer to `GET url`, if any within two seconds.
    async fn get_json(&self, url: &str) -> Option<serde_json::Value> {
        let req = http::Request::get(url).body(Full::default()).ok()?;
        let body = tokio::time::timeout(Duration::from_secs(2), async {
            let resp = self.http.request(req).await.ok()?;
            if resp.status() != http::StatusCode::OK {
                return None;
            }
            Some(resp.into_body().collect().await.ok()?.to_bytes())
        })
        .await
        .ok()??;
        serde_json::from_slice(&body).ok()
    }

    /// Starts an application in `node` and waits until it listens.
    async fn start_app(
        &self,
        name: &str,
        node: &str,
        listen: SocketAddr,
        text: &str,
        broken: bool,
    ) -> Result<ProcId, DemoError> {
        let listen = listen.to_string();
        let mut args = vec!["demo", "app", "--listen", &listen, "--text", text];
        if broken {
            args.push("--broken");
        }
        let (id, lines) = self.spawn(name, node, &self.exe, &args)?;
        let deadline = Instant::now() + START_TIMEOUT;
        let listening = tokio::task::spawn_blocking(move || {
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                match lines.recv_timeout(left) {
                    Ok(line) if line == child::READY => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if listening {
            Ok(id)
        } else {
            Err(fail("start an application")(format!(
                "{name} on {node} did not listen at {listen}; its log:\n     {}",
                tail(&self.lab.log(name))
            )))
        }
    }
}

impl Site for Namespaces {
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
        let rate = RATE.to_string();
        let (id, lines) = self.spawn(
            "load",
            "m1",
            &self.exe,
            &[
                "demo",
                "load",
                "--url",
                "http://127.0.0.1:5040/service/giphy/media",
                "--rate",
                &rate,
            ],
        )?;
        // Ends when the load's stdout closes: it stopped.
        std::thread::spawn(move || {
            for line in lines {
                counts.add(Outcome::from_word(&line));
            }
        });
        self.load = Some(id);
        Ok(())
    }

    async fn start_giphy(&mut self, platform: Platform, broken: bool) -> Result<(), DemoError> {
        let (node, listen) = match platform {
            Platform::Mesos => ("m2", self.giphy_on_mesos.addr),
            Platform::Kubernetes => ("kp1", SocketAddr::new(self.ip(POD_GIPHY), SERVICE_PORT)),
        };
        let name = match (platform, broken) {
            (Platform::Mesos, _) => "giphy-mesos",
            (Platform::Kubernetes, false) => "giphy-kubernetes",
            (Platform::Kubernetes, true) => "giphy-kubernetes-broken",
        };
        let id = self
            .start_app(name, node, listen, giphy_text(platform, broken), broken)
            .await?;
        if let Some(old) = self.giphy.insert(platform, id) {
            on_lab(&self.lab, move |lab| lab.stop(old).map_err(lab_error))
                .await
                .map_err(fail("stop giphy"))?;
        }
        Ok(())
    }

    async fn stop_giphy(&mut self, platform: Platform) -> Result<(), DemoError> {
        let Some(id) = self.giphy.remove(&platform) else {
            return Ok(());
        };
        on_lab(&self.lab, move |lab| lab.stop(id).map_err(lab_error))
            .await
            .map_err(fail("stop giphy"))
    }

    async fn call_organization(&mut self) -> Result<String, DemoError> {
        let exe = self.exe.clone();
        let dns = format!("{}:53", self.ip(DNS));
        let out = on_lab(&self.lab, move |lab| {
            lab.output(
                "kp2",
                &exe,
                &[
                    "demo",
                    "call",
                    "--url",
                    "http://organization.default.svc.cluster.local:8080/members",
                    "--dns",
                    &dns,
                ],
                Duration::from_secs(30),
            )
            .map_err(lab_error)
        })
        .await
        .map_err(fail("call organization from a pod"))?;
        let answer = out.trim();
        Ok(if answer.is_empty() {
            "failed: the pod's call printed nothing".to_owned()
        } else {
            answer.to_owned()
        })
    }

    async fn teardown(self) {
        if let Some(load) = self.load {
            self.lab.close_stdin(load);
        }
        // Dropping the lab kills its processes and removes the namespaces and the bridge.
        let lab = self.lab;
        let _ = tokio::task::spawn_blocking(move || drop(lab)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_uid_is_the_second_of_four() {
        let status = "Name:\tskyline\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(parse_effective_uid(status), Some(0));
        assert_eq!(parse_effective_uid("Name:\tx\n"), None);
    }
}
