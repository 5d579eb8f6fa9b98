//! The classroom around a deployment (issue 14): power operations with the per-node start
//! cap, selectors, repeated operations, the shutdown fallback, power state recorded and
//! live, the baseline snapshot and reset, and teardown removing the snapshots. Real
//! worker processes, a real redis-server and the simulator over HTTPS (`Rig`).

use std::process::Command;
use std::time::Duration;

use labfleet_tests::bins::bin;
use labfleet_tests::wait::wait_for;
use producer::operation::{self, OpKind, OpReport, OpRequest, Selectors};
use serde_json::Value;
use shared::jobs::power::PowerAction;
use shared::pve::ConfigUpdate;

use crate::reliability::{Rig, RigOpts, SERIAL};

/// One machine per student, started by nobody at deploy time.
const ONE_MACHINE: &str = "name: class-lab\nmachines:\n  - {device_type: linux, name: student-pc, template_node: pve1, template_vmid: 100, networks: [{bridge: vmbr0}]}\n";

fn req(kind: OpKind, students: &[&str]) -> OpRequest {
    OpRequest {
        kind,
        selectors: Selectors {
            students: students.iter().map(|s| s.to_string()).collect(),
            vms: vec![],
        },
        timeout_secs: None,
        starts_per_node: 2,
    }
}

async fn op(rig: &Rig, id: &str, r: OpRequest) -> OpReport {
    let mut rep = operation::start(&rig.store, id, &r).await.unwrap();
    let waited = tokio::time::timeout(
        Duration::from_secs(90),
        operation::wait(&rig.store, &mut rep, Duration::from_millis(100), |_| {}),
    )
    .await;
    assert!(
        waited.is_ok(),
        "operation did not finish: {}",
        rep.summary()
    );
    waited.unwrap().unwrap();
    rep
}

fn tasks_ok(rig: &Rig, ttype: &str) -> u64 {
    rig.sim.stats()["tasks"][ttype]["ok"].as_u64().unwrap_or(0)
}

fn all_done(rep: &OpReport) {
    for v in &rep.vms {
        assert_eq!(v.state, "done", "{}: {:?}", v.name, v.error);
    }
}

