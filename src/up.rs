//! `skyline up`: a whole mesh on this machine for a first try — an agent on one node, `local`,
//! with the embedded registry, and two demo services, `hello` and `echo`, registered in it with
//! HTTP health checks. Anything else registered there (`skyline register`, any Consul client)
//! is routed at once.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::config::DEFAULT_OUTBOUND;
use crate::agent::{self, Settings};
use crate::catalog::CatalogSource;
use crate::catalog::ServiceName;
use crate::config::{DEFAULT_ADMIN, DEFAULT_REGISTRY, Listen};
use crate::demo::{Echo, Hello};
use crate::registration::{self, Check, Declared, NodeEntry};
use crate::registry::client::{ClientError, RegistryClient};
use crate::role::StartError;
use crate::routing::{Lookup, Policy};
use crate::serve;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(clap::Args, Clone, Debug)]
pub struct UpArgs {
    /// Folder for the registry's data [default: a new folder under the system temp dir, removed
    /// on exit]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Outbound listener
    #[arg(long, value_name = "ADDR", default_value_t = DEFAULT_OUTBOUND)]
    pub outbound: SocketAddr,

    /// Inbound listener
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5041")]
    pub inbound: SocketAddr,

    /// Admin listener, or "off"
    #[arg(long, value_name = "ADDR|off", default_value_t = Listen::At(DEFAULT_ADMIN))]
    pub admin: Listen,

