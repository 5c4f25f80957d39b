//! The admin listener (:5050): `/healthz`, `/readyz` (is a catalog in force, and how old is it),
//! `/routes` (the live route table as JSON, with its `version`: how many tables the agent
//! swapped in since it started), `/explain?url=<url>` (why a request to that URL would go
//! where it goes, see [`Outbound::explain`]) and `/metrics` (Prometheus text, see
//! [`crate::metrics`]), and the web dashboard at `/ui` ([`ui`]).
//!
//! With a token ([`Admin::with_token`], required when the listener is reachable from other
//! machines), every path but `/healthz` and `/readyz` needs `Authorization: Bearer <token>`;
//! without it the answer is 401 with `WWW-Authenticate: Bearer` (see [`unauthorized`]). The
//! dashboard's page, script and style carry no data and are open too; its data is not.

pub mod ui;

use std::sync::Arc;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::catalog::{CatalogState, Subscriber};
use crate::config::token::{Token, bearer};
use crate::metrics::{self, Metrics};
use crate::proxy::outbound::Outbound;
use crate::proxy::{Body, full};
use crate::routing::Routes;
use crate::serve::{Conn, Handler};

#[derive(Clone)]
pub struct Admin {
    inner: Arc<Inner>,
}

struct Inner {
    routes: Arc<Routes>,
    catalog: Subscriber,
    source: String,
    metrics: Arc<Metrics>,
    /// The outbound proxy, for `/explain`; `None` when the agent has no outbound listener.
    outbound: Option<Outbound>,
    /// The bearer token of every path but `/healthz` and `/readyz`, if any.
    token: Option<Token>,
    /// The dashboard's history and migration records; `None`: no `/ui`.
    dashboard: Option<Arc<ui::Dashboard>>,
}

impl Admin {
    pub fn new(
        routes: Arc<Routes>,
        catalog: Subscriber,
        source: String,
        metrics: Arc<Metrics>,
        outbound: Option<Outbound>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                routes,
                catalog,
                source,
                metrics,
                outbound,
                token: None,
                dashboard: None,
            }),
        }
    }

    /// Requires `Authorization: Bearer <token>` on every path but `/healthz` and `/readyz`.
    #[must_use]
    pub fn with_token(self, token: Option<Token>) -> Self {
        let inner = Inner {
            routes: self.inner.routes.clone(),
            catalog: self.inner.catalog.clone(),
            source: self.inner.source.clone(),
            metrics: self.inner.metrics.clone(),
            outbound: self.inner.outbound.clone(),
            token,
            dashboard: self.inner.dashboard.clone(),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Serves the dashboard at `/ui` from `dashboard` (sampled by the agent).
    #[must_use]
    pub fn with_dashboard(self, dashboard: Arc<ui::Dashboard>) -> Self {
        let inner = Inner {
            routes: self.inner.routes.clone(),
            catalog: self.inner.catalog.clone(),
            source: self.inner.source.clone(),
            metrics: self.inner.metrics.clone(),
            outbound: self.inner.outbound.clone(),
            token: self.inner.token.clone(),
            dashboard: Some(dashboard),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// `/ui/data`: the catalog's services with this agent's routes as tiers (`nodes`: the
    /// nodes that run the service; `local`: its instances on this node) and the requests of
    /// each listener.
    async fn dashboard_data(&self, dashboard: &ui::Dashboard) -> Response<Body> {
        let table = self.inner.routes.load_full();
        let mut tiers: std::collections::HashMap<String, Vec<ui::TierView>> =
            std::collections::HashMap::new();
        for (service, route) in &table.outbound {
            let nodes = route.endpoints.len();
            let mut views = vec![ui::TierView {
                name: "nodes".into(),
                platform: None,
                passing: nodes,
                total: nodes,
                eligible: nodes > 0,
                chosen: nodes > 0,
            }];
            if let Some(local) = table.inbound.get(service) {
                let n = local.endpoints.len();
                views.push(ui::TierView {
                    name: "local".into(),
                    platform: None,
                    passing: n,
                    total: n,
                    eligible: n > 0,
                    chosen: false,
                });
            }
            tiers.insert(service.to_string(), views);
        }
        let snapshot = self.inner.catalog.borrow().snapshot.clone();
        let readings = agent_readings(&self.inner.metrics);
        let body = dashboard.data(snapshot.as_deref(), tiers, &readings).await;
        ui::data_response(&body)
    }

    /// The readiness report: ready once a catalog is in force, even a stale one (routing goes
    /// on from the last good snapshot); `error` says why it may be stale.
    fn readiness(&self) -> (StatusCode, serde_json::Value) {
        let state = self.inner.catalog.borrow().clone();
        let ready = state.snapshot.is_some();
        let body = serde_json::json!({
            "ready": ready,
            "catalog": self.inner.source,
            "catalog_age_seconds": state.updated.map(|t| t.elapsed().as_secs_f64()),
            "catalog_error": state.error,
            "services": state.snapshot.as_ref().map(|s| s.services.len()),
        });
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, body)
    }

    /// The table in force, and its version (how many tables were swapped in before it).
    fn routes(&self) -> serde_json::Value {
        let version = self.inner.routes.version();
        let table = self.inner.routes.load_full();
        let mut body = serde_json::to_value(&*table).unwrap_or_default();
        if let Some(fields) = body.as_object_mut() {
            fields.insert("version".to_owned(), version.into());
        }
        body
    }

    /// `/explain?url=<url>`: 400 without a `url`, 404 without an outbound proxy.
    fn explain(&self, query: Option<&str>) -> (StatusCode, serde_json::Value) {
        let url = match explain_url(query) {
            Ok(url) => url,
            Err(refusal) => return refusal,
        };
        let Some(outbound) = &self.inner.outbound else {
            return (
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not-found", "detail": "this agent has no outbound listener"}),
            );
        };
        match outbound.explain(&url) {
            Ok(body) => (StatusCode::OK, body),
            Err(error) => (
                error.status(),
                serde_json::json!({"error": error.code(), "detail": error.to_string()}),
            ),
        }
    }
}

impl Handler for Admin {
    type Body = Body;

    async fn handle(&self, req: Request<Incoming>, _conn: Conn) -> Response<Body> {
        if let Some(refusal) = unauthorized(self.inner.token.as_ref(), &req) {
            return refusal;
        }
        if let Some(dashboard) = &self.inner.dashboard {
            if let Some(asset) = ui::asset(req.uri().path()) {
                return asset;
            }
            if req.uri().path() == ui::DATA_PATH {
                return self.dashboard_data(dashboard).await;
            }
        }
        let (status, body) = match req.uri().path() {
            "/healthz" => (StatusCode::OK, serde_json::json!({"ok": true})),
            "/readyz" => self.readiness(),
            "/metrics" => {
                let catalog = self.inner.catalog.borrow().clone();
                return metrics_response(&self.inner.metrics, Some(&catalog));
            }
            "/routes" => (StatusCode::OK, self.routes()),
            "/explain" => self.explain(req.uri().query()),
            _ => (
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not-found", "paths": ["/healthz", "/readyz", "/routes", "/explain", "/metrics", "/ui"]}),
            ),
        };
        json_response(status, &body)
    }
}

/// An agent's counters as the dashboard samples them: requests per service and listener
/// (`outbound`, `inbound`).
pub fn agent_readings(metrics: &Metrics) -> Vec<ui::Reading> {
    metrics
        .request_totals()
        .into_iter()
        .filter(|(_, service, _)| !service.is_empty())
        .map(|(role, service, count)| (service, Arc::from(role.as_str()), count))
        .collect()
}

/// The `url` of `/explain?url=<url>`, percent-decoded; without one, the 400 answer.
pub fn explain_url(query: Option<&str>) -> Result<String, (StatusCode, serde_json::Value)> {
    let url = query.unwrap_or("").split('&').find_map(|pair| {
        let value = pair.strip_prefix("url=")?;
        crate::http1::percent_decode(value, true)
    });
    url.ok_or_else(|| {
        (
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "bad-request", "detail": "expected /explain?url=/service/<name>/<path>"}),
        )
    })
}

