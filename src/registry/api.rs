//! The HTTP side of the registry: Consul's paths, JSON field names, status codes and error
//! texts, and blocking queries (`?index=N&wait=D`).
//!
//! Deliberate differences from Consul:
//! - service names must match the mesh contract ([`ServiceName::is_valid`]); Consul allows more;
//! - field names are matched exactly (PascalCase as documented), not case-insensitively;
//! - `/v1/catalog/register` accepts `TTL` in a check's `Definition` (our extension, so agents of
//!   many nodes can keep TTL checks in one registry), and `/v1/agent/check/*` accepts `?node=` to
//!   refresh such a check on another node;
//! - every read blocks on its own result's index (never woken by unrelated writes), including
//!   the agent endpoints, which Consul blocks by content hash;
//! - no sessions, ACLs, datacenters, namespaces, `?filter`, `?near`, KV locks;
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
use super::store::{
    CheckDef, CheckDefinition, CheckEntry, KvEntry, NodeEntry, Op, Registration, ServiceDef,
    ServiceEntry, State, Weights, prefix_range,
};
use super::{Command, INBOUND_PORT_META};
use crate::catalog::{Health, ServiceName};
use crate::config::parse_duration;

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
}

type Resp = Response<Full<Bytes>>;

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

    fn method(method: &Method, allowed: &[Method]) -> Self {
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

    match rest {
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
                let update: CheckUpdateIn = decode(&body)?;
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

async fn read_body<B>(req: Request<B>) -> Result<Bytes, ApiError>
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

fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(ApiError::decode)
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

fn plain(status: StatusCode, body: &'static str) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn json_response(index: u64, value: &impl serde::Serialize) -> Resp {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    with_index(
        Response::new(Full::new(Bytes::from(body))),
        index,
        "application/json",
    )
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

/// Decodes `%XX` escapes (and `+` as space in query strings); `None` when not UTF-8 or malformed.
pub fn percent_decode(s: &str, plus_as_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_as_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A duration field: a Go duration string, or a number of nanoseconds (as Go's JSON encodes
/// `time.Duration`); empty and null mean unset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoDuration(pub Option<Duration>);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = GoDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"10s\" or a number of nanoseconds")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<GoDuration, E> {
                if v.is_empty() {
                    return Ok(GoDuration(None));
                }
                parse_duration(v)
                    .map(|d| GoDuration(Some(d)))
                    .map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<GoDuration, E> {
                Ok(GoDuration((v > 0).then(|| Duration::from_nanos(v))))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<GoDuration, E> {
                u64::try_from(v)
                    .map(|v| GoDuration((v > 0).then(|| Duration::from_nanos(v))))
                    .map_err(|_| E::custom("negative duration"))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<GoDuration, E> {
                Ok(GoDuration(None))
            }
        }
        d.deserialize_any(V)
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
async fn read(
    shared: &Shared,
    query: &Query,
    index_of: impl Fn(&State) -> u64,
) -> Result<(Arc<State>, u64), ApiError> {
    let params = blocking(query)?;
    let mut rx = shared.state.clone();
    let state = rx.borrow_and_update().clone();
    let index = index_of(&state).max(1);
    let Some(min) = params.index.filter(|i| *i > 0) else {
        return Ok((state, index));
    };
    if index > min {
        return Ok((state, index));
    }
    let jitter_ns = u64::try_from(params.wait.as_nanos() / 16).unwrap_or(0);
    let jitter = Duration::from_nanos(fastrand::u64(0..=jitter_ns));
    let deadline = Instant::now() + params.wait + jitter;
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let state = rx.borrow_and_update().clone();
                let index = index_of(&state).max(1);
                if index > min {
                    return Ok((state, index));
                }
            }
            () = tokio::time::sleep_until(deadline) => break,
            () = shared.shutdown.cancelled() => break,
        }
    }
    let state = rx.borrow().clone();
    let index = index_of(&state).max(1);
    Ok((state, index))
}

// === JSON in ===

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WeightsIn {
    passing: Option<i64>,
    warning: Option<i64>,
}

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
}

/// A catalog check's `Definition`; `TTL` in it is our extension.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DefinitionIn {
    #[serde(rename = "TTL", default)]
    ttl: GoDuration,
    #[serde(rename = "HTTP")]
    http: Option<String>,
    #[serde(rename = "TCP")]
    tcp: Option<String>,
    #[serde(default)]
    interval: GoDuration,
    #[serde(default)]
    timeout: GoDuration,
    #[serde(default)]
    deregister_critical_service_after: GoDuration,
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
    #[serde(alias = "Name")]
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
    let (ttl, http, tcp, interval, timeout, dereg) = if agent {
        (
            c.ttl,
            c.http,
            c.tcp,
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
            d.interval,
            d.timeout,
            d.deregister_critical_service_after,
        )
    };
    let http = http.filter(|s| !s.is_empty());
    let tcp = tcp.filter(|s| !s.is_empty());
    let kinds =
        usize::from(ttl.0.is_some()) + usize::from(http.is_some()) + usize::from(tcp.is_some());
    if kinds > 1 {
        return Err(ApiError::bad_request(
            "Only one of TTL, HTTP or TCP may be given for a check",
        ));
    }
    if agent && kinds == 0 {
        return Err(ApiError::bad_request(
            "Check is missing a type: give one of TTL, HTTP or TCP",
        ));
    }
    if (http.is_some() || tcp.is_some()) && interval.0.is_none() {
        return Err(ApiError::bad_request(
            "Interval must be > 0 for HTTP and TCP checks",
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
    if let Some(addr) = &tcp {
        let ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            return Err(ApiError::bad_request(format!(
                "Invalid TCP check address {addr:?}: expected host:port"
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
            interval: interval.0,
            timeout: timeout.0,
            deregister_critical_after: dereg.0,
        },
    })
}

// === Agent endpoints ===

async fn agent_register(shared: &Shared, _query: &Query, body: &[u8]) -> Result<Resp, ApiError> {
    let input: AgentServiceIn = decode(body)?;
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
    let input: CatalogRegisterIn = decode(body)?;
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
    let input: CatalogDeregisterIn = decode(body)?;
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
    let fmt_dur = |d: Option<Duration>| d.map(|d| format!("{d:?}")).unwrap_or_default();
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
        "Type": d.kind(),
        "Definition": {
            "HTTP": d.http.clone().unwrap_or_default(),
            "TCP": d.tcp.clone().unwrap_or_default(),
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

// === KV ===

fn kv_json(key: &str, e: &KvEntry) -> Value {
    let value = if e.value.is_empty() {
        Value::Null
    } else {
        Value::String(base64::engine::general_purpose::STANDARD.encode(&e.value))
    };
    json!({
        "LockIndex": 0,
        "Key": key,
        "Flags": e.flags,
        "Value": value,
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    })
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

fn refuse_sessions(query: &Query) -> Result<(), ApiError> {
    if query.has("acquire") || query.has("release") {
        return Err(ApiError::bad_request(
            "Sessions are not supported by this registry",
        ));
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
    refuse_sessions(query)?;
    let flags = query.number("flags", "flags")?.unwrap_or(0);
    let cas = query.number("cas", "cas value")?;
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

    #[test]
    fn a_duration_field_accepts_strings_nanoseconds_and_null() {
        let d: GoDuration = serde_json::from_str("\"10s\"").unwrap();
        assert_eq!(d.0, Some(Duration::from_secs(10)));
        let d: GoDuration = serde_json::from_str("1000000000").unwrap();
        assert_eq!(d.0, Some(Duration::from_secs(1)));
        let d: GoDuration = serde_json::from_str("null").unwrap();
        assert_eq!(d.0, None);
        assert!(serde_json::from_str::<GoDuration>("true").is_err());
    }
}
