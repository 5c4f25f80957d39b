//! The HTTP side of the registry: Consul's paths, JSON field names, status codes and error
//! texts, and blocking queries (`?index=N&wait=D`).
//!
//! Request bodies are decoded by Consul's rules ([`super::decode`]): keys case-insensitive,
//! Consul's snake_case aliases, unknown fields refused, Go durations. Supported endpoints and the
//! clients that exercised them: `docs/consul-compatibility.md`.
//!
//! Deliberate differences from Consul:
//! - service names must match the mesh contract ([`ServiceName::is_valid`]); Consul allows more;
//! - `/v1/catalog/register` runs a `TTL` given in a check's `Definition` (Consul stores it and
//!   runs nothing), so agents of many nodes can keep TTL checks in one registry, and
//!   `/v1/agent/check/*` accepts `?node=` to refresh such a check on another node;
//! - every read blocks on its own result's index (never woken by unrelated writes), including
//!   the agent endpoints, which Consul blocks by content hash; node and state reads block on the
//!   catalog's index, as Consul's do on their tables';
//! - checks other than TTL, HTTP, TCP and H2PING over h2c (script, gRPC, UDP, H2PING over TLS,
//!   alias, OS service, Docker)
//!   are refused with 400 rather than stored and never run;
//! - one datacenter (`dc1`); every node's coordinate is the origin; `/v1/agent/members` lists
//!   the registry's own node; user events are received by that node only;
//! - no ACLs, namespaces, partitions, Connect, prepared queries, `?filter`, `?near`,
//!   `?node-meta`; `/v1/txn` takes KV operations only (node, service, check and session ones are refused);
//! - event validation errors and an unknown `ServiceID` on a check registration are 400 (Consul:
//!   500); anything after a body's JSON value is refused (Go's decoder ignores it);
//! - bodies over 512 KiB get 400 (Consul sends 413 for KV values).

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::checks::Checks;
use super::decode::{self, GoDuration, Shape};
use super::events::{self, EventLog};
use super::store::{
    CheckDef, CheckDefinition, CheckEntry, KvEntry, NodeEntry, Op, Registration, ServiceDef,
    ServiceEntry, State, Weights, prefix_range,
};
use super::{Command, INBOUND_PORT_META};
use crate::catalog::{Health, ServiceName};
use crate::config::parse_duration;
use crate::config::token::{Token, consul_request_token};
use crate::http1::percent_decode;

/// The largest request body (and KV value) accepted.
pub const MAX_BODY: usize = 512 * 1024;
/// A blocking query's wait when the client gives none.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// The longest a blocking query waits, whatever the client asks.
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
/// Bodies up to this size are read (and dropped) before a "too large" answer.
const DRAIN_LIMIT: usize = 4 * MAX_BODY;
const MAX_META_PAIRS: usize = 64;
const MAX_META_KEY: usize = 128;
const MAX_META_VALUE: usize = 512;
const MAX_ID: usize = 256;

/// What request handlers share.
pub(crate) struct Shared {
    pub cmds: mpsc::Sender<Command>,
    pub state: watch::Receiver<Arc<State>>,
    pub node_name: String,
    pub node_address: IpAddr,
    pub shutdown: CancellationToken,
    /// The user events this registry received (`/v1/event/*`); memory only, as in Consul.
    pub events: watch::Sender<Arc<EventLog>>,
    /// The ACL token every request must carry, if any (see `RegistryConfig::token`).
    pub token: Option<Token>,
}

pub(crate) type Resp = Response<Full<Bytes>>;

// === ApiError ===

/// An error answered to the client: a status and a plain-text message, like Consul's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The `Allow` header of a 405.
    pub allow: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            allow: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }

    fn decode(error: impl fmt::Display) -> Self {
        Self::bad_request(format!("Request decode failed: {error}"))
    }

    pub(crate) fn method(method: &Method, allowed: &[Method]) -> Self {
        let allow: Vec<&str> = allowed.iter().map(Method::as_str).collect();
        Self {
            allow: Some(allow.join(", ")),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method {method} not allowed"),
            )
        }
    }

    fn into_response(self) -> Resp {
        let mut resp = Response::new(Full::new(Bytes::from(self.message)));
        *resp.status_mut() = self.status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(allow) = self.allow.and_then(|a| HeaderValue::from_str(&a).ok()) {
            headers.insert(header::ALLOW, allow);
        }
        resp
    }
}

// === Entry point ===

/// Answers one request; errors become Consul-style plain-text responses here and only here.
pub(crate) async fn handle<B>(shared: Arc<Shared>, req: Request<B>) -> Result<Resp, Infallible>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if let Some(refusal) = acl_refusal(shared.token.as_ref(), &req) {
        tracing::debug!(%method, %path, reason = %refusal.message, "registry request refused by the token check");
        return Ok(refusal.into_response());
    }
    let resp = match route(&shared, req).await {
        Ok(resp) => resp,
        Err(error) => {
            if error.status.is_server_error() {
                tracing::warn!(%method, %path, status = %error.status, %error, "registry request failed");
            }
            error.into_response()
        }
    };
    Ok(resp)
}

/// Consul's ACL answer to a request without the token: 403 `Permission denied` when it carries
/// none (Consul's anonymous token, denied by default), 403 `ACL not found` when it carries
/// another one (an unknown secret). `/v1/status/*` answers without a token, as in Consul.
pub fn acl_refusal<B>(token: Option<&Token>, req: &Request<B>) -> Option<ApiError> {
    let token = token?;
    if req.uri().path().starts_with("/v1/status/") {
        return None;
    }
    match consul_request_token(req.uri().query(), req.headers()) {
        None => Some(ApiError::new(StatusCode::FORBIDDEN, "Permission denied")),
        Some(presented) if token.matches(&presented) => None,
        Some(_) => Some(ApiError::new(StatusCode::FORBIDDEN, "ACL not found")),
    }
}

fn allow(method: &Method, allowed: &[Method]) -> Result<(), ApiError> {
    if allowed.contains(method) {
        Ok(())
    } else {
        Err(ApiError::method(method, allowed))
    }
}

