//! `skyline gateway` settings: flags, `SKYLINE_*` variables and a TOML file, in that order.
//!
//! ```toml
//! [listen]
//! gateway = "0.0.0.0:5041"
//! admin = "127.0.0.1:5050"          # or "off"
//!
//! [catalog]
//! source = "consul"                 # or "file"
//! consul = "127.0.0.1:8500"        # also where `skyline/routes/<service>` is watched
//!
//! [gateway]
//! max_hops = 8
//! kv_routes = true                  # watch skyline/routes/ (consul source only)
//! hold = "3s"                       # the hold of policies that give none
//!
//! [upstreams.kubernetes]
//! service = "skyline-bridge"        # or addresses = ["10.0.0.21:5041"]
//!
//! [resilience]                    # as the agent's: timeouts, retries, balancing, ejection
//! attempt_timeout = "1s"
//!
//! [routes.giphy]
//! tiers = [{ select = "platform=mesos", min_healthy = "50%" }, { upstream = "kubernetes" }]
//! hold = "3s"
//! split = [90, 10]
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::Settings;
use super::policy::{self, DEFAULT_HOLD, RoutePolicyConfig, UpstreamConfig};
use crate::access::{self, AccessArgs, LogSection};
use crate::catalog::CatalogSource;
use crate::config::reference::{DURATION, Section, Value};
use crate::config::{ConfigError, DEFAULT_ADMIN, DEFAULT_REGISTRY, Listen, Source, file_only, key};
use crate::contract::{DEFAULT_GATEWAY, KUBERNETES};
use crate::proxy::DEFAULT_MAX_HOPS;
use crate::proxy::resilience::Resilience;
use crate::proxy::resilience::config::{RESILIENCE_KEYS, ResilienceSection, resilience};
use crate::role::TokenArgs;

/// Settings of `skyline gateway`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct GatewayArgs {
    /// TOML config file; flags and SKYLINE_* variables override its values
    #[arg(long, env = "SKYLINE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where requests arrive [default: 0.0.0.0:5041]
    #[arg(long, env = "SKYLINE_GATEWAY_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Admin listener (/healthz, /readyz, /routes, /metrics), or "off" [default: 127.0.0.1:5050]
    #[arg(long, env = "SKYLINE_ADMIN", value_name = "ADDR|off")]
    pub admin: Option<Listen>,

    /// The catalog file, instead of Consul
    #[arg(long, env = "SKYLINE_CATALOG_FILE", value_name = "FILE")]
    pub catalog_file: Option<PathBuf>,

    /// The Consul agent or Skyline registry to follow (and to watch skyline/routes/ in)
    /// [default: 127.0.0.1:8500]
    #[arg(long, env = "SKYLINE_CONSUL", value_name = "ADDR")]
    pub consul: Option<SocketAddr>,

    /// Fixed addresses of the Kubernetes bridges, comma-separated [default: the instances of
    /// catalog service `skyline-bridge`]
    #[arg(
        long,
        env = "SKYLINE_BRIDGES",
        value_name = "ADDR,...",
        value_delimiter = ','
    )]
    pub bridges: Option<Vec<SocketAddr>>,

    /// The fail-back hold of policies that give none, such as 3s or 500ms [default: 3s]
    #[arg(long, env = "SKYLINE_HOLD", value_name = "DURATION")]
    pub hold: Option<String>,

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

