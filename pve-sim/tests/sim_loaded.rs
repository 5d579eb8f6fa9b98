//! pve-sim failing like a loaded real cluster, over real HTTPS: replies lost after the call
//! ran, API workers with the proxy timeout, destroys that leave volumes behind and the
//! storage content API that frees them, the bridge check at start, the network apply
//! order, the `user.cfg` lock and the clone rollback, the task list, and the smaller
//! points (RRD lag, token tasks, pools, task logs, UPID case).

mod support;

use std::time::{Duration, Instant};

use pve_sim::{Fault, RequestFault};
use serde_json::Value;
use support::*;

/// Clones `src` on pve1 into `newid` and waits for the task; returns the UPID.
async fn cloned(api: &Api, src: u32, newid: u32, extra: &[(&str, &str)]) -> String {
    let id = newid.to_string();
    let mut params = vec![("newid", id.as_str())];
    params.extend_from_slice(extra);
    let r = api
        .call("POST", &format!("/nodes/pve1/qemu/{src}/clone"), &params)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let upid = r.data().as_str().unwrap().to_string();
    let st = api.wait_task("pve1", &upid).await;
    assert_eq!(st["exitstatus"], "OK", "{st}");
    upid
}

async fn upid_of(api: &Api, method: &str, path: &str, params: &[(&str, &str)]) -> String {
    let r = api.call(method, path, params).await;
    assert_eq!(r.status, 200, "{r:?}");
    r.data().as_str().unwrap().to_string()
}

async fn log_lines(api: &Api, node: &str, upid: &str) -> Vec<String> {
    let r = api
        .get(&format!("/nodes/{node}/tasks/{upid}/log?limit=0"))
        .await;
    r.data()
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["t"].as_str().unwrap().to_string())
        .collect()
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn lost_replies_after_the_call_ran() {
    // Proxy timeout 30 s x 0.01 = 0.3 s.
    let (sim, api) = start(0.01).await;
    sim.inject(Fault::Requests {
        kind: RequestFault::Proxy596AfterCommit,
        count: 1,
    });
    let t = Instant::now();
    let r = api
        .call(
            "POST",
            "/nodes/pve1/qemu/100/clone",
            &[("newid", "300"), ("name", "lost")],
        )
        .await;
    assert_eq!(
        (r.status, r.reason.as_str(), r.raw.as_str()),
        (596, "Connection timed out", "")
    );
    assert!(
        t.elapsed() >= Duration::from_millis(290),
        "{:?}",
        t.elapsed()
    );
    // The clone was started all the same: its task is in the node's list (the task's id is
    // the source VMID) and the VM comes into being.
    let r = api
        .get("/nodes/pve1/tasks?source=all&typefilter=qmclone&vmid=100")
        .await;
    assert_eq!(r.body["total"], 1, "{r:?}");
    let upid = r.data()[0]["upid"].as_str().unwrap().to_string();
    assert_eq!(api.wait_task("pve1", &upid).await["exitstatus"], "OK");
    assert!(
        log_lines(&api, "pve1", &upid)
            .await
            .iter()
            .any(|l| l.contains("vm-300-disk-0")),
        "the clone's log names the new VMID's volume"
    );
    assert!(sim.vms().iter().any(|v| v.vmid == 300));

    // A reset after commit: the connection drops, the change is made.
    sim.inject(Fault::Requests {
        kind: RequestFault::ResetAfterCommit,
        count: 1,
    });
    let url = format!("{}/api2/json/nodes/pve1/qemu/300/config", api.base);
    let err = api
        .http
        .put(&url)
        .header("Authorization", TOKEN)
        .form(&[("cores", "3")])
        .send()
        .await;
    assert!(err.is_err(), "{err:?}");
    let r = api.get("/nodes/pve1/qemu/300/config").await;
    assert_eq!(r.data()["cores"], 3);
    let faults = &sim.stats()["faults_injected"];
    assert_eq!(faults["request_596_after_commit"], 1, "{faults}");
    assert_eq!(faults["request_reset_after_commit"], 1, "{faults}");
    assert_eq!(faults["request"], 2, "{faults}");
    sim.shutdown().await;
}

