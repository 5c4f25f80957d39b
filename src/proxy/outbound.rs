//! The outbound proxy (:5040): `/service/<name>/<rest>` → the inbound proxy of a node that runs a
//! healthy instance of `<name>`, full path kept; unknown services → the catch-all (configured, or
//! the catalog's `skyline-gateway` instances). A cluster-DNS-style request
//! (`Host: <name>.<ns>.svc.cluster.local`, path `/<rest>`) is taken as `/service/<name>/<rest>`,
//! so an application uses the same URL on every platform.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::express::{ClientBody, Head, Name, Verdict};
use super::resilience::SharedPolicies;
use super::{
    Body, DEFAULT_MAX_HOPS, Destination, Fallback, Forwarder, Hop, Host, MeshError, X_SKYLINE_HOPS,
    as_grpc_status, is_grpc, next_hop,
};
use crate::access::{Note, Tag};
use crate::authz::{Authz, X_SKYLINE_CALLER_TOKEN, caller_by_address};
use crate::catalog::ServiceName;
use crate::contract::{DEFAULT_CLUSTER_DOMAIN, cluster_service, skyline_target};
use crate::metrics::service_label;
use crate::routing::reach::{Admit, Observed};
use crate::routing::{Lookup, Route, Routes, Table};
use crate::serve::{Conn, Proxy};

pub(crate) mod explain;

#[derive(Clone)]
pub struct Outbound {
    inner: Arc<Inner>,
}

struct Inner {
    routes: Arc<Routes>,
    forwarder: Forwarder,
    policies: SharedPolicies,
    /// Where requests for services the catalog does not route go (the gateway pool).
    catch_all: Option<Arc<Route>>,
    /// The callers' credentials (see [`crate::authz`]).
    authz: Authz,
    /// The node's address: a client calling from it is no instance in particular.
    node: IpAddr,
}

impl Outbound {
    pub fn new(
        routes: Arc<Routes>,
        forwarder: Forwarder,
        policies: SharedPolicies,
        catch_all: Option<Route>,
    ) -> Self {
        let catch_all = catch_all.filter(|r| !r.is_empty()).map(Arc::new);
        Self {
            inner: Arc::new(Inner {
                routes,
                forwarder,
                policies,
                catch_all,
                authz: Authz::default(),
                node: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            }),
        }
    }

    /// The outbound proxy of node `node`, naming callers with `authz`'s credentials. Call
    /// before the handler is cloned.
    pub fn with_callers(mut self, authz: Authz, node: IpAddr) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.authz = authz;
            inner.node = node;
        }
        self
    }
}

impl Proxy for Outbound {
    type Body = Body;

    /// Routes and forwards one request; `note.label` is set to the service once it is parsed,
    /// for the metrics. A gRPC call gets mesh errors (its own hop's or a later one's) as gRPC
    /// statuses.
    async fn proxy(&self, req: Request<Incoming>, conn: Conn, note: &mut Note) -> Response<Body> {
        let grpc = is_grpc(&req);
        let mut response = self.route_and_forward(req, conn, note).await;
        if grpc {
            as_grpc_status(&mut response);
        }
        response
    }

    const EXPRESS: bool = true;

    /// Not when every request to the peers goes over HTTP/2 (the express lane writes HTTP/1.1).
    fn express_lane(&self) -> bool {
        !self.inner.forwarder.peers_h2()
    }

    fn lane<S: crate::serve::Io>(
        &self,
        lane: crate::serve::lane::Lane<'_, S>,
    ) -> impl std::future::Future<Output = crate::serve::lane::End> + Send {
        super::express::connection::serve(self, lane)
    }
}

impl super::express::connection::Express for Outbound {
    /// [`proxy`](Self::proxy) for a request on the express lane. A cluster-DNS-style
    /// request and every refusal before forwarding are declined: `proxy` answers those.
    async fn express(
        &self,
        head: &Head<'_>,
        body: Option<&mut ClientBody<'_>>,
        conn: &Conn,
        note: &mut Note,
    ) -> Verdict {
        let path = path_of(head.target).0;
        let Ok(name) = service_of(path) else {
            return Verdict::Decline;
        };
        let inner = &self.inner;
        let Ok(hops) = next_hop(head.get(Name::Hops), DEFAULT_MAX_HOPS) else {
            return Verdict::Decline;
        };
        let table = inner.routes.load();
        let Ok((route, then, hold)) = inner.route(&table, name) else {
            return Verdict::Decline;
        };
        note.label = service_label(&table, name);
        let direct = inner.is_direct(&table, &route);
        let caller = self.caller(&table, head.get(Name::CallerToken), conn);
        drop(table);
        let policy = inner.policies.load().for_service(name).clone();
        let then = then.as_deref().map(|r| [r]);
        let fallback = then.as_ref().map(|r| Fallback::new(r, hold));
        let mut upstream = Destination::first_hop(name, note.label.is_some(), &route, &policy);
        upstream.fallback = fallback.as_ref();
        let hop = Hop {
            host: Host::Keep,
            hops: Some(hops),
            caller: caller.as_ref().map(ServiceName::as_str),
        };
        let forwarded = inner
            .forwarder
            .express(
                head,
                body,
                upstream,
                head.target,
                hop,
                conn,
                &mut note.trail,
            )
            .await;
        note.tier = tier(direct, fallback.as_ref());
        Verdict::of(forwarded, name)
    }
}

