//! The `worker` binary's command line, run as a process. (Building this test also makes
//! `cargo test --workspace` build the `worker` binary that `it::reliability` starts.)

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn worker(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .env_remove("REDIS_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("worker starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "worker {args:?} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn data_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data")
        .to_string_lossy()
        .into_owned()
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn help_lists_the_flags_and_examples() {
    let o = worker(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--redis",
        "--concurrency",
        "--lease",
        "--grace",
        "--metrics",
        "Examples",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    assert_eq!(worker(&["--frobnicate"]).status.code(), Some(2));
}

#[test]
fn a_missing_data_folder_names_the_file() {
    let o = worker(&["--data-dir", "/nonexistent/labfleet-data"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("connections.yml"), "{err}");
}

#[test]
fn an_unreachable_redis_fails_without_echoing_its_password() {
    let url = format!("redis://:hunter2-secret@127.0.0.1:{}", closed_port());
    let o = worker(&["--redis", &url, "--data-dir", &data_dir()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("connecting to Redis at"), "{err}");
    assert!(!err.contains("hunter2-secret"), "password echoed: {err}");
}
