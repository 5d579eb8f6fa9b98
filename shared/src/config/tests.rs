//! Unit tests of the configuration rules: the original design's examples, the shipped data
//! folder, and every class of bad input, each with its located message.

use std::path::Path;

use super::*;

const ORIG_CONN: &str = include_str!("../../../tests/fixtures/original-design/connections.yml");
const ORIG_DEPL: &str =
    include_str!("../../../tests/fixtures/original-design/deployment_config.yml");
const ORIG_USERS: &str = include_str!("../../../tests/fixtures/original-design/users.yml");

fn p(s: &str) -> &Path {
    Path::new(s)
}

fn depl(text: &str) -> Result<Deployment, Vec<Issue>> {
    parse_deployment(text, p("d.yml"), "lab")
}

fn conns(text: &str) -> Result<Connections, Vec<Issue>> {
    parse_connections(text, p("c.yml"))
}

fn users(text: &str) -> Result<Users, Vec<Issue>> {
    parse_users(text, p("u.yml"))
}

fn one_issue<T: std::fmt::Debug>(r: Result<T, Vec<Issue>>) -> Issue {
    let issues = r.expect_err("expected an issue");
    assert_eq!(issues.len(), 1, "{issues:#?}");
    issues.into_iter().next().unwrap()
}

#[test]
fn original_design_examples_validate_as_written() {
    let c = conns(ORIG_CONN).unwrap();
    let conn = &c.clusters["prod-cluster"];
    assert_eq!(conn.host.authority(), "192.168.1.100:8006");
    assert!(matches!(
        conn.credential,
        Credential::Password(SecretSource::Inline(_))
    ));
    assert_eq!(conn.tls, TlsSetting::SystemRoots);
    let d = depl(ORIG_DEPL).unwrap();
    assert_eq!(d.machines.len(), 1);
    let m = &d.machines[0];
    assert_eq!(m.template_vmid.get(), 100);
    assert_eq!(
        m.networks[0],
        NetSpec::Existing {
            bridge: "vmbr0".into(),
            tag: None
        }
    );
    assert_eq!(
        m.networks[1],
        NetSpec::Private {
            alias: "hq".into(),
            tag: Some(100)
        }
    );
    assert_eq!(m.clone, CloneMode::Linked);
    let u = users(ORIG_USERS).unwrap();
    assert_eq!(u.users.len(), 2);
    assert_eq!(d.vm_name(m, &u.users[0]), "student-pc-student1");
    assert_eq!(d.pool_name(&u.users[1]), "lab-student2");
}

#[test]
fn the_whole_original_folder_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/original-design");
    let cfg = load(&DataPaths::in_dir(&dir), None).unwrap();
    assert_eq!(cfg.cluster, "prod-cluster");
    assert_eq!(cfg.deployment.name, "original-design");
}

#[test]
fn shipped_data_folders_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    let cfg = load(&DataPaths::in_dir(&root), None).unwrap();
    assert!(
        cfg.connection().host.is_loopback(),
        "shipped data must point at loopback"
    );
    // data/compose is used only inside docker-compose.yml's containers, where the simulator
    // is the service `pve-sim` (127.0.0.1 would be the container itself); it pins the same
    // demo certificate as data/, and names its own deployment.
    let compose = load(&DataPaths::in_dir(root.join("compose")), None).unwrap();
    let c = compose.connection();
    assert_eq!((c.host.host.as_str(), c.host.port), ("pve-sim", 8006));
    assert_eq!(c.tls, cfg.connection().tls, "same pinned demo certificate");
    assert!(matches!(c.tls, TlsSetting::Fingerprint(_)));
    assert_ne!(compose.deployment.name, cfg.deployment.name);
}

#[test]
fn misspelled_key_gets_a_hint_and_no_secret_is_echoed() {
    let text = "lab:\n  host: \"127.0.0.1\"\n  user: root@pam\n  pasword: \"Sup3rS3cret!\"\n";
    let issues = conns(text).unwrap_err();
    let all = issues
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(all.contains("c.yml:4:3: unknown key `pasword`"), "{all}");
    assert!(all.contains("did you mean `password`?"), "{all}");
    assert!(!all.contains("Sup3rS3cret"), "{all}");
}

#[test]
fn type_errors_in_connections_never_quote_values() {
    let text = "lab:\n  host: \"127.0.0.1\"\n  user: root@pam\n  password: [\"Sup3rS3cret!\"]\n";
    let i = one_issue(conns(text));
    assert!(!i.to_string().contains("Sup3rS3cret"), "{i}");
    assert_eq!(i.line, 4);
}

