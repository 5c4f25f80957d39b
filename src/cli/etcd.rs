//! `skyline services`, `register` and `deregister` with `--catalog etcd`: the same commands,
//! reading and writing the keys that agents write (see `catalog::etcd`).
//!
//! An instance registered here lives on a node that an agent registered: it is bound to the
//! node key's lease, so it vanishes with the node (agent stopped, or dead for a lease TTL), as
//! the node's own services do. A node no agent registered can be created with `--node-address`;
//! it then has no lease and stays until deregistered. Checks are run by agents only: declare a
//! service with a check in its agent's `[[service]]`.

use crate::agent::config::CatalogKind;
use crate::catalog::Health;
use crate::catalog::etcd::client::{self, Client};
use crate::catalog::etcd::{
    Catalog, DEFAULT_ENDPOINT, DEFAULT_PREFIX, EtcdError, InstanceValue, Key, Keys, NodeValue,
};
use crate::config::{etcd_endpoint, etcd_prefix};

use super::{CliError, DeregisterArgs, RegisterArgs};

/// Where the catalog is: the registry at `--registry` (default) or etcd.
#[derive(clap::Args, Clone, Debug)]
pub struct EtcdArgs {
    /// The catalog to use: embedded or consul (the registry at --registry), or etcd
    /// [default: embedded]
    #[arg(long, env = "SKYLINE_CATALOG", value_name = "SOURCE")]
    pub catalog: Option<CatalogKind>,

    /// etcd members' client URLs, comma-separated, with --catalog etcd
    /// [default: http://127.0.0.1:2379]
    #[arg(
        long,
        env = "SKYLINE_ETCD_ENDPOINTS",
        value_name = "URL,...",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,

    /// The key prefix of the catalog in etcd, with --catalog etcd [default: skyline/]
    #[arg(long, env = "SKYLINE_ETCD_PREFIX", value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,
}

impl EtcdArgs {
    /// Whether the command goes to etcd.
    pub fn is_etcd(&self) -> bool {
        self.catalog == Some(CatalogKind::Etcd)
    }

    /// A client and the key layout, from the validated flags.
    pub(crate) fn open(&self) -> Result<(Client, Keys), CliError> {
        let endpoints = if self.etcd_endpoints.is_empty() {
            vec![DEFAULT_ENDPOINT.to_owned()]
        } else {
            self.etcd_endpoints
                .iter()
                .map(|e| etcd_endpoint(e).map_err(|r| usage("--etcd-endpoints", r)))
                .collect::<Result<_, _>>()?
        };
        let prefix = etcd_prefix(self.etcd_prefix.as_deref().unwrap_or(DEFAULT_PREFIX))
            .map_err(|r| usage("--etcd-prefix", r))?;
        Ok((Client::new(&endpoints)?, Keys::new(&prefix)))
    }
}

fn usage(flag: &str, reason: impl std::fmt::Display) -> CliError {
    CliError::Usage(format!("{flag}: {reason}"))
}

/// The rows of `skyline services`: every routable instance (its node registered) in etcd.
pub async fn services(args: &EtcdArgs) -> Result<Vec<serde_json::Value>, CliError> {
    let (mut client, keys) = args.open()?;
    let answer = client.range(keys.prefix(), true).await?;
    let mut catalog = Catalog::default();
    for kv in &answer.kvs {
        catalog.put(&keys, &kv.key, &kv.value);
    }
    let snapshot = catalog.snapshot();
    Ok(snapshot
        .services
        .iter()
        .flat_map(|(name, instances)| {
            instances.iter().map(move |i| {
                serde_json::json!({
                    "service": name.as_str(), "id": i.id, "node": i.node.as_str(),
                    "address": std::net::SocketAddr::new(i.address, i.port).to_string(),
                    "health": i.health.as_str(),
                })
            })
        })
        .collect())
}

/// Writes the instance of `skyline register --catalog etcd`; its id.
pub async fn register(args: &RegisterArgs) -> Result<String, CliError> {
    let Some(node) = args.node.as_deref() else {
        return Err(usage(
            "--node",
            "required with --catalog etcd: the node the instance runs on",
        ));
    };
    if args.http.is_some() || args.ttl.is_some() {
        return Err(CliError::Usage(
            "--http and --ttl: with --catalog etcd checks are run by the agent of the node; \
             declare the service with its check in the agent's [[service]]"
                .to_owned(),
        ));
    }
    let (mut client, keys) = args.etcd.open()?;
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("{}-{node}-{}", args.name, args.port));
    let node_key = keys.node(node);
    let instance_key = keys.instance(&args.name, &id);
    // The node's lease (and the revision its key was read at) or, if the node is not
    // registered, a node key to write with the instance.
    let existing = client.range(&node_key, false).await?;
    let (lease, revision, node_value) = match existing.kvs.first() {
        Some(kv) => {
            let value: NodeValue = serde_json::from_slice(&kv.value).map_err(|e| {
                CliError::Usage(format!("node {node} has an unreadable value in etcd: {e}"))
            })?;
            (kv.lease, kv.mod_revision, value)
        }
        None => {
            let Some(address) = args.node_address else {
                return Err(CliError::Usage(format!(
                    "node {node} is not registered in etcd (no agent runs there); give \
                     --node-address to create it"
                )));
            };
            let value = NodeValue {
                address,
                inbound_port: args.inbound_port,
                meta: Default::default(),
            };
            (0, 0, value)
        }
    };
    let instance = InstanceValue {
        node: node.to_owned(),
        address: args.address,
        port: args.port,
        tags: args.tag.clone(),
        meta: args.meta.iter().cloned().collect(),
        health: Health::Passing,
        weight: 1,
    };
    let encode = |key: &str, value: serde_json::Result<Vec<u8>>| {
        value.map_err(|source| EtcdError::Encode {
            key: key.to_owned(),
            source,
        })
    };
    let mut ops = vec![client::put(
        &instance_key,
        encode(&instance_key, serde_json::to_vec(&instance))?,
        lease,
    )];
    if revision == 0 {
        ops.push(client::put(
            &node_key,
            encode(&node_key, serde_json::to_vec(&node_value))?,
            0,
        ));
    }
    // Only if the node key is still as read: not bound to a lease revoked meanwhile.
    let done = client
        .txn(client::txn_if_unchanged(&node_key, revision, ops))
        .await?;
    if !done.succeeded {
        return Err(CliError::Usage(format!(
            "node {node} changed in etcd while registering; try again"
        )));
    }
    Ok(id)
}

/// Deletes the instance of `skyline deregister --catalog etcd` (every service's instance of
/// that id, on `--node` only if given); an error if there is none.
pub async fn deregister(args: &DeregisterArgs) -> Result<(), CliError> {
    let (mut client, keys) = args.etcd.open()?;
    let all = client.range(keys.prefix(), true).await?;
    let mut ops = Vec::new();
    for kv in &all.kvs {
        let Some(Key::Instance(_, id)) = keys.parse(&kv.key) else {
            continue;
        };
        if id != args.id {
            continue;
        }
        if let Some(node) = &args.node {
            let on = serde_json::from_slice::<InstanceValue>(&kv.value).map(|v| v.node);
            if on.ok().as_ref() != Some(node) {
                continue;
            }
        }
        ops.push(client::delete(&String::from_utf8_lossy(&kv.key)));
    }
    if ops.is_empty() {
        return Err(CliError::Usage(format!(
            "no instance {} in etcd under {}",
            args.id,
            keys.prefix()
        )));
    }
    client.txn(client::txn(ops)).await?;
    Ok(())
}