async fn route<B>(shared: &Shared, req: Request<B>) -> Result<Resp, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = req.method().clone();
    let query = Query::parse(req.uri().query());
    let path = req.uri().path().to_owned();
    let not_found = || ApiError::not_found("404 page not found");
    let rest = path.strip_prefix("/v1/").ok_or_else(not_found)?;
    let (get, put) = (&[Method::GET][..], &[Method::PUT][..]);

    if let Some(key) = rest
        .strip_prefix("kv/")
        .or(if rest == "kv" { Some("") } else { None })
    {
        let key = percent_decode(key, false)
            .ok_or_else(|| ApiError::bad_request("Invalid key encoding"))?;
        return match method {
            Method::GET => kv_get(shared, &query, &key).await,
            Method::PUT => {
                let body = read_body(req).await?;
                kv_put(shared, &query, key, body).await
            }
            Method::DELETE => kv_delete(shared, &query, key).await,
            ref m => Err(ApiError::method(
                m,
                &[Method::GET, Method::PUT, Method::DELETE],
            )),
        };
    }

    let segment = |prefix: &str| -> Option<Result<String, ApiError>> {
        let s = rest.strip_prefix(prefix)?;
        Some(
            percent_decode(s, false)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| ApiError::bad_request("Missing or invalid path parameter")),
        )
    };

    if let Some(rest) = rest.strip_prefix("session/") {
        return super::session::handle(shared, &method, rest, &query, read_body(req)).await;
    }

    match rest {
        "txn" => {
            allow(&method, put)?;
            let body = read_body(req).await?;
            super::txn::handle(shared, &query, &body).await
        }
        "agent/service/register" => {
            allow(&method, put)?;
            let body = read_body(req).await?;
            agent_register(shared, &query, &body).await
        }
        "agent/services" => {
            allow(&method, get)?;
            agent_services(shared, &query).await
        }
        "agent/checks" => {
            allow(&method, get)?;
            agent_checks(shared, &query).await
        }
        "agent/self" => {
            allow(&method, get)?;
            Ok(agent_self(shared))
        }
        "agent/members" => {
            allow(&method, get)?;
            Ok(json_response_unindexed(&json!([member_json(shared)])))
        }
        "agent/maintenance" => {
            allow(&method, put)?;
            maintenance(shared, &query, None).await
        }
        "agent/check/register" => {
            allow(&method, put)?;
            let body = read_body(req).await?;
            agent_check_register(shared, &body).await
        }
        "catalog/datacenters" => {
            allow(&method, get)?;
            Ok(json_response_unindexed(&json!(["dc1"])))
        }
        "coordinate/nodes" => {
            allow(&method, get)?;
            coordinate_nodes(shared, &query).await
        }
        "coordinate/datacenters" => {
            allow(&method, get)?;
            Ok(coordinate_datacenters(shared))
        }
        "event/list" => {
            allow(&method, get)?;
            event_list(shared, &query).await
        }
        "catalog/register" => {
            allow(&method, put)?;
            let body = read_body(req).await?;
            catalog_register(shared, &body).await
        }
        "catalog/deregister" => {
            allow(&method, put)?;
            let body = read_body(req).await?;
            catalog_deregister(shared, &body).await
        }
        "catalog/services" => {
            allow(&method, get)?;
            catalog_services(shared, &query).await
        }
        "catalog/nodes" => {
            allow(&method, get)?;
            catalog_nodes(shared, &query).await
        }
        "status/leader" => {
            allow(&method, get)?;
            Ok(json_response(
                1,
                &json!(format!("{}:8300", shared.node_address)),
            ))
        }
        "status/peers" => {
            allow(&method, get)?;
            Ok(json_response(
                1,
                &json!([format!("{}:8300", shared.node_address)]),
            ))
        }
        _ => {
            if let Some(id) = segment("agent/service/deregister/") {
                allow(&method, put)?;
                return agent_deregister(shared, id?).await;
            }
            if let Some(id) = segment("agent/service/maintenance/") {
                allow(&method, put)?;
                return maintenance(shared, &query, Some(id?)).await;
            }
            if let Some(id) = segment("agent/check/deregister/") {
                allow(&method, put)?;
                return agent_check_deregister(shared, id?).await;
            }
            if let Some(name) = segment("event/fire/") {
                allow(&method, put)?;
                let name = name.map_err(|_| ApiError::bad_request("Missing name"))?;
                let body = read_body(req).await?;
                return event_fire(shared, &query, name, body);
            }
            if let Some(node) = segment("catalog/node/") {
                allow(&method, get)?;
                return catalog_node(shared, &query, &node?).await;
            }
            if let Some(node) = segment("health/node/") {
                allow(&method, get)?;
                return health_node(shared, &query, &node?).await;
            }
            if let Some(state) = segment("health/state/") {
                allow(&method, get)?;
                let state = state.map_err(|_| ApiError::bad_request("Missing check state"))?;
                return health_state(shared, &query, &state).await;
            }
            for (prefix, status) in [
                ("agent/check/pass/", Health::Passing),
                ("agent/check/warn/", Health::Warning),
                ("agent/check/fail/", Health::Critical),
            ] {
                if let Some(id) = segment(prefix) {
                    allow(&method, put)?;
                    let note = query.get("note").unwrap_or_default().to_owned();
                    return check_update(shared, &query, id?, status, note).await;
                }
            }
            if let Some(id) = segment("agent/check/update/") {
                allow(&method, put)?;
                let body = read_body(req).await?;
                let update: CheckUpdateIn = decode(&body, &decode::CHECK_UPDATE)?;
                let status = parse_status(update.status.as_deref().unwrap_or(""))?;
                return check_update(
                    shared,
                    &query,
                    id?,
                    status,
                    update.output.unwrap_or_default(),
                )
                .await;
            }
            if let Some(name) = segment("catalog/service/") {
                allow(&method, get)?;
                return catalog_service(shared, &query, &name?).await;
            }
            if let Some(name) = segment("health/service/") {
                allow(&method, get)?;
                return health_service(shared, &query, &name?).await;
            }
            if let Some(name) = segment("health/checks/") {
                allow(&method, get)?;
                return health_checks(shared, &query, &name?).await;
            }
            Err(not_found())
        }
    }
}

// === Request plumbing ===

pub(crate) async fn read_body<B>(req: Request<B>) -> Result<Bytes, ApiError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        ApiError::bad_request(format!(
            "Request body too large: the limit is {MAX_BODY} bytes"
        ))
    };
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ApiError::bad_request("Invalid Content-Length"))?;
        if len > DRAIN_LIMIT as u64 {
            return Err(too_large());
        }
    }
    // A body somewhat over the limit is read to its end and dropped, so the client, still
    // sending, gets the 400 instead of a connection reset.
    let mut body = std::pin::pin!(req.into_body());
    let mut buf = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let e: Box<dyn std::error::Error + Send + Sync> = e.into();
            ApiError::bad_request(format!("Request body read failed: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            seen += data.len();
            if seen <= MAX_BODY {
                buf.extend_from_slice(&data);
            } else if seen > DRAIN_LIMIT {
                return Err(too_large());
            }
        }
    }
    if seen > MAX_BODY {
        return Err(too_large());
    }
    Ok(Bytes::from(buf))
}

/// Decodes a body by Consul's rules for the Go struct `shape` describes ([`decode`]).
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    body: &[u8],
    shape: &'static Shape,
) -> Result<T, ApiError> {
    decode::decode(body, shape).map_err(ApiError::decode)
}

async fn submit(
    shared: &Shared,
    prepare: impl FnOnce(&State, &mut Checks) -> Result<Option<Op>, ApiError> + Send + 'static,
) -> Result<Option<u64>, ApiError> {
    let (reply, rx) = oneshot::channel();
    let cmd = Command {
        prepare: Box::new(prepare),
        reply,
    };
    let gone = || ApiError::unavailable("registry is shutting down");
    shared.cmds.send(cmd).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())?
}

/// [`submit`] for a decision that also answers something (`T`), given once the write is durable.
pub(crate) async fn submit_with<T: Send + 'static>(
    shared: &Shared,
    prepare: impl FnOnce(&State, &mut Checks) -> Result<(Option<Op>, T), ApiError> + Send + 'static,
) -> Result<(Option<u64>, T), ApiError> {
    let (answer_tx, answer_rx) = oneshot::channel();
    let index = submit(shared, move |state, checks| {
        let (op, answer) = prepare(state, checks)?;
        let _ = answer_tx.send(answer);
        Ok(op)
    })
    .await?;
    let answer = answer_rx.await.map_err(|_| ApiError::internal())?;
    Ok((index, answer))
}

pub(crate) fn plain(status: StatusCode, body: &'static str) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A JSON answer to a write: no `X-Consul-Index`, as Consul's writes have none.
pub(crate) fn json_body(status: StatusCode, value: &impl serde::Serialize) -> Resp {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub(crate) fn json_response(index: u64, value: &impl serde::Serialize) -> Resp {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    with_index(
        Response::new(Full::new(Bytes::from(body))),
        index,
        "application/json",
    )
}

/// A JSON answer of an endpoint that does not block (no `X-Consul-Index`, as in Consul).
fn json_response_unindexed(value: &impl serde::Serialize) -> Resp {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn with_index(mut resp: Resp, index: u64, content_type: &'static str) -> Resp {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert("x-consul-index", HeaderValue::from(index.max(1)));
    h.insert("x-consul-knownleader", HeaderValue::from_static("true"));
    h.insert("x-consul-lastcontact", HeaderValue::from_static("0"));
    resp
}

/// A parsed query string; flags like `?passing` have an empty value.
#[derive(Debug, Default)]
pub struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(q: Option<&str>) -> Self {
        let pairs = q
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .filter_map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                Some((percent_decode(k, true)?, percent_decode(v, true)?))
            })
            .collect();
        Self(pairs)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn number(&self, key: &str, what: &str) -> Result<Option<u64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| ApiError::bad_request(format!("Invalid {what}: {v:?}")))
            })
            .transpose()
    }
}

