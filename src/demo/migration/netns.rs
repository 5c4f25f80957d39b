//! The demo's nodes in network namespaces ([`crate::netns::Lab`]), one per node on a private
//! subnet, each part a real process: the mesh as [`super::mesh`] starts it (dnsmasq as the
//! cluster DNS, this binary as `skyline registry`, `gateway`, `bridge` and `agent`), and the
//! applications and the load as `skyline demo app|load|call`. The nodes and their addresses
//! are in [`super::mesh`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use super::mesh::{
    self, DNS, GIPHY_PORT, GW, INBOUND_PORT, K1, M1, M2, Mesh, MeshError, Node, ORGANIZATION_PORT,
    POD_CALLER, POD_GIPHY, SERVICE_PORT, START_TIMEOUT, tail,
};
use super::{
    Counts, DemoError, HOLD, ORGANIZATION_TEXT, Outcome, Placement, Platform, RATE, Site, child,
    fail, giphy_text,
};
use crate::netns::{Lab, LabError, ProcId};
use crate::registry::client::RegistryClient;

const NODES: [Node; 7] = [GW, M1, M2, K1, POD_GIPHY, POD_CALLER, DNS];

/// Whether namespaces can be used here: root, `ip` that works, dnsmasq, and a lab (a bridge)
/// actually made. The reason when not.
pub(super) fn prepare() -> Result<Lab, String> {
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
    if mesh::dnsmasq().is_none() {
        return Err("they need dnsmasq as the cluster DNS (apt-get install dnsmasq)".to_owned());
    }
    Lab::new().map_err(|e| crate::error_chain(&e))
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

/// The demo's nodes in a lab.
pub(super) struct Namespaces {
    lab: Arc<Lab>,
    exe: String,
    registry: RegistryClient,
    banner: String,
    giphy_on_mesos: Placement,
    giphy: BTreeMap<Platform, ProcId>,
    load: Option<ProcId>,
    gateway_load: Option<ProcId>,
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

fn mesh_error(e: MeshError) -> String {
    crate::error_chain(&e)
}

// === impl Namespaces ===

impl Namespaces {
    /// Creates the nodes, starts every part in its node and waits until each is ready.
    pub(super) async fn start(lab: Lab) -> Result<Self, DemoError> {
        let lab = Arc::new(lab);
        on_lab(&lab, |lab| {
            mesh::create_nodes(lab, &NODES).map_err(lab_error)
        })
        .await
        .map_err(fail("create the network namespaces"))?;
        let exe = std::env::current_exe()
            .map_err(|e| fail("find its own executable")(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let mut site = Self::new(lab, exe);
        site.start_mesh().await?;
        Ok(site)
    }

    fn new(lab: Arc<Lab>, exe: String) -> Self {
        let mesh = Mesh {
            lab: &lab,
            exe: &exe,
            env: &[],
        };
        let registry = RegistryClient::new(mesh.registry()).with_token(Some(mesh.token()));
        let giphy_on_mesos = mesh.placement(M2, "giphy", GIPHY_PORT, "mesos");
        let banner = banner(&mesh);
        Self {
            registry,
            banner,
            giphy_on_mesos,
            giphy: BTreeMap::new(),
            load: None,
            gateway_load: None,
            lab,
            exe,
        }
    }

    fn mesh(&self) -> Mesh<'_> {
        Mesh {
            lab: &self.lab,
            exe: &self.exe,
            env: &[],
        }
    }

    /// The cluster DNS; the registry with the gateway, the bridge and the Mesos instances in
    /// it; the applications on Mesos; the gateway, the bridge and the agents. Each is ready,
    /// and giphy routable from m1, when this returns.
    async fn start_mesh(&mut self) -> Result<(), DemoError> {
        let organization = self
            .mesh()
            .placement(M1, "organization", ORGANIZATION_PORT, "mesos");
        self.start_catalog(&organization).await?;
        self.start_giphy(Platform::Mesos, false).await?;
        self.start_app(
            "organization",
            M1,
            organization.addr,
            ORGANIZATION_TEXT,
            false,
        )
        .await?;
        let mesh = self.mesh();
        let proxies = async {
            mesh.start_gateway(GW, HOLD).await?;
            mesh.start_bridge(K1, DNS).await?;
            for node in [M1, M2] {
                mesh.start_agent(node, HOLD).await?;
            }
            mesh.wait_routed(M1, "giphy").await
        };
        proxies
            .await
            .map_err(|e| fail("start the mesh")(mesh_error(e)))
    }

    /// The cluster DNS, and the registry with the gateway, the bridge, organization and giphy
    /// on Mesos in it.
    async fn start_catalog(&self, organization: &Placement) -> Result<(), DemoError> {
        let mesh = self.mesh();
        let names = [
            ("giphy.default.svc.cluster.local", POD_GIPHY),
            ("organization.default.svc.cluster.local", K1),
        ];
        mesh.start_cluster_dns(DNS, &names)
            .map_err(|e| fail("start the cluster dns")(mesh_error(e)))?;
        mesh.start_registry()
            .await
            .map_err(|e| fail("start the registry")(mesh_error(e)))?;
        for placement in [
            &mesh.placement(GW, "skyline-gateway", INBOUND_PORT, "gateway"),
            &mesh.placement(K1, "skyline-bridge", INBOUND_PORT, "kubernetes"),
            organization,
            &self.giphy_on_mesos,
        ] {
            placement.register(&self.registry).await?;
        }
        Ok(())
    }

    /// Starts `args` of this binary in `node` as process `name` (its log: `<lab>/<name>.log`);
    /// its stdout line by line.
    fn spawn(
        &self,
        name: &str,
        node: Node,
        args: &[&str],
    ) -> Result<(ProcId, mpsc::Receiver<String>), DemoError> {
        self.lab
            .spawn(name, node.name, &self.exe, args, &[])
            .map_err(|e| fail("start a process in a namespace")(lab_error(e)))
    }

    /// Starts an application in `node` and waits until it listens.
    async fn start_app(
        &self,
        name: &str,
        node: Node,
        listen: SocketAddr,
        text: &str,
        broken: bool,
    ) -> Result<ProcId, DemoError> {
        let listen = listen.to_string();
        let mut args = vec!["demo", "app", "--listen", &listen, "--text", text];
        if broken {
            args.push("--broken");
        }
        let (id, lines) = self.spawn(name, node, &args)?;
        let listening = tokio::task::spawn_blocking(move || {
            mesh::wait_for_line(&lines, child::READY, START_TIMEOUT)
        })
        .await
        .unwrap_or(false);
        if listening {
            Ok(id)
        } else {
            Err(fail("start an application")(format!(
                "{name} on {} did not listen at {listen}; its log:\n     {}",
                node.name,
                tail(&self.lab.log(name))
            )))
        }
    }
}

/// Where everything runs and what calls what, for the opening lines.
fn banner(mesh: &Mesh<'_>) -> String {
    format!(
        "Skyline migration demo in network namespaces, one per node on {}/24, each part a process: registry {}, gateway {}, bridge {}, cluster DNS (dnsmasq) {}.\n\
         Mesos node m1 ({}) calls http://localhost:5040/service/giphy/media {RATE} times a second.\n\
         Look on while it runs: curl -H 'Authorization: Bearer {}' http://{}/routes (the gateway's choice per service).",
        mesh.lab.ip(0),
        mesh.registry(),
        mesh.inbound(GW),
        mesh.inbound(K1),
        mesh.dns(DNS),
        mesh.ip(M1),
        mesh.token().expose(),
        mesh.admin(GW),
    )
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
            M1,
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

    async fn start_gateway_load(&mut self, counts: Arc<Counts>) -> Result<(), DemoError> {
        let rate = RATE.to_string();
        let url = format!("http://{}/service/giphy/media", self.mesh().inbound(GW));
        let (id, lines) = self.spawn(
            "gateway-load",
            M1,
            &["demo", "load", "--url", &url, "--rate", &rate],
        )?;
        std::thread::spawn(move || {
            for line in lines {
                counts.add(Outcome::from_word(&line));
            }
        });
        self.gateway_load = Some(id);
        Ok(())
    }

    async fn start_giphy(&mut self, platform: Platform, broken: bool) -> Result<(), DemoError> {
        let (node, listen) = match platform {
            Platform::Mesos => (M2, self.giphy_on_mesos.addr),
            Platform::Kubernetes => (
                POD_GIPHY,
                SocketAddr::new(self.mesh().ip(POD_GIPHY), SERVICE_PORT),
            ),
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
        let dns = self.mesh().dns(DNS).to_string();
        let out = on_lab(&self.lab, move |lab| {
            lab.output(
                POD_CALLER.name,
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
        for load in [self.load, self.gateway_load].into_iter().flatten() {
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
