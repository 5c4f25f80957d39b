//! `skyline bridge` settings: flags, `SKYLINE_*` variables and a TOML file, in that order.
//!
//! ```toml
//! [bridge]
//! listen = ["0.0.0.0:5041", "0.0.0.0:8080"]  # host port, and Service ports that target us
//! dns = "10.96.0.10:53"                      # the cluster DNS [default: /etc/resolv.conf]
//! template = "{name}.{namespace}.svc.cluster.local"
//! namespace = "default"
//! port = 8080
//! gateways = ["10.0.0.50:5041"]              # [default: catalog service skyline-gateway]
//! consul = "10.0.0.5:8500"                   # the catalog, to find the gateways
//! max_hops = 8
//!
//! [services.giphy]                           # per-service overrides
//! name = "giphy-v2"
//! namespace = "media"
//! port = 80
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::{Names, Override, Settings};
use crate::access::{self, AccessArgs, LogSection};
use crate::catalog::CatalogSource;
use crate::config::reference::{Section, Value};
use crate::config::{ConfigError, DEFAULT_ADMIN, Listen, Source, file_only, key};
use crate::proxy::DEFAULT_MAX_HOPS;
use crate::proxy::resilience::Resilience;
use crate::proxy::resilience::config::{RESILIENCE_KEYS, ResilienceSection, resilience};
use crate::role::TokenArgs;
use crate::routing::Protocol;

/// Settings of `skyline bridge`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct BridgeArgs {
    /// TOML config file; flags and SKYLINE_* variables override its values
    #[arg(long, env = "SKYLINE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Listeners, comma-separated: the host port and any Service port that targets the
    /// bridge pods [default: 0.0.0.0:5041]
    #[arg(
        long,
        env = "SKYLINE_BRIDGE_LISTEN",
        value_name = "ADDR,...",
        value_delimiter = ','
    )]
    pub listen: Option<Vec<SocketAddr>>,

    /// Admin listener (/healthz, /readyz, /metrics), or "off" [default: 127.0.0.1:5050]
    #[arg(long, env = "SKYLINE_ADMIN", value_name = "ADDR|off")]
    pub admin: Option<Listen>,

    /// The cluster DNS server, such as 10.96.0.10:53 [default: the first nameserver of
    /// /etc/resolv.conf, port 53]
    #[arg(long, env = "SKYLINE_DNS", value_name = "ADDR")]
    pub dns: Option<SocketAddr>,

    /// The Kubernetes name of a service [default: {name}.{namespace}.svc.cluster.local]
    #[arg(long, env = "SKYLINE_TEMPLATE", value_name = "TEMPLATE")]
    pub template: Option<String>,

    /// The Kubernetes namespace of services [default: default]
    #[arg(long, env = "SKYLINE_NAMESPACE", value_name = "NS")]
    pub namespace: Option<String>,

    /// The port of Kubernetes services [default: 8080]
    #[arg(long, env = "SKYLINE_SERVICE_PORT", value_name = "PORT")]
    pub port: Option<u16>,

    /// The gateway pool, comma-separated [default: catalog service skyline-gateway]
    #[arg(
        long,
        env = "SKYLINE_GATEWAYS",
        value_name = "ADDR,...",
        value_delimiter = ','
    )]
    pub gateways: Option<Vec<SocketAddr>>,

    /// The Consul agent or Skyline registry, to find the gateways and to watch the
    /// authorization policies (skyline/policies/) in; with --gateways, used for the policies
    /// only when given [default: 127.0.0.1:8500]
    #[arg(long, env = "SKYLINE_CONSUL", value_name = "ADDR")]
    pub consul: Option<SocketAddr>,

    /// Requests that already took this many Skyline hops get 508 [default: 8]
    #[arg(long, env = "SKYLINE_MAX_HOPS", value_name = "N")]
    pub max_hops: Option<u32>,

    #[command(flatten)]
    pub access: AccessArgs,

    #[command(flatten)]
    pub peers: crate::proxy::h2::PeerArgs,

    #[command(flatten)]
    pub tokens: TokenArgs,
}

