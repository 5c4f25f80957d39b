//! Skyline's one integration-test binary: real servers on `127.0.0.1:0`, driven from outside.

mod guard;
