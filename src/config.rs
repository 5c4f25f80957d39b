//! Configuration: command-line flags, `SKYLINE_*` environment variables and a TOML file, in that
//! order of precedence, validated into the runtime [`agent::Settings`]. Every key of every role's
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
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub mod reference;
pub mod token;

use self::reference::{DURATION, FileKey, Section, Value};
use crate::access::{AccessArgs, LogSection};
use crate::agent::Settings;
use crate::catalog::CatalogSource;
use crate::catalog::DEFAULT_INBOUND_PORT;
use crate::catalog::ServiceName;
use crate::catalog::etcd::{DEFAULT_ENDPOINT, DEFAULT_PREFIX};
use crate::gateway::policy::DEFAULT_HOLD;
use crate::proxy::resilience::{Policies, Resilience};
use crate::registration::{Check, Declared};
use crate::routing::Policy;
use crate::routing::balance::Balance;

pub const DEFAULT_OUTBOUND: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5040);
pub const DEFAULT_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5050);
pub const DEFAULT_CATALOG_FILE: &str = "/etc/skyline/catalog.toml";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/skyline";
pub const DEFAULT_REGISTRY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8500);

/// The one duration grammar of Skyline, Go's `time.ParseDuration` (and so Consul's): a number
/// and a unit, `ns`, `us`, `ms`, `s`, `m` or `h`, possibly combined (`300ms`, `1.5h`, `2h45m`);
/// `0` alone; negative durations are refused. Every duration of every config file and flag, and
/// of the registry's API, is read here.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let nanos = parse_go_duration(s)?;
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| format!("negative duration {s:?}"))
}

/// Go's `time.ParseDuration`, error texts included: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+` with units
/// `ns`, `us` (or `µs`, `μs`), `ms`, `s`, `m`, `h`; `"0"` needs no unit. Returns signed
/// nanoseconds.
pub fn parse_go_duration(orig: &str) -> Result<i64, String> {
    let invalid = || format!("time: invalid duration {orig:?}");
    let mut s = orig.as_bytes();
    let mut neg = false;
    if let Some((&c, rest)) = s.split_first() {
        if c == b'-' || c == b'+' {
            neg = c == b'-';
            s = rest;
        }
    }
    if s == b"0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut d: u64 = 0;
    const LIMIT: u64 = 1 << 63;
    while !s.is_empty() {
        if !(s[0] == b'.' || s[0].is_ascii_digit()) {
            return Err(invalid());
        }
        // The integer part; overflow is an invalid duration, as Go's leadingInt reports it.
        let int_len = s.iter().take_while(|c| c.is_ascii_digit()).count();
        let mut v: u64 = 0;
        for &c in &s[..int_len] {
            if v > LIMIT / 10 {
                return Err(invalid());
            }
            v = v * 10 + u64::from(c - b'0');
            if v > LIMIT {
                return Err(invalid());
            }
        }
        let pre = int_len > 0;
        s = &s[int_len..];
        // The fraction: digits past what a u64 holds are dropped, as Go's leadingFraction does.
        let mut post = false;
        let mut frac: u64 = 0;
        let mut scale: f64 = 1.0;
        if s.first() == Some(&b'.') {
            s = &s[1..];
            let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
            let mut overflow = false;
            for &c in &s[..n] {
                if overflow {
                    continue;
                }
                if frac > (LIMIT - 1) / 10 {
                    overflow = true;
                    continue;
                }
                let y = frac * 10 + u64::from(c - b'0');
                if y > LIMIT {
                    overflow = true;
                    continue;
                }
                frac = y;
                scale *= 10.0;
            }
            post = n > 0;
            s = &s[n..];
        }
        if !pre && !post {
            return Err(invalid());
        }
        let unit_len = s
            .iter()
            .take_while(|c| !(**c == b'.' || c.is_ascii_digit()))
            .count();
        if unit_len == 0 {
            return Err(format!("time: missing unit in duration {orig:?}"));
        }
        let unit_text = String::from_utf8_lossy(&s[..unit_len]);
        let unit: u64 = match &*unit_text {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => {
                return Err(format!("time: unknown unit {other:?} in duration {orig:?}"));
            }
        };
        s = &s[unit_len..];
        if v > LIMIT / unit {
            return Err(invalid());
        }
        v *= unit;
        if frac > 0 {
            // Go computes the fraction in float64, and so do we, to round the same way.
            #[allow(clippy::cast_precision_loss, clippy::cast_sign_loss)]
            let extra = (frac as f64 * (unit as f64 / scale)) as u64;
            v = v.checked_add(extra).ok_or_else(invalid)?;
            if v > LIMIT {
                return Err(invalid());
            }
        }
        d = d.checked_add(v).ok_or_else(invalid)?;
        if d > LIMIT {
            return Err(invalid());
        }
    }
    if neg {
        // -(1<<63) is the one negative value without a positive counterpart.
        return Ok(if d == LIMIT { i64::MIN } else { -(d as i64) });
    }
    i64::try_from(d).map_err(|_| invalid())
}

