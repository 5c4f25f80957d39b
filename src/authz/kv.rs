//! Authorization policies from the registry KV (or Consul's): every key under
//! `skyline/policies/` is one policy, JSON or TOML of the shape of `[authz]` (without
//! `caller`), watched with blocking queries as the gateway watches its route policies. An
//! entry that does not validate is refused (logged with its key and the reason, counted as a
//! refused reload) and that key's last good policy kept.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

use super::{Authz, KV_POLICIES_PREFIX, Policy};
use crate::config::token::Token;
use crate::metrics::Metrics;

/// Follows `skyline/policies/` at the registry `address` until `shutdown`, putting the
/// policies in force in `authz`.
pub async fn watch(
    address: SocketAddr,
    token: Option<Token>,
    authz: Authz,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut index = 0u64;
    let mut current: BTreeMap<String, Policy> = BTreeMap::new();
    let mut raw: BTreeMap<String, String> = BTreeMap::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let uri =
            format!("http://{address}/v1/kv/{KV_POLICIES_PREFIX}?recurse&index={index}&wait=30s");
        let read = crate::registry::client::kv_get(&client, &uri, token.as_ref());
        let answer = tokio::select! {
            () = shutdown.cancelled() => return,
            a = tokio::time::timeout(Duration::from_secs(40), read) => a,
        };
        let (new_index, entries) = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                tracing::warn!(%address, %error, "cannot read authorization policies from the KV");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(_) => continue,
        };
        backoff = Duration::from_millis(100);
        index = if new_index < index {
            0
        } else {
            new_index.max(1)
        };
        let mut next = BTreeMap::new();
        for (key, value) in &entries {
            let Some(name) = key.strip_prefix(KV_POLICIES_PREFIX) else {
                continue;
            };
            if name.is_empty() {
                continue;
            }
            if raw.get(key) == Some(value) {
                if let Some(p) = current.get(name) {
                    next.insert(name.to_owned(), p.clone());
                }
                continue;
            }
            match Policy::parse_kv(name, value) {
                Ok(policy) => {
                    tracing::info!(%key, rules = policy.rules.len(), "authorization policy loaded");
                    metrics.config_reload(true);
                    next.insert(name.to_owned(), policy);
                }
                Err(reason) => {
                    tracing::error!(%key, %reason, "authorization policy refused; keeping the previous one");
                    metrics.config_reload(false);
                    if let Some(p) = current.get(name) {
                        next.insert(name.to_owned(), p.clone());
                    }
                }
            }
        }
        raw = entries;
        if next != current {
            current = next.clone();
            authz.set_kv(next);
        }
        // Consul's rule: do not loop faster than this.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