#[test]
fn credentials_exactly_one_kind() {
    let both =
        "lab:\n  host: h\n  user: root@pam\n  password: x\n  token_name: t\n  token_secret: y\n";
    assert!(
        one_issue(conns(both))
            .message
            .contains("more than one kind of credential")
    );
    let none = "lab:\n  host: h\n  user: root@pam\n";
    assert!(one_issue(conns(none)).message.contains("no credential"));
    let tok = "lab:\n  host: h\n  user: root@pam\n  token_name: labfleet\n  token_secret_env: PVE_TOKEN\n";
    let c = conns(tok).unwrap();
    assert!(
        matches!(&c.clusters["lab"].credential, Credential::Token { name, secret: SecretSource::Env(v) } if name == "labfleet" && v == "PVE_TOKEN")
    );
    let no_name = "lab:\n  host: h\n  user: root@pam\n  token_secret: y\n";
    assert!(
        one_issue(conns(no_name))
            .message
            .contains("needs `token_name`")
    );
    let full_id =
        "lab:\n  host: h\n  user: root@pam\n  token_name: \"root@pam!x\"\n  token_secret: y\n";
    assert!(one_issue(conns(full_id)).message.contains("token id only"));
}

#[test]
fn tls_settings() {
    let fp = format!("{}AB", "AB:".repeat(31));
    let t = format!("lab:\n  host: h\n  user: root@pam\n  password: x\n  fingerprint: \"{fp}\"\n");
    assert_eq!(
        conns(&t).unwrap().clusters["lab"].tls,
        TlsSetting::Fingerprint([0xAB; 32])
    );
    let off = "lab:\n  host: h\n  user: root@pam\n  password: x\n  verify_tls: false\n";
    assert_eq!(
        conns(off).unwrap().clusters["lab"].tls,
        TlsSetting::Insecure
    );
    let on = "lab:\n  host: h\n  user: root@pam\n  password: x\n  verify_tls: true\n";
    assert_eq!(
        conns(on).unwrap().clusters["lab"].tls,
        TlsSetting::SystemRoots
    );
    let two = format!(
        "lab:\n  host: h\n  user: root@pam\n  password: x\n  verify_tls: false\n  fingerprint: \"{fp}\"\n"
    );
    assert!(one_issue(conns(&two)).message.contains("more than one of"));
    let bad = "lab:\n  host: h\n  user: root@pam\n  password: x\n  fingerprint: \"AB:CD\"\n";
    assert_eq!(one_issue(conns(bad)).line, 5);
}

#[test]
fn hosts_users_and_ports_are_checked() {
    let t = "lab:\n  host: \"pve:70000\"\n  user: root\n  password: x\n";
    let issues = conns(t).unwrap_err();
    assert_eq!(issues.len(), 2, "{issues:#?}");
    assert!(
        issues
            .iter()
            .any(|i| i.line == 2 && i.message.contains("1-65535"))
    );
    assert!(
        issues
            .iter()
            .any(|i| i.line == 3 && i.message.contains("no realm"))
    );
}

#[test]
fn duplicate_cluster_is_an_error() {
    let t = "lab:\n  host: a\n  user: root@pam\n  password: x\nlab:\n  host: b\n  user: root@pam\n  password: y\n";
    let i = one_issue(conns(t));
    assert_eq!(i.line, 5, "{i}");
    assert!(i.message.contains("duplicate"), "{i}");
}

#[test]
fn caps_are_read_and_bounded() {
    let t = "lab:\n  host: a\n  user: root@pam\n  password: x\n  max_parallel_clones: {per_node: 3, full_per_storage: 1}\n";
    let c = conns(t).unwrap();
    assert_eq!(
        c.clusters["lab"].caps,
        Caps {
            per_node: 3,
            full_per_storage: 1,
            linked_per_storage: 6
        }
    );
    let z =
        "lab:\n  host: a\n  user: root@pam\n  password: x\n  max_parallel_clones: {per_node: 0}\n";
    assert!(one_issue(conns(z)).message.contains("1-256"));
}

