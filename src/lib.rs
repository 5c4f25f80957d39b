//! Skyline: a service mesh in one small binary.
//!
//! Every application calls `http://localhost:5040/service/<name>/<path>`; the outbound proxy on
//! its node sends the request to the inbound proxy (:5041) of a node with a healthy instance,
//! which hands it to the instance with the `/service/<name>` prefix stripped.
//!
//! # Layout
//!
//! - [`access`]: the access log, one line per request on every proxy listener, written by the
//!   serve layer from what each role's handler notes ([`access::Note`]), buffered off the
//!   request path.
//! - [`authz`]: authorization policies (which service may call which; `[authz]` and the KV's
//!   `skyline/policies/`), the caller's identity asserted over mTLS (`x-skyline-caller`), and
//!   [`authz::path`], the path normalisation that policies match and upstreams receive.
//! - [`agent`]: the per-node proxy: outbound, inbound and admin listeners over one route table;
//!   `agent::registration` keeps the node's declared `[[service]]`s registered (in the registry,
//!   Consul or etcd) with their checks, and follows SIGHUP.
//! - [`bridge`]: `skyline bridge` on Kubernetes nodes: Skyline URLs ↔ cluster DNS names;
//!   `bridge::explain` is its `/explain` (the DNS name and URL a request becomes).
//! - [`admin`]: `/healthz`, `/readyz`, `/routes`, `/metrics` on the admin listener;
//!   [`admin::ui`] is the web dashboard at `/ui` (assets embedded, traffic history sampled
//!   from the counters, migration records from the registry KV).
//! - [`catalog`]: the model (nodes, instances, health, snapshots) and the `Discovery` trait.
//!   [`catalog::file`] is a TOML file, hot-reloaded; [`catalog::consul`] is the Consul backend
//!   (blocking queries over HTTP), which also follows our own registry; [`catalog::etcd`] lists
//!   and watches an etcd v3 prefix, and registers a node's instances under its lease.
//! - [`cli`]: `skyline services`, `register`, `deregister` against a registry; [`cli::kubernetes`]
//!   is `skyline k8s services`, the Kubernetes Services that stand for the catalog's services;
//!   [`cli::explain`] is `skyline explain`, which asks an agent's `/explain`; [`cli::routes`] is
//!   `skyline routes`, which prints an agent's `/routes` for a person; [`cli::prometheus`] is
//!   `skyline prometheus-targets`, a Prometheus `file_sd_configs` file of every role's admin
//!   listener (`skyline-admin` in the catalog, registered by `agent::registration`);
//!   [`cli::status`] is `skyline status`, how far every proxy has converged on the catalog.
//! - [`config`]: flags, `SKYLINE_*` variables and the TOML file, validated into settings.
//!   The one duration grammar; `config::reference` describes every setting (docs/configuration.md,
//!   `skyline config example`, `skyline config check`).
//! - [`demo`]: the `hello` and `echo` demo applications; [`demo::migration`] is
//!   `skyline demo migration`, the Mesos → Kubernetes migration on one machine (in network
//!   namespaces when root, else on loopback addresses).
//! - [`fuzz`]: the entry points of the fuzz targets in `fuzz/` (the HTTP/1 guard, Skyline URLs,
//!   the bridge's rewrites, the registry's JSON bodies, config files, route policies), also
//!   replayed over the seed corpus by a stable test.
//! - [`gateway`]: `skyline gateway`, the service discovery bridge: per-service ordered tiers
//!   (Mesos first, then the Kubernetes bridges) with fail-back hysteresis and weighted splits;
//!   `gateway::explain` is its `/explain` (which tier takes a request, and why not the others).
//! - [`migrate`]: `skyline migrate`, the migration autopilot: moves a service's gateway split
//!   step by step through the registry KV, guarded by the gateways' own numbers
//!   ([`gateway::answers`]), rolling back by itself; `migrate::driver` is the command.
//! - [`netns`]: a lab of Linux network namespaces (a bridge, a namespace per node, processes
//!   inside), torn down on drop; the demo's nodes and the namespace integration tests.
//! - [`metrics`]: Prometheus metrics of every role (`/metrics` on the admin listener); requests
//!   are recorded by [`serve::serve_recorded`], labelled by the handlers' [`metrics::ServiceLabel`].
//! - [`proxy`]: the shared forwarder, header rules and mesh errors; [`proxy::headers`], the header
//!   contract (one rule per header name) that both lanes apply; `proxy::{outbound, inbound}`
//!   (`proxy::outbound::explain`: the outbound routing decision explained, without sending);
//!   `proxy::express`, the agent's lane for HTTP/1.1 requests, forwarded as bytes with their
//!   bodies streamed behind them;
//!   `proxy::upgrade`, HTTP/1.1 upgrades (WebSocket) spliced both ways after `101`;
//!   `proxy::h2`, h2c toward the next hop: for HTTP/2 requests (gRPC) to other proxies, and
//!   for every request to an instance that speaks only h2c.
//! - [`registry`]: the embedded Consul-compatible registry: API, Consul's body decoding rules
//!   (`registry::decode`), durable store (a damaged log is refused, `--repair` keeps what is
//!   readable), health checks, sessions and KV locks (`registry::session`), `/v1/txn`
//!   (`registry::txn`), user events (`registry::events`); its listener has the same framing
//!   guard (`serve::guard`) as the proxies.
//! - [`routing`]: the route table, built from a snapshot and swapped atomically;
//!   `routing::reach`, whether a route is reachable as the proxies observe it (refusals move a
//!   request on to the catch-all or the next tier).
//! - [`serve`]: accept loop, HTTP/1.1 settings, graceful drain, the express lane's connection
//!   loop (which also tells an h2c connection by its preface and hands it to hyper's HTTP/2
//!   server, with the HTTP/2 abuse limits; gateways and bridges, without the express lane,
//!   sniff the preface alone); [`serve::flood`] is the control-frame budget of an HTTP/2
//!   connection (PING, SETTINGS, reset floods end with GOAWAY); [`serve::guard`] refuses
//!   ambiguous HTTP/1 request framing before hyper or the express lane acts on it;
//!   [`serve::activation`] takes the
//!   listening sockets a supervisor (systemd) passed, for restarts that refuse no connection.
//! - [`status`]: convergence reports: each agent, gateway and bridge publishes the catalog
//!   version its route table was built from, and its readiness, under `skyline/status/` in the
//!   KV ([`cli::status`] is `skyline status`).
//! - [`tls`]: mesh TLS: mTLS between the proxies, strict or permissive, certificates reloaded
//!   when their files change; [`tls::ca`] is the mesh CA (`skyline ca init`, `skyline ca issue`).
//! - [`up`]: `skyline up`, a whole mesh with demo services on one machine.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod agent;
pub mod authz;
pub mod bridge;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod demo;
pub mod fuzz;
pub mod gateway;
pub mod metrics;
pub mod migrate;
pub mod netns;
pub mod proxy;
pub mod registry;
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
