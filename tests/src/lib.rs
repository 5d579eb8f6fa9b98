//! Test support for the integration tests: see `harness`.

pub mod bins;
pub mod fleet;
pub mod redis_server;
pub mod wait;
