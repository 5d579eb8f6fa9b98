//! A term's lifecycle (issue 12), as a teacher runs it: the producer binary against real
//! `worker` processes, a real redis-server and the simulator over HTTPS. Resetting a lab
//! (teardown without waiting, then submit at once), a late student, a student shared by two
//! deployments, dropping a student with `--prune`; after each, the cluster is checked against
//! what the last command asked for, `status` against the cluster, the handout's passwords
//! against `POST /access/ticket`, and, once all is torn down, Redis against its baseline plus
//! the records ARCHITECTURE.md says are kept.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use labfleet_tests::bins::bin;
use serde_json::Value;
use shared::pve::{Auth, ClientConfig, PveClient, TlsPolicy, parse_fingerprint};

use super::reliability::{Rig, RigOpts, SERIAL, users_yaml};

pub(crate) const ID: &str = "rel-lab@lab";

/// Runs the producer binary on `dir` against the rig's Redis; fails the test unless it exits 0.
pub(crate) fn producer_ok(rig: &Rig, dir: &Path, args: &[&str]) -> String {
    let out = producer_in(rig, dir, args);
    assert!(
        out.status.success(),
        "producer {args:?} exited {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn producer_in(rig: &Rig, dir: &Path, args: &[&str]) -> Output {
    Command::new(bin("producer"))
        .arg("--data-dir")
        .arg(dir)
        .arg("--redis")
        .arg(&rig.redis_url)
        .args(args)
        .env("LABFLEET_SECRET_KEY", rig.key.to_base64().expose())
        .env_remove("RUST_LOG")
        .output()
        .expect("running the producer binary")
}

/// The VMs on the cluster that are not templates, by name.
pub(crate) fn class_on_cluster(rig: &Rig) -> BTreeMap<String, pve_sim::VmInfo> {
    rig.sim
        .vms()
        .into_iter()
        .filter(|v| !v.template)
        .map(|v| (v.name.clone().unwrap_or_default(), v))
        .collect()
}

/// One row of the handout's CSV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Row {
    pub student: String,
    pub password: String,
    pub account: String,
    pub vm: String,
    pub vmid: String,
    pub node: String,
}

pub(crate) fn handout(dir: &Path, id: &str) -> Vec<Row> {
    let path = dir.join(format!("handout-{}.csv", id.replace('@', "_")));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("student,password,account,vm,vmid,node,console")
    );
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 7, "{l}");
            // The console link names the row's VM and node, on the cluster's host and port.
            if !f[4].is_empty() {
                let tail = format!("/?console=kvm&novnc=1&vmid={}&node={}", f[4], f[5]);
                assert!(
                    f[6].starts_with("https://127.0.0.1:") && f[6].ends_with(&tail),
                    "{l}"
                );
            }
            Row {
                student: f[0].into(),
                password: f[1].into(),
                account: f[2].into(),
                vm: f[3].into(),
                vmid: f[4].into(),
                node: f[5].into(),
            }
        })
        .collect()
}

/// Whether `user` logs in with `password` (a real `POST /access/ticket`), and the VMIDs of
/// the VMs they then see (names in `/cluster/resources` lag behind, as on Proxmox).
pub(crate) async fn login(rig: &Rig, user: &str, password: &str) -> Option<BTreeSet<u32>> {
    let mut cc = ClientConfig::new(
        "lab",
        "127.0.0.1",
        Auth::Password {
            user: user.into(),
            password: shared::secret::Secret::new(password),
        },
    );
    cc.port = rig.sim.addr().port();
    cc.tls = TlsPolicy::Fingerprint(parse_fingerprint(&rig.sim.fingerprint().unwrap()).unwrap());
    let client = PveClient::new(cc).ok()?;
    let vms = client.cluster_vms().await.ok()?;
    Some(vms.into_iter().map(|v| v.vmid).collect())
}

/// Every key in the rig's Redis.
pub(crate) async fn redis_keys(rig: &Rig) -> BTreeSet<String> {
    let mut c = rig.q().connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    keys.into_iter().collect()
}

