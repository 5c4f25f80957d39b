//! The inbound proxy (:5041): `/service/<name>/<rest>?<query>` → a local instance of `<name>`
//! as `/<rest>?<query>` (`/service/x` and `/service/x/` both become `/`).

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::sync::watch;

use super::express::Name;
use super::express::{ClientBody, Head, Verdict};
use super::outbound::{path_of, split_service_path};
use super::resilience::SharedPolicies;
use super::{Body, Destination, Forwarder, Host, MeshError, as_grpc_status, is_grpc};
use crate::access::{Note, Tag};
use crate::authz::{Authz, X_SKYLINE_CALLER, asserted_caller};
use crate::catalog::ServiceName;
use crate::metrics::{ServiceLabel, known_service, service_label};
use crate::registration::Declared;
use crate::routing::{Endpoint, Lookup, Protocol, Route, Routes, declared_protocol};
use crate::serve::{Conn, Proxy};

#[derive(Clone)]
pub struct Inbound {
    inner: Arc<Inner>,
}

struct Inner {
    routes: Arc<Routes>,
    forwarder: Forwarder,
    policies: SharedPolicies,
    authz: Authz,
    own: Own,
}

/// The services this node's agent declares (`[[service]]`), and the node's address (where a
/// declared instance without an address listens); see `Inbound::declared_route`.
pub struct Own {
    pub services: watch::Receiver<Vec<Declared>>,
    pub node_address: IpAddr,
}

impl Inbound {
    pub fn new(
        routes: Arc<Routes>,
        forwarder: Forwarder,
        policies: SharedPolicies,
        authz: Authz,
        own: Own,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                routes,
                forwarder,
                policies,
                authz,
                own,
            }),
        }
    }
}

impl Proxy for Inbound {
    type Body = Body;

    /// Hands one request to a local instance; `note.label` is set to the service once it is
    /// known to the catalog, for the metrics. The authorization policies are checked here (the
    /// caller's assertion is believed from a peer with a mesh certificate only).
    async fn proxy(&self, req: Request<Incoming>, conn: Conn, note: &mut Note) -> Response<Body> {
        // The forwarder drops the caller headers the contract does not let through.
        let trusted = conn.mesh_peer.is_some();
        let uri = req.uri();
        let (name, rest) = match split_service_path(uri.path()) {
            Ok(split) => split,
            Err(e) => return e.into_response(""),
        };
        let found = self.local_route(name).or_else(|e| match e {
            MeshError::UnknownService | MeshError::NoCatalog => self.declared_route(name).ok_or(e),
            e => Err(e),
        });
        let (route, known) = match found {
            Ok(found) => found,
            Err(_) => match self.local_route_after_catch_up(name).await {
                Ok(found) => found,
                Err(e) => {
                    note.label = service_label(&self.inner.routes.load(), name);
                    return e.into_response(name);
                }
            },
        };
        // From here on the catalog's name for the service: `name` borrows from the request,
        // which the forwarder consumes.
        let name = known.as_str();
        // The policies are not held across the forwarding (a guard is a short loan).
        let checked = {
            let authz = self.inner.authz.load();
            if authz.open {
                Ok(Cow::Borrowed(rest))
            } else {
                let caller = asserted_caller(
                    trusted,
                    req.headers().get(&X_SKYLINE_CALLER).map(|v| v.as_bytes()),
                );
                authz
                    .check(caller, name, req.method().as_str(), rest)
                    .map_err(MeshError::from)
            }
        };
        let target = checked.and_then(|path| strip_prefix(&path, uri.query()));
        let target = match target {
            Ok(target) => target,
            Err(e) => {
                let grpc = is_grpc(&req);
                let mut response = e.into_response(name);
                if grpc {
                    as_grpc_status(&mut response);
                }
                note.label = Some(ServiceLabel::known(known));
                return response;
            }
        };
        let policy = self.inner.policies.load().for_service(name).clone();
        let upstream = Destination::last_hop(name, &route, &policy);
        let forwarded = self
            .inner
            .forwarder
            .forward(
                req,
                upstream,
                target,
                Host::Upstream,
                &conn,
                &mut note.trail,
            )
            .await;
        let response = forwarded.unwrap_or_else(|e| e.into_response(name));
        note.label = Some(ServiceLabel::known(known));
        note.tier = Tag::Static(LOCAL);
        response
    }

