//! `skyline up`: a whole mesh on this machine for a first try — an agent on one node, `local`,
//! and two demo services, `hello` and `echo`, in a catalog file that can be edited live.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentError, CatalogSource, Listeners, Settings};
use crate::catalog::{Health, Instance, Node, ServiceName, Snapshot, file};
use crate::config::{DEFAULT_ADMIN, DEFAULT_OUTBOUND, Listen};
use crate::demo::{Echo, Hello};
use crate::routing::Policy;
use crate::serve;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(clap::Args, Clone, Debug)]
pub struct UpArgs {
    /// Folder for the mesh's catalog file [default: a new folder under the system temp dir]
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
    Agent(#[from] AgentError),
}

/// Runs the mesh until `shutdown`, printing what to try to `out`.
pub async fn run(
    args: UpArgs,
    shutdown: CancellationToken,
    out: &mut dyn Write,
) -> Result<(), UpError> {
    let (dir, ours) = match args.dir {
        Some(dir) => (dir, false),
        None => {
            let dir = std::env::temp_dir().join(format!("skyline-up-{}", std::process::id()));
            (dir, true)
        }
    };
    std::fs::create_dir_all(&dir).map_err(|source| UpError::Dir {
        path: dir.clone(),
        source,
    })?;

    let mut demos = JoinSet::new();
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
        catalog: CatalogSource::File(dir.join("catalog.toml")),
        catch_all: Vec::new(),
        policy: Policy::default(),
        workers: 1,
    };
    let listeners = Listeners::bind(&settings)?;
    let inbound = listeners.inbound.as_ref().and_then(|l| l.local_addr().ok());
    let catalog_path = dir.join("catalog.toml");
    let snapshot = demo_catalog(inbound.map_or(5041, |a| a.port()), &instances);
    std::fs::write(&catalog_path, file::render(&snapshot)).map_err(|source| UpError::Dir {
        path: catalog_path.clone(),
        source,
    })?;

    let agent = agent::start(settings, listeners, shutdown.clone()).await?;
    let outbound = agent.outbound.map_or_else(String::new, |a| a.to_string());
    let admin = agent.admin.map_or_else(|| "off".into(), |a| a.to_string());
    let _ = writeln!(
        out,
        "\nSkyline is up: outbound {outbound}, inbound {}, admin {admin}\n\n\
         Try:\n  curl http://{outbound}/service/hello/\n  \
         curl -d 'hi there' 'http://{outbound}/service/echo/any/path?x=1'\n  \
         curl http://{admin}/routes\n\n\
         The catalog is {}: edit it and routing follows within 50 ms.\n\
         Ctrl-C stops everything.\n",
        agent.inbound.map_or_else(String::new, |a| a.to_string()),
        catalog_path.display(),
    );
    let _ = out.flush();

    shutdown.cancelled().await;
    agent.join().await;
    while demos.join_next().await.is_some() {}
    if ours {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn demo_catalog(inbound_port: u16, instances: &[(&str, SocketAddr)]) -> Snapshot {
    let node = Node {
        name: "local".into(),
        address: LOCALHOST,
        inbound_port,
        meta: BTreeMap::new(),
    };
    let mut snapshot = Snapshot::default();
    snapshot.nodes.insert(node.name.clone(), node);
    for (name, addr) in instances {
        let Ok(service) = ServiceName::parse(name) else {
            continue;
        };
        let instance = Instance {
            id: format!("{name}-1"),
            service: service.clone(),
            node: "local".into(),
            address: addr.ip(),
            port: addr.port(),
            tags: Vec::new(),
            meta: BTreeMap::from([("platform".to_owned(), "local".to_owned())]),
            health: Health::Passing,
            weight: 1,
        };
        snapshot.services.entry(service).or_default().push(instance);
    }
    snapshot
}
