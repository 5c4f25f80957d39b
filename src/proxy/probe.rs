//! Active health probing, for services whose policy asks for it (catalogs without checks, such
//! as a plain file): every `interval`, `GET <path>` on each endpoint the node routes the service
//! to — its local instances directly, and other nodes' inbound proxies as
//! `/service/<name><path>` (which probes the node's instances through it). An endpoint that fails
//! `unhealthy` probes in a row is taken out of rotation until it passes `healthy` in a row; when
//! every endpoint of a route is out, the route panics and uses all of them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt, Either, Full};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::POOL_IDLE_TIMEOUT;
use super::pool::{Limits, Pool};
use super::resilience::{Probe, SharedPolicies};
use crate::catalog::ServiceName;
use crate::routing::{Endpoint, Route, Routes};
use crate::tls::MeshTls;

/// How often the prober looks for probes that are due.
const TICK: Duration = Duration::from_millis(100);

/// Probes until `shutdown`; over mesh TLS (when `tls`) to other nodes' inbound proxies.
pub async fn run(
    routes: Arc<Routes>,
    policies: SharedPolicies,
    tls: Option<MeshTls>,
    shutdown: CancellationToken,
) {
    let pool = Pool::with_tls(POOL_IDLE_TIMEOUT, tls);
    let mut due: HashMap<ServiceName, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let now = Instant::now();
        let table = routes.load_full();
        let policies = policies.load_full();
        let probed: Vec<(&ServiceName, &Probe)> = if policies.default.probe.is_some() {
            table
                .outbound
                .keys()
                .filter_map(|s| Some((s, policies.for_service(s.as_str()).probe.as_ref()?)))
                .collect()
        } else {
            policies
                .services
                .iter()
                .filter_map(|(s, p)| Some((s, p.probe.as_ref()?)))
                .collect()
        };
        due.retain(|service, _| probed.iter().any(|(s, _)| *s == service));
        for (service, probe) in probed {
            let next = due.entry(service.clone()).or_insert(now);
            if *next > now {
                continue;
            }
            *next = now + probe.interval;
            let remote = format!("/service/{service}{}", probe.path);
            let routes = [
                (table.outbound.get(service), remote.as_str()),
                (table.inbound.get(service), probe.path.as_str()),
            ];
            for (route, target) in routes {
                if let Some(route) = route {
                    spawn_probes(&pool, route, target, probe, service);
                }
            }
        }
    }
}

fn spawn_probes(pool: &Pool, route: &Route, target: &str, probe: &Probe, service: &ServiceName) {
    for endpoint in route.endpoints.iter() {
        let (pool, endpoint, probe) = (pool.clone(), endpoint.clone(), probe.clone());
        let (target, service) = (target.to_owned(), service.clone());
        tokio::spawn(async move {
            let passed = check(&pool, &endpoint, &target, &probe).await;
            let changed = endpoint
                .state
                .record_probe(passed, probe.unhealthy, probe.healthy);
            match changed {
                Some(true) => {
                    tracing::warn!(%service, endpoint = %endpoint.addr, path = %target, "probe failed: endpoint out of rotation")
                }
                Some(false) => {
                    tracing::info!(%service, endpoint = %endpoint.addr, "probe passed: endpoint back in rotation")
                }
                None => {}
            }
        });
    }
}

/// One probe: a 2xx or 3xx answer within the timeout passes.
async fn check(pool: &Pool, endpoint: &Endpoint, target: &str, probe: &Probe) -> bool {
    let Ok(mut req) = Request::get(target).body(Either::Right(Full::new(Bytes::new()))) else {
        return false;
    };
    let headers = req.headers_mut();
    headers.insert(header::HOST, endpoint.host.clone());
    headers.insert(
        header::USER_AGENT,
        HeaderValue::from_static("skyline-probe"),
    );
    let limits = Limits {
        connect: probe.timeout,
        idle: probe.timeout,
        mesh: endpoint.mesh,
    };
    let answer = async {
        let response = pool.send(endpoint.addr, req, None, limits).await.ok()?;
        let ok = response.status().is_success() || response.status().is_redirection();
        // Read to the end, so the connection goes back to the pool.
        response.into_body().collect().await.ok()?;
        Some(ok)
    };
    matches!(
        tokio::time::timeout(probe.timeout, answer).await,
        Ok(Some(true))
    )
}
