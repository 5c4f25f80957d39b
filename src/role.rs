//! What every role (agent, gateway, bridge) starts with: its listeners, bound or taken from a
//! supervisor ([`serve::activation`]), its mesh TLS with the files watched, the tokens of its
//! control APIs, and [`StartError`], why a role could not start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use toml::Spanned;

use crate::config::token::{self, Token};
use crate::config::{ConfigError, Source, file_path, token_for};
use crate::metrics::Metrics;
use crate::registry::RegistryError;
use crate::serve::{self, activation::Inherited};
use crate::tls::MeshTls;

/// The secrets of the control APIs (see [`crate::config::token`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    /// The admin listener's bearer token (every path but `/healthz` and `/readyz`).
    pub admin: Option<Token>,
    /// The registry's ACL token: required by the embedded registry, sent to a followed
    /// registry or Consul agent as `X-Consul-Token`.
    pub registry: Option<Token>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({listener})")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve on the inherited socket {listener:?}")]
    Inherited {
        listener: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Activation(#[from] crate::serve::activation::ActivationError),
    #[error("catalog {source_name}: {error}")]
    Catalog { source_name: String, error: String },
    #[error("the embedded registry cannot start")]
    Registry(#[from] RegistryError),
    #[error("mesh TLS cannot start")]
    Tls(#[from] crate::tls::TlsError),
}

/// The mesh TLS of `settings` (`None` when off), its files watched for changes until
/// `shutdown` in a task of `tasks`.
pub fn mesh_tls(
    settings: Option<&crate::tls::Settings>,
    metrics: &Arc<Metrics>,
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) -> Result<Option<MeshTls>, StartError> {
    let Some(settings) = settings else {
        return Ok(None);
    };
    let tls = MeshTls::load(settings, metrics.clone())?;
    if let Some(tls) = &tls {
        tasks.spawn(tls.clone().watch(shutdown.clone()));
    }
    Ok(tls)
}

/// Listener `name` of a role: the socket the supervisor passed under that name if there is one
/// (see [`serve::activation`]), else a new one bound to `addr`; `None` when neither (off).
pub fn listen(
    inherited: &mut Inherited,
    name: &'static str,
    addr: Option<SocketAddr>,
) -> Result<Option<TcpListener>, StartError> {
    match (inherited.take(name), addr) {
        (Some(socket), _) => adopt(name, socket).map(Some),
        (None, Some(addr)) => bind(name, addr).map(Some),
        (None, None) => Ok(None),
    }
}

/// [`listen`] for a listener that is always on.
pub fn listen_at(
    inherited: &mut Inherited,
    name: &'static str,
    addr: SocketAddr,
) -> Result<TcpListener, StartError> {
    match inherited.take(name) {
        Some(socket) => adopt(name, socket),
        None => bind(name, addr),
    }
}

/// Serves `socket`, passed by the supervisor as listener `name`.
pub fn adopt(name: &'static str, socket: std::net::TcpListener) -> Result<TcpListener, StartError> {
    let listener = serve::adopt(socket).map_err(|source| StartError::Inherited {
        listener: name,
        source,
    })?;
    tracing::info!(listener = name, addr = ?listener.local_addr().ok(), "serving on an inherited socket");
    Ok(listener)
}

/// Binds listener `name` to `addr`.
pub fn bind(name: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    serve::bind(addr).map_err(|source| StartError::Bind {
        listener: name,
        addr,
        source,
    })
}

/// The token settings of the gateway and the bridge: the admin listener's bearer token, and
/// the registry token they send to the catalog they follow.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TokenArgs {
    /// A file holding the admin listener's bearer token (or give the token itself in
    /// SKYLINE_ADMIN_TOKEN); required when the admin listener is not on loopback [default: no
    /// token on loopback]
    #[arg(long, env = "SKYLINE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// The admin token itself, from SKYLINE_ADMIN_TOKEN (no flag: argv is visible to all).
    #[arg(skip = std::env::var("SKYLINE_ADMIN_TOKEN").ok())]
    pub admin_token_env: Option<String>,

    /// A file holding the registry's ACL token, sent as X-Consul-Token to the registry or
    /// Consul agent followed (or give the token itself in SKYLINE_REGISTRY_TOKEN) [default: no
    /// token]
    #[arg(long, env = "SKYLINE_REGISTRY_TOKEN_FILE", value_name = "FILE")]
    pub registry_token_file: Option<PathBuf>,

    /// The registry token itself, from SKYLINE_REGISTRY_TOKEN (no flag: argv is visible to all).
    #[arg(skip = std::env::var("SKYLINE_REGISTRY_TOKEN").ok())]
    pub registry_token_env: Option<String>,
}

impl TokenArgs {
    /// Both tokens, with the file's keys `admin_key` and `registry_key` (paths relative to the
    /// file); an `admin` listener beyond loopback without a token is refused.
    pub(crate) fn resolve(
        self,
        src: &Source,
        (admin_key, admin_field): (&str, &Option<Spanned<PathBuf>>),
        (registry_key, registry_field): (&str, &Option<Spanned<PathBuf>>),
        admin: Option<SocketAddr>,
    ) -> Result<Tokens, ConfigError> {
        let (file, at) = file_path(src, self.admin_token_file, admin_field);
        let setting = token::TokenSetting {
            env: self.admin_token_env,
            file,
        };
        let admin = token_for(
            src,
            &setting,
            at,
            admin_key,
            "SKYLINE_ADMIN_TOKEN",
            admin,
            "the admin listener",
        )?;
        let (file, at) = file_path(src, self.registry_token_file, registry_field);
        let setting = token::TokenSetting {
            env: self.registry_token_env,
            file,
        };
        let registry = token_for(
            src,
            &setting,
            at,
            registry_key,
            "SKYLINE_REGISTRY_TOKEN",
            None,
            "the registry",
        )?;
        Ok(Tokens { admin, registry })
    }
}
