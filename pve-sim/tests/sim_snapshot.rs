//! Snapshots and power over real HTTPS, with Proxmox VE 9's shapes and messages
//! (qemu-server `API2/Qemu.pm`, pve-guest-common `AbstractConfig.pm`): create, list,
//! rollback (config and disk state back, a running VM stopped first), delete, the
//! reserved names and the lock; a shutdown that times out and one forced; the power state
//! in `status/current` and `/cluster/resources`; snapshots gone with a destroyed VM.

mod support;

use serde_json::Value;
use support::*;

async fn task_ok(api: &Api, r: Reply) -> Value {
    assert_eq!(r.status, 200, "{r:?}");
    api.wait_task("pve1", r.data().as_str().unwrap()).await
}

async fn run(api: &Api, m: &str, path: &str, params: &[(&str, &str)]) -> String {
    let r = api.call(m, path, params).await;
    let t = task_ok(api, r).await;
    t["exitstatus"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn snapshot_rollback_delete_follow_proxmox() {
    let (sim, api) = start(0.0).await;
    assert_eq!(api.clone_vm("pve1", 100, &[("newid", "500")]).await, "OK");
    let vm = "/nodes/pve1/qemu/500";
    // Reserved and malformed names.
    let r = api
        .call(
            "POST",
            &format!("{vm}/snapshot"),
            &[("snapname", "current")],
        )
        .await;
    assert_eq!(r.status, 500);
    assert!(
        r.raw
            .contains("unable to use snapshot name 'current' (reserved name)"),
        "{r:?}"
    );
    let r = api
        .call("POST", &format!("{vm}/snapshot"), &[("snapname", "1bad")])
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body["errors"]["snapname"].is_string());

    assert_eq!(
        run(
            &api,
            "POST",
            &format!("{vm}/snapshot"),
            &[("snapname", "base"), ("description", "d")]
        )
        .await,
        "OK"
    );
    let (disk0, _) = sim.disk_state(500);
    let list = api.get(&format!("{vm}/snapshot")).await;
    let names: Vec<&str> = list
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "current"]);
    assert_eq!(list.data()[1]["parent"], "base");
    assert_eq!(list.data()[1]["description"], "You are here!");
    assert_eq!(list.data()[0]["description"], "d");
    // A second snapshot of the same name is the task's error.
    assert_eq!(
        run(
            &api,
            "POST",
            &format!("{vm}/snapshot"),
            &[("snapname", "base")]
        )
        .await,
        "snapshot name 'base' already used"
    );

    // Change config and disk, start, roll back: config and disk as of the snapshot, stopped.
    let r = api
        .call("PUT", &format!("{vm}/config"), &[("memory", "4096")])
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(sim.write_disk(500));
    assert_eq!(
        run(&api, "POST", &format!("{vm}/status/start"), &[]).await,
        "OK"
    );
    let cur = api.get(&format!("{vm}/status/current")).await;
    assert_eq!(cur.data()["status"], "running");
    assert_ne!(sim.disk_state(500).0, disk0);
    assert_eq!(
        run(&api, "POST", &format!("{vm}/snapshot/nope/rollback"), &[]).await,
        "snapshot 'nope' does not exist"
    );
    assert_eq!(
        run(&api, "POST", &format!("{vm}/snapshot/base/rollback"), &[]).await,
        "OK"
    );
    let cfg = api.get(&format!("{vm}/config")).await;
    assert_eq!(cfg.data()["memory"], "2048", "{cfg:?}");
    assert_eq!(cfg.data()["parent"], "base");
    assert!(cfg.data().get("lock").is_none());
    assert_eq!(
        sim.disk_state(500),
        (disk0, Some("rolled-back:base".into()))
    );
    let cur = api.get(&format!("{vm}/status/current")).await;
    assert_eq!(cur.data()["status"], "stopped");
    // With start=1 it runs again afterwards.
    assert_eq!(
        run(
            &api,
            "POST",
            &format!("{vm}/snapshot/base/rollback"),
            &[("start", "1")]
        )
        .await,
        "OK"
    );
    let cur = api.get(&format!("{vm}/status/current")).await;
    assert_eq!(cur.data()["status"], "running");
    let res = api.get("/cluster/resources?type=vm").await;
    let entry = res
        .data()
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vmid"] == 500)
        .cloned();
    assert!(entry.is_some_and(|e| e["status"] == "running" || e["status"] == "stopped"));

    // Delete: gone from the list, `parent` dropped from the config.
    assert_eq!(
        run(&api, "DELETE", &format!("{vm}/snapshot/base"), &[]).await,
        "OK"
    );
    assert!(sim.snapshots(500).is_empty());
    let cfg = api.get(&format!("{vm}/config")).await;
    assert!(cfg.data().get("parent").is_none(), "{cfg:?}");
    assert_eq!(
        run(&api, "DELETE", &format!("{vm}/snapshot/base"), &[]).await,
        "snapshot 'base' does not exist"
    );

    // A destroyed VM's snapshots go with it: a new VM at the VMID has none.
    assert_eq!(
        run(
            &api,
            "POST",
            &format!("{vm}/snapshot"),
            &[("snapname", "again")]
        )
        .await,
        "OK"
    );
    assert_eq!(
        run(&api, "POST", &format!("{vm}/status/stop"), &[]).await,
        "OK"
    );
    let r = api.call("DELETE", vm, &[("purge", "1")]).await;
    task_ok(&api, r).await;
    assert!(sim.snapshots(500).is_empty());
    // A template cannot be snapshotted.
    assert_eq!(
        run(
            &api,
            "POST",
            "/nodes/pve1/qemu/100/snapshot",
            &[("snapname", "tpl")]
        )
        .await,
        "you can't take a snapshot if it's a template"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_shutdown_the_guest_ignores_times_out_or_is_forced() {
    let (sim, api) = start(0.01).await;
    assert_eq!(api.clone_vm("pve1", 100, &[("newid", "501")]).await, "OK");
    let vm = "/nodes/pve1/qemu/501";
    assert_eq!(
        run(&api, "POST", &format!("{vm}/status/start"), &[]).await,
        "OK"
    );
    sim.set_guest_acpi(501, false);
    assert_eq!(
        run(
            &api,
            "POST",
            &format!("{vm}/status/shutdown"),
            &[("timeout", "3")]
        )
        .await,
        "VM quit/powerdown failed - got timeout"
    );
    let cur = api.get(&format!("{vm}/status/current")).await;
    assert_eq!(cur.data()["status"], "running");
    // A guest that answers, but slower than the timeout (shutdown_seconds is 5).
    sim.set_guest_acpi(501, true);
    assert_eq!(
        run(
            &api,
            "POST",
            &format!("{vm}/status/shutdown"),
            &[("timeout", "2")]
        )
        .await,
        "VM quit/powerdown failed - got timeout"
    );
    sim.set_guest_acpi(501, false);
    let exit = run(
        &api,
        "POST",
        &format!("{vm}/status/shutdown"),
        &[("timeout", "3"), ("forceStop", "1")],
    )
    .await;
    assert_eq!(exit, "WARNINGS: 1");
    let cur = api.get(&format!("{vm}/status/current")).await;
    assert_eq!(cur.data()["status"], "stopped");
    // In time: a clean shutdown.
    sim.set_guest_acpi(501, true);
    assert_eq!(
        run(&api, "POST", &format!("{vm}/status/start"), &[]).await,
        "OK"
    );
    assert_eq!(
        run(&api, "POST", &format!("{vm}/status/shutdown"), &[]).await,
        "OK"
    );
    let stats = sim.stats();
    assert_eq!(
        stats["peak_concurrent_starts"]["nodes"]["pve1"], 1,
        "{stats}"
    );
    sim.shutdown().await;
}