// === Blocking queries ===

struct Blocking {
    index: Option<u64>,
    wait: Duration,
}

fn blocking(query: &Query) -> Result<Blocking, ApiError> {
    let index = query.number("index", "index")?;
    let wait = match query.get("wait") {
        Some(w) => parse_duration(w)
            .map_err(|e| ApiError::bad_request(format!("Invalid wait time: {e}")))?
            .min(MAX_WAIT),
        None => DEFAULT_WAIT,
    };
    Ok(Blocking { index, wait })
}

/// The state to answer from and its index: at once without `?index`, else as soon as the
/// result's own index moves past it, or at the deadline (wait + up to wait/16 jitter).
pub(crate) async fn read(
    shared: &Shared,
    query: &Query,
    index_of: impl Fn(&State) -> u64,
) -> Result<(Arc<State>, u64), ApiError> {
    let params = blocking(query)?;
    let mut rx = shared.state.clone();
    let state = match params.index.filter(|i| *i > 0) {
        None => rx.borrow_and_update().clone(),
        Some(min) => wait_until(shared, params.wait, &mut rx, |s| index_of(s).max(1) > min).await,
    };
    let index = index_of(&state).max(1);
    Ok((state, index))
}

/// The value of `rx` once `done` holds for it, or at the deadline (wait + up to wait/16
/// jitter), or at shutdown.
async fn wait_until<T: Clone>(
    shared: &Shared,
    wait: Duration,
    rx: &mut watch::Receiver<T>,
    done: impl Fn(&T) -> bool,
) -> T {
    let current = rx.borrow_and_update().clone();
    if done(&current) {
        return current;
    }
    let jitter_ns = u64::try_from(wait.as_nanos() / 16).unwrap_or(0);
    let jitter = Duration::from_nanos(fastrand::u64(0..=jitter_ns));
    let deadline = Instant::now() + wait + jitter;
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let value = rx.borrow_and_update().clone();
                if done(&value) {
                    return value;
                }
            }
            () = tokio::time::sleep_until(deadline) => break,
            () = shared.shutdown.cancelled() => break,
        }
    }
    rx.borrow().clone()
}

// === JSON in ===
//
// Bodies are first put in canonical form by `decode` (case-insensitive keys, Consul's aliases,
// unknown keys refused, durations as nanoseconds); these structs read that form by exact name.

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WeightsIn {
    passing: Option<i64>,
    warning: Option<i64>,
}

/// The check kinds Consul has and this registry does not run, by their field in a check.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UnsupportedKinds {
    script_args: Option<Vec<String>>,
    #[serde(rename = "GRPC")]
    grpc: Option<String>,
    #[serde(rename = "UDP")]
    udp: Option<String>,
    alias_node: Option<String>,
    alias_service: Option<String>,
    #[serde(rename = "OSService")]
    os_service: Option<String>,
    #[serde(rename = "DockerContainerID")]
    docker_container_id: Option<String>,
}

impl UnsupportedKinds {
    /// The first kind given, by its Consul field name.
    fn given(&self) -> Option<&'static str> {
        let set = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
        if self.script_args.as_ref().is_some_and(|a| !a.is_empty()) {
            return Some("ScriptArgs");
        }
        [
            (set(&self.grpc), "GRPC"),
            (set(&self.udp), "UDP"),
            (set(&self.alias_node), "AliasNode"),
            (set(&self.alias_service), "AliasService"),
            (set(&self.os_service), "OSService"),
            (set(&self.docker_container_id), "DockerContainerID"),
        ]
        .into_iter()
        .find_map(|(set, name)| set.then_some(name))
    }
}

/// A check: `CheckType` (in an agent service registration), `CheckDefinition` (agent check
/// registration, whose ID field is `ID`) or `HealthCheck` (catalog registration).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckIn {
    #[serde(rename = "CheckID", alias = "ID")]
    check_id: Option<String>,
    name: Option<String>,
    #[serde(rename = "ServiceID")]
    service_id: Option<String>,
    #[serde(rename = "TTL", default)]
    ttl: GoDuration,
    #[serde(rename = "HTTP")]
    http: Option<String>,
    #[serde(rename = "TCP")]
    tcp: Option<String>,
    #[serde(rename = "H2PING")]
    h2ping: Option<String>,
    #[serde(rename = "H2PingUseTLS")]
    h2ping_use_tls: Option<bool>,
    #[serde(default)]
    interval: GoDuration,
    #[serde(default)]
    timeout: GoDuration,
    status: Option<String>,
    #[serde(default)]
    deregister_critical_service_after: GoDuration,
    notes: Option<String>,
    output: Option<String>,
    definition: Option<DefinitionIn>,
    #[serde(flatten)]
    unsupported: UnsupportedKinds,
}

/// A catalog check's `Definition`; its `TTL` makes this registry run the TTL (Consul stores it
/// and runs nothing).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DefinitionIn {
    #[serde(rename = "TTL", default)]
    ttl: GoDuration,
    #[serde(rename = "HTTP")]
    http: Option<String>,
    #[serde(rename = "TCP")]
    tcp: Option<String>,
    #[serde(rename = "H2PING")]
    h2ping: Option<String>,
    #[serde(rename = "H2PingUseTLS")]
    h2ping_use_tls: Option<bool>,
    #[serde(default)]
    interval: GoDuration,
    #[serde(default)]
    timeout: GoDuration,
    #[serde(default)]
    deregister_critical_service_after: GoDuration,
    #[serde(flatten)]
    unsupported: UnsupportedKinds,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AgentServiceIn {
    #[serde(rename = "ID")]
    id: Option<String>,
    name: Option<String>,
    tags: Option<Vec<String>>,
    address: Option<String>,
    port: Option<i64>,
    meta: Option<BTreeMap<String, String>>,
    weights: Option<WeightsIn>,
    check: Option<CheckIn>,
    checks: Option<Vec<CheckIn>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogServiceIn {
    #[serde(rename = "ID")]
    id: Option<String>,
    service: Option<String>,
    tags: Option<Vec<String>>,
    address: Option<String>,
    port: Option<i64>,
    meta: Option<BTreeMap<String, String>>,
    weights: Option<WeightsIn>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogRegisterIn {
    node: Option<String>,
    address: Option<String>,
    node_meta: Option<BTreeMap<String, String>>,
    service: Option<CatalogServiceIn>,
    check: Option<CheckIn>,
    checks: Option<Vec<CheckIn>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogDeregisterIn {
    node: Option<String>,
    #[serde(rename = "ServiceID")]
    service_id: Option<String>,
    #[serde(rename = "CheckID")]
    check_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CheckUpdateIn {
    status: Option<String>,
    output: Option<String>,
}

// === Validation ===

fn parse_status(s: &str) -> Result<Health, ApiError> {
    match s {
        "passing" => Ok(Health::Passing),
        "warning" => Ok(Health::Warning),
        "critical" => Ok(Health::Critical),
        other => Err(ApiError::bad_request(format!(
            "Invalid check status: {other:?}"
        ))),
    }
}

fn check_id_text(what: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_ID || id.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "Invalid {what} {id:?}: expected 1-{MAX_ID} printable characters"
        )));
    }
    Ok(())
}