/// After every deployment in `ids` is torn down: Redis holds `baseline` plus only what
/// ARCHITECTURE.md lists as kept (the queue's own global keys, each deployment's record with
/// its expiry, tombstones, quarantine entries and the removal counter per cluster). The
/// finish job purges the queue's records right after it moves the phase: allow it a moment.
pub(crate) async fn assert_only_kept_keys(rig: &Rig, baseline: &BTreeSet<String>, ids: &[&str]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let extra = unexpected_keys(rig, baseline, ids).await;
        if extra.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "keys left after the teardowns: {extra:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn unexpected_keys(rig: &Rig, baseline: &BTreeSet<String>, ids: &[&str]) -> Vec<String> {
    let now = redis_keys(rig).await;
    let kept_global = [
        "caps",
        "counts",
        "stats",
        "slothwm",
        "deployments",
        "tombs:lab",
        "quarantine:lab",
        "removals:lab",
        // Worker heartbeats (not a deployment's): they expire with their TTL.
        "workers",
    ];
    let mut c = rig.q().connection();
    let mut extra = Vec::new();
    for k in now.difference(baseline) {
        let suffix = k.strip_prefix("{lf}:").unwrap_or(k);
        if kept_global.contains(&suffix) || suffix.starts_with("worker:") {
            continue;
        }
        if let Some(id) = suffix.strip_prefix("d:")
            && ids.contains(&id)
        {
            let ttl: i64 = redis::cmd("PTTL").arg(k).query_async(&mut c).await.unwrap();
            let fields: Vec<String> = redis::cmd("HKEYS")
                .arg(k)
                .query_async(&mut c)
                .await
                .unwrap();
            if ttl > 0 && fields == ["record"] {
                continue;
            }
            extra.push(format!("{k} (ttl {ttl} ms, fields {fields:?})"));
            continue;
        }
        extra.push(k.clone());
    }
    extra
}

/// A rig at time scale 0.05 with `users` students and two worker processes.
async fn rig_with_workers(users: usize) -> Rig {
    let mut rig = Rig::new(RigOpts {
        time_scale: 0.05,
        users,
        ..RigOpts::default()
    })
    .await;
    rig.fleet.spawn();
    rig.fleet.spawn();
    rig
}

fn status_json(rig: &Rig, dir: &Path, id: &str) -> Value {
    let out = producer_ok(rig, dir, &["status", id, "--vms", "--json"]);
    serde_json::from_str(&out).expect("status --json is JSON")
}

/// `status` tells the truth: every VM it lists as done exists on the cluster at its VMID
/// with its name, and every VM of the class on the cluster is listed.
fn assert_status_matches_cluster(rig: &Rig, dir: &Path, id: &str, expect: usize) {
    assert_status_lists(rig, dir, id, expect, 0);
}

/// As [`assert_status_matches_cluster`], with `kept` of them `not-in-files` (students dropped
/// from the files without `--prune`).
fn assert_status_lists(rig: &Rig, dir: &Path, id: &str, expect: usize, kept: usize) {
    let st = status_json(rig, dir, id);
    assert_eq!(st["state"], "done", "{st}");
    let vms = st["vms"].as_array().unwrap();
    assert_eq!(vms.len(), expect, "{st}");
    let cluster = class_on_cluster(rig);
    let mut not_in_files = 0;
    for v in vms {
        if v["state"] == "not-in-files" {
            not_in_files += 1;
        } else {
            assert_eq!(v["state"], "done", "{v}");
        }
        let name = v["name"].as_str().unwrap();
        let on = cluster
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not on the cluster"));
        assert_eq!(
            Some(on.vmid),
            v["vmid"].as_u64().map(|x| x as u32),
            "{name}"
        );
        assert_eq!(on.node, v["node"].as_str().unwrap(), "{name}");
    }
    assert_eq!(not_in_files, kept, "{st}");
}

/// Every student of the handout logs in with the password it gives and sees their VMs.
async fn assert_handout_logs_in(rig: &Rig, rows: &[Row]) {
    let mut by_user: BTreeMap<&str, (&str, BTreeSet<u32>)> = BTreeMap::new();
    for r in rows {
        by_user
            .entry(&r.student)
            .or_insert((&r.password, BTreeSet::new()))
            .1
            .insert(r.vmid.parse().expect("the handout gives each VM's VMID"));
    }
    for (user, (pw, vms)) in by_user {
        let seen = login(rig, user, pw)
            .await
            .unwrap_or_else(|| panic!("{user} cannot log in with the handout's password"));
        assert!(
            vms.is_subset(&seen),
            "{user} sees {seen:?}, handout lists {vms:?}"
        );
    }
}

