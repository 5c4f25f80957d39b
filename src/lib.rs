//! Skyline: a service mesh in one small binary.
//!
//! Every application calls `http://localhost:5040/service/<name>/<path>`; the outbound proxy on
//! its node sends the request to the inbound proxy (:5041) of a node with a healthy instance,
//! which hands it to the instance with the `/service/<name>` prefix stripped.
//!
//! # Layout
//!
//! The modules stand in layers. A module imports only from its own layer and the layers below,
//! the import graph has no circles, and the roles never import each other (the test
//! `layers::the_crate_docs_layers_hold_for_every_import` holds the code to this list).
//!
//! 0. **Vocabulary**: [`http1`], [`config`], [`contract`], [`error`]
//!    - [`http1`]: HTTP/1 syntax every listener shares: [`http1::guard`] refuses ambiguous
//!      request framing before hyper or the express lane acts on it; optional whitespace and
//!      percent-decoding.
//!    - [`config`]: the grammar of every role's configuration: `ConfigError` (file, line, key,
//!      reason), the one duration grammar, listener addresses, [`config::token`] (the control
//!      APIs' tokens), [`config::reference`] (how a file's keys are described).
//!    - [`contract`]: service names, well-known services and ports, the contract headers
//!      (`x-skyline-error`, `x-request-id`, `x-skyline-origin`), cluster-DNS names ↔ Skyline URLs.
//!    - [`error`]: `MeshError` (what the mesh answers instead of an application: code, status,
//!      body, response) and `SendError` (why an upstream gave no answer).
//! 1. **State**: [`catalog`], [`registry`], [`routing`], [`metrics`], [`authz`], [`status`],
//!    [`registration`], [`migrate`]
//!    - [`catalog`]: the model (nodes, instances, health, snapshots), the `Discovery` trait and
//!      its sources: [`catalog::file`] (TOML, hot-reloaded), [`catalog::consul`] (blocking
//!      queries; also our own registry), [`catalog::etcd`]; following a source
//!      (`catalog::follow_catalog`).
//!    - [`registry`]: the embedded Consul-compatible registry: API, Consul's body decoding
//!      (`registry::decode`), durable store, health checks, sessions and KV locks, `/v1/txn`,
//!      user events; [`registry::client`] is how every role talks to it (and to Consul).
//!    - [`routing`]: the route table, built from a snapshot and swapped atomically; the one
//!      catalog → endpoints builder of every role (`routing::inbound_endpoints`,
//!      `routing::direct_endpoints`, `routing::gateway_pool`: one health and weight rule);
//!      balancing, ejection and the retry budget; `routing::reach`.
//!    - [`metrics`]: Prometheus metrics of every role.
//!    - [`authz`]: authorization policies (`[authz]`, the KV's `skyline/policies/`), callers'
//!      identities, [`authz::path`] (the normalisation policies match and upstreams receive).
//!    - [`status`]: convergence reports under `skyline/status/` (and etcd's `-status/`).
//!    - [`registration`]: keeps a node's declared services (and every role's admin listener)
//!      registered in the registry, Consul or etcd, with their checks.
//!    - [`migrate`]: a migration's record and guards, and [`migrate::answers`], what gateways
//!      publish of each tier's answers while it runs.
//! 2. **Data path**: [`access`], [`tls`], [`mux`], [`serve`], [`proxy`]
//!    - [`access`]: the access log, one line per request on every proxy listener.
//!    - [`tls`]: mesh TLS (mTLS between proxies, strict or permissive, reloaded on change);
//!      [`tls::ca`] is the mesh CA.
//!    - [`mux`]: the multiplexed peer link (`[mesh] peer_protocol = "mux"`): HTTP/1.1
//!      connections between proxies as streams over one TCP or TLS connection.
//!    - [`serve`]: bind and accept, socket activation ([`serve::activation`]), graceful drain,
//!      HTTP/1.1 and h2c with hyper, the HTTP/2 abuse limits ([`serve::flood`]), a handler's own
//!      lane and the handoff to hyper ([`serve::lane`]).
//!    - [`proxy`]: the forwarder (one attempt loop: endpoint choice, deadlines, retries,
//!      budget); [`proxy::headers`], the header contract (one rule per header name) both lanes
//!      apply; the idle pools (one `pool::Idle` policy); `proxy::{outbound, inbound}`; `proxy::express`,
//!      the express lane (requests forwarded as bytes, bodies streamed) and its connection loop;
//!      `proxy::upgrade` (WebSocket), `proxy::h2` (h2c to the next hop), `proxy::authorize`.
//! 3. **What roles share**: [`role`], [`admin`]
//!    - [`role`]: listeners (bound or inherited), mesh TLS, control-API tokens, `StartError`.
//!    - [`admin`]: `/healthz`, `/readyz`, `/routes`, `/metrics`; [`admin::ui`], the dashboard.
//! 4. **Roles**: [`agent`], [`gateway`], [`bridge`]
//!    - [`agent`]: the per-node proxy (outbound, inbound, admin over one route table, the
//!      embedded registry); [`agent::config`] its file, flags and variables; SIGHUP reloads.
//!    - [`gateway`]: `skyline gateway`: per-service ordered tiers (Mesos first, then the
//!      Kubernetes bridges) with fail-back hysteresis, weighted splits and shadows.
//!    - [`bridge`]: `skyline bridge` on Kubernetes nodes: Skyline URLs ↔ cluster DNS names.
//! 5. **Tools**: [`cli`], [`up`], [`demo`], [`netns`], [`fuzz`]
//!    - [`cli`]: `skyline services`, `register`, `k8s services`, `explain`, `routes`,
//!      `prometheus-targets`, `status`, `ca`, [`cli::config`] (`skyline config`), and
//!      [`cli::migrate`] (`skyline migrate`, the migration autopilot).
//!    - [`up`]: `skyline up`, a whole mesh with demo services on one machine.
//!    - [`demo`]: the `hello` and `echo` applications; [`demo::migration`] is
//!      `skyline demo migration`.
//!    - [`netns`]: a lab of Linux network namespaces for the demo and the namespace tests.
//!    - [`fuzz`]: the fuzz targets' entry points, also replayed over the seed corpus.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod agent;
pub mod authz;
pub mod bridge;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod contract;
pub mod demo;
pub mod error;
pub mod fuzz;
pub mod gateway;
pub mod http1;
pub mod metrics;
pub mod migrate;
pub mod mux;
pub mod netns;
pub mod proxy;
pub mod registration;
pub mod registry;
pub mod role;
pub mod routing;
pub mod serve;
pub mod status;
pub mod tls;
pub mod up;

/// An error and its causes on one line, `error: cause: cause`, for logs and `/readyz`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