fn check_meta(what: &str, meta: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if meta.len() > MAX_META_PAIRS {
        return Err(ApiError::bad_request(format!(
            "Invalid {what}: more than {MAX_META_PAIRS} key/value pairs"
        )));
    }
    for (k, v) in meta {
        if k.is_empty() || k.len() > MAX_META_KEY {
            return Err(ApiError::bad_request(format!(
                "Invalid {what}: key {k:?} must be 1-{MAX_META_KEY} bytes"
            )));
        }
        if v.len() > MAX_META_VALUE {
            return Err(ApiError::bad_request(format!(
                "Invalid {what}: value for key {k:?} is longer than {MAX_META_VALUE} bytes"
            )));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn service_def(
    id: Option<String>,
    name: Option<String>,
    tags: Option<Vec<String>>,
    address: Option<String>,
    port: Option<i64>,
    meta: Option<BTreeMap<String, String>>,
    weights: Option<WeightsIn>,
) -> Result<ServiceDef, ApiError> {
    let name = name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("Missing service name"))?;
    let name = ServiceName::parse(&name)
        .map_err(|e| ApiError::bad_request(format!("Invalid service name: {e}")))?;
    let id = id
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| name.to_string());
    check_id_text("service ID", &id)?;
    let port = port.unwrap_or(0);
    let port = u16::try_from(port)
        .map_err(|_| ApiError::bad_request(format!("Invalid Port: {port} is not in 0-65535")))?;
    let address = address.unwrap_or_default();
    if address.len() > MAX_ID || address.chars().any(char::is_control) {
        return Err(ApiError::bad_request("Invalid Address"));
    }
    let meta = meta.unwrap_or_default();
    check_meta("Meta", &meta)?;
    let weights = match weights {
        None => Weights::default(),
        Some(w) => {
            let passing = w.passing.unwrap_or(1);
            let warning = w.warning.unwrap_or(1);
            let passing = u32::try_from(passing)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| ApiError::bad_request("Passing must be greater than 0"))?;
            let warning = u32::try_from(warning)
                .map_err(|_| ApiError::bad_request("Warning must be greater or equal than 0"))?;
            Weights { passing, warning }
        }
    };
    Ok(ServiceDef {
        id,
        name: name.to_string(),
        tags: tags.unwrap_or_default(),
        address,
        port,
        meta,
        weights,
    })
}

/// Validates a check. `agent` checks carry their type at the top level and must have one;
/// catalog checks carry it in `Definition` and may have none (status set from outside).
fn check_def(
    c: CheckIn,
    default_id: Option<String>,
    default_name: String,
    service_id: String,
    agent: bool,
) -> Result<CheckDef, ApiError> {
    let unsupported = if agent {
        c.unsupported.given()
    } else {
        c.definition.as_ref().and_then(|d| d.unsupported.given())
    };
    if let Some(kind) = unsupported {
        return Err(ApiError::bad_request(format!(
            "{kind} checks are not supported by this registry: give one of TTL, HTTP, TCP or H2PING"
        )));
    }
    let (ttl, http, tcp, (h2ping, h2ping_use_tls), interval, timeout, dereg) = if agent {
        (
            c.ttl,
            c.http,
            c.tcp,
            (c.h2ping, c.h2ping_use_tls),
            c.interval,
            c.timeout,
            c.deregister_critical_service_after,
        )
    } else {
        let d = c.definition.unwrap_or_default();
        (
            d.ttl,
            d.http,
            d.tcp,
            (d.h2ping, d.h2ping_use_tls),
            d.interval,
            d.timeout,
            d.deregister_critical_service_after,
        )
    };
    let http = http.filter(|s| !s.is_empty());
    let tcp = tcp.filter(|s| !s.is_empty());
    let h2ping = h2ping.filter(|s| !s.is_empty());
    let kinds = usize::from(ttl.0.is_some())
        + usize::from(http.is_some())
        + usize::from(tcp.is_some())
        + usize::from(h2ping.is_some());
    if kinds > 1 {
        return Err(ApiError::bad_request(
            "Only one of TTL, HTTP, TCP or H2PING may be given for a check",
        ));
    }
    if agent && kinds == 0 {
        return Err(ApiError::bad_request(
            "Check is missing a type: give one of TTL, HTTP, TCP or H2PING",
        ));
    }
    if (http.is_some() || tcp.is_some() || h2ping.is_some()) && interval.0.is_none() {
        return Err(ApiError::bad_request(
            "Interval must be > 0 for HTTP, TCP and H2PING checks",
        ));
    }
    // Consul's default for an H2PING check is TLS; this registry pings over h2c only.
    if h2ping.is_some() && h2ping_use_tls != Some(false) {
        return Err(ApiError::bad_request(
            "H2PING checks over TLS are not supported by this registry: \
             set H2PingUseTLS to false to ping over h2c (HTTP/2 with prior knowledge)",
        ));
    }
    if let Some(url) = &http {
        let ok = url
            .parse::<http::Uri>()
            .ok()
            .is_some_and(|u| u.scheme_str() == Some("http") && u.authority().is_some());
        if !ok {
            return Err(ApiError::bad_request(format!(
                "Invalid HTTP check URL {url:?}: expected http://host[:port]/path"
            )));
        }
    }
    for addr in tcp.iter().chain(&h2ping) {
        let ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            return Err(ApiError::bad_request(format!(
                "Invalid {} check address {addr:?}: expected host:port",
                if tcp.is_some() { "TCP" } else { "H2PING" }
            )));
        }
    }
    let status = c
        .status
        .filter(|s| !s.is_empty())
        .map(|s| parse_status(&s))
        .transpose()?;
    let name = c.name.filter(|n| !n.is_empty());
    let id = c
        .check_id
        .filter(|i| !i.is_empty())
        .or(default_id)
        .or_else(|| name.clone())
        .ok_or_else(|| ApiError::bad_request("Missing check ID"))?;
    check_id_text("check ID", &id)?;
    Ok(CheckDef {
        name: name.unwrap_or(default_name),
        id,
        service_id,
        status,
        output: c.output.unwrap_or_default(),
        notes: c.notes.unwrap_or_default(),
        definition: CheckDefinition {
            ttl: ttl.0,
            http,
            tcp,
            h2ping,
            interval: interval.0,
            timeout: timeout.0,
            deregister_critical_after: dereg.0,
        },
    })
}

// === Fuzzing ===

/// Decodes `body` as each endpoint that takes a JSON body decodes it, and validates what
/// decodes as the endpoint would before it touches the store: the fuzz target
/// `registry_json` (see `crate::fuzz`). Results are dropped; only a panic matters.
pub(crate) fn decode_every_body(body: &[u8]) {
    if let Ok(input) = decode::<AgentServiceIn>(body, &decode::SERVICE_DEFINITION) {
        if let Ok(svc) = service_def(
            input.id,
            input.name,
            input.tags,
            input.address,
            input.port,
            input.meta,
            input.weights,
        ) {
            let mut raw: Vec<CheckIn> = input.check.into_iter().collect();
            raw.extend(input.checks.unwrap_or_default());
            for c in raw {
                let _ = check_def(
                    c,
                    Some("service:x".into()),
                    "x".into(),
                    svc.id.clone(),
                    true,
                );
            }
        }
    }
    if let Ok(input) = decode::<CheckIn>(body, &decode::CHECK_DEFINITION) {
        let _ = check_def(input, None, "x".into(), String::new(), true);
    }
    let _ = decode::<CatalogRegisterIn>(body, &decode::REGISTER_REQUEST);
    let _ = decode::<CatalogDeregisterIn>(body, &decode::DEREGISTER_REQUEST);
    let _ = decode::<CheckUpdateIn>(body, &decode::CHECK_UPDATE);
    super::txn::check_body(body);
    super::session::decode_create(body);
    if let Ok(json) = decode::parse(body) {
        let _ = decode::duration(&json);
    }
}

// === Agent endpoints ===

