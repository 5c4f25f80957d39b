//! Registration with `--catalog etcd`: the agent writes its node and its declared services under
//! its own lease ([`EtcdRegistrar`]), runs their checks itself (etcd runs none) and writes each
//! health change, and revokes the lease on graceful shutdown so its instances vanish at once.
//!
//! Checks: `ttl` is the agent's probe of the instance's port every `ttl / 3` (passing if it
//! accepts a connection), as with a registry; `http` is a `GET` at its interval, with the
//! registry's rules (2xx passing, 429 warning, anything else critical), over h2c for an instance
//! declared as speaking only h2c (meta `protocol = "h2c"` or tag `h2c`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Check, Declared, NodeEntry, PROBE_TIMEOUT};
use crate::catalog::etcd::register::{EtcdRegistrar, Registration};
use crate::catalog::{Health, Instance, Node};
use crate::registry::checks::{Target, probe_client, probe_once};

/// Where to register: the cluster, the key prefix and the lease TTL.
#[derive(Clone, Debug)]
pub struct EtcdTarget {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ttl: Duration,
}

/// One declared service and the state of its check.
struct Checked {
    declared: Declared,
    target: Target,
    every: Duration,
    timeout: Duration,
    next: Instant,
    health: Health,
}

/// Registers the node and `declared` services in etcd and keeps them (and their health) there
/// until `shutdown`, then revokes the lease. A change of `declared` (SIGHUP) adds and removes
/// services without touching the others.
pub async fn run(
    target: EtcdTarget,
    node: NodeEntry,
    mut declared: watch::Receiver<Vec<Declared>>,
    shutdown: CancellationToken,
) {
    let http = probe_client();
    let mut checked = checked(&node, declared.borrow_and_update().clone(), Vec::new());
    // The first round of checks before the first write: instances start with their real health.
    run_due(&http, &mut checked, Instant::now()).await;
    let mut registrar = EtcdRegistrar::new(
        target.endpoints,
        Node {
            name: node.name.as_str().into(),
            address: node.address,
            inbound_port: node.inbound_port,
            meta: Default::default(),
        },
    );
    registrar.prefix = target.prefix;
    registrar.ttl = target.ttl;
    registrar.instances = instances(&node, &checked);
    let registration = registrar.spawn();
    tracing::info!(node = %node.name, services = checked.len(), "registering in etcd");
    let mut open = true;
    loop {
        let next = checked.iter().map(|c| c.next).min();
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = sleep_until(next) => {
                let changes = run_due(&http, &mut checked, Instant::now()).await;
                for (id, health) in changes {
                    registration.set_health(&id, health);
                }
            }
            changed = declared.changed(), if open => {
                if changed.is_err() {
                    open = false;
                    continue;
                }
                let fresh = declared.borrow_and_update().clone();
                let before = checked.len();
                checked = self::checked(&node, fresh, checked);
                run_due(&http, &mut checked, Instant::now()).await;
                registration.set_instances(instances(&node, &checked));
                tracing::info!(before, after = checked.len(), "declared services changed");
            }
        }
    }
    shutdown_registration(registration).await;
}

/// Revokes the lease (the node and its instances vanish at once).
async fn shutdown_registration(registration: Registration) {
    // Bounded: a graceful stop must not hang on an unreachable etcd; the lease then expires.
    if tokio::time::timeout(Duration::from_secs(5), registration.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("etcd lease not revoked in time; the node's instances expire with it");
    }
}

/// The checks of `declared`, keeping the state of those in `previous` whose declaration did not
/// change (a new or changed one is checked at once).
fn checked(node: &NodeEntry, declared: Vec<Declared>, previous: Vec<Checked>) -> Vec<Checked> {
    let mut previous: BTreeMap<String, Checked> = previous
        .into_iter()
        .map(|c| (c.declared.id.clone(), c))
        .collect();
    declared
        .into_iter()
        .map(|d| match previous.remove(&d.id) {
            Some(kept) if kept.declared == d => kept,
            _ => {
                let addr = SocketAddr::new(d.address.unwrap_or(node.address), d.port);
                let (target, every, timeout) = match &d.check {
                    Check::Ttl(ttl) => (
                        Target::Tcp(addr.to_string()),
                        (*ttl / 3).max(Duration::from_millis(100)),
                        PROBE_TIMEOUT,
                    ),
                    Check::Http {
                        path,
                        interval,
                        timeout,
                    } => (
                        // An instance that speaks only h2c is checked over h2c.
                        match crate::routing::declared_protocol(
                            d.meta.get("protocol").map(String::as_str),
                            d.tags.iter().map(String::as_str),
                        ) {
                            crate::routing::Protocol::H2c => {
                                Target::H2c(format!("http://{addr}{path}"))
                            }
                            _ => Target::Http(format!("http://{addr}{path}")),
                        },
                        *interval,
                        *timeout,
                    ),
                };
                Checked {
                    declared: d,
                    target,
                    every,
                    timeout,
                    next: Instant::now(),
                    // As a registry does: critical until a check passes.
                    health: Health::Critical,
                }
            }
        })
        .collect()
}

/// Runs every check that is due, concurrently; the instances whose health changed.
async fn run_due(
    http: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<bytes::Bytes>,
    >,
    checked: &mut [Checked],
    now: Instant,
) -> Vec<(String, Health)> {
    let mut probes = JoinSet::new();
    for (i, c) in checked
        .iter_mut()
        .enumerate()
        .filter(|(_, c)| c.next <= now)
    {
        c.next = now + c.every;
        let (http, target, timeout) = (http.clone(), c.target.clone(), c.timeout);
        probes.spawn(async move { (i, probe_once(&http, &target, timeout).await) });
    }
    let mut changes = Vec::new();
    while let Some(done) = probes.join_next().await {
        let Ok((i, (health, output))) = done else {
            continue;
        };
        let c = &mut checked[i];
        if c.health != health {
            tracing::info!(service = %c.declared.name, id = %c.declared.id, ?health, %output, "check changed");
            c.health = health;
            changes.push((c.declared.id.clone(), health));
        }
    }
    changes
}

fn instances(node: &NodeEntry, checked: &[Checked]) -> Vec<Instance> {
    checked
        .iter()
        .map(|c| {
            let d = &c.declared;
            Instance {
                id: d.id.clone(),
                service: d.name.clone(),
                node: node.name.as_str().into(),
                address: d.address.unwrap_or(node.address),
                port: d.port,
                tags: d.tags.clone().into(),
                meta: std::sync::Arc::new(d.meta.clone()),
                health: c.health,
                weight: 1,
            }
        })
        .collect()
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_check_of_a_service_declared_as_h2c_is_run_over_h2c() {
        let node = NodeEntry {
            name: "n".into(),
            address: "127.0.0.1".parse().unwrap(),
            inbound_port: 5041,
        };
        let declared = |name: &str, meta: &[(&str, &str)]| Declared {
            name: crate::catalog::ServiceName::parse(name).unwrap(),
            id: name.into(),
            address: None,
            port: 50051,
            tags: Vec::new(),
            meta: meta
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            check: Check::Http {
                path: "/health".into(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
            },
            deregister_after: None,
        };
        let checks = checked(
            &node,
            vec![
                declared("grpc", &[("protocol", "h2c")]),
                declared("web", &[]),
            ],
            Vec::new(),
        );
        let url = "http://127.0.0.1:50051/health".to_owned();
        assert_eq!(checks[0].target, Target::H2c(url.clone()));
        assert_eq!(checks[1].target, Target::Http(url));
    }
}
