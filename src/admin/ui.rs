//! The web dashboard at `/ui` on the admin listener: the services with their tiers, health and
//! platforms, each service's traffic share over the last minutes, and the migration
//! autopilot's records, refreshed by the page every 1.5 s.
//!
//! The page is three files embedded in the binary ([`asset`]): no build step, no framework,
//! nothing fetched from elsewhere. The page, its script and its style carry no data and are
//! served without the admin token; the data (`/ui/data`, [`Dashboard::data`]) needs it like
//! every other admin path. The page takes the token from its URL's fragment
//! (`/ui#token=<token>`), which the browser never sends to a server, and sends it as
//! `Authorization: Bearer` on its own requests. Every answer carries a Content-Security-Policy
//! that allows only this listener's own script, style and data (no inline script), and the
//! script writes catalog strings with `textContent` only.
//!
//! Traffic history: a timer task ([`sample_every`]) reads the role's existing counters every
//! [`SAMPLE_EVERY`] (the gateway's answers per tier, an agent's requests per listener) and keeps
//! the growth of each (service, platform or listener) series per sample, for [`KEEP`] samples
//! (10 minutes). Only series that grew are kept in a sample, at most
//! [`MAX_SERIES_PER_SAMPLE`]: memory is bounded whatever the catalog's size, and the request
//! path pays nothing beyond the counters it already kept.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Health, Snapshot};
use crate::migrate::answers::{KV_MIGRATE_PREFIX, Report, TierAnswers, reports_prefix, unix_now};
use crate::migrate::{Record, TierSummary};
use crate::proxy::{Body, full};
use crate::registry::client::{ClientError, RegistryClient};

/// How often the counters are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// How many samples are kept: 10 minutes at [`SAMPLE_EVERY`].
pub const KEEP: usize = 120;
/// The most series one sample keeps (the busiest, when more grew).
pub const MAX_SERIES_PER_SAMPLE: usize = 1024;
/// The most services one answer of `/ui/data` lists (by name).
pub const MAX_SERVICES: usize = 1000;
/// Migration records read from the registry are reused for this long.
pub const MIGRATIONS_FRESH: Duration = Duration::from_secs(1);
/// How long a read of the migration records may take before the answer goes without them.
pub const MIGRATIONS_TIMEOUT: Duration = Duration::from_secs(2);

/// The policy of every dashboard answer: this listener's own script, style and data only; no
/// inline script, no frames, no forms, no plugins.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

const PAGE: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

/// The dashboard's data path, which needs the admin token (the assets do not).
pub const DATA_PATH: &str = "/ui/data";

/// Whether `path` is one of the dashboard's static assets (no data, served without a token).
pub fn is_asset(path: &str) -> bool {
    matches!(path, "/ui" | "/ui/" | "/ui/app.js" | "/ui/app.css")
}

/// The answer for a static asset of the dashboard, `None` for any other path.
pub fn asset(path: &str) -> Option<Response<Body>> {
    let (content_type, text) = match path {
        "/ui" | "/ui/" => ("text/html; charset=utf-8", PAGE),
        "/ui/app.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "/ui/app.css" => ("text/css; charset=utf-8", STYLE),
        _ => return None,
    };
    let mut response = Response::new(full(text));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(secured(response))
}

/// `response` with the dashboard's security headers.
pub fn secured(mut response: Response<Body>) -> Response<Body> {
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        http::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    response
}

/// The answer of `/ui/data`: `body` as JSON, never cached, with the security headers.
pub fn data_response(body: &serde_json::Value) -> Response<Body> {
    let mut response = crate::admin::json_response(StatusCode::OK, body);
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secured(response)
}

// === Totals ===

/// One counter reading: service, series (platform or listener), cumulative count.
pub type Reading = (Arc<str>, Arc<str>, u64);

/// The (service, series) a count belongs to.
type SeriesKey = (Arc<str>, Arc<str>);

// === History ===

/// The growth of each series per sample, for the last [`KEEP`] samples.
#[derive(Debug, Default)]
struct History {
    /// The last cumulative count read of each series that exists now.
    last: HashMap<SeriesKey, u64>,
    /// Oldest first: when the sample was taken (Unix seconds) and what grew since the one
    /// before.
    samples: VecDeque<(u64, Vec<(SeriesKey, u64)>)>,
}