async fn agent_register(shared: &Shared, _query: &Query, body: &[u8]) -> Result<Resp, ApiError> {
    let input: AgentServiceIn = decode(body, &decode::SERVICE_DEFINITION)?;
    let svc = service_def(
        input.id,
        input.name,
        input.tags,
        input.address,
        input.port,
        input.meta,
        input.weights,
    )?;
    let mut raw: Vec<CheckIn> = input.check.into_iter().collect();
    raw.extend(input.checks.unwrap_or_default());
    let count = raw.len();
    let mut checks = Vec::with_capacity(count);
    for (i, c) in raw.into_iter().enumerate() {
        let default_id = if count == 1 {
            format!("service:{}", svc.id)
        } else {
            format!("service:{}:{}", svc.id, i + 1)
        };
        let default_name = format!("Service '{}' check", svc.name);
        checks.push(check_def(
            c,
            Some(default_id),
            default_name,
            svc.id.clone(),
            true,
        )?);
    }
    let ids: BTreeSet<&str> = checks.iter().map(|c| c.id.as_str()).collect();
    if ids.len() != checks.len() {
        return Err(ApiError::bad_request("Duplicate check ID in registration"));
    }
    let registration = Registration {
        node: shared.node_name.clone(),
        address: shared.node_address.to_string(),
        node_meta: None,
        service: Some(svc),
        checks,
        replace_service_checks: true,
    };
    submit(shared, move |_, checks| {
        // Registering a check with a status restarts its TTL, as a `pass` would.
        for c in registration.checks.iter().filter(|c| c.status.is_some()) {
            checks.refresh_ttl(&(registration.node.clone(), c.id.clone()), Instant::now());
        }
        Ok(Some(Op::Register(registration)))
    })
    .await?;
    Ok(plain(StatusCode::OK, ""))
}

async fn agent_deregister(shared: &Shared, id: String) -> Result<Resp, ApiError> {
    let node = shared.node_name.clone();
    submit(shared, move |state, _| {
        let known = state.nodes.get(&node).is_some_and(|n| n.services.contains_key(&id));
        if !known {
            return Err(ApiError::not_found(format!(
                "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
            )));
        }
        Ok(Some(Op::Deregister {
            node,
            service_id: Some(id),
            check_id: None,
        }))
    })
    .await?;
    Ok(plain(StatusCode::OK, ""))
}

async fn agent_services(shared: &Shared, query: &Query) -> Result<Resp, ApiError> {
    let (state, index) = read(shared, query, |s| s.catalog_index).await?;
    let mut out = serde_json::Map::new();
    if let Some(node) = state.nodes.get(&shared.node_name) {
        for svc in node.services.values() {
            out.insert(
                svc.id.clone(),
                json!({
                    "ID": svc.id,
                    "Service": svc.name,
                    "Tags": svc.tags,
                    "Meta": svc.meta,
                    "Port": svc.port,
                    "Address": svc.address,
                    "Weights": weights_json(&svc.weights),
                    "EnableTagOverride": false,
                    "Datacenter": "dc1",
                }),
            );
        }
    }
    Ok(json_response(index, &out))
}

async fn agent_checks(shared: &Shared, query: &Query) -> Result<Resp, ApiError> {
    let (state, index) = read(shared, query, |s| s.catalog_index).await?;
    let mut out = serde_json::Map::new();
    if let Some(node) = state.nodes.get(&shared.node_name) {
        for check in node.checks.values() {
            out.insert(check.id.clone(), check_json(node, check));
        }
    }
    Ok(json_response(index, &out))
}

async fn check_update(
    shared: &Shared,
    query: &Query,
    id: String,
    status: Health,
    output: String,
) -> Result<Resp, ApiError> {
    let node = query
        .get("node")
        .filter(|n| !n.is_empty())
        .map_or_else(|| shared.node_name.clone(), str::to_owned);
    if output.len() > MAX_BODY {
        return Err(ApiError::bad_request("Output is too long"));
    }
    submit(shared, move |state, checks| {
        let Some(check) = state.check(&node, &id) else {
            return Err(ApiError::not_found(format!(
                "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
            )));
        };
        if check.definition.ttl.is_none() {
            return Err(ApiError::bad_request(format!(
                "CheckID {id:?} does not have associated TTL"
            )));
        }
        let key = (node.clone(), id.clone());
        checks.refresh_ttl(&key, Instant::now());
        if check.status == status && check.output == output {
            return Ok(None);
        }
        Ok(Some(Op::CheckStatus {
            node,
            check_id: id,
            status,
            output,
        }))
    })
    .await?;
    Ok(plain(StatusCode::OK, ""))
}

// === Catalog endpoints ===

async fn catalog_register(shared: &Shared, body: &[u8]) -> Result<Resp, ApiError> {
    let input: CatalogRegisterIn = decode(body, &decode::REGISTER_REQUEST)?;
    let node = input
        .node
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("Must provide node"))?;
    check_id_text("node name", &node)?;
    let address = input
        .address
        .filter(|a| !a.is_empty())
        .ok_or_else(|| ApiError::bad_request("Must provide address"))?;
    if address.len() > MAX_ID || address.chars().any(char::is_control) {
        return Err(ApiError::bad_request("Invalid Address"));
    }
    if let Some(meta) = &input.node_meta {
        check_meta("NodeMeta", meta)?;
        if let Some(port) = meta.get(INBOUND_PORT_META) {
            if port.parse::<u16>().is_err() {
                return Err(ApiError::bad_request(format!(
                    "Invalid NodeMeta: {INBOUND_PORT_META} must be a port number, got {port:?}"
                )));
            }
        }
    }
    let service = input
        .service
        .map(|s| {
            service_def(
                s.id, s.service, s.tags, s.address, s.port, s.meta, s.weights,
            )
        })
        .transpose()?;
    let mut raw: Vec<CheckIn> = input.check.into_iter().collect();
    raw.extend(input.checks.unwrap_or_default());
    let mut checks = Vec::with_capacity(raw.len());
    for c in raw {
        let service_id = c.service_id.clone().unwrap_or_default();
        let default_name = c.check_id.clone().unwrap_or_default();
        checks.push(check_def(c, None, default_name, service_id, false)?);
    }
    let registration = Registration {
        node,
        address,
        node_meta: input.node_meta,
        service,
        checks,
        replace_service_checks: false,
    };
    submit(shared, move |state, checks| {
        for c in &registration.checks {
            if c.service_id.is_empty() {
                continue;
            }
            let in_request = registration
                .service
                .as_ref()
                .is_some_and(|s| s.id == c.service_id);
            let existing = state
                .nodes
                .get(&registration.node)
                .is_some_and(|n| n.services.contains_key(&c.service_id));
            if !in_request && !existing {
                return Err(ApiError::bad_request(format!(
                    "Unknown service ID {:?} for check ID {:?}",
                    c.service_id, c.id
                )));
            }
        }
        // Re-registering a check with a status refreshes its TTL, as a `pass` would.
        for c in registration.checks.iter().filter(|c| c.status.is_some()) {
            checks.refresh_ttl(&(registration.node.clone(), c.id.clone()), Instant::now());
        }
        Ok(Some(Op::Register(registration)))
    })
    .await?;
    Ok(plain(StatusCode::OK, "true"))
}

async fn catalog_deregister(shared: &Shared, body: &[u8]) -> Result<Resp, ApiError> {
    let input: CatalogDeregisterIn = decode(body, &decode::DEREGISTER_REQUEST)?;
    let node = input
        .node
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("Must provide node"))?;
    let service_id = input.service_id.filter(|s| !s.is_empty());
    let check_id = input.check_id.filter(|s| !s.is_empty());
    submit(shared, move |state, _| {
        let Some(n) = state.nodes.get(&node) else {
            return Ok(None);
        };
        let exists = match (&service_id, &check_id) {
            (Some(s), _) => n.services.contains_key(s),
            (None, Some(c)) => n.check_owner.contains_key(c),
            (None, None) => true,
        };
        Ok(exists.then_some(Op::Deregister {
            node,
            service_id,
            check_id,
        }))
    })
    .await?;
    Ok(plain(StatusCode::OK, "true"))
}

