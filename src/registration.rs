//! The agent registers the services its config declares for its node, keeps their checks alive,
//! and deregisters them on graceful shutdown.
//!
//! Registration goes through the Consul catalog API (`/v1/catalog/register`) of the registry the
//! agent follows, as the node's own entry: node name, node address, and the node meta
//! `skyline-inbound-port` that tells other agents where this node's inbound proxy listens.
//!
//! Checks: `http` is run by the registry at its interval. `ttl` is kept alive by the agent, which
//! first connects to the instance's port: a TTL check says "the instance accepts connections",
//! not merely "the agent is alive".
//!
//! With `--catalog etcd` the agent writes its node and services into etcd itself, see [`etcd`].
//!
//! The declared services can change while the agent runs (SIGHUP, see `agent::reload`): the
//! registration follows a `watch` of them, registers new ones and deregisters removed ones.

pub mod etcd;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::catalog::ServiceName;
use crate::contract::ADMIN_SERVICE;
use crate::registry::INBOUND_PORT_META;
use crate::registry::client::{ClientError, RegistryClient};

/// How long a probe of the instance's port may take before the check fails.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest wait between registration attempts while the registry is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A service instance declared in the agent's config (`[[service]]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declared {
    pub name: ServiceName,
    /// Default `<name>-<node>-<port>`.
    pub id: String,
    /// Where the instance listens; default the node's address.
    pub address: Option<IpAddr>,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub check: Check,
    /// The registry deregisters the instance after its check stayed critical this long
    /// (Consul's `DeregisterCriticalServiceAfter`); `None`: never.
    pub deregister_after: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// Refreshed by the agent every `ttl / 3` after a successful TCP connect to the instance.
    Ttl(Duration),
    /// `GET http://<address>:<port><path>` run by the registry.
    Http {
        path: String,
        interval: Duration,
        timeout: Duration,
    },
}

/// The node the services are registered on.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub name: String,
    pub address: IpAddr,
    pub inbound_port: u16,
}

