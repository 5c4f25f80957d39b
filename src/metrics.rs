//! Prometheus metrics of every role, served as `/metrics` on its admin listener.
//!
//! One [`Metrics`] per role process, created at start and passed to what records into it (no
//! global statics, so tests do not interfere). Requests are recorded where connections are
//! served ([`crate::serve::serve_recorded`]): each role's handler only names the service of a
//! response by returning a [`ServiceLabel`] beside it. The resilience counters (retries,
//! ejections, panic routing) are for the forwarder to call.
//!
//! Label cardinality is bounded by construction: a service label is a name the catalog (or the
//! cluster DNS) knows, a valid name an application answered for (see [`ServiceLabel`]), or `""`,
//! at most [`MAX_SERVICE_LABELS`] distinct ones; the error label is one of the contract's codes
//! or `other`; the status is whatever three-digit code hyper accepted.
//!
//! Recording a request costs one hash lookup under a read lock (the series cache below), one
//! counter increment and one histogram observation; nothing is allocated once a series exists.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::catalog::{CatalogState, ServiceName};
use crate::routing::Table;

/// The `Content-Type` of [`Metrics::encode`]'s output: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of the request duration buckets, in seconds: a proxy hop on loopback answers in
/// well under a millisecond, a slow upstream in seconds; past 10 s is the `+Inf` bucket.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The most distinct service label values one process records; later services count as `""`.
/// Handlers label only catalog services, so this is a second fence, sized above the largest
/// catalog measured (10,000 services).
pub const MAX_SERVICE_LABELS: usize = 16_384;

/// The mesh error codes of the contract (`x-skyline-error`); any other value is `other`.
const ERROR_CODES: [&str; 7] = [
    "bad-request",
    "unknown-service",
    "no-healthy-endpoint",
    "upstream-connect",
    "upstream-timeout",
    "forbidden",
    "loop-detected",
];

// === Role ===

/// Which listener answered a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Outbound,
    Inbound,
    Gateway,
    Bridge,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Outbound => "outbound",
            Role::Inbound => "inbound",
            Role::Gateway => "gateway",
            Role::Bridge => "bridge",
        }
    }
}

impl EncodeLabelValue for Role {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

// === ServiceLabel ===

/// The service a response belongs to, returned beside it by a role's handler
/// ([`crate::serve::Handler::handle_labelled`]) so that the serve layer labels its metrics.
///
/// A name taken from a request could be anything, so only two kinds become labels: a name the
/// catalog (or, for the bridge, the cluster DNS) knows, and a valid name the catalog does not
/// know, such as one sent to the catch-all during a migration, when an application answered
/// for it. A name only the mesh answered for (`x-skyline-error`, for example unknown-service
/// from the far end) is counted under `""`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLabel {
    service: ServiceName,
    known: bool,
}

impl ServiceLabel {
    /// A service the catalog or the cluster DNS knows: always its own label.
    pub fn known(service: ServiceName) -> Self {
        Self {
            service,
            known: true,
        }
    }

    /// A valid name the catalog does not know: its own label only if an application answered.
    pub fn unverified(service: ServiceName) -> Self {
        Self {
            service,
            known: false,
        }
    }

    /// The service's name, whether or not it is its own label (for the access log).
    pub fn name(&self) -> &str {
        self.service.as_str()
    }

    /// The label value of a response that carries mesh error `error` (if any).
    pub fn value(&self, error: Option<&str>) -> &str {
        if self.known || error.is_none() {
            self.service.as_str()
        } else {
            ""
        }
    }
}

/// The catalog's own name for `name`, if the route table knows the service (routable or not,
/// or recently retired from this node).
pub fn known_service(table: &Table, name: &str) -> Option<ServiceName> {
    let known = table
        .outbound
        .get_key_value(name)
        .map(|(k, _)| k)
        .or_else(|| table.inbound.get_key_value(name).map(|(k, _)| k))
        .or_else(|| table.retired.get_key_value(name).map(|(k, _)| k));
    known.cloned()
}

/// The label of a request for `name`: known to `table`, or unverified if merely valid.
pub fn service_label(table: &Table, name: &str) -> Option<ServiceLabel> {
    match known_service(table, name) {
        Some(service) => Some(ServiceLabel::known(service)),
        None => unverified(name),
    }
}

