//! This gateway's part of the migration reports (see [`crate::migrate::answers`]): its id in
//! the KV, the answers it keeps per service next to its tier state, and the task that
//! publishes them while a migration of the service is under way.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::Gateway;
use super::policy::TierName;
pub use crate::migrate::answers::*;
use crate::registry::client::{ClientError, RegistryClient};

/// The answers of one service's tiers, kept by the gateway next to its tier state.
pub type ServiceAnswers = HashMap<TierName, TierAnswers>;

/// This gateway's id in the KV: the host name and the gateway's listening port, stable across
/// restarts of the same gateway.
pub fn gateway_id(listen: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_owned());
    let clean: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{clean}-{}", listen.port())
}

/// Publishes this gateway's answers for every service being migrated, about once a second,
/// until `shutdown`.
pub async fn publish(
    client: RegistryClient,
    gateway: Arc<Gateway>,
    id: String,
    shutdown: CancellationToken,
) {
    let boot = crate::registry::events::uuid_v4();
    let mut baselines = HashMap::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PUBLISH_EVERY) => {}
        }
        if let Err(error) = publish_once(&client, &gateway, &id, &boot, &mut baselines).await {
            tracing::debug!(%error, "cannot publish migration reports");
        }
    }
}

/// Per service: which migration (its record's start), and the counts when this gateway first
/// saw it.
type Baselines = HashMap<String, (String, BTreeMap<String, TierAnswers>, ShadowCounts)>;

async fn publish_once(
    client: &RegistryClient,
    gateway: &Gateway,
    id: &str,
    boot: &str,
    baselines: &mut Baselines,
) -> Result<(), ClientError> {
    let keys = match client
        .get(&format!("/v1/kv/{KV_MIGRATE_PREFIX}?keys&separator=/"))
        .await
    {
        Ok(body) => serde_json::from_slice::<Vec<String>>(&body).unwrap_or_default(),
        Err(ClientError::Refused { status, .. }) if status == http::StatusCode::NOT_FOUND => {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for key in keys {
        let Some(service) = key.strip_prefix(KV_MIGRATE_PREFIX) else {
            continue;
        };
        if service.is_empty() || service.contains('/') {
            continue;
        }
        let Some(migration) = under_way(client, &key).await? else {
            baselines.remove(service);
            continue;
        };
        let tiers: BTreeMap<String, TierAnswers> = gateway
            .answers(service)
            .into_iter()
            .map(|(tier, answers)| (tier.to_string(), answers))
            .collect();
        let shadow = gateway.shadow_counts(service);
        let (_, base_tiers, base_shadow) = baselines
            .entry(service.to_owned())
            .and_modify(|b| {
                if b.0 != migration {
                    *b = (migration.clone(), tiers.clone(), shadow);
                }
            })
            .or_insert_with(|| (migration.clone(), tiers.clone(), shadow));
        let report = Report {
            gateway: id.to_owned(),
            boot: boot.to_owned(),
            at: unix_now(),
            tiers: tiers
                .iter()
                .map(|(tier, answers)| {
                    let since = match base_tiers.get(tier) {
                        Some(base) => answers.since(base),
                        None => answers.clone(),
                    };
                    (tier.clone(), since)
                })
                .collect(),
            shadow: shadow.since(base_shadow),
        };
        let body = serde_json::to_value(&report).unwrap_or_default();
        let path = format!("/v1/kv/{}{id}", reports_prefix(service));
        client.put_json(&path, &body).await?;
    }
    Ok(())
}

/// The id of the migration whose record is at `key`, when it is `running` or `paused`.
async fn under_way(client: &RegistryClient, key: &str) -> Result<Option<String>, ClientError> {
    let body = match client.get(&format!("/v1/kv/{key}?raw")).await {
        Ok(body) => body,
        Err(ClientError::Refused { status, .. }) if status == http::StatusCode::NOT_FOUND => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let record: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let running = matches!(
        record.get("state").and_then(|s| s.as_str()),
        Some("running" | "paused")
    );
    Ok(running.then(|| {
        record
            .get("id")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }))
}
