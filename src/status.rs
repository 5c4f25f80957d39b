//! Convergence reports: every agent, gateway and bridge that follows a registry (or Consul)
//! publishes which catalog version its route table was built from, whether it is ready, and
//! when it last said so, as one KV entry `skyline/status/<role>/<name>`. `skyline status`
//! (see [`crate::cli::status`]) reads them all and tells how far the mesh has converged.
//!
//! The KV is the right place because a KV write moves only the KV's indexes: the catalog and
//! health watches the proxies block on (`/v1/catalog/services`, `/v1/health/service/<name>`)
//! do not wake, so publishing a version never changes the version (proxies would chase each
//! other). A report is written when the applied version or the readiness changes (at most
//! every [`MIN_INTERVAL`]), and every [`HEARTBEAT`] anyway, so a proxy that stopped answering
//! shows its age; a proxy that stops gracefully deletes its entry.
//!
//! A proxy that follows etcd writes the same report into etcd, under
//! `<prefix>-status/<role>/<name>` (`skyline-status/...` for the default prefix `skyline/`):
//! outside the watched prefix, so a report never moves the revision the proxies follow. The
//! key is bound to a lease of [`ETCD_TTL`], refreshed with every report, so the report of a
//! proxy that died goes away with its lease. Its version is the etcd revision its table
//! reflects. A catalog file has no version shared between proxies: nothing is reported.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::catalog::CatalogSource;
use crate::catalog::etcd::EtcdError;
use crate::catalog::etcd::client::Client as EtcdClient;
use crate::catalog::{AppliedVersion, CatalogState, Subscriber, unix_ms};
use crate::config::token::Token;
use crate::registry::client::RegistryClient;

/// The KV prefix of the reports: `skyline/status/<role>/<name>`.
pub const KV_STATUS_PREFIX: &str = "skyline/status/";
/// The longest time between two reports of a running proxy.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// The shortest time between two reports (changes in between are reported together).
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);
/// The lease of a report in etcd: three heartbeats.
pub const ETCD_TTL: Duration = Duration::from_secs(30);

/// Where the reports of the proxies that follow the etcd catalog under `prefix` (ending with
/// `/`) live: next to it, outside it.
pub fn etcd_status_prefix(prefix: &str) -> String {
    format!("{}-status/", prefix.trim_end_matches('/'))
}

/// One proxy's report, as stored (JSON) under [`KV_STATUS_PREFIX`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// `agent`, `gateway` or `bridge`.
    pub role: String,
    /// The proxy's name among its role: the node name of an agent; host and port otherwise.
    pub name: String,
    /// The node (an agent's node name; the host name of a gateway or bridge).
    pub node: String,
    /// The catalog version its route table was built from; `None` when none yet.
    pub version: Option<u64>,
    /// When that table went into force, in unix milliseconds.
    pub applied_at_ms: Option<u64>,
    /// Ready to route: the reasons it is not are in `reasons`.
    pub ready: bool,
    pub reasons: Vec<String>,
    /// The admin listener, where `/routes` and `/explain` answer.
    pub admin: Option<String>,
    /// The catalog source, as `/readyz` names it.
    pub catalog: String,
    /// When this report was written, in unix milliseconds.
    pub published_at_ms: u64,
}

/// Why a role is not ready, from its catalog state (and whatever else the role checks).
pub type Readiness = Arc<dyn Fn(&CatalogState) -> Vec<String> + Send + Sync>;

/// The reasons shared by every role: no catalog yet, or a stale one.
pub fn catalog_reasons(state: &CatalogState) -> Vec<String> {
    let mut reasons = Vec::new();
    if state.snapshot.is_none() {
        reasons.push("no catalog yet".to_owned());
    }
    if let Some(error) = &state.error {
        reasons.push(format!("catalog stale: {error}"));
    }
    reasons
}

/// Who reports.
#[derive(Clone, Debug)]
pub struct Identity {
    pub role: &'static str,
    pub name: String,
    pub node: String,
    pub admin: Option<std::net::SocketAddr>,
    pub catalog: String,
}

impl Identity {
    /// The KV key of this proxy's report.
    pub fn key(&self) -> String {
        format!("{KV_STATUS_PREFIX}{}", self.path())
    }

    /// `<role>/<name>`, the name made safe for a key path.
    pub fn path(&self) -> String {
        let clean: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{}/{clean}", self.role)
    }
}

/// The report of `identity` for what it applied and the catalog state it follows.
pub fn report(
    identity: &Identity,
    applied: Option<AppliedVersion>,
    state: &CatalogState,
    readiness: &Readiness,
) -> Report {
    let reasons = readiness(state);
    Report {
        role: identity.role.to_owned(),
        name: identity.name.clone(),
        node: identity.node.clone(),
        version: applied.and_then(|a| a.version),
        applied_at_ms: applied.map(|a| a.at_ms),
        ready: reasons.is_empty(),
        reasons,
        admin: identity.admin.map(|a| a.to_string()),
        catalog: identity.catalog.clone(),
        published_at_ms: unix_ms(std::time::SystemTime::now()),
    }
}

