//! What the gateway saw of each tier's answers, for `skyline migrate`'s guards: per service and
//! tier, answers by outcome (success; failure: a 5xx or none) and their latency in fine buckets
//! (good enough for a p99 within [`LATENCY_GROWTH`]).
//!
//! While a migration of a service is under way (its record `skyline/migrate/<service>` is
//! `running` or `paused`), every gateway publishes its counts for that service about once a
//! second to `skyline/migrate/<service>/gateways/<gateway-id>`, as a [`Report`]. Counts are
//! cumulative since the gateway first saw that migration (or, if later, since the gateway
//! process started: `boot` tells a restarted gateway apart), so a reader takes deltas, and a
//! gateway's first report holds only traffic of the migration. A gateway that is gone leaves a
//! report that no longer grows, which counts as no traffic and never stalls the reader.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::Gateway;
use super::policy::TierName;
use crate::registry::client::{ClientError, RegistryClient};

/// The KV prefix of migrations: `skyline/migrate/<service>` is a migration's record.
pub const KV_MIGRATE_PREFIX: &str = "skyline/migrate/";
/// How often a gateway publishes its reports.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// The lower bound of the first latency bucket, in seconds (100 µs).
pub const LATENCY_FLOOR: f64 = 0.0001;
/// Each latency bucket's upper bound is this much above the previous one.
pub const LATENCY_GROWTH: f64 = 1.25;
/// Latency buckets: 100 µs × 1.25^i for i in 0..64 (up to about 127 s), the last one open.
pub const LATENCY_BUCKETS: usize = 64;

/// The record of a migration of `service`.
pub fn record_key(service: &str) -> String {
    format!("{KV_MIGRATE_PREFIX}{service}")
}

/// Where the gateways publish their reports for `service`.
pub fn reports_prefix(service: &str) -> String {
    format!("{KV_MIGRATE_PREFIX}{service}/gateways/")
}

/// The bucket of a latency: the first whose upper bound is at or above it.
pub fn latency_bucket(elapsed: Duration) -> usize {
    let secs = elapsed.as_secs_f64();
    if secs <= LATENCY_FLOOR {
        return 0;
    }
    let i = (secs / LATENCY_FLOOR).ln() / LATENCY_GROWTH.ln();
    // Truncation is meant: a bucket index, clamped to the last one.
    (i.ceil() as usize).min(LATENCY_BUCKETS - 1)
}

/// The upper bound of bucket `i`, in seconds.
pub fn latency_bound(i: usize) -> f64 {
    LATENCY_FLOOR * LATENCY_GROWTH.powi(i32::try_from(i).unwrap_or(i32::MAX))
}

// === TierAnswers ===

/// One tier's answers as one gateway counted them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierAnswers {
    /// Answers that were not a 5xx.
    pub ok: u64,
    /// 5xx answers, and requests the tier did not answer.
    pub failed: u64,
    /// The latency histogram, sparse: `[bucket, count]` pairs (see [`latency_bound`]).
    pub latency: Vec<[u64; 2]>,
}

impl TierAnswers {
    pub fn total(&self) -> u64 {
        self.ok.saturating_add(self.failed)
    }

    /// Counts one answer.
    pub fn record(&mut self, failed: bool, elapsed: Duration) {
        if failed {
            self.failed += 1;
        } else {
            self.ok += 1;
        }
        let bucket = latency_bucket(elapsed) as u64;
        match self.latency.binary_search_by_key(&bucket, |p| p[0]) {
            Ok(i) => self.latency[i][1] += 1,
            Err(i) => self.latency.insert(i, [bucket, 1]),
        }
    }