impl History {
    /// Growth of a counter from `before` to `now`; a counter that went back started over.
    fn growth(before: u64, now: u64) -> u64 {
        if now >= before { now - before } else { now }
    }

    /// Takes a sample of `readings` at `at`.
    fn sample(&mut self, readings: Vec<Reading>, at: u64) {
        let mut grown = Vec::new();
        let mut last = HashMap::with_capacity(readings.len());
        for (service, series, count) in readings {
            let key = (service, series);
            let before = self.last.get(&key).copied().unwrap_or(0);
            let growth = Self::growth(before, count);
            if growth > 0 {
                grown.push((key.clone(), growth));
            }
            last.insert(key, count);
        }
        if grown.len() > MAX_SERIES_PER_SAMPLE {
            grown.sort_by_key(|g| std::cmp::Reverse(g.1));
            grown.truncate(MAX_SERIES_PER_SAMPLE);
        }
        grown.shrink_to_fit();
        self.last = last;
        self.samples.push_back((at, grown));
        while self.samples.len() > KEEP {
            self.samples.pop_front();
        }
    }

    /// Per service and series, the growth in each kept sample (oldest first) and since the
    /// last one (from `readings`, read now).
    fn window(&self, readings: &[Reading]) -> BTreeMap<Arc<str>, BTreeMap<Arc<str>, Series>> {
        let n = self.samples.len();
        let mut out: BTreeMap<Arc<str>, BTreeMap<Arc<str>, Series>> = BTreeMap::new();
        fn entry<'a>(
            out: &'a mut BTreeMap<Arc<str>, BTreeMap<Arc<str>, Series>>,
            key: &SeriesKey,
            n: usize,
        ) -> &'a mut Series {
            out.entry(key.0.clone())
                .or_default()
                .entry(key.1.clone())
                .or_insert_with(|| Series {
                    requests: 0,
                    history: vec![0; n],
                    share: 0.0,
                })
        }
        for (i, (_, grown)) in self.samples.iter().enumerate() {
            for (key, growth) in grown {
                let series = entry(&mut out, key, n);
                series.history[i] = *growth;
                series.requests = series.requests.saturating_add(*growth);
            }
        }
        for (service, name, count) in readings {
            let key = (service.clone(), name.clone());
            let before = self.last.get(&key).copied().unwrap_or(0);
            let growth = Self::growth(before, *count);
            if growth > 0 {
                let series = entry(&mut out, &key, n);
                series.requests = series.requests.saturating_add(growth);
            }
        }
        for per_series in out.values_mut() {
            let total: u64 = per_series.values().map(|s| s.requests).sum();
            for series in per_series.values_mut() {
                if total > 0 {
                    series.share = (series.requests as f64 * 1000.0 / total as f64).round() / 10.0;
                }
            }
        }
        out
    }
}

/// One series of one service over the window.
#[derive(Clone, Debug, PartialEq, Serialize)]
struct Series {
    /// Requests over the window, the current partial sample included.
    requests: u64,
    /// The service's requests that went this way, percent (one decimal).
    share: f64,
    /// Requests per sample, oldest first.
    history: Vec<u64>,
}

// === Views ===

/// One tier of a service as the dashboard shows it.
#[derive(Clone, Debug, Serialize)]
pub struct TierView {
    pub name: String,
    /// The platform of the tier's endpoints, when the tier says.
    pub platform: Option<String>,
    /// Endpoints (or instances) passing, and in all.
    pub passing: usize,
    pub total: usize,
    pub eligible: bool,
    /// The tier requests go to now.
    pub chosen: bool,
}

/// One service in the catalog: instances by health, platforms and nodes.
#[derive(Debug, Default, Serialize)]
struct CatalogView {
    instances: usize,
    passing: usize,
    warning: usize,
    critical: usize,
    platforms: BTreeSet<String>,
    nodes: BTreeSet<String>,
}