/// A duration setting of a config file or a flag: [`parse_duration`], at most a day.
pub fn parse_duration_setting(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let d = parse_duration(text).map_err(|_| {
        format!("{text:?} is not a duration like \"500ms\", \"3s\", \"5m\" or \"1h\"")
    })?;
    if d > Duration::from_secs(86_400) {
        return Err(format!("{text:?} is out of range (0 to 24h)"));
    }
    Ok(d)
}

/// A listener address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

impl Listen {
    pub fn addr(self) -> Option<SocketAddr> {
        match self {
            Listen::Off => None,
            Listen::At(addr) => Some(addr),
        }
    }
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen::Off);
        }
        s.parse()
            .map(Listen::At)
            .map_err(|_| format!("{s:?} is neither an address like 127.0.0.1:5040 nor \"off\""))
    }
}

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

/// Settings of `skyline registry`, the Consul-compatible catalog for one node or a small site.
#[derive(clap::Args, Clone, Debug)]
pub struct RegistryArgs {
    /// Where the Consul-compatible HTTP API listens
    #[arg(long, env = "SKYLINE_REGISTRY", value_name = "ADDR", default_value_t = DEFAULT_REGISTRY)]
    pub listen: SocketAddr,

    /// The data folder: every acknowledged write is on disk here before it is answered
    #[arg(long, env = "SKYLINE_DATA_DIR", value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// The registry's own node, where /v1/agent/service/register puts services
    #[arg(
        long,
        env = "SKYLINE_NODE_NAME",
        value_name = "NAME",
        default_value = "local"
    )]
    pub node_name: String,

    /// The address of the registry's own node
    #[arg(
        long,
        env = "SKYLINE_NODE_ADDRESS",
        value_name = "IP",
        default_value = "127.0.0.1"
    )]
    pub node_address: IpAddr,

    /// A file holding the ACL token every request must carry (X-Consul-Token, Authorization:
    /// Bearer or ?token=), or give the token itself in SKYLINE_REGISTRY_TOKEN; required when
    /// --listen is not a loopback address [default: no token on loopback]
    #[arg(long, env = "SKYLINE_REGISTRY_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// The token itself, from SKYLINE_REGISTRY_TOKEN (no flag: argv is visible to all).
    #[arg(skip = std::env::var("SKYLINE_REGISTRY_TOKEN").ok())]
    pub token_env: Option<String>,

    /// Repair a damaged data folder and exit: keep every readable record of the log, move the
    /// damaged file aside (`log.damaged-<time>`). Run it only while no registry uses the folder.
    #[arg(long)]
    pub repair: bool,
}

impl RegistryArgs {
    /// The registry's token, refused when missing while the API listens beyond loopback.
    pub fn token(&self) -> Result<Option<token::Token>, ConfigError> {
        let setting = token::TokenSetting {
            env: self.token_env.clone(),
            file: self.token_file.clone(),
        };
        let flags = Source {
            path: PathBuf::from("<flags>"),
            text: String::new(),
        };
        token_for(
            &flags,
            &setting,
            None,
            "--token-file",
            "SKYLINE_REGISTRY_TOKEN",
            Some(self.listen),
            "the registry",
        )
    }
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
    ) -> Result<crate::role::Tokens, ConfigError> {
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
        Ok(crate::role::Tokens { admin, registry })
    }
}

