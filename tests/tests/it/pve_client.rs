//! The Proxmox client (`shared::pve`) against `pve-sim` started in-process over real HTTP(S):
//! auth (ticket login shared and renewed, token, wrong password, CSRF), TLS pinning, every
//! typed call, task waiting (success, failure, deadline, cancel) and the error class of each
//! fault the simulator can inject.

use std::time::Duration;

use pve_sim::{Fault, RequestFault, Sim, SimConfig, SimHandle, TlsMode};
use shared::jobs::lost_reply::{CloneSearch, find_clone};
use shared::pve::*;
use shared::secret::Secret;
use tokio_util::sync::CancellationToken;

const ROOT_PASSWORD: &str = "labfleet";
const TOKEN_SECRET: &str = "5a9f1c3e-0000-4000-8000-labfleet0001";

/// A small cluster: two nodes, local-lvm on each, a template on pve1, root@pam with a
/// privsep=0 token, one pool.
fn cluster_yaml(time_scale: f64) -> String {
    format!(
        r#"
name: lab
time_scale: {time_scale}
api:
  auth_failure_delay_seconds: 0
  ticket_lifetime_seconds: 7200
nodes:
  - {{ name: pve1, cpus: 8, memory_gib: 64 }}
  - {{ name: pve2, cpus: 8, memory_gib: 64 }}
storages:
  - {{ id: local-lvm, type: lvmthin, capacity_gib: 500, bandwidth_mb_per_s: 500 }}
  - {{ id: local, type: dir, content: [iso, vztmpl, images], capacity_gib: 100, bandwidth_mb_per_s: 200 }}
bridges: [vmbr0]
vms:
  - vmid: 9000
    node: pve1
    name: tpl-debian
    template: true
    disks: [{{ key: scsi0, storage: local-lvm, size_gib: 8 }}]
    nets: ["virtio,bridge=vmbr0"]
  - vmid: 100
    node: pve2
    name: plain-vm
    disks: [{{ key: scsi0, storage: local-lvm, size_gib: 4 }}]
    nets: ["virtio,bridge=vmbr0"]
users:
  - userid: root@pam
    password: {ROOT_PASSWORD}
    tokens: [{{ id: labfleet, secret: {TOKEN_SECRET}, privsep: false }}]
  - userid: nobody@pve
    password: nobody-pass-1
pools:
  - {{ poolid: existing }}
"#
    )
}

async fn sim_with(time_scale: f64, tls: TlsMode) -> SimHandle {
    let mut cfg = SimConfig::from_cluster_yaml(&cluster_yaml(time_scale)).expect("cluster yaml");
    cfg.tls = tls;
    Sim::start(cfg).await.expect("simulator starts")
}

async fn sim() -> SimHandle {
    sim_with(0.0, TlsMode::SelfSigned).await
}

fn pinned(h: &SimHandle) -> TlsPolicy {
    let fp = h.fingerprint().expect("TLS simulator has a fingerprint");
    TlsPolicy::Fingerprint(parse_fingerprint(&fp).unwrap())
}

fn config(h: &SimHandle, auth: Auth) -> ClientConfig {
    let mut cfg = ClientConfig::new("sim", h.addr().ip().to_string(), auth);
    cfg.port = h.addr().port();
    cfg.tls = pinned(h);
    cfg.request_timeout = Duration::from_secs(10);
    cfg
}

fn root_password() -> Auth {
    Auth::Password {
        user: "root@pam".into(),
        password: Secret::new(ROOT_PASSWORD),
    }
}

fn root_token() -> Auth {
    Auth::Token {
        user: "root@pam".into(),
        token_name: "labfleet".into(),
        secret: Secret::new(TOKEN_SECRET),
    }
}

fn client(h: &SimHandle, auth: Auth) -> PveClient {
    PveClient::new(config(h, auth)).expect("client builds")
}

fn wait_opts() -> WaitOptions {
    WaitOptions {
        initial_poll: Duration::from_millis(20),
        max_poll: Duration::from_millis(200),
        ..WaitOptions::with_timeout(Duration::from_secs(30), CancellationToken::new())
    }
}

