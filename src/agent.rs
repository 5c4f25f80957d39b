//! The per-node agent: outbound proxy, inbound proxy and admin listener over one route table that
//! follows the catalog; [`registration`] registers the node's own services.

pub mod config;
pub mod reload;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::access::AccessLog;
use crate::admin::Admin;
use crate::catalog::{self, CatalogSource, Subscriber, follow, follow_catalog};
use crate::metrics::{Metrics, Role};
use crate::proxy::Forwarder;
use crate::proxy::inbound::{self, Inbound};
use crate::proxy::outbound::Outbound;
use crate::proxy::resilience::{self, Policies, SharedPolicies};
use crate::registration;
use crate::registry::{self, RegistryConfig, RegistryHandle};
use crate::role::{StartError, Tokens, listen, mesh_tls};
use crate::routing::{self, Endpoint, Policy, Protocol, Route, Routes, Table};
use crate::serve::activation::Inherited;
use crate::serve::{self, Recorder};

/// Validated agent settings (see `config::AgentArgs` for what users write).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub node_name: String,
    pub node_address: IpAddr,
    /// `None`: the listener is off.
    pub outbound: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub catalog: CatalogSource,
    pub catch_all: Vec<SocketAddr>,
    pub policy: Policy,
    pub workers: usize,
    /// Timeouts, retries, balancing and ejection: defaults and per service. Reloadable.
    pub resilience: Policies,
    /// Services of this node, registered in the catalog while the agent runs. Reloadable.
    pub services: Vec<registration::Declared>,
    /// Mesh TLS on the inbound listener and toward other proxies; `None`: off.
    pub tls: Option<crate::tls::Settings>,
    /// Authorization policies and callers' credentials (`[authz]`). Reloadable.
    pub authz: crate::authz::Settings,
    /// The access log (read at start).
    pub access: crate::access::Settings,
    /// How requests travel to other Skyline proxies (read at start).
    pub peer_protocol: crate::proxy::h2::PeerProtocol,
    /// Tokens of the admin listener and the registry.
    pub tokens: Tokens,
}

/// The agent's listeners, bound before anything else starts so a port conflict fails fast.
pub struct Listeners {
    pub outbound: Option<TcpListener>,
    pub inbound: Option<TcpListener>,
    pub admin: Option<TcpListener>,
    /// The embedded registry's API, with `--catalog embedded`.
    pub registry: Option<TcpListener>,
}

/// The names of the agent's listeners, as inherited sockets are named (see
/// [`serve::activation`]).
pub const LISTENER_NAMES: [&str; 4] = ["outbound", "inbound", "admin", "registry"];

impl Listeners {
    /// Binds every listener the settings turn on.
    pub fn bind(settings: &Settings) -> Result<Self, StartError> {
        Self::open(settings, &mut Inherited::none())
    }

    /// Takes each listener from `inherited` when the supervisor passed a socket of its name,
    /// and binds the others. The embedded registry's is only taken with `--catalog embedded`.
    pub fn open(settings: &Settings, inherited: &mut Inherited) -> Result<Self, StartError> {
        let registry = match &settings.catalog {
            CatalogSource::Embedded { listen, .. } => Some(*listen),
            _ => None,
        };
        let mut open =
            |listener: &'static str, addr: Option<SocketAddr>| listen(inherited, listener, addr);
        Ok(Self {
            outbound: open("outbound", settings.outbound)?,
            inbound: open("inbound", settings.inbound)?,
            admin: open("admin", settings.admin)?,
            registry: match registry {
                Some(addr) => open("registry", Some(addr))?,
                None => None,
            },
        })
    }
}

