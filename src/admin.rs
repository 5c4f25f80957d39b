//! The admin listener (:5050): `/healthz`, `/readyz` (is a catalog in force, and how old is it),
//! `/routes` (the live route table as JSON, with its `version`: how many tables the agent
//! swapped in since it started), `/explain?url=<url>` (why a request to that URL would go
//! where it goes, see [`Outbound::explain`]) and `/metrics` (Prometheus text, see
//! [`crate::metrics`]).

use std::sync::Arc;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::catalog::{CatalogState, Subscriber};
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
            }),
        }
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
        let url = query.unwrap_or("").split('&').find_map(|pair| {
            let value = pair.strip_prefix("url=")?;
            crate::registry::api::percent_decode(value, true)
        });
        let Some(url) = url else {
            return (
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "bad-request", "detail": "expected /explain?url=/service/<name>/<path>"}),
            );
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
                serde_json::json!({"error": "not-found", "paths": ["/healthz", "/readyz", "/routes", "/explain", "/metrics"]}),
            ),
        };
        json_response(status, &body)
    }
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
    let mut response = Response::new(full(metrics.encode(catalog)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    response
}
