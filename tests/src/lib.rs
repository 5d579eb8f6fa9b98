//! Test support for the integration tests: see `harness`.

pub mod redis_server;
pub mod wait;
