//! Test support for the integration tests: a real `redis-server` (`redis_server`), the
//! workspace binaries (`bins`), a real headless Chromium over WebDriver (`browser`), worker processes (`fleet`), waiting with a deadline (`wait`)
//! and scaled-down retry timing (`retries`).

pub mod bins;
pub mod browser;
pub mod fleet;
pub mod redis_server;
pub mod retries;
pub mod wait;