/// The task that publishes this proxy's report (see [`run`]) where its catalog source keeps
/// reports: the registry or Consul it follows, or etcd. A catalog file has none: `None`.
pub fn reporter(
    source: &CatalogSource,
    token: Option<&Token>,
    identity: Identity,
    applied: watch::Receiver<Option<AppliedVersion>>,
    catalog: Subscriber,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let sink = match source {
        CatalogSource::Consul(addr) | CatalogSource::Embedded { listen: addr, .. } => {
            let client = RegistryClient::new(*addr).with_token(token.cloned());
            Sink::Registry {
                path: format!("/v1/kv/{}", identity.key()),
                client: Box::new(client),
            }
        }
        CatalogSource::Etcd { endpoints, prefix } => match EtcdClient::new(endpoints) {
            Ok(client) => Sink::Etcd {
                key: format!("{}{}", etcd_status_prefix(prefix), identity.path()),
                client,
                lease: None,
            },
            Err(error) => {
                tracing::warn!(error = %crate::error_chain(&error), "no status report in etcd");
                return None;
            }
        },
        CatalogSource::File(_) => return None,
    };
    Some(run(sink, identity, applied, catalog, readiness, shutdown))
}

/// Where one proxy's report is written.
pub enum Sink {
    /// A KV entry of the registry (or Consul) at `path` (`/v1/kv/skyline/status/...`).
    Registry {
        client: Box<RegistryClient>,
        path: String,
    },
    /// An etcd key bound to a lease of [`ETCD_TTL`] (granted at the first write, and again if
    /// it was lost).
    Etcd {
        client: EtcdClient,
        key: String,
        lease: Option<i64>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Registry(#[from] crate::registry::client::ClientError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

// === impl Sink ===

impl Sink {
    fn name(&self) -> &str {
        match self {
            Sink::Registry { path, .. } => path,
            Sink::Etcd { key, .. } => key,
        }
    }

    async fn put(&mut self, report: &Report) -> Result<(), SinkError> {
        match self {
            Sink::Registry { client, path } => {
                let body = serde_json::to_value(report).unwrap_or_default();
                client.put_json(path, &body).await?;
            }
            Sink::Etcd { client, key, lease } => {
                let refreshed = match *lease {
                    Some(id) => match client.lease_keep_alive(id).await {
                        Ok(_) => Some(id),
                        Err(EtcdError::LeaseLost { .. }) => None,
                        Err(error) => return Err(error.into()),
                    },
                    None => None,
                };
                let id = match refreshed {
                    Some(id) => id,
                    None => {
                        let ttl = i64::try_from(ETCD_TTL.as_secs()).unwrap_or(30);
                        client.lease_grant(ttl).await?
                    }
                };
                *lease = Some(id);
                let body = serde_json::to_vec(report).unwrap_or_default();
                client.put(key, body, id).await?;
            }
        }
        Ok(())
    }

    async fn delete(&mut self) -> Result<(), SinkError> {
        match self {
            Sink::Registry { client, path } => {
                client
                    .send(Method::DELETE, path, bytes::Bytes::new())
                    .await?;
            }
            Sink::Etcd { client, key, lease } => {
                client.delete(key, false).await?;
                if let Some(id) = lease.take() {
                    client.lease_revoke(id).await?;
                }
            }
        }
        Ok(())
    }
}

/// Publishes this proxy's report into `sink` until `shutdown`, then deletes it. A sink that
/// does not answer is retried at the next change or heartbeat.
pub async fn run(
    mut sink: Sink,
    identity: Identity,
    mut applied: watch::Receiver<Option<AppliedVersion>>,
    mut catalog: Subscriber,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let mut last: Option<Instant> = None;
    let mut written = false;
    loop {
        if let Some(at) = last {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep_until(at + MIN_INTERVAL) => {}
            }
        }
        last = Some(Instant::now());
        let now = *applied.borrow_and_update();
        let state = catalog.borrow_and_update().clone();
        let body = report(&identity, now, &state, &readiness);
        match tokio::time::timeout(HEARTBEAT, sink.put(&body)).await {
            Ok(Ok(())) => written = true,
            Ok(Err(error)) => {
                tracing::debug!(error = %crate::error_chain(&error), "cannot publish the status report")
            }
            Err(_) => tracing::debug!("the status report timed out"),
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(HEARTBEAT) => {}
            changed = applied.changed() => if changed.is_err() { break },
            changed = catalog.changed() => if changed.is_err() { break },
        }
    }
    if written {
        let gone = sink.delete();
        if !matches!(
            tokio::time::timeout(Duration::from_secs(2), gone).await,
            Ok(Ok(()))
        ) {
            tracing::warn!(key = %sink.name(), "could not delete the status report");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_key_keeps_names_inside_its_role_folder() {
        let identity = Identity {
            role: "agent",
            name: "a/b c".into(),
            node: "n".into(),
            admin: None,
            catalog: "consul:127.0.0.1:8500".into(),
        };
        assert_eq!(identity.key(), "skyline/status/agent/a_b_c");
        assert_eq!(
            format!("{}{}", etcd_status_prefix("skyline/"), identity.path()),
            "skyline-status/agent/a_b_c"
        );
        assert!(!etcd_status_prefix("prod/skyline/").starts_with("prod/skyline/"));
    }

    #[test]
    fn a_proxy_without_a_catalog_or_with_a_stale_one_is_not_ready() {
        let (publisher, rx) = crate::catalog::channel();
        assert_eq!(catalog_reasons(&rx.borrow()), ["no catalog yet"]);
        publisher.publish_at(crate::catalog::Snapshot::default(), Some(7));
        assert!(catalog_reasons(&rx.borrow()).is_empty());
        publisher.fail("registry unreachable");
        assert_eq!(
            catalog_reasons(&rx.borrow()),
            ["catalog stale: registry unreachable"]
        );
        assert_eq!(rx.borrow().version, Some(7));
    }
}