/// Every key of the gateway's file (see [`crate::config::reference`]).
pub const FILE: &[Section] = &[
    Section {
        table: "listen",
        sample: "",
        doc: "The gateway's listeners.",
        defaults_from: None,
        keys: &[
            key(
                "gateway",
                "listen",
                "address",
                Value::Default("\"0.0.0.0:5041\""),
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
        doc: "Where the catalog comes from.",
        defaults_from: None,
        keys: &[
            file_only(
                "source",
                "`consul` or `file`",
                Value::Default("\"consul\""),
                "The catalog's source; `file` when `file` is given.",
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
                Value::Example {
                    toml: "\"/etc/skyline/catalog.toml\"",
                    default: "none: Consul",
                },
            ),
        ],
    },
    Section {
        table: "gateway",
        sample: "",
        doc: "Routing.",
        defaults_from: None,
        keys: &[
            key(
                "max_hops",
                "max_hops",
                "integer, hops (at least 1)",
                Value::Default("8"),
            ),
            file_only(
                "kv_routes",
                "boolean",
                Value::Default("true"),
                "Watch route policies in the registry's KV, `skyline/routes/<service>` (with a `consul` source only).",
            ),
            key("hold", "hold", DURATION, Value::Default("\"3s\"")),
        ],
    },
    Section {
        table: "upstreams.<name>",
        sample: "vms",
        doc: "A named upstream pool that tiers name; `kubernetes` (the catalog's `skyline-bridge` instances) exists without being written. Exactly one of `service` and `addresses`.",
        defaults_from: None,
        keys: &[
            file_only(
                "service",
                "service name",
                Value::Example {
                    toml: "\"skyline-vms\"",
                    default: "—",
                },
                "The catalog service whose passing instances form the pool.",
            ),
            file_only(
                "addresses",
                "array of addresses",
                Value::Example {
                    toml: "[\"10.0.0.21:5041\"]",
                    default: "—",
                },
                "Fixed addresses of the pool.",
            ),
            file_only(
                "bridge",
                "boolean",
                Value::Example {
                    toml: "false",
                    default: "`true` for `kubernetes` and `skyline-bridge`",
                },
                "The pool is Kubernetes bridges: a request that came from a bridge is never sent back to it.",
            ),
        ],
    },
    Section {
        table: "resilience",
        sample: "",
        doc: "How the gateway's calls behave: the agent's `[resilience]` keys.",
        defaults_from: None,
        keys: RESILIENCE_KEYS,
    },
    Section {
        table: "routes.<service>",
        sample: "giphy",
        doc: "The route policy of one service, or of every service (`\"*\"`): its tiers, best first. Re-read within 250 ms of a change; also read from the registry's KV, `skyline/routes/<service>`, as JSON or TOML. An invalid policy is refused and the one in force kept.",
        defaults_from: None,
        keys: &[
            file_only(
                "tiers",
                "array of tiers",
                Value::Example {
                    toml: "[{ select = \"platform=mesos\", min_healthy = \"50%\" }, { upstream = \"kubernetes\" }]",
                    default: "`platform=mesos`, then upstream `kubernetes`",
                },
                "The tiers, best first; each has exactly one of `select` and `upstream`.",
            ),
            file_only(
                "tiers[].select",
                "`key=value`",
                Value::Example {
                    toml: "\"platform=mesos\"",
                    default: "—",
                },
                "The instances of the service whose meta matches; requests go to their nodes' inbound proxies.",
            ),
            file_only(
                "tiers[].upstream",
                "upstream name",
                Value::Example {
                    toml: "\"kubernetes\"",
                    default: "—",
                },
                "A pool of `[upstreams]`.",
            ),
            file_only(
                "tiers[].min_healthy",
                "integer, or percent (`\"50%\"`)",
                Value::Example {
                    toml: "\"50%\"",
                    default: "`1`",
                },
                "The tier is eligible while this many of its endpoints pass (at least one).",
            ),
            file_only(
                "tiers[].name",
                "string",
                Value::Example {
                    toml: "\"mesos\"",
                    default: "the selector's value or the upstream's name",
                },
                "The tier's name in `x-skyline-tier` and `/routes`.",
            ),
            file_only(
                "hold",
                DURATION,
                Value::Example {
                    toml: "\"3s\"",
                    default: "`[gateway] hold`",
                },
                "How long a better tier must stay eligible before traffic falls back to it.",
            ),
            file_only(
                "split",
                "array of integers, one weight per tier",
                Value::Example {
                    toml: "[90, 10]",
                    default: "none",
                },
                "Split traffic over the eligible tiers by weight instead of sending it all to the best one.",
            ),
            file_only(
                "shadow.tier",
                "a tier's name",
                Value::Example {
                    toml: "\"kubernetes\"",
                    default: "none (no shadow copies)",
                },
                "Copy a share of GET and HEAD requests to this tier as well, compare the copy's status class with the answer's, and discard the copy (`skyline migrate --shadow`). Written as `shadow = { tier = \"kubernetes\", percent = 10 }`.",
            ),
            file_only(
                "shadow.percent",
                "integer, 1 to 100",
                Value::Example {
                    toml: "10",
                    default: "—",
                },
                "The share of GET and HEAD requests copied to `shadow.tier`.",
            ),
        ],
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
    listen: ListenSection,
    #[serde(default)]
    catalog: CatalogSection,
    #[serde(default)]
    gateway: GatewaySection,
    #[serde(default)]
    upstreams: BTreeMap<String, Spanned<UpstreamConfig>>,
    #[serde(default)]
    routes: BTreeMap<String, Spanned<RoutePolicyConfig>>,
    /// Timeouts, retries, balancing and ejection of the gateway's calls (the agent's keys).
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
struct ListenSection {
    gateway: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
    admin_token_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CatalogSection {
    source: Option<Spanned<String>>,
    file: Option<PathBuf>,
    consul: Option<Spanned<String>>,
    token_file: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GatewaySection {
    /// Requests that already took this many hops get 508 [default: 8].
    max_hops: Option<Spanned<u32>>,
    /// Watch `skyline/routes/` in the registry's KV [default: true with a consul source].
    kv_routes: Option<bool>,
    /// The hold of policies that give none [default: "3s"].
    hold: Option<Spanned<String>>,
}

impl GatewayArgs {
    pub fn resolve(self) -> Result<Settings, ConfigError> {
        let reload = self.config.is_some().then(|| self.clone());
        let (file, src) = Source::read::<FileConfig>(self.config.as_ref())?;
        let resilience = resilience(&src, &Resilience::default(), &file.resilience, "resilience")?;
        let access = self.access.resolve(&src, &file.log, &file.metrics)?;
        let peer_protocol = self.peers.resolve(&src, &file.mesh)?;
        let parse_addr = |key: &str, field: &Option<Spanned<String>>| {
            field
                .as_ref()
                .map(|f| {
                    f.get_ref()
                        .parse::<Listen>()
                        .map_err(|e| src.at(Some(f.span().start), key, e))
                })
                .transpose()
        };
        let listen = match self.listen {
            Some(a) => a,
            None => match parse_addr("listen.gateway", &file.listen.gateway)? {
                Some(Listen::At(a)) => a,
                Some(Listen::Off) => {
                    return Err(src.at(
                        file.listen.gateway.as_ref().map(|f| f.span().start),
                        "listen.gateway",
                        "the gateway listener cannot be off",
                    ));
                }
                None => DEFAULT_GATEWAY,
            },
        };
        let admin = match self.admin {
            Some(l) => l,
            None => {
                parse_addr("listen.admin", &file.listen.admin)?.unwrap_or(Listen::At(DEFAULT_ADMIN))
            }
        };
        let consul = match self.consul {
            Some(a) => a,
            None => match &file.catalog.consul {
                Some(f) => f.get_ref().parse().map_err(|_| {
                    src.at(
                        Some(f.span().start),
                        "catalog.consul",
                        "not an address like 127.0.0.1:8500",
                    )
                })?,
                None => DEFAULT_REGISTRY,
            },
        };
        let file_source = file.catalog.source.as_ref().map(|s| s.get_ref().as_str());
        let catalog = match (self.catalog_file, file_source, file.catalog.file) {
            (Some(p), _, _) => CatalogSource::File(p),
            (None, Some("file") | None, Some(p)) => CatalogSource::File(p),
            (None, Some("consul") | None, None) => CatalogSource::Consul(consul),
            (None, Some("file"), None) => {
                let offset = file.catalog.source.as_ref().map(|s| s.span().start);
                return Err(src.at(offset, "catalog.file", "source \"file\" needs a file"));
            }
            (None, Some(other), _) => {
                let offset = file.catalog.source.as_ref().map(|s| s.span().start);
                return Err(src.at(
                    offset,
                    "catalog.source",
                    format!("unknown source {other:?}; expected \"file\" or \"consul\""),
                ));
            }
        };
        let default_hold = match (&self.hold, &file.gateway.hold) {
            (Some(h), _) => {
                crate::config::parse_duration_setting(h).map_err(|e| src.at(None, "hold", e))?
            }
            (None, Some(h)) => crate::config::parse_duration_setting(h.get_ref())
                .map_err(|e| src.at(Some(h.span().start), "gateway.hold", e))?,
            (None, None) => DEFAULT_HOLD,
        };
        let (max_hops, at) = match (self.max_hops, &file.gateway.max_hops) {
            (Some(n), _) => (n, None),
            (None, Some(n)) => (*n.get_ref(), Some(n.span().start)),
            (None, None) => (DEFAULT_MAX_HOPS, None),
        };
        if max_hops == 0 {
            return Err(src.at(at, "gateway.max_hops", "must be at least 1"));
        }
        let mut upstreams = policy::default_upstreams();
        for (name, config) in file.upstreams {
            let offset = config.span().start;
            let upstream = config
                .into_inner()
                .validate(&name)
                .map_err(|e| src.at(Some(offset), &e.key, e.reason))?;
            upstreams.insert(name, upstream);
        }
        if let Some(bridges) = self.bridges {
            upstreams.insert(
                KUBERNETES.to_owned(),
                policy::Upstream {
                    pool: policy::Pool::Addresses(bridges),
                    bridge: true,
                },
            );
        }
        let mut routes = BTreeMap::new();
        for (name, config) in file.routes {
            let offset = config.span().start;
            if name != "*" && !crate::catalog::ServiceName::is_valid(&name) {
                return Err(src.at(
                    Some(offset),
                    &format!("routes.{name}"),
                    "not a service name or \"*\"",
                ));
            }
            let policy = config
                .into_inner()
                .validate(&upstreams, default_hold)
                .map_err(|e| src.at(Some(offset), &format!("routes.{name}.{}", e.key), e.reason))?;
            routes.insert(name, policy);
        }
        let kv = match (&catalog, file.gateway.kv_routes) {
            (CatalogSource::Consul(addr), None | Some(true)) => Some(*addr),
            _ => None,
        };
        let tls = crate::tls::config::mesh_tls(&src, &file.tls)?;
        let authz = crate::authz::config::authz_policy(&src, &file.authz)?;
        let tokens = self.tokens.resolve(
            &src,
            ("listen.admin_token_file", &file.listen.admin_token_file),
            ("catalog.token_file", &file.catalog.token_file),
            admin.addr(),
        )?;
        Ok(Settings {
            tls,
            authz,
            tokens,
            resilience,
            listen,
            admin: admin.addr(),
            catalog,
            upstreams,
            routes,
            default_hold,
            max_hops,
            kv,
            include_warning: false,
            reload,
            access,
            peer_protocol,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn with_file(text: &str) -> (tempfile::TempDir, GatewayArgs) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        let args = GatewayArgs {
            config: Some(path),
            ..GatewayArgs::default()
        };
        (dir, args)
    }

    #[test]
    fn route_policies_come_from_the_file() {
        let (_d, args) = with_file(
            "[routes.\"*\"]\nhold = \"1s\"\n\n[routes.giphy]\ntiers = [{ select = \"platform=mesos\", min_healthy = \"50%\" }, { upstream = \"kubernetes\" }]\nsplit = [90, 10]\n",
        );
        let s = args.resolve().unwrap();
        assert_eq!(s.routes["*"].hold, Duration::from_secs(1));
        assert_eq!(s.routes["giphy"].split, Some(vec![90, 10]));
        assert_eq!(s.routes["giphy"].hold, DEFAULT_HOLD);
        assert_eq!(s.catalog, CatalogSource::Consul(DEFAULT_REGISTRY));
        assert_eq!(s.kv, Some(DEFAULT_REGISTRY));
    }

    #[test]
    fn the_gateway_takes_the_agents_authz_rules_and_refuses_callers() {
        let (_d, args) = with_file(
            "[authz]\ndefault = \"deny\"\n[[authz.rule]]\nfrom = \"web\"\nto = \"*\"\naction = \"allow\"\n",
        );
        let s = args.resolve().unwrap();
        assert_eq!(s.authz.policy.rules.len(), 1);
        assert_eq!(s.authz.policy.default, Some(crate::authz::Action::Deny));
        let (_d, args) =
            with_file("[[authz.rule]]\nfrom = \"web\"\nto = \"a\"\naction = \"perhaps\"\n");
        let e = args.resolve().unwrap_err();
        assert_eq!(e.key.as_deref(), Some("authz.rule[0].action"));
        let (_d, args) =
            with_file("[[authz.caller]]\nservice = \"web\"\ntoken_file = \"web.token\"\n");
        let e = args.resolve().unwrap_err();
        assert!(e.to_string().contains("caller"), "{e}");
    }

    #[test]
    fn the_gateway_takes_resilience_policies_like_the_agent() {
        let (_d, args) = with_file("[resilience]\nattempt_timeout = \"1s\"\nretries = 1\n");
        let s = args.resolve().unwrap();
        assert_eq!(s.resilience.attempt_timeout, Some(Duration::from_secs(1)));
        assert_eq!(s.resilience.retries, 1);
        let (_d, args) = with_file("[resilience]\n\nbalance = \"best\"\n");
        let e = args.resolve().unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(3), Some("resilience.balance"))
        );
    }

    #[test]
    fn an_invalid_route_policy_names_file_line_and_key() {
        let (_d, args) = with_file(
            "[gateway]\nmax_hops = 4\n\n[routes.giphy]\ntiers = [{ upstream = \"vms\" }]\n",
        );
        let e = args.resolve().unwrap_err();
        assert_eq!(e.key.as_deref(), Some("routes.giphy.tiers[0].upstream"));
        assert_eq!(e.line, Some(4), "the line of the policy's table");
    }
}