#[test]
fn api_cap_per_node_defaults_to_the_api_workers_and_is_bounded() {
    let base = "lab:\n  host: a\n  user: root@pam\n  password: x\n";
    assert_eq!(conns(base).unwrap().clusters["lab"].api_per_node, 3);
    let set = format!("{base}  max_parallel_api: {{per_node: 5}}\n");
    assert_eq!(conns(&set).unwrap().clusters["lab"].api_per_node, 5);
    let zero = format!("{base}  max_parallel_api: {{per_node: 0}}\n");
    let i = one_issue(conns(&zero));
    assert!(
        i.message
            .contains("max_parallel_api.per_node 0 is out of range 1-64"),
        "{i:?}"
    );
    assert_eq!(i.line, 5);
    assert!(i.hint.unwrap_or_default().contains("pvedaemon"));
    let typo = format!("{base}  max_parallel_api: {{per_nod: 2}}\n");
    assert!(conns(&typo).is_err());
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let t = r#"machines:
  - device_type: "mac"
    name: "Student_PC"
    template_node: "pve_1"
    template_vmid: 99
    networks:
      - bridge: "hq.4095"
"#;
    let issues = depl(t).unwrap_err();
    let lines: Vec<u64> = issues.iter().map(|i| i.line).collect();
    assert_eq!(issues.len(), 5, "{issues:#?}");
    for l in [2, 3, 4, 5, 7] {
        assert!(lines.contains(&l), "line {l} missing: {issues:#?}");
    }
    let msg = issues
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        msg.contains("d.yml:7:17: bridge \"hq.4095\": VLAN tag \"4095\" is out of range 1-4094"),
        "{msg}"
    );
    assert!(
        msg.contains("\"student-pc\""),
        "suggests a valid name: {msg}"
    );
}

#[test]
fn unknown_machine_key_has_hint() {
    let t = "machines:\n  - device_type: linux\n    nmae: x\n    template_node: pve1\n    template_vmid: 100\n";
    let i = one_issue(depl(t));
    assert_eq!((i.line, i.col), (3, 5));
    assert_eq!(i.hint.as_deref(), Some("did you mean `name`?"));
}

#[test]
fn duplicates_are_errors() {
    let t = "machines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100}\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100}\n";
    let i = one_issue(depl(t));
    assert!(i.message.contains("used twice"), "{i}");
    assert_eq!(i.line, 3);
    let u = "users:\n  - a@pve\n  - b@pve\n  - a@pve\n";
    let i = one_issue(users(u));
    assert!(i.message.contains("listed twice (first on line 2)"), "{i}");
    let collide = "users:\n  - Anna@pve\n  - anna@pam\n";
    assert!(one_issue(users(collide)).message.contains("same name"));
}

#[test]
fn empty_lists_and_files() {
    assert!(one_issue(users("users: []\n")).message.contains("empty"));
    assert!(one_issue(depl("machines: []\n")).message.contains("empty"));
    assert!(one_issue(users("")).message.contains("file is empty"));
    assert!(
        one_issue(users("# only a comment\n"))
            .message
            .contains("file is empty")
    );
}

#[test]
fn vm_names_collide_across_machines_and_users() {
    let d = depl("machines:\n  - {device_type: linux, name: pc-a, template_node: pve1, template_vmid: 100}\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100}\n").unwrap();
    let u = users("users:\n  - b@pve\n  - a-b@pve\n").unwrap();
    let issues = deployment::cross_check(&d, &u, p("d.yml"), p("u.yml"));
    assert!(
        issues.iter().any(|i| i.message.contains("\"pc-a-b\"")),
        "{issues:#?}"
    );
}

#[test]
fn long_vm_names_are_refused() {
    let d = depl(&format!("machines:\n  - {{device_type: linux, name: {}, template_node: pve1, template_vmid: 100}}\n", "a".repeat(60))).unwrap();
    let u = users("users:\n  - student1@pve\n").unwrap();
    let issues = deployment::cross_check(&d, &u, p("d.yml"), p("u.yml"));
    assert!(
        issues.iter().any(|i| i.message.contains("longer than 63")),
        "{issues:#?}"
    );
}

#[test]
fn vmid_policies() {
    let fixed = depl("vmid_base: 10000\nvmid_stride: 10\nmachines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100}\n").unwrap();
    assert_eq!(
        fixed.vmids,
        VmidPolicy::Fixed {
            base: 10000,
            stride: 10
        }
    );
    let range = depl("vmid_range: 5000-5001\nmachines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100}\n").unwrap();
    let u = users("users: [a@pve, b@pve, c@pve]\n").unwrap();
    let issues = deployment::cross_check(&range, &u, p("d.yml"), p("u.yml"));
    assert!(
        issues.iter().any(|i| i.message.contains("do not fit")),
        "{issues:#?}"
    );
    let both = depl(
        "vmid_range: 5000-6000\nvmid_base: 100\nmachines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100}\n",
    );
    assert!(one_issue(both).message.contains("exclude each other"));
    let narrow = depl(
        "vmid_base: 1000\nvmid_stride: 1\nmachines:\n  - {device_type: linux, name: a, template_node: pve1, template_vmid: 100}\n  - {device_type: linux, name: b, template_node: pve1, template_vmid: 100}\n",
    );
    assert!(one_issue(narrow).message.contains("overlap"));
}

