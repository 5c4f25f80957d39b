//! Skyline's one integration-test binary: real servers on `127.0.0.1:0`, driven from outside.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod guard;