#[tokio::test]
async fn protected_calls_queue_for_api_workers_and_time_out_at_the_proxy() {
    // One worker per node; the proxy gives up after 1 s (x 0.05 = 50 ms).
    let (sim, api) = start_with(0.05, |c| {
        c.cluster.api.workers_per_node = 1;
        c.cluster.api.proxy_timeout_seconds = 1.0;
    })
    .await;
    cloned(&api, 100, 200, &[]).await;
    cloned(&api, 100, 201, &[]).await;
    // The start holds VM 200's config lock for 3 s: a PUT config on 200 holds the only
    // worker while it waits for it, the PUT on 201 queues behind it.
    let start = upid_of(&api, "POST", "/nodes/pve1/qemu/200/status/start", &[]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (a, b) = tokio::join!(
        api.call("PUT", "/nodes/pve1/qemu/200/config", &[("cores", "5")]),
        async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            api.call("PUT", "/nodes/pve1/qemu/201/config", &[("cores", "6")])
                .await
        }
    );
    assert_eq!((a.status, a.reason.as_str()), (596, "Connection timed out"));
    assert_eq!((b.status, b.reason.as_str()), (596, "Connection timed out"));
    // Reads are not protected: served at once.
    assert_eq!(api.get("/nodes/pve1/qemu/201/config").await.status, 200);
    // Both calls still ran once they got the lock and the worker.
    api.wait_task("pve1", &start).await;
    wait_for("both config changes", async || {
        let a = api.get("/nodes/pve1/qemu/200/config").await;
        let b = api.get("/nodes/pve1/qemu/201/config").await;
        a.data()["cores"] == 5 && b.data()["cores"] == 6
    })
    .await;
    let w = &sim.stats()["api_workers"];
    assert!(w["proxy_timeouts"].as_u64().unwrap() >= 2, "{w}");
    assert!(w["queued_calls"]["pve1"].as_u64().unwrap() >= 1, "{w}");
    assert!(w["max_wait_seconds"].as_f64().unwrap() > 0.5, "{w}");
    assert!(
        sim.stats()["faults_injected"]["api_proxy_timeout"]
            .as_u64()
            .unwrap()
            >= 2
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn destroy_leaks_a_volume_it_cannot_lock_and_content_frees_it() {
    let (sim, api) = start(0.01).await;
    cloned(&api, 100, 200, &[("full", "1")]).await;
    let before = api
        .get("/nodes/pve1/storage/local-lvm/content?vmid=200")
        .await;
    let vols: Vec<&str> = before
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["volid"].as_str().unwrap())
        .collect();
    assert_eq!(vols, ["local-lvm:vm-200-disk-0"], "{before:?}");
    // The disk's storage lock times out: the disk stays, the task warns.
    sim.inject(Fault::LockTimeouts { count: 1 });
    let upid = upid_of(&api, "DELETE", "/nodes/pve1/qemu/200", &[]).await;
    assert_eq!(
        api.wait_task("pve1", &upid).await["exitstatus"],
        "WARNINGS: 1"
    );
    let log = log_lines(&api, "pve1", &upid).await;
    assert!(
        log.iter().any(|l| l.starts_with(
            "Could not remove disk 'local-lvm:vm-200-disk-0', check manually: can't lock file"
        )),
        "{log:?}"
    );
    assert!(sim.vms().iter().all(|v| v.vmid != 200));
    let after = api
        .get("/nodes/pve1/storage/local-lvm/content?vmid=200")
        .await;
    assert_eq!(after.data().as_array().unwrap().len(), 1, "{after:?}");
    assert_eq!(after.data()[0]["volid"], "local-lvm:vm-200-disk-0");
    assert_eq!(after.data()[0]["vmid"], 200);
    // Not on another node's local storage.
    let other = api
        .get("/nodes/pve2/storage/local-lvm/content?vmid=200")
        .await;
    assert_eq!(other.data().as_array().unwrap().len(), 0);
    let info = api
        .get("/nodes/pve1/storage/local-lvm/content/local-lvm:vm-200-disk-0")
        .await;
    assert_eq!(info.status, 200, "{info:?}");
    assert_eq!(info.data()["path"], "/dev/pve/vm-200-disk-0");
    assert_eq!(info.data()["format"], "raw");
    // Freed with DELETE, in an imgdel task.
    let del = upid_of(
        &api,
        "DELETE",
        "/nodes/pve1/storage/local-lvm/content/local-lvm:vm-200-disk-0",
        &[],
    )
    .await;
    assert!(del.contains(":imgdel:200@local-lvm:"), "{del}");
    assert_eq!(api.wait_task("pve1", &del).await["exitstatus"], "OK");
    let gone = api
        .get("/nodes/pve1/storage/local-lvm/content?vmid=200")
        .await;
    assert_eq!(gone.data().as_array().unwrap().len(), 0);
    let again = upid_of(
        &api,
        "DELETE",
        "/nodes/pve1/storage/local-lvm/content/vm-200-disk-0",
        &[],
    )
    .await;
    let st = api.wait_task("pve1", &again).await;
    assert_eq!(
        st["exitstatus"],
        "volume 'local-lvm:vm-200-disk-0' does not exist"
    );
    let r = api
        .get("/nodes/pve1/storage/local-lvm/content/ceph-vm:vm-1-disk-0")
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(sim.stats()["faults_injected"]["destroy_leaked_volume"], 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn start_needs_the_bridge_and_apply_renames_first() {
    let (sim, api) = start(0.02).await;
    cloned(&api, 100, 200, &[]).await;
    let r = api
        .call(
            "PUT",
            "/nodes/pve1/qemu/200/config",
            &[("net1", "virtio,bridge=vmbr9")],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let upid = upid_of(&api, "POST", "/nodes/pve1/qemu/200/status/start", &[]).await;
    assert_eq!(
        api.wait_task("pve1", &upid).await["exitstatus"],
        "bridge 'vmbr9' does not exist"
    );
    let r = api
        .call(
            "POST",
            "/nodes/pve1/network",
            &[("iface", "vmbr9"), ("type", "bridge"), ("autostart", "1")],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    // Pending only: the start still fails.
    let upid = upid_of(&api, "POST", "/nodes/pve1/qemu/200/status/start", &[]).await;
    assert_ne!(api.wait_task("pve1", &upid).await["exitstatus"], "OK");
    let reload = upid_of(&api, "PUT", "/nodes/pve1/network", &[]).await;
    // At once: the file is renamed (no pending changes), the bridge is not up yet.
    let r = api.get("/nodes/pve1/network").await;
    assert!(r.body.get("changes").is_none(), "{r:?}");
    let vmbr9 = r
        .data()
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["iface"] == "vmbr9")
        .cloned()
        .unwrap();
    assert!(vmbr9.get("active").is_none(), "{vmbr9}");
    assert!(!sim.bridges("pve1").contains(&"vmbr9".to_string()));
    assert_eq!(api.wait_task("pve1", &reload).await["exitstatus"], "OK");
    assert!(sim.bridges("pve1").contains(&"vmbr9".to_string()));
    let upid = upid_of(&api, "POST", "/nodes/pve1/qemu/200/status/start", &[]).await;
    assert_eq!(api.wait_task("pve1", &upid).await["exitstatus"], "OK");
    sim.shutdown().await;
}

#[tokio::test]
async fn user_cfg_lock_timeouts_and_the_clone_rollback() {
    let (sim, api) = start(0.01).await;
    let timeout = "cfs-lock 'file-user_cfg' error: got lock request timeout";
    sim.inject(Fault::UserCfgLockTimeouts { count: 1 });
    let r = api.call("POST", "/pools", &[("poolid", "lab1")]).await;
    assert_eq!(
        (r.status, r.reason.clone()),
        (500, format!("create pool failed: {timeout}"))
    );
    assert_eq!(
        api.call("POST", "/pools", &[("poolid", "lab1")])
            .await
            .status,
        200
    );
    sim.inject(Fault::UserCfgLockTimeouts { count: 1 });
    let r = api
        .call(
            "POST",
            "/nodes/pve1/qemu/100/clone",
            &[("newid", "201"), ("pool", "lab1")],
        )
        .await;
    let upid = r.data().as_str().unwrap().to_string();
    let st = api.wait_task("pve1", &upid).await;
    assert_eq!(
        st["exitstatus"].as_str().unwrap(),
        format!("clone failed: can't add VM 201 to pool 'lab1': {timeout}")
    );
    assert!(sim.vms().iter().all(|v| v.vmid != 201), "rolled back");
    // ACLs and users take the same lock.
    sim.inject(Fault::UserCfgLockTimeouts { count: 2 });
    let r = api
        .call(
            "POST",
            "/access/users",
            &[("userid", "s1@pve"), ("password", "password1")],
        )
        .await;
    assert_eq!(r.reason, format!("create user failed: {timeout}"));
    let r = api
        .call(
            "PUT",
            "/access/acl",
            &[
                ("path", "/pool/lab1"),
                ("roles", "PVEVMUser"),
                ("users", "root@pam"),
            ],
        )
        .await;
    assert_eq!(r.reason, format!("ACL update failed: {timeout}"));
    assert_eq!(sim.stats()["faults_injected"]["user_cfg_lock_timeout"], 4);
    sim.shutdown().await;
}

#[tokio::test]
async fn node_task_list_as_proxmox_serves_it() {
    let (sim, api) = start(0.05).await;
    let done = cloned(&api, 100, 200, &[]).await;
    let running = upid_of(
        &api,
        "POST",
        "/nodes/pve1/qemu/100/clone",
        &[("newid", "201")],
    )
    .await;
    let active = api.get("/nodes/pve1/tasks?source=active").await;
    let rows = active.data().as_array().unwrap();
    let row = rows.iter().find(|t| t["upid"] == running.as_str()).unwrap();
    assert_eq!(row["status"], "RUNNING");
    assert!(row.get("endtime").is_none());
    // A token's task: the user is the token's user, the token id a field of its own.
    assert_eq!(
        (row["user"].as_str(), row["tokenid"].as_str()),
        (Some("root@pam"), Some("labfleet"))
    );
    // The archive has the ended clone, not the running one.
    let archive = api.get("/nodes/pve1/tasks").await;
    let ups: Vec<&str> = archive
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["upid"].as_str().unwrap())
        .collect();
    assert!(
        ups.contains(&done.as_str()) && !ups.contains(&running.as_str()),
        "{ups:?}"
    );
    api.wait_task("pve1", &running).await;
    // Filters: type, vmid (the task's id), status, user; start and limit with total.
    let r = api
        .get("/nodes/pve1/tasks?source=all&typefilter=qmclone&vmid=100&limit=1")
        .await;
    assert_eq!(r.body["total"], 2);
    assert_eq!(r.data().as_array().unwrap().len(), 1);
    let r2 = api
        .get("/nodes/pve1/tasks?source=all&typefilter=qmclone&vmid=100&limit=1&start=1")
        .await;
    assert_ne!(r.data()[0]["upid"], r2.data()[0]["upid"]);
    let r = api
        .get("/nodes/pve1/tasks?source=all&typefilter=qmclone&vmid=101")
        .await;
    assert_eq!(r.body["total"], 0);
    let r = api
        .get("/nodes/pve1/tasks?source=all&statusfilter=error")
        .await;
    assert_eq!(r.body["total"], 0);
    let r = api
        .get("/nodes/pve1/tasks?source=all&statusfilter=ok&userfilter=ROOT")
        .await;
    assert_eq!(r.body["total"], 2);
    let r = api
        .get("/nodes/pve1/tasks?source=all&userfilter=nobody")
        .await;
    assert_eq!(r.body["total"], 0);
    let r = api.get("/nodes/pve1/tasks?source=sideways").await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.body["errors"]["source"],
        "value 'sideways' does not have a value in the enumeration 'archive, active, all'"
    );
    // Status of a token's task.
    let st = api.get(&format!("/nodes/pve1/tasks/{done}/status")).await;
    assert_eq!(st.data()["user"], "root@pam");
    assert_eq!(st.data()["tokenid"], "labfleet");
    sim.shutdown().await;
}

#[tokio::test]
async fn smaller_points() {
    let (sim, api) = start(0.01).await;
    // RRD lag: a new clone has no name and status unknown until pvestatd's next round
    // (10 s x 0.01 = 0.1 s); lock and node are current.
    cloned(&api, 100, 200, &[("name", "fresh")]).await;
    let entry = |r: &Reply| -> Value {
        r.data()
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["vmid"] == 200)
            .cloned()
            .unwrap()
    };
    let e = entry(&api.get("/cluster/resources?type=vm").await);
    assert_eq!(e["node"], "pve1");
    if e.get("name").is_none() {
        assert_eq!(e["status"], "unknown", "{e}");
    }
    wait_for("the RRD sample", async || {
        let e = entry(&api.get("/cluster/resources?type=vm").await);
        e["name"] == "fresh" && e["status"] == "stopped"
    })
    .await;
    // GET /pools/{id} includes poolid.
    api.call("POST", "/pools", &[("poolid", "lab1")]).await;
    let r = api.get("/pools/lab1").await;
    assert_eq!(r.data()["poolid"], "lab1");
    // The log of an unknown task, limit=0, and UPID hex in lower case (parsed, but names
    // no task file).
    let unknown = "UPID:pve1:00001234:00005678:66DC5987:qmstart:200:root@pam:";
    let r = api.get(&format!("/nodes/pve1/tasks/{unknown}/log")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.data()[0]["t"],
        "unable to open file - No such file or directory"
    );
    let upid = cloned(&api, 100, 201, &[]).await;
    let all = api
        .get(&format!("/nodes/pve1/tasks/{upid}/log?limit=0"))
        .await;
    let n = all.body["total"].as_u64().unwrap();
    assert!(n >= 3);
    assert_eq!(all.data().as_array().unwrap().len() as u64, n);
    let lower = {
        let f: Vec<String> = upid.split(':').map(String::from).collect();
        format!(
            "UPID:{}:{}:{}:{}:{}:{}:{}:",
            f[1],
            f[2].to_lowercase(),
            f[3].to_lowercase(),
            f[4].to_lowercase(),
            f[5],
            f[6],
            f[7]
        )
    };
    let r = api.get(&format!("/nodes/pve1/tasks/{lower}/status")).await;
    assert_eq!(
        (r.status, r.body["errors"]["upid"].as_str()),
        (400, Some("no such task"))
    );
    let r = api
        .get("/nodes/pve1/tasks/UPID:pve1:xyz:1:2:x:1:u:/status")
        .await;
    assert_eq!(r.body["errors"]["upid"], "unable to parse worker upid");
    sim.shutdown().await;
}
