//! Registration in etcd: one node's key and its instances' keys, bound to one lease that the
//! registering agent keeps alive.
//!
//! The lease (TTL [`DEFAULT_TTL`]) is refreshed every TTL/3. If the agent dies the refreshes stop,
//! the lease expires and etcd deletes every key bound to it: the node's instances vanish from
//! every agent's catalog after at most the TTL. A graceful [`Registration::shutdown`] revokes the
//! lease, so they vanish at once. If the lease is lost while the agent lives (a partition longer
//! than the TTL), a new lease is granted and every key written again.
//!
//! The set of instances can change while the registration runs ([`Registration::set_instances`]):
//! the keys of instances no longer declared are deleted, new and changed ones written.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{self, Client};
use super::{Backoff, DEFAULT_PREFIX, EtcdError, InstanceValue, Keys, NodeValue};
use crate::catalog::{Health, Instance, Node};

/// The lease TTL when none is configured.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// etcd refuses more operations than this in one transaction (`--max-txn-ops`).
const TXN_OPS: usize = 128;

/// What to register: a node, its instances, and the lease they are bound to.
#[derive(Clone, Debug)]
pub struct EtcdRegistrar {
    /// Client URLs of the cluster's members.
    pub endpoints: Vec<String>,
    /// The key prefix, ending with `/`; default `skyline/`.
    pub prefix: String,
    /// The lease TTL; default 10 s. etcd rounds it up to its minimum (about 2 s by default).
    pub ttl: Duration,
    pub node: Node,
    /// The node's instances; their `node` field is taken from [`EtcdRegistrar::node`].
    pub instances: Vec<Instance>,
    /// Keys of instances no longer registered that may still be in etcd.
    stale: BTreeSet<String>,
}

/// A running registration.
pub struct Registration {
    commands: mpsc::UnboundedSender<Command>,
    lease: watch::Receiver<Lease>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The registration's state, as seen from outside.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    /// The lease the keys are bound to, while it is known to be alive.
    pub id: Option<i64>,
    /// How many leases were granted so far (more than one: the lease was lost and re-granted).
    pub grants: u64,
    /// The last error, cleared when the lease is alive again.
    pub error: Option<String>,
}

#[derive(Debug)]
enum Command {
    Health(String, Health),
    Instances(Vec<Instance>),
}

// === impl EtcdRegistrar ===

impl EtcdRegistrar {
    pub fn new(endpoints: Vec<String>, node: Node) -> Self {
        Self {
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
            ttl: DEFAULT_TTL,
            node,
            instances: Vec::new(),
            stale: BTreeSet::new(),
        }
    }

    pub fn instance(mut self, instance: Instance) -> Self {
        self.instances.push(instance);
        self
    }