#[tokio::test]
async fn token_auth_reads_cluster_without_login() {
    let h = sim().await;
    let pve = client(&h, root_token());

    let v = pve.version().await.unwrap();
    assert!(v.version.is_some(), "{v:?}");

    let nodes = pve.nodes().await.unwrap();
    let names: Vec<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(names.len(), 2, "{nodes:?}");
    assert!(names.contains(&"pve1") && names.contains(&"pve2"));
    assert!(nodes.iter().all(NodeEntry::is_online));

    let st = pve.node_status("pve1").await.unwrap();
    assert_eq!(st.loadavg.len(), 3, "{st:?}");
    assert!(st.memory.and_then(|m| m.total).unwrap_or(0) > 0);

    let all = pve.cluster_resources(None).await.unwrap();
    assert!(
        all.iter()
            .any(|r| matches!(r, ClusterResource::Node(n) if n.node == "pve2"))
    );
    assert!(
        all.iter()
            .any(|r| matches!(r, ClusterResource::Storage(s) if s.storage == "local-lvm"))
    );
    let vms = pve.cluster_vms().await.unwrap();
    let tpl = vms
        .iter()
        .find(|v| v.vmid == 9000)
        .expect("template listed");
    assert!(tpl.template);
    assert_eq!(tpl.node, "pve1");

    let free = pve.nextid(None).await.unwrap();
    assert!(free >= 100 && free != 9000 && free != 100);
    assert_eq!(pve.nextid(Some(4242)).await.unwrap(), 4242);
    let taken = pve.nextid(Some(9000)).await.unwrap_err();
    assert_eq!(taken.class(), ErrorClass::AlreadyExists, "{taken}");

    let storages = pve.storage_list("pve1", None).await.unwrap();
    assert!(
        storages
            .iter()
            .any(|s| s.storage == "local-lvm" && s.supports("images"))
    );
    let images = pve.storage_list("pve1", Some("images")).await.unwrap();
    assert!(!images.is_empty());

    let list = pve.vm_list("pve1").await.unwrap();
    assert!(list.iter().any(|v| v.vmid == 9000 && v.template));
    let cfg = pve.vm_config("pve1", 9000).await.unwrap();
    assert!(cfg.template());
    assert_eq!(cfg.name().as_deref(), Some("tpl-debian"));
    assert!(cfg.digest().is_some());
    assert_eq!(cfg.nets()[&0].bridge.as_deref(), Some("vmbr0"));
    let status = pve.vm_status("pve1", 9000).await.unwrap();
    assert!(!status.is_running());

    let roles = pve.roles().await.unwrap();
    let vmuser = roles
        .iter()
        .find(|r| r.roleid == "PVEVMUser")
        .expect("PVEVMUser");
    assert!(vmuser.privs.iter().any(|p| p == "VM.PowerMgmt"));
    assert!(
        pve.users()
            .await
            .unwrap()
            .iter()
            .any(|u| u.userid == "root@pam")
    );
    assert!(
        pve.pools()
            .await
            .unwrap()
            .iter()
            .any(|p| p.poolid == "existing")
    );
    pve.acl().await.unwrap();

    let counts = pve.request_counts();
    assert_eq!(counts.logins, 0, "token auth never logs in");
    assert!(counts.other >= 15);
}

#[tokio::test]
async fn one_login_shared_by_clones_and_renewed_after_clock_moves() {
    let h = sim().await;
    let pve = client(&h, root_password());
    let clones: Vec<PveClient> = (0..8).map(|_| pve.clone()).collect();
    let results = futures::future::join_all(clones.iter().map(|c| c.version())).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(pve.request_counts().logins, 1, "one login for all clones");

    // An hour later the ticket is renewed with itself and keeps working.
    h.advance_clock(Duration::from_secs(3600));
    pve.renew_ticket().await.unwrap();
    assert_eq!(pve.request_counts().logins, 2);
    pve.nodes().await.unwrap();

    // Past the 2 h lifetime the server refuses the ticket: one fresh login, then success.
    h.advance_clock(Duration::from_secs(3 * 3600));
    pve.cluster_resources(None).await.unwrap();
    assert_eq!(pve.request_counts().logins, 3);

    // POST with a ticket carries the CSRF token.
    pve.create_pool("csrf-checked", None).await.unwrap();
}

#[tokio::test]
async fn wrong_password_is_auth_error_without_the_secret() {
    let h = sim().await;
    let secret = "Wr0ng-Pa55word-XYZZY";
    let cfg = config(
        &h,
        Auth::Password {
            user: "root@pam".into(),
            password: Secret::new(secret),
        },
    );
    let pve = PveClient::new(cfg.clone()).unwrap();
    let err = pve.version().await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Auth, "{err:?}");
    assert!(!err.is_transient());
    for text in [
        err.to_string(),
        format!("{err:?}"),
        format!("{pve:?}"),
        format!("{cfg:?}"),
    ] {
        assert!(!text.contains(secret), "secret leaked: {text}");
    }
    // A wrong token secret is an auth error as well.
    let bad_token = client(
        &h,
        Auth::Token {
            user: "root@pam".into(),
            token_name: "labfleet".into(),
            secret: Secret::new("not-the-secret"),
        },
    );
    let err = bad_token.nodes().await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Auth, "{err:?}");
    assert!(!format!("{err:?} {bad_token:?}").contains("not-the-secret"));
}

