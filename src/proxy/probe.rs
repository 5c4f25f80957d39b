//! Active health probing, for services whose policy asks for it (catalogs without checks, such
//! as a plain file): every `interval`, `GET <path>` on each endpoint the node routes the service
//! to — its local instances directly, and other nodes' inbound proxies as
//! `/service/<name><path>` (which probes the node's instances through it). An endpoint that fails
//! `unhealthy` probes in a row is taken out of rotation until it passes `healthy` in a row; when
//! every endpoint of a route is out, the route panics and uses all of them. An instance that
//! speaks only h2c is probed over HTTP/2, the rest over HTTP/1.1.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt, Either};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::POOL_IDLE_TIMEOUT;
use super::h2::H2Pool;
use super::pool::{Buffered, Limits, Pool};
use super::resilience::{Probe, SharedPolicies};
use crate::catalog::ServiceName;
use crate::routing::{Endpoint, Protocol, Route, Routes};
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
    let pool = Pools {
        http1: Pool::with_tls(POOL_IDLE_TIMEOUT, tls.clone()),
        h2: H2Pool::with_tls(tls),
    };
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

/// The prober's connections: HTTP/1.1, and HTTP/2 for instances that speak only h2c.
#[derive(Clone)]
struct Pools {
    http1: Pool,
    h2: H2Pool,
}

fn spawn_probes(pool: &Pools, route: &Route, target: &str, probe: &Probe, service: &ServiceName) {
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
async fn check(pool: &Pools, endpoint: &Endpoint, target: &str, probe: &Probe) -> bool {
    let Ok(mut req) = Request::get(target).body(Either::Right(Buffered::empty())) else {
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
        let response = if endpoint.protocol == Protocol::H2c {
            pool.h2.send(endpoint.addr, req, limits).await.ok()?
        } else {
            pool.http1
                .send(endpoint.addr, req, None, limits)
                .await
                .ok()?
        };
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::Response;
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::*;

    /// A server that speaks only HTTP/2 (h2c with prior knowledge) and answers 200.
    async fn h2_only() -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_h2c_only_instance_is_probed_over_http2_and_passes() {
        let addr = h2_only().await;
        let pools = Pools {
            http1: Pool::new(POOL_IDLE_TIMEOUT),
            h2: H2Pool::default(),
        };
        let probe = Probe {
            timeout: Duration::from_secs(2),
            ..Probe::default()
        };
        let h2c = Endpoint::new(addr, 1).speaking(Protocol::H2c);
        assert!(check(&pools, &h2c, "/health", &probe).await);
        // The same server probed over HTTP/1.1 fails: the protocol is what made it pass.
        let http1 = Endpoint::new(addr, 1);
        assert!(!check(&pools, &http1, "/health", &probe).await);
    }
}
