//! Skyline: a service mesh in one small binary.
//!
//! Every application calls `http://localhost:5040/service/<name>/<path>`; the outbound proxy on
//! its node sends the request to the inbound proxy (:5041) of a node with a healthy instance,
//! which hands it to the instance with the `/service/<name>` prefix stripped.
//!
//! # Layout
//!
//! - [`catalog`]: the model (nodes, instances, health, snapshots) and the `Discovery` trait.
//! - [`serve`]: accepting connections; [`serve::guard`] refuses ambiguous HTTP/1 request framing.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod serve;
