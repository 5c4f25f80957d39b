//! The contract's vocabulary shared by every role: what a service name may be
//! ([`ServiceName`], the `<name>` of `/service/<name>/`), well-known service names in the catalog,
//! the default ports, the headers roles set for each other, and the cluster-DNS names a
//! bridge turns into Skyline URLs and back, and the contract headers every listener reads or
//! writes (`x-skyline-error`, `x-request-id`). The rules applied to headers on the way are in
//! [`crate::proxy`]; the URL shapes in [`crate::proxy::outbound`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue};

// === Service names ===

/// A validated service name: `[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName(Arc<str>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid service name {0:?}: expected 1-63 of [a-z0-9._-], starting and ending with [a-z0-9]"
)]
pub struct InvalidServiceName(pub String);

impl ServiceName {
    /// Checks `name` against the contract's pattern without allocating.
    pub fn is_valid(name: &str) -> bool {
        let b = name.as_bytes();
        let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let inner = |c: u8| edge(c) || matches!(c, b'.' | b'_' | b'-');
        match b {
            [] => false,
            [only] => edge(*only),
            [first, middle @ .., last] => {
                b.len() <= 63 && edge(*first) && edge(*last) && middle.iter().all(|&c| inner(c))
            }
        }
    }

    pub fn parse(name: &str) -> Result<Self, InvalidServiceName> {
        if Self::is_valid(name) {
            Ok(Self(Arc::from(name)))
        } else {
            Err(InvalidServiceName(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::borrow::Borrow<str> for ServiceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for ServiceName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl std::str::FromStr for ServiceName {
    type Err = InvalidServiceName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// === Well-known names and headers ===

/// The catalog service of the gateway pool.
pub const GATEWAY_SERVICE: &str = "skyline-gateway";
/// The catalog service of the Kubernetes nodes' bridges.
pub const BRIDGE_SERVICE: &str = "skyline-bridge";
/// The catalog service every role's admin listener is registered as, so that Prometheus finds
/// every `/metrics` (`consul_sd_configs`, or `skyline prometheus-targets`). Its meta says the
/// `role` (agent, gateway, bridge) and the `node`.
pub const ADMIN_SERVICE: &str = "skyline-admin";
/// The gateway's upstream of the Kubernetes bridges: the tier its default policy falls back to,
/// and the platform a bridge reports.
pub const KUBERNETES: &str = "kubernetes";
/// Where a gateway listens by default, and where a bridge finds the gateway pool's members
/// (the inbound port).
pub const DEFAULT_GATEWAY: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 5041);
/// Set by a bridge on requests it sends to the gateway: such a request never goes back to a
/// bridge tier.
pub static X_SKYLINE_ORIGIN: HeaderName = HeaderName::from_static("x-skyline-origin");
/// The cluster domain of Kubernetes Service names.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// The service name of a cluster-DNS `Host`: `<name>.<namespace>.svc.<domain>[:port]`
/// (a trailing dot allowed, case-insensitive), or `None`.
///
/// DNS names are case-insensitive (RFC 4343): `Organization.default.svc.cluster.local` names
/// service `organization`, so the name comes back in lowercase.
pub fn cluster_service<'a>(host: &'a str, domain: &str) -> Option<std::borrow::Cow<'a, str>> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let suffix_len = ".svc.".len() + domain.len();
    if host.len() <= suffix_len {
        return None;
    }
    // Not `split_at`: a non-ASCII host (from `/explain?url=`) may put the cut inside a char.
    let (head, tail) = host.split_at_checked(host.len() - suffix_len)?;
    let (svc, tail) = tail.split_at_checked(".svc.".len())?;
    if !svc.eq_ignore_ascii_case(".svc.") || !tail.eq_ignore_ascii_case(domain) {
        return None;
    }
    let (name, namespace) = head.split_once('.')?;
    let label_ok = |l: &str| !l.is_empty() && l.len() <= 63 && !l.contains('.');
    if !label_ok(namespace) {
        return None;
    }
    let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    };
    ServiceName::is_valid(&name).then_some(name)
}

/// The Skyline target for a cluster-DNS request: `/service/<name>` + path and query (or why
/// there is none, for a `400`). A target
/// without a path (`http://web.ns.svc.cluster.local?x=1`, `*`) gets `/`, and keeps its query.
pub fn skyline_target(name: &str, pq: Option<&PathAndQuery>) -> Result<PathAndQuery, &'static str> {
    let rest = pq.map_or("/", |pq| pq.as_str());
    let target = if rest.starts_with('/') {
        format!("/service/{name}{rest}")
    } else {
        // Found by the fuzz target `bridge_rewrite`: the query was dropped here.
        match pq.and_then(PathAndQuery::query) {
            Some(query) => format!("/service/{name}/?{query}"),
            None => format!("/service/{name}/"),
        }
    };
    PathAndQuery::from_maybe_shared(Bytes::from(target)).map_err(|_| "invalid request target")
}

/// On every answer the mesh gives instead of an application: the error's code.
pub static X_SKYLINE_ERROR: HeaderName = HeaderName::from_static("x-skyline-error");

/// The request's id, kept when the client sent one, made at the first hop otherwise.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// On a mesh error answer (`upstream-connect`, `no-healthy-endpoint`): the hop sent the request
/// to no instance (every connection was refused, or there was none to send to), so the hop
/// before may send it elsewhere whatever its method.
pub static X_SKYLINE_UNSENT: HeaderName = HeaderName::from_static("x-skyline-unsent");

/// A random 128-bit id in hex. Unique, not secret: a fast thread-local generator suffices.
pub fn request_id() -> HeaderValue {
    HeaderValue::from_bytes(&request_id_bytes()).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// [`request_id`] as bytes (the express lane writes them without a header value).
pub fn request_id_bytes() -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let mut bits = fastrand::u128(..);
    for digit in id.iter_mut().rev() {
        *digit = HEX[(bits & 0xf) as usize];
        bits >>= 4;
    }
    id
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn recognises_cluster_dns_hosts() {
        let d = DEFAULT_CLUSTER_DOMAIN;
        assert_eq!(
            cluster_service("organization.default.svc.cluster.local:8080", d).as_deref(),
            Some("organization")
        );
        // Any case, as DNS compares names.
        for host in [
            "Organization.default.svc.cluster.local",
            "ORGANIZATION.Default.SVC.Cluster.Local:8080",
        ] {
            assert_eq!(
                cluster_service(host, d).as_deref(),
                Some("organization"),
                "{host}"
            );
        }
        assert_eq!(
            cluster_service("giphy.prod.svc.cluster.local", d).as_deref(),
            Some("giphy")
        );
        assert_eq!(
            cluster_service("giphy.prod.svc.cluster.local.", d).as_deref(),
            Some("giphy")
        );
        for other in [
            "localhost:5040",
            "giphy",
            "giphy.svc.cluster.local",
            "a.b.svc.example.com",
            "A_.b.svc.cluster.local",
            ".b.svc.cluster.local",
        ] {
            assert_eq!(cluster_service(other, d), None, "{other}");
        }
        // Found by the fuzz target `bridge_rewrite`: a cut inside a multi-byte char panicked.
        for other in [
            "a.b\u{e9}svc.cluster.local",
            "a.b.svc.cluster.loca\u{e9}",
            "\u{e9}",
        ] {
            assert_eq!(cluster_service(other, d), None, "{other}");
        }
    }

    #[test]
    fn a_cluster_request_without_a_path_keeps_its_query() {
        for (given, expected) in [
            ("?q=cat", "/service/web/?q=cat"),
            ("?*", "/service/web/?*"),
            ("*", "/service/web/"),
        ] {
            let pq: PathAndQuery = given.parse().unwrap();
            assert_eq!(
                skyline_target("web", Some(&pq)).unwrap().as_str(),
                expected,
                "{given}"
            );
        }
        assert_eq!(
            skyline_target("web", None).unwrap().as_str(),
            "/service/web/"
        );
    }

    proptest! {
        #[test]
        fn a_cluster_request_keeps_its_path_and_query_under_the_service_prefix(
            path in "(/[a-z0-9._~%-]{0,8}){1,3}",
            query in proptest::option::of("[a-z0-9=&%]{0,12}"),
        ) {
            let text = match &query { Some(q) => format!("{path}?{q}"), None => path.clone() };
            let pq: PathAndQuery = text.parse().unwrap();
            let target = skyline_target("organization", Some(&pq)).unwrap();
            prop_assert_eq!(target.path(), format!("/service/organization{path}"));
            prop_assert_eq!(target.query(), query.as_deref());
        }
    }
}