/// Registers the `declared` services, keeps their TTL checks alive until `shutdown`, then
/// deregisters them. Registry failures are retried with backoff; a registry that lost the
/// registrations (a restart on an empty data folder) gets them again. A change of `declared`
/// deregisters the services left out and registers the new set.
pub async fn run(
    client: RegistryClient,
    node: NodeEntry,
    mut declared: watch::Receiver<Vec<Declared>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut services = declared.borrow_and_update().clone();
    let mut registered = false;
    // The registry is failing: warned once when it starts, each retry at debug.
    let mut failing = false;
    let mut open = true;
    loop {
        let tick = services
            .iter()
            .filter_map(|s| match s.check {
                Check::Ttl(ttl) => Some(ttl / 3),
                Check::Http { .. } => None,
            })
            .min()
            .unwrap_or(Duration::from_secs(30))
            .max(Duration::from_millis(100));
        let outcome = if registered {
            refresh(&client, &node, &services).await
        } else {
            match register(&client, &node, &services).await {
                Ok(()) => refresh(&client, &node, &services).await,
                Err(e) => Err(e),
            }
        };
        let wait = match outcome {
            Ok(()) => {
                if !registered {
                    tracing::info!(registry = %client.addr(), services = services.len(), "services registered");
                } else if failing {
                    tracing::info!(registry = %client.addr(), services = services.len(), "registry answers again; services renewed");
                }
                registered = true;
                failing = false;
                backoff = Duration::from_millis(100);
                tick
            }
            Err(error) => {
                let chain = crate::error_chain(&error);
                if std::mem::replace(&mut failing, true) {
                    tracing::debug!(registry = %client.addr(), error = %chain, "registration failed; retrying");
                } else {
                    tracing::warn!(registry = %client.addr(), error = %chain, "registration failed; retrying");
                }
                // A check the registry no longer knows means the registration is gone.
                registered = registered
                    && !matches!(&error, ClientError::Refused { status, .. } if status.as_u16() == 404);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                backoff
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
            changed = declared.changed(), if open => {
                if changed.is_err() {
                    open = false;
                    continue;
                }
                let fresh = declared.borrow_and_update().clone();
                let removed: Vec<Declared> = services
                    .iter()
                    .filter(|s| !fresh.iter().any(|f| f.id == s.id))
                    .cloned()
                    .collect();
                deregister(&client, &node, &removed).await;
                tracing::info!(before = services.len(), after = fresh.len(), "declared services changed");
                services = fresh;
                // Registering is idempotent: the whole new set, changed ones included.
                registered = false;
            }
        }
    }
    if registered {
        deregister(&client, &node, &services).await;
    }
}

async fn register(
    client: &RegistryClient,
    node: &NodeEntry,
    services: &[Declared],
) -> Result<(), ClientError> {
    for service in services {
        client
            .put_json("/v1/catalog/register", &registration(node, service))
            .await?;
    }
    Ok(())
}

/// Passes or fails each TTL check after probing its instance.
async fn refresh(
    client: &RegistryClient,
    node: &NodeEntry,
    services: &[Declared],
) -> Result<(), ClientError> {
    for service in services.iter().filter(|s| matches!(s.check, Check::Ttl(_))) {
        let addr = SocketAddr::new(service.address.unwrap_or(node.address), service.port);
        let up = accepts_connections(addr).await;
        let verdict = if up { "pass" } else { "fail" };
        let path = format!(
            "/v1/agent/check/{verdict}/{}?node={}",
            check_id(service),
            node.name
        );
        client.put_json(&path, &serde_json::Value::Null).await?;
    }
    Ok(())
}

/// Whether the instance at `addr` accepts a TCP connection within [`PROBE_TIMEOUT`]: what a
/// TTL check of a declared service stands for.
pub async fn accepts_connections(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

async fn deregister(client: &RegistryClient, node: &NodeEntry, services: &[Declared]) {
    for service in services {
        let body = serde_json::json!({ "Node": node.name, "ServiceID": service.id });
        let done = tokio::time::timeout(
            Duration::from_secs(2),
            client.put_json("/v1/catalog/deregister", &body),
        )
        .await;
        match done {
            Ok(Ok(_)) => {
                tracing::info!(service = %service.name, id = %service.id, "service deregistered")
            }
            _ => tracing::warn!(service = %service.name, id = %service.id, "could not deregister"),
        }
    }
}

fn check_id(service: &Declared) -> String {
    format!("{}-check", service.id)
}

/// The `/v1/catalog/register` body for one declared service on `node`.
pub fn registration(node: &NodeEntry, service: &Declared) -> serde_json::Value {
    let address = service.address.unwrap_or(node.address);
    let definition = match &service.check {
        Check::Ttl(ttl) => serde_json::json!({ "TTL": go_duration(*ttl) }),
        Check::Http {
            path,
            interval,
            timeout,
        } => serde_json::json!({
            "HTTP": format!("http://{}{path}", SocketAddr::new(address, service.port)),
            "Interval": go_duration(*interval),
            "Timeout": go_duration(*timeout),
        }),
    };
    let mut definition = definition;
    if let (Some(after), Some(d)) = (service.deregister_after, definition.as_object_mut()) {
        d.insert(
            "DeregisterCriticalServiceAfter".into(),
            go_duration(after).into(),
        );
    }
    serde_json::json!({
        "Node": node.name,
        "Address": node.address.to_string(),
        "NodeMeta": { INBOUND_PORT_META: node.inbound_port.to_string() },
        "Service": {
            "ID": service.id,
            "Service": service.name.as_str(),
            "Address": address.to_string(),
            "Port": service.port,
            "Tags": service.tags,
            "Meta": service.meta,
        },
        "Check": {
            "CheckID": check_id(service),
            "Name": format!("{} on {}", service.name, node.name),
            "ServiceID": service.id,
            "Definition": definition,
        },
    })
}

fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

// === The admin listener in the catalog ===

/// How often a gateway's or bridge's admin registration passes its TTL check.
const ADMIN_TTL: Duration = Duration::from_secs(10);

/// An agent's admin listener at `addr` as a declared service of node `node` (its TTL check
/// passes while the listener accepts connections).
pub fn admin_service(node: &str, addr: SocketAddr) -> Option<Declared> {
    Some(Declared {
        name: ServiceName::parse(ADMIN_SERVICE).ok()?,
        id: format!("{ADMIN_SERVICE}-agent-{node}"),
        address: (!addr.ip().is_unspecified()).then_some(addr.ip()),
        port: addr.port(),
        tags: vec!["agent".to_owned()],
        meta: BTreeMap::from([
            ("role".to_owned(), "agent".to_owned()),
            ("node".to_owned(), node.to_owned()),
        ]),
        check: Check::Ttl(ADMIN_TTL),
        deregister_after: None,
    })
}

/// `declared` with `fixed` always added (the agent's own admin listener): what the agent
/// registers. The returned task follows `declared` until it closes or `shutdown`.
pub fn with_fixed(
    mut declared: watch::Receiver<Vec<Declared>>,
    fixed: Vec<Declared>,
    shutdown: CancellationToken,
) -> (
    watch::Receiver<Vec<Declared>>,
    impl std::future::Future<Output = ()> + Send,
) {
    let join = move |now: &[Declared]| now.iter().chain(&fixed).cloned().collect::<Vec<_>>();
    let (tx, rx) = watch::channel(join(&declared.borrow_and_update()));
    let task = async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = declared.changed() => {
                    if changed.is_err() {
                        // Keep the combined set open (the registration's input) until shutdown.
                        shutdown.cancelled().await;
                        return;
                    }
                    let now = join(&declared.borrow_and_update());
                    tx.send_replace(now);
                }
            }
        }
    };
    (rx, task)
}