/// A listener's token from `setting`, checked: a file that cannot be read or holds no valid
/// token is refused with the reason (never the content), and so is a listener at `exposed`
/// that is reachable from other machines without a token.
pub(crate) fn token_for(
    src: &Source,
    setting: &token::TokenSetting,
    at: Option<usize>,
    key: &str,
    env_name: &str,
    listen: Option<SocketAddr>,
    what: &str,
) -> Result<Option<token::Token>, ConfigError> {
    let loaded = setting
        .load(env_name)
        .map_err(|reason| src.error(at, Some(key), reason))?;
    if loaded.is_none() {
        if let Some(addr) = listen.filter(|a| token::exposed(*a)) {
            return Err(src.error(
                at,
                Some(key),
                format!(
                    "{what} listens on {addr}, which other machines can reach: it needs a token \
                     ({key} or {env_name}), or a loopback address"
                ),
            ));
        }
    }
    Ok(loaded)
}

/// A refused configuration: which file, where, which key, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{}{}: {reason}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default() + &key.as_ref().map(|k| format!(": key `{k}`")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub reason: String,
}

// What users write in the file. Every field optional: flags and variables may supply it.

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

/// A key that flag `flag` (a clap id) also sets.
pub(crate) const fn key(
    key: &'static str,
    flag: &'static str,
    ty: &'static str,
    value: Value,
) -> FileKey {
    FileKey {
        key,
        flag: Some(flag),
        ty,
        value,
        doc: "",
    }
}

/// A key only the file has.
pub(crate) const fn file_only(
    key: &'static str,
    ty: &'static str,
    value: Value,
    doc: &'static str,
) -> FileKey {
    FileKey {
        key,
        flag: None,
        ty,
        value,
        doc,
    }
}

/// The keys of `[resilience]` (every role) and of the agent's `[routes.<service>]`.
pub const RESILIENCE_KEYS: &[FileKey] = &[
    file_only(
        "connect_timeout",
        DURATION,
        Value::Default("\"2s\""),
        "The longest a connection to an upstream may take to open.",
    ),
    file_only(
        "request_timeout",
        DURATION,
        Value::Default("\"60s\""),
        "The longest a request may wait for its response head, retries included; then 504 `upstream-timeout`.",
    ),
    file_only(
        "attempt_timeout",
        DURATION,
        Value::Example {
            toml: "\"500ms\"",
            default: "the request's",
        },
        "The longest one attempt may wait for its response head, before a retry.",
    ),
    file_only(
        "idle_timeout",
        DURATION,
        Value::Default("\"5m\""),
        "A response body that stalls this long is cut.",
    ),
    file_only(
        "max_request_body",
        "integer, bytes",
        Value::Example {
            toml: "1048576",
            default: "no limit",
        },
        "The largest request body forwarded: a longer declared length gets 413 `content-too-large` before anything is forwarded; a chunked body is cut off where it passes the limit.",
    ),
    file_only(
        "retries",
        "integer, 0 to 10",
        Value::Default("2"),
        "Retries of a request after a 502/503/504, a timed-out attempt or a broken connection (idempotent requests with a body of at most 64 KiB, first hop only); a refused connection is always retried.",
    ),
    file_only(
        "balance",
        "`p2c` or `round_robin`",
        Value::Default("\"p2c\""),
        "How an endpoint is chosen: power of two choices (each of the two by inverse cost) over EWMA latency times requests in flight, or round robin; both respect weights.",
    ),
    file_only(
        "outlier.consecutive_failures",
        "integer",
        Value::Default("5"),
        "Failures in a row (5xx, refused or reset, timeout) that eject an endpoint.",
    ),
    file_only(
        "outlier.base_ejection",
        DURATION,
        Value::Default("\"30s\""),
        "An ejected endpoint sits out this long times the number of its ejections.",
    ),
    file_only(
        "outlier.max_ejection",
        DURATION,
        Value::Default("\"5m\""),
        "The longest an endpoint sits out.",
    ),
    file_only(
        "outlier.max_ejected_percent",
        "integer, percent (0 to 100)",
        Value::Default("50"),
        "Never more than this share of a route's endpoints is ejected.",
    ),
    file_only(
        "probe.path",
        "path",
        Value::Example {
            toml: "\"/health\"",
            default: "no probe (`/` once `probe` is given)",
        },
        "Active health probe: `GET` this path on every endpoint; given any `probe` key, the service is probed.",
    ),
    file_only(
        "probe.interval",
        "duration, at least 100ms",
        Value::Example {
            toml: "\"5s\"",
            default: "`5s`",
        },
        "Time between probes of an endpoint.",
    ),
    file_only(
        "probe.timeout",
        DURATION,
        Value::Example {
            toml: "\"1s\"",
            default: "`1s`",
        },
        "A probe not answered within this time fails.",
    ),
    file_only(
        "probe.unhealthy",
        "integer, at least 1",
        Value::Example {
            toml: "2",
            default: "`2`",
        },
        "Failed probes in a row that take an endpoint out of rotation.",
    ),
    file_only(
        "probe.healthy",
        "integer, at least 1",
        Value::Example {
            toml: "1",
            default: "`1`",
        },
        "Passed probes in a row that bring it back.",
    ),
];