impl Outbound {
    /// The calling service this proxy asserts over mesh TLS (none without it): the one whose
    /// credential the application presented (`token`), else the one local instance at the
    /// client's address.
    fn caller(&self, table: &Table, token: Option<&[u8]>, conn: &Conn) -> Option<ServiceName> {
        let inner = &self.inner;
        if !inner.forwarder.mesh_tls() {
            return None;
        }
        let caller = match token {
            Some(token) => inner.authz.load().caller_by_token(token).cloned(),
            None => caller_by_address(table, inner.node, conn.peer.ip()),
        };
        if caller.is_none() {
            tracing::debug!(peer = %conn.peer, token = token.is_some(), "caller unknown");
        }
        caller
    }

    async fn route_and_forward(
        &self,
        req: Request<Incoming>,
        conn: Conn,
        note: &mut Note,
    ) -> Response<Body> {
        let Some(target) = req.uri().path_and_query().cloned() else {
            return MeshError::bad_request("expected /service/<name>/<path>").into_response("");
        };
        // Only a request that is not already a Skyline path can be a cluster-DNS-style one.
        let cluster = (!target.path().starts_with("/service/"))
            .then(|| cluster_name(&req))
            .flatten();
        let target = match cluster {
            Some(name) => match skyline_target(&name, Some(&target)) {
                Ok(target) => target,
                Err(e) => return MeshError::bad_request(e).into_response(&name),
            },
            None => target,
        };
        let name = match service_of(target.path()) {
            Ok(name) => name,
            Err(e) => return e.into_response(""),
        };
        let inner = &self.inner;
        // One table for the metrics label and the route.
        let table = inner.routes.load();
        note.label = service_label(&table, name);
        let headers = req.headers();
        let hops = match next_hop(
            headers.get(&X_SKYLINE_HOPS).map(|v| v.as_bytes()),
            DEFAULT_MAX_HOPS,
        ) {
            Ok(hops) => hops,
            Err(e) => return e.into_response(name),
        };
        // The application's own `x-skyline-caller*` headers never pass (see `headers`); over
        // mesh TLS the caller this proxy establishes is asserted instead.
        let token = headers.get(&X_SKYLINE_CALLER_TOKEN).map(|v| v.as_bytes());
        let caller = self.caller(&table, token, &conn);
        let plan = inner.route(&table, name);
        let (route, then, hold) = match plan {
            Ok(plan) => plan,
            Err(e) => return e.into_response(name),
        };
        let direct = inner.is_direct(&table, &route);
        drop(table);
        let policy = inner.policies.load().for_service(name).clone();
        let then = then.as_deref().map(|r| [r]);
        let fallback = then.as_ref().map(|r| Fallback::new(r, hold));
        let mut upstream = Destination::first_hop(name, note.label.is_some(), &route, &policy);
        upstream.fallback = fallback.as_ref();
        let forwarded = inner
            .forwarder
            .forward(
                req,
                upstream,
                target.clone(),
                Hop {
                    host: Host::Keep,
                    hops: Some(hops),
                    caller: caller.as_ref().map(ServiceName::as_str),
                },
                &conn,
                &mut note.trail,
            )
            .await;
        note.tier = tier(direct, fallback.as_ref());
        forwarded.unwrap_or_else(|e| e.into_response(name))
    }
}

/// Where a request goes: the route to try first, the one to go on to when every endpoint of the
/// first is unreachable (see [`Fallback`]), and the hold of a route that answers again.
type Plan = (Arc<Route>, Option<Arc<Route>>, Duration);

impl Inner {
    /// The routes of a request for `name` in `table`: the service's own, then the catch-all;
    /// or the catch-all alone.
    /// Where requests go that the catalog does not route: the configured catch-all, else the
    /// catalog's gateways.
    fn catch_all<'a>(&'a self, table: &'a Table) -> Option<&'a Arc<Route>> {
        self.catch_all
            .as_ref()
            .or((!table.gateways.is_empty()).then_some(&table.gateways))
    }