fn catalog_view(snapshot: &Snapshot) -> BTreeMap<String, CatalogView> {
    let mut out = BTreeMap::new();
    for (name, instances) in &snapshot.services {
        let mut view = CatalogView::default();
        for instance in instances.iter() {
            view.instances += 1;
            match instance.health {
                Health::Passing => view.passing += 1,
                Health::Warning => view.warning += 1,
                Health::Critical => view.critical += 1,
            }
            if let Some(platform) = instance.meta.get("platform") {
                view.platforms.insert(platform.clone());
            }
            view.nodes.insert(instance.node.to_string());
        }
        out.insert(name.to_string(), view);
    }
    out
}

// === Dashboard ===

/// What one admin listener's dashboard keeps: the traffic history and the migration records
/// last read.
#[derive(Debug)]
pub struct Dashboard {
    /// `agent` or `gateway`.
    role: &'static str,
    /// What the traffic series are: `platform` (the gateway's tiers) or `listener` (an agent's
    /// outbound and inbound).
    traffic_by: &'static str,
    history: Mutex<History>,
    /// Where the migration records are read; `None`: the role follows no registry.
    registry: Option<RegistryClient>,
    migrations: tokio::sync::Mutex<Migrations>,
}

#[derive(Debug, Default)]
struct Migrations {
    read: Option<Instant>,
    records: Vec<serde_json::Value>,
    error: Option<String>,
}

impl Dashboard {
    pub fn new(
        role: &'static str,
        traffic_by: &'static str,
        registry: Option<RegistryClient>,
    ) -> Arc<Self> {
        Arc::new(Self {
            role,
            traffic_by,
            history: Mutex::new(History::default()),
            registry,
            migrations: tokio::sync::Mutex::new(Migrations::default()),
        })
    }

    /// Takes a sample of the counters.
    pub fn sample(&self, readings: Vec<Reading>) {
        let mut history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
        history.sample(readings, unix_now());
    }