/// The keys of `[tls]` (every role): mesh TLS between the proxies (see `tls`).
pub const TLS_KEYS: &[FileKey] = &[
    file_only(
        "mode",
        "`off`, `permissive` or `strict`",
        Value::Default("\"off\""),
        "mTLS between the proxies. `strict`: listeners of other proxies (inbound, gateway, bridge host port) take only TLS with a certificate of the mesh CA; `permissive` (for a rollout): they also take plain connections, counted in `skyline_mesh_connections_total`. With either, this proxy dials other proxies over mTLS. Needs a restart.",
    ),
    file_only(
        "ca",
        "path",
        Value::Example {
            toml: "\"/etc/skyline/tls/ca.crt\"",
            default: "required unless `mode` is `off`",
        },
        "The mesh CA's certificate (`skyline ca init`): peers must present a certificate it issued. Relative to the config file.",
    ),
    file_only(
        "cert",
        "path",
        Value::Example {
            toml: "\"/etc/skyline/tls/node.crt\"",
            default: "required unless `mode` is `off`",
        },
        "This proxy's certificate (`skyline ca issue`). Read again every 2 s: a changed certificate is used for new connections, open ones keep theirs.",
    ),
    file_only(
        "key",
        "path",
        Value::Example {
            toml: "\"/etc/skyline/tls/node.key\"",
            default: "required unless `mode` is `off`",
        },
        "The certificate's private key (PEM), reloaded with it.",
    ),
];

/// The `[tls]` section of every role's file.
pub const TLS_SECTION: Section = Section {
    table: "tls",
    sample: "",
    doc: "Mesh TLS: mTLS between the proxies with certificates of the mesh CA. Applications keep speaking plain HTTP to the outbound listener, and instances are called over plain HTTP.",
    defaults_from: None,
    keys: TLS_KEYS,
};

/// `[tls]` as users write it.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSection {
    mode: Option<Spanned<String>>,
    ca: Option<Spanned<PathBuf>>,
    cert: Option<Spanned<PathBuf>>,
    key: Option<Spanned<PathBuf>>,
}

/// The validated `[tls]` section: `None` when mesh TLS is off.
pub(crate) fn mesh_tls(
    src: &Source,
    section: &TlsSection,
) -> Result<Option<crate::tls::Settings>, ConfigError> {
    let mode = match &section.mode {
        None => crate::tls::Mode::Off,
        Some(m) => m
            .get_ref()
            .parse()
            .map_err(|e: String| src.at(Some(m.span().start), "tls.mode", e))?,
    };
    if mode == crate::tls::Mode::Off {
        return Ok(None);
    }
    let at = section.mode.as_ref().map(|m| m.span().start);
    let path = |key: &str, field: &Option<Spanned<PathBuf>>| match field {
        Some(p) => Ok(relative_to(src, p.get_ref().clone())),
        None => Err(src.at(
            at,
            key,
            "required when tls.mode is \"permissive\" or \"strict\"",
        )),
    };
    Ok(Some(crate::tls::Settings {
        mode,
        ca: path("tls.ca", &section.ca)?,
        cert: path("tls.cert", &section.cert)?,
        key: path("tls.key", &section.key)?,
    }))
}

