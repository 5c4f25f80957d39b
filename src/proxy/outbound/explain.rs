//! Why a request would go where it goes: `/explain?url=...` on the agent's admin listener and
//! `skyline explain <url>`.
//!
//! The answer comes from the same decision the outbound proxy takes ([`Inner::route_with`]),
//! with the one difference that asking does not take a troubled route's trial request; the
//! endpoint states are the ones requests left (`/routes` shows them too).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Outbound, path_of, service_of};
use crate::contract::{DEFAULT_CLUSTER_DOMAIN, cluster_service};
use crate::proxy::MeshError;
use crate::proxy::resilience::Resilience;
use crate::routing::balance::Outlier;
use crate::routing::balance::now_ns;
use crate::routing::reach::Admit;
use crate::routing::{Lookup, Route};

impl Outbound {
    /// The explanation of a request to `url`: a Skyline path (`/service/<name>/<path>`), a whole
    /// URL (`http://localhost:5040/service/...`), or a cluster-DNS URL
    /// (`http://<name>.<namespace>.svc.cluster.local/...`).
    pub fn explain(&self, url: &str) -> Result<Value, MeshError> {
        let (host, target) = split_url(url);
        let name = match host.and_then(|h| cluster_service(h, DEFAULT_CLUSTER_DOMAIN)) {
            Some(name) => name.into_owned(),
            None => service_of(path_of(target).0)?.to_owned(),
        };
        let inner = &self.inner;
        let table = inner.routes.load();
        let (catalog, own) = match table.outbound(&name) {
            Lookup::Route(route) => ("routable", Some(route.clone())),
            Lookup::NoHealthy => ("known, no routable instance", None),
            Lookup::Unknown => ("unknown", None),
        };
        let catch_all = inner.catch_all(&table).cloned();
        let mut trouble = None;
        let plan = inner.route_with(&table, &name, |observed, now, hold| {
            let admit = observed.peek(now, hold);
            trouble = Some(admit);
            admit
        });
        let warming = table.warming(&name);
        let hold = table.fallback_hold;
        drop(table);
        let policy = inner.policies.load().for_service(&name).clone();
        let mut out = json!({
            "service": name,
            "catalog": catalog,
            "policy": policy_view(&policy),
        });
        let (route, then) = match plan {
            Ok((route, then, _)) => (route, then),
            Err(error) => {
                out["decision"] = json!({
                    "answer": error.status().as_u16(),
                    "error": error.code(),
                    "why": match catalog {
                        "unknown" => "the catalog does not know the service and no catch-all is configured",
                        _ => "no instance of the service is routable and no catch-all is configured",
                    },
                });
                return Ok(out);
            }
        };
        let is_catch_all = catch_all.as_ref().is_some_and(|c| Arc::ptr_eq(c, &route));
        let why = if !is_catch_all {
            match (then.is_some(), trouble) {
                (true, Some(Admit::Trial)) => {
                    "requests found the route unreachable: this one would be its trial, the \
                     catch-all next if it fails"
                }
                (true, _) => {
                    "the catalog routes the service; the catch-all takes the request within \
                     the same request if every endpoint refuses or is ejected"
                }
                (false, _) => "the catalog routes the service (no catch-all to fall back on)",
            }
        } else if own.is_some() && warming {
            "the service became routable only recently: the catch-all decides until the hold \
             passes"
        } else if own.is_some() {
            "requests found the route unreachable: the catch-all, with a trial of the route now \
             and then"
        } else if catalog == "unknown" {
            "the catalog does not know the service: the catch-all (the gateway pool)"
        } else {
            "no instance of the service is routable: the catch-all, as for an unknown service"
        };
        out["decision"] = json!({
            "route": if is_catch_all { "catch-all" } else { "service" },
            "why": why,
            "fallback": then.as_ref().map(|_| "catch-all"),
            "hold_seconds": hold.as_secs_f64(),
        });
        out["route"] = describe(&route, &policy.outlier);
        if let Some(then) = &then {
            out["catch_all"] = describe(then, &policy.outlier);
        }
        if let Some(own) = own.filter(|_| is_catch_all) {
            out["service_route"] = describe(&own, &policy.outlier);
        }
        let pick = route.choose(&[], policy.balance, &policy.outlier);
        out["next_pick"] = json!(pick.map(|c| json!({
            "addr": c.endpoint.addr.to_string(),
            "panic": c.panic,
        })));
        Ok(out)
    }
}

/// The policy of calls to the service, durations as the config writes them ("1.5s").
pub(crate) fn policy_view(policy: &Resilience) -> Value {
    let text = |d: Duration| format!("{}s", d.as_secs_f64());
    json!({
        "connect_timeout": text(policy.connect_timeout),
        "request_timeout": text(policy.request_timeout),
        "attempt_timeout": policy.attempt_timeout.map(text),
        "idle_timeout": text(policy.idle_timeout),
        "max_request_body": policy.max_request_body,
        "retries": policy.retries,
        "balance": policy.balance,
        "ejection": {
            "consecutive_failures": policy.outlier.consecutive_failures,
            "base_ejection": text(policy.outlier.base_ejection),
            "max_ejected_percent": policy.outlier.max_ejected_percent,
        },
        "active_probe": policy.probe.is_some(),
    })
}

/// A route's endpoints, with what requests left in their state, and its retry budget.
pub(crate) fn describe(route: &Route, outlier: &Outlier) -> Value {
    let reach = route.observed.reach().label();
    let endpoints: Vec<Value> = route
        .endpoints
        .iter()
        .map(|e| {
            let view = e.state.view();
            let why = if view.ejected {
                format!(
                    "ejected after {} failures in a row",
                    outlier.consecutive_failures
                )
            } else if view.probe_down {
                "failing its active health probe".to_owned()
            } else {
                "eligible".to_owned()
            };
            json!({
                "addr": e.addr.to_string(),
                "weight": e.weight,
                "eligible": !view.ejected && !view.probe_down,
                "why": why,
                "state": view,
            })
        })
        .collect();
    json!({
        "reach": reach,
        "endpoints": endpoints,
        "retry_budget_left": route.budget.left_at(now_ns()),
    })
}

/// `url` as (host, path and query): a whole URL's authority and target, or a bare target.
pub(crate) fn split_url(url: &str) -> (Option<&str>, &str) {
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return (None, url);
    };
    let slash = rest.find('/').unwrap_or(rest.len());
    let (authority, target) = rest.split_at(slash);
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    (Some(host), if target.is_empty() { "/" } else { target })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_and_target() {
        assert_eq!(split_url("/service/a/b"), (None, "/service/a/b"));
        assert_eq!(
            split_url("http://localhost:5040/service/a/b?c"),
            (Some("localhost"), "/service/a/b?c")
        );
        assert_eq!(
            split_url("http://web.default.svc.cluster.local"),
            (Some("web.default.svc.cluster.local"), "/")
        );
    }
}