/// An unverified label for `name`, if it is a valid service name.
pub fn unverified(name: &str) -> Option<ServiceLabel> {
    ServiceName::parse(name).ok().map(ServiceLabel::unverified)
}

// === Labels ===

/// `skyline_requests_total`'s labels; also the key of the series cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    role: Role,
    service: Arc<str>,
    code: u16,
    error: &'static str,
}

/// [`RequestLabels`] borrowed, to look a series up without allocating. Hashes as
/// `RequestLabels` does: the same fields in the same order, and `Arc<str>` hashes as `str`.
#[derive(Hash)]
struct RequestKey<'a> {
    role: Role,
    service: &'a str,
    code: u16,
    error: &'static str,
}

impl hashbrown::Equivalent<RequestLabels> for RequestKey<'_> {
    fn equivalent(&self, key: &RequestLabels) -> bool {
        self.role == key.role
            && self.code == key.code
            && self.error == key.error
            && self.service == &*key.service
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DurationLabels {
    role: Role,
    service: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServiceLabels {
    service: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RetryLabels {
    service: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TierLabels {
    service: Arc<str>,
    tier: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    service: Arc<str>,
    tier: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MeshConnectionLabels {
    transport: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

// === Metrics ===

type Histograms = Family<DurationLabels, Histogram, fn() -> Histogram>;

/// The metrics of one role process.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Histograms,
    retries: Family<RetryLabels, Counter>,
    retry_budget_exhausted: Family<ServiceLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    panic_routing: Family<ServiceLabels, Counter>,
    gateway_tiers: Family<TierLabels, Counter>,
    gateway_outcomes: Family<OutcomeLabels, Counter>,
    gateway_latency: Family<TierLabels, Histogram, fn() -> Histogram>,
    config_reloads: Family<ReloadLabels, Counter>,
    mesh_connections: Family<MeshConnectionLabels, Counter>,
    mesh_certificate_reloads: Family<ReloadLabels, Counter>,
    series: RwLock<Series>,
    /// Off: every recording returns at once, and `/metrics` says metrics are off.
    enabled: bool,
}

/// The request path's view of the families: per label set, handles on its counter and its
/// histogram (shared with the families, which encode them).
#[derive(Default)]
struct Series {
    requests: hashbrown::HashMap<RequestLabels, RequestSeries>,
    /// Every service label value in use, so each is allocated once.
    services: hashbrown::HashSet<Arc<str>>,
}

struct RequestSeries {
    count: Counter,
    duration: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("skyline");
        let requests = Family::default();
        let durations: Histograms = Family::new_with_constructor(duration_histogram);
        let retries = Family::default();
        let retry_budget_exhausted = Family::default();
        let ejections = Family::default();
        let panic_routing = Family::default();
        let gateway_tiers = Family::default();
        let gateway_outcomes = Family::default();
        let gateway_latency: Family<TierLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(duration_histogram);
        let config_reloads = Family::default();
        let mesh_connections = Family::default();
        let mesh_certificate_reloads = Family::default();
        registry.register(
            "requests",
            "Requests answered, by role, service, status code and mesh error code",
            requests.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "Time from a request's arrival to its response head, by role and service",
            Unit::Seconds,
            durations.clone(),
        );
        registry.register(
            "retries",
            "Retries sent, by service and reason (connect, reset, status, timeout)",
            retries.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries not sent because the service's retry budget was spent",
            retry_budget_exhausted.clone(),
        );
        registry.register(
            "ejections",
            "Endpoints ejected by outlier detection",
            ejections.clone(),
        );
        registry.register(
            "panic_routing",
            "Requests routed in panic mode: every endpoint unhealthy, so all were used",
            panic_routing.clone(),
        );
        registry.register(
            "gateway_tier_requests",
            "Requests the gateway sent to each tier of a service: a migration's traffic split",
            gateway_tiers.clone(),
        );
        registry.register(
            "gateway_tier_responses",
            "Answers of each tier of a service as the gateway saw them, by outcome (success, \
             failure: a 5xx or no answer): what `skyline migrate` guards on",
            gateway_outcomes.clone(),
        );
        registry.register_with_unit(
            "gateway_tier_latency",
            "Time from a request's arrival at the gateway to the tier's response head, per \
             service and tier",
            Unit::Seconds,
            gateway_latency.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads, by result (accepted, refused)",
            config_reloads.clone(),
        );
        registry.register(
            "mesh_connections",
            "Connections a mesh listener took (with mesh TLS on), by transport (tls, plain) \
             and outcome (accepted, refused)",
            mesh_connections.clone(),
        );
        registry.register(
            "mesh_certificate_reloads",
            "Reloads of the mesh TLS files after they changed, by result (accepted, refused)",
            mesh_certificate_reloads.clone(),
        );
        // Both results exist from the start, so an alert on refusals sees a rise from 0.
        for result in ["accepted", "refused"] {
            config_reloads.get_or_create_owned(&ReloadLabels { result });
        }
        Arc::new(Self {
            registry,
            requests,
            durations,
            retries,
            retry_budget_exhausted,
            ejections,
            panic_routing,
            gateway_tiers,
            gateway_outcomes,
            gateway_latency,
            config_reloads,
            mesh_connections,
            mesh_certificate_reloads,
            series: RwLock::new(Series::default()),
            enabled: true,
        })
    }

    /// Metrics that record nothing (`[metrics] enabled = false`).
    pub fn off() -> Arc<Self> {
        let mut metrics = Self::new();
        if let Some(m) = Arc::get_mut(&mut metrics) {
            m.enabled = false;
        }
        metrics
    }

    /// [`Metrics::new`] or, when `enabled` is false, [`Metrics::off`].
    pub fn when(enabled: bool) -> Arc<Self> {
        if enabled { Self::new() } else { Self::off() }
    }

    /// Whether anything is recorded.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// One request answered by `role` for `service` ("" when unknown), with its status, the mesh
    /// error code if the mesh answered (`x-skyline-error`), and the time to the response head.
    pub fn request(
        &self,
        role: Role,
        service: &str,
        status: u16,
        error: Option<&str>,
        elapsed: Duration,
    ) {
        if !self.enabled {
            return;
        }
        let key = RequestKey {
            role,
            service: valid_or_empty(service),
            code: status,
            error: error.map_or("", error_code),
        };
        let seconds = elapsed.as_secs_f64();
        {
            let series = self.series.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(found) = series.requests.get(&key) {
                found.count.inc();
                found.duration.observe(seconds);
                return;
            }
        }
        self.first_request(key, seconds);
    }

    /// The first request of its label set: creates the series, then records.
    fn first_request(&self, key: RequestKey<'_>, seconds: f64) {
        let mut series = self.series.write().unwrap_or_else(PoisonError::into_inner);
        let service = series.intern(key.service);
        let labels = RequestLabels {
            role: key.role,
            service: service.clone(),
            code: key.code,
            error: key.error,
        };
        let Series { requests, .. } = &mut *series;
        let found = requests.entry(labels).or_insert_with_key(|labels| {
            let duration = DurationLabels {
                role: labels.role,
                service,
            };
            RequestSeries {
                count: self.requests.get_or_create_owned(labels),
                duration: self.durations.get_or_create_owned(&duration),
            }
        });
        found.count.inc();
        found.duration.observe(seconds);
    }

    /// Requests answered so far, per listener role and service (all statuses): what the
    /// dashboard samples (see [`crate::admin::ui`]). Takes the series cache's read lock once.
    pub fn request_totals(&self) -> Vec<(Role, Arc<str>, u64)> {
        let series = self.series.read().unwrap_or_else(PoisonError::into_inner);
        let mut totals: hashbrown::HashMap<(Role, Arc<str>), u64> = hashbrown::HashMap::new();
        for (labels, found) in &series.requests {
            let total = totals
                .entry((labels.role, labels.service.clone()))
                .or_default();
            *total = total.saturating_add(found.count.get());
        }
        totals
            .into_iter()
            .map(|((role, service), count)| (role, service, count))
            .collect()
    }

    /// A retry sent; reason is one of "connect", "unsent", "reset", "status", "timeout".
    pub fn retry(&self, service: &str, reason: &'static str) {
        if !self.enabled {
            return;
        }
        let service = self.service_label(service);
        self.retries
            .get_or_create(&RetryLabels { service, reason })
            .inc();
    }

    /// A retry not sent because the retry budget was spent.
    pub fn retry_budget_exhausted(&self, service: &str) {
        self.count_for(&self.retry_budget_exhausted, service);
    }

    /// An endpoint ejected by outlier detection.
    pub fn ejection(&self, service: &str) {
        self.count_for(&self.ejections, service);
    }

    /// A request routed in panic mode (every endpoint unhealthy, so all are used).
    pub fn panic_routing(&self, service: &str) {
        self.count_for(&self.panic_routing, service);
    }

    /// A request the gateway sent to tier `tier` of `service` (tier names come from the
    /// gateway's configuration, so they are bounded), and its answer: `failed` when it was a 5xx
    /// or none came, `elapsed` after the request arrived.
    pub fn gateway_tier(&self, service: &str, tier: Arc<str>, failed: bool, elapsed: Duration) {
        if !self.enabled {
            return;
        }
        let service = self.service_label(service);
        let labels = TierLabels { service, tier };
        self.gateway_tiers.get_or_create(&labels).inc();
        self.gateway_latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        let outcome = if failed { "failure" } else { "success" };
        self.gateway_outcomes
            .get_or_create(&OutcomeLabels {
                service: labels.service,
                tier: labels.tier,
                outcome,
            })
            .inc();
    }

    /// A configuration reload, accepted or refused.
    pub fn config_reload(&self, ok: bool) {
        let result = if ok { "accepted" } else { "refused" };
        self.config_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// A connection a mesh listener took or refused (see [`crate::tls`]).
    pub fn mesh_connection(&self, transport: &'static str, outcome: &'static str) {
        if !self.enabled {
            return;
        }
        self.mesh_connections
            .get_or_create(&MeshConnectionLabels { transport, outcome })
            .inc();
    }

    /// A reload of the mesh TLS files, accepted or refused.
    pub fn mesh_certificate_reload(&self, ok: bool) {
        let result = if ok { "accepted" } else { "refused" };
        self.mesh_certificate_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    fn count_for(&self, family: &Family<ServiceLabels, Counter>, service: &str) {
        if !self.enabled {
            return;
        }
        let service = self.service_label(service);
        family.get_or_create(&ServiceLabels { service }).inc();
    }

    /// The shared label value of `service`: itself if valid and within the cap, else `""`.
    fn service_label(&self, service: &str) -> Arc<str> {
        let service = valid_or_empty(service);
        {
            let series = self.series.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(found) = series.services.get(service) {
                return found.clone();
            }
        }
        let mut series = self.series.write().unwrap_or_else(PoisonError::into_inner);
        series.intern(service)
    }

    /// The Prometheus text exposition. Catalog gauges are computed at scrape time from `catalog`:
    /// `skyline_catalog_age_seconds`, `skyline_catalog_stale` (1 while the source reports an error),
    /// `skyline_catalog_services`, `skyline_catalog_instances`.
    pub fn encode(&self, catalog: Option<&CatalogState>) -> String {
        use prometheus_client::encoding::prometheus_text::encode;
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String fails only if a label value's encoding does, which ours do not.
        if let Err(error) = encode(&mut out, &self.registry) {
            tracing::warn!(%error, "cannot encode metrics");
        }
        if let Some(state) = catalog {
            if let Err(error) = encode(&mut out, &catalog_registry(state)) {
                tracing::warn!(%error, "cannot encode catalog metrics");
            }
        }
        out
    }
}

impl Series {
    /// The one shared copy of label value `service`; `""` once [`MAX_SERVICE_LABELS`] are used.
    fn intern(&mut self, service: &str) -> Arc<str> {
        if let Some(found) = self.services.get(service) {
            return found.clone();
        }
        let service = if self.services.len() < MAX_SERVICE_LABELS {
            service
        } else {
            ""
        };
        self.services
            .get_or_insert_with(service, |s: &str| Arc::from(s))
            .clone()
    }
}

/// `service` if it is a valid service name, else `""`: never a raw string as a label value.
fn valid_or_empty(service: &str) -> &str {
    if ServiceName::is_valid(service) {
        service
    } else {
        ""
    }
}

/// The error label of an `x-skyline-error` value: a code of the contract, or `other`.
fn error_code(value: &str) -> &'static str {
    ERROR_CODES
        .iter()
        .find(|code| **code == value)
        .copied()
        .unwrap_or("other")
}

/// The catalog gauges, as they are now.
fn catalog_registry(state: &CatalogState) -> Registry {
    let mut registry = Registry::with_prefix("skyline");
    if let Some(updated) = state.updated {
        let age = Gauge::<f64, AtomicU64>::default();
        age.set(updated.elapsed().as_secs_f64());
        registry.register_with_unit(
            "catalog_age",
            "Time since the catalog in force was published",
            Unit::Seconds,
            age,
        );
    }
    let gauge = |value: usize| {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        gauge
    };
    registry.register(
        "catalog_stale",
        "1 while the catalog source reports an error and the last good catalog is kept",
        gauge(usize::from(state.error.is_some())),
    );
    let snapshot = state.snapshot.as_deref();
    registry.register(
        "catalog_services",
        "Services in the catalog in force",
        gauge(snapshot.map_or(0, |s| s.services.len())),
    );
    registry.register(
        "catalog_instances",
        "Service instances in the catalog in force",
        gauge(snapshot.map_or(0, |s| s.instance_count())),
    );
    registry
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::hash::{Hash, Hasher};
    use std::time::Instant;

    use crate::catalog::{Health, Instance, Snapshot};

    /// The value of the sample `name{labels}` in `text`, labels given in their order.
    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        let series = if labels.is_empty() {
            name.to_owned()
        } else {
            format!("{name}{{{labels}}}")
        };
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(&series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counts_requests_by_role_service_code_and_error() {
        let metrics = Metrics::new();
        let ms = Duration::from_millis(3);
        metrics.request(Role::Outbound, "web", 200, None, ms);
        metrics.request(Role::Outbound, "web", 200, None, ms);
        metrics.request(Role::Inbound, "web", 200, None, ms);
        metrics.request(Role::Outbound, "", 404, Some("unknown-service"), ms);
        metrics.request(Role::Gateway, "web", 503, Some("no-healthy-endpoint"), ms);
        let text = metrics.encode(None);
        let requests = |labels| sample(&text, "skyline_requests_total", labels);
        assert_eq!(
            requests(r#"role="outbound",service="web",code="200",error="""#),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            requests(r#"role="inbound",service="web",code="200",error="""#),
            Some(1.0)
        );
        assert_eq!(
            requests(r#"role="outbound",service="",code="404",error="unknown-service""#),
            Some(1.0)
        );
        assert_eq!(
            requests(r#"role="gateway",service="web",code="503",error="no-healthy-endpoint""#),
            Some(1.0)
        );
        assert!(text.contains("# TYPE skyline_requests_total counter"));
    }

    #[test]
    fn durations_fall_into_their_buckets() {
        let metrics = Metrics::new();
        for ms in [0, 2, 2, 40, 20_000] {
            let status = if ms == 40 { 502 } else { 200 };
            metrics.request(
                Role::Inbound,
                "web",
                status,
                None,
                Duration::from_millis(ms),
            );
        }
        let text = metrics.encode(None);
        let bucket = |le: &str| {
            let labels = format!(r#"role="inbound",service="web",le="{le}""#);
            sample(&text, "skyline_request_duration_seconds_bucket", &labels)
                .unwrap_or_else(|| panic!("no bucket le={le} in\n{text}"))
        };
        assert_eq!(bucket("0.0005"), 1.0);
        assert_eq!(bucket("0.0025"), 3.0);
        assert_eq!(bucket("0.05"), 4.0);
        assert_eq!(bucket("10"), 4.0);
        assert_eq!(bucket("+Inf"), 5.0);
        let count = sample(
            &text,
            "skyline_request_duration_seconds_count",
            r#"role="inbound",service="web""#,
        );
        assert_eq!(count, Some(5.0), "statuses share one histogram per service");
        assert!(text.contains("# TYPE skyline_request_duration_seconds histogram"));
    }

    #[test]
    fn labels_never_carry_raw_input() {
        let metrics = Metrics::new();
        let ms = Duration::from_millis(1);
        metrics.request(Role::Outbound, "Evil\"\n", 200, Some("made-up"), ms);
        metrics.request(Role::Outbound, "../x", 200, Some("upstream-timeout"), ms);
        metrics.retry("Not A Name", "connect");
        let text = metrics.encode(None);
        assert_eq!(
            sample(
                &text,
                "skyline_requests_total",
                r#"role="outbound",service="",code="200",error="other""#
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "skyline_requests_total",
                r#"role="outbound",service="",code="200",error="upstream-timeout""#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "skyline_retries_total",
                r#"service="",reason="connect""#
            ),
            Some(1.0)
        );
        assert!(!text.contains("Evil") && !text.contains("made-up"));
    }

    #[test]
    fn service_labels_stop_at_the_cap() {
        let metrics = Metrics::new();
        for i in 0..MAX_SERVICE_LABELS + 10 {
            metrics.ejection(&format!("s{i}"));
        }
        let text = metrics.encode(None);
        let last = format!("s{}", MAX_SERVICE_LABELS - 1);
        assert!(text.contains(&format!(r#"service="{last}""#)));
        assert!(!text.contains(&format!(r#"service="s{MAX_SERVICE_LABELS}""#)));
        assert_eq!(
            sample(&text, "skyline_ejections_total", r#"service="""#),
            Some(10.0)
        );
    }

    #[test]
    fn resilience_counters_are_per_service() {
        let metrics = Metrics::new();
        metrics.retry("web", "connect");
        metrics.retry("web", "connect");
        metrics.retry("web", "timeout");
        metrics.retry_budget_exhausted("web");
        metrics.ejection("api");
        metrics.panic_routing("api");
        metrics.panic_routing("api");
        metrics.config_reload(true);
        metrics.config_reload(false);
        metrics.config_reload(false);
        let text = metrics.encode(None);
        let s = |name, labels| sample(&text, name, labels);
        assert_eq!(
            s("skyline_retries_total", r#"service="web",reason="connect""#),
            Some(2.0)
        );
        assert_eq!(
            s("skyline_retries_total", r#"service="web",reason="timeout""#),
            Some(1.0)
        );
        assert_eq!(
            s("skyline_retry_budget_exhausted_total", r#"service="web""#),
            Some(1.0)
        );
        assert_eq!(s("skyline_ejections_total", r#"service="api""#), Some(1.0));
        assert_eq!(
            s("skyline_panic_routing_total", r#"service="api""#),
            Some(2.0)
        );
        assert_eq!(
            s("skyline_config_reloads_total", r#"result="accepted""#),
            Some(1.0)
        );
        assert_eq!(
            s("skyline_config_reloads_total", r#"result="refused""#),
            Some(2.0)
        );
    }

    #[test]
    fn reload_results_are_exposed_before_any_reload() {
        let text = Metrics::new().encode(None);
        for result in ["accepted", "refused"] {
            let labels = format!(r#"result="{result}""#);
            assert_eq!(
                sample(&text, "skyline_config_reloads_total", &labels),
                Some(0.0),
                "{text}"
            );
        }
        assert!(!text.contains("skyline_catalog_"), "no catalog, no gauges");
    }

    fn instance(service: &str, id: &str) -> Instance {
        Instance {
            id: id.into(),
            service: ServiceName::parse(service).unwrap(),
            node: "n".into(),
            address: "127.0.0.1".parse().unwrap(),
            port: 1,
            tags: Vec::new().into(),
            meta: BTreeMap::new().into(),
            health: Health::Passing,
            weight: 1,
        }
    }

    #[test]
    fn catalog_gauges_show_age_staleness_and_size() {
        let mut snapshot = Snapshot::default();
        for (service, ids) in [("web", &["w1", "w2"][..]), ("api", &["a1"][..])] {
            let name = ServiceName::parse(service).unwrap();
            let instances = ids.iter().map(|id| instance(service, id)).collect();
            snapshot.services.insert(name, instances);
        }
        let mut state = CatalogState {
            snapshot: Some(Arc::new(snapshot)),
            updated: Some(Instant::now() - Duration::from_secs(90)),
            updated_wall: None,
            error: None,
            refused: false,
            version: None,
        };
        let metrics = Metrics::new();
        let text = metrics.encode(Some(&state));
        let age = sample(&text, "skyline_catalog_age_seconds", "").unwrap();
        assert!((90.0..3600.0).contains(&age), "{age}");
        assert_eq!(sample(&text, "skyline_catalog_stale", ""), Some(0.0));
        assert_eq!(sample(&text, "skyline_catalog_services", ""), Some(2.0));
        assert_eq!(sample(&text, "skyline_catalog_instances", ""), Some(3.0));
        assert!(text.contains("# TYPE skyline_catalog_age_seconds gauge"));

        state.error = Some("registry unreachable".into());
        let text = metrics.encode(Some(&state));
        assert_eq!(sample(&text, "skyline_catalog_stale", ""), Some(1.0));
        assert_eq!(sample(&text, "skyline_catalog_services", ""), Some(2.0));
    }

    #[test]
    fn an_unverified_name_is_a_label_only_when_an_application_answered() {
        let web = || ServiceName::parse("web").unwrap();
        assert_eq!(ServiceLabel::known(web()).value(None), "web");
        assert_eq!(
            ServiceLabel::known(web()).value(Some("upstream-timeout")),
            "web"
        );
        assert_eq!(ServiceLabel::unverified(web()).value(None), "web");
        assert_eq!(
            ServiceLabel::unverified(web()).value(Some("unknown-service")),
            ""
        );
        assert_eq!(unverified("Not/A/Name"), None);
        let mut table = Table::default();
        table
            .outbound
            .insert(web(), Arc::new(crate::routing::Route::new(Vec::new())));
        assert_eq!(
            service_label(&table, "web"),
            Some(ServiceLabel::known(web()))
        );
        assert_eq!(
            service_label(&table, "ghost"),
            Some(ServiceLabel::unverified(
                ServiceName::parse("ghost").unwrap()
            ))
        );
    }

    fn hash_of(value: &impl Hash) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        value.hash(&mut hasher);
        hasher.finish()
    }

    /// The series cache relies on it.
    #[test]
    fn a_borrowed_key_hashes_as_its_owned_labels() {
        let labels = RequestLabels {
            role: Role::Bridge,
            service: Arc::from("web"),
            code: 503,
            error: "no-healthy-endpoint",
        };
        let key = RequestKey {
            role: Role::Bridge,
            service: "web",
            code: 503,
            error: "no-healthy-endpoint",
        };
        assert_eq!(hash_of(&labels), hash_of(&key));
        assert!(hashbrown::Equivalent::equivalent(&key, &labels));
    }

    /// The whole per-response cost of the serve layer's recording, as `Recorder::record` pays
    /// it: the handler's label, the clock, the header, the record. Run by
    /// hand like the one below.
    #[test]
    #[ignore]
    fn cost_of_labelling_and_recording_a_response() {
        let metrics = Metrics::new();
        let name = ServiceName::parse("web").unwrap();
        let rounds = 1_000_000u32;
        let started = Instant::now();
        for _ in 0..rounds {
            let clock = Instant::now();
            let label = Some(ServiceLabel::known(name.clone()));
            let response = http::Response::new(());
            let error = response
                .headers()
                .get(&crate::proxy::X_SKYLINE_ERROR)
                .and_then(|v| v.to_str().ok());
            let service = label.as_ref().map_or("", |l| l.value(error));
            let status = response.status().as_u16();
            metrics.request(Role::Inbound, service, status, error, clock.elapsed());
        }
        let per_response = started.elapsed() / rounds;
        println!("labelling and recording a response: {per_response:?}");
    }

    /// The cost of recording one request on an existing series. Not a test of speed (a loaded
    /// machine may be slow at any moment): run it by hand,
    /// `cargo test --lib metrics::tests::cost -- --ignored --nocapture` (optimised build).
    #[test]
    #[ignore]
    fn cost_of_recording_a_request() {
        let metrics = Metrics::new();
        let services: Vec<String> = (0..100).map(|i| format!("service-{i}")).collect();
        for s in &services {
            metrics.request(Role::Outbound, s, 200, None, Duration::from_micros(700));
        }
        let rounds = 2_000_000u32;
        let started = Instant::now();
        for i in 0..rounds {
            let service = &services[i as usize % services.len()];
            metrics.request(
                Role::Outbound,
                std::hint::black_box(service),
                200,
                None,
                Duration::from_micros(700),
            );
        }
        let per_request = started.elapsed() / rounds;
        println!("recording a request: {per_request:?}");
        assert_eq!(
            sample(
                &metrics.encode(None),
                "skyline_requests_total",
                r#"role="outbound",service="service-7",code="200",error="""#
            ),
            Some(f64::from(rounds / 100 + 1))
        );
    }
}
