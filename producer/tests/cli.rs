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
    for code in 0..=6 {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&code.to_string())),
            "exit code {code} is not documented:\n{help}"
        );
    }
}

#[test]
fn version_and_usage_errors() {
    let o = producer(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains(env!("CARGO_PKG_VERSION")));
    let o = producer(&["status", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2), "usage error");
}