/// Every key of the bridge's file (see [`crate::config::reference`]).
pub const FILE: &[Section] = &[
    Section {
        table: "bridge",
        sample: "",
        doc: "The bridge.",
        defaults_from: None,
        keys: &[
            key(
                "listen",
                "listen",
                "array of addresses",
                Value::Default("[\"0.0.0.0:5041\"]"),
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
                "dns",
                "dns",
                "address",
                Value::Example {
                    toml: "\"10.96.0.10:53\"",
                    default: "",
                },
            ),
            key(
                "template",
                "template",
                "string with `{name}`, `{namespace}`",
                Value::Default("\"{name}.{namespace}.svc.cluster.local\""),
            ),
            key(
                "namespace",
                "namespace",
                "string",
                Value::Default("\"default\""),
            ),
            key("port", "port", "port", Value::Default("8080")),
            file_only(
                "cluster_domain",
                "string",
                Value::Default("\"cluster.local\""),
                "The cluster domain: a request for `<name>.<namespace>.svc.<domain>` is a call to service `<name>`.",
            ),
            key(
                "gateways",
                "gateways",
                "array of addresses",
                Value::Example {
                    toml: "[\"10.0.0.50:5041\"]",
                    default: "",
                },
            ),
            key(
                "consul",
                "consul",
                "address",
                Value::Default("\"127.0.0.1:8500\""),
            ),
            key(
                "max_hops",
                "max_hops",
                "integer, hops (at least 1)",
                Value::Default("8"),
            ),
        ],
    },
    Section {
        table: "services.<service>",
        sample: "giphy",
        doc: "How one service is named in Kubernetes, when it differs from the `[bridge]` defaults.",
        defaults_from: None,
        keys: &[
            file_only(
                "name",
                "string",
                Value::Example {
                    toml: "\"giphy-v2\"",
                    default: "the service's name",
                },
                "The Kubernetes Service's name.",
            ),
            file_only(
                "namespace",
                "string",
                Value::Example {
                    toml: "\"media\"",
                    default: "`[bridge] namespace`",
                },
                "The Service's namespace.",
            ),
            file_only(
                "port",
                "port",
                Value::Example {
                    toml: "80",
                    default: "`[bridge] port`",
                },
                "The Service's port.",
            ),
            file_only(
                "protocol",
                "`\"http1\"` or `\"h2c\"`",
                Value::Example {
                    toml: "\"h2c\"",
                    default: "h2c for gRPC calls, else http1",
                },
                "What the Service speaks: `h2c` (HTTP/2 only, a gRPC server) gets every request over HTTP/2, an HTTP/1.1 caller's too; `http1` every request over HTTP/1.1. Without it gRPC calls go over h2c and the rest over HTTP/1.1.",
            ),
        ],
    },
    Section {
        table: "resilience",
        sample: "",
        doc: "How the bridge's calls behave: the agent's `[resilience]` keys.",
        defaults_from: None,
        keys: RESILIENCE_KEYS,
    },
    crate::tls::config::TLS_SECTION,
    crate::authz::config::AUTHZ_SECTION,
    crate::authz::config::AUTHZ_RULE_SECTION,
    access::FILE_SECTION,
    crate::proxy::h2::FILE_SECTION,
    access::METRICS_SECTION,
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    bridge: BridgeSection,
    #[serde(default)]
    services: BTreeMap<String, ServiceSection>,
    /// Timeouts, retries, balancing and ejection of the bridge's calls (the agent's keys).
    #[serde(default)]
    resilience: ResilienceSection,
    /// Mesh TLS (the agent's keys).
    #[serde(default)]
    tls: crate::tls::config::TlsSection,
    /// Authorization policies (the agent's keys, without `caller`).
    #[serde(default)]
    authz: crate::authz::PolicyConfig,
    #[serde(default)]
    log: LogSection,
    #[serde(default)]
    mesh: crate::proxy::h2::MeshSection,
    #[serde(default)]
    metrics: crate::access::MetricsSection,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BridgeSection {
    listen: Option<Spanned<Vec<SocketAddr>>>,
    admin: Option<Spanned<String>>,
    admin_token_file: Option<Spanned<PathBuf>>,
    token_file: Option<Spanned<PathBuf>>,
    dns: Option<SocketAddr>,
    template: Option<Spanned<String>>,
    namespace: Option<String>,
    port: Option<u16>,
    /// The cluster domain of Service names [default: cluster.local].
    cluster_domain: Option<String>,
    gateways: Option<Vec<SocketAddr>>,
    consul: Option<SocketAddr>,
    max_hops: Option<Spanned<u32>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServiceSection {
    /// The Kubernetes Service name, when it differs from the Skyline one.
    name: Option<String>,
    /// The namespace of this service [default: the bridge's].
    namespace: Option<String>,
    /// The port of this service [default: the bridge's].
    port: Option<u16>,
    /// What this service's Kubernetes Service speaks, `http1` or `h2c` [default: h2c for gRPC
    /// calls, else http1].
    protocol: Option<Spanned<String>>,
}

/// The first `nameserver` of /etc/resolv.conf, port 53; 127.0.0.1:53 when there is none.
pub fn system_dns() -> SocketAddr {
    let ip = std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|text| {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("nameserver"))
                .find_map(|ip| ip.trim().parse::<IpAddr>().ok())
        })
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(ip, 53)
}