    fn route(&self, table: &Table, name: &str) -> Result<Plan, MeshError> {
        self.route_with(table, name, Observed::admit)
    }

    /// [`route`](Self::route), asking a troubled route's reachability with `admit` (which
    /// [`explain`](Outbound::explain) replaces with a look that takes no trial).
    fn route_with(
        &self,
        table: &Table,
        name: &str,
        admit: impl FnOnce(&Observed, Instant, Duration) -> Admit,
    ) -> Result<Plan, MeshError> {
        let catch_all = self.catch_all(table);
        let hold = table.fallback_hold;
        let route = match table.outbound(name) {
            Lookup::Route(route) => match catch_all {
                // Routable again only recently: the gateway decides until the hold passes.
                Some(gateway) if table.warming(name) => gateway,
                // Found unreachable by requests: the gateway, but for a trial now and then.
                Some(gateway) => match admit(&route.observed, Instant::now(), hold) {
                    Admit::Use | Admit::Trial => {
                        return Ok((route.clone(), Some(gateway.clone()), hold));
                    }
                    Admit::Skip => gateway,
                },
                None => route,
            },
            // As consul-template did for the seed: a service with nothing healthy here is
            // treated like an unknown one, so the gateway can fall back to another platform.
            Lookup::NoHealthy => catch_all.ok_or(MeshError::NoHealthyEndpoint)?,
            Lookup::Unknown => catch_all.ok_or_else(|| table.unknown())?,
        };
        Ok((route.clone(), None, hold))
    }
}

/// The access log's tier of a request the outbound proxy forwarded: `direct` when the
/// service's own route answered, `catch-all` when the gateway pool did.
fn tier(direct: bool, fallback: Option<&Fallback<'_>>) -> Tag {
    let served_direct = direct && fallback.is_none_or(|f| f.served() == 0);
    Tag::Static(if served_direct { "direct" } else { "catch-all" })
}

impl Inner {
    /// Whether `route` is the service's own (not the catch-all's).
    fn is_direct(&self, table: &Table, route: &Arc<Route>) -> bool {
        !self.catch_all(table).is_some_and(|c| Arc::ptr_eq(c, route))
    }
}

/// The service name of a cluster-DNS `Host` header, if the request has one.
fn cluster_name(req: &Request<Incoming>) -> Option<String> {
    let host = req.headers().get(http::header::HOST)?.to_str().ok()?;
    cluster_service(host, DEFAULT_CLUSTER_DOMAIN).map(|n| n.into_owned())
}

/// A request target's path and query (after `?`), split with memchr (`str::split` is slower).
pub fn path_of(target: &str) -> (&str, Option<&str>) {
    match memchr::memchr(b'?', target.as_bytes()) {
        Some(i) => (&target[..i], Some(&target[i + 1..])),
        None => (target, None),
    }
}

/// The service name of a Skyline path `/service/<name>[/<rest>]`, validated.
pub fn service_of(path: &str) -> Result<&str, MeshError> {
    let (name, _) = split_service_path(path)?;
    Ok(name)
}

/// Splits `/service/<name>[/<rest>]` into the validated name and `/<rest>` (possibly empty).
pub fn split_service_path(path: &str) -> Result<(&str, &str), MeshError> {
    let Some(after) = path.strip_prefix("/service/") else {
        return Err(MeshError::bad_request("expected /service/<name>/<path>"));
    };
    let slash = memchr::memchr(b'/', after.as_bytes()).unwrap_or(after.len());
    let (name, rest) = after.split_at(slash);
    if !ServiceName::is_valid(name) {
        return Err(MeshError::bad_request("invalid service name"));
    }
    Ok((name, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_skyline_paths() {
        assert_eq!(split_service_path("/service/x").unwrap(), ("x", ""));
        assert_eq!(split_service_path("/service/x/").unwrap(), ("x", "/"));
        assert_eq!(
            split_service_path("/service/a.b/c/d").unwrap(),
            ("a.b", "/c/d")
        );
        for bad in [
            "/",
            "/services/x",
            "/service/",
            "/service//x",
            "/service/X/",
            "/service/%61/",
            "/service/../x",
        ] {
            assert!(split_service_path(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn name_and_rest_rebuild_the_path(
            name in "[a-z0-9]([a-z0-9._-]{0,20}[a-z0-9])?",
            rest in "(/[a-zA-Z0-9._~%-]{0,10}){0,4}",
        ) {
            let path = format!("/service/{name}{rest}");
            let (n, r) = split_service_path(&path).unwrap();
            prop_assert_eq!(n, name.as_str());
            prop_assert_eq!(r, rest.as_str());
        }
    }
}