async fn catalog_services(shared: &Shared, query: &Query) -> Result<Resp, ApiError> {
    let (state, index) = read(shared, query, |s| s.services_index).await?;
    let mut out: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for name in state.by_name.keys() {
        let tags = out.entry(name.as_str()).or_default();
        for (_, svc) in state.instances(name) {
            tags.extend(svc.tags.iter().map(String::as_str));
        }
    }
    Ok(json_response(index, &out))
}

fn tagged_addresses(address: &str) -> Value {
    json!({ "lan": address, "wan": address })
}

fn node_json(node: &NodeEntry) -> Value {
    let info = &node.info;
    json!({
        "ID": "",
        "Node": info.name,
        "Address": info.address,
        "Datacenter": "dc1",
        "TaggedAddresses": tagged_addresses(&info.address),
        "Meta": info.meta,
        "CreateIndex": info.create_index,
        "ModifyIndex": info.modify_index,
    })
}

fn weights_json(w: &Weights) -> Value {
    json!({ "Passing": w.passing, "Warning": w.warning })
}

fn service_json(svc: &ServiceEntry) -> Value {
    json!({
        "ID": svc.id,
        "Service": svc.name,
        "Tags": svc.tags,
        "Address": svc.address,
        "Meta": svc.meta,
        "Port": svc.port,
        "Weights": weights_json(&svc.weights),
        "EnableTagOverride": false,
        "CreateIndex": svc.create_index,
        "ModifyIndex": svc.modify_index,
    })
}

fn check_json(node: &NodeEntry, check: &CheckEntry) -> Value {
    let tags = node
        .services
        .get(&check.service_id)
        .map(|s| s.tags.clone())
        .unwrap_or_default();
    let d = &check.definition;
    let fmt_dur = |d: Option<Duration>| d.map(decode::format_go_duration).unwrap_or_default();
    json!({
        "Node": node.info.name,
        "CheckID": check.id,
        "Name": check.name,
        "Status": check.status.as_str(),
        "Notes": check.notes,
        "Output": check.output,
        "ServiceID": check.service_id,
        "ServiceName": check.service_name,
        "ServiceTags": tags,
        "Interval": fmt_dur(d.interval),
        "Timeout": fmt_dur(d.timeout),
        "Type": if is_maintenance(&check.id) { "maintenance" } else { d.kind() },
        "Definition": {
            "HTTP": d.http.clone().unwrap_or_default(),
            "TCP": d.tcp.clone().unwrap_or_default(),
            "H2PING": d.h2ping.clone().unwrap_or_default(),
            "H2PingUseTLS": false,
            "TTL": fmt_dur(d.ttl),
            "Interval": fmt_dur(d.interval),
            "Timeout": fmt_dur(d.timeout),
            "DeregisterCriticalServiceAfter": fmt_dur(d.deregister_critical_after),
        },
        "CreateIndex": check.create_index,
        "ModifyIndex": check.modify_index,
    })
}

fn has_tags(svc: &ServiceEntry, query: &Query) -> bool {
    query.all("tag").all(|t| svc.tags.iter().any(|s| s == t))
}

async fn catalog_nodes(shared: &Shared, query: &Query) -> Result<Resp, ApiError> {
    let (state, index) = read(shared, query, |s| s.nodes_index).await?;
    let out: Vec<Value> = state.nodes.values().map(|n| node_json(n)).collect();
    Ok(json_response(index, &out))
}

async fn catalog_service(shared: &Shared, query: &Query, name: &str) -> Result<Resp, ApiError> {
    let (state, index) = read(shared, query, |s| s.index_of_service(name)).await?;
    let out: Vec<Value> = state
        .instances(name)
        .filter(|(_, svc)| has_tags(svc, query))
        .map(|(node, svc)| {
            let info = &node.info;
            json!({
                "ID": "",
                "Node": info.name,
                "Address": info.address,
                "Datacenter": "dc1",
                "TaggedAddresses": tagged_addresses(&info.address),
                "NodeMeta": info.meta,
                "ServiceID": svc.id,
                "ServiceName": svc.name,
                "ServiceTags": svc.tags,
                "ServiceAddress": svc.address,
                "ServiceMeta": svc.meta,
                "ServicePort": svc.port,
                "ServiceWeights": weights_json(&svc.weights),
                "ServiceEnableTagOverride": false,
                "CreateIndex": svc.create_index,
                "ModifyIndex": svc.modify_index,
            })
        })
        .collect();
    Ok(json_response(index, &out))
}

async fn health_service(shared: &Shared, query: &Query, name: &str) -> Result<Resp, ApiError> {
    let passing = query
        .get("passing")
        .is_some_and(|v| v != "false" && v != "0");
    let (state, index) = read(shared, query, |s| s.index_of_service(name)).await?;
    let out: Vec<Value> = state
        .instances(name)
        .filter(|(_, svc)| has_tags(svc, query))
        .filter(|(node, svc)| !passing || State::instance_health(node, &svc.id) == Health::Passing)
        .map(|(node, svc)| {
            let checks: Vec<Value> = State::instance_checks(node, &svc.id)
                .map(|c| check_json(node, c))
                .collect();
            json!({
                "Node": node_json(node),
                "Service": service_json(svc),
                "Checks": checks,
            })
        })
        .collect();
    Ok(json_response(index, &out))
}

async fn health_checks(shared: &Shared, query: &Query, name: &str) -> Result<Resp, ApiError> {
    let (state, index) = read(shared, query, |s| s.index_of_service(name)).await?;
    let out: Vec<Value> = state
        .instances(name)
        .flat_map(|(node, svc)| {
            State::instance_checks(node, &svc.id)
                .filter(|c| !c.service_id.is_empty())
                .map(|c| check_json(node, c))
                .collect::<Vec<_>>()
        })
        .collect();
    Ok(json_response(index, &out))
}

// === Agent: self, members, checks, maintenance ===

/// The Consul version whose HTTP API this registry answers as (`/v1/agent/self`).
const CONSUL_API_VERSION: &str = "1.21.0";
const NODE_MAINTENANCE: &str = "_node_maintenance";
const SERVICE_MAINTENANCE_PREFIX: &str = "_service_maintenance:";

fn is_maintenance(check_id: &str) -> bool {
    check_id == NODE_MAINTENANCE || check_id.starts_with(SERVICE_MAINTENANCE_PREFIX)
}

/// Serf's starting coordinate: every node sits at the origin (no network tomography here).
fn origin_coordinate() -> Value {
    json!({ "Vec": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "Error": 1.5, "Adjustment": 0.0, "Height": 1.0e-5 })
}

fn member_json(shared: &Shared) -> Value {
    json!({
        "Name": shared.node_name,
        "Addr": shared.node_address.to_string(),
        "Port": 8301,
        "Tags": {
            "role": "consul", "dc": "dc1", "segment": "", "build": CONSUL_API_VERSION,
            "port": "8300", "vsn": "2", "vsn_min": "2", "vsn_max": "3", "raft_vsn": "3",
            "bootstrap": "1",
        },
        "Status": 1,
        "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
        "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
    })
}

fn agent_self(shared: &Shared) -> Resp {
    let meta = shared
        .state
        .borrow()
        .nodes
        .get(&shared.node_name)
        .map(|n| n.info.meta.clone())
        .unwrap_or_default();
    json_response_unindexed(&json!({
        "Config": {
            "Datacenter": "dc1",
            "PrimaryDatacenter": "dc1",
            "NodeName": shared.node_name,
            "NodeID": "",
            "Revision": "",
            "Server": true,
            "Version": CONSUL_API_VERSION,
            "BuildDate": "",
        },
        "Coord": origin_coordinate(),
        "Member": member_json(shared),
        "Meta": meta,
        "Stats": {
            "agent": { "checks": "", "services": "" },
            "skyline": { "version": env!("CARGO_PKG_VERSION"), "registry": "embedded" },
        },
    }))
}

