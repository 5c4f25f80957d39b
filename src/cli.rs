//! Operator commands against a registry (ours or Consul), or etcd with `--catalog etcd`
//! (see [`etcd`]): `skyline services`, `skyline register`, `skyline deregister`; [`kubernetes`] is
//! `skyline k8s services`; [`explain`] asks an agent why a request would go where it goes.

pub mod ca;
pub mod config;
pub mod etcd;
pub mod explain;
pub mod kubernetes;
pub mod migrate;
pub mod prometheus;
pub mod routes;
pub mod status;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use crate::catalog::{DEFAULT_INBOUND_PORT, Health, ServiceName};
use crate::config::DEFAULT_REGISTRY;
use crate::registry::INBOUND_PORT_META;
use crate::registry::client::{ClientError, RegistryClient};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Registry(#[from] ClientError),
    #[error(transparent)]
    Etcd(#[from] crate::catalog::etcd::EtcdError),
    #[error("the registry's answer is not what Consul's API returns: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("{0}")]
    Usage(String),
}

/// List services, their instances and health.
#[derive(clap::Args, Clone, Debug)]
pub struct ServicesArgs {
    /// The registry (or Consul agent) to ask (with --catalog registry)
    #[arg(long, env = "SKYLINE_REGISTRY", value_name = "ADDR", default_value_t = DEFAULT_REGISTRY)]
    pub registry: SocketAddr,

    #[command(flatten)]
    pub etcd: etcd::EtcdArgs,

    /// Print JSON (one object per instance) instead of a table
    #[arg(long)]
    pub json: bool,
}

/// Register a service instance.
#[derive(clap::Args, Clone, Debug)]
pub struct RegisterArgs {
    /// The registry (or Consul agent) to write to (with --catalog registry)
    #[arg(long, env = "SKYLINE_REGISTRY", value_name = "ADDR", default_value_t = DEFAULT_REGISTRY)]
    pub registry: SocketAddr,

    #[command(flatten)]
    pub etcd: etcd::EtcdArgs,

    /// Service name
    #[arg(long)]
    pub name: ServiceName,

    /// Port the instance listens on
    #[arg(long)]
    pub port: u16,

    /// Address the instance listens on [default: the node's address]
    #[arg(long, value_name = "IP")]
    pub address: Option<IpAddr>,

    /// Instance id [default: <name>-<node or "local">-<port>]
    #[arg(long)]
    pub id: Option<String>,

    /// The node the instance runs on [default: the registry's own node; required with
    /// --catalog etcd]
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,

    /// The node's address (with --node; with --catalog etcd only to create a node no agent
    /// registered)
    #[arg(long, value_name = "IP")]
    pub node_address: Option<IpAddr>,

    /// The node's inbound proxy port (with --node)
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_INBOUND_PORT)]
    pub inbound_port: u16,

    /// Metadata, such as platform=mesos (repeatable)
    #[arg(long, value_name = "KEY=VALUE", value_parser = key_value)]
    pub meta: Vec<(String, String)>,

    /// Tag (repeatable)
    #[arg(long)]
    pub tag: Vec<String>,

    /// An HTTP check the registry runs: GET this path on the instance every --interval
    #[arg(long, value_name = "PATH", conflicts_with = "ttl")]
    pub http: Option<String>,

    /// How often the registry runs the --http check, such as 1s
    #[arg(long, value_name = "DURATION", default_value = "5s", requires = "http")]
    pub interval: String,

    /// How long one --http check may take before it fails, such as 500ms
    #[arg(long, value_name = "DURATION", default_value = "2s", requires = "http")]
    pub timeout: String,

    /// Deregister the instance once its check has been critical this long, such as 1m
    /// (Consul's DeregisterCriticalServiceAfter) [default: never]
    #[arg(long, value_name = "DURATION")]
    pub deregister_after: Option<String>,

    /// A TTL check (such as 30s) that something must keep passing; starts passing
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,
}

/// Remove a service instance.
#[derive(clap::Args, Clone, Debug)]
pub struct DeregisterArgs {
    /// The registry (or Consul agent) to write to (with --catalog registry)
    #[arg(long, env = "SKYLINE_REGISTRY", value_name = "ADDR", default_value_t = DEFAULT_REGISTRY)]
    pub registry: SocketAddr,

    #[command(flatten)]
    pub etcd: etcd::EtcdArgs,

    /// The instance id
    pub id: String,