    /// Starts registering and keeping the lease alive, until [`Registration::shutdown`].
    pub fn spawn(self) -> Registration {
        let (commands, rx) = mpsc::unbounded_channel();
        let (state, lease) = watch::channel(Lease::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(self.run(rx, state, stop.clone()));
        Registration {
            commands,
            lease,
            stop,
            task,
        }
    }

    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        state: watch::Sender<Lease>,
        stop: CancellationToken,
    ) {
        let keys = Keys::new(&self.prefix);
        let mut client = match Client::new(&self.endpoints) {
            Ok(client) => client,
            Err(error) => {
                let error = crate::error_chain(&error);
                tracing::error!(%error, "etcd registration not started");
                state.send_modify(|s| s.error = Some(error));
                return;
            }
        };
        let mut lease: Option<i64> = None;
        let mut backoff = Backoff::new(super::BACKOFF_START, super::BACKOFF_MAX);
        loop {
            let mut alive = false;
            let result = tokio::select! {
                () = stop.cancelled() => break,
                r = self.session(&mut client, &keys, &mut lease, &mut commands, &state, &mut alive) => r,
            };
            let Err(error) = result;
            let error = crate::error_chain(&error);
            tracing::warn!(%error, lease = ?lease, node = %self.node.name, "etcd registration interrupted");
            state.send_modify(|s| {
                s.id = lease;
                s.error = Some(error);
            });
            if alive {
                // The member the lease was kept alive through failed: go on from the next one.
                client.next_member();
                backoff.reset();
            }
            let delay = if alive {
                Duration::ZERO
            } else {
                backoff.delay()
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        if let Some(id) = lease {
            match client.lease_revoke(id).await {
                Ok(_) => tracing::info!(lease = id, node = %self.node.name, "etcd lease revoked"),
                Err(error) => {
                    tracing::warn!(error = %crate::error_chain(&error), lease = id, "cannot revoke the etcd lease; it expires after its TTL")
                }
            }
        }
        state.send_modify(|s| s.id = None);
    }

    /// Keeps (or grants) the lease, writes every key, then keeps the lease alive and applies
    /// health changes until something fails. `alive` tells whether the lease was refreshed.
    async fn session(
        &mut self,
        client: &mut Client,
        keys: &Keys,
        lease: &mut Option<i64>,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        state: &watch::Sender<Lease>,
        alive: &mut bool,
    ) -> Result<Infallible, EtcdError> {
        // Streams only on a member that answers and has a leader.
        client.pick().await?;
        let ttl_secs = i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut keeper = loop {
            let id = match *lease {
                Some(id) => id,
                None => {
                    let id = client.lease_grant(ttl_secs).await?;
                    *lease = Some(id);
                    state.send_modify(|s| s.grants += 1);
                    tracing::info!(lease = id, ttl = ttl_secs, node = %self.node.name, "etcd lease granted");
                    id
                }
            };
            match client.lease_keep_alive(id).await {
                Ok(keeper) => break keeper,
                // The lease expired or was revoked meanwhile: grant a new one.
                Err(EtcdError::LeaseLost { .. }) => {
                    tracing::warn!(lease = id, "etcd lease lost; granting a new one");
                    *lease = None;
                }
                Err(e) => return Err(e),
            }
        };
        let id = keeper.id();
        self.put_all(keys, id, client).await?;
        delete_all(client, &mut self.stale).await?;
        *alive = true;
        state.send_modify(|s| {
            s.id = Some(id);
            s.error = None;
        });

        let period = (self.ttl / 3).max(Duration::from_millis(200));
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ack = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if last_ack.elapsed() > self.ttl {
                        // No answer for a whole TTL: the lease may be gone; check in a new session.
                        return Err(EtcdError::Timeout { call: "lease keep-alive" });
                    }
                    keeper.keep_alive()?;
                }
                ack = keeper.message() => {
                    let ack = ack?.ok_or(EtcdError::LeaseLost { lease: id })?;
                    if ack.ttl <= 0 {
                        *lease = None;
                        return Err(EtcdError::LeaseLost { lease: id });
                    }
                    last_ack = Instant::now();
                }
                command = commands.recv() => match command {
                    Some(Command::Health(instance, health)) => {
                        let Some(i) = self.instances.iter_mut().find(|i| i.id == instance) else {
                            tracing::warn!(%instance, "health change for an instance not registered here");
                            continue;
                        };
                        i.health = health;
                        let i = i.clone();
                        let (key, value) = self.instance_kv(keys, &i)?;
                        client.put(&key, value, id).await?;
                    }
                    Some(Command::Instances(instances)) => {
                        let mut ops = Vec::new();
                        let kept: BTreeSet<String> =
                            instances.iter().map(|i| keys.instance(&i.service, &i.id)).collect();
                        for old in &self.instances {
                            let key = keys.instance(&old.service, &old.id);
                            if !kept.contains(&key) {
                                self.stale.insert(key);
                            }
                        }
                        for i in &instances {
                            if !self.instances.contains(i) {
                                let (key, value) = self.instance_kv(keys, i)?;
                                self.stale.remove(&key);
                                ops.push(client::put(&key, value, id));
                            }
                        }
                        self.instances = instances;
                        for chunk in ops.chunks(TXN_OPS) {
                            client.txn(client::txn(chunk.to_vec())).await?;
                        }
                        delete_all(client, &mut self.stale).await?;
                        tracing::info!(node = %self.node.name, instances = self.instances.len(), "etcd registration updated");
                    }
                    // Every handle is gone; keep the lease until stopped.
                    None => std::future::pending().await,
                },
            }
        }
    }

    fn instance_kv(&self, keys: &Keys, i: &Instance) -> Result<(String, Vec<u8>), EtcdError> {
        let key = keys.instance(&i.service, &i.id);
        let value =
            serde_json::to_vec(&InstanceValue::of(i, &self.node.name)).map_err(|source| {
                EtcdError::Encode {
                    key: key.clone(),
                    source,
                }
            })?;
        Ok((key, value))
    }

    /// Writes the node and every instance with the lease, at most [`TXN_OPS`] per transaction.
    async fn put_all(&self, keys: &Keys, lease: i64, client: &mut Client) -> Result<(), EtcdError> {
        let node_key = keys.node(&self.node.name);
        let node_value =
            serde_json::to_vec(&NodeValue::of(&self.node)).map_err(|source| EtcdError::Encode {
                key: node_key.clone(),
                source,
            })?;
        let mut entries: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        entries.insert(node_key, node_value);
        for i in &self.instances {
            let (key, value) = self.instance_kv(keys, i)?;
            entries.insert(key, value);
        }
        let entries: Vec<_> = entries.into_iter().collect();
        for chunk in entries.chunks(TXN_OPS) {
            let ops = chunk
                .iter()
                .map(|(k, v)| client::put(k, v.clone(), lease))
                .collect();
            client.txn(client::txn(ops)).await?;
        }
        Ok(())
    }
}