/// The validated `[authz]` section: the file's policy and the callers' credentials.
fn authz_settings(
    src: &Source,
    section: &crate::authz::AuthzConfig,
) -> Result<crate::authz::Settings, ConfigError> {
    let policy = crate::authz::Policy::from_config(section, "file:")
        .map_err(|(key, reason)| src.at(None, &format!("authz.{key}"), reason))?;
    let mut callers = Vec::with_capacity(section.caller.len());
    for (i, caller) in section.caller.iter().enumerate() {
        let key = |k: &str| format!("authz.caller[{i}].{k}");
        let service = caller
            .service
            .as_deref()
            .ok_or_else(|| src.at(None, &key("service"), "required"))?;
        let service = ServiceName::parse(service)
            .map_err(|e| src.at(None, &key("service"), e.to_string()))?;
        let path = caller
            .token_file
            .clone()
            .ok_or_else(|| src.at(None, &key("token_file"), "required"))?;
        let token = token::Token::read(&relative_to(src, path))
            .map_err(|reason| src.at(None, &key("token_file"), reason))?;
        callers.push(crate::authz::Caller { service, token });
    }
    Ok(crate::authz::Settings { policy, callers })
}

/// The `[authz]` of a gateway's or bridge's file: the agent's keys, without `caller` (refused
/// when parsed: these roles name no caller, they check the one a mesh peer asserts).
pub(crate) fn authz_policy(
    src: &Source,
    section: &crate::authz::PolicyConfig,
) -> Result<crate::authz::Settings, ConfigError> {
    let section = crate::authz::AuthzConfig {
        default: section.default.clone(),
        rule: section.rule.clone(),
        caller: Vec::new(),
    };
    authz_settings(src, &section)
}

/// The `[authz]` sections of the agent's file (see `crate::authz`).
pub const AUTHZ_SECTION: Section = Section {
    table: "authz",
    sample: "",
    doc: "Authorization policies, enforced by the inbound proxy of the node that runs the called instance, by the gateway and by the bridge (the same rules in each; `caller` is the agent's only); more come from the registry KV under `skyline/policies/`. The agent re-reads them on SIGHUP, the gateway and the bridge within 250 ms of a change to their file. See docs/security.md.",
    defaults_from: None,
    keys: &[file_only(
        "default",
        "`allow` or `deny`",
        Value::Example {
            toml: "\"deny\"",
            default: "`allow`",
        },
        "What happens to a request no rule matches. `deny` here or in any KV policy makes the mesh deny by default.",
    )],
};

/// `[[authz.rule]]`.
pub const AUTHZ_RULE_SECTION: Section = Section {
    table: "authz.rule[]",
    sample: "",
    doc: "A rule. A matching `deny` wins over any matching `allow`; a request no rule matches gets the default. Paths are normalised before matching, and the normalised path is the one the instance receives.",
    defaults_from: None,
    keys: &[
        file_only(
            "from",
            "service name or `*`",
            Value::Example {
                toml: "\"web\"",
                default: "required",
            },
            "The calling service, as its agent asserts it over mTLS; `*` is any caller, an unknown one too.",
        ),
        file_only(
            "to",
            "service name or `*`",
            Value::Example {
                toml: "\"api\"",
                default: "required",
            },
            "The called service.",
        ),
        file_only(
            "methods",
            "array of methods",
            Value::Example {
                toml: "[\"GET\", \"HEAD\"]",
                default: "every method",
            },
            "The methods the rule applies to, in upper case.",
        ),
        file_only(
            "path_prefix",
            "normalised path",
            Value::Example {
                toml: "\"/admin\"",
                default: "every path",
            },
            "The paths (after `/service/<name>`) the rule applies to, by whole segments: `/admin` covers `/admin` and `/admin/x`, not `/administrator`.",
        ),
        file_only(
            "action",
            "`allow` or `deny`",
            Value::Example {
                toml: "\"allow\"",
                default: "required",
            },
            "What the rule does to a request it matches: `deny` answers 403 `forbidden` (gRPC: PERMISSION_DENIED) and writes an audit line (target `skyline::audit`).",
        ),
    ],
};