/// A setting from its flag (or variable), else from the file with the offset of its value there.
fn from_flag_or_file<T>(flag: Option<T>, file: Option<Spanned<T>>) -> (Option<T>, Option<usize>) {
    match (flag, file) {
        (Some(v), _) => (Some(v), None),
        (None, Some(v)) => {
            let at = v.span().start;
            (Some(v.into_inner()), Some(at))
        }
        (None, None) => (None, None),
    }
}

impl BridgeArgs {
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        let reload = self.config.is_some().then(|| self.clone());
        let (file, src) = Source::read::<FileConfig>(self.config.as_ref())?;
        let resilience = resilience(&src, &Resilience::default(), &file.resilience, "resilience")?;
        let access = self.access.resolve(&src, &file.log, &file.metrics)?;
        let peer_protocol = self.peers.resolve(&src, &file.mesh)?;
        let b = file.bridge;
        let admin = match (self.admin, b.admin) {
            (Some(l), _) => l,
            (None, Some(text)) => text
                .get_ref()
                .parse()
                .map_err(|e: String| src.at(Some(text.span().start), "bridge.admin", e))?,
            (None, None) => Listen::At(DEFAULT_ADMIN),
        };
        let defaults = Names::default();
        let (template, at) = from_flag_or_file(self.template, b.template);
        let template = template.unwrap_or(defaults.template);
        if !template.contains("{name}") {
            return Err(src.at(at, "bridge.template", "must contain {name}"));
        }
        let mut overrides = BTreeMap::new();
        for (service, o) in file.services {
            let protocol = match o.protocol {
                None => None,
                Some(text) => match text.get_ref().as_str() {
                    "http1" => Some(Protocol::Http1),
                    "h2c" => Some(Protocol::H2c),
                    _ => {
                        let key = format!("services.{service}.protocol");
                        let at = Some(text.span().start);
                        return Err(src.at(at, &key, "must be \"http1\" or \"h2c\""));
                    }
                },
            };
            overrides.insert(
                service,
                Override {
                    name: o.name,
                    namespace: o.namespace,
                    port: o.port,
                    protocol,
                },
            );
        }
        let names = Names {
            template,
            namespace: self.namespace.or(b.namespace).unwrap_or(defaults.namespace),
            port: self.port.or(b.port).unwrap_or(defaults.port),
            cluster_domain: b.cluster_domain.unwrap_or(defaults.cluster_domain),
            overrides,
        };
        let gateways = self.gateways.or(b.gateways).unwrap_or_default();
        let consul = self.consul.or(b.consul);
        // Authorization policies in the KV of the registry the bridge follows, or of the one
        // it names with fixed gateways.
        let kv = match (gateways.is_empty(), consul) {
            (true, c) => Some(c.unwrap_or(crate::config::DEFAULT_REGISTRY)),
            (false, c) => c,
        };
        let catalog = gateways
            .is_empty()
            .then(|| CatalogSource::Consul(consul.unwrap_or(crate::config::DEFAULT_REGISTRY)));
        let (max_hops, at) = from_flag_or_file(self.max_hops, b.max_hops);
        let max_hops = max_hops.unwrap_or(DEFAULT_MAX_HOPS);
        if max_hops == 0 {
            return Err(src.at(at, "bridge.max_hops", "must be at least 1"));
        }
        let (listen, at) = from_flag_or_file(self.listen, b.listen);
        let listen = listen.unwrap_or_else(|| vec![crate::contract::DEFAULT_GATEWAY]);
        if listen.is_empty() {
            return Err(src.at(at, "bridge.listen", "needs at least one address"));
        }
        let tls = crate::tls::config::mesh_tls(&src, &file.tls)?;
        let authz = crate::authz::config::authz_policy(&src, &file.authz)?;
        let tokens = self.tokens.resolve(
            &src,
            ("bridge.admin_token_file", &b.admin_token_file),
            ("bridge.token_file", &b.token_file),
            admin.addr(),
        )?;
        Ok(Settings {
            tls,
            authz,
            kv,
            reload,
            tokens,
            listen,
            admin: admin.addr(),
            dns: self.dns.or(b.dns).unwrap_or_else(system_dns),
            names,
            gateways,
            catalog,
            max_hops,
            resilience,
            access,
            peer_protocol,
        })
    }
}
