//! The `producer` binary on good and broken data folders: exit codes and located messages.

use std::path::Path;
use std::process::{Command, Output};

use labfleet_tests::bins::{bin, root};

fn producer(args: &[&str]) -> Output {
    Command::new(bin("producer"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("LABFLEET_SECRET_KEY")
        .output()
        .expect("run producer")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A copy of the original design's folder with `file` replaced by `content`.
fn folder_with(file: &str, content: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["connections.yml", "deployment_config.yml", "users.yml"] {
        std::fs::copy(
            root().join("tests/fixtures/original-design").join(f),
            dir.path().join(f),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join(file), content).unwrap();
    dir
}

fn validate(dir: &Path) -> Output {
    producer(&["validate", "--data-dir", dir.to_str().unwrap()])
}

#[test]
fn shipped_and_original_folders_validate() {
    let o = producer(&[
        "validate",
        "--data-dir",
        root().join("data").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("6 users, 2 machines, 12 VMs to create"),
        "{}",
        text(&o)
    );
    let o = validate(&root().join("tests/fixtures/original-design"));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("2 users, 1 machines, 2 VMs"),
        "{}",
        text(&o)
    );
}

#[test]
fn each_class_of_bad_input_is_located_with_exit_1() {
    let deep = format!("machines: {}{}", "[".repeat(20_000), "]".repeat(20_000));
    let mut bomb = String::from(
        "machines:\n  - &m {device_type: linux, name: a, template_node: pve1, template_vmid: 100, networks: [",
    );
    bomb.push_str(&"{bridge: vmbr0}, ".repeat(1000));
    bomb.push_str("]}\n");
    for _ in 0..20_000 {
        bomb.push_str("  - *m\n");
    }
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        ("unknown key", "deployment_config.yml", b"machines:\n  - device_type: linux\n    nmae: pc\n    template_node: pve1\n    template_vmid: 100\n".to_vec(), "deployment_config.yml:3:5: unknown key `nmae`"),
        ("vlan range", "deployment_config.yml", b"machines:\n  - device_type: linux\n    name: pc\n    template_node: pve1\n    template_vmid: 100\n    networks:\n      - bridge: \"hq.4095\"\n".to_vec(), "deployment_config.yml:7:17: bridge \"hq.4095\": VLAN tag \"4095\" is out of range 1-4094"),
        ("vmid range", "deployment_config.yml", b"machines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 99}\n".to_vec(), "out of range 100-999999"),
        ("bad user", "users.yml", b"users:\n  - \"student1\"\n".to_vec(), "users.yml:2:5: user id \"student1\" has no realm"),
        ("duplicate user", "users.yml", b"users:\n  - a@pve\n  - a@pve\n".to_vec(), "listed twice"),
        ("bad port", "connections.yml", b"lab:\n  host: \"pve:99999\"\n  user: root@pam\n  password: x\n".to_vec(), "connections.yml:2:9: port \"99999\""),
        ("empty file", "users.yml", b"".to_vec(), "users.yml:1:1: file is empty"),
        ("binary file", "users.yml", vec![0x7f, b'E', b'L', b'F', 0, 0, 1, 2], "binary file"),
        ("not utf-8", "users.yml", vec![b'u', b's', 0xff, 0xfe], "not valid UTF-8"),
        ("syntax", "deployment_config.yml", b"machines:\n  - name: \"pc\n".to_vec(), "deployment_config.yml:"),
        ("wrong type", "deployment_config.yml", b"machines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: abc}\n".to_vec(), "deployment_config.yml:2:"),
        ("deep nesting", "deployment_config.yml", deep.into_bytes(), "nested too deeply"),
        ("alias bomb", "deployment_config.yml", bomb.into_bytes(), "deployment_config.yml:"),
        ("machine name", "deployment_config.yml", b"machines:\n  - {device_type: linux, name: Student_PC, template_node: pve1, template_vmid: 100}\n".to_vec(), "only lowercase letters"),
        ("device type", "deployment_config.yml", b"machines:\n  - {device_type: mac, name: pc, template_node: pve1, template_vmid: 100}\n".to_vec(), "is not one of linux, windows, router"),
    ];
    for (name, file, content, want) in cases {
        let dir = folder_with(file, &content);
        let started = std::time::Instant::now();
        let o = validate(dir.path());
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {out}");
        assert!(out.contains(want), "{name}: want {want:?} in:\n{out}");
        assert!(
            out.contains("hint: "),
            "{name}: every problem has a hint:\n{out}"
        );
        assert!(!out.contains("panicked"), "{name}: {out}");
        assert!(
            started.elapsed().as_secs() < 20,
            "{name} took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn oversized_file_is_refused_before_parsing() {
    let big = vec![b'#'; 50 * 1024 * 1024];
    let dir = folder_with("users.yml", &big);
    let o = validate(dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("larger than 1024 KiB"), "{}", text(&o));
}

#[test]
fn problems_in_all_three_files_are_reported_at_once() {
    let dir = folder_with("users.yml", b"users: [nobody]\n");
    std::fs::write(
        dir.path().join("deployment_config.yml"),
        "machines:\n  - {device_type: linux, name: PC, template_node: pve1, template_vmid: 100}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("connections.yml"),
        "lab:\n  host: h\n  user: root\n  password: x\n",
    )
    .unwrap();
    let o = validate(dir.path());
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1));
    for f in [
        "connections.yml:3:",
        "deployment_config.yml:2:",
        "users.yml:1:",
    ] {
        assert!(out.contains(f), "{f} missing in:\n{out}");
    }
    assert!(out.contains("3 problems found"), "{out}");
}

#[test]
fn a_misspelled_password_key_never_prints_the_secret() {
    let secret = "Hunter2-Sup3r-S3cret";
    let conn = format!("lab:\n  host: \"127.0.0.1\"\n  user: root@pam\n  pasword: \"{secret}\"\n");
    let dir = folder_with("connections.yml", conn.as_bytes());
    for args in [
        vec!["validate"],
        vec!["validate", "--json"],
        vec!["validate", "-vv", "--log-format", "json"],
    ] {
        let mut a = args.clone();
        a.extend(["--data-dir", dir.path().to_str().unwrap()]);
        let o = producer(&a);
        let out = text(&o);
        assert_eq!(o.status.code(), Some(1), "{out}");
        assert!(
            out.contains("unknown key `pasword`") && out.contains("did you mean `password`?"),
            "{out}"
        );
        assert!(!out.contains(secret), "secret leaked with {args:?}:\n{out}");
    }
    // A type error on a secret value never quotes the value either.
    let conn = format!(
        "lab:\n  host: \"127.0.0.1\"\n  user: root@pam\n  password: {{nested: \"{secret}\"}}\n"
    );
    let dir = folder_with("connections.yml", conn.as_bytes());
    let o = validate(dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(!text(&o).contains(secret), "{}", text(&o));
}

#[test]
fn json_output_and_usage_errors() {
    let o = producer(&[
        "validate",
        "--json",
        "--data-dir",
        root().join("data").to_str().unwrap(),
    ]);
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("one JSON document on stdout");
    assert_eq!(v["valid"], true);
    assert_eq!(v["vms"], 12);
    let o = producer(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    let o = producer(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
    let help = text(&o);
    assert!(
        help.contains("3  Redis unreachable")
            && help.contains("6  deployment finished with failures"),
        "{help}"
    );
}

#[test]
fn redis_unreachable_is_exit_3_with_the_password_redacted() {
    let o = producer(&["list", "--redis", "redis://:TopSecretPw@127.0.0.1:1"]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(out.contains("redis://:***@127.0.0.1:1"), "{out}");
    assert!(!out.contains("TopSecretPw"), "{out}");

    // The Sentinel form: no sentinel answers on these ports.
    let url = "redis+sentinel://:TopSecretPw@127.0.0.1:1,127.0.0.1:2/labfleet";
    let o = producer(&["list", "--redis", url]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(
        out.contains("redis+sentinel://:***@127.0.0.1:1,127.0.0.1:2/labfleet/0"),
        "{out}"
    );
    assert!(!out.contains("TopSecretPw"), "{out}");

    // A malformed Sentinel URL is refused without showing it.
    let o = producer(&[
        "list",
        "--redis",
        "redis+sentinel://:TopSecretPw@127.0.0.1:1",
    ]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(3), "{out}");
    assert!(out.contains("no master name"), "{out}");
    assert!(!out.contains("TopSecretPw"), "{out}");
}

/// A data folder whose connections.yml reaches `port` with the given credential and TLS lines.
fn conn_folder(port: u16, cred_and_tls: &str) -> tempfile::TempDir {
    let conn = format!("lab:\n  host: \"127.0.0.1:{port}\"\n  user: root@pam\n{cred_and_tls}");
    folder_with("connections.yml", conn.as_bytes())
}

async fn check_connection(dir: &Path) -> Output {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        producer(&["check-connection", "--data-dir", dir.to_str().unwrap()])
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_connection_reports_each_failure_with_its_exit_code() {
    let mut sc =
        pve_sim::SimConfig::from_cluster_file(&root().join("data/sim/cluster.yml")).unwrap();
    sc.cluster.api.auth_failure_delay_seconds = 0.2;
    let sim = pve_sim::Sim::start(sc).await.unwrap();
    let port = sim.addr().port();
    let fp = sim.fingerprint().unwrap();

    // Good: version, nodes with load, templates.
    let ok = conn_folder(
        port,
        &format!("  password: labfleet\n  fingerprint: \"{fp}\"\n"),
    );
    let o = check_connection(ok.path()).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("Proxmox VE 9"), "{out}");
    assert!(out.contains("node pve1") && out.contains("mem"), "{out}");
    assert!(
        out.contains("linux-template") && out.contains("router-template"),
        "{out}"
    );

    // A wrong pin: exit 4, and the fingerprint the server presented is shown.
    let wrong = format!("{}AB", "AB:".repeat(31));
    let d = conn_folder(
        port,
        &format!("  password: labfleet\n  fingerprint: \"{wrong}\"\n"),
    );
    let o = check_connection(d.path()).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(4), "{out}");
    assert!(out.contains(&fp), "presented fingerprint shown: {out}");

    // Self-signed without a pin: verification against the system roots fails, exit 4.
    let d = conn_folder(port, "  password: labfleet\n");
    let o = check_connection(d.path()).await;
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));

    // Bad password: exit 5, and the password is not echoed.
    let d = conn_folder(
        port,
        &format!("  password: \"Wr0ng-Passw0rd!\"\n  fingerprint: \"{fp}\"\n"),
    );
    let o = check_connection(d.path()).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(5), "{out}");
    assert!(!out.contains("Wr0ng-Passw0rd!"), "{out}");

    // Nothing listening: exit 4.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = conn_folder(
        closed,
        &format!("  password: labfleet\n  fingerprint: \"{fp}\"\n"),
    );
    let o = check_connection(d.path()).await;
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));

    // Valid credentials without the privileges labfleet needs: exit 5, naming the privilege.
    let mut cc = shared::pve::ClientConfig::new(
        "lab",
        "127.0.0.1",
        shared::pve::Auth::Password {
            user: "root@pam".into(),
            password: "labfleet".into(),
        },
    );
    cc.port = port;
    cc.tls = shared::pve::TlsPolicy::Fingerprint(shared::pve::parse_fingerprint(&fp).unwrap());
    let root_client = shared::pve::PveClient::new(cc).unwrap();
    root_client
        .raw_call(
            shared::pve::Method::POST,
            "/access/users",
            &[("userid", "nobody@pve"), ("password", "nobody-pw-123")],
        )
        .await
        .unwrap();
    let conn = format!(
        "lab:\n  host: \"127.0.0.1:{port}\"\n  user: nobody@pve\n  password: nobody-pw-123\n  fingerprint: \"{fp}\"\n"
    );
    let d = folder_with("connections.yml", conn.as_bytes());
    let o = check_connection(d.path()).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(5), "{out}");
    assert!(out.contains("Sys.Audit"), "{out}");

    // A secret from the environment that is not set: a clear error naming the variable.
    let d = conn_folder(
        port,
        &format!("  password_env: LABFLEET_TEST_UNSET_PW\n  fingerprint: \"{fp}\"\n"),
    );
    let o = check_connection(d.path()).await;
    assert!(text(&o).contains("LABFLEET_TEST_UNSET_PW"), "{}", text(&o));
    assert_ne!(o.status.code(), Some(0));
    sim.shutdown().await;
}
