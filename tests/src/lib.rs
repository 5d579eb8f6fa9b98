//! Test support for the integration tests: see `harness`.