#[test]
fn replicas_as_numbers_or_strings() {
    let d = depl("machines:\n  - device_type: linux\n    name: pc\n    template_node: pve1\n    template_vmid: 100\n    replicas: {pve2: 101, pve3: \"102\"}\n").unwrap();
    let r = &d.machines[0].replicas;
    assert_eq!(r[&NodeName::parse("pve3").unwrap()].get(), 102);
    assert_eq!(r.len(), 2);
}

#[test]
fn storage_with_linked_clone_is_refused() {
    let t = "machines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100, storage: local-lvm}\n";
    assert!(one_issue(depl(t)).message.contains("linked clone"));
    let ok = "machines:\n  - {device_type: windows, name: pc, template_node: pve1, template_vmid: 100, storage: local-lvm, clone: full}\n";
    assert_eq!(depl(ok).unwrap().machines[0].clone, CloneMode::Full);
}

#[test]
fn bridges_map_and_vlan_base() {
    let t = "bridges: {lan: vmbr1, wan: {pve1: vmbr2, pve2: vmbr3}}\nvlan_base: 200\nmachines:\n  - device_type: router\n    name: gw\n    template_node: pve1\n    template_vmid: 100\n    networks: [{bridge: lan}, {bridge: wan}, {bridge: hq}]\n";
    let d = depl(t).unwrap();
    assert_eq!(d.vlan_base, Some(200));
    let nets = &d.machines[0].networks;
    assert!(
        matches!(&nets[0], NetSpec::Mapped { target: BridgeTarget::Everywhere(b), .. } if b == "vmbr1")
    );
    assert!(
        matches!(&nets[1], NetSpec::Mapped { target: BridgeTarget::PerNode(m), .. } if m.len() == 2)
    );
    assert!(matches!(&nets[2], NetSpec::Private { .. }));
    let lonely = "vlan_base: 200\nmachines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100}\n";
    assert!(one_issue(depl(lonely)).message.contains("no effect"));
}

#[test]
fn hostile_inputs_give_errors_not_hangs() {
    let deep = format!("machines: {}{}", "[".repeat(20_000), "]".repeat(20_000));
    let i = one_issue(depl(&deep));
    assert!(i.hint.unwrap().contains("nested"), "{}", i.message);

    let mut bomb = String::from("nets: &n\n");
    bomb.push_str("  - {bridge: vmbr0}\n");
    let mut s = String::from("machines:\n");
    for k in 0..60_000 {
        s.push_str(&format!("  - {{device_type: linux, name: m{k}, template_node: pve1, template_vmid: 100, networks: *n}}\n"));
        if s.len() > 900_000 {
            break;
        }
    }
    // A schema-fitting alias bomb: an anchor referenced tens of thousands of times.
    let mut text = String::from(
        "machines:\n  - &m {device_type: linux, name: a, template_node: pve1, template_vmid: 100, networks: &n [",
    );
    text.push_str(&"{bridge: vmbr0}, ".repeat(1000));
    text.push_str("]}\n");
    for _ in 0..50_000 {
        text.push_str("  - *m\n");
    }
    let started = std::time::Instant::now();
    let r = depl(&text);
    assert!(r.is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn secrets_resolve_from_env_file_and_enc() {
    let key = crate::secret::SecretKey::generate();
    let sealed = key.seal(&Secret::new("pw-from-enc"));
    let src = SecretSource::Inline(Secret::new(sealed));
    assert_eq!(
        resolve_secret(&src, Some(&key)).unwrap().expose(),
        "pw-from-enc"
    );
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("pw");
    std::fs::write(&f, "from-file\n").unwrap();
    assert_eq!(
        resolve_secret(&SecretSource::File(f), None)
            .unwrap()
            .expose(),
        "from-file"
    );
    let missing = SecretSource::Env("LABFLEET_TEST_SURELY_UNSET_VAR".into());
    assert!(resolve_secret(&missing, None).is_err());
}