async fn agent_check_register(shared: &Shared, body: &[u8]) -> Result<Resp, ApiError> {
    let input: CheckIn = decode(body, &decode::CHECK_DEFINITION)?;
    let name = input
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("Missing check name"))?;
    let service_id = input.service_id.clone().unwrap_or_default();
    let check = check_def(input, None, name, service_id, true)?;
    if is_maintenance(&check.id) {
        return Err(ApiError::bad_request(format!(
            "Invalid check ID {:?}: reserved for maintenance mode",
            check.id
        )));
    }
    let node = shared.node_name.clone();
    let address = shared.node_address.to_string();
    submit(shared, move |state, checks| {
        if !check.service_id.is_empty() {
            let known = state
                .nodes
                .get(&node)
                .is_some_and(|n| n.services.contains_key(&check.service_id));
            if !known {
                return Err(ApiError::bad_request(format!(
                    "ServiceID {:?} does not exist",
                    check.service_id
                )));
            }
        }
        if check.status.is_some() {
            checks.refresh_ttl(&(node.clone(), check.id.clone()), Instant::now());
        }
        Ok(Some(Op::Register(Registration {
            node,
            address,
            node_meta: None,
            service: None,
            checks: vec![check],
            replace_service_checks: false,
        })))
    })
    .await?;
    Ok(plain(StatusCode::OK, ""))
}

async fn agent_check_deregister(shared: &Shared, id: String) -> Result<Resp, ApiError> {
    let node = shared.node_name.clone();
    submit(shared, move |state, _| {
        if state.check(&node, &id).is_none() {
            return Err(ApiError::not_found(format!(
                "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
            )));
        }
        Ok(Some(Op::Deregister {
            node,
            service_id: None,
            check_id: Some(id),
        }))
    })
    .await?;
    Ok(plain(StatusCode::OK, ""))
}

/// Go's `strconv.ParseBool`, as Consul reads `?enable=`.
fn parse_enable(query: &Query) -> Result<bool, ApiError> {
    let raw = query
        .get("enable")
        .ok_or_else(|| ApiError::bad_request("Missing value for enable"))?;
    match raw {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(ApiError::bad_request(format!(
            "Invalid value for enable: {raw:?}"
        ))),
    }
}

/// Node (`service` `None`) or service maintenance: a critical check, registered on enable and
/// removed on disable, as Consul does (so it is persisted with the catalog).
async fn maintenance(
    shared: &Shared,
    query: &Query,
    service: Option<String>,
) -> Result<Resp, ApiError> {
    let enable = parse_enable(query)?;
    let reason = query.get("reason").unwrap_or_default().to_owned();
    let node = shared.node_name.clone();
    let address = shared.node_address.to_string();
    submit(shared, move |state, _| {
        let entry = state.nodes.get(&node);
        let (check_id, service_id) = match &service {
            None => (NODE_MAINTENANCE.to_owned(), String::new()),
            Some(id) => {
                if !entry.is_some_and(|n| n.services.contains_key(id)) {
                    return Err(ApiError::not_found(format!(
                        "No service registered with ID {id:?}"
                    )));
                }
                (format!("{SERVICE_MAINTENANCE_PREFIX}{id}"), id.clone())
            }
        };
        let exists = state.check(&node, &check_id).is_some();
        if !enable {
            return Ok(exists.then_some(Op::Deregister {
                node,
                service_id: None,
                check_id: Some(check_id),
            }));
        }
        if exists {
            return Ok(None);
        }
        let (name, default_reason) = match service {
            None => (
                "Node Maintenance Mode",
                "Maintenance mode is enabled for this node, but no reason was provided. This is a default message.",
            ),
            Some(_) => (
                "Service Maintenance Mode",
                "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.",
            ),
        };
        let notes = if reason.is_empty() {
            default_reason.to_owned()
        } else {
            reason
        };
        Ok(Some(Op::Register(Registration {
            node,
            address,
            node_meta: None,
            service: None,
            checks: vec![CheckDef {
                id: check_id,
                name: name.to_owned(),
                service_id,
                status: Some(Health::Critical),
                output: String::new(),
                notes,
                definition: CheckDefinition::default(),
            }],
            replace_service_checks: false,
        })))
    })
    .await?;
    Ok(plain(StatusCode::OK, ""))
}

// === Catalog and health by node, health by state, coordinates ===

async fn catalog_node(shared: &Shared, query: &Query, name: &str) -> Result<Resp, ApiError> {
    let (state, index) = read(shared, query, |s| s.catalog_index).await?;
    let Some(node) = state.nodes.get(name) else {
        // Consul answers an unknown node with `null`.
        return Ok(json_response(index, &Value::Null));
    };
    let services: serde_json::Map<String, Value> = node
        .services
        .values()
        .map(|svc| (svc.id.clone(), service_json(svc)))
        .collect();
    Ok(json_response(
        index,
        &json!({ "Node": node_json(node), "Services": services }),
    ))
}

async fn health_node(shared: &Shared, query: &Query, name: &str) -> Result<Resp, ApiError> {
    let (state, index) = read(shared, query, |s| s.catalog_index).await?;
    let out: Vec<Value> = state
        .nodes
        .get(name)
        .map(|node| node.checks.values().map(|c| check_json(node, c)).collect())
        .unwrap_or_default();
    Ok(json_response(index, &out))
}

async fn health_state(shared: &Shared, query: &Query, wanted: &str) -> Result<Resp, ApiError> {
    let (state, index) = read(shared, query, |s| s.catalog_index).await?;
    // Consul answers an unknown state with an empty list, not an error.
    let out: Vec<Value> = state
        .nodes
        .values()
        .flat_map(|node| {
            node.checks
                .values()
                .filter(|c| wanted == "any" || c.status.as_str() == wanted)
                .map(|c| check_json(node, c))
                .collect::<Vec<_>>()
        })
        .collect();
    Ok(json_response(index, &out))
}

async fn coordinate_nodes(shared: &Shared, query: &Query) -> Result<Resp, ApiError> {
    let (state, index) = read(shared, query, |s| s.nodes_index).await?;
    let out: Vec<Value> = state
        .nodes
        .keys()
        .map(|name| json!({ "Node": name, "Segment": "", "Coord": origin_coordinate() }))
        .collect();
    Ok(json_response(index, &out))
}

fn coordinate_datacenters(shared: &Shared) -> Resp {
    json_response_unindexed(&json!([{
        "Datacenter": "dc1",
        "AreaID": "wan",
        "Coordinates": [{
            "Node": format!("{}.dc1", shared.node_name),
            "Coord": origin_coordinate(),
        }],
    }]))
}

// === Events ===

fn event_fire(
    shared: &Shared,
    query: &Query,
    name: String,
    payload: Bytes,
) -> Result<Resp, ApiError> {
    let filter = |k: &str| query.get(k).unwrap_or_default().to_owned();
    let event = EventLog::prepare(
        name,
        payload.to_vec(),
        filter("node"),
        filter("service"),
        filter("tag"),
    )
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let fired = serde_json::to_value(&event).unwrap_or(Value::Null);
    let state = shared.state.borrow().clone();
    let services: Vec<(&str, &[String])> = state
        .nodes
        .get(&shared.node_name)
        .map(|n| {
            n.services
                .values()
                .map(|s| (s.id.as_str(), s.tags.as_slice()))
                .collect()
        })
        .unwrap_or_default();
    shared.events.send_if_modified(|log| {
        Arc::make_mut(log).receive(event, &shared.node_name, services.into_iter())
    });
    Ok(json_response_unindexed(&fired))
}