/// A running agent.
pub struct AgentHandle {
    pub outbound: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub routes: Arc<Routes>,
    pub catalog: Subscriber,
    /// The resilience policies in force; storing new ones applies them to the next requests.
    pub policies: SharedPolicies,
    /// The authorization policies in force (the file's and the KV's).
    pub authz: crate::authz::Authz,
    /// What the outbound and inbound listeners record, served at the admin's `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The embedded registry, with `--catalog embedded`.
    pub registry: Option<SocketAddr>,
    /// The services of this node that the agent registers; sending a new list registers the
    /// new ones and deregisters the ones left out (SIGHUP does).
    pub declared: Arc<watch::Sender<Vec<registration::Declared>>>,
    registry_handle: Option<RegistryHandle>,
    /// Stops the embedded registry (when dropped): after the agent's own tasks, so that the
    /// registration can still deregister this node's services from it.
    registry_stop: Option<tokio_util::sync::DropGuard>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl AgentHandle {
    /// Stops accepting, drains in-flight requests, and stops following the catalog.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until every task of the agent has finished.
    pub async fn join(mut self) {
        crate::serve::join_all(&mut self.tasks).await;
        drop(self.registry_stop.take());
        if let Some(registry) = self.registry_handle.take() {
            registry.join().await;
        }
    }
}

fn addr_of(listener: &Option<TcpListener>) -> Option<SocketAddr> {
    listener.as_ref().and_then(|l| l.local_addr().ok())
}

/// Binds the listeners and starts the agent; see [`start`].
pub async fn spawn(
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<AgentHandle, StartError> {
    let listeners = Listeners::bind(&settings)?;
    start(settings, listeners, shutdown).await
}

/// Starts following the catalog, waits for its first snapshot, then serves the listeners.
/// A catalog file or registry that cannot be read at start, or a catalog that refuses the
/// agent, is an error; a Consul or etcd that does not answer is not (the agent serves without
/// it until it does, see [`catalog::first_read`]). Later failures keep the last good one.
pub async fn start(
    settings: Settings,
    mut listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<AgentHandle, StartError> {
    let mut tasks = JoinSet::new();
    let mut registry_handle = None;
    // The embedded registry outlives the agent's tasks (see `AgentHandle::join`); it stops when
    // the agent does, or when this start fails.
    let registry_stop = CancellationToken::new();
    let stop_registry = registry_stop.clone().drop_guard();
    let (source_name, subscriber) = match &settings.catalog {
        CatalogSource::Embedded { data_dir, .. } => {
            let Some(listener) = listeners.registry.take() else {
                return Err(StartError::Catalog {
                    source_name: "embedded".into(),
                    error: "no registry listener was bound".into(),
                });
            };
            let config = RegistryConfig {
                data_dir: data_dir.clone(),
                node_name: settings.node_name.clone(),
                node_address: settings.node_address,
                token: settings.tokens.registry.clone(),
            };
            let handle = registry::spawn(listener, config, registry_stop.clone()).await?;
            let (publisher, subscriber) = catalog::channel();
            let name = follow(&mut tasks, handle.discovery(), publisher, &shutdown);
            registry_handle = Some(handle);
            (name, subscriber)
        }
        other => follow_catalog(
            other,
            settings.tokens.registry.as_ref(),
            &mut tasks,
            &shutdown,
        ),
    };
    let registry = registry_handle.as_ref().map(RegistryHandle::addr);
    // A catalog on other machines that has not answered yet does not leave the node's
    // applications without a mesh: the agent serves without it (not ready; unknown services go
    // to the catch-all, its declared services are served to peers) and routes by the catalog
    // once it answers. A refusal (the token), a bad file, or the registry in this process
    // failing is an error.
    let remote = matches!(
        settings.catalog,
        CatalogSource::Consul(_) | CatalogSource::Etcd { .. }
    );
    let first = catalog::first_read(&subscriber, remote, &source_name, &mut tasks, &shutdown).await;
    let snapshot = match first {
        Ok(snapshot) => snapshot,
        Err(first) => {
            shutdown.cancel();
            registry_stop.cancel();
            // The registry's files are closed before the caller hears of the failure.
            if let Some(registry) = registry_handle {
                registry.join().await;
            }
            crate::serve::join_all(&mut tasks).await;
            return Err(StartError::Catalog {
                source_name,
                error: first.error,
            });
        }
    };

    let table = match &snapshot {
        Some(snapshot) => Table::build_after(
            &Table::default(),
            snapshot,
            &settings.node_name,
            settings.policy,
            std::time::Instant::now(),
        ),
        None => Table::default(),
    };
    let routes = Arc::new(Routes::new(table));
    let (applied, applied_rx) = watch::channel(None);
    if snapshot.is_some() {
        catalog::mark_applied(&applied, &subscriber.borrow());
    }
    tasks.spawn(routing::follow(
        subscriber.clone(),
        routes.clone(),
        settings.node_name.clone(),
        settings.policy,
        applied,
    ));

    let (declared, declared_rx) = watch::channel(settings.services.clone());
    // The admin listener is registered too (`skyline-admin`) in a registry or Consul, where
    // Prometheus (or `skyline prometheus-targets`) finds it; etcd has no such reader.
    let admin_service = addr_of(&listeners.admin)
        .filter(|_| !matches!(settings.catalog, CatalogSource::Etcd { .. }))
        .and_then(|addr| registration::admin_service(&settings.node_name, addr));
    let (declared_rx, follow_declared) = registration::with_fixed(
        declared_rx,
        admin_service.into_iter().collect(),
        shutdown.clone(),
    );
    tasks.spawn(follow_declared);
    let node = registration::NodeEntry {
        name: settings.node_name.clone(),
        address: settings.node_address,
        inbound_port: addr_of(&listeners.inbound)
            .map_or(crate::catalog::DEFAULT_INBOUND_PORT, |a| a.port()),
    };
    match &settings.catalog {
        CatalogSource::Consul(addr) => {
            let client = crate::registry::client::RegistryClient::new(*addr)
                .with_token(settings.tokens.registry.clone());
            tasks.spawn(registration::run(
                client,
                node,
                declared_rx,
                shutdown.clone(),
            ));
        }
        CatalogSource::Embedded { .. } => {
            if let Some(addr) = registry {
                let client = crate::registry::client::RegistryClient::new(addr)
                    .with_token(settings.tokens.registry.clone());
                tasks.spawn(registration::run(
                    client,
                    node,
                    declared_rx,
                    shutdown.clone(),
                ));
            }
        }
        // The node itself is registered too: instances written by `skyline register` on this
        // node need its key, and they share its lease.
        CatalogSource::Etcd { endpoints, prefix } => {
            let target = registration::etcd::EtcdTarget {
                endpoints: endpoints.clone(),
                prefix: prefix.clone(),
                ttl: crate::catalog::etcd::register::DEFAULT_TTL,
            };
            tasks.spawn(registration::etcd::run(
                target,
                node,
                declared_rx,
                shutdown.clone(),
            ));
        }
        CatalogSource::File(_) => {}
    }

    let metrics = Metrics::when(settings.access.metrics);
    let tls = match mesh_tls(settings.tls.as_ref(), &metrics, &mut tasks, &shutdown) {
        Ok(tls) => tls,
        Err(e) => {
            shutdown.cancel();
            if let Some(registry) = registry_handle {
                registry.join().await;
            }
            crate::serve::join_all(&mut tasks).await;
            return Err(e);
        }
    };
    // The outbound side dials other proxies (mTLS when on); the inbound side, the local
    // instances (plain HTTP, always).
    let forwarder = Forwarder::with_tls(metrics.clone(), tls.clone())
        .with_peer_protocol(settings.peer_protocol);
    let local = Forwarder::new(metrics.clone());
    let policies = resilience::shared(settings.resilience.clone());
    tasks.spawn(crate::proxy::probe::run(
        routes.clone(),
        policies.clone(),
        tls.clone(),
        shutdown.clone(),
    ));
    let authz = crate::authz::Authz::new(settings.authz.clone());
    // The KV's policies, where the catalog is a registry or Consul (etcd has no KV here).
    let kv = match &settings.catalog {
        CatalogSource::Embedded { .. } => registry,
        CatalogSource::Consul(addr) => Some(*addr),
        _ => None,
    };
    if let Some(address) = kv {
        tasks.spawn(crate::authz::kv::watch(
            address,
            settings.tokens.registry.clone(),
            authz.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    let (outbound, inbound, admin) = (
        addr(&listeners.outbound),
        addr(&listeners.inbound),
        addr(&listeners.admin),
    );
    let mut explainer = None;
    // One access log (and its writer thread) for both proxy listeners.
    let access = AccessLog::stderr(&settings.access);
    if let Some(listener) = listeners.outbound {
        let catch_all = (!settings.catch_all.is_empty()).then(|| {
            Route::new(
                settings
                    .catch_all
                    .iter()
                    // The catch-all is the gateways: HTTP/1.1 and h2c on one port.
                    .map(|&a| Endpoint::new(a, 1).speaking(Protocol::Both).with_mesh(true))
                    .collect(),
            )
        });
        let handler = Outbound::new(
            routes.clone(),
            forwarder.clone(),
            policies.clone(),
            catch_all,
        )
        .with_callers(authz.clone(), settings.node_address);
        explainer = Some(handler.clone());
        let recorder = Recorder::new(Role::Outbound, metrics.clone()).with_access(access.clone());
        tasks.spawn(serve::serve_recorded(
            listener,
            handler,
            recorder,
            shutdown.clone(),
        ));
    }
    if let Some(listener) = listeners.inbound {
        let own = inbound::Own {
            services: declared.subscribe(),
            node_address: settings.node_address,
        };
        let handler = Inbound::new(routes.clone(), local, policies.clone(), authz.clone(), own);
        let recorder = Recorder::new(Role::Inbound, metrics.clone()).with_access(access.clone());
        tasks.spawn(serve::serve_mesh(
            listener,
            handler,
            recorder,
            tls.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(listener) = listeners.admin {
        // The dashboard reads migration records where the agent's catalog is a registry.
        let kv = match &settings.catalog {
            CatalogSource::Consul(addr) => Some(*addr),
            CatalogSource::Embedded { .. } => registry,
            _ => None,
        };
        let kv = kv.map(|addr| {
            crate::registry::client::RegistryClient::new(addr)
                .with_token(settings.tokens.registry.clone())
        });
        let dashboard = crate::admin::ui::Dashboard::new("agent", "listener", kv);
        let counters = metrics.clone();
        tasks.spawn(crate::admin::ui::sample_every(
            dashboard.clone(),
            move || crate::admin::agent_readings(&counters),
            shutdown.clone(),
        ));
        let handler = Admin::new(
            routes.clone(),
            subscriber.clone(),
            source_name.clone(),
            metrics.clone(),
            explainer,
        )
        .with_token(settings.tokens.admin.clone())
        .with_dashboard(dashboard);
        tasks.spawn(serve::serve(listener, handler, shutdown.clone()));
    }
    // The convergence report (`skyline status`) in the registry or etcd the agent follows (the
    // embedded registry at the address it was bound to).
    let report_to = match (&settings.catalog, registry) {
        (CatalogSource::Embedded { .. }, Some(addr)) => CatalogSource::Consul(addr),
        (source, _) => source.clone(),
    };
    let identity = crate::status::Identity {
        role: "agent",
        name: settings.node_name.clone(),
        node: settings.node_name.clone(),
        admin,
        catalog: source_name.clone(),
    };
    if let Some(report) = crate::status::reporter(
        &report_to,
        settings.tokens.registry.as_ref(),
        identity,
        applied_rx,
        subscriber.clone(),
        Arc::new(crate::status::catalog_reasons),
        shutdown.clone(),
    ) {
        tasks.spawn(report);
    }
    let show = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_owned(), |a| a.to_string());
    tracing::info!(
        node = %settings.node_name,
        outbound = %show(outbound),
        inbound = %show(inbound),
        admin = %show(admin),
        catalog = %source_name,
        "agent started"
    );
    Ok(AgentHandle {
        outbound,
        inbound,
        admin,
        routes,
        catalog: subscriber,
        policies,
        authz,
        metrics,
        registry,
        declared: Arc::new(declared),
        registry_handle,
        registry_stop: Some(stop_registry),
        shutdown,
        tasks,
    })
}