#[tokio::test]
async fn missing_csrf_token_is_refused_with_401() {
    // The client always sends the header; this proves the simulator enforces it, so the
    // POSTs with a ticket elsewhere in this file really exercise the CSRF path.
    let h = sim_with(0.0, TlsMode::Plain).await;
    let base = format!("http://{}/api2/json", h.addr());
    let http = reqwest::Client::new();
    let login: serde_json::Value = http
        .post(format!("{base}/access/ticket"))
        .form(&[("username", "root@pam"), ("password", ROOT_PASSWORD)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ticket = login["data"]["ticket"].as_str().unwrap().to_owned();
    let resp = http
        .post(format!("{base}/pools"))
        .header("Cookie", format!("PVEAuthCookie={ticket}"))
        .form(&[("poolid", "nocsrf")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

#[tokio::test]
async fn plain_http_for_the_simulator() {
    let h = sim_with(0.0, TlsMode::Plain).await;
    let mut cfg = config_plain(&h);
    cfg.auth = root_password();
    let pve = PveClient::new(cfg).unwrap();
    assert!(pve.base_url().starts_with("http://"));
    pve.version().await.unwrap();
}

fn config_plain(h: &SimHandle) -> ClientConfig {
    let mut cfg = ClientConfig::new("sim", h.addr().ip().to_string(), root_token());
    cfg.port = h.addr().port();
    cfg.scheme = Scheme::Http;
    cfg
}

#[tokio::test]
async fn fingerprint_pin_accepted_wrong_pin_refused_with_presented_fingerprint() {
    let h = sim().await;
    let presented = h.fingerprint().unwrap();

    let ok = client(&h, root_token());
    ok.version().await.unwrap();
    assert_eq!(
        ok.presented_fingerprint().as_deref(),
        Some(presented.as_str())
    );

    let mut cfg = config(&h, root_token());
    cfg.tls = TlsPolicy::Fingerprint([0x42; 32]);
    let wrong = PveClient::new(cfg).unwrap();
    let err = wrong.version().await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Tls, "{err:?}");
    match &err {
        PveError::Tls {
            presented_fingerprint,
            ..
        } => assert_eq!(presented_fingerprint.as_deref(), Some(presented.as_str())),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains(&presented), "{err}");

    // Insecure mode connects without checking.
    let mut cfg = config(&h, root_token());
    cfg.tls = TlsPolicy::Insecure;
    PveClient::new(cfg).unwrap().version().await.unwrap();

    // A self-signed certificate is not trusted by the system roots.
    let mut cfg = config(&h, root_token());
    cfg.tls = TlsPolicy::SystemRoots;
    let err = PveClient::new(cfg).unwrap().version().await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Tls, "{err:?}");
}

#[tokio::test]
async fn connection_refused_is_a_transient_connect_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = ClientConfig::new("gone", "127.0.0.1", root_token());
    cfg.port = port;
    cfg.tls = TlsPolicy::Insecure;
    let err = PveClient::new(cfg).unwrap().version().await.unwrap_err();
    match &err {
        PveError::Connect { kind, .. } => assert_eq!(*kind, ConnectFailure::Refused),
        other => panic!("{other:?}"),
    }
    assert!(err.is_transient());
}

#[tokio::test]
async fn vm_lifecycle_clone_configure_start_stop_destroy() {
    let h = sim().await;
    let pve = client(&h, root_password());
    let newid = pve.nextid(None).await.unwrap();
    let upid = pve
        .clone_vm(
            "pve1",
            9000,
            &CloneParams {
                newid,
                name: Some("lab-01".into()),
                description: Some("student lab".into()),
                pool: Some("existing".into()),
                ..CloneParams::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(upid.node(), "pve1");
    assert_eq!(upid.task_type(), "qmclone");
    assert_eq!(upid.id(), "9000");
    assert_eq!(upid.user(), "root@pam");
    assert_eq!(
        pve.wait_task(&upid, &wait_opts()).await.unwrap(),
        TaskOutcome::Ok
    );
    let polls = pve.request_counts().polls;
    assert!(polls >= 1);

    let cfg = pve.vm_config("pve1", newid).await.unwrap();
    assert_eq!(cfg.name().as_deref(), Some("lab-01"));
    assert!(!cfg.template());
    assert_eq!(cfg.lock(), None);
    let mut net0 = cfg.nets()[&0].clone();
    let mac = net0.mac.clone().expect("clone has a MAC");
    assert!(mac.starts_with("BC:24:11"), "{mac}");
    net0.tag = Some(42);

    let update = ConfigUpdate::new()
        .set_net(0, &net0)
        .set("tags", "lab;student")
        .digest(cfg.digest().unwrap());
    let upid = pve
        .update_config_async("pve1", newid, &update)
        .await
        .unwrap();
    assert_eq!(upid.task_type(), "qmconfig");
    pve.wait_task(&upid, &wait_opts()).await.unwrap();
    let cfg = pve.vm_config("pve1", newid).await.unwrap();
    assert_eq!(cfg.nets()[&0].tag, Some(42));
    assert_eq!(cfg.nets()[&0].mac.as_deref(), Some(mac.as_str()));
    assert_eq!(cfg.tags(), ["lab", "student"]);

    // A stale digest is refused; a synchronous update with `delete` works.
    let stale = ConfigUpdate::new().set("description", "x").digest("0000");
    let err = pve
        .update_config_sync("pve1", newid, &stale)
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err:?}");
    pve.update_config_sync("pve1", newid, &ConfigUpdate::new().delete("description"))
        .await
        .unwrap();
    assert_eq!(
        pve.vm_config("pve1", newid).await.unwrap().description(),
        None
    );

    let members = pve.pool("existing").await.unwrap();
    assert!(members.vmids().contains(&newid), "{members:?}");

    let upid = pve.start_vm("pve1", newid).await.unwrap();
    pve.wait_task(&upid, &wait_opts()).await.unwrap();
    assert!(pve.vm_status("pve1", newid).await.unwrap().is_running());
    let upid = pve
        .shutdown_vm(
            "pve1",
            newid,
            &ShutdownParams {
                timeout: Some(30),
                force_stop: true,
            },
        )
        .await
        .unwrap();
    pve.wait_task(&upid, &wait_opts()).await.unwrap();
    assert!(!pve.vm_status("pve1", newid).await.unwrap().is_running());
    let upid = pve.stop_vm("pve1", newid).await.unwrap();
    pve.wait_task(&upid, &wait_opts()).await.unwrap();

    let upid = pve
        .destroy_vm(
            "pve1",
            newid,
            &DestroyParams {
                purge: true,
                ..DestroyParams::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(upid.task_type(), "qmdestroy");
    pve.wait_task(&upid, &wait_opts()).await.unwrap();
    let gone = pve.vm_config("pve1", newid).await.unwrap_err();
    assert_eq!(gone.class(), ErrorClass::NotFound, "{gone:?}");
}

#[tokio::test]
async fn host_network_create_apply_delete_revert() {
    let h = sim().await;
    let pve = client(&h, root_token());
    let mut bridge = NetworkCreate::bridge("vmbr9");
    bridge.bridge_vlan_aware = Some(true);
    bridge.comments = Some("labfleet segment".into());
    pve.network_create("pve1", &bridge).await.unwrap();

    let list = pve.network_list("pve1", None).await.unwrap();
    let new = list
        .ifaces
        .iter()
        .find(|i| i.iface == "vmbr9")
        .expect("pending bridge listed");
    assert!(!new.active, "not active before apply");
    assert!(new.bridge_vlan_aware);
    assert!(list.changes.is_some(), "pending changes reported");

    let again = pve.network_create("pve1", &bridge).await.unwrap_err();
    assert_eq!(again.class(), ErrorClass::AlreadyExists, "{again:?}");

    let upid = pve.network_apply("pve1").await.unwrap();
    assert_eq!(upid.task_type(), "srvreload");
    pve.wait_task(&upid, &wait_opts()).await.unwrap();
    let list = pve.network_list("pve1", Some("bridge")).await.unwrap();
    assert!(list.ifaces.iter().any(|i| i.iface == "vmbr9" && i.active));
    assert!(list.changes.is_none());

    pve.network_delete("pve1", "vmbr9").await.unwrap();
    pve.network_revert("pve1").await.unwrap();
    let list = pve.network_list("pve1", None).await.unwrap();
    assert!(
        list.ifaces.iter().any(|i| i.iface == "vmbr9"),
        "revert keeps it"
    );
}

#[tokio::test]
async fn users_acl_and_pools() {
    let h = sim().await;
    let pve = client(&h, root_password());
    let user = UserCreate {
        userid: "student1@pve".into(),
        password: Some(Secret::new("initial-pass-1")),
        comment: Some("lab student".into()),
        ..UserCreate::default()
    };
    pve.create_user(&user).await.unwrap();
    let dup = pve.create_user(&user).await.unwrap_err();
    assert_eq!(dup.class(), ErrorClass::AlreadyExists, "{dup:?}");
    assert!(!format!("{dup:?}").contains("initial-pass-1"));
    let info = pve.user("student1@pve").await.unwrap();
    assert_eq!(info.comment.as_deref(), Some("lab student"));
    pve.update_user(
        "student1@pve",
        &UserUpdate {
            comment: Some("renamed".into()),
            ..UserUpdate::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        pve.user("student1@pve").await.unwrap().comment.as_deref(),
        Some("renamed")
    );
    let missing = pve.user("ghost@pve").await.unwrap_err();
    assert_eq!(missing.class(), ErrorClass::NotFound, "{missing:?}");

    pve.create_pool("lab1", Some("course 1")).await.unwrap();
    let dup = pve.create_pool("lab1", None).await.unwrap_err();
    assert_eq!(dup.class(), ErrorClass::AlreadyExists, "{dup:?}");
    pve.update_pool(
        "lab1",
        &PoolUpdate {
            vms: vec![100],
            ..PoolUpdate::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(pve.pool("lab1").await.unwrap().vmids(), [100]);
    let not_empty = pve.delete_pool("lab1").await.unwrap_err();
    assert!(!not_empty.is_transient(), "{not_empty:?}");

    pve.update_acl(&AclUpdate {
        path: "/pool/lab1".into(),
        roles: vec!["PVEVMUser".into()],
        users: vec!["student1@pve".into()],
        ..AclUpdate::default()
    })
    .await
    .unwrap();
    let acl = pve.acl().await.unwrap();
    assert!(acl.iter().any(|a| a.path == "/pool/lab1"
        && a.ugid == "student1@pve"
        && a.roleid == "PVEVMUser"
        && a.propagate));
    let bad = pve
        .update_acl(&AclUpdate {
            path: "/pool/lab1".into(),
            roles: vec!["PVEVMUser".into()],
            ..AclUpdate::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.class(), ErrorClass::Param, "{bad:?}");

    pve.update_pool(
        "lab1",
        &PoolUpdate {
            vms: vec![100],
            delete: true,
            ..PoolUpdate::default()
        },
    )
    .await
    .unwrap();
    pve.delete_pool("lab1").await.unwrap();
    assert!(
        !pve.pools()
            .await
            .unwrap()
            .iter()
            .any(|p| p.poolid == "lab1")
    );

    // The new user may not clone the template: a permission error naming path and privilege.
    let student = client(
        &h,
        Auth::Password {
            user: "student1@pve".into(),
            password: Secret::new("initial-pass-1"),
        },
    );
    let err = student
        .clone_vm(
            "pve1",
            9000,
            &CloneParams {
                newid: 777,
                ..CloneParams::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Permission, "{err:?}");
    assert!(err.message().contains("/vms/9000"), "{err}");
}

#[tokio::test]
async fn param_errors_keep_the_field_map() {
    let h = sim().await;
    let pve = client(&h, root_token());
    let err = pve
        .clone_vm(
            "pve1",
            9000,
            &CloneParams {
                newid: 5,
                ..CloneParams::default()
            },
        )
        .await
        .unwrap_err();
    match &err {
        PveError::Param { errors, .. } => assert!(errors.contains_key("newid"), "{errors:?}"),
        other => panic!("{other:?}"),
    }
    let err = pve.vm_config("pve2", 9000).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::NotFound, "{err:?}");
}

#[tokio::test]
async fn task_failure_carries_exit_status_and_log_tail() {
    let h = sim().await;
    let pve = client(&h, root_token());
    // Starting a template fails inside the task.
    let upid = pve.start_vm("pve1", 9000).await.unwrap();
    assert_eq!(upid.user(), "root@pam!labfleet");
    let err = pve.wait_task(&upid, &wait_opts()).await.unwrap_err();
    match &err {
        PveError::TaskFailed {
            exitstatus,
            log_tail,
            kind,
            ..
        } => {
            assert!(exitstatus.contains("template"), "{exitstatus}");
            assert!(!log_tail.is_empty());
            assert_eq!(*kind, MessageKind::Other);
        }
        other => panic!("{other:?}"),
    }
    assert!(!err.is_transient());
    let (lines, total) = pve.task_log(&upid, 0, 50).await.unwrap();
    assert!(!lines.is_empty());
    assert!(total.unwrap_or(1) >= 1);
    let st = pve.task_status(&upid).await.unwrap();
    assert!(!st.is_running());
}

#[tokio::test]
async fn task_wait_deadline_and_cancel() {
    // Real-time simulator: a start takes 3 s.
    let h = sim_with(1.0, TlsMode::SelfSigned).await;
    let pve = client(&h, root_token());
    let upid = pve.start_vm("pve2", 100).await.unwrap();
    let opts = WaitOptions {
        deadline: Some(tokio::time::Instant::now() + Duration::from_millis(300)),
        initial_poll: Duration::from_millis(50),
        ..WaitOptions::default()
    };
    let err = pve.wait_task(&upid, &opts).await.unwrap_err();
    assert!(matches!(err, PveError::TaskTimeout { .. }), "{err:?}");
    assert!(err.is_transient());

    let cancel = CancellationToken::new();
    let opts = WaitOptions {
        cancel: cancel.clone(),
        initial_poll: Duration::from_millis(50),
        ..WaitOptions::default()
    };
    let waiter = {
        let pve = pve.clone();
        let upid = upid.clone();
        tokio::spawn(async move { pve.wait_task(&upid, &opts).await })
    };
    cancel.cancel();
    let err = waiter.await.unwrap().unwrap_err();
    assert_eq!(err.class(), ErrorClass::Cancelled);

    // And it does finish when waited for long enough.
    let opts = WaitOptions::with_timeout(Duration::from_secs(20), CancellationToken::new());
    assert_eq!(pve.wait_task(&upid, &opts).await.unwrap(), TaskOutcome::Ok);
}

#[tokio::test]
async fn injected_faults_map_to_error_classes() {
    let h = sim().await;
    let pve = client(&h, root_token());

    h.inject(Fault::Requests {
        kind: RequestFault::Proxy596,
        count: 1,
    });
    let err = pve.nodes().await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Proxy, "{err:?}");
    assert_eq!(err.status(), Some(596));
    assert!(err.is_transient());

    h.inject(Fault::Requests {
        kind: RequestFault::Internal500,
        count: 1,
    });
    let err = pve.nodes().await.unwrap_err();
    assert_eq!(err.status(), Some(500), "{err:?}");

    h.inject(Fault::Requests {
        kind: RequestFault::ConnectionReset,
        count: 1,
    });
    let err = pve.nodes().await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Connect, "{err:?}");
    assert!(err.is_transient());
    // The pool reconnects after the reset.
    pve.nodes().await.unwrap();

    h.inject(Fault::WorkerStartFail { count: 1 });
    let err = pve.start_vm("pve2", 100).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Server, "{err:?}");
    assert!(err.is_transient(), "got no worker upid is transient");

    h.set_node_online("pve2", false);
    let err = pve.node_status("pve2").await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Proxy, "{err:?}");
    assert_eq!(err.status(), Some(595));
    h.set_node_online("pve2", true);
    pve.node_status("pve2").await.unwrap();
}

#[tokio::test]
async fn lock_faults_are_transient() {
    // The lock model needs a non-zero time scale; keep it fast.
    let h = sim_with(0.01, TlsMode::SelfSigned).await;
    let pve = client(&h, root_token());

    h.inject(Fault::LockTimeouts { count: 1 });
    let newid = pve.nextid(None).await.unwrap();
    let upid = pve
        .clone_vm(
            "pve1",
            9000,
            &CloneParams {
                newid,
                ..CloneParams::default()
            },
        )
        .await
        .unwrap();
    let err = pve.wait_task(&upid, &wait_opts()).await.unwrap_err();
    match &err {
        PveError::TaskFailed {
            kind, exitstatus, ..
        } => {
            assert_eq!(*kind, MessageKind::LockTimeout, "{exitstatus}")
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_transient());

    // A clone that dies half way leaves a VM locked `clone`: updates fail fast with Locked.
    h.inject(Fault::CloneHalfFail { count: 1 });
    let newid = pve.nextid(None).await.unwrap();
    let upid = pve
        .clone_vm(
            "pve1",
            9000,
            &CloneParams {
                newid,
                ..CloneParams::default()
            },
        )
        .await
        .unwrap();
    let err = pve.wait_task(&upid, &wait_opts()).await.unwrap_err();
    match &err {
        PveError::TaskFailed { kind, .. } => assert_eq!(*kind, MessageKind::UnexpectedStatus),
        other => panic!("{other:?}"),
    }
    let err = pve
        .update_config_sync("pve1", newid, &ConfigUpdate::new().set("description", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Locked, "{err:?}");
    assert!(err.is_transient());
}

#[tokio::test]
async fn old_servers_without_message_field_use_the_reason_phrase() {
    let yaml = cluster_yaml(0.0).replace(
        "  auth_failure_delay_seconds: 0\n",
        "  auth_failure_delay_seconds: 0\n  error_message_field: false\n",
    );
    let h = Sim::start(SimConfig::from_cluster_yaml(&yaml).unwrap())
        .await
        .unwrap();
    let pve = client(&h, root_token());
    let err = pve.vm_config("pve2", 9000).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::NotFound, "{err:?}");
    assert!(err.message().contains("does not exist"), "{err}");
    let err = pve.create_pool("existing", None).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::AlreadyExists, "{err:?}");
}

#[tokio::test]
async fn debug_request_log_has_no_secrets() {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("shared=debug"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let h = sim().await;
    let work = |round: u32| {
        let (pve, tok) = (client(&h, root_password()), client(&h, root_token()));
        async move {
            pve.nodes().await.unwrap();
            pve.create_user(&UserCreate {
                userid: format!("logged{round}@pve"),
                password: Some(Secret::new("student-initial-pw")),
                ..UserCreate::default()
            })
            .await
            .unwrap();
            tok.version().await.unwrap();
        }
    };
    // Tests on other threads without a subscriber may register these callsites at the same
    // time and cache "never" for them; once every callsite is registered (round 0), make
    // tracing recompute interest, then capture round 1.
    work(0).await;
    tracing::callsite::rebuild_interest_cache();
    buf.0.lock().unwrap().clear();
    work(1).await;

    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("pve request"), "debug log written: {log}");
    assert!(log.contains("/access/users"), "{log}");
    for secret in [
        ROOT_PASSWORD,
        TOKEN_SECRET,
        "student-initial-pw",
        "PVE:root@pam:",
        "PVEAuthCookie",
    ] {
        assert!(!log.contains(secret), "{secret} in log: {log}");
    }
}

#[tokio::test]
async fn migrate_vm_moves_a_vm_and_reports_proxmox_refusals() {
    let h = sim().await;
    let pve = client(&h, root_token());
    // Offline: the stopped VM's config (and its local disk) end up on the target.
    let upid = pve.migrate_vm("pve2", 100, "pve1").await.unwrap();
    assert_eq!(
        (upid.node(), upid.task_type(), upid.id()),
        ("pve2", "qmigrate", "100")
    );
    assert_eq!(
        pve.wait_task(&upid, &wait_opts()).await.unwrap(),
        TaskOutcome::Ok
    );
    let cfg = pve.vm_config("pve1", 100).await.unwrap();
    assert_eq!(cfg.lock(), None);
    let gone = pve.vm_config("pve2", 100).await.unwrap_err();
    assert_eq!(gone.class(), ErrorClass::NotFound, "{gone:?}");
    // The node asked is the target: a parameter error on `target`.
    let err = pve.migrate_vm("pve1", 100, "pve1").await.unwrap_err();
    match &err {
        PveError::Param { errors, .. } => {
            assert_eq!(errors["target"], "target is local node.")
        }
        other => panic!("{other:?}"),
    }
    // Running: refused without `online`; live with its local disk when both are asked.
    let up = pve.start_vm("pve1", 100).await.unwrap();
    pve.wait_task(&up, &wait_opts()).await.unwrap();
    let err = pve.migrate_vm("pve1", 100, "pve2").await.unwrap_err();
    assert!(
        matches!(&err, PveError::Server { status: 500, message, transient: false }
            if message == "can't migrate running VM without --online"),
        "{err:?}"
    );
    let live = MigrateParams {
        online: true,
        ..MigrateParams::to("pve2")
    };
    let upid = pve.migrate_vm_with("pve1", 100, &live).await.unwrap();
    let err = pve.wait_task(&upid, &wait_opts()).await.unwrap_err();
    assert!(
        matches!(&err, PveError::TaskFailed { exitstatus, .. } if exitstatus == "migration aborted"),
        "{err:?}"
    );
    let live = MigrateParams {
        with_local_disks: true,
        ..live
    };
    let upid = pve.migrate_vm_with("pve1", 100, &live).await.unwrap();
    pve.wait_task(&upid, &wait_opts()).await.unwrap();
    assert_eq!(pve.vm_status("pve2", 100).await.unwrap().status, "running");
    // A VM under `lock: backup` (set by root@pam with its ticket) is refused as Locked.
    let root = client(&h, root_password());
    let mut lock = ConfigUpdate::default();
    lock.set.insert("lock".into(), "backup".into());
    root.update_config_sync("pve1", 9000, &lock).await.unwrap();
    let err = pve.migrate_vm("pve1", 9000, "pve2").await.unwrap_err();
    assert!(
        matches!(&err, PveError::Locked { message, lock_timeout: false, .. }
            if message == "VM is locked (backup)"),
        "{err:?}"
    );
}

#[tokio::test]
async fn task_watcher_lists_each_node_once_per_interval_for_all_waiters() {
    // Linked clones of 9000 take 2.5 s x 0.05 = 125 ms each, serialised on the storage lock.
    let h = sim_with(0.05, TlsMode::SelfSigned).await;
    let pve = client(&h, root_token());
    let mut upids = Vec::new();
    for newid in 300..308 {
        let p = CloneParams {
            newid,
            name: Some(format!("w{newid}")),
            ..Default::default()
        };
        upids.push(pve.clone_vm("pve1", 9000, &p).await.unwrap());
    }
    let before = pve.request_counts();
    let t = tokio::time::Instant::now();
    let waits = upids.iter().map(|u| {
        let (pve, u) = (pve.clone(), u.clone());
        tokio::spawn(async move { pve.wait_task(&u, &wait_opts()).await })
    });
    for w in futures::future::join_all(waits).await {
        assert_eq!(w.unwrap().unwrap(), TaskOutcome::Ok);
    }
    let elapsed = t.elapsed();
    let c = pve.request_counts();
    let (lists, polls) = (c.task_lists - before.task_lists, c.polls - before.polls);
    let status_reads = polls - lists;
    // One listing per interval (20 ms at first) whatever the number of waiters.
    let intervals = (elapsed.as_millis() / 20) as u64 + 2;
    assert!(
        lists >= 1 && lists <= intervals,
        "{lists} lists in {elapsed:?}"
    );
    // And no status read at all: each clone's end archives the one that ended before it
    // (Proxmox's `active_workers`), so an active-only listing lost most of them once the
    // intervals grew past 125 ms and read their status one by one; the listing covers the
    // archive too, since the oldest waiter's start.
    assert_eq!(
        status_reads, 0,
        "{status_reads} status reads besides {lists} listings"
    );
    let stats = h.stats();
    assert_eq!(stats["requests"]["GET /nodes/{node}/tasks"], lists);
    // Polling each task alone asks at least once per task per interval while they run.
    assert!(polls < 2 * upids.len() as u64 + intervals, "{c:?}");
}

/// Tasks that keep starting: each new waiter's first check is due one first interval after
/// it registered, so the youngest task alone set the pace of the node's listings (one every
/// 20 ms here, 5.5 listings per VM on the bench's class). The watcher keeps three first
/// intervals (60 ms) between two listings of a node.
#[tokio::test]
async fn task_watcher_keeps_a_gap_between_listings_while_tasks_keep_starting() {
    let h = sim_with(0.05, TlsMode::SelfSigned).await;
    let pve = client(&h, root_token());
    let before = pve.request_counts();
    let t = tokio::time::Instant::now();
    let mut waits = Vec::new();
    for newid in 300..330 {
        let p = CloneParams {
            newid,
            name: Some(format!("g{newid}")),
            ..Default::default()
        };
        let upid = pve.clone_vm("pve1", 9000, &p).await.unwrap();
        let pve = pve.clone();
        waits.push(tokio::spawn(async move {
            pve.wait_task(&upid, &wait_opts()).await
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let starting = t.elapsed();
    let lists = pve.request_counts().task_lists - before.task_lists;
    // 30 clones queue at one storage lock: some time out waiting (0.5 s here), which is
    // not what this test is about; every wait must end, with the task's outcome.
    for w in futures::future::join_all(waits).await {
        match w.unwrap() {
            Ok(o) => assert_eq!(o, TaskOutcome::Ok),
            Err(e) => assert!(matches!(e, PveError::TaskFailed { .. }), "{e:?}"),
        }
    }
    let gaps = (starting.as_millis() / 60) as u64 + 2;
    assert!(
        lists <= gaps,
        "{lists} listings in {starting:?} of tasks starting every 20 ms: more than one per 60 ms"
    );
    assert!(lists >= 2, "{lists} listings in {starting:?}");
}

#[tokio::test]
async fn lost_clone_reply_is_found_again_in_the_node_task_list() {
    let h = sim_with(0.02, TlsMode::SelfSigned).await;
    let pve = client(&h, root_token());
    // The simulator runs on this host: its clock is ours.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 5;
    h.inject(Fault::Requests {
        kind: RequestFault::Proxy596AfterCommit,
        count: 1,
    });
    let p = CloneParams {
        newid: 321,
        name: Some("lost".into()),
        ..Default::default()
    };
    let err = pve.clone_vm("pve1", 9000, &p).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Proxy, "{err:?}");
    // Another clone from the same template runs too; only ours names vm-321-disk-0.
    let other = pve
        .clone_vm(
            "pve1",
            9000,
            &CloneParams {
                newid: 322,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Until it names its volume, the other clone might be ours: the search waits for it.
    pve.wait_task(&other, &wait_opts()).await.unwrap();
    let since_t = chrono::DateTime::from_timestamp(since, 0).unwrap();
    let found = match find_clone(&pve, "pve1", 9000, 321, since_t).await.unwrap() {
        CloneSearch::Found { upid, .. } => upid,
        other => panic!("the clone's task is in the list: {other:?}"),
    };
    assert_ne!(found, other);
    assert_eq!(found.task_type(), "qmclone");
    assert_eq!(
        pve.wait_task(&found, &wait_opts()).await.unwrap(),
        TaskOutcome::Ok
    );
    assert_eq!(
        find_clone(&pve, "pve1", 9000, 399, since_t).await.unwrap(),
        CloneSearch::NotFound
    );
    let list = pve
        .node_tasks(
            "pve1",
            &TaskQuery {
                source: TaskSource::All,
                vmid: Some(9000),
                typefilter: Some("qmclone".into()),
                ..TaskQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(list.total, Some(2));
    assert!(
        list.tasks
            .iter()
            .all(|t| t.user.as_deref() == Some("root@pam")
                && t.tokenid.as_deref() == Some("labfleet"))
    );
}

/// A class cloning one template makes its task list long: the search for a lost clone's
/// task read the log of every clone from that template since the call (each read a request
/// that may fail, so under faults the search failed as often as not). Newest first, it
/// stops reading ended logs at the newest task naming the VMID, and a log that cannot change
/// is read once per process.
#[tokio::test]
async fn a_lost_clones_search_reads_each_final_log_once_and_none_older_than_its_task() {
    let h = sim_with(0.02, TlsMode::SelfSigned).await;
    let pve = client(&h, root_token());
    let since = chrono::Utc::now() - chrono::TimeDelta::seconds(5);
    for newid in 400..410 {
        let p = CloneParams {
            newid,
            ..Default::default()
        };
        let upid = pve.clone_vm("pve1", 9000, &p).await.unwrap();
        pve.wait_task(&upid, &wait_opts()).await.unwrap();
    }
    let log_reads = || {
        h.stats()["requests"]["GET /nodes/{node}/tasks/{upid}/log"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = log_reads();
    // The newest clone: its own log only.
    assert!(matches!(
        find_clone(&pve, "pve1", 9000, 409, since).await.unwrap(),
        CloneSearch::Found { running: false, .. }
    ));
    assert_eq!(
        log_reads() - before,
        1,
        "logs read to find the newest clone"
    );
    // A VMID no clone made: every other log once...
    assert_eq!(
        find_clone(&pve, "pve1", 9000, 499, since).await.unwrap(),
        CloneSearch::NotFound
    );
    assert_eq!(log_reads() - before, 10, "logs read by two searches");
    // ... and no log again.
    assert!(matches!(
        find_clone(&pve, "pve1", 9000, 403, since).await.unwrap(),
        CloneSearch::Found { running: false, .. }
    ));
    assert_eq!(log_reads() - before, 10, "logs read by three searches");
}

/// Two worker processes waiting on one node's tasks: each lists the node at its own pace,
/// so the listings Proxmox serves grew with the number of processes. Through the share in
/// Redis (`jobs::task_lists`), a listing one fetched recently enough answers the other's
/// waiters: fewer listings in all, every outcome still right.
#[tokio::test]
async fn two_processes_share_one_nodes_task_listings_through_redis() {
    use labfleet_tests::redis_server::RedisServer;
    use shared::jobs::task_lists::RedisTaskLists;
    use shared::queue::{Queue, QueueConfig};

    let h = sim_with(0.05, TlsMode::SelfSigned).await;
    let redis = RedisServer::start();
    let queue = Queue::connect(&redis.url(), QueueConfig::default())
        .await
        .unwrap();
    // Eight clones serialised on pve1's storage lock, waited on by both "processes" (two
    // clients: two watchers). Returns the listings Proxmox served and the shared ones used.
    let round = |first: u32, share: bool| {
        let (h, queue) = (&h, queue.clone());
        async move {
            let a = client(h, root_token());
            let b = client(h, root_token());
            if share {
                a.set_task_list_share(RedisTaskLists::new(queue.clone(), "lab"));
                b.set_task_list_share(RedisTaskLists::new(queue.clone(), "lab"));
            }
            let mut upids = Vec::new();
            for newid in first..first + 8 {
                let p = CloneParams {
                    newid,
                    name: Some(format!("s{newid}")),
                    ..Default::default()
                };
                upids.push(a.clone_vm("pve1", 9000, &p).await.unwrap());
            }
            let served = h.stats()["requests"]["GET /nodes/{node}/tasks"]
                .as_u64()
                .unwrap_or(0);
            let waits = upids.iter().flat_map(|u| {
                [a.clone(), b.clone()].map(|c| {
                    let u = u.clone();
                    tokio::spawn(async move { c.wait_task(&u, &wait_opts()).await })
                })
            });
            for w in futures::future::join_all(waits).await {
                assert_eq!(w.unwrap().unwrap(), TaskOutcome::Ok);
            }
            let served = h.stats()["requests"]["GET /nodes/{node}/tasks"]
                .as_u64()
                .unwrap_or(0)
                - served;
            let (ca, cb) = (a.request_counts(), b.request_counts());
            assert_eq!(ca.task_lists + cb.task_lists, served);
            (served, ca.shared_task_lists + cb.shared_task_lists)
        }
    };
    let (alone, none_shared) = round(400, false).await;
    let (shared, used) = round(420, true).await;
    eprintln!("share test: alone {alone}, shared {shared}, used {used}");
    assert_eq!(none_shared, 0);
    assert!(used > 0, "no shared listing used ({shared} served)");
    // Alone, each watcher lists at its own pace: about twice what one would.
    assert!(
        shared * 4 < alone * 3,
        "{shared} listings with the share against {alone} without ({used} shared ones used)"
    );
}