/// (vmid, status) of the deployment's VMs in the simulator, by VM name.
fn power_in_sim(rig: &Rig) -> std::collections::BTreeMap<String, (u32, String)> {
    rig.sim
        .vms()
        .into_iter()
        .filter(|v| !v.template)
        .map(|v| (v.name.clone().unwrap_or_default(), (v.vmid, v.status)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_of_a_class_with_the_start_cap_selectors_and_repeats() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut rig = Rig::new(RigOpts {
        users: 8,
        deployment: ONE_MACHINE.to_owned(),
        ..RigOpts::default()
    })
    .await;
    rig.fleet.spawn();
    rig.fleet.spawn();
    let (id, plan) = rig.submit().await;
    rig.wait_state(&id, "done", Duration::from_secs(120)).await;
    assert_eq!(plan.vms.len(), 8);
    assert!(power_in_sim(&rig).values().all(|(_, s)| s == "stopped"));

    // One student only, named by the user part.
    let one = op(
        &rig,
        &id,
        req(OpKind::Power(PowerAction::Start), &["student2"]),
    )
    .await;
    all_done(&one);
    assert_eq!(one.vms.len(), 1);
    let sim = power_in_sim(&rig);
    for (name, (_, s)) in &sim {
        let want = if name.ends_with("-student2") {
            "running"
        } else {
            "stopped"
        };
        assert_eq!(s, want, "{name}");
    }

    // The whole class: at most 2 boots at once per node, and the cap was reached.
    let all = op(&rig, &id, req(OpKind::Power(PowerAction::Start), &[])).await;
    all_done(&all);
    assert!(power_in_sim(&rig).values().all(|(_, s)| s == "running"));
    let stats = rig.sim.stats();
    let peaks = stats["peak_concurrent_starts"]["nodes"]
        .as_object()
        .unwrap();
    let most = peaks.values().filter_map(Value::as_u64).max().unwrap_or(0);
    assert_eq!(most, 2, "start peaks per node {peaks:?}, cap 2");
    for node in peaks.keys() {
        let s = rig
            .q()
            .slot_stats(&shared::jobs::power::start_slot("lab", node))
            .await
            .unwrap();
        assert!(s.high_water <= 2, "{node}: {s:?}");
    }
    let recorded = operation::power_states(&rig.store, &id, None)
        .await
        .unwrap();
    assert_eq!(recorded.len(), 8);
    assert!(recorded.values().all(|s| s == "running"), "{recorded:?}");

    // Two stops in a row both run: a student powers their VM on between them.
    let first = op(&rig, &id, req(OpKind::Power(PowerAction::Stop), &[])).await;
    all_done(&first);
    assert!(power_in_sim(&rig).values().all(|(_, s)| s == "stopped"));
    let (vmid, _) = power_in_sim(&rig)["student-pc-student3"].clone();
    let node = rig
        .sim
        .vms()
        .into_iter()
        .find(|v| v.vmid == vmid)
        .unwrap()
        .node;
    let pve = rig.pve();
    let upid = pve.start_vm(&node, vmid).await.unwrap();
    pve.wait_task(&upid, &Default::default()).await.unwrap();
    // Recorded: stopped (labfleet's last word); live: running (what Proxmox says; its
    // `/cluster/resources` follows within pvestatd's interval).
    let recorded = operation::power_states(&rig.store, &id, None)
        .await
        .unwrap();
    assert_eq!(recorded["student-pc-student3"], "stopped");
    let mut live_running = false;
    for _ in 0..100 {
        let live = operation::power_states(&rig.store, &id, Some(&pve))
            .await
            .unwrap();
        if live["student-pc-student3"] == "running" {
            live_running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(live_running, "status --live never saw the student's start");
    // The same through the binary: `status --live --json` has each VM's power. The live
    // view comes from /cluster/resources, which Proxmox refreshes every few seconds: the
    // stops of a moment ago may still show as running, so ask until it settles.
    let want = |name: &str| {
        if name == "student-pc-student3" {
            "running"
        } else {
            "stopped"
        }
    };
    let mut seen: Vec<(String, String)> = Vec::new();
    for _ in 0..80 {
        let st = Command::new(bin("producer"))
            .arg("--data-dir")
            .arg(rig.data.path())
            .arg("--redis")
            .arg(&rig.redis_url)
            .args(["--json", "status", &id, "--live"])
            .env("LABFLEET_SECRET_KEY", rig.key.to_base64().expose())
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let doc: Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
        seen = doc["vms"]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|x| {
                        (
                            x["name"].as_str().unwrap_or("").to_owned(),
                            x["power"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if seen.len() == 8 && seen.iter().all(|(n, p)| p == want(n)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(seen.len(), 8, "{seen:?}");
    for (name, p) in &seen {
        assert_eq!(p, want(name), "{name}");
    }
    let second = op(
        &rig,
        &id,
        req(OpKind::Power(PowerAction::Stop), &["student3@pve"]),
    )
    .await;
    all_done(&second);
    assert_ne!(first.op, second.op);
    assert_eq!(power_in_sim(&rig)["student-pc-student3"].1, "stopped");

    // A shutdown the guest ignores falls back to a stop after the timeout.
    let (vmid1, _) = power_in_sim(&rig)["student-pc-student1"].clone();
    op(
        &rig,
        &id,
        req(OpKind::Power(PowerAction::Start), &["student1"]),
    )
    .await;
    rig.sim.set_guest_acpi(vmid1, false);
    let mut r = req(OpKind::Power(PowerAction::Shutdown), &["student1"]);
    r.timeout_secs = Some(4);
    all_done(&op(&rig, &id, r).await);
    assert_eq!(power_in_sim(&rig)["student-pc-student1"].1, "stopped");
    let scope = rig.store.deployment(&id).await.unwrap().unwrap().scope();
    let recs = rig.store.power_records(&scope).await.unwrap();
    let note = recs["student1@pve/student-pc"]
        .note
        .clone()
        .unwrap_or_default();
    assert!(note.contains("4 s shutdown timeout"), "{note:?}");
    let tasks = &rig.sim.stats()["tasks"];
    assert!(tasks["qmshutdown"]["error"].as_u64() >= Some(1), "{tasks}");

    // Reset without a baseline: a per-VM error and exit code 6, through the binary.
    let out = Command::new(bin("producer"))
        .arg("--data-dir")
        .arg(rig.data.path())
        .arg("--redis")
        .arg(&rig.redis_url)
        .args(["--json", "reset", &id, "--student", "student4"])
        .env("LABFLEET_SECRET_KEY", rig.key.to_base64().expose())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let vms = doc["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0]["state"], "failed");
    let err = vms[0]["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("has no baseline snapshot 'labfleet-baseline'"),
        "{err}"
    );
    // Console links: only for a role that has VM.Console (from /access/roles); `validate`
    // warns about a role that is not a built-in one with it.
    assert!(
        producer::console::role_grants_console(&pve, "PVEVMAdmin")
            .await
            .unwrap()
    );
    assert!(
        !producer::console::role_grants_console(&pve, "PVEAuditor")
            .await
            .unwrap()
    );
    let dir = tempfile::tempdir().unwrap();
    for f in ["connections.yml", "users.yml"] {
        std::fs::copy(rig.data.path().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::write(
        dir.path().join("deployment_config.yml"),
        format!("{ONE_MACHINE}role: PVEAuditor\n"),
    )
    .unwrap();
    let v = Command::new(bin("producer"))
        .arg("--data-dir")
        .arg(dir.path())
        .arg("validate")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(v.status.code(), Some(0), "{v:?}");
    let err = String::from_utf8_lossy(&v.stderr);
    assert!(
        err.contains("warning: role \"PVEAuditor\"") && err.contains("VM.Console"),
        "{err}"
    );
    // Unknown selectors are usage errors that list what exists.
    let bad = operation::start(&rig.store, &id, &req(OpKind::Reset, &["nobody"])).await;
    let msg = format!("{:#}", bad.err().unwrap().error);
    assert!(msg.contains("--student nobody: no such student"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_brings_config_and_disk_back_to_the_baseline() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut rig = Rig::new(RigOpts {
        users: 2,
        deployment: format!("{ONE_MACHINE}baseline: true\nstart: true\n"),
        ..RigOpts::default()
    })
    .await;
    rig.fleet.spawn();
    rig.fleet.spawn();
    let (id, _plan) = rig.submit().await;
    rig.wait_state(&id, "done", Duration::from_secs(120)).await;
    let vms = power_in_sim(&rig);
    let (v1, s1) = vms["student-pc-student1"].clone();
    let (v2, _) = vms["student-pc-student2"].clone();
    assert_eq!(s1, "running");
    for v in [v1, v2] {
        assert_eq!(rig.sim.snapshots(v), ["labfleet-baseline"]);
    }
    let info = |vmid: u32| {
        rig.lab
            .sim
            .vms()
            .into_iter()
            .find(|v| v.vmid == vmid)
            .unwrap()
    };
    let before = info(v1).config;
    let (disk0, _) = rig.sim.disk_state(v1);

    // The student changes their VM: memory and disk. Student 2 stops theirs.
    let pve = rig.pve();
    pve.update_config_sync(
        &info(v1).node,
        v1,
        &ConfigUpdate::new().set("memory", "4096"),
    )
    .await
    .unwrap();
    assert!(rig.sim.write_disk(v1));
    assert_ne!(info(v1).config.get("memory"), before.get("memory"));
    all_done(
        &op(
            &rig,
            &id,
            req(OpKind::Power(PowerAction::Stop), &["student2"]),
        )
        .await,
    );

    let reset = op(&rig, &id, req(OpKind::Reset, &[])).await;
    all_done(&reset);
    let after = info(v1);
    assert_eq!(after.config.get("memory"), before.get("memory"));
    assert_eq!(
        rig.sim.disk_state(v1),
        (disk0, Some("rolled-back:labfleet-baseline".into()))
    );
    assert_eq!(
        after.status, "running",
        "a running VM runs again after its reset"
    );
    assert_eq!(info(v2).status, "stopped", "a stopped VM stays stopped");
    let tasks = &rig.sim.stats()["tasks"];
    assert!(tasks["qmrollback"]["ok"].as_u64() >= Some(2), "{tasks}");

    // A reset whose workers die during its rollback is finished by another worker: the
    // VM ends rolled back and running, started once.
    assert!(rig.sim.write_disk(v1));
    let starts = tasks_ok(&rig, "qmstart");
    rig.sim.set_faults(
        pve_sim::FaultPlan::from_yaml("slow_task_rate: 1.0\nslow_task_factor: 8\n").unwrap(),
    );
    let mut rep = operation::start(&rig.store, &id, &req(OpKind::Reset, &["student1"]))
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "the rollback under way",
        || async { info(v1).lock.as_deref() == Some("rollback") },
    )
    .await;
    for w in rig.fleet.alive() {
        rig.fleet.kill(&w);
    }
    rig.sim.set_faults(pve_sim::FaultPlan::default());
    rig.fleet.spawn();
    let waited = tokio::time::timeout(
        Duration::from_secs(120),
        operation::wait(&rig.store, &mut rep, Duration::from_millis(100), |_| {}),
    )
    .await;
    assert!(waited.is_ok(), "{}", rep.summary());
    all_done(&rep);
    assert_eq!(info(v1).status, "running");
    assert_eq!(info(v1).lock, None);
    assert_eq!(rig.sim.disk_state(v1).0, disk0);
    assert_eq!(tasks_ok(&rig, "qmstart"), starts + 1, "started once");

    // Teardown removes the VMs and their snapshots.
    producer::deploy::teardown(&rig.store, &id).await.unwrap();
    rig.wait_state(&id, "torn-down", Duration::from_secs(120))
        .await;
    assert!(power_in_sim(&rig).is_empty());
    assert!(rig.sim.snapshots(v1).is_empty() && rig.sim.snapshots(v2).is_empty());
}
