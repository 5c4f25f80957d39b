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

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

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
