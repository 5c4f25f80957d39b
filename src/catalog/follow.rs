//! Following a catalog source: which source a role reads ([`CatalogSource`]), its discovery
//! task, and the wait for its first snapshot.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::consul::ConsulDiscovery;
use super::etcd::EtcdDiscovery;
use super::file::FileDiscovery;
use super::{Discovery, Publisher, Snapshot, Subscriber};
use crate::config::token::Token;

/// How long a role waits at start for the catalog's first answer.
pub const FIRST_CATALOG_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CatalogSource {
    /// A TOML file, hot-reloaded.
    File(PathBuf),
    /// A Consul agent or a Skyline registry elsewhere, over HTTP.
    Consul(SocketAddr),
    /// A registry in this process, serving its API on `listen` for other nodes and tools.
    Embedded {
        listen: SocketAddr,
        data_dir: PathBuf,
    },
    /// An etcd v3 cluster: its members' client URLs and the key prefix of the catalog.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

/// Starts the discovery task of `source` in `tasks`; returns its name and a subscriber. An
/// `Embedded` source is followed over HTTP at its `listen` address (the gateway and the bridge
/// follow a registry that another process runs; the agent runs its own, see [`start`]).
pub fn follow_catalog(
    source: &CatalogSource,
    token: Option<&Token>,
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) -> (String, Subscriber) {
    let (publisher, subscriber) = super::channel();
    let name = match source {
        CatalogSource::File(path) => follow(tasks, FileDiscovery::new(path), publisher, shutdown),
        CatalogSource::Consul(addr) | CatalogSource::Embedded { listen: addr, .. } => {
            let discovery = ConsulDiscovery::new(*addr).with_token(token.cloned());
            follow(tasks, discovery, publisher, shutdown)
        }
        CatalogSource::Etcd { endpoints, prefix } => {
            let discovery = EtcdDiscovery {
                endpoints: endpoints.clone(),
                prefix: prefix.clone(),
            };
            follow(tasks, discovery, publisher, shutdown)
        }
    };
    (name, subscriber)
}

/// Why a catalog's first read gave no snapshot.
#[derive(Debug)]
pub struct FirstReadError {
    pub error: String,
    /// The source answered and refused this reader (see [`super::CatalogState::refused`]);
    /// otherwise it did not answer (yet), or its answer could not be used.
    pub refused: bool,
}

/// Waits at most [`FIRST_CATALOG_TIMEOUT`] for the catalog's first good snapshot.
pub async fn first_snapshot(mut subscriber: Subscriber) -> Result<Arc<Snapshot>, FirstReadError> {
    let waited = tokio::time::timeout(
        FIRST_CATALOG_TIMEOUT,
        subscriber.wait_for(|s| s.snapshot.is_some() || s.error.is_some()),
    )
    .await;
    let unanswered = |error: &str| FirstReadError {
        error: error.to_owned(),
        refused: false,
    };
    match waited {
        Ok(Ok(state)) => state.snapshot.clone().ok_or_else(|| FirstReadError {
            error: state.error.clone().unwrap_or_default(),
            refused: state.refused,
        }),
        Ok(Err(_)) => Err(unanswered("the catalog source stopped")),
        Err(_) => Err(unanswered("no answer from the catalog source")),
    }
}

/// Starts a discovery backend's task; returns its name for logs and `/readyz`.
pub fn follow<D: Discovery>(
    tasks: &mut JoinSet<()>,
    discovery: D,
    publisher: Publisher,
    shutdown: &CancellationToken,
) -> String {
    let name = discovery.describe();
    tasks.spawn(discovery.run(publisher, shutdown.clone()));
    name
}

/// The first read of a role's catalog, waited for until `shutdown`: its snapshot; or `None`
/// when the source is `remote` (on other machines) and has not answered, logged now and again
/// when it first answers, for the role serves without it (not ready) until then. An error when
/// the source refused the reader (its token), when it is not remote (a bad file, the registry
/// in this process), or on `shutdown`.
pub async fn first_read(
    subscriber: &Subscriber,
    remote: bool,
    source_name: &str,
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<Snapshot>>, FirstReadError> {
    let first = tokio::select! {
        first = first_snapshot(subscriber.clone()) => first,
        () = shutdown.cancelled() => Err(FirstReadError {
            error: "stopped before the catalog answered".to_owned(),
            refused: false,
        }),
    };
    match first {
        Ok(snapshot) => Ok(Some(snapshot)),
        Err(first) if remote && !first.refused && !shutdown.is_cancelled() => {
            tracing::warn!(
                catalog = %source_name,
                error = %first.error,
                "the catalog has not answered; serving without it until it does"
            );
            tasks.spawn(log_first_answer(
                subscriber.clone(),
                source_name.to_owned(),
                shutdown.clone(),
            ));
            Ok(None)
        }
        Err(first) => Err(first),
    }
}

/// Says when the catalog of a role that started without it first answers (if before
/// `shutdown`).
async fn log_first_answer(
    mut catalog: Subscriber,
    source_name: String,
    shutdown: CancellationToken,
) {
    let services = tokio::select! {
        read = catalog.wait_for(|s| s.snapshot.is_some()) => match read {
            Ok(state) => state.snapshot.as_ref().map_or(0, |s| s.services.len()),
            Err(_) => return,
        },
        () = shutdown.cancelled() => return,
    };
    tracing::info!(catalog = %source_name, services, "the catalog answered; routing by it");
}