    /// The body of `/ui/data`: every service of `snapshot` (and of `tiers` and the traffic),
    /// with its tiers (from the role), health, platforms and traffic over the window
    /// (`readings`: the counters now); and the migration records.
    pub async fn data(
        &self,
        snapshot: Option<&Snapshot>,
        mut tiers: HashMap<String, Vec<TierView>>,
        readings: &[Reading],
    ) -> serde_json::Value {
        let (traffic, samples) = {
            let history = self.history.lock().unwrap_or_else(PoisonError::into_inner);
            (history.window(readings), history.samples.len())
        };
        let mut catalog = snapshot.map(catalog_view).unwrap_or_default();
        let mut names: BTreeSet<String> = catalog.keys().cloned().collect();
        names.extend(tiers.keys().cloned());
        names.extend(traffic.keys().map(|s| s.to_string()));
        names.remove("");
        let listed = names.len();
        let services: Vec<serde_json::Value> = names
            .into_iter()
            .take(MAX_SERVICES)
            .map(|name| {
                let view = catalog.remove(&name).unwrap_or_default();
                let series = traffic.get(name.as_str()).cloned().unwrap_or_default();
                let requests: u64 = series.values().map(|s| s.requests).sum();
                let traffic: Vec<serde_json::Value> = series
                    .into_iter()
                    .map(|(key, s)| {
                        serde_json::json!({
                            "name": &*key,
                            "requests": s.requests,
                            "share": s.share,
                            "history": s.history,
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": name,
                    "tiers": tiers.remove(&name).unwrap_or_default(),
                    "instances": view.instances,
                    "health": {
                        "passing": view.passing,
                        "warning": view.warning,
                        "critical": view.critical,
                    },
                    "platforms": view.platforms,
                    "nodes": view.nodes,
                    "requests": requests,
                    "traffic": traffic,
                })
            })
            .collect();
        let (migrations, migrations_error) = self.migrations().await;
        serde_json::json!({
            "role": self.role,
            "traffic_by": self.traffic_by,
            "now": unix_now(),
            "sample_seconds": SAMPLE_EVERY.as_secs(),
            "samples": samples,
            "window_seconds": SAMPLE_EVERY.as_secs() * KEEP as u64,
            "services": services,
            "services_not_listed": listed.saturating_sub(MAX_SERVICES),
            "migrations": migrations,
            "migrations_error": migrations_error,
            "registry": self.registry.is_some(),
        })
    }

    /// The migration records, read again when older than [`MIGRATIONS_FRESH`] (one read at a
    /// time, whatever the number of pages polling).
    async fn migrations(&self) -> (Vec<serde_json::Value>, Option<String>) {
        let Some(client) = &self.registry else {
            return (Vec::new(), None);
        };
        let mut cached = self.migrations.lock().await;
        let fresh = cached
            .read
            .is_some_and(|at| at.elapsed() < MIGRATIONS_FRESH);
        if !fresh {
            match tokio::time::timeout(MIGRATIONS_TIMEOUT, read_migrations(client)).await {
                Ok(Ok(records)) => {
                    cached.records = records;
                    cached.error = None;
                }
                Ok(Err(error)) => cached.error = Some(error.to_string()),
                Err(_) => cached.error = Some("the registry did not answer in time".into()),
            }
            cached.read = Some(Instant::now());
        }
        (cached.records.clone(), cached.error.clone())
    }
}

/// Every migration record `skyline/migrate/<service>` in the KV, with its current share.
async fn read_migrations(client: &RegistryClient) -> Result<Vec<serde_json::Value>, ClientError> {
    let body = match client
        .get(&format!("/v1/kv/{KV_MIGRATE_PREFIX}?recurse"))
        .await
    {
        Ok(body) => body,
        Err(ClientError::Refused { status, .. }) if status == StatusCode::NOT_FOUND => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "Key")]
        key: String,
        #[serde(rename = "Value")]
        value: Option<String>,
    }
    let entries: Vec<Entry> = serde_json::from_slice(&body).unwrap_or_default();
    let values: BTreeMap<String, Vec<u8>> = entries
        .into_iter()
        .filter_map(|e| {
            let value = base64::engine::general_purpose::STANDARD
                .decode(e.value?)
                .ok()?;
            Some((e.key, value))
        })
        .collect();
    let mut records = Vec::new();
    for (key, value) in &values {
        let Some(service) = key.strip_prefix(KV_MIGRATE_PREFIX) else {
            continue;
        };
        if service.is_empty() || service.contains('/') {
            continue;
        }
        match serde_json::from_slice::<Record>(value) {
            Ok(record) => {
                let share = record.share();
                let live = record
                    .state
                    .under_way()
                    .then(|| live_readings(&values, service));
                let mut json = serde_json::to_value(&record).unwrap_or_default();
                if let Some(fields) = json.as_object_mut() {
                    fields.insert("share".into(), share.into());
                    fields.insert("live".into(), live.into());
                }
                records.push(json);
            }
            Err(error) => tracing::debug!(%key, %error, "not a migration record"),
        }
    }
    Ok(records)
}

/// What the gateways published for the migration of `service` (see
/// [`crate::migrate::answers`]): per tier, the answers since the migration started, summed over
/// the gateways, with the error rate the guard compares.
fn live_readings(values: &BTreeMap<String, Vec<u8>>, service: &str) -> serde_json::Value {
    let prefix = reports_prefix(service);
    let mut tiers: BTreeMap<String, TierAnswers> = BTreeMap::new();
    let mut gateways = 0;
    let reports = values
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix));
    for (key, value) in reports {
        let Ok(report) = serde_json::from_slice::<Report>(value) else {
            tracing::debug!(%key, "not a gateway report");
            continue;
        };
        gateways += 1;
        for (tier, answers) in &report.tiers {
            tiers.entry(tier.clone()).or_default().add(answers);
        }
    }
    let tiers: BTreeMap<String, serde_json::Value> = tiers
        .into_iter()
        .map(|(tier, answers)| {
            let summary = TierSummary::of(&answers);
            let rate = (answers.error_rate() * 1000.0).round() / 10.0;
            let mut json = serde_json::to_value(&summary).unwrap_or_default();
            if let Some(fields) = json.as_object_mut() {
                fields.insert("error_percent".into(), rate.into());
            }
            (tier, json)
        })
        .collect();
    serde_json::json!({"gateways": gateways, "tiers": tiers})
}