    /// The node the instance was registered on [default: the registry's own node]
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

// The parts of Consul's /v1/health/service answer the table shows.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: NodeJson,
    service: ServiceJson,
    #[serde(default)]
    checks: Vec<CheckJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeJson {
    node: String,
    address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceJson {
    #[serde(rename = "ID")]
    id: String,
    #[serde(default)]
    address: String,
    port: u16,
    /// Consul sends `null` for an instance registered without meta.
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckJson {
    status: Health,
}

/// Every service of the catalog, by name, with its instances (`/v1/health/service/<name>`, all
/// of them, whatever their health).
async fn catalog(client: &RegistryClient) -> Result<BTreeMap<String, Vec<HealthEntry>>, CliError> {
    let names: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&client.get("/v1/catalog/services").await?)?;
    let mut services = BTreeMap::new();
    for name in names.into_keys() {
        let entries: Vec<HealthEntry> =
            serde_json::from_slice(&client.get(&format!("/v1/health/service/{name}")).await?)?;
        services.insert(name, entries);
    }
    Ok(services)
}

/// `skyline services`: every instance with its node, address and health (worst check).
pub async fn services(args: ServicesArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if args.etcd.is_etcd() {
        let rows = etcd::services(&args.etcd).await?;
        return print_services(rows, args.json, out);
    }
    let client = RegistryClient::from_env(args.registry);
    let mut rows = Vec::new();
    for (name, entries) in catalog(&client).await? {
        for e in entries {
            let health = e
                .checks
                .iter()
                .map(|c| c.status)
                .max()
                .unwrap_or(Health::Passing);
            let address = if e.service.address.is_empty() {
                e.node.address
            } else {
                e.service.address
            };
            rows.push(serde_json::json!({
                "service": name, "id": e.service.id, "node": e.node.node,
                "address": format!("{address}:{}", e.service.port), "health": health.as_str(),
            }));
        }
    }
    print_services(rows, args.json, out)
}

/// Prints the rows of `skyline services`: a JSON array, or a table.
fn print_services(
    rows: Vec<serde_json::Value>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if json {
        let _ = writeln!(out, "{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    let columns = ["service", "id", "node", "address", "health"];
    let cell = |row: &serde_json::Value, c: &str| row[c].as_str().unwrap_or("").to_owned();
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r, c).len())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let _ = writeln!(
        out,
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for row in &rows {
        let _ = writeln!(
            out,
            "{}",
            line(columns.iter().map(|c| cell(row, c)).collect())
        );
    }
    Ok(())
}

/// `skyline register`.
pub async fn register(args: RegisterArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if args.etcd.is_etcd() {
        let id = etcd::register(&args).await?;
        let _ = writeln!(out, "registered {id}");
        return Ok(());
    }
    if args.node.is_some() && args.node_address.is_none() {
        return Err(CliError::Usage(
            "--node needs --node-address (the node's address)".to_owned(),
        ));
    }
    let client = RegistryClient::from_env(args.registry);
    let node_label = args.node.as_deref().unwrap_or("local");
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{node_label}-{}", args.name, args.port));
    let address = args.address.or(args.node_address);
    let target = address.map_or_else(
        || format!("127.0.0.1:{}", args.port),
        |a| SocketAddr::new(a, args.port).to_string(),
    );
    let mut check = match (&args.http, &args.ttl) {
        (Some(path), _) if !path.starts_with('/') => {
            return Err(CliError::Usage(format!(
                "--http {path:?} must be a path starting with /"
            )));
        }
        (Some(path), _) => {
            let (interval, timeout) = (
                duration_arg("--interval", &args.interval)?,
                duration_arg("--timeout", &args.timeout)?,
            );
            serde_json::json!({ "HTTP": format!("http://{target}{path}"), "Interval": interval, "Timeout": timeout })
        }
        (None, Some(ttl)) => serde_json::json!({ "TTL": ttl, "Status": "passing" }),
        (None, None) => serde_json::Value::Null,
    };
    if let Some(after) = &args.deregister_after {
        let after = duration_arg("--deregister-after", after)?;
        match check.as_object_mut() {
            Some(c) => {
                c.insert("DeregisterCriticalServiceAfter".into(), after.into());
            }
            None => {
                return Err(CliError::Usage(
                    "--deregister-after needs a check (--http or --ttl)".into(),
                ));
            }
        }
    }
    let meta: BTreeMap<String, String> = args.meta.iter().cloned().collect();
    match (&args.node, args.node_address) {
        (Some(node), Some(node_address)) => {
            if let Some(c) = check.as_object_mut() {
                let status = c.remove("Status");
                check = serde_json::json!({
                    "CheckID": format!("{id}-check"), "ServiceID": id,
                    "Status": status.unwrap_or_else(|| "passing".into()), "Definition": c,
                });
            }
            let body = serde_json::json!({
                "Node": node, "Address": node_address.to_string(),
                "NodeMeta": { INBOUND_PORT_META: args.inbound_port.to_string() },
                "Service": { "ID": id, "Service": args.name.as_str(), "Address": address.map(|a| a.to_string()),
                             "Port": args.port, "Tags": args.tag, "Meta": meta },
                "Check": check,
            });
            client.put_json("/v1/catalog/register", &body).await?;
        }
        _ => {
            let body = serde_json::json!({
                "ID": id, "Name": args.name.as_str(), "Address": address.map(|a| a.to_string()),
                "Port": args.port, "Tags": args.tag, "Meta": meta, "Check": check,
            });
            client.put_json("/v1/agent/service/register", &body).await?;
        }
    }
    let _ = writeln!(out, "registered {id}");
    Ok(())
}

/// `skyline deregister`.
pub async fn deregister(args: DeregisterArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if args.etcd.is_etcd() {
        etcd::deregister(&args).await?;
        let _ = writeln!(out, "deregistered {}", args.id);
        return Ok(());
    }
    let client = RegistryClient::from_env(args.registry);
    match &args.node {
        Some(node) => {
            let body = serde_json::json!({ "Node": node, "ServiceID": args.id });
            client.put_json("/v1/catalog/deregister", &body).await?
        }
        None => {
            let path = format!("/v1/agent/service/deregister/{}", args.id);
            client.put_json(&path, &serde_json::Value::Null).await?
        }
    };
    let _ = writeln!(out, "deregistered {}", args.id);
    Ok(())
}

/// A duration flag as the registry takes it (Go syntax, such as 500ms or 1m), checked here so a
/// typo is a usage error rather than a registry's 400.
fn duration_arg(flag: &str, value: &str) -> Result<String, CliError> {
    match crate::config::parse_duration(value) {
        Ok(d) if !d.is_zero() => Ok(value.to_owned()),
        _ => Err(CliError::Usage(format!(
            "{flag} {value:?} is not a duration like 5s"
        ))),
    }
}