/// Deletes the keys in `stale`, at most [`TXN_OPS`] per transaction, forgetting each deleted.
async fn delete_all(client: &mut Client, stale: &mut BTreeSet<String>) -> Result<(), EtcdError> {
    while !stale.is_empty() {
        let chunk: Vec<String> = stale.iter().take(TXN_OPS).cloned().collect();
        let ops = chunk.iter().map(|k| client::delete(k)).collect();
        client.txn(client::txn(ops)).await?;
        for key in chunk {
            stale.remove(&key);
        }
    }
    Ok(())
}

// === impl Registration ===

impl Registration {
    /// The lease state; changes when the lease is granted, lost or revoked.
    pub fn subscribe(&self) -> watch::Receiver<Lease> {
        self.lease.clone()
    }

    /// The lease the keys are bound to now, if it is alive.
    pub fn lease(&self) -> Option<i64> {
        self.lease.borrow().id
    }

    /// Waits until every key is written with a live lease; the last error if `limit` passes.
    pub async fn registered(&self, limit: Duration) -> Result<i64, String> {
        let mut rx = self.lease.clone();
        match tokio::time::timeout(limit, rx.wait_for(|s| s.id.is_some() && s.error.is_none()))
            .await
        {
            Ok(Ok(s)) => s.id.ok_or_else(String::new),
            Ok(Err(_)) => Err("the registration stopped".to_owned()),
            Err(_) => Err(self
                .lease
                .borrow()
                .error
                .clone()
                .unwrap_or_else(|| "not registered in time".to_owned())),
        }
    }

    /// Changes an instance's health in etcd (and in what is written again after a lost lease).
    pub fn set_health(&self, instance: &str, health: Health) {
        let _ = self
            .commands
            .send(Command::Health(instance.to_owned(), health));
    }

    /// Replaces the registered instances: keys of the ones left out are deleted, new and changed
    /// ones written (their `health` as given).
    pub fn set_instances(&self, instances: Vec<Instance>) {
        let _ = self.commands.send(Command::Instances(instances));
    }

    /// Revokes the lease, so every key of this node vanishes at once, and waits for the task.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(error) = self.task.await {
            tracing::error!(%error, "etcd registration task failed");
        }
    }

    /// Stops refreshing the lease without revoking it, as a crashed agent would: the keys vanish
    /// when the lease expires.
    pub fn abandon(self) {
        self.task.abort();
    }
}