    const EXPRESS: bool = true;

    fn lane<S: crate::serve::Io>(
        &self,
        lane: crate::serve::lane::Lane<'_, S>,
    ) -> impl std::future::Future<Output = crate::serve::lane::End> + Send {
        super::express::connection::serve(self, lane)
    }
}

impl super::express::connection::Express for Inbound {
    /// [`proxy`](Self::proxy) for a request on the express lane. A request this node
    /// cannot route yet (or at all) is declined: `proxy` waits for the catalog or answers.
    async fn express(
        &self,
        head: &Head<'_>,
        body: Option<&mut ClientBody<'_>>,
        conn: &Conn,
        note: &mut Note,
    ) -> Verdict {
        let (path, query) = path_of(head.target);
        let Ok((name, rest)) = split_service_path(path) else {
            return Verdict::Decline;
        };
        let Ok((route, known)) = self.local_route(name) else {
            return Verdict::Decline;
        };
        // An instance that speaks only h2c gets the request over HTTP/2, which hyper's path
        // sends; the express lane writes HTTP/1.1.
        if route.endpoints.iter().any(|e| e.protocol == Protocol::H2c) {
            return Verdict::Decline;
        }
        let name = known.as_str();
        // The instance's target is the rest of the client's (a slice of it), or `/` and the
        // query when the rest is empty; with policies in force, the normalised rest. The
        // policies are not held across the forwarding (a guard is a short loan).
        let normal = {
            let authz = self.inner.authz.load();
            if authz.open {
                None
            } else {
                let caller = asserted_caller(conn.mesh_peer.is_some(), head.get(Name::Caller));
                match authz.check(caller, name, head.method, rest) {
                    Ok(Cow::Owned(normal)) => Some(normal),
                    Ok(Cow::Borrowed(_)) => None,
                    Err(e) => {
                        note.label = Some(ServiceLabel::known(known.clone()));
                        return Verdict::Error(e.into(), name.to_owned());
                    }
                }
            }
        };
        let target: Cow<'_, str> = match (normal, rest.is_empty(), query) {
            (Some(normal), _, None) => Cow::Owned(normal),
            (Some(normal), _, Some(query)) => Cow::Owned(format!("{normal}?{query}")),
            (None, false, _) => Cow::Borrowed(&head.target[path.len() - rest.len()..]),
            (None, true, None) => Cow::Borrowed("/"),
            (None, true, Some(query)) => Cow::Owned(format!("/?{query}")),
        };
        let policy = self.inner.policies.load().for_service(name).clone();
        let upstream = Destination::last_hop(name, &route, &policy);
        let forwarded = self
            .inner
            .forwarder
            .express(
                head,
                body,
                upstream,
                &target,
                Host::Upstream.into(),
                conn,
                &mut note.trail,
            )
            .await;
        let verdict = Verdict::of(forwarded, name);
        note.label = Some(ServiceLabel::known(known));
        note.tier = Tag::Static(LOCAL);
        verdict
    }
}

/// The access log's tier of the inbound proxy: a local instance.
const LOCAL: &str = "local";

/// How long the inbound side waits for its catalog to catch up with a caller's.
///
/// Agents learn of a change at slightly different moments. When another node's outbound proxy
/// already routes a service here but this node has not heard yet (a new instance, scale-up
/// fallback), answering 404 would fail a request the mesh can serve a few milliseconds later.
/// Waiting costs nothing on the hit path: only requests this node cannot route yet wait.
pub const CATALOG_SKEW: Duration = Duration::from_millis(250);

