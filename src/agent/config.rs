//! Configuration: command-line flags, `SKYLINE_*` environment variables and a TOML file, in that
//! order of precedence, validated into the runtime [`Settings`](super::Settings). Every key of every role's
//! file is listed in its table ([`AGENT_FILE`], `gateway::config::FILE`, `bridge::config::FILE`),
//! from which [`reference`] writes docs/configuration.md and `skyline config example`.
//!
//! ```toml
//! [node]
//! name = "mesos-1"              # default "local"
//! address = "10.0.0.11"         # default 127.0.0.1
//!
//! [listen]
//! outbound = "127.0.0.1:5040"   # or "off"
//! inbound = "10.0.0.11:5041"    # default <node address>:5041, or "off"
//! admin = "127.0.0.1:5050"      # or "off"
//!
//! [catalog]
//! source = "embedded"           # embedded | consul | file
//! data_dir = "/var/lib/skyline" # embedded: the registry's data
//! registry = "127.0.0.1:8500"   # embedded: where its Consul-compatible API listens
//! consul = "127.0.0.1:8500"     # consul: the Consul agent (or a Skyline registry) to follow
//! file = "catalog.toml"         # file: relative to this file
//! # etcd_endpoints = ["http://10.0.0.5:2379", "http://10.0.0.6:2379", "http://10.0.0.7:2379"]
//! # etcd_prefix = "skyline/"
//!
//! [proxy]
//! catch_all = ["10.0.0.50:5041"]
//! route_warning = false
//! fallback_hold = "3s"          # a service routable again goes via the gateway this long
//! workers = 1
//!
//! # How calls to services behave (defaults shown); reloaded on SIGHUP.
//! [resilience]
//! connect_timeout = "2s"
//! request_timeout = "60s"       # until the response head, retries included
//! attempt_timeout = "60s"       # each attempt's own limit (default: the request's)
//! idle_timeout = "5m"           # the longest a response body may stall, or a WebSocket idle
//! # max_request_body = 1048576  # bytes; larger bodies get 413 (default: no limit)
//! retries = 2                   # 502/503/504, timeouts, resets: idempotent requests, first hop
//! balance = "p2c"               # or "round_robin"
//! outlier = { consecutive_failures = 5, base_ejection = "30s", max_ejection = "5m", max_ejected_percent = 50 }
//! # probe = { path = "/health", interval = "5s", timeout = "1s", unhealthy = 2, healthy = 1 }
//!
//! [routes.giphy]                # the same keys, for one service
//! attempt_timeout = "500ms"
//! probe = { path = "/health" }
//!
//! # Services on this node, registered in the catalog (embedded, consul or etcd) while the agent
//! # runs; added and removed on SIGHUP.
//! [[service]]
//! name = "giphy"
//! port = 31000
//! meta = { platform = "mesos" }
//! check = { http = "/health", interval = "5s", timeout = "2s" }   # or { ttl = "10s" } (default)
//! # and, either way: deregister_critical_service_after = "1m" (default: never)
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Settings;
use crate::access::{AccessArgs, LogSection};
use crate::authz::config::{
    AUTHZ_CALLER_SECTION, AUTHZ_RULE_SECTION, AUTHZ_SECTION, authz_settings,
};
use crate::catalog::etcd::{DEFAULT_ENDPOINT, DEFAULT_PREFIX};
use crate::catalog::{CatalogSource, DEFAULT_INBOUND_PORT, ServiceName};
use crate::config::reference::{DURATION, Section, Value};
use crate::config::{
    ConfigError, DEFAULT_ADMIN, DEFAULT_DATA_DIR, DEFAULT_REGISTRY, Listen, Source, etcd_endpoint,
    etcd_prefix, file_only, file_path, key, parse_duration, parse_duration_setting, relative_to,
    token, token_for,
};
use crate::proxy::resilience::config::{RESILIENCE_KEYS, ResilienceSection, resilience};
use crate::proxy::resilience::{Policies, Resilience};
use crate::registration::{Check, Declared};
use crate::routing::{DEFAULT_HOLD, Policy};
use crate::tls::config::{TLS_SECTION, TlsSection, mesh_tls};

pub const DEFAULT_OUTBOUND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5040);
pub const DEFAULT_CATALOG_FILE: &str = "/etc/skyline/catalog.toml";
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CatalogKind {
    /// The registry in this process: Consul's HTTP API, durable, no other server needed.
    Embedded,
    /// A Consul agent, or a Skyline registry on another node, followed with blocking queries.
    Consul,
    /// A TOML catalog file, hot-reloaded on change.
    File,
    /// An etcd v3 cluster: keys under a prefix, watched.
    Etcd,
}