/// Registers the admin listener at `addr` of a gateway or bridge (`role`) with the registry's
/// agent endpoint, as Consul's services register with their local agent, passes its TTL check
/// while the listener accepts connections, and deregisters it at `shutdown`. The registry
/// being away is retried with backoff.
pub async fn run_admin(
    client: RegistryClient,
    role: &'static str,
    addr: SocketAddr,
    shutdown: CancellationToken,
) {
    let node = hostname();
    let id = format!("{ADMIN_SERVICE}-{role}-{node}-{}", addr.port());
    let address = if addr.ip().is_unspecified() {
        String::new()
    } else {
        addr.ip().to_string()
    };
    let body = serde_json::json!({
        "ID": id,
        "Name": ADMIN_SERVICE,
        "Address": address,
        "Port": addr.port(),
        "Tags": [role],
        "Meta": { "role": role, "node": node },
        "Check": {
            "TTL": go_duration(ADMIN_TTL),
            "DeregisterCriticalServiceAfter": go_duration(Duration::from_secs(600)),
        },
    });
    let probe = if addr.ip().is_unspecified() {
        SocketAddr::new(IpAddr::from([127, 0, 0, 1]), addr.port())
    } else {
        addr
    };
    let check = format!("/v1/agent/check/pass/service:{id}");
    let (mut registered, mut backoff) = (false, Duration::from_millis(100));
    // The registry is failing: warned once when it starts, each retry at debug.
    let mut failing = false;
    loop {
        let outcome = async {
            if !registered {
                client.put_json("/v1/agent/service/register", &body).await?;
            }
            if accepts_connections(probe).await {
                client.put_json(&check, &serde_json::Value::Null).await?;
            }
            Ok::<_, ClientError>(())
        };
        let wait = match outcome.await {
            Ok(()) => {
                if !registered {
                    tracing::info!(registry = %client.addr(), service = ADMIN_SERVICE, %id, "admin listener registered");
                }
                registered = true;
                failing = false;
                backoff = Duration::from_millis(100);
                ADMIN_TTL / 3
            }
            Err(error) => {
                let chain = crate::error_chain(&error);
                if std::mem::replace(&mut failing, true) {
                    tracing::debug!(registry = %client.addr(), error = %chain, "admin registration failed; retrying");
                } else {
                    tracing::warn!(registry = %client.addr(), error = %chain, "admin registration failed; retrying");
                }
                registered = false;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                backoff
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    if registered {
        let path = format!("/v1/agent/service/deregister/{id}");
        let _ = client.put_json(&path, &serde_json::Value::Null).await;
    }
}

/// This machine's name (the `node` of a gateway's or bridge's admin registration).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