impl Inbound {
    /// The local route of `name` and the catalog's own name for the service.
    fn local_route(&self, name: &str) -> Result<(Arc<Route>, ServiceName), MeshError> {
        let table = self.inner.routes.load();
        let route = match table.inbound(name) {
            Lookup::Route(route) => route.clone(),
            Lookup::NoHealthy => return Err(MeshError::NoHealthyEndpoint),
            Lookup::Unknown => return Err(table.unknown()),
        };
        // A routed service is one the table knows.
        let known = known_service(&table, name).ok_or(MeshError::UnknownService)?;
        Ok((route, known))
    }

    /// The instances of `name` the agent declares, addressed directly, for a service this node's
    /// catalog does not show here.
    ///
    /// Another node's outbound proxy routes here from its catalog, and this node's can lag
    /// behind: its etcd watch failing over to another member, or a `[[service]]` added on
    /// SIGHUP while the registry is down (the agent keeps its last good catalog). The
    /// declaration is what the agent registers, so the inbound serves it rather than answering
    /// 404. Once the catalog shows the service on this node, the catalog rules: an instance
    /// whose check is critical is not routed, whatever the declaration says.
    fn declared_route(&self, name: &str) -> Option<(Arc<Route>, ServiceName)> {
        let own = &self.inner.own;
        let declared = own.services.borrow();
        let mut known = None;
        let endpoints = declared
            .iter()
            .filter(|d| d.name.as_str() == name)
            .map(|d| {
                known.get_or_insert_with(|| d.name.clone());
                let addr = SocketAddr::new(d.address.unwrap_or(own.node_address), d.port);
                let protocol = declared_protocol(
                    d.meta.get("protocol").map(String::as_str),
                    d.tags.iter().map(String::as_str),
                );
                Endpoint::new(addr, 1).speaking(protocol)
            })
            .collect();
        Some((Arc::new(Route::new(endpoints)), known?))
    }

    /// Looks again after each route-table swap, for at most [`CATALOG_SKEW`].
    async fn local_route_after_catch_up(
        &self,
        name: &str,
    ) -> Result<(Arc<Route>, ServiceName), MeshError> {
        let mut swaps = self.inner.routes.subscribe();
        let deadline = tokio::time::Instant::now() + CATALOG_SKEW;
        loop {
            let found = self.local_route(name);
            if found.is_ok() {
                return found;
            }
            match tokio::time::timeout_at(deadline, swaps.changed()).await {
                Ok(Ok(())) => continue,
                _ => return found,
            }
        }
    }
}

/// The instance's request target: the rest of the path (at least `/`) and the query, unchanged.
pub fn strip_prefix(rest: &str, query: Option<&str>) -> Result<PathAndQuery, MeshError> {
    let path = if rest.is_empty() { "/" } else { rest };
    let mut target = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
    target.push_str(path);
    if let Some(q) = query {
        target.push('?');
        target.push_str(q);
    }
    PathAndQuery::from_maybe_shared(Bytes::from(target))
        .map_err(|_| MeshError::bad_request("invalid request target"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strips_the_prefix_and_keeps_the_query() {
        assert_eq!(strip_prefix("", None).unwrap(), "/");
        assert_eq!(strip_prefix("/", None).unwrap(), "/");
        assert_eq!(strip_prefix("", Some("a=1")).unwrap(), "/?a=1");
        assert_eq!(
            strip_prefix("/media/x", Some("q=%20&b")).unwrap(),
            "/media/x?q=%20&b"
        );
    }

    proptest! {
        #[test]
        fn a_rewritten_target_keeps_its_query(
            rest in "(/[a-z0-9%._-]{0,8}){0,3}",
            query in proptest::option::of("[a-z0-9=&%]{0,16}"),
        ) {
            let target = strip_prefix(&rest, query.as_deref()).unwrap();
            prop_assert_eq!(target.query(), query.as_deref());
            prop_assert!(target.path().starts_with('/'));
        }
    }
}
