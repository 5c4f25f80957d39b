//! Skyline's integration tests: one binary, real sockets, real processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agents_register;
mod catalog_changes;
mod config;
mod consul_backend;
mod consul_clients;
mod demo;
mod etcd;
mod faults;
mod gateway;
mod guard;
mod hostile_input;
mod image;
mod kubernetes;
mod metrics;
mod migration;
mod package;
mod pool;
mod processes;
mod registry;
mod registry_mesh;
mod resilience;
mod support;
mod two_hops;
mod upgrade;
mod wire;