/// `[[authz.caller]]`.
pub const AUTHZ_CALLER_SECTION: Section = Section {
    table: "authz.caller[]",
    sample: "",
    doc: "A per-service credential: an application that sends `x-skyline-caller-token: <token>` to the outbound proxy is that service. Re-read on SIGHUP.",
    defaults_from: None,
    keys: &[
        file_only(
            "service",
            "service name",
            Value::Example {
                toml: "\"web\"",
                default: "required",
            },
            "The service the token names.",
        ),
        file_only(
            "token_file",
            "path",
            Value::Example {
                toml: "\"/etc/skyline/callers/web.token\"",
                default: "required",
            },
            "A file holding the token (printable ASCII, up to 4096 bytes). Relative to the config file.",
        ),
    ],
};

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

/// `[resilience]` and `[routes.<service>]`: every key optional, over the defaults (or, for a
/// route, over `[resilience]`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResilienceSection {
    connect_timeout: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    attempt_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    /// The largest request body, in bytes [default: none, bodies stream whatever their size].
    /// A larger one is answered `413` with `x-skyline-error: content-too-large`.
    max_request_body: Option<Spanned<u64>>,
    retries: Option<Spanned<u32>>,
    balance: Option<Spanned<String>>,
    outlier: Option<OutlierSection>,
    probe: Option<ProbeSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutlierSection {
    consecutive_failures: Option<u32>,
    base_ejection: Option<Spanned<String>>,
    max_ejection: Option<Spanned<String>>,
    max_ejected_percent: Option<Spanned<u8>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeSection {
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    unhealthy: Option<Spanned<u32>>,
    healthy: Option<Spanned<u32>>,
}

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

/// A config file's path and text, to turn spans into line numbers for errors.
pub(crate) struct Source {
    pub(crate) path: PathBuf,
    pub(crate) text: String,
}

impl Source {
    /// Reads and parses the TOML file at `path` into `T` (every role's file goes through here);
    /// without a file, `T`'s defaults and a source named `<flags>`. A syntax error, an unknown
    /// key or a value of the wrong type names the file, the line and the key.
    pub(crate) fn read<T: serde::de::DeserializeOwned + Default>(
        path: Option<&PathBuf>,
    ) -> Result<(T, Source), ConfigError> {
        let Some(path) = path else {
            let flags = Source {
                path: PathBuf::from("<flags>"),
                text: String::new(),
            };
            return Ok((T::default(), flags));
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.clone(),
            line: None,
            key: None,
            reason: format!("cannot read: {e}"),
        })?;
        let source = Source {
            path: path.clone(),
            text,
        };
        match toml::from_str(&source.text) {
            Ok(parsed) => Ok((parsed, source)),
            Err(e) => {
                let offset = e.span().map(|s| s.start);
                let key = offset.and_then(|o| key_at(&source.text, o));
                Err(source.error(offset, key.as_deref(), e.message().trim()))
            }
        }
    }

    /// An error about `key`, at the line of byte `offset` when known.
    pub(crate) fn at(
        &self,
        offset: Option<usize>,
        key: &str,
        reason: impl Into<String>,
    ) -> ConfigError {
        self.error(offset, Some(key), reason)
    }

    fn error(
        &self,
        offset: Option<usize>,
        key: Option<&str>,
        reason: impl Into<String>,
    ) -> ConfigError {
        let line = offset.map(|o| self.text[..o.min(self.text.len())].matches('\n').count() + 1);
        ConfigError {
            file: self.path.clone(),
            line,
            key: key.map(str::to_owned),
            reason: reason.into(),
        }
    }

    /// Parses an optional spanned string field into `T`.
    fn parse<T: FromStr>(
        &self,
        key: &str,
        field: &Option<Spanned<String>>,
    ) -> Result<Option<T>, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        let Some(field) = field else { return Ok(None) };
        field
            .get_ref()
            .parse()
            .map(Some)
            .map_err(|e| self.error(Some(field.span().start), Some(key), format!("{e}")))
    }
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