    /// `self - before`, bucket by bucket (counts never go below zero).
    pub fn since(&self, before: &TierAnswers) -> TierAnswers {
        let old = |b: u64| {
            before
                .latency
                .iter()
                .find(|p| p[0] == b)
                .map_or(0, |p| p[1])
        };
        TierAnswers {
            ok: self.ok.saturating_sub(before.ok),
            failed: self.failed.saturating_sub(before.failed),
            latency: self
                .latency
                .iter()
                .map(|p| [p[0], p[1].saturating_sub(old(p[0]))])
                .filter(|p| p[1] > 0)
                .collect(),
        }
    }

    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &TierAnswers) {
        self.ok = self.ok.saturating_add(other.ok);
        self.failed = self.failed.saturating_add(other.failed);
        for p in &other.latency {
            match self.latency.binary_search_by_key(&p[0], |q| q[0]) {
                Ok(i) => self.latency[i][1] = self.latency[i][1].saturating_add(p[1]),
                Err(i) => self.latency.insert(i, *p),
            }
        }
    }

    /// The share of failures, 0 without answers.
    pub fn error_rate(&self) -> f64 {
        match self.total() {
            0 => 0.0,
            n => self.failed as f64 / n as f64,
        }
    }

    /// The upper bound (seconds) of the bucket that holds the `q` quantile; `None` without
    /// latencies.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.latency.iter().map(|p| p[1]).sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0);
        let mut seen = 0u64;
        for p in &self.latency {
            seen += p[1];
            if seen as f64 >= rank {
                return Some(latency_bound(usize::try_from(p[0]).unwrap_or(usize::MAX)));
            }
        }
        self.latency
            .last()
            .map(|p| latency_bound(usize::try_from(p[0]).unwrap_or(usize::MAX)))
    }
}

// === ShadowCounts ===

/// What the copies of a shadow (see [`super::policy::Shadow`]) gave, as one gateway counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowCounts {
    /// Copies sent and answered (or failed), compared with the caller's answer.
    pub compared: u64,
    /// Of those, copies whose status class (2xx, 4xx, 5xx...; none) differed from the answer's.
    pub differ: u64,
    /// Copies not sent: too many were in flight already.
    pub skipped: u64,
}

impl ShadowCounts {
    pub fn since(&self, before: &ShadowCounts) -> ShadowCounts {
        ShadowCounts {
            compared: self.compared.saturating_sub(before.compared),
            differ: self.differ.saturating_sub(before.differ),
            skipped: self.skipped.saturating_sub(before.skipped),
        }
    }

    pub fn add(&mut self, other: &ShadowCounts) {
        self.compared = self.compared.saturating_add(other.compared);
        self.differ = self.differ.saturating_add(other.differ);
        self.skipped = self.skipped.saturating_add(other.skipped);
    }
}

// === Report ===

/// What one gateway publishes for one service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The gateway's id.
    pub gateway: String,
    /// Random per gateway process: a new value means the counts started over.
    pub boot: String,
    /// When the report was written, seconds since the Unix epoch.
    pub at: u64,
    /// Per tier name, cumulative since the gateway started.
    pub tiers: BTreeMap<String, TierAnswers>,
    /// The shadow's copies, cumulative since the gateway started.
    #[serde(default)]
    pub shadow: ShadowCounts,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_into_buckets_within_the_growth_factor() {
        for ms in [0.05, 0.3, 1.0, 7.0, 42.0, 900.0, 12_000.0] {
            let d = Duration::from_secs_f64(ms / 1000.0);
            let bound = latency_bound(latency_bucket(d));
            assert!(
                bound >= d.as_secs_f64() * 0.999,
                "{ms} ms in bucket {bound}"
            );
            assert!(
                bound <= (d.as_secs_f64() * LATENCY_GROWTH).max(LATENCY_FLOOR) * 1.001,
                "{ms} ms in bucket {bound}"
            );
        }
        assert_eq!(
            latency_bucket(Duration::from_secs(100_000)),
            LATENCY_BUCKETS - 1
        );
    }

    #[test]
    fn the_p99_is_the_bucket_of_the_99th_percentile_and_deltas_subtract_buckets() {
        let mut a = TierAnswers::default();
        for _ in 0..99 {
            a.record(false, Duration::from_millis(1));
        }
        a.record(true, Duration::from_millis(500));
        let p99 = a.quantile(0.99).unwrap();
        assert!((0.001..0.00126).contains(&p99), "{p99}");
        a.record(true, Duration::from_millis(500));
        let p99 = a.quantile(0.99).unwrap();
        assert!((0.5..0.63).contains(&p99), "{p99}");
        let before = a.clone();
        a.record(false, Duration::from_millis(1));
        let delta = a.since(&before);
        assert_eq!((delta.ok, delta.failed), (1, 0));
        assert_eq!(delta.latency.len(), 1);
        let mut sum = before.clone();
        sum.add(&delta);
        assert_eq!(sum, a);
        assert!((before.error_rate() - 2.0 / 101.0).abs() < 1e-9);
    }
}
