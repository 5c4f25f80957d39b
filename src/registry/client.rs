//! A small client for the registry's (or Consul's) HTTP API, for writes and one-shot reads:
//! `skyline up` registering its demo services, the `skyline services|register|deregister`
//! commands, and agents registering their node's services.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use tokio_util::sync::CancellationToken;

use crate::config::token::Token;

/// How long one call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the registry at {addr}")]
    Unreachable {
        addr: SocketAddr,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("the registry at {addr} did not answer in time")]
    Timeout { addr: SocketAddr },
    #[error("the registry refused {path}: {status} {message}")]
    Refused {
        path: String,
        status: StatusCode,
        message: String,
    },
    #[error("the registry's answer to {path} could not be read")]
    Body { path: String },
}

#[derive(Clone, Debug)]
pub struct RegistryClient {
    addr: SocketAddr,
    http: Client<HttpConnector, Full<Bytes>>,
    /// Sent as `X-Consul-Token` on every call.
    token: Option<Token>,
}

impl RegistryClient {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            http: Client::builder(TokioExecutor::new()).build_http(),
            token: None,
        }
    }

    /// A client for the command-line tools (`skyline services`, `register`, `migrate`, ...):
    /// with the token of `SKYLINE_REGISTRY_TOKEN` when it is set (as Consul's CLI takes
    /// `CONSUL_HTTP_TOKEN`); an invalid one is reported and not sent.
    pub fn from_env(addr: SocketAddr) -> Self {
        let token = std::env::var("SKYLINE_REGISTRY_TOKEN")
            .ok()
            .and_then(|text| {
                Token::new(&text)
                    .inspect_err(|reason| tracing::warn!(%reason, "SKYLINE_REGISTRY_TOKEN ignored"))
                    .ok()
            });
        Self::new(addr).with_token(token)
    }

    /// Sends `token` as `X-Consul-Token` on every call (a token-protected registry or Consul).
    #[must_use]
    pub fn with_token(mut self, token: Option<Token>) -> Self {
        self.token = token;
        self
    }

    /// The token this client sends, if any.
    pub fn token(&self) -> Option<&Token> {
        self.token.as_ref()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET path`, the body of a 2xx answer.
    pub async fn get(&self, path: &str) -> Result<Bytes, ClientError> {
        self.call(Method::GET, path, Bytes::new()).await
    }

    /// `GET path` of a blocking-capable read: the body of a 2xx answer and its
    /// `X-Consul-Index` (to pass as `?index=` next time), when it has one.
    pub async fn get_indexed(&self, path: &str) -> Result<(Bytes, Option<u64>), ClientError> {
        let (bytes, headers) = self
            .call_with_headers(Method::GET, path, Bytes::new())
            .await?;
        let index = headers
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok((bytes, index))
    }

    /// `PUT path` with a JSON body, the body of a 2xx answer.
    pub async fn put_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Bytes, ClientError> {
        self.call(Method::PUT, path, Bytes::from(body.to_string()))
            .await
    }

    /// `method path` with a body as is, the body of a 2xx answer.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Bytes, ClientError> {
        self.call(method, path, body).await
    }

    async fn call(&self, method: Method, path: &str, body: Bytes) -> Result<Bytes, ClientError> {
        Ok(self.call_with_headers(method, path, body).await?.0)
    }

    async fn call_with_headers(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(Bytes, http::HeaderMap), ClientError> {
        let addr = self.addr;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            req = req.header("x-consul-token", token.expose());
        }
        let req = req.body(Full::new(body)).map_err(|_| ClientError::Body {
            path: path.to_owned(),
        })?;
        let response = tokio::time::timeout(CALL_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| ClientError::Timeout { addr })?
            .map_err(|source| ClientError::Unreachable { addr, source })?;
        let status = response.status();
        let (parts, body) = response.into_parts();
        let bytes = tokio::time::timeout(CALL_TIMEOUT, body.collect())
            .await
            .map_err(|_| ClientError::Timeout { addr })?
            .map_err(|_| ClientError::Body {
                path: path.to_owned(),
            })?
            .to_bytes();
        if !status.is_success() {
            let message = String::from_utf8_lossy(&bytes).trim().to_owned();
            return Err(ClientError::Refused {
                path: path.to_owned(),
                status,
                message,
            });
        }
        Ok((bytes, parts.headers))
    }
}

/// One KV read (of a `?recurse` URI, blocking or not): the index and the keys with their decoded values (404: none).
pub async fn kv_get(
    client: &Client<HttpConnector, http_body_util::Empty<Bytes>>,
    uri: &str,
    token: Option<&Token>,
) -> Result<(u64, BTreeMap<String, String>), String> {
    let mut req = Request::get(uri);
    if let Some(token) = token {
        req = req.header("x-consul-token", token.expose());
    }
    let req = req
        .body(http_body_util::Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let index = resp
        .headers()
        .get("x-consul-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let body = http_body_util::Limited::new(resp.into_body(), 4 << 20)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status == StatusCode::NOT_FOUND {
        return Ok((index, BTreeMap::new()));
    }
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    #[derive(serde::Deserialize)]
    struct KvEntry {
        #[serde(rename = "Key")]
        key: String,
        #[serde(rename = "Value")]
        value: Option<String>,
    }
    let entries: Vec<KvEntry> = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for e in entries {
        let value = e
            .value
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        out.insert(e.key, value);
    }
    Ok((index, out))
}

/// What [`follow_kv`] makes of one key under its prefix.
pub enum KvValue<T> {
    /// Not a key of this kind: left out.
    Skip,
    /// The key's value, parsed.
    Parsed(T),
    /// The value refused, with the reason: the key's last good value stays in force.
    Refused(String),
}

/// Follows every key under `prefix` at the registry (or Consul agent) `address` with blocking
/// queries until `shutdown`, and hands the parsed map (by the key without the prefix) to `apply`
/// whenever it changes. Only changed values are parsed, by `parse(name, value, initial)`
/// (`initial`: the first answer, the values found at start); a refused one is logged as `what`
/// with its key and reason, and its last good value kept. A failed read is retried with a
/// backoff up to 5 s (a warning when reads start failing, an info line when they answer
/// again); a new index lower than the last starts over (Consul's rule), and reads are at least
/// 50 ms apart.
pub async fn follow_kv<T: Clone + PartialEq>(
    address: SocketAddr,
    token: Option<Token>,
    prefix: &str,
    what: &str,
    mut parse: impl FnMut(&str, &str, bool) -> KvValue<T>,
    mut apply: impl FnMut(BTreeMap<String, T>),
    shutdown: CancellationToken,
) {
    let client: Client<HttpConnector, http_body_util::Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut index = 0u64;
    let mut current: BTreeMap<String, T> = BTreeMap::new();
    let mut raw: BTreeMap<String, String> = BTreeMap::new();
    let mut backoff = Duration::from_millis(100);
    let mut initial = true;
    // The last read failed (logged as a warning once, until a read succeeds).
    let mut failing = false;
    loop {
        let uri = format!("http://{address}/v1/kv/{prefix}?recurse&index={index}&wait=30s");
        let read = kv_get(&client, &uri, token.as_ref());
        let answer = tokio::select! {
            () = shutdown.cancelled() => return,
            a = tokio::time::timeout(Duration::from_secs(40), read) => a,
        };
        let (new_index, entries) = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                // Once per outage as a warning; each retry is a debug line.
                if failing {
                    tracing::debug!(%address, %error, "cannot read {what} keys from the KV");
                } else {
                    tracing::warn!(%address, %error, "cannot read {what} keys from the KV; keeping the last read");
                }
                failing = true;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(_) => {
                tracing::warn!(%address, "reading {what} keys from the KV timed out");
                continue;
            }
        };
        if std::mem::take(&mut failing) {
            tracing::info!(%address, "the KV answers again: reading {what} keys");
        }
        backoff = Duration::from_millis(100);
        index = if new_index < index {
            0
        } else {
            new_index.max(1)
        };
        let mut next = BTreeMap::new();
        for (key, value) in &entries {
            let Some(name) = key.strip_prefix(prefix) else {
                continue;
            };
            let keep = |next: &mut BTreeMap<String, T>| {
                if let Some(last) = current.get(name) {
                    next.insert(name.to_owned(), last.clone());
                }
            };
            if raw.get(key) == Some(value) {
                keep(&mut next);
                continue;
            }
            match parse(name, value, initial) {
                KvValue::Skip => {}
                KvValue::Parsed(parsed) => {
                    next.insert(name.to_owned(), parsed);
                }
                KvValue::Refused(reason) => {
                    tracing::error!(%key, %reason, "{what} refused; keeping the previous one");
                    keep(&mut next);
                }
            }
        }
        raw = entries;
        initial = false;
        if next != current {
            current = next.clone();
            apply(next);
        }
        // Consul's rule: do not loop faster than this.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
