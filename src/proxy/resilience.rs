//! How the forwarder calls a service's upstreams: timeouts, retries, load balancing, outlier
//! ejection and active probing — defaults for every service, overridden per service, and
//! swapped as a whole when the configuration is reloaded.

pub mod config;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::catalog::ServiceName;
use crate::routing::balance::{Balance, Outlier};

/// How long to wait for an upstream connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request may wait for its response head, retries included (NGINX's
/// `proxy_read_timeout`). Bodies may stream for longer, as long as they keep moving.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a response body may stall before the mesh gives up on it, and an upgraded
/// connection may stay silent both ways before it is closed (Envoy's stream idle timeout).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Retries after the first attempt (502/503/504, timeouts, resets), budget permitting.
pub const RETRIES: u32 = 2;
/// The largest request body buffered so that the request can be retried (Linkerd's limit).
/// A larger body streams and is retried only when its connection was refused.
pub const RETRY_BODY_LIMIT: usize = 64 * 1024;

/// The policy of calls to one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Resilience {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Each attempt's own limit; `None`: the request's.
    pub attempt_timeout: Option<Duration>,
    /// The longest a response body may stall, and an upgraded connection (a WebSocket) may
    /// carry no byte either way, before the mesh closes it.
    pub idle_timeout: Duration,
    /// The largest request body in bytes; `None` (the default): no limit, bodies stream.
    pub max_request_body: Option<u64>,
    pub retries: u32,
    pub balance: Balance,
    pub outlier: Outlier,
    pub probe: Option<Probe>,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            attempt_timeout: None,
            idle_timeout: IDLE_TIMEOUT,
            max_request_body: None,
            retries: RETRIES,
            balance: Balance::default(),
            outlier: Outlier::default(),
            probe: None,
        }
    }
}

/// An active health probe: `GET <path>` on each endpoint every `interval`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Probe {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed probes in a row that take an endpoint out.
    pub unhealthy: u32,
    /// Passed probes in a row that bring it back.
    pub healthy: u32,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            path: "/".to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            unhealthy: 2,
            healthy: 1,
        }
    }
}

/// The defaults and the per-service policies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Policies {
    pub default: Arc<Resilience>,
    pub services: HashMap<ServiceName, Arc<Resilience>>,
}

impl Policies {
    pub fn for_service(&self, service: &str) -> &Arc<Resilience> {
        if self.services.is_empty() {
            return &self.default;
        }
        self.services.get(service).unwrap_or(&self.default)
    }
}

/// The policies in force, swapped whole on reload; a request keeps the policy it started with.
pub type SharedPolicies = Arc<ArcSwap<Policies>>;

pub fn shared(policies: Policies) -> SharedPolicies {
    Arc::new(ArcSwap::from_pointee(policies))
}