/// A path given by a flag (as is) or by the file (relative to it, with its offset for errors).
pub(crate) fn file_path(
    src: &Source,
    flag: Option<PathBuf>,
    field: &Option<Spanned<PathBuf>>,
) -> (Option<PathBuf>, Option<usize>) {
    match (flag, field) {
        (Some(p), _) => (Some(p), None),
        (None, Some(p)) => (
            Some(relative_to(src, p.get_ref().clone())),
            Some(p.span().start),
        ),
        (None, None) => (None, None),
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

/// `base` with the keys `section` gives, each validated; `prefix` names the section in errors.
pub(crate) fn resilience(
    src: &Source,
    base: &Resilience,
    section: &ResilienceSection,
    prefix: &str,
) -> Result<Resilience, ConfigError> {
    let key = |k: &str| format!("{prefix}.{k}");
    let duration = |k: &str, field: &Option<Spanned<String>>, min: Duration| {
        let Some(field) = field else { return Ok(None) };
        let at = Some(field.span().start);
        let d =
            parse_duration_setting(field.get_ref()).map_err(|e| src.error(at, Some(&key(k)), e))?;
        if d < min {
            return Err(src.error(at, Some(&key(k)), format!("must be at least {min:?}")));
        }
        Ok(Some(d))
    };
    let ms = Duration::from_millis(1);
    let mut r = base.clone();
    if let Some(d) = duration("connect_timeout", &section.connect_timeout, ms)? {
        r.connect_timeout = d;
    }
    if let Some(d) = duration("request_timeout", &section.request_timeout, ms)? {
        r.request_timeout = d;
    }
    if let Some(d) = duration("attempt_timeout", &section.attempt_timeout, ms)? {
        r.attempt_timeout = Some(d);
    }
    if let Some(d) = duration("idle_timeout", &section.idle_timeout, ms)? {
        r.idle_timeout = d;
    }
    if let Some(n) = &section.max_request_body {
        r.max_request_body = Some(*n.get_ref());
    }
    if let Some(n) = &section.retries {
        if *n.get_ref() > 10 {
            let at = Some(n.span().start);
            return Err(src.error(at, Some(&key("retries")), "must be at most 10"));
        }
        r.retries = *n.get_ref();
    }
    if let Some(b) = &section.balance {
        r.balance = match b.get_ref().as_str() {
            "p2c" => Balance::P2c,
            "round_robin" => Balance::RoundRobin,
            other => {
                return Err(src.error(
                    Some(b.span().start),
                    Some(&key("balance")),
                    format!("unknown balance {other:?}; expected p2c or round_robin"),
                ));
            }
        };
    }
    if let Some(o) = &section.outlier {
        if let Some(n) = o.consecutive_failures {
            r.outlier.consecutive_failures = n;
        }
        if let Some(d) = duration("outlier.base_ejection", &o.base_ejection, ms)? {
            r.outlier.base_ejection = d;
        }
        if let Some(d) = duration("outlier.max_ejection", &o.max_ejection, ms)? {
            r.outlier.max_ejection = d;
        }
        if let Some(p) = &o.max_ejected_percent {
            if *p.get_ref() > 100 {
                let at = Some(p.span().start);
                let k = key("outlier.max_ejected_percent");
                return Err(src.error(at, Some(&k), "must be at most 100"));
            }
            r.outlier.max_ejected_percent = *p.get_ref();
        }
    }
    if let Some(p) = &section.probe {
        let mut probe = r.probe.clone().unwrap_or_default();
        if let Some(path) = &p.path {
            if !path.get_ref().starts_with('/') || path.get_ref().parse::<http::Uri>().is_err() {
                let at = Some(path.span().start);
                let k = key("probe.path");
                return Err(src.error(at, Some(&k), "must be a path such as \"/health\""));
            }
            probe.path = path.get_ref().clone();
        }
        if let Some(d) = duration("probe.interval", &p.interval, Duration::from_millis(100))? {
            probe.interval = d;
        }
        if let Some(d) = duration("probe.timeout", &p.timeout, ms)? {
            probe.timeout = d;
        }
        for (name, field, slot) in [
            ("probe.unhealthy", &p.unhealthy, &mut probe.unhealthy),
            ("probe.healthy", &p.healthy, &mut probe.healthy),
        ] {
            if let Some(n) = field {
                if *n.get_ref() == 0 {
                    let at = Some(n.span().start);
                    return Err(src.error(at, Some(&key(name)), "must be at least 1"));
                }
                *slot = *n.get_ref();
            }
        }
        r.probe = Some(probe);
    }
    Ok(r)
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

/// A key prefix, ending with `/` (added when missing).
pub(crate) fn etcd_prefix(prefix: &str) -> Result<String, String> {
    if prefix.is_empty() || prefix.chars().any(char::is_control) {
        return Err("must be a non-empty key prefix such as \"skyline/\"".to_owned());
    }
    Ok(if prefix.ends_with('/') {
        prefix.to_owned()
    } else {
        format!("{prefix}/")
    })
}

/// `host:port` or `http://host:port`, as `http://host:port`.
pub(crate) fn etcd_endpoint(text: &str) -> Result<String, String> {
    let url = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    let bad = || format!("{text:?} is not an etcd client URL like http://10.0.0.5:2379");
    let uri: http::Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{text:?}: only http:// etcd endpoints are supported"
        ));
    }
    let authority = uri.authority().ok_or_else(bad)?;
    if authority.port_u16().is_none() || authority.host().is_empty() {
        return Err(bad());
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(bad());
    }
    Ok(format!("http://{authority}"))
}

