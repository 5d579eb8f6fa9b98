//! The producer's faces for people and shells, run as the real binary: without a command
//! and without a terminal it prints the usage and exits 2 (never a prompt, never a hang);
//! shell completions; an example in every subcommand's `--help`.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use labfleet_tests::bins::bin;

/// Runs the producer with stdin from /dev/null (no terminal anywhere); fails the test if
/// it has not exited within `deadline` (a prompt waiting for input would hang).
fn producer(args: &[&str], deadline: Duration) -> Output {
    let mut child = Command::new(bin("producer"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("REDIS_URL", "redis://127.0.0.1:1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run producer");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > deadline {
            let _ = child.kill();
            panic!("producer {args:?} still running after {deadline:?}: it must not prompt");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn no_command_without_a_terminal_prints_usage_and_exits_2() {
    for args in [&[][..], &["--json"], &["--data-dir", "data"]] {
        let o = producer(args, Duration::from_secs(20));
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("Usage: producer"), "{err}");
        assert!(err.contains("--help"), "{err}");
        assert!(!err.contains("What do you want to do"), "no menu: {err}");
        assert!(o.stdout.is_empty(), "nothing on stdout");
    }
}

#[test]
fn completions_for_bash_zsh_and_fish_name_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let o = producer(&["completions", shell], Duration::from_secs(20));
        assert_eq!(o.status.code(), Some(0), "{shell}");
        let script = String::from_utf8_lossy(&o.stdout);
        for sub in ["check-connection", "submit", "teardown", "completions"] {
            assert!(script.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let o = producer(&["completions", "tcsh"], Duration::from_secs(20));
    assert_eq!(
        o.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn every_subcommand_help_has_an_example() {
    let subs = [
        "validate",
        "check-connection",
        "plan",
        "submit",
        "status",
        "retry",
        "teardown",
        "list",
        "handout",
        "demo",
        "secret",
        "completions",
        "serve",
        "workers",
        "audit",
        "start",
        "stop",
        "shutdown",
        "reset",
        "schedule",
    ];
    for sub in subs {
        let o = producer(&[sub, "--help"], Duration::from_secs(20));
        let help = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(0), "{sub}");
        assert!(
            help.contains("Example"),
            "{sub} --help has no example:\n{help}"
        );
        assert!(help.contains(&format!("producer {sub}")), "{sub}:\n{help}");
    }
}
