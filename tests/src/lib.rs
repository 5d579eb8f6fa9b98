//! Test support for the integration tests: a real `redis-server` (`redis_server`), the
//! workspace binaries (`bins`), a real headless Chromium over WebDriver (`browser`), worker
//! processes (`fleet`), the one lab every test and benchmark builds (`lab`), waiting with a deadline (`wait`), scaled-down retry timing
//! (`retries`) and a Redis Sentinel set of real processes (`sentinel`).

pub mod bins;
pub mod browser;
pub mod fleet;
pub mod lab;
pub mod redis_server;
pub mod retries;
pub mod sentinel;
pub mod wait;
