//! `skyline registry`: the embedded registry as a process of its own.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use super::{RegistryConfig, RegistryError};

/// Settings of `skyline registry`.
#[derive(clap::Args, Clone, Debug)]
pub struct RegistryArgs {
    /// Where the Consul-compatible HTTP API listens
    #[arg(long, env = "SKYLINE_REGISTRY_LISTEN", value_name = "ADDR", default_value_t = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8500))]
    pub listen: SocketAddr,

    /// Where registrations and KV entries are kept, crash-safely [default: ./skyline-registry]
    #[arg(long, env = "SKYLINE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryCliError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Serves the registry until `shutdown`.
pub async fn run(args: RegistryArgs, shutdown: CancellationToken) -> Result<(), RegistryCliError> {
    let listener = crate::serve::bind(args.listen).map_err(|source| RegistryCliError::Bind {
        addr: args.listen,
        source,
    })?;
    let dir = args
        .data_dir
        .unwrap_or_else(|| PathBuf::from("skyline-registry"));
    let mut config = RegistryConfig::new(dir);
    if !args.listen.ip().is_unspecified() {
        config.node_address = args.listen.ip();
    }
    let handle = super::spawn(listener, config, shutdown.clone()).await?;
    shutdown.cancelled().await;
    handle.join().await;
    Ok(())
}