async fn event_list(shared: &Shared, query: &Query) -> Result<Resp, ApiError> {
    let params = blocking(query)?;
    let name = query.get("name").filter(|n| !n.is_empty());
    let index_of = |log: &Arc<EventLog>| events::list_index(&log.list(name));
    let mut rx = shared.events.subscribe();
    // Consul's event index is not monotonic: a blocking list waits while it is unchanged.
    let log = match params.index.filter(|i| *i > 0) {
        None => rx.borrow_and_update().clone(),
        Some(min) => wait_until(shared, params.wait, &mut rx, |l| index_of(l) != min).await,
    };
    let events = log.list(name);
    Ok(json_response(events::list_index(&events), &events))
}

// === KV ===

pub(crate) fn kv_json(key: &str, e: &KvEntry) -> Value {
    let value = if e.value.is_empty() {
        Value::Null
    } else {
        Value::String(base64::engine::general_purpose::STANDARD.encode(&e.value))
    };
    let mut out = json!({
        "LockIndex": e.lock_index,
        "Key": key,
        "Flags": e.flags,
        "Value": value,
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if let Some(session) = &e.session {
        out["Session"] = json!(session);
    }
    out
}

fn kv_not_found(index: u64) -> Resp {
    let mut resp = with_index(
        Response::new(Full::new(Bytes::new())),
        index,
        "text/plain; charset=utf-8",
    );
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp
}

async fn kv_get(shared: &Shared, query: &Query, key: &str) -> Result<Resp, ApiError> {
    let prefix = query.has("recurse") || query.has("keys");
    let (state, index) = read(shared, query, |s| s.index_of_kv(key, prefix)).await?;
    if query.has("keys") {
        let sep = query.get("separator").unwrap_or_default();
        let mut keys: Vec<&str> = Vec::new();
        for (k, _) in prefix_range(&state.kv, key) {
            let cut = if sep.is_empty() {
                k.as_str()
            } else {
                match k[key.len()..].find(sep) {
                    Some(i) => &k[..key.len() + i + sep.len()],
                    None => k.as_str(),
                }
            };
            if keys.last() != Some(&cut) {
                keys.push(cut);
            }
        }
        if keys.is_empty() {
            return Ok(kv_not_found(index));
        }
        return Ok(json_response(index, &keys));
    }
    if query.has("recurse") {
        let out: Vec<Value> = prefix_range(&state.kv, key)
            .map(|(k, e)| kv_json(k, e))
            .collect();
        if out.is_empty() {
            return Ok(kv_not_found(index));
        }
        return Ok(json_response(index, &out));
    }
    let Some(entry) = state.kv.get(key) else {
        return Ok(kv_not_found(index));
    };
    if query.has("raw") {
        let resp = Response::new(Full::new(Bytes::from(entry.value.clone())));
        return Ok(with_index(resp, index, "application/octet-stream"));
    }
    Ok(json_response(index, &[kv_json(key, entry)]))
}

/// Consul's 400 when more than one of `flags` is given.
fn conflicting_flags(query: &Query, flags: &[&str]) -> Result<(), ApiError> {
    if flags.iter().filter(|f| query.has(f)).count() > 1 {
        let mut pairs: Vec<String> = query.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.sort();
        return Err(ApiError::bad_request(format!(
            "Conflicting flags: {}\n",
            pairs.join("&")
        )));
    }
    Ok(())
}

async fn kv_put(
    shared: &Shared,
    query: &Query,
    key: String,
    value: Bytes,
) -> Result<Resp, ApiError> {
    if key.is_empty() {
        return Err(ApiError::bad_request("Missing key name"));
    }
    conflicting_flags(query, &["cas", "acquire", "release"])?;
    let flags = query.number("flags", "flags")?.unwrap_or(0);
    let cas = query.number("cas", "cas value")?;
    for (param, acquire) in [("acquire", true), ("release", false)] {
        let Some(session) = query.get(param).map(str::to_owned) else {
            continue;
        };
        let (_, done) = submit_with(shared, move |state, _| {
            let value = value.to_vec();
            let decided = if acquire {
                super::session::lock(state, &key, value, flags, &session)?
            } else {
                super::session::unlock(state, &key, value, flags, &session)?
            };
            Ok(match decided {
                Ok(op) => (Some(op), true),
                Err(_) => (None, false),
            })
        })
        .await?;
        return Ok(plain(StatusCode::OK, if done { "true" } else { "false" }));
    }
    let written = submit(shared, move |state, _| {
        if let Some(cas) = cas {
            let current = state.kv.get(&key).map_or(0, |e| e.modify_index);
            if current != cas {
                return Ok(None);
            }
        }
        Ok(Some(Op::KvPut {
            key,
            value: value.to_vec(),
            flags,
        }))
    })
    .await?;
    Ok(plain(
        StatusCode::OK,
        if written.is_some() { "true" } else { "false" },
    ))
}

async fn kv_delete(shared: &Shared, query: &Query, key: String) -> Result<Resp, ApiError> {
    let recurse = query.has("recurse");
    let cas = query.number("cas", "cas value")?;
    if cas.is_some() && recurse {
        return Err(ApiError::bad_request("Conflicting flags: cas and recurse"));
    }
    if key.is_empty() && !recurse {
        return Err(ApiError::bad_request("Missing key name"));
    }
    // A failed compare-and-set writes nothing and answers `false`.
    let cas_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = cas_failed.clone();
    submit(shared, move |state, _| {
        let current = state.kv.get(&key).map(|e| e.modify_index);
        if cas.is_some_and(|cas| current != Some(cas)) {
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
            return Ok(None);
        }
        let exists = if recurse {
            prefix_range(&state.kv, &key).next().is_some()
        } else {
            current.is_some()
        };
        Ok(exists.then_some(Op::KvDelete { key, recurse }))
    })
    .await?;
    let failed = cas_failed.load(std::sync::atomic::Ordering::Relaxed);
    Ok(plain(StatusCode::OK, if failed { "false" } else { "true" }))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn a_go_duration_reads_back_as_written(h in 0u64..1000, m in 0u64..60, sec in 0u64..60, ms in 0u64..1000) {
            let text = format!("{h}h{m}m{sec}s{ms}ms");
            let want = Duration::from_secs(h * 3600 + m * 60 + sec) + Duration::from_millis(ms);
            proptest::prop_assert_eq!(parse_duration(&text), Ok(want));
        }
    }

    #[test]
    fn parses_go_durations() {
        let cases = [
            ("0", Duration::ZERO),
            ("5s", Duration::from_secs(5)),
            ("1m", Duration::from_secs(60)),
            ("300ms", Duration::from_millis(300)),
            ("1.5h", Duration::from_secs(5400)),
            ("2h45m", Duration::from_secs(2 * 3600 + 45 * 60)),
            ("1m30s", Duration::from_secs(90)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            (".5s", Duration::from_millis(500)),
            ("+3s", Duration::from_secs(3)),
        ];
        for (s, want) in cases {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn refuses_malformed_go_durations() {
        for s in [
            "",
            "5",
            "s",
            "-1s",
            "1x",
            "1.s.",
            "1h-5m",
            "99999999999999999999h",
            "1 s",
        ] {
            assert!(parse_duration(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn a_wait_beyond_ten_minutes_is_clamped() {
        let q = Query::parse(Some("index=5&wait=1h"));
        let b = blocking(&q).unwrap();
        assert_eq!(b.wait, MAX_WAIT);
        assert_eq!(b.index, Some(5));
        assert_eq!(blocking(&Query::parse(None)).unwrap().wait, DEFAULT_WAIT);
    }

    #[test]
    fn decodes_percent_escapes_in_keys_and_queries() {
        assert_eq!(percent_decode("a%2Fb", false).as_deref(), Some("a/b"));
        assert_eq!(percent_decode("a+b", true).as_deref(), Some("a b"));
        assert_eq!(percent_decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%zz", false), None);
        let q = Query::parse(Some("passing&note=all%20good&tag=a&tag=b"));
        assert!(q.has("passing"));
        assert_eq!(q.get("note"), Some("all good"));
        assert_eq!(q.all("tag").collect::<Vec<_>>(), ["a", "b"]);
    }
}
