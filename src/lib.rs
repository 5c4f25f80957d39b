//! Skyline: a service mesh in one small binary.
//!
//! Every application calls `http://localhost:5040/service/<name>/<path>`; the outbound proxy on
//! its node sends the request to the inbound proxy (:5041) of a node with a healthy instance,
//! which hands it to the instance with the `/service/<name>` prefix stripped.
//!
//! # Layout
//!
//! - [`catalog`]: the model (nodes, instances, health, snapshots) and the `Discovery` trait.
//!   [`catalog::consul`] is the Consul backend (blocking queries over HTTP).
//! - [`registry`]: the embedded Consul-compatible registry (API, durable store, health checks).
#![forbid(unsafe_code)]

pub mod catalog;
pub mod registry;
