//! Where the bridge would send a request, and why: `/explain?url=...` on the bridge's admin
//! listener (and `skyline explain <url> --admin <bridge admin>`).
//!
//! A Skyline URL (`/service/<name>/<path>`) goes to Kubernetes: the answer gives the cluster
//! DNS name and port the service maps to (template, namespace, overrides), the rewritten URL,
//! what the request would speak, and what the cluster DNS answers for the name now. A URL whose
//! host is a cluster DNS name (`http://<name>.<ns>.svc.cluster.local/<path>`) goes the other
//! way: the rewritten Skyline path and the gateways it would go to.

use std::time::Duration;

use http::uri::PathAndQuery;
use serde_json::{Value, json};

use super::Bridge;
use crate::contract::{cluster_service, skyline_target};
use crate::proxy::MeshError;
use crate::proxy::inbound::strip_prefix;
use crate::proxy::outbound::explain::{describe, policy_view, split_url};
use crate::proxy::outbound::{path_of, split_service_path};
use crate::routing::Protocol;

/// How long `/explain` waits for the cluster DNS.
const DNS_TIMEOUT: Duration = Duration::from_secs(3);

impl Bridge {
    /// The explanation of a request to `url`.
    pub async fn explain(&self, url: &str) -> Result<Value, MeshError> {
        let (host, target) = split_url(url);
        let names = &self.inner.names;
        let cluster = host
            .and_then(|h| cluster_service(h, &names.cluster_domain))
            .map(std::borrow::Cow::into_owned);
        let policy = policy_view(&self.inner.resilience);
        if let Some(name) = cluster.filter(|_| !target.starts_with("/service/")) {
            let pq = PathAndQuery::try_from(target)
                .map_err(|_| MeshError::bad_request("invalid request target"))?;
            let rewritten = skyline_target(&name, Some(&pq)).map_err(MeshError::bad_request)?;
            let gateways = self.gateways();
            let source = if self.inner.gateways.is_some() {
                "the configured gateways (--gateway)"
            } else {
                "the passing skyline-gateway instances of the catalog"
            };
            let decision = match &gateways {
                Some(route) if !route.is_empty() => json!({
                    "why": "the host is a Kubernetes Service name that targets the bridge: the \
                            request goes to the mesh through the gateway pool, marked as coming \
                            from a bridge so that it never comes back to one",
                }),
                _ => json!({
                    "answer": 503,
                    "error": "no-healthy-endpoint",
                    "why": "the request would go to the gateway pool, and no gateway is known",
                }),
            };
            return Ok(json!({
                "service": name,
                "role": "bridge",
                "direction": "kubernetes → skyline",
                "cluster_dns_name": host,
                "rewritten_url": rewritten.as_str(),
                "known_in_catalog": self.known_service(&name).is_some(),
                "decision": decision,
                "gateways": {
                    "source": source,
                    "route": gateways.map(|r| describe(&r, &self.inner.resilience.outlier)),
                },
                "policy": policy,
            }));
        }
        let (path, query) = path_of(target);
        let (name, rest) = split_service_path(path)?;
        let rewritten = strip_prefix(rest, query)?;
        let (dns, port) = names.target(name);
        let speaks = match names.overrides.get(name).and_then(|o| o.protocol) {
            Some(Protocol::H2c) => "h2c (the service's override)",
            Some(_) => "HTTP/1.1 (the service's override)",
            None => "HTTP/1.1; gRPC calls over h2c",
        };
        let fqdn = format!("{dns}.");
        let lookup =
            tokio::time::timeout(DNS_TIMEOUT, self.inner.resolver.lookup_ip(fqdn.as_str()));
        let (resolved, decision) = match lookup.await {
            Ok(Ok(found)) => {
                let ips: Vec<String> = found.iter().map(|ip| ip.to_string()).collect();
                let why = json!({
                    "why": "a Skyline URL: the bridge sends it to the Kubernetes Service the \
                            service name maps to, through the cluster DNS",
                });
                (json!(ips), why)
            }
            Ok(Err(e)) if e.is_nx_domain() || e.is_no_records_found() => (
                json!([]),
                json!({
                    "answer": 404,
                    "error": "unknown-service",
                    "why": "the cluster DNS does not know the name",
                }),
            ),
            Ok(Err(error)) => (
                json!(null),
                json!({
                    "answer": 503,
                    "error": "no-healthy-endpoint",
                    "why": format!("the cluster DNS lookup failed: {error}"),
                }),
            ),
            Err(_) => (
                json!(null),
                json!({
                    "answer": 503,
                    "error": "no-healthy-endpoint",
                    "why": format!("the cluster DNS did not answer within {}s", DNS_TIMEOUT.as_secs()),
                }),
            ),
        };
        Ok(json!({
            "service": name,
            "role": "bridge",
            "direction": "skyline → kubernetes",
            "cluster_dns_name": dns,
            "port": port,
            "rewritten_url": format!("http://{dns}:{port}{rewritten}"),
            "speaks": speaks,
            "resolves_to": resolved,
            "override": names.overrides.contains_key(name),
            "decision": decision,
            "policy": policy,
        }))
    }
}
