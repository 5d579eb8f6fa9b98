//! Paths of the workspace's binaries for tests that run them. `cargo test --workspace` builds
//! a package's binaries with its integration tests (`producer/tests`, `worker/tests`), so they
//! exist before any test runs; `cargo test -p labfleet-tests` alone does not, and a missing
//! binary then fails the test with how to build it instead of skipping it.

use std::path::PathBuf;

pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// The debug build of binary `name`; panics with how to build it when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join("debug").join(name);
    assert!(
        p.exists(),
        "binary {} is missing: build it first with `cargo build --workspace --bins` (.ci/run does)",
        p.display()
    );
    p
}

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}
