//! The `producer` binary as a process: what a script relies on before it runs anything.
//! (Building this test also makes `cargo test --workspace` build the `producer` binary that
//! the `it` tests run.)

use std::process::Command;

fn producer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_producer"))
        .args(args)
        .env_remove("REDIS_URL")
        .output()
        .expect("producer runs")
}

#[test]
fn help_documents_every_exit_code() {
    let o = producer(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    let codes: Vec<&str> = help
        .split("Exit codes:")
        .nth(1)
        .unwrap_or_else(|| panic!("no exit code section:\n{help}"))
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        codes,
        ["0", "1", "2", "3", "4", "5", "6", "7", "8"],
        "{help}"
    );
}

#[test]
fn version_and_usage_errors() {
    let o = producer(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains(env!("CARGO_PKG_VERSION")));
    let o = producer(&["status", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2), "usage error");
}