/// Settings of `skyline agent`. Each flag can also come from its `SKYLINE_*` variable or from
/// the config file; a flag wins over a variable, which wins over the file.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AgentArgs {
    /// TOML config file; flags and SKYLINE_* variables override its values
    #[arg(long, env = "SKYLINE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// This node's name in the catalog [default: local]
    #[arg(long, env = "SKYLINE_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// This node's address, where other nodes reach its inbound proxy [default: 127.0.0.1]
    #[arg(long, env = "SKYLINE_NODE_ADDRESS", value_name = "IP")]
    pub node_address: Option<IpAddr>,

    /// Outbound listener for local applications, or "off" [default: 127.0.0.1:5040]
    #[arg(long, env = "SKYLINE_OUTBOUND", value_name = "ADDR|off")]
    pub outbound: Option<Listen>,

    /// Inbound listener for other nodes' proxies, or "off" [default: <node address>:5041]
    #[arg(long, env = "SKYLINE_INBOUND", value_name = "ADDR|off")]
    pub inbound: Option<Listen>,

    /// Admin listener (/healthz, /readyz, /routes, /metrics), or "off" [default: 127.0.0.1:5050]
    #[arg(long, env = "SKYLINE_ADMIN", value_name = "ADDR|off")]
    pub admin: Option<Listen>,

    /// A file holding the admin listener's bearer token (or give the token itself in
    /// SKYLINE_ADMIN_TOKEN); required when the admin listener is not on loopback [default: no
    /// token on loopback]
    #[arg(long, env = "SKYLINE_ADMIN_TOKEN_FILE", value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// The admin token itself, from SKYLINE_ADMIN_TOKEN (no flag: argv is visible to all).
    #[arg(skip = std::env::var("SKYLINE_ADMIN_TOKEN").ok())]
    pub admin_token_env: Option<String>,

    /// Where the catalog comes from [default: embedded]
    #[arg(long, env = "SKYLINE_CATALOG", value_name = "SOURCE")]
    pub catalog: Option<CatalogKind>,

    /// The embedded registry's data folder, for --catalog embedded [default: /var/lib/skyline]
    #[arg(long, env = "SKYLINE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Where the embedded registry serves its Consul-compatible API, for --catalog embedded
    /// [default: 127.0.0.1:8500]
    #[arg(long, env = "SKYLINE_REGISTRY", value_name = "ADDR")]
    pub registry: Option<SocketAddr>,

    /// The Consul agent or Skyline registry to follow, for --catalog consul
    /// [default: 127.0.0.1:8500]
    #[arg(long, env = "SKYLINE_CONSUL", value_name = "ADDR")]
    pub consul: Option<SocketAddr>,

    /// A file holding the registry's ACL token (or give the token itself in
    /// SKYLINE_REGISTRY_TOKEN): with --catalog embedded, requests to the registry must carry it
    /// (required when it does not listen on loopback); with --catalog consul, sent as
    /// X-Consul-Token [default: no token]
    #[arg(long, env = "SKYLINE_REGISTRY_TOKEN_FILE", value_name = "FILE")]
    pub registry_token_file: Option<PathBuf>,

    /// The registry token itself, from SKYLINE_REGISTRY_TOKEN (no flag: argv is visible to all).
    #[arg(skip = std::env::var("SKYLINE_REGISTRY_TOKEN").ok())]
    pub registry_token_env: Option<String>,

    /// The catalog file, for --catalog file [default: /etc/skyline/catalog.toml]
    #[arg(long, env = "SKYLINE_CATALOG_FILE", value_name = "FILE")]
    pub catalog_file: Option<PathBuf>,

    /// etcd members' client URLs, comma-separated, for --catalog etcd
    /// [default: http://127.0.0.1:2379]
    #[arg(
        long,
        env = "SKYLINE_ETCD_ENDPOINTS",
        value_name = "URL,...",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Option<Vec<String>>,

    /// The key prefix of the catalog in etcd, for --catalog etcd [default: skyline/]
    #[arg(long, env = "SKYLINE_ETCD_PREFIX", value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,

    /// Upstreams for services the catalog does not route (the gateway pool), comma-separated
    /// [default: the instances of catalog service `skyline-gateway`; none: 404 unknown-service]
    #[arg(
        long,
        env = "SKYLINE_CATCH_ALL",
        value_name = "ADDR,...",
        value_delimiter = ','
    )]
    pub catch_all: Option<Vec<SocketAddr>>,

    /// Route to instances whose health is "warning" as well as "passing" [default: false]
    #[arg(long, env = "SKYLINE_ROUTE_WARNING", value_name = "BOOL")]
    pub route_warning: Option<bool>,

    /// How long a service that becomes routable again still goes to the catch-all (the
    /// gateway, which holds fail-back as long), such as 3s or 0s [default: 3s]
    #[arg(long, env = "SKYLINE_FALLBACK_HOLD", value_name = "DURATION")]
    pub fallback_hold: Option<String>,

    /// Worker threads serving connections [default: 1]
    #[arg(long, env = "SKYLINE_WORKERS", value_name = "N")]
    pub workers: Option<usize>,

    #[command(flatten)]
    pub access: AccessArgs,

    #[command(flatten)]
    pub peers: crate::proxy::h2::PeerArgs,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    node: NodeSection,
    #[serde(default)]
    listen: ListenSection,
    #[serde(default)]
    catalog: CatalogSection,
    #[serde(default)]
    proxy: ProxySection,
    #[serde(default)]
    service: Vec<ServiceSection>,
    #[serde(default)]
    resilience: ResilienceSection,
    #[serde(default)]
    routes: std::collections::BTreeMap<Spanned<String>, ResilienceSection>,
    #[serde(default)]
    tls: TlsSection,
    #[serde(default)]
    authz: crate::authz::AuthzConfig,
    #[serde(default)]
    log: LogSection,
    #[serde(default)]
    mesh: crate::proxy::h2::MeshSection,
    #[serde(default)]
    metrics: crate::access::MetricsSection,
}

// === The file's keys, described ===
//
// One table per role lists every key of its file (`reference` renders the reference and the
// example from it; its tests hold it to the parser below, both ways). A key that a flag also
// sets names the flag, whose help describes it.