/// The marker epoch of every VM of the class.
fn epochs(rig: &Rig) -> BTreeSet<String> {
    class_on_cluster(rig)
        .values()
        .filter_map(|v| v.description.clone())
        .filter_map(|d| d.rsplit_once(" epoch=").map(|(_, e)| e.trim().to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_teardown_without_wait_then_submit_at_once() {
    let _serial = SERIAL.lock().await;
    let rig = rig_with_workers(4).await;
    let baseline_keys = redis_keys(&rig).await;
    let baseline = rig.sim.snapshot();
    let dir = rig.data.path().to_owned();
    producer_ok(&rig, &dir, &["submit", "--wait"]);
    let first = class_on_cluster(&rig);
    assert_eq!(first.len(), 8);
    assert_eq!(epochs(&rig), BTreeSet::from(["0".to_owned()]));

    // The reset: teardown without waiting, then submit at once.
    producer_ok(&rig, &dir, &["teardown", ID]);
    let out = producer_in(&rig, &dir, &["submit", "--wait", "--json"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["state"], "done", "{doc}");

    // The cluster holds the class once, made by the new epoch (teardown was epoch 1).
    let second = class_on_cluster(&rig);
    assert_eq!(
        second.keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>(),
        "the same class again"
    );
    assert_eq!(
        epochs(&rig),
        BTreeSet::from(["2".to_owned()]),
        "made after the reset"
    );
    assert_status_matches_cluster(&rig, &dir, ID, 8);
    let users = rig.sim.users();
    for i in 1..=4 {
        assert!(users.contains(&format!("student{i}@pve")), "{users:?}");
    }
    let rows = handout(&dir, ID);
    assert_eq!(rows.len(), 8);
    assert!(
        rows.iter()
            .all(|r| r.account == "created by this deployment"),
        "{rows:?}"
    );
    assert_handout_logs_in(&rig, &rows).await;

    // A teardown without --wait finishes by itself.
    producer_ok(&rig, &dir, &["teardown", ID]);
    labfleet_tests::wait::wait_for(
        std::time::Duration::from_secs(60),
        "the teardown finished by itself",
        || async { rig.state(ID).await == "torn-down" },
    )
    .await;
    assert_eq!(
        rig.sim.snapshot(),
        baseline,
        "the cluster is as before the class"
    );
    assert_only_kept_keys(&rig, &baseline_keys, &[ID]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_student_keeps_everyone_s_initial_password_in_the_handout() {
    let _serial = SERIAL.lock().await;
    let rig = rig_with_workers(2).await;
    let dir = rig.data.path().to_owned();
    producer_ok(&rig, &dir, &["submit", "--wait"]);
    let before = handout(&dir, ID);
    assert_eq!(before.len(), 4);
    std::fs::write(dir.join("users.yml"), users_yaml(3)).unwrap();
    producer_ok(&rig, &dir, &["submit", "--wait"]);
    let after = handout(&dir, ID);
    assert_eq!(after.len(), 6);
    for r in &before {
        let same = after
            .iter()
            .find(|a| a.student == r.student && a.vm == r.vm)
            .unwrap_or_else(|| panic!("{r:?} is still in the handout"));
        assert_eq!(
            same.password, r.password,
            "the earlier password is still given"
        );
        assert_eq!(same.account, "created by this deployment");
    }
    assert!(
        after.iter().all(|r| !r.password.starts_with('(')),
        "{after:?}"
    );
    assert_handout_logs_in(&rig, &after).await;
    assert_status_matches_cluster(&rig, &dir, ID, 6);
}

/// A second data folder on the same cluster and Redis: another course.
fn other_course(rig: &Rig, name: &str, users: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        rig.data.path().join("connections.yml"),
        dir.path().join("connections.yml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("deployment_config.yml"),
        format!(
            "name: {name}\nmachines:\n  - {{device_type: linux, name: pc, template_node: pve1, template_vmid: 100, networks: [{{bridge: vmbr0}}]}}\n"
        ),
    )
    .unwrap();
    let list: String = users.iter().map(|u| format!("  - \"{u}\"\n")).collect();
    std::fs::write(dir.path().join("users.yml"), format!("users:\n{list}")).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_student_keeps_their_account_while_another_course_lists_them() {
    let _serial = SERIAL.lock().await;
    let rig = rig_with_workers(2).await;
    let baseline_keys = redis_keys(&rig).await;
    let baseline = rig.sim.snapshot();
    let a = rig.data.path().to_owned();
    let b = other_course(&rig, "course-b", &["student1@pve", "student9@pve"]);
    let b_id = "course-b@lab";
    producer_ok(&rig, &a, &["submit", "--wait"]);
    producer_ok(&rig, b.path(), &["submit", "--wait"]);
    let rows_b = handout(b.path(), b_id);
    let s1 = rows_b.iter().find(|r| r.student == "student1@pve").unwrap();
    assert_eq!(s1.account, format!("created by {ID}"), "{rows_b:?}");
    let s1_a = handout(&a, ID)
        .into_iter()
        .find(|r| r.student == "student1@pve")
        .unwrap();
    assert_eq!(s1.password, s1_a.password, "one account, one password");

    producer_ok(&rig, &a, &["teardown", ID, "--wait"]);
    let users = rig.sim.users();
    assert!(
        users.contains(&"student1@pve".to_owned()),
        "B still lists student1"
    );
    assert!(
        !users.contains(&"student2@pve".to_owned()),
        "only A listed student2"
    );
    let b_vm = class_on_cluster(&rig)
        .into_values()
        .find(|v| v.name.as_deref() == Some("pc-student1"))
        .expect("B's VM of student1");
    assert!(
        rig.sim.acls().iter().any(|acl| acl.path
            == format!("/pool/{}", b_vm.pool.as_deref().unwrap_or("-"))
            && acl.ugid == "student1@pve"),
        "student1 keeps their role on B's pool, which holds B's VM"
    );
    let seen = login(&rig, "student1@pve", &s1.password)
        .await
        .expect("student1 still logs in with the handout's password");
    assert_eq!(seen, BTreeSet::from([b_vm.vmid]), "and sees B's VM only");
    assert_status_matches_cluster(&rig, b.path(), b_id, 2);

    producer_ok(&rig, b.path(), &["teardown", b_id, "--wait"]);
    assert_eq!(
        rig.sim.snapshot(),
        baseline,
        "nobody lists student1 now: gone"
    );
    assert_only_kept_keys(&rig, &baseline_keys, &[ID, b_id]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_a_dropped_student_and_listing_them_again_brings_them_back() {
    let _serial = SERIAL.lock().await;
    let rig = rig_with_workers(3).await;
    let dir = rig.data.path().to_owned();
    producer_ok(&rig, &dir, &["submit", "--wait"]);
    let full = class_on_cluster(&rig);
    std::fs::write(dir.join("users.yml"), users_yaml(2)).unwrap();
    // Without --prune the dropped student's VMs are kept and reported.
    producer_ok(&rig, &dir, &["submit", "--wait"]);
    assert_eq!(class_on_cluster(&rig).len(), 6);
    let st = status_json(&rig, &dir, ID);
    assert_eq!(st["counts"]["not-in-files"], 2, "{st}");
    producer_ok(&rig, &dir, &["submit", "--prune", "--wait"]);
    labfleet_tests::wait::wait_for(
        std::time::Duration::from_secs(60),
        "student3's VMs removed",
        || async { class_on_cluster(&rig).len() == 4 },
    )
    .await;
    let left = class_on_cluster(&rig);
    for (name, v) in &left {
        assert_eq!(full[name].vmid, v.vmid, "the others are untouched");
        assert!(!name.ends_with("student3"));
    }
    labfleet_tests::wait::wait_for(
        std::time::Duration::from_secs(30),
        "student3's account and pool removed",
        || async {
            !rig.sim.users().contains(&"student3@pve".to_owned())
                && !rig
                    .sim
                    .pools()
                    .iter()
                    .any(|p| p.poolid.ends_with("student3"))
        },
    )
    .await;
    assert_status_matches_cluster(&rig, &dir, ID, 4);
    // Listed again: made anew.
    std::fs::write(dir.join("users.yml"), users_yaml(3)).unwrap();
    producer_ok(&rig, &dir, &["submit", "--wait"]);
    assert_eq!(class_on_cluster(&rig).len(), 6);
    assert_status_matches_cluster(&rig, &dir, ID, 6);
    assert_handout_logs_in(&rig, &handout(&dir, ID)).await;
}

/// The fixture's secret key (32 bytes 0..31): the students' passwords of the fixture were
/// derived from it.
const FIXTURE_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const FIXTURE_ID: &str = "term-lab@lab";

fn fixture(name: &str) -> Value {
    let p = labfleet_tests::bins::root()
        .join("tests/fixtures/upgrade-v1")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The cluster objects the version before epochs made (tests/fixtures/upgrade-v1): its VMs
/// with their old markers, the users with their comments and passwords, pools and ACLs.
fn old_version_objects(sc: &mut pve_sim::SimConfig) {
    let snap = fixture("cluster-snapshot.json");
    let key = shared::secret::SecretKey::from_base64(FIXTURE_KEY, "fixture").unwrap();
    for (vmid, v) in snap["vms"].as_object().unwrap() {
        if v["template"].as_bool().unwrap() {
            continue;
        }
        let cfg = v["config"].as_object().unwrap();
        let scsi0 = cfg["scsi0"].as_str().unwrap();
        let storage = scsi0.split(':').next().unwrap().to_owned();
        let size_gib: f64 = scsi0
            .split("size=")
            .nth(1)
            .and_then(|s| s.trim_end_matches('G').parse().ok())
            .unwrap();
        let nets: Vec<String> = (0..4)
            .filter_map(|i| cfg.get(&format!("net{i}")).and_then(Value::as_str))
            .map(|n| {
                // Without the MAC: the simulator gives each NIC its own.
                let (model, rest) = n.split_once('=').unwrap();
                let rest = rest.split_once(',').map_or("", |(_, r)| r);
                format!("{model},{rest}")
            })
            .collect();
        sc.cluster.vms.push(pve_sim::VmSpec {
            vmid: vmid.parse().unwrap(),
            node: v["node"].as_str().unwrap().into(),
            name: v["name"].as_str().unwrap().into(),
            template: false,
            cores: 2,
            memory_mib: 2048,
            disks: vec![pve_sim::DiskSpec {
                key: "scsi0".into(),
                storage,
                size_gib,
            }],
            nets,
            ostype: Some("l26".into()),
            description: v["description"].as_str().map(String::from),
            tags: None,
            pool: v["pool"].as_str().map(String::from),
            running: false,
        });
    }
    for (user, u) in snap["users"].as_object().unwrap() {
        if user == "root@pam" {
            continue;
        }
        let pw = producer::deploy::student_password(&key, FIXTURE_ID, user);
        sc.cluster.users.push(pve_sim::UserSpec {
            userid: user.clone(),
            password: Some(pw.expose().to_owned()),
            tokens: vec![],
            comment: u["comment"].as_str().map(String::from),
        });
    }
    for (pool, p) in snap["pools"].as_object().unwrap() {
        sc.cluster.pools.push(pve_sim::PoolSpec {
            poolid: pool.clone(),
            comment: p["comment"].as_str().map(String::from),
        });
    }
    for a in snap["acl"].as_array().unwrap() {
        sc.cluster.acl.push(pve_sim::AclSpec {
            path: a["path"].as_str().unwrap().into(),
            ugid: a["ugid"].as_str().unwrap().into(),
            role: a["roleid"].as_str().unwrap().into(),
            propagate: a["propagate"].as_u64() == Some(1),
        });
    }
}

/// Writes the old version's Redis state (tests/fixtures/upgrade-v1/redis.json) into the
/// rig's Redis, without the done jobs' records: they expire after 7 days, and a class made
/// before an upgrade is usually older than that, so the resubmit runs its jobs again and
/// must recognise the old VMs by their markers.
async fn load_old_redis(rig: &Rig) {
    let dump = fixture("redis.json");
    let mut c = rig.q().connection();
    for (key, v) in dump.as_object().unwrap() {
        if key.contains(":job:") {
            continue;
        }
        let mut p = redis::pipe();
        if let Some(h) = v.get("hash") {
            for (f, val) in h.as_object().unwrap() {
                p.hset(key, f, val.as_str().unwrap()).ignore();
            }
        } else if let Some(z) = v.get("zset") {
            for pair in z.as_array().unwrap() {
                p.zadd(key, pair[0].as_str().unwrap(), pair[1].as_f64().unwrap())
                    .ignore();
            }
        } else if let Some(s) = v.get("set") {
            for m in s.as_array().unwrap() {
                p.sadd(key, m.as_str().unwrap()).ignore();
            }
        } else if let Some(s) = v.get("string") {
            p.set(key, s.as_str().unwrap()).ignore();
        }
        if p.cmd_iter().next().is_some() {
            p.query_async::<()>(&mut c).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_made_by_the_previous_version_is_resubmitted_and_torn_down() {
    let _serial = SERIAL.lock().await;
    let mut rig = Rig::new(RigOpts {
        time_scale: 0.05,
        users: 2,
        deployment: "name: term-lab\nmachines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100, networks: [{bridge: vmbr0}]}\n  - {device_type: router, name: gw, template_node: pve1, template_vmid: 120, networks: [{bridge: vmbr0}]}\n".into(),
        sim_setup: Some(old_version_objects),
        key: Some(shared::secret::SecretKey::from_base64(FIXTURE_KEY, "fixture").unwrap()),
        ..RigOpts::default()
    })
    .await;
    let dir = rig.data.path().to_owned();
    std::fs::write(
        dir.join("users.yml"),
        "users:\n  - \"alice@pve\"\n  - \"bob@pve\"\n",
    )
    .unwrap();
    let old = class_on_cluster(&rig);
    assert_eq!(old.len(), 4, "the old version's class");
    assert!(
        old.values().all(|v| !v
            .description
            .as_deref()
            .unwrap_or_default()
            .contains("epoch=")),
        "old markers carry no epoch"
    );
    let baseline_keys = redis_keys(&rig).await;
    load_old_redis(&rig).await;
    rig.fleet.spawn();
    rig.fleet.spawn();
    producer_ok(&rig, &dir, &["submit", "--wait"]);
    let now = class_on_cluster(&rig);
    assert_eq!(
        now.iter()
            .map(|(n, v)| (n.clone(), v.vmid))
            .collect::<Vec<_>>(),
        old.iter()
            .map(|(n, v)| (n.clone(), v.vmid))
            .collect::<Vec<_>>(),
        "the old VMs are recognised as ours: none made again"
    );
    assert_status_matches_cluster(&rig, &dir, FIXTURE_ID, 4);
    let rows = handout(&dir, FIXTURE_ID);
    assert!(
        rows.iter()
            .all(|r| r.account == "created by this deployment"),
        "{rows:?}"
    );
    assert_handout_logs_in(&rig, &rows).await;
    producer_ok(&rig, &dir, &["teardown", FIXTURE_ID, "--wait"]);
    assert!(class_on_cluster(&rig).is_empty(), "the old VMs are removed");
    let users = rig.sim.users();
    assert!(!users.contains(&"alice@pve".to_owned()) && !users.contains(&"bob@pve".to_owned()));
    assert!(rig.sim.pools().is_empty());
    assert_only_kept_keys(&rig, &baseline_keys, &[FIXTURE_ID]).await;
}

/// What the teacher last asked of one course, and so what the cluster must hold for it.
#[derive(Debug, Default, Clone)]
struct Course {
    /// Submitted and not torn down since.
    live: bool,
    /// Students whose VMs must exist: the files' list, plus students dropped from it without
    /// `--prune` (kept, listed as not-in-files).
    kept: BTreeSet<String>,
    /// The files' list.
    listed: BTreeSet<String>,
}

/// The VM names a course's students have (`<machine>-<user part>`).
fn vm_names(machines: &[&str], users: &BTreeSet<String>) -> BTreeSet<String> {
    users
        .iter()
        .flat_map(|u| {
            let part = u.split('@').next().unwrap().to_owned();
            machines.iter().map(move |m| format!("{m}-{part}"))
        })
        .collect()
}

fn write_users(dir: &Path, users: &BTreeSet<String>) {
    let list: String = users.iter().map(|u| format!("  - \"{u}\"\n")).collect();
    std::fs::write(dir.join("users.yml"), format!("users:\n{list}")).unwrap();
}

/// Seeded sequences of submit (with and without `--wait`), students added and dropped
/// (with and without `--prune`), teardown (with and without `--wait`) and retry, over two
/// courses that share students, with worker processes SIGKILLed in between. After each
/// quiescent point the cluster holds exactly what the last commands ask for, `status` agrees
/// with the cluster, and every student labfleet made logs in with the handout's password;
/// after the final teardowns Redis is back to its baseline plus the kept records.
/// `LABFLEET_LIFECYCLE_OPS` sets the number of operations (default 8), `LABFLEET_SEED` the
/// seed (default 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_lifecycle_of_two_courses_sharing_students() {
    let _serial = SERIAL.lock().await;
    let ops: usize = std::env::var("LABFLEET_LIFECYCLE_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed = super::reliability::seed();
    let mut rng = super::reliability::Rng(seed);
    let mut rig = Rig::new(RigOpts {
        time_scale: 0.05,
        users: 2,
        ..RigOpts::default()
    })
    .await;
    let baseline_keys = redis_keys(&rig).await;
    let baseline = rig.sim.snapshot();
    for _ in 0..3 {
        rig.fleet.spawn();
    }
    let pool: Vec<String> = (1..=5).map(|i| format!("student{i}@pve")).collect();
    let b_dir = other_course(&rig, "course-b", &["student1@pve"]);
    let dirs = [rig.data.path().to_owned(), b_dir.path().to_owned()];
    let ids = [ID, "course-b@lab"];
    let machines: [&[&str]; 2] = [&["student-pc", "gw"], &["pc"]];
    let mut model = [Course::default(), Course::default()];
    let mut log = Vec::new();
    let started = std::time::Instant::now();
    for step in 0..ops {
        let c = rng.below(2);
        let (dir, id) = (&dirs[c], ids[c]);
        let roll = rng.below(100);
        let op = if roll < 45 {
            // A submit with a new list of students (some shared with the other course).
            let mut users = BTreeSet::new();
            for u in &pool {
                if rng.below(2) == 0 {
                    users.insert(u.clone());
                }
            }
            if users.is_empty() {
                users.insert(pool[rng.below(pool.len())].clone());
            }
            let prune = model[c].live && rng.below(3) == 0;
            let wait = rng.below(2) == 0;
            write_users(dir, &users);
            let mut args = vec!["submit"];
            if prune {
                args.push("--prune");
            }
            if wait {
                args.push("--wait");
            }
            producer_ok(&rig, dir, &args);
            let m = &mut model[c];
            m.kept = if m.live && !prune {
                m.kept.union(&users).cloned().collect()
            } else {
                users.clone()
            };
            m.live = true;
            m.listed = users.clone();
            format!("{id}: {} {users:?}", args.join(" "))
        } else if roll < 75 {
            let wait = rng.below(2) == 0;
            let mut args = vec!["teardown", id];
            if wait {
                args.push("--wait");
            }
            if model[c].live || wait {
                let out = producer_in(&rig, dir, &args);
                // A course never submitted has no deployment: a usage error, nothing else.
                assert!(out.status.success() || !model[c].live, "{args:?}: {out:?}");
            }
            model[c] = Course::default();
            format!("{id}: {}", args.join(" "))
        } else if roll < 85 {
            if model[c].live {
                producer_ok(&rig, dir, &["retry", id]);
            }
            format!("{id}: retry")
        } else {
            let alive = rig.fleet.alive();
            let victim = alive[rng.below(alive.len())].clone();
            rig.fleet.kill(&victim);
            rig.fleet.spawn();
            format!("kill {victim}")
        };
        log.push(op);
        // Quiescent point: what the model says, on the cluster and in status.
        let want: BTreeSet<String> = (0..2)
            .filter(|i| model[*i].live)
            .flat_map(|i| vm_names(machines[i], &model[i].kept))
            .collect();
        let want_users: BTreeSet<String> = (0..2)
            .filter(|i| model[*i].live)
            .flat_map(|i| model[i].kept.iter().cloned())
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let have: BTreeSet<String> = class_on_cluster(&rig).into_keys().collect();
            let users: BTreeSet<String> = rig
                .sim
                .users()
                .into_iter()
                .filter(|u| u != "root@pam")
                .collect();
            let mut states = Vec::new();
            for i in 0..2 {
                states.push(if model[i].live {
                    rig.state(ids[i]).await
                } else {
                    String::new()
                });
            }
            let settled = (0..2).all(|i| !model[i].live || states[i] == "done")
                && rig
                    .q()
                    .stats()
                    .await
                    .map(|s| s.in_flight + s.ready)
                    .unwrap_or(1)
                    == 0;
            if have == want && users == want_users && settled {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "seed {seed}, step {step}: not converged\nwant VMs {want:?}\nhave {have:?}\nwant users {want_users:?}\nhave {users:?}\nstates {states:?}\nops:\n{}\n{}\n{}",
                    log.join("\n"),
                    rig.diagnose(ids[0]).await,
                    rig.diagnose(ids[1]).await
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        for i in 0..2 {
            if model[i].live {
                let dropped: BTreeSet<String> = model[i]
                    .kept
                    .difference(&model[i].listed)
                    .cloned()
                    .collect();
                assert_status_lists(
                    &rig,
                    &dirs[i],
                    ids[i],
                    vm_names(machines[i], &model[i].kept).len(),
                    vm_names(machines[i], &dropped).len(),
                );
                producer_ok(&rig, &dirs[i], &["handout", ids[i]]);
                let rows = handout(&dirs[i], ids[i]);
                assert!(
                    rows.iter().all(|r| !r.password.starts_with('(')),
                    "{rows:?}"
                );
                assert_handout_logs_in(&rig, &rows).await;
            }
        }
    }
    for i in 0..2 {
        let out = producer_in(&rig, &dirs[i], &["teardown", ids[i], "--wait"]);
        assert!(out.status.success() || !model[i].live, "{out:?}");
    }
    assert_eq!(
        rig.sim.snapshot(),
        baseline,
        "seed {seed}: the cluster is back to its baseline\nops:\n{}",
        log.join("\n")
    );
    let submitted: Vec<&str> = (0..2)
        .filter(|i| {
            log.iter()
                .any(|l| l.starts_with(ids[*i]) && l.contains("submit"))
        })
        .map(|i| ids[i])
        .collect();
    assert_only_kept_keys(&rig, &baseline_keys, &submitted).await;
    eprintln!(
        "lifecycle: seed {seed}, {ops} operations in {:.1} s\n{}",
        started.elapsed().as_secs_f64(),
        log.join("\n")
    );
}

/// Review item: deployment records were written without compare-and-set, so a teardown and
/// a submit racing both "won". Now a write based on a stale read is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_records_move_only_by_compare_and_set() {
    use shared::jobs::state::{DeploymentRecord, Phase, Store};
    let redis = labfleet_tests::redis_server::RedisServer::start();
    let q = shared::queue::Queue::connect(&redis.url(), shared::jobs::queue_config())
        .await
        .unwrap();
    let store = Store::new(q);
    let rec = DeploymentRecord::new("cas@lab", "lab", "cas", chrono::Utc::now());
    assert!(store.commit(None, &rec, None).await.unwrap(), "created");
    assert!(
        !store.commit(None, &rec, None).await.unwrap(),
        "created once only"
    );
    let seen = store.read("cas@lab").await.unwrap().unwrap();
    let mut teardown = seen.rec.clone();
    teardown.epoch += 1;
    teardown.phase = Phase::TearingDown;
    let mut resubmit = seen.rec.clone();
    resubmit.updated = chrono::Utc::now() + chrono::TimeDelta::seconds(1);
    assert!(
        store.commit(Some(&seen), &teardown, None).await.unwrap(),
        "the first writer wins"
    );
    assert!(
        !store.commit(Some(&seen), &resubmit, None).await.unwrap(),
        "the second, from the same read, is refused"
    );
    let now = store.read("cas@lab").await.unwrap().unwrap();
    assert_eq!(now.rec.phase, Phase::TearingDown);
    assert_eq!(now.rec.epoch, 1);
}
