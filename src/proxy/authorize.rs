//! Authorization at a mesh listener on hyper's path (the gateway, the bridge): the policies of
//! [`crate::authz`] checked against a request, the refusal answered as a mesh error (a gRPC
//! call's as its status), and the caller's headers a listener does not believe removed.

use std::borrow::Cow;

use crate::authz::{Authz, X_SKYLINE_CALLER, X_SKYLINE_CALLER_TOKEN, asserted_caller};
use crate::serve::Conn;

use super::{Body, MeshError, as_grpc_status, is_grpc};

/// The check of a request on hyper's path at a mesh listener (the gateway, the bridge):
/// `Ok(None)` when no policy is in force or the path after `/service/<name>` (`rest`) is
/// normal already, `Ok(Some(normal))` when the listener must forward `normal` instead, or the
/// mesh error to answer with [`refusal`] (`forbidden`, after the audit line; `bad-request` for
/// a path that does not normalise). The caller is `x-skyline-caller` from a peer with a mesh
/// certificate only (see [`asserted_caller`](crate::authz::asserted_caller)).
pub fn enforce<B>(
    authz: &Authz,
    req: &http::Request<B>,
    conn: &Conn,
    service: &str,
    rest: &str,
) -> Result<Option<String>, MeshError> {
    let compiled = authz.load();
    if compiled.open {
        return Ok(None);
    }
    let caller = asserted_caller(
        conn.mesh_peer.is_some(),
        req.headers().get(&X_SKYLINE_CALLER).map(|v| v.as_bytes()),
    );
    match compiled.check(caller, service, req.method().as_str(), rest)? {
        Cow::Borrowed(_) => Ok(None),
        Cow::Owned(normal) => Ok(Some(normal)),
    }
}

/// The answer to `req` that [`enforce`] refused with `error`: `403 forbidden` (or 400) with
/// `x-skyline-error`, and a gRPC call's as its status (PERMISSION_DENIED).
pub fn refusal<B>(req: &http::Request<B>, error: MeshError, service: &str) -> http::Response<Body> {
    let mut response = error.into_response(service);
    if is_grpc(req) {
        as_grpc_status(&mut response);
    }
    response
}

/// Removes what a mesh listener does not believe: a credential always (it never leaves its
/// node), an assertion of the caller unless the peer presented a mesh certificate.
pub fn strip_untrusted(headers: &mut http::HeaderMap, conn: &Conn) {
    headers.remove(&X_SKYLINE_CALLER_TOKEN);
    if conn.mesh_peer.is_none() {
        headers.remove(&X_SKYLINE_CALLER);
    }
}