/// An explanation, or the mesh error that refused its URL, as the admin listener answers.
pub fn explained(
    result: Result<serde_json::Value, crate::proxy::MeshError>,
) -> (StatusCode, serde_json::Value) {
    match result {
        Ok(body) => (StatusCode::OK, body),
        Err(error) => (
            error.status(),
            serde_json::json!({"error": error.code(), "detail": error.to_string()}),
        ),
    }
}

/// The answer to an admin request without the token, or `None` when it may go on: `/healthz`
/// and `/readyz` are open (probes carry no token), and so are the dashboard's page, script and
/// style, which hold no data (see [`ui`]); every other path needs `Authorization:
/// Bearer <token>`, else 401 with `WWW-Authenticate: Bearer` (RFC 6750: `invalid_token` when a
/// wrong token was given). The answer never repeats what was presented.
pub fn unauthorized<B>(token: Option<&Token>, req: &Request<B>) -> Option<Response<Body>> {
    let token = token?;
    if matches!(req.uri().path(), "/healthz" | "/readyz") || ui::is_asset(req.uri().path()) {
        return None;
    }
    let (challenge, detail) = match bearer(req.headers()) {
        Some(presented) if token.matches(presented) => return None,
        Some(_) => (
            "Bearer realm=\"skyline-admin\", error=\"invalid_token\"",
            "the bearer token is not this listener's",
        ),
        None => (
            "Bearer realm=\"skyline-admin\"",
            "this listener needs Authorization: Bearer <token>",
        ),
    };
    let mut response = json_response(
        StatusCode::UNAUTHORIZED,
        &serde_json::json!({"error": "unauthorized", "detail": detail}),
    );
    response.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    Some(response)
}

/// A JSON response, as every admin listener answers.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(format!("{body}\n")));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `/metrics`, as every admin listener answers it: the Prometheus text exposition of `metrics`,
/// with the catalog gauges of `catalog` when the role follows one.
pub fn metrics_response(metrics: &Metrics, catalog: Option<&CatalogState>) -> Response<Body> {
    if !metrics.enabled() {
        let mut response = Response::new(full(
            "metrics are off on this proxy ([metrics] enabled = false, or --metrics off)\n",
        ));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    let mut response = Response::new(full(metrics.encode(catalog)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    response
}
