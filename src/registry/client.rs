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