/// The dotted key at byte `offset` of a TOML text, for the errors the TOML parser reports with a
/// position only (an unknown key, a value of the wrong type): the table header above it and the
/// keys that lead to `offset` on its line (`outlier = { max_ejection = 5 }` under `[resilience]`
/// is `resilience.outlier.max_ejection`).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let lines: Vec<&str> = before.split('\n').collect();
    let current = lines.len() - 1;
    let header_of = |line: &str| {
        let line = line.trim();
        line.starts_with('[').then(|| {
            let end = line.rfind(']').unwrap_or(line.len());
            line[..end].trim_matches(['[', ']']).trim().replace('"', "")
        })
    };
    let line_start = offset - lines[current].len();
    if header_of(lines[current]).is_some() {
        // The error is in a table header: the whole header names the table.
        return text[line_start..].lines().next().and_then(header_of);
    }
    // An unknown key's position is the key itself: the key to scan through.
    let rest = &text[offset..];
    let key_len = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(rest.len());
    let key_here = if rest[key_len..].trim_start().starts_with('=') {
        &rest[..key_len]
    } else {
        ""
    };
    // The line that holds the key: this one when the position is at or after a key, otherwise
    // the one an array that continues here began on.
    let starts_here = lines[current].contains('=') || !key_here.is_empty();
    let key_line = if starts_here {
        current
    } else {
        let i = (0..current)
            .rev()
            .find(|&i| lines[i].contains('=') || header_of(lines[i]).is_some())?;
        if header_of(lines[i]).is_some() {
            return header_of(lines[i]);
        }
        i
    };
    let mut keys: Vec<String> = Vec::new();
    let mut depth: usize = 0;
    let mut token = String::new();
    let mut in_string = None;
    let scanned = if key_line == current {
        format!("{}{key_here}=", lines[current])
    } else {
        lines[key_line].to_owned()
    };
    for c in scanned.chars() {
        match (in_string, c) {
            (Some(q), c) if c == q => in_string = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => in_string = Some(c),
            (None, '{') => depth += 1,
            (None, '}') => {
                depth = usize::saturating_sub(depth, 1);
                keys.truncate(depth);
            }
            (None, '=') => {
                let key = token.trim().replace('"', "");
                if !key.is_empty() {
                    keys.truncate(depth);
                    keys.push(key);
                }
                token.clear();
            }
            (None, ',' | '[' | ']') => token.clear(),
            (None, c) => token.push(c),
        }
    }
    let header = lines[..key_line].iter().rev().find_map(|l| header_of(l));
    let key = keys.join(".");
    match header {
        _ if key.is_empty() => None,
        Some(h) => Some(format!("{h}.{key}")),
        None => Some(key),
    }
}

/// A path in the config file is relative to the file's folder.
fn relative_to(src: &Source, path: PathBuf) -> PathBuf {
    match src.path.parent() {
        Some(dir) if path.is_relative() && src.path != Path::new("<flags>") => dir.join(path),
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn peers_get_http1_by_default_h2_from_the_file_the_flag_wins_and_a_bad_value_names_its_key() {
        use crate::proxy::h2::PeerProtocol;
        let resolved = AgentArgs::default().resolve().unwrap();
        assert_eq!(resolved.peer_protocol, PeerProtocol::Http1);
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