/// Every key of the agent's file (see [`reference`]).
pub const AGENT_FILE: &[Section] = &[
    Section {
        table: "node",
        sample: "",
        doc: "This node.",
        defaults_from: None,
        keys: &[
            key("name", "node_name", "string", Value::Default("\"local\"")),
            key(
                "address",
                "node_address",
                "IP address",
                Value::Default("\"127.0.0.1\""),
            ),
        ],
    },
    Section {
        table: "listen",
        sample: "",
        doc: "The agent's listeners: an address, or `\"off\"`.",
        defaults_from: None,
        keys: &[
            key(
                "outbound",
                "outbound",
                "address or `\"off\"`",
                Value::Default("\"127.0.0.1:5040\""),
            ),
            key(
                "inbound",
                "inbound",
                "address or `\"off\"`",
                Value::Example {
                    toml: "\"10.0.0.11:5041\"",
                    default: "",
                },
            ),
            key(
                "admin",
                "admin",
                "address or `\"off\"`",
                Value::Default("\"127.0.0.1:5050\""),
            ),
            key(
                "admin_token_file",
                "admin_token_file",
                "path",
                Value::Example {
                    toml: "\"/etc/skyline/admin.token\"",
                    default: "no token",
                },
            ),
        ],
    },
    Section {
        table: "catalog",
        sample: "",
        doc: "Where the catalog comes from; the keys of the sources not chosen are ignored. Paths are relative to this file.",
        defaults_from: None,
        keys: &[
            key(
                "source",
                "catalog",
                "`embedded`, `consul`, `file` or `etcd`",
                Value::Default("\"embedded\""),
            ),
            key(
                "data_dir",
                "data_dir",
                "path",
                Value::Default("\"/var/lib/skyline\""),
            ),
            key(
                "registry",
                "registry",
                "address",
                Value::Default("\"127.0.0.1:8500\""),
            ),
            key(
                "consul",
                "consul",
                "address",
                Value::Default("\"127.0.0.1:8500\""),
            ),
            key(
                "token_file",
                "registry_token_file",
                "path",
                Value::Example {
                    toml: "\"/etc/skyline/registry.token\"",
                    default: "no token",
                },
            ),
            key(
                "file",
                "catalog_file",
                "path",
                Value::Default("\"/etc/skyline/catalog.toml\""),
            ),
            key(
                "etcd_endpoints",
                "etcd_endpoints",
                "array of URLs (`http://host:port`)",
                Value::Default("[\"http://127.0.0.1:2379\"]"),
            ),
            key(
                "etcd_prefix",
                "etcd_prefix",
                "string",
                Value::Default("\"skyline/\""),
            ),
        ],
    },
    Section {
        table: "proxy",
        sample: "",
        doc: "Routing.",
        defaults_from: None,
        keys: &[
            key(
                "catch_all",
                "catch_all",
                "array of addresses",
                Value::Example {
                    toml: "[\"10.0.0.50:5041\"]",
                    default: "",
                },
            ),
            key(
                "route_warning",
                "route_warning",
                "boolean",
                Value::Default("false"),
            ),
            key(
                "fallback_hold",
                "fallback_hold",
                DURATION,
                Value::Default("\"3s\""),
            ),
            key(
                "workers",
                "workers",
                "integer, threads (1 to 256)",
                Value::Default("1"),
            ),
        ],
    },
    Section {
        table: "resilience",
        sample: "",
        doc: "How calls to services behave: timeouts, retries, balancing, ejection, probes. Re-read on SIGHUP.",
        defaults_from: None,
        keys: RESILIENCE_KEYS,
    },
    Section {
        table: "routes.<service>",
        sample: "giphy",
        doc: "The keys of `[resilience]` for one service. Re-read on SIGHUP.",
        defaults_from: Some("resilience"),
        keys: RESILIENCE_KEYS,
    },
    Section {
        table: "service[]",
        sample: "",
        doc: "A service of this node, registered in the catalog (`embedded` or `consul`) while the agent runs, its check kept alive, deregistered when the agent stops.",
        defaults_from: None,
        keys: &[
            file_only(
                "name",
                "service name",
                Value::Example {
                    toml: "\"giphy\"",
                    default: "required",
                },
                "The service's name.",
            ),
            file_only(
                "port",
                "port (1 to 65535)",
                Value::Example {
                    toml: "31000",
                    default: "required",
                },
                "The port the instance listens on.",
            ),
            file_only(
                "id",
                "string",
                Value::Example {
                    toml: "\"giphy-mesos-1-31000\"",
                    default: "`<name>-<node name>-<port>`",
                },
                "The instance's id in the catalog.",
            ),
            file_only(
                "address",
                "IP address",
                Value::Example {
                    toml: "\"10.0.0.11\"",
                    default: "the node's address",
                },
                "The address the instance listens on.",
            ),
            file_only(
                "tags",
                "array of strings",
                Value::Default("[]"),
                "Tags of the instance.",
            ),
            file_only(
                "meta",
                "table of strings",
                Value::Example {
                    toml: "{ platform = \"mesos\" }",
                    default: "none",
                },
                "Metadata of the instance; the gateway's tiers select on it (`platform = \"mesos\"`), and `protocol = \"h2c\"` says it speaks only HTTP/2 (gRPC): every request reaches it over h2c, an HTTP/1.1 caller's too (default `http1`: every request over HTTP/1.1).",
            ),
            file_only(
                "check.ttl",
                DURATION,
                Value::Example {
                    toml: "\"10s\"",
                    default: "`10s`",
                },
                "A TTL check (the default), passed by the agent while it can connect to the instance's port.",
            ),
            file_only(
                "check.http",
                "path",
                Value::Example {
                    toml: "\"/health\"",
                    default: "none (a TTL check)",
                },
                "An HTTP check instead: the registry GETs this path on the instance.",
            ),
            file_only(
                "check.interval",
                DURATION,
                Value::Example {
                    toml: "\"5s\"",
                    default: "`5s`",
                },
                "Time between HTTP checks.",
            ),
            file_only(
                "check.timeout",
                DURATION,
                Value::Example {
                    toml: "\"2s\"",
                    default: "`2s`",
                },
                "An HTTP check not answered within this time fails.",
            ),
            file_only(
                "check.deregister_critical_service_after",
                DURATION,
                Value::Example {
                    toml: "\"1m\"",
                    default: "never",
                },
                "The registry removes the instance once its check has been critical this long (Consul's `DeregisterCriticalServiceAfter`).",
            ),
        ],
    },
    TLS_SECTION,
    AUTHZ_SECTION,
    AUTHZ_RULE_SECTION,
    AUTHZ_CALLER_SECTION,
    crate::access::FILE_SECTION,
    crate::proxy::h2::FILE_SECTION,
    crate::access::METRICS_SECTION,
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSection {
    name: Spanned<String>,
    id: Option<String>,
    address: Option<Spanned<String>>,
    port: Spanned<u16>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    meta: std::collections::BTreeMap<String, Spanned<String>>,
    check: Option<CheckSection>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CheckSection {
    ttl: Option<Spanned<String>>,
    http: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    /// How long the check may stay critical before the registry deregisters the instance
    /// (Consul's `DeregisterCriticalServiceAfter`), a duration such as `1m`; default never.
    deregister_critical_service_after: Option<Spanned<String>>,
}

/// The TTL of a declared service's check when the config gives none.
pub const DEFAULT_CHECK_TTL: Duration = Duration::from_secs(10);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    name: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListenSection {
    outbound: Option<Spanned<String>>,
    inbound: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
    admin_token_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CatalogSection {
    source: Option<Spanned<String>>,
    file: Option<Spanned<PathBuf>>,
    data_dir: Option<Spanned<PathBuf>>,
    registry: Option<Spanned<String>>,
    consul: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
    etcd_endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    etcd_prefix: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ProxySection {
    catch_all: Option<Vec<Spanned<String>>>,
    route_warning: Option<bool>,
    workers: Option<Spanned<usize>>,
    /// Warm-up of a service routable again before direct routing [default: "3s"].
    fallback_hold: Option<Spanned<String>>,
}

impl AgentArgs {
    /// Merges flags, variables and the config file into validated settings.
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        let (file, source) = Source::read::<FileConfig>(self.config.as_ref())?;
        let src = &source;
        let resilience = policies(src, &file)?;
        let access = self.access.resolve(src, &file.log, &file.metrics)?;
        let peer_protocol = self.peers.resolve(src, &file.mesh)?;

        let (node_name, at) = match (self.node_name, file.node.name) {
            (Some(n), _) => (n, None),
            (None, Some(n)) => (n.get_ref().clone(), Some(n.span().start)),
            (None, None) => ("local".to_owned(), None),
        };
        if node_name.is_empty() {
            return Err(src.error(at, Some("node.name"), "must not be empty"));
        }
        let node_address = match self.node_address {
            Some(a) => a,
            None => src
                .parse::<IpAddr>("node.address", &file.node.address)?
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        };
        let listen = |flag: Option<Listen>,
                      key: &str,
                      field: &Option<Spanned<String>>,
                      default: SocketAddr| {
            Ok::<_, ConfigError>(match flag {
                Some(l) => l,
                None => src
                    .parse::<Listen>(key, field)?
                    .unwrap_or(Listen::At(default)),
            })
        };
        let outbound = listen(
            self.outbound,
            "listen.outbound",
            &file.listen.outbound,
            DEFAULT_OUTBOUND,
        )?;
        let inbound_default = SocketAddr::new(node_address, DEFAULT_INBOUND_PORT);
        let inbound = listen(
            self.inbound,
            "listen.inbound",
            &file.listen.inbound,
            inbound_default,
        )?;
        let admin = listen(
            self.admin,
            "listen.admin",
            &file.listen.admin,
            DEFAULT_ADMIN,
        )?;

        let kind = match self.catalog {
            Some(kind) => kind,
            None => match &file.catalog.source {
                None => CatalogKind::Embedded,
                Some(s) => {
                    <CatalogKind as clap::ValueEnum>::from_str(s.get_ref(), true).map_err(|_| {
                        src.error(
                            Some(s.span().start),
                            Some("catalog.source"),
                            format!(
                                "unknown source {:?}; expected embedded, consul, etcd or file",
                                s.get_ref()
                            ),
                        )
                    })?
                }
            },
        };
        let catalog = match kind {
            CatalogKind::File => {
                let path = match (self.catalog_file, file.catalog.file) {
                    (Some(p), _) => p,
                    (None, Some(p)) => relative_to(src, p.into_inner()),
                    (None, None) => PathBuf::from(DEFAULT_CATALOG_FILE),
                };
                CatalogSource::File(path)
            }
            CatalogKind::Embedded => {
                let data_dir = match (self.data_dir, file.catalog.data_dir) {
                    (Some(p), _) => p,
                    (None, Some(p)) => relative_to(src, p.into_inner()),
                    (None, None) => PathBuf::from(DEFAULT_DATA_DIR),
                };
                let listen = match self.registry {
                    Some(a) => a,
                    None => src
                        .parse("catalog.registry", &file.catalog.registry)?
                        .unwrap_or(DEFAULT_REGISTRY),
                };
                CatalogSource::Embedded { listen, data_dir }
            }
            CatalogKind::Consul => {
                let addr = match self.consul {
                    Some(a) => a,
                    None => src
                        .parse("catalog.consul", &file.catalog.consul)?
                        .unwrap_or(DEFAULT_REGISTRY),
                };
                CatalogSource::Consul(addr)
            }
            CatalogKind::Etcd => etcd_source(
                src,
                self.etcd_endpoints,
                self.etcd_prefix,
                file.catalog.etcd_endpoints,
                file.catalog.etcd_prefix,
            )?,
        };

        let catch_all = match (self.catch_all, file.proxy.catch_all) {
            (Some(list), _) => list,
            (None, None) => Vec::new(),
            (None, Some(list)) => list
                .iter()
                .map(|a| {
                    a.get_ref().parse().map_err(|_| {
                        src.error(
                            Some(a.span().start),
                            Some("proxy.catch_all"),
                            format!("{:?} is not an address like 10.0.0.50:5041", a.get_ref()),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let workers = match (self.workers, &file.proxy.workers) {
            (Some(w), _) => (w, None),
            (None, Some(w)) => (*w.get_ref(), Some(w.span().start)),
            (None, None) => (1, None),
        };
        if !(1..=256).contains(&workers.0) {
            return Err(src.error(
                workers.1,
                Some("proxy.workers"),
                "must be between 1 and 256",
            ));
        }
        let fallback_hold = match (&self.fallback_hold, &file.proxy.fallback_hold) {
            (Some(text), _) => parse_duration_setting(text)
                .map_err(|e| src.error(None, Some("proxy.fallback_hold"), e))?,
            (None, Some(text)) => parse_duration_setting(text.get_ref())
                .map_err(|e| src.error(Some(text.span().start), Some("proxy.fallback_hold"), e))?,
            (None, None) => DEFAULT_HOLD,
        };
        let route_warning = self
            .route_warning
            .or(file.proxy.route_warning)
            .unwrap_or(false);
        let admin_token = {
            let (path, at) = file_path(src, self.admin_token_file, &file.listen.admin_token_file);
            let setting = token::TokenSetting {
                env: self.admin_token_env,
                file: path,
            };
            token_for(
                src,
                &setting,
                at,
                "listen.admin_token_file",
                "SKYLINE_ADMIN_TOKEN",
                admin.addr(),
                "the admin listener",
            )?
        };
        let registry_token = {
            let (path, at) = file_path(src, self.registry_token_file, &file.catalog.token_file);
            let setting = token::TokenSetting {
                env: self.registry_token_env,
                file: path,
            };
            let listen = match &catalog {
                CatalogSource::Embedded { listen, .. } => Some(*listen),
                _ => None,
            };
            token_for(
                src,
                &setting,
                at,
                "catalog.token_file",
                "SKYLINE_REGISTRY_TOKEN",
                listen,
                "the embedded registry",
            )?
        };
        let services = file
            .service
            .iter()
            .map(|svc| declared(src, svc, &node_name))
            .collect::<Result<Vec<_>, _>>()?;
        if let (Some(first), CatalogSource::File(_)) = (file.service.first(), &catalog) {
            return Err(src.error(
                Some(first.name.span().start),
                Some("service"),
                "declared services need a registry or etcd: use catalog.source = \"embedded\", \"consul\" or \"etcd\"",
            ));
        }

        let tls = mesh_tls(src, &file.tls)?;
        let authz = authz_settings(src, &file.authz)?;
        Ok(Settings {
            tls,
            authz,
            node_name,
            node_address,
            outbound: outbound.addr(),
            inbound: inbound.addr(),
            admin: admin.addr(),
            catalog,
            catch_all,
            policy: Policy {
                include_warning: route_warning,
                fallback_hold,
            },
            workers: workers.0,
            resilience,
            services,
            access,
            peer_protocol,
            tokens: crate::role::Tokens {
                admin: admin_token,
                registry: registry_token,
            },
        })
    }
}

/// The `[resilience]` defaults and the `[routes.<service>]` overrides.
fn policies(src: &Source, file: &FileConfig) -> Result<Policies, ConfigError> {
    let default = resilience(src, &Resilience::default(), &file.resilience, "resilience")?;
    let mut services = std::collections::HashMap::new();
    for (name, section) in &file.routes {
        let key = format!("routes.{}", name.get_ref());
        let service = ServiceName::parse(name.get_ref())
            .map_err(|e| src.error(Some(name.span().start), Some(&key), e.to_string()))?;
        let policy = resilience(src, &default, section, &key)?;
        services.insert(service, std::sync::Arc::new(policy));
    }
    Ok(Policies {
        default: std::sync::Arc::new(default),
        services,
    })
}

/// Validates one `[[service]]` entry of the config file.
fn declared(src: &Source, svc: &ServiceSection, node: &str) -> Result<Declared, ConfigError> {
    let at = |span: std::ops::Range<usize>| Some(span.start);
    let name = ServiceName::parse(svc.name.get_ref())
        .map_err(|e| src.error(at(svc.name.span()), Some("service.name"), e.to_string()))?;
    let port = *svc.port.get_ref();
    if port == 0 {
        return Err(src.error(at(svc.port.span()), Some("service.port"), "must be 1-65535"));
    }
    let address = src.parse::<IpAddr>("service.address", &svc.address)?;
    // What the instance speaks (see `routing::protocol_of`).
    if let Some(protocol) = svc.meta.get("protocol") {
        let p = protocol.get_ref();
        if !(p.eq_ignore_ascii_case("http1") || p.eq_ignore_ascii_case("h2c")) {
            return Err(src.error(
                at(protocol.span()),
                Some("service.meta.protocol"),
                format!("{p:?} is not \"http1\" or \"h2c\""),
            ));
        }
    }
    let duration = |key: &str, field: &Option<Spanned<String>>, default: Duration| match field {
        None => Ok(default),
        Some(f) => parse_duration(f.get_ref())
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                src.error(
                    at(f.span()),
                    Some(key),
                    format!("{:?} is not a duration like 10s", f.get_ref()),
                )
            }),
    };
    let check = svc.check.as_ref();
    let check_section = check;
    let check = match check.and_then(|c| c.http.as_ref()) {
        Some(path) if !path.get_ref().starts_with('/') => {
            return Err(src.error(
                at(path.span()),
                Some("service.check.http"),
                "must be a path starting with /",
            ));
        }
        Some(path) => Check::Http {
            path: path.get_ref().clone(),
            interval: duration(
                "service.check.interval",
                &check.and_then(|c| c.interval.clone()),
                Duration::from_secs(5),
            )?,
            timeout: duration(
                "service.check.timeout",
                &check.and_then(|c| c.timeout.clone()),
                Duration::from_secs(2),
            )?,
        },
        None => Check::Ttl(duration(
            "service.check.ttl",
            &check.and_then(|c| c.ttl.clone()),
            DEFAULT_CHECK_TTL,
        )?),
    };
    Ok(Declared {
        id: svc
            .id
            .clone()
            .unwrap_or_else(|| format!("{name}-{node}-{port}")),
        name,
        address,
        port,
        tags: svc.tags.clone(),
        meta: svc
            .meta
            .iter()
            .map(|(k, v)| (k.clone(), v.get_ref().clone()))
            .collect(),
        check,
        deregister_after: match check_section
            .and_then(|c| c.deregister_critical_service_after.as_ref())
        {
            Some(field) => Some(duration(
                "service.check.deregister_critical_service_after",
                &Some(field.clone()),
                Duration::ZERO,
            )?),
            None => None,
        },
    })
}

/// The etcd endpoints and prefix, from flags or the file, validated.
fn etcd_source(
    src: &Source,
    flag_endpoints: Option<Vec<String>>,
    flag_prefix: Option<String>,
    file_endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    file_prefix: Option<Spanned<String>>,
) -> Result<CatalogSource, ConfigError> {
    const KEY: &str = "catalog.etcd_endpoints";
    let list_at = file_endpoints.as_ref().map(|l| l.span().start);
    let endpoints = match (flag_endpoints, file_endpoints) {
        (Some(list), _) => list
            .iter()
            .map(|e| etcd_endpoint(e).map_err(|r| src.error(None, Some(KEY), r)))
            .collect::<Result<Vec<_>, _>>()?,
        (None, Some(list)) => list
            .get_ref()
            .iter()
            .map(|e| {
                etcd_endpoint(e.get_ref())
                    .map_err(|r| src.error(Some(e.span().start), Some(KEY), r))
            })
            .collect::<Result<Vec<_>, _>>()?,
        (None, None) => vec![DEFAULT_ENDPOINT.to_owned()],
    };
    if endpoints.is_empty() {
        return Err(src.error(list_at, Some(KEY), "must list at least one etcd member"));
    }
    let (prefix, span) = match (flag_prefix, file_prefix) {
        (Some(p), _) => (p, None),
        (None, Some(p)) => (p.get_ref().clone(), Some(p.span().start)),
        (None, None) => (DEFAULT_PREFIX.to_owned(), None),
    };
    let prefix =
        etcd_prefix(&prefix).map_err(|e| src.error(span, Some("catalog.etcd_prefix"), e))?;
    Ok(CatalogSource::Etcd { endpoints, prefix })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::balance::Balance;

    fn with_file(text: &str) -> (tempfile::TempDir, AgentArgs) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("skyline.toml");
        std::fs::write(&path, text).unwrap();
        let args = AgentArgs {
            config: Some(path),
            ..AgentArgs::default()
        };
        (dir, args)
    }

    #[test]
    fn authz_rules_and_callers_are_validated_with_key_and_reason() {
        let (dir, args) = with_file(
            "[authz]\ndefault = \"deny\"\n[[authz.rule]]\nfrom = \"web\"\nto = \"*\"\naction = \"allow\"\n\
             [[authz.caller]]\nservice = \"web\"\ntoken_file = \"web.token\"\n",
        );
        std::fs::write(dir.path().join("web.token"), "s3cret\n").unwrap();
        let authz = args.resolve().unwrap().authz;
        assert_eq!(authz.policy.rules.len(), 1);
        assert_eq!(authz.callers[0].service.as_str(), "web");
        assert!(authz.callers[0].token.matches(b"s3cret"));

        for (text, key) in [
            (
                "[[authz.rule]]\nfrom = \"Web\"\nto = \"a\"\naction = \"allow\"\n",
                "authz.rule[0].from",
            ),
            (
                "[[authz.rule]]\nfrom = \"a\"\nto = \"b\"\naction = \"allow\"\npath_prefix = \"//x\"\n",
                "authz.rule[0].path_prefix",
            ),
            ("[authz]\ndefault = \"maybe\"\n", "authz.default"),
            (
                "[[authz.caller]]\nservice = \"web\"\ntoken_file = \"missing.token\"\n",
                "authz.caller[0].token_file",
            ),
        ] {
            let (_d, args) = with_file(text);
            let e = args.resolve().unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
            assert!(e.file.ends_with("skyline.toml"), "{e}");
        }
    }

    #[test]
    fn tls_is_off_by_default_and_its_paths_are_relative_to_the_file() {
        assert_eq!(AgentArgs::default().resolve().unwrap().tls, None);
        let (dir, args) = with_file(
            "[tls]\nmode = \"strict\"\nca = \"ca/ca.crt\"\ncert = \"a.crt\"\nkey = \"/keys/a.key\"\n",
        );
        let tls = args.resolve().unwrap().tls.unwrap();
        assert_eq!(tls.mode, crate::tls::Mode::Strict);
        assert_eq!(tls.ca, dir.path().join("ca/ca.crt"));
        assert_eq!(tls.cert, dir.path().join("a.crt"));
        assert_eq!(tls.key, PathBuf::from("/keys/a.key"));
    }

    #[test]
    fn peers_get_the_mesh_link_by_default_h2_from_the_file_the_flag_wins_and_a_bad_value_names_its_key()
     {
        use crate::proxy::h2::PeerProtocol;
        let resolved = AgentArgs::default().resolve().unwrap();
        assert_eq!(resolved.peer_protocol, PeerProtocol::Mux);
        let (_dir, mut args) = with_file("[mesh]\npeer_protocol = \"h2\"\n");
        assert_eq!(
            args.clone().resolve().unwrap().peer_protocol,
            PeerProtocol::H2
        );
        args.peers.peer_protocol = Some(PeerProtocol::Http1);
        assert_eq!(args.resolve().unwrap().peer_protocol, PeerProtocol::Http1);
        let (_dir, args) = with_file("[node]\nname = \"a\"\n[mesh]\npeer_protocol = \"h2c\"\n");
        let e = args.resolve().unwrap_err();
        assert_eq!(e.key.as_deref(), Some("mesh.peer_protocol"));
        assert_eq!(e.line, Some(4));
        assert!(e.reason.contains("\"h2\""), "{e}");
    }

    #[test]
    fn tls_refuses_an_unknown_mode_and_a_missing_file_by_key_and_line() {
        let (_dir, args) = with_file("[node]\nname = \"a\"\n[tls]\nmode = \"on\"\n");
        let e = args.resolve().unwrap_err();
        assert_eq!(e.key.as_deref(), Some("tls.mode"));
        assert_eq!(e.line, Some(4));
        assert!(e.reason.contains("\"permissive\""), "{e}");
        let (_dir, args) =
            with_file("[tls]\nmode = \"permissive\"\nca = \"ca.crt\"\ncert = \"a.crt\"\n");
        let e = args.resolve().unwrap_err();
        assert_eq!(e.key.as_deref(), Some("tls.key"));
        assert!(e.reason.contains("required"), "{e}");
    }

    #[test]
    fn defaults_are_the_seeds_ports() {
        let s = AgentArgs::default().resolve().unwrap();
        assert_eq!(s.outbound, Some(DEFAULT_OUTBOUND));
        assert_eq!(s.inbound, Some("127.0.0.1:5041".parse().unwrap()));
        assert_eq!(s.admin, Some(DEFAULT_ADMIN));
        assert_eq!(s.node_name, "local");
        assert_eq!(
            s.catalog,
            CatalogSource::Embedded {
                listen: DEFAULT_REGISTRY,
                data_dir: DEFAULT_DATA_DIR.into()
            }
        );
        assert_eq!(s.workers, 1);
    }

    #[test]
    fn the_file_fills_what_flags_leave_out_and_flags_win() {
        let (dir, mut args) = with_file(
            "[node]\nname = \"m1\"\naddress = \"127.0.0.2\"\n[listen]\noutbound = \"off\"\n[catalog]\nsource = \"file\"\nfile = \"cat.toml\"\n[proxy]\ncatch_all = [\"127.0.0.9:5041\"]\nworkers = 2\n",
        );
        args.node_name = Some("flag".into());
        let s = args.resolve().unwrap();
        assert_eq!(s.node_name, "flag");
        assert_eq!(s.node_address, "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(
            s.inbound,
            Some("127.0.0.2:5041".parse().unwrap()),
            "inbound follows the node address"
        );
        assert_eq!(s.outbound, None);
        assert_eq!(s.catalog, CatalogSource::File(dir.path().join("cat.toml")));
        assert_eq!(
            s.catch_all,
            vec!["127.0.0.9:5041".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(s.workers, 2);
    }

    #[test]
    fn consul_and_embedded_sources_take_their_addresses() {
        let (dir, args) = with_file(
            "[catalog]\nsource = \"embedded\"\ndata_dir = \"state\"\nregistry = \"127.0.0.1:18500\"\n",
        );
        let s = args.resolve().unwrap();
        let listen = "127.0.0.1:18500".parse().unwrap();
        assert_eq!(
            s.catalog,
            CatalogSource::Embedded {
                listen,
                data_dir: dir.path().join("state")
            }
        );

        let (_d, args) = with_file("[catalog]\nsource = \"consul\"\nconsul = \"10.0.0.5:8500\"\n");
        assert_eq!(
            args.resolve().unwrap().catalog,
            CatalogSource::Consul("10.0.0.5:8500".parse().unwrap())
        );

        let (_d, args) = with_file("[catalog]\nsource = \"consul\"\nconsul = \"nowhere\"\n");
        assert_eq!(
            args.resolve().unwrap_err().key.as_deref(),
            Some("catalog.consul")
        );
    }

    #[test]
    fn declared_services_get_defaults_and_are_validated() {
        let (_d, args) = with_file(
            "[node]\nname = \"m1\"\n[[service]]\nname = \"giphy\"\nport = 31000\n\n[[service]]\nname = \"org\"\nport = 8080\ncheck = { http = \"/health\", interval = \"2s\", timeout = \"500ms\", deregister_critical_service_after = \"30s\" }\n",
        );
        let s = args.resolve().unwrap();
        assert_eq!(s.services[0].id, "giphy-m1-31000");
        assert_eq!(s.services[0].check, Check::Ttl(DEFAULT_CHECK_TTL));
        let http = Check::Http {
            path: "/health".into(),
            interval: Duration::from_secs(2),
            timeout: Duration::from_millis(500),
        };
        assert_eq!(s.services[1].check, http);
        assert_eq!(s.services[0].deregister_after, None);
        assert_eq!(
            s.services[1].deregister_after,
            Some(Duration::from_secs(30))
        );

        let (_d, args) = with_file("[[service]]\nname = \"Bad\"\nport = 1\n");
        let e = args.resolve().unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("service.name")));
        let (_d, args) =
            with_file("[[service]]\nname = \"a\"\nport = 1\ncheck = { ttl = \"soon\" }\n");
        assert_eq!(
            args.resolve().unwrap_err().key.as_deref(),
            Some("service.check.ttl")
        );
        let (_d, args) =
            with_file("[catalog]\nsource = \"file\"\n[[service]]\nname = \"a\"\nport = 1\n");
        assert_eq!(args.resolve().unwrap_err().key.as_deref(), Some("service"));
        let (_d, args) =
            with_file("[[service]]\nname = \"a\"\nport = 1\nmeta = { protocol = \"grpc\" }\n");
        let e = args.resolve().unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(4), Some("service.meta.protocol"))
        );
        assert!(
            e.to_string()
                .contains("\"grpc\" is not \"http1\" or \"h2c\""),
            "{e}"
        );
        let (_d, args) =
            with_file("[[service]]\nname = \"a\"\nport = 1\nmeta = { protocol = \"h2c\" }\n");
        assert_eq!(args.resolve().unwrap().services[0].meta["protocol"], "h2c");
    }

    #[test]
    fn bad_values_name_file_line_and_key() {
        let (dir, args) = with_file("[node]\nname = \"x\"\n\n[listen]\ninbound = \"nowhere\"\n");
        let e = args.resolve().unwrap_err();
        assert_eq!(e.line, Some(5));
        assert_eq!(e.key.as_deref(), Some("listen.inbound"));
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "{}:5: key `listen.inbound`: ",
                dir.path().join("skyline.toml").display()
            )),
            "{text}"
        );
    }

    #[test]
    fn resilience_defaults_are_overridden_by_the_file_and_per_route() {
        let (_dir, args) = with_file(
            "[catalog]\nsource = \"file\"\n\n[resilience]\nrequest_timeout = \"10s\"\n\
             retries = 1\noutlier = { max_ejected_percent = 30 }\n\n\
             [routes.giphy]\nattempt_timeout = \"500ms\"\nbalance = \"round_robin\"\n\
             probe = { path = \"/health\", interval = \"2s\" }\nmax_request_body = 1048576\n",
        );
        let policies = args.resolve().unwrap().resilience;
        let default = &policies.default;
        assert_eq!(default.request_timeout, Duration::from_secs(10));
        assert_eq!(default.retries, 1);
        assert_eq!(default.outlier.max_ejected_percent, 30);
        assert_eq!(
            default.outlier.consecutive_failures, 5,
            "untouched keys keep defaults"
        );
        assert_eq!(default.attempt_timeout, None);
        let giphy = policies.for_service("giphy");
        assert_eq!(
            giphy.request_timeout,
            Duration::from_secs(10),
            "from [resilience]"
        );
        assert_eq!(giphy.attempt_timeout, Some(Duration::from_millis(500)));
        assert_eq!(giphy.balance, Balance::RoundRobin);
        let probe = giphy.probe.as_ref().unwrap();
        assert_eq!(
            (probe.path.as_str(), probe.interval),
            ("/health", Duration::from_secs(2))
        );
        assert_eq!(probe.unhealthy, 2);
        assert!(policies.for_service("other").probe.is_none());
        assert_eq!(giphy.max_request_body, Some(1 << 20));
        assert_eq!(default.max_request_body, None, "no body limit by default");
    }

    #[test]
    fn bad_resilience_values_name_line_and_key() {
        for (text, line, key) in [
            ("[resilience]\nretries = 11\n", 2, "resilience.retries"),
            (
                "[resilience]\n\nbalance = \"random\"\n",
                3,
                "resilience.balance",
            ),
            (
                "[resilience]\nrequest_timeout = \"soon\"\n",
                2,
                "resilience.request_timeout",
            ),
            (
                "[routes.giphy]\nprobe = { path = \"health\" }\n",
                2,
                "routes.giphy.probe.path",
            ),
            ("[routes.\"Bad Name\"]\nretries = 1\n", 1, "routes.Bad Name"),
            (
                "[routes.x]\noutlier = { max_ejected_percent = 101 }\n",
                2,
                "routes.x.outlier.max_ejected_percent",
            ),
        ] {
            let (_dir, args) = with_file(text);
            let e = args.resolve().unwrap_err();
            assert_eq!(
                (e.line, e.key.as_deref()),
                (Some(line), Some(key)),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn etcd_is_chosen_with_its_endpoints_and_prefix() {
        let (_d, args) = with_file(
            "[catalog]\nsource = \"etcd\"\netcd_endpoints = [\"10.0.0.5:2379\", \"http://10.0.0.6:2379\"]\netcd_prefix = \"mesh\"\n",
        );
        let s = args.resolve().unwrap();
        assert_eq!(
            s.catalog,
            CatalogSource::Etcd {
                endpoints: vec!["http://10.0.0.5:2379".into(), "http://10.0.0.6:2379".into()],
                prefix: "mesh/".into(),
            }
        );
        let args = AgentArgs {
            catalog: Some(CatalogKind::Etcd),
            ..AgentArgs::default()
        };
        assert_eq!(
            args.resolve().unwrap().catalog,
            CatalogSource::Etcd {
                endpoints: vec![DEFAULT_ENDPOINT.into()],
                prefix: DEFAULT_PREFIX.into(),
            }
        );
    }

    #[test]
    fn bad_etcd_settings_name_file_line_and_key() {
        let (_d, args) = with_file(
            "[catalog]\nsource = \"etcd\"\netcd_endpoints = [\n  \"10.0.0.5:2379\",\n  \"https://x:1\",\n]\n",
        );
        let e = args.resolve().unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(5), Some("catalog.etcd_endpoints")),
            "{e}"
        );
        let (_d, args) =
            with_file("[catalog]\nsource = \"etcd\"\netcd_endpoints = [\"no-port\"]\n");
        assert!(args.resolve().is_err());
        let (_d, args) = with_file("[catalog]\nsource = \"etcd\"\netcd_endpoints = []\n");
        assert!(args.resolve().is_err());
        let (_d, args) = with_file("[catalog]\nsource = \"etcd\"\n\netcd_prefix = \"\"\n");
        let e = args.resolve().unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(4), Some("catalog.etcd_prefix"))
        );
        let args = AgentArgs {
            catalog: Some(CatalogKind::Etcd),
            etcd_endpoints: Some(vec!["127.0.0.1:2379/v3".into()]),
            ..AgentArgs::default()
        };
        assert_eq!(
            args.resolve().unwrap_err().key.as_deref(),
            Some("catalog.etcd_endpoints")
        );
    }

    #[test]
    fn an_unknown_key_or_a_value_of_the_wrong_type_names_its_line_and_key() {
        for (text, line, key) in [
            ("[proxy]\nworkerz = 3\n", 2, "proxy.workerz"),
            ("retries = 1\n", 1, "retries"),
            ("[nodes]\nname = \"x\"\n", 1, "nodes"),
            (
                "[resilience]\noutlier = { max_ejection = 5 }\n",
                2,
                "resilience.outlier.max_ejection",
            ),
            (
                "[[service]]\nname = \"a\"\nport = \"x\"\n",
                3,
                "service.port",
            ),
            (
                "[catalog]\netcd_endpoints = [\n  \"a\",\n  5,\n]\n",
                4,
                "catalog.etcd_endpoints",
            ),
        ] {
            let (_d, args) = with_file(text);
            let e = args.resolve().unwrap_err();
            assert_eq!(
                (e.line, e.key.as_deref()),
                (Some(line), Some(key)),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn every_duration_of_the_file_takes_the_same_units() {
        let (_d, args) = with_file(
            "[proxy]\nfallback_hold = \"1m30s\"\n[resilience]\nrequest_timeout = \"1h\"\n\
             connect_timeout = \"1500us\"\n[[service]]\nname = \"a\"\nport = 1\n\
             check = { ttl = \"1h\" }\n",
        );
        let s = args.resolve().unwrap();
        assert_eq!(s.policy.fallback_hold, Duration::from_secs(90));
        assert_eq!(
            s.resilience.default.request_timeout,
            Duration::from_secs(3600)
        );
        assert_eq!(
            s.resilience.default.connect_timeout,
            Duration::from_micros(1500)
        );
        assert_eq!(s.services[0].check, Check::Ttl(Duration::from_secs(3600)));
        for text in [
            "[proxy]\nfallback_hold = \"3\"\n",
            "[resilience]\nidle_timeout = \"25h\"\n",
            "[resilience]\nidle_timeout = \"-1s\"\n",
        ] {
            let (_d, args) = with_file(text);
            assert!(args.resolve().is_err(), "{text}");
        }
    }

    #[test]
    fn unknown_keys_and_sources_are_refused() {
        let (_d, args) = with_file("[proxy]\nworkerz = 3\n");
        let e = args.resolve().unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.reason.contains("workerz"), "{e}");

        let (_d, args) = with_file("[catalog]\nsource = \"zookeeper\"\n");
        let e = args.resolve().unwrap_err();
        assert_eq!(e.key.as_deref(), Some("catalog.source"));

        let (_d, args) = with_file("[proxy]\nworkers = 0\n");
        assert_eq!(
            args.resolve().unwrap_err().key.as_deref(),
            Some("proxy.workers")
        );
    }
}
