//! Authorization policies from the registry KV (or Consul's): every key under
//! `skyline/policies/` is one policy, JSON or TOML of the shape of `[authz]` (without
//! `caller`), watched with blocking queries as the gateway watches its route policies. An
//! entry that does not validate is refused (logged with its key and the reason, counted as a
//! refused reload) and that key's last good policy kept.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{Authz, KV_POLICIES_PREFIX, Policy};
use crate::config::token::Token;
use crate::metrics::Metrics;
use crate::registry::client::{KvValue, follow_kv};

/// Follows `skyline/policies/` at the registry `address` until `shutdown`, putting the
/// policies in force in `authz`; every changed entry counts as a reload, accepted or refused.
pub async fn watch(
    address: SocketAddr,
    token: Option<Token>,
    authz: Authz,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let parse = |name: &str, value: &str, _initial: bool| {
        if name.is_empty() {
            return KvValue::Skip;
        }
        let parsed = Policy::parse_kv(name, value);
        metrics.config_reload(parsed.is_ok());
        match parsed {
            Ok(policy) => {
                tracing::info!(key = %format!("{KV_POLICIES_PREFIX}{name}"), rules = policy.rules.len(), "authorization policy loaded");
                KvValue::Parsed(policy)
            }
            Err(reason) => KvValue::Refused(reason),
        }
    };
    let apply = |policies| authz.set_kv(policies);
    follow_kv(
        address,
        token,
        KV_POLICIES_PREFIX,
        "authorization policy",
        parse,
        apply,
        shutdown,
    )
    .await;
}