/// Samples `readings()` every [`SAMPLE_EVERY`] into `dashboard` until `shutdown` (the first
/// sample at once).
pub async fn sample_every<F>(dashboard: Arc<Dashboard>, readings: F, shutdown: CancellationToken)
where
    F: Fn() -> Vec<Reading> + Send + 'static,
{
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => dashboard.sample(readings()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(service: &str, series: &str, count: u64) -> Reading {
        (Arc::from(service), Arc::from(series), count)
    }

    #[test]
    fn shares_count_the_growth_over_the_window_and_the_partial_sample() {
        let mut h = History::default();
        h.sample(vec![r("web", "mesos", 0)], 1);
        h.sample(vec![r("web", "mesos", 30)], 2);
        h.sample(vec![r("web", "mesos", 30), r("web", "kubernetes", 10)], 3);
        let now = [r("web", "mesos", 40), r("web", "kubernetes", 20)];
        let w = h.window(&now);
        let web = &w["web"];
        assert_eq!(web["mesos"].requests, 40);
        assert_eq!(web["mesos"].history, vec![0, 30, 0]);
        assert_eq!(web["kubernetes"].requests, 20);
        assert_eq!(web["kubernetes"].history, vec![0, 0, 10]);
        assert!(
            (web["mesos"].share - 66.7).abs() < 1e-9,
            "{:?}",
            web["mesos"]
        );
        assert!((web["kubernetes"].share - 33.3).abs() < 1e-9);
    }

    #[test]
    fn the_window_forgets_old_samples_and_a_counter_that_started_over_counts_from_zero() {
        let mut h = History::default();
        h.sample(vec![r("web", "mesos", 1000)], 0);
        for i in 1..=KEEP as u64 {
            h.sample(vec![r("web", "mesos", 1000 + i)], i);
        }
        assert_eq!(h.samples.len(), KEEP);
        let w = h.window(&[r("web", "mesos", 1000 + KEEP as u64)]);
        assert_eq!(
            w["web"]["mesos"].requests, KEEP as u64,
            "the first 1000 left"
        );
        // A counter that went back (a gateway forgot a service and saw it again).
        h.sample(vec![r("web", "mesos", 5)], 1000);
        let w = h.window(&[r("web", "mesos", 5)]);
        assert_eq!(*w["web"]["mesos"].history.last().unwrap(), 5);
        assert!((w["web"]["mesos"].share - 100.0).abs() < 1e-9);
    }

    #[test]
    fn a_sample_keeps_only_the_busiest_series_and_never_idle_ones() {
        let mut h = History::default();
        let many: Vec<Reading> = (0..MAX_SERIES_PER_SAMPLE as u64 + 50)
            .map(|i| r(&format!("s{i}"), "mesos", i))
            .collect();
        h.sample(many.clone(), 1);
        assert_eq!(h.samples[0].1.len(), MAX_SERIES_PER_SAMPLE);
        assert!(h.samples[0].1.iter().all(|(_, g)| *g >= 50));
        h.sample(many, 2);
        assert!(h.samples[1].1.is_empty(), "nothing grew");
    }

    #[test]
    fn assets_carry_the_security_headers_and_no_inline_script() {
        for path in ["/ui", "/ui/", "/ui/app.js", "/ui/app.css"] {
            let response = asset(path).unwrap();
            let headers = response.headers();
            assert_eq!(
                headers["content-security-policy"], CONTENT_SECURITY_POLICY,
                "{path}"
            );
            assert_eq!(headers["x-content-type-options"], "nosniff");
        }
        assert!(asset("/ui/data").is_none() && !is_asset("/ui/data"));
        // The page loads its script from this listener and has none inline.
        assert!(PAGE.contains(r#"<script src="/ui/app.js"></script>"#));
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert!(!PAGE.contains("style="));
        // Data is written as text only.
        assert!(!SCRIPT.contains("innerHTML") && !SCRIPT.contains("outerHTML"));
        assert!(!SCRIPT.contains("insertAdjacentHTML") && !SCRIPT.contains("document.write"));
    }
}