    /// Where the registry's Consul-compatible API listens
    #[arg(long, value_name = "ADDR", default_value_t = DEFAULT_REGISTRY)]
    pub registry: SocketAddr,
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Off => f.write_str("off"),
            Listen::At(addr) => addr.fmt(f),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("cannot prepare {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start a demo service")]
    Demo(#[source] std::io::Error),
    #[error(transparent)]
    Agent(#[from] StartError),
    #[error("cannot register the demo services")]
    Register(#[from] ClientError),
    #[error("the demo services did not show up in the catalog")]
    NotRouted,
}

/// Runs the mesh until `shutdown`, printing what to try to `out`. Interrupted at any moment, even
/// while it is still starting, it stops at once and removes the folder it created.
pub async fn run(
    args: UpArgs,
    shutdown: CancellationToken,
    out: &mut dyn Write,
) -> Result<(), UpError> {
    let dir = UpDir::prepare(args.dir.clone())?;
    let mut demos = JoinSet::new();
    // Every step of the start gives up as soon as `shutdown` is cancelled.
    let result = match start(&args, &dir.path, &mut demos, &shutdown).await {
        Err(_) if shutdown.is_cancelled() => Ok(()),
        Err(e) => Err(e),
        Ok(agent) => {
            if !shutdown.is_cancelled() {
                print_banner(&agent, out);
            }
            shutdown.cancelled().await;
            agent.join().await;
            Ok(())
        }
    };
    shutdown.cancel();
    while demos.join_next().await.is_some() {}
    drop(dir);
    result
}

/// The folder of `skyline up`'s registry; removed on drop when `up` created it.
struct UpDir {
    path: PathBuf,
    ours: bool,
}

impl UpDir {
    fn prepare(dir: Option<PathBuf>) -> Result<Self, UpError> {
        let (path, ours) = match dir {
            Some(dir) => (dir, false),
            None => {
                let name = format!("skyline-up-{}", std::process::id());
                (std::env::temp_dir().join(name), true)
            }
        };
        std::fs::create_dir_all(&path).map_err(|source| UpError::Dir {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path, ours })
    }
}

impl Drop for UpDir {
    fn drop(&mut self) {
        if self.ours {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Starts the demo services and the agent, registers the demos and waits until they are routed.
async fn start(
    args: &UpArgs,
    dir: &std::path::Path,
    demos: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) -> Result<agent::AgentHandle, UpError> {
    let mut instances = Vec::new();
    let hello = Hello {
        greeting: "hello from skyline".into(),
    };
    for (name, handler) in [("hello", Some(hello)), ("echo", None)] {
        let listener = serve::bind(SocketAddr::new(LOCALHOST, 0)).map_err(UpError::Demo)?;
        let addr = listener.local_addr().map_err(UpError::Demo)?;
        match handler {
            Some(hello) => demos.spawn(serve::serve(listener, hello, shutdown.clone())),
            None => demos.spawn(serve::serve(listener, Echo, shutdown.clone())),
        };
        instances.push((name, addr));
    }

    let settings = Settings {
        node_name: "local".into(),
        node_address: LOCALHOST,
        outbound: Some(args.outbound),
        inbound: Some(args.inbound),
        admin: args.admin.addr(),
        catalog: CatalogSource::Embedded {
            listen: args.registry,
            data_dir: dir.join("registry"),
        },
        catch_all: Vec::new(),
        policy: Policy::default(),
        workers: 1,
        resilience: Default::default(),
        tls: None,
        authz: Default::default(),
        services: Vec::new(),
        // A newcomer's mesh: a line for every request they send (the default is a sample).
        access: crate::access::Settings {
            enabled: true,
            sample: 1.0,
            metrics: true,
        },
        peer_protocol: Default::default(),
        tokens: Default::default(),
    };
    let agent = agent::spawn(settings, shutdown.clone()).await?;
    let (Some(registry), Some(inbound)) = (agent.registry, agent.inbound) else {
        return Err(UpError::NotRouted);
    };
    // A later failure stops the agent before it is reported, so nothing writes to `dir` after.
    match register_and_wait(&agent, registry, inbound.port(), &instances, shutdown).await {
        Ok(()) => Ok(agent),
        Err(e) => {
            agent.shutdown();
            agent.join().await;
            Err(e)
        }
    }
}

/// Registers the demo instances and waits until the route table routes every one of them.
async fn register_and_wait(
    agent: &agent::AgentHandle,
    registry: SocketAddr,
    inbound_port: u16,
    instances: &[(&str, SocketAddr)],
    shutdown: &CancellationToken,
) -> Result<(), UpError> {
    let client = RegistryClient::new(registry);
    for (name, addr) in instances {
        let Ok(service) = ServiceName::parse(name) else {
            continue;
        };
        let registration = demo_registration(service, *addr, inbound_port);
        client
            .put_json("/v1/catalog/register", &registration)
            .await?;
    }
    // The banner's commands must work the moment it is printed: wait for the route table
    // (built after the catalog) to route every demo service.
    let routes = agent.routes.clone();
    let mut swaps = routes.subscribe();
    let all_routed = || {
        let table = routes.load();
        instances
            .iter()
            .all(|(name, _)| matches!(table.outbound(name), Lookup::Route(_)))
    };
    let routed = async {
        while !all_routed() {
            if swaps.changed().await.is_err() {
                return false;
            }
        }
        true
    };
    tokio::select! {
        routed = tokio::time::timeout(Duration::from_secs(10), routed) => {
            if !matches!(routed, Ok(true)) {
                return Err(UpError::NotRouted);
            }
        }
        () = shutdown.cancelled() => {}
    }
    Ok(())
}

fn print_banner(agent: &agent::AgentHandle, out: &mut dyn Write) {
    let outbound = agent.outbound.map_or_else(String::new, |a| a.to_string());
    let inbound = agent.inbound.map_or_else(String::new, |a| a.to_string());
    let registry = agent.registry.map_or_else(String::new, |a| a.to_string());
    let admin = agent.admin.map_or_else(|| "off".into(), |a| a.to_string());
    let _ = writeln!(
        out,
        "\nSkyline is up: outbound {outbound}, inbound {inbound}, admin {admin}, registry {registry}\n\n\
         Try:\n  curl http://{outbound}/service/hello/\n  \
         curl -d 'hi there' 'http://{outbound}/service/echo/any/path?x=1'\n  \
         curl http://{admin}/routes\n  \
         open http://{admin}/ui   (the dashboard)\n  \
         curl http://{registry}/v1/health/service/hello\n\n\
         The registry speaks Consul's HTTP API: services registered there are routed at once.\n\
         Ctrl-C stops everything.\n",
    );
    let _ = out.flush();
}

/// A Consul catalog registration of one demo instance on node `local`, with an HTTP check:
/// the same registration an agent makes for the services its config declares.
fn demo_registration(name: ServiceName, addr: SocketAddr, inbound_port: u16) -> serde_json::Value {
    let node = NodeEntry {
        name: "local".into(),
        address: LOCALHOST,
        inbound_port,
    };
    let mut registration = registration::registration(
        &node,
        &Declared {
            id: format!("{name}-1"),
            name,
            address: Some(addr.ip()),
            port: addr.port(),
            tags: Vec::new(),
            meta: [("platform".to_owned(), "local".to_owned())].into(),
            check: Check::Http {
                path: "/".into(),
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
            },
            deregister_after: None,
        },
    );
    // Routable at once rather than after the first check.
    registration["Check"]["Status"] = "passing".into();
    registration
}
