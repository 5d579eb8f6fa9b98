//! Drives pve-sim over real HTTPS (pinned certificate fingerprint) with reqwest: auth,
//! envelope and errors, every endpoint family, races, the cost model and fault injection.

mod support;

use std::time::{Duration, Instant};

use pve_sim::{Fault, RequestFault, Sim, SimConfig, TlsMode};
use serde_json::{Value, json};
use support::*;

#[tokio::test]
async fn auth_tickets_csrf_tokens() {
    let (sim, api) = start(0.0).await;
    let anon = api.with(Auth::None);
    let r = anon.get("/version").await;
    assert_eq!(
        (r.status, r.reason.as_str(), r.raw.as_str()),
        (401, "No ticket", "")
    );
    assert!(r.connection_close);
    let r = anon
        .call(
            "POST",
            "/access/ticket",
            &[("username", "root@pam"), ("password", "wrong")],
        )
        .await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (401, "authentication failure")
    );
    assert_eq!(r.body["data"], Value::Null);
    // Login with realm split off, then use the ticket.
    let r = anon
        .call(
            "POST",
            "/access/ticket",
            &[
                ("username", "root"),
                ("realm", "pam"),
                ("password", "labfleet"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let ticket = r.data()["ticket"].as_str().unwrap().to_string();
    assert!(ticket.starts_with("PVE:root@pam:"), "{ticket}");
    let csrf = r.data()["CSRFPreventionToken"]
        .as_str()
        .unwrap()
        .to_string();
    let tk = api.with(Auth::Ticket {
        ticket: ticket.clone(),
        csrf: csrf.clone(),
    });
    assert_eq!(tk.get("/version").await.status, 200);
    // Non-GET without CSRF.
    let no_csrf = api.with(Auth::Ticket {
        ticket: ticket.clone(),
        csrf: "00000000:bad".into(),
    });
    let r = no_csrf.call("POST", "/pools", &[("poolid", "x")]).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (401, "Permission denied - invalid csrf token")
    );
    // Renewal: the ticket as password.
    let r = anon
        .call(
            "POST",
            "/access/ticket",
            &[("username", "root@pam"), ("password", &ticket)],
        )
        .await;
    assert_eq!(r.status, 200);
    // Expiry after 2 h on the advanceable clock.
    sim.advance_clock(Duration::from_secs(7201));
    let r = tk.get("/version").await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (401, "permission denied - invalid PVE ticket")
    );
    // Tokens: fine, bad secret 401, refused where allowtoken=0.
    assert_eq!(api.get("/version").await.status, 200);
    let bad = api.with(Auth::Token("PVEAPIToken=root@pam!labfleet=nope".into()));
    assert_eq!(bad.get("/version").await.status, 401);
    let r = api
        .call(
            "POST",
            "/access/ticket",
            &[("username", "root@pam"), ("password", "labfleet")],
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.reason,
        "Permission check failed (URI '/access/ticket' not available with API token, need proper ticket.)"
    );
    let r = api
        .call(
            "PUT",
            "/access/password",
            &[("userid", "root@pam"), ("password", "newpassword")],
        )
        .await;
    assert_eq!(r.status, 403);
    sim.shutdown().await;
}

#[tokio::test]
async fn envelope_and_parameter_errors() {
    let (sim, api) = start(0.0).await;
    let r = api.get("/nope").await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (501, "Method 'GET /api2/json/nope' not implemented")
    );
    let r = api.call("POST", "/nodes", &[]).await;
    assert_eq!(r.status, 501);
    let r = api.call("GET", "/cluster/nextid", &[("bogus", "1")]).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (400, "Parameter verification failed.")
    );
    assert_eq!(
        r.body["errors"]["bogus"],
        "property is not defined in schema and the schema does not allow additional properties"
    );
    assert!(r.connection_close);
    let r = api.get("/cluster/nextid").await;
    assert_eq!(r.data(), &json!("103"));
    let r = api.call("GET", "/cluster/nextid", &[("vmid", "100")]).await;
    assert_eq!(r.body["errors"]["vmid"], "VM 100 already exists");
    let r = api.call("GET", "/cluster/nextid", &[("vmid", "5")]).await;
    assert_eq!(
        r.body["errors"]["vmid"],
        "value must have a minimum value of 100"
    );
    let r = api
        .call(
            "POST",
            "/nodes/pve1/qemu/100/clone",
            &[("newid", "200"), ("full", "true")],
        )
        .await;
    assert_eq!(
        r.body["errors"]["full"],
        "type check ('boolean') failed - got 'true'"
    );
    let r = api.call("POST", "/nodes/pve1/qemu/100/clone", &[]).await;
    assert_eq!(
        r.body["errors"]["newid"],
        "property is missing and it is not optional"
    );
    let r = api.get("/nodes/pve1/qemu/999/config").await;
    assert_eq!(r.status, 500);
    assert_eq!(
        r.reason,
        "Configuration file 'nodes/pve1/qemu-server/999.conf' does not exist"
    );
    assert_eq!(
        r.body["message"],
        "Configuration file 'nodes/pve1/qemu-server/999.conf' does not exist\n"
    );
    // VM 101 lives on pve2: asking pve1 is the same "does not exist".
    assert_eq!(api.get("/nodes/pve1/qemu/101/config").await.status, 500);
    let r = api.get("/nodes/nosuch/status").await;
    assert!(
        r.reason.starts_with("hostname lookup 'nosuch' failed"),
        "{}",
        r.reason
    );
    // A JSON body is accepted, and a DELETE with a body is refused.
    let url = format!("{}/api2/json/pools", api.base);
    let resp = api
        .http
        .post(&url)
        .header("Authorization", TOKEN)
        .json(&json!({"poolid": "jsonpool"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let resp = api
        .http
        .delete(&url)
        .header("Authorization", TOKEN)
        .body("poolid=jsonpool")
        .send()
        .await
        .unwrap();
    let r = reply(resp).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (501, "Unexpected content for method 'DELETE'")
    );
    // Version, nodes, cluster status, storage.
    assert_eq!(api.get("/version").await.data()["version"], "9.0.10");
    let nodes = api.get("/nodes").await;
    assert_eq!(nodes.data().as_array().unwrap().len(), 3);
    assert_eq!(
        nodes.data()[0]["ssl_fingerprint"],
        json!(sim.fingerprint().unwrap())
    );
    let cs = api.get("/cluster/status").await;
    assert_eq!(cs.data()[0]["type"], "cluster");
    let st = api.get("/nodes/pve2/storage").await;
    let ids: Vec<&str> = st
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["storage"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["ceph-vm", "local-lvm"]);
    let ns = api.get("/nodes/pve1/status").await;
    assert_eq!(ns.data()["loadavg"].as_array().unwrap().len(), 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn old_server_mode_has_no_message_field() {
    let (sim, api) = start_with(0.0, |c| c.cluster.api.error_message_field = false).await;
    let r = api.get("/nodes/pve1/qemu/999/config").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.raw, r#"{"data":null}"#);
    assert_eq!(
        r.reason,
        "Configuration file 'nodes/pve1/qemu-server/999.conf' does not exist"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn clone_config_start_destroy_lifecycle() {
    // 0.05: the clone (2.5 s) runs 125 ms, long enough to look at it while it runs on a
    // loaded machine.
    let (sim, api) = start(0.05).await;
    api.call("POST", "/pools", &[("poolid", "lab1")]).await;
    let before = sim.snapshot();
    let r = api
        .call(
            "POST",
            "/nodes/pve1/qemu/100/clone",
            &[("newid", "200"), ("name", "web1"), ("pool", "lab1")],
        )
        .await;
    let upid = r.data().as_str().unwrap().to_string();
    let f: Vec<&str> = upid.split(':').collect();
    assert_eq!(f.len(), 9);
    assert_eq!(
        (f[1], f[5], f[6], f[7], f[8]),
        ("pve1", "qmclone", "100", "root@pam!labfleet", "")
    );
    assert!(f[2].len() == 8 && f[4].len() == 8);
    // Right after the POST the task runs and the new VM carries lock: clone, no name yet.
    let st = api.get(&format!("/nodes/pve1/tasks/{upid}/status")).await;
    assert_eq!(st.data()["status"], "running");
    let tmp = api.get("/nodes/pve1/qemu/200/config").await;
    assert_eq!(tmp.data()["lock"], "clone");
    assert!(tmp.data().get("name").is_none());
    let r = api
        .call("PUT", "/nodes/pve1/qemu/200/config", &[("cores", "4")])
        .await;
    assert_eq!((r.status, r.reason.as_str()), (500, "VM is locked (clone)"));
    // Task status only on the owning node.
    let r = api.get(&format!("/nodes/pve2/tasks/{upid}/status")).await;
    assert_eq!(
        (r.status, r.body["errors"]["upid"].as_str()),
        (400, Some("no such task"))
    );
    let done = api.wait_task("pve1", &upid).await;
    assert_eq!(done["exitstatus"], "OK");
    let log = api.get(&format!("/nodes/pve1/tasks/{upid}/log")).await;
    let lines: Vec<&str> = log
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["t"].as_str().unwrap())
        .collect();
    assert_eq!(lines.last(), Some(&"TASK OK"));
    assert!(lines[0].starts_with("create linked clone of drive scsi0 (local-lvm:base-100-disk-0)"));
    let cfg = api.get("/nodes/pve1/qemu/200/config").await;
    let c = cfg.data();
    assert_eq!(c["name"], "web1");
    assert!(c.get("lock").is_none() && c.get("template").is_none());
    let net0 = c["net0"].as_str().unwrap().to_string();
    assert!(
        net0.starts_with("virtio=BC:24:11:") && net0.ends_with(",bridge=vmbr0"),
        "{net0}"
    );
    assert_eq!(sim.pools()[0].vms, vec![200]);
    // POST config with digest: async task; PUT config sync null; wrong digest fails.
    let digest = c["digest"].as_str().unwrap().to_string();
    let mac = &net0["virtio=".len().."virtio=".len() + 17];
    let newnet = format!("virtio={mac},bridge=vmbr0,tag=100");
    let r = api
        .call(
            "POST",
            "/nodes/pve1/qemu/200/config",
            &[("net0", &newnet), ("digest", &digest)],
        )
        .await;
    let cu = r.data().as_str().unwrap().to_string();
    assert!(cu.contains(":qmconfig:200:"));
    assert_eq!(api.wait_task("pve1", &cu).await["exitstatus"], "OK");
    let r = api
        .call(
            "PUT",
            "/nodes/pve1/qemu/200/config",
            &[("cores", "2"), ("digest", &digest)],
        )
        .await;
    assert_eq!(r.reason, "checksum mismatch (file change by other user?)");
    let r = api
        .call(
            "PUT",
            "/nodes/pve1/qemu/200/config",
            &[("description", "hello"), ("delete", "tags")],
        )
        .await;
    assert_eq!((r.status, r.data()), (200, &Value::Null));
    let r = api
        .call(
            "PUT",
            "/nodes/pve1/qemu/200/config",
            &[("cores", "2"), ("delete", "cores")],
        )
        .await;
    assert_eq!(r.status, 400);
    let c = api.get("/nodes/pve1/qemu/200/config").await;
    assert_eq!(c.data()["net0"], json!(newnet));
    // Start: node memory goes up; template cannot start; destroy of a running VM refused.
    let mem_before = api.get("/nodes/pve1/status").await.data()["memory"]["used"]
        .as_u64()
        .unwrap();
    let r = api
        .call("POST", "/nodes/pve1/qemu/200/status/start", &[])
        .await;
    assert_eq!(
        api.wait_task("pve1", r.data().as_str().unwrap()).await["exitstatus"],
        "OK"
    );
    let mem_after = api.get("/nodes/pve1/status").await.data()["memory"]["used"]
        .as_u64()
        .unwrap();
    assert_eq!(mem_after - mem_before, 2048 << 20);
    assert_eq!(
        api.get("/nodes/pve1/qemu/200/status/current").await.data()["status"],
        "running"
    );
    let r = api
        .call("POST", "/nodes/pve1/qemu/100/status/start", &[])
        .await;
    assert_eq!(
        api.wait_task("pve1", r.data().as_str().unwrap()).await["exitstatus"],
        "you can't start a vm if it's a template"
    );
    let r = api.call("DELETE", "/nodes/pve1/qemu/200", &[]).await;
    assert_eq!(r.reason, "VM 200 is running - destroy failed");
    // Template with a linked clone cannot be destroyed.
    let r = api.call("DELETE", "/nodes/pve1/qemu/100", &[]).await;
    assert_eq!(
        api.wait_task("pve1", r.data().as_str().unwrap()).await["exitstatus"],
        "base volume 'local-lvm:base-100-disk-0' is still in use by linked cloned"
    );
    // skiplock: refused for every token, root's included.
    let r = api
        .call("DELETE", "/nodes/pve1/qemu/200", &[("skiplock", "1")])
        .await;
    assert_eq!(
        r.body["errors"]["skiplock"],
        "Only root may use this option."
    );
    let r = api
        .call("POST", "/nodes/pve1/qemu/200/status/stop", &[])
        .await;
    assert_eq!(
        api.wait_task("pve1", r.data().as_str().unwrap()).await["exitstatus"],
        "OK"
    );
    let r = api
        .call("DELETE", "/nodes/pve1/qemu/200", &[("purge", "1")])
        .await;
    assert_eq!(
        api.wait_task("pve1", r.data().as_str().unwrap()).await["exitstatus"],
        "OK"
    );
    assert_eq!(sim.snapshot(), before);
    // Task list: finished tasks by default.
    let tl = api.get("/nodes/pve1/tasks").await;
    assert!(tl.body["total"].as_u64().unwrap() >= 6);
    sim.shutdown().await;
}

#[tokio::test]
async fn clone_checks() {
    let (sim, api) = start(0.0).await;
    let post = |p: &'static [(&'static str, &'static str)], src: &'static str| {
        let api = api.clone();
        async move {
            api.call("POST", &format!("/nodes/pve1/qemu/{src}/clone"), p)
                .await
        }
    };
    let r = post(&[("newid", "300"), ("storage", "ceph-vm")], "100").await;
    assert_eq!(
        r.reason,
        "parameter 'storage' not allowed for linked clones"
    );
    let r = post(&[("newid", "300"), ("target", "pve2")], "100").await;
    assert_eq!(
        r.reason,
        "can't clone VM to node 'pve2' (VM uses local storage)"
    );
    let r = post(&[("newid", "300"), ("pool", "nopool")], "100").await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (
            403,
            "Permission check failed (pool 'nopool' does not exist)"
        )
    );
    let r = post(&[("newid", "110")], "100").await;
    assert_eq!(
        r.reason,
        "unable to create VM 110: config file already exists"
    );
    // Router template on shared storage: linked clone onto another node works.
    let r = post(
        &[("newid", "301"), ("target", "pve3"), ("name", "r1")],
        "120",
    )
    .await;
    let upid = r.data().as_str().unwrap().to_string();
    assert_eq!(api.wait_task("pve1", &upid).await["exitstatus"], "OK");
    assert_eq!(
        api.get("/nodes/pve3/qemu/301/config").await.data()["name"],
        "r1"
    );
    // A normal VM cannot be linked-cloned; its full clone defaults and keeps working.
    let r = api
        .call(
            "POST",
            "/nodes/pve3/qemu/301/clone",
            &[("newid", "302"), ("full", "0")],
        )
        .await;
    assert_eq!(
        r.reason,
        "Linked clone feature is not supported for 'ceph-vm:base-120-disk-0/vm-301-disk-0' (scsi0)"
    );
    let r = api
        .call("POST", "/nodes/pve3/qemu/301/clone", &[("newid", "302")])
        .await;
    let upid = r.data().as_str().unwrap().to_string();
    assert_eq!(api.wait_task("pve3", &upid).await["exitstatus"], "OK");
    // Default name.
    let r = post(&[("newid", "303")], "100").await;
    api.wait_task("pve1", r.data().as_str().unwrap()).await;
    assert_eq!(
        api.get("/nodes/pve1/qemu/303/config").await.data()["name"],
        "Copy-of-VM-linux-template"
    );
    // Resources: type filter and the new VMs.
    let res = api
        .call("GET", "/cluster/resources", &[("type", "vm")])
        .await;
    assert!(
        res.data()
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["type"] == "qemu")
    );
    assert!(
        res.data()
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["vmid"] == 303)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn newid_races() {
    let (sim, api) = start(0.05).await;
    // Different nodes, same newid: the loser's task fails on the pmxcfs rename.
    let a = api.call("POST", "/nodes/pve1/qemu/100/clone", &[("newid", "400")]);
    let b = api.call("POST", "/nodes/pve2/qemu/101/clone", &[("newid", "400")]);
    let (a, b) = tokio::join!(a, b);
    let ea = api.wait_task("pve1", a.data().as_str().unwrap()).await["exitstatus"].clone();
    let eb = api.wait_task("pve2", b.data().as_str().unwrap()).await["exitstatus"].clone();
    let mut exits = [
        ea.as_str().unwrap().to_string(),
        eb.as_str().unwrap().to_string(),
    ];
    exits.sort();
    assert_eq!(exits[0], "OK", "{exits:?}");
    assert!(
        exits[1].starts_with("close (rename) atomic file '/etc/pve/nodes/"),
        "{exits:?}"
    );
    // Same node: the second either fails its POST (the first already wrote the config), or
    // its worker waits 1 s for the newid flock held by the first, or re-checks and fails.
    let a = api.call("POST", "/nodes/pve1/qemu/100/clone", &[("newid", "401")]);
    let b = api.call("POST", "/nodes/pve1/qemu/110/clone", &[("newid", "401")]);
    let (a, b) = tokio::join!(a, b);
    assert_eq!(
        api.wait_task("pve1", a.data().as_str().unwrap()).await["exitstatus"],
        "OK"
    );
    let exists = "unable to create VM 401: config file already exists";
    if b.status == 500 {
        assert_eq!(b.reason, exists);
    } else {
        let e = api.wait_task("pve1", b.data().as_str().unwrap()).await["exitstatus"].clone();
        let e = e.as_str().unwrap();
        assert!(
            e == exists
                || e == "can't lock file '/var/lock/qemu-server/lock-401.conf' - got timeout",
            "{e}"
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn cost_model_full_clones_share_bandwidth() {
    let (sim, api) = start(0.005).await;
    // One full clone of a 10 GiB disk at 250 MB/s ≈ 41 s nominal plus fixed costs.
    let t = Instant::now();
    assert_eq!(
        api.clone_vm("pve1", 100, &[("newid", "500"), ("full", "1")])
            .await,
        "OK"
    );
    let one = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let jobs: Vec<_> = (501..505)
        .map(|id| {
            let api = api.clone();
            tokio::spawn(async move {
                let id = id.to_string();
                api.clone_vm("pve1", 100, &[("newid", &id), ("full", "1")])
                    .await
            })
        })
        .collect();
    for j in jobs {
        assert_eq!(j.await.unwrap(), "OK");
    }
    let four = t.elapsed().as_secs_f64();
    let ratio = four / one;
    assert!(
        (3.0..5.0).contains(&ratio),
        "one {one:.3}s four {four:.3}s ratio {ratio:.2}"
    );
    let stats = api.get("/sim/stats").await;
    let s = &stats.body;
    assert_eq!(s["peak_concurrent_clones"]["storages"]["pve1/local-lvm"], 4);
    assert_eq!(s["peak_concurrent_clones"]["nodes"]["pve1"], 4);
    assert_eq!(s["tasks"]["qmclone"]["ok"], 5);
    assert!(
        s["requests"]["POST /nodes/{node}/qemu/{vmid}/clone"]
            .as_u64()
            .unwrap()
            >= 5
    );
    let lb = s["clone_lower_bound_seconds"].as_f64().unwrap();
    let mk = s["task_makespan_seconds"].as_f64().unwrap();
    assert!(lb > 200.0 && mk >= lb * 0.95, "lb {lb} makespan {mk}");
    assert!(
        s["storage_busy_seconds"]["pve1/local-lvm"]
            .as_f64()
            .unwrap()
            > 200.0
    );
    assert_eq!(sim.stats()["tasks"]["qmclone"]["ok"], 5);
    sim.shutdown().await;
}

#[tokio::test]
async fn twenty_parallel_clones_hit_storage_lock_timeouts() {
    let (sim, api) = start(0.05).await;
    let jobs: Vec<_> = (600..620)
        .map(|id| {
            let api = api.clone();
            tokio::spawn(async move {
                let id = id.to_string();
                api.clone_vm("pve1", 100, &[("newid", &id)]).await
            })
        })
        .collect();
    let mut ok = 0;
    let mut timeouts = 0;
    for j in jobs {
        let e = j.await.unwrap();
        if e == "OK" {
            ok += 1;
        } else {
            assert_eq!(
                e,
                "clone failed: can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout"
            );
            timeouts += 1;
        }
    }
    assert!(ok >= 5 && timeouts >= 5, "ok {ok} timeouts {timeouts}");
    // Failed clones leave nothing behind.
    assert_eq!(sim.vms().len(), 7 + ok);
    sim.shutdown().await;
}

#[tokio::test]
async fn network_pending_and_apply() {
    let (sim, api) = start(0.01).await;
    let r = api
        .call(
            "POST",
            "/nodes/pve2/network",
            &[("iface", "vmbr1"), ("type", "bridge"), ("autostart", "1")],
        )
        .await;
    assert_eq!((r.status, r.data()), (200, &Value::Null));
    let r = api
        .call(
            "POST",
            "/nodes/pve2/network",
            &[("iface", "vmbr1"), ("type", "bridge")],
        )
        .await;
    assert_eq!(r.body["errors"]["iface"], "interface already exists");
    let r = api
        .call(
            "POST",
            "/nodes/pve2/network",
            &[
                ("iface", "vmbr2"),
                ("type", "bridge"),
                ("bridge_ports", "eno1"),
            ],
        )
        .await;
    assert_eq!(
        r.body["errors"]["bridge_ports"],
        "eno1 is already used on interface 'vmbr0'."
    );
    let l = api.get("/nodes/pve2/network").await;
    assert!(l.body["changes"].as_str().unwrap().contains("+iface vmbr1"));
    let vmbr1 = l
        .data()
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["iface"] == "vmbr1")
        .unwrap()
        .clone();
    assert!(vmbr1.get("active").is_none());
    assert_eq!(sim.bridges("pve2"), vec!["vmbr0"]);
    let r = api.call("PUT", "/nodes/pve2/network", &[]).await;
    let upid = r.data().as_str().unwrap().to_string();
    assert!(upid.contains(":srvreload:networking:"));
    assert_eq!(api.wait_task("pve2", &upid).await["exitstatus"], "OK");
    assert_eq!(sim.bridges("pve2"), vec!["vmbr0", "vmbr1"]);
    let one = api.get("/nodes/pve2/network/vmbr1").await;
    assert_eq!(one.data()["active"], 1);
    assert!(
        api.get("/nodes/pve2/network")
            .await
            .body
            .get("changes")
            .is_none()
    );
    // Delete pending, then revert.
    assert_eq!(
        api.call("DELETE", "/nodes/pve2/network/vmbr1", &[])
            .await
            .status,
        200
    );
    assert_eq!(
        api.call("DELETE", "/nodes/pve2/network", &[]).await.status,
        200
    );
    assert_eq!(api.get("/nodes/pve2/network/vmbr1").await.status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn users_acls_pools_and_student_view() {
    let (sim, api) = start(0.0).await;
    let r = api
        .call(
            "POST",
            "/access/users",
            &[("userid", "student1@pve"), ("password", "short")],
        )
        .await;
    assert_eq!(
        r.body["errors"]["password"],
        "value must be at least 8 characters long"
    );
    let r = api
        .call(
            "POST",
            "/access/users",
            &[("userid", "student1@pve"), ("password", "student-pass")],
        )
        .await;
    assert_eq!(r.status, 200);
    let r = api
        .call("POST", "/access/users", &[("userid", "student1@pve")])
        .await;
    assert_eq!(
        r.reason,
        "create user failed: user 'student1@pve' already exists"
    );
    // Pools in both forms.
    assert_eq!(
        api.call("POST", "/pools", &[("poolid", "class1")])
            .await
            .status,
        200
    );
    let r = api.call("POST", "/pools", &[("poolid", "class1")]).await;
    assert_eq!(r.reason, "create pool failed: pool 'class1' already exists");
    api.clone_vm("pve1", 100, &[("newid", "700"), ("name", "s1-vm")])
        .await;
    api.clone_vm("pve1", 100, &[("newid", "701"), ("name", "s2-vm")])
        .await;
    assert_eq!(
        api.call("PUT", "/pools/class1", &[("vms", "700")])
            .await
            .status,
        200
    );
    let r = api
        .call("PUT", "/pools", &[("poolid", "class1"), ("vms", "700")])
        .await;
    assert_eq!(
        r.reason,
        "update pools failed: VM 700 is already a pool member"
    );
    let g = api.call("GET", "/pools", &[("poolid", "class1")]).await;
    assert_eq!(g.data()[0]["members"][0]["vmid"], 700);
    let g = api.get("/pools/class1").await;
    assert_eq!(g.data()["members"][0]["id"], "qemu/700");
    // ACL: student gets PVEVMUser on the pool.
    let r = api
        .call(
            "PUT",
            "/access/acl",
            &[
                ("path", "/nope"),
                ("roles", "PVEVMUser"),
                ("users", "student1@pve"),
            ],
        )
        .await;
    assert_eq!(r.body["errors"]["path"], "invalid ACL path '/nope'");
    let r = api
        .call(
            "PUT",
            "/access/acl",
            &[
                ("path", "/pool/class1"),
                ("roles", "NoSuchRole"),
                ("users", "student1@pve"),
            ],
        )
        .await;
    assert_eq!(
        r.reason,
        "ACL update failed: role 'NoSuchRole' does not exist"
    );
    let r = api
        .call(
            "PUT",
            "/access/acl",
            &[
                ("path", "/pool/class1"),
                ("roles", "PVEVMUser"),
                ("users", "student1@pve"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(sim.acls().len(), 1);
    let student = api.login("student1@pve", "student-pass").await;
    let res = student
        .call("GET", "/cluster/resources", &[("type", "vm")])
        .await;
    let ids: Vec<u64> = res
        .data()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["vmid"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![700]);
    let r = student
        .call("POST", "/nodes/pve1/qemu/100/clone", &[("newid", "702")])
        .await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (403, "Permission check failed (/vms/100, VM.Clone)")
    );
    let r = student
        .call("POST", "/nodes/pve1/qemu/700/status/start", &[])
        .await;
    assert_eq!(r.status, 200);
    let r = student
        .call("PUT", "/nodes/pve1/qemu/700/config", &[("cores", "8")])
        .await;
    assert_eq!(
        r.reason,
        "Permission check failed (/vms/700, VM.Config.CPU)"
    );
    let r = student.get("/cluster/status").await;
    assert_eq!(r.reason, "Permission check failed (/, Sys.Audit)");
    // Student changes own password with confirmation.
    let r = student
        .call(
            "PUT",
            "/access/password",
            &[("userid", "student1@pve"), ("password", "another-pass")],
        )
        .await;
    assert_eq!(
        r.body["errors"]["confirmation-password"],
        "password is required to modify user"
    );
    let r = student
        .call(
            "PUT",
            "/access/password",
            &[
                ("userid", "student1@pve"),
                ("password", "another-pass"),
                ("confirmation-password", "student-pass"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    api.login("student1@pve", "another-pass").await;
    // Non-empty pool cannot be deleted; roles listed.
    let r = api.call("DELETE", "/pools", &[("poolid", "class1")]).await;
    assert_eq!(
        r.reason,
        "delete pool failed: pool 'class1' is not empty (contains VM 700)"
    );
    let roles = api.get("/access/roles").await;
    assert!(
        roles
            .data()
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["roleid"] == "PVEVMUser")
    );
    let users = api.get("/access/users").await;
    assert_eq!(users.data().as_array().unwrap().len(), 2);
    assert_eq!(
        api.call("DELETE", "/access/users/student1@pve", &[])
            .await
            .status,
        200
    );
    assert!(sim.acls().is_empty());
    assert_eq!(sim.users(), vec!["root@pam"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn injected_faults() {
    let (sim, api) = start(0.01).await;
    sim.inject(Fault::Requests {
        kind: RequestFault::Proxy596,
        count: 1,
    });
    let r = api.get("/nodes").await;
    assert_eq!(
        (r.status, r.reason.as_str(), r.raw.as_str()),
        (596, "Connection timed out", "")
    );
    sim.inject(Fault::Requests {
        kind: RequestFault::Internal500,
        count: 1,
    });
    assert_eq!(api.get("/nodes").await.status, 500);
    sim.inject(Fault::Requests {
        kind: RequestFault::ConnectionReset,
        count: 1,
    });
    let err = api
        .http
        .get(format!("{}/api2/json/nodes", api.base))
        .header("Authorization", TOKEN)
        .send()
        .await;
    assert!(err.is_err());
    assert_eq!(api.get("/nodes").await.status, 200);
    // A clone dying half way leaves a locked, unnamed VM.
    sim.inject(Fault::CloneHalfFail { count: 1 });
    assert_eq!(
        api.clone_vm("pve1", 100, &[("newid", "800"), ("name", "x")])
            .await,
        "unexpected status"
    );
    let vm = sim.vms().into_iter().find(|v| v.vmid == 800).unwrap();
    assert_eq!((vm.lock.as_deref(), vm.name), (Some("clone"), None));
    let r = api
        .call("POST", "/nodes/pve1/qemu/800/status/start", &[])
        .await;
    assert_eq!(
        api.wait_task("pve1", r.data().as_str().unwrap()).await["exitstatus"],
        "VM is locked (clone)"
    );
    // Storage lock timeout (shared storage wording).
    sim.inject(Fault::LockTimeouts { count: 1 });
    assert_eq!(
        api.clone_vm("pve1", 120, &[("newid", "801")]).await,
        "clone failed: cfs-lock 'storage-ceph-vm' error: got lock request timeout"
    );
    // Worker start failure.
    sim.inject(Fault::WorkerStartFail { count: 1 });
    let r = api
        .call("POST", "/nodes/pve1/qemu/100/clone", &[("newid", "802")])
        .await;
    assert_eq!(r.reason, "got no worker upid - start worker failed");
    // Node offline: 595 for proxied calls, offline in /nodes.
    sim.inject(Fault::NodeOffline {
        node: "pve3".into(),
        duration: Duration::from_secs(30),
    });
    let r = api.get("/nodes/pve3/qemu").await;
    assert_eq!((r.status, r.raw.as_str()), (595, ""));
    let nodes = api.get("/nodes").await;
    assert_eq!(nodes.data()[2]["status"], "offline");
    sim.set_node_online("pve3", true);
    assert_eq!(api.get("/nodes/pve3/qemu").await.status, 200);
    let faults = api.get("/sim/stats").await.body["faults_injected"].clone();
    assert_eq!(faults["request"], 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn seeded_fault_plan_from_yaml_is_reproducible() {
    let plan = pve_sim::FaultPlan::from_yaml("requests:\n  rate: 0.3\n  weight_596: 1\n").unwrap();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let p = plan.clone();
        let (sim, api) = start_with(0.0, move |c| {
            c.faults = p;
            c.seed = 42;
        })
        .await;
        let mut codes = Vec::new();
        for _ in 0..30 {
            codes.push(api.get("/version").await.status);
        }
        assert!(codes.contains(&596) && codes.contains(&200));
        runs.push(codes);
        sim.shutdown().await;
    }
    assert_eq!(runs[0], runs[1]);
}

#[tokio::test]
async fn zero_cost_mode_and_plain_http() {
    let mut cfg = SimConfig::from_cluster_file(&cluster_file()).unwrap();
    cfg.time_scale = 0.0;
    cfg.tls = TlsMode::Plain;
    let sim = Sim::start(cfg).await.unwrap();
    assert!(sim.base_url().starts_with("http://") && sim.fingerprint().is_none());
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(client_tls("none"))
        .build()
        .unwrap();
    let r = http
        .post(format!(
            "{}/api2/json/nodes/pve1/qemu/100/clone",
            sim.base_url()
        ))
        .header("Authorization", TOKEN)
        .form(&[("newid", "900")])
        .send()
        .await
        .unwrap();
    let upid = r.json::<Value>().await.unwrap()["data"]
        .as_str()
        .unwrap()
        .to_string();
    let st: Value = http
        .get(format!(
            "{}/api2/json/nodes/pve1/tasks/{upid}/status",
            sim.base_url()
        ))
        .header("Authorization", TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            st["data"]["status"].as_str(),
            st["data"]["exitstatus"].as_str()
        ),
        (Some("stopped"), Some("OK"))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn demo_certificate_is_served_with_its_pinned_fingerprint() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/sim");
    let mut cfg = SimConfig::from_cluster_file(&cluster_file()).unwrap();
    cfg.tls = TlsMode::Pem {
        cert: dir.join("demo-cert.pem"),
        key: dir.join("demo-key.pem"),
    };
    let sim = Sim::start(cfg).await.unwrap();
    assert_eq!(
        sim.fingerprint().unwrap(),
        "7A:78:1B:6F:76:0A:C1:8C:58:08:48:4F:C9:BA:87:01:E3:6D:A1:24:5F:36:69:FD:C6:B3:AB:7C:06:62:B6:AF"
    );
    let api = Api::new(&sim);
    assert_eq!(api.get("/version").await.status, 200);
    sim.shutdown().await;
}

/// The task's log lines.
async fn task_log(api: &Api, node: &str, upid: &str) -> Vec<String> {
    let log = api
        .call(
            "GET",
            &format!("/nodes/{node}/tasks/{upid}/log"),
            &[("limit", "500")],
        )
        .await;
    log.data()
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["t"].as_str().unwrap().to_string())
        .collect()
}

/// POST migrate, expect a UPID, wait; returns (UPID, exit status).
async fn migrate(api: &Api, node: &str, vmid: u32, params: &[(&str, &str)]) -> (String, String) {
    let r = api
        .call(
            "POST",
            &format!("/nodes/{node}/qemu/{vmid}/migrate"),
            params,
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let upid = r.data().as_str().unwrap().to_string();
    let exit = api.wait_task(node, &upid).await["exitstatus"]
        .as_str()
        .unwrap()
        .to_string();
    (upid, exit)
}

async fn power(api: &Api, node: &str, vmid: u32, action: &str) {
    let r = api
        .call(
            "POST",
            &format!("/nodes/{node}/qemu/{vmid}/status/{action}"),
            &[],
        )
        .await;
    let upid = r.data().as_str().unwrap().to_string();
    assert_eq!(api.wait_task(node, &upid).await["exitstatus"], "OK");
}

#[tokio::test]
async fn migrate_checks_before_the_task() {
    let (sim, api) = start(0.0).await;
    assert_eq!(
        api.clone_vm("pve1", 100, &[("newid", "501"), ("full", "1")])
            .await,
        "OK"
    );
    let post = |node: &'static str, params: &'static [(&'static str, &'static str)]| {
        let api = api.clone();
        async move {
            api.call("POST", &format!("/nodes/{node}/qemu/501/migrate"), params)
                .await
        }
    };
    let r = post("pve1", &[]).await;
    assert_eq!(
        (r.status, r.body["errors"]["target"].as_str()),
        (400, Some("property is missing and it is not optional"))
    );
    let r = post("pve1", &[("target", "pve1")]).await;
    assert_eq!(
        (r.status, r.body["errors"]["target"].as_str()),
        (400, Some("target is local node."))
    );
    let r = post("pve1", &[("target", "pve9")]).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (500, "no such cluster node 'pve9'")
    );
    let r = post("pve2", &[("target", "pve3")]).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (
            500,
            "Configuration file 'nodes/pve2/qemu-server/501.conf' does not exist"
        )
    );
    // Root-only options: a token (root's too) is not root@pam.
    let r = post("pve1", &[("target", "pve2"), ("force", "1")]).await;
    assert_eq!(
        (r.status, r.body["errors"]["force"].as_str()),
        (400, Some("Only root may use this option."))
    );
    let r = post("pve1", &[("target", "pve2"), ("online", "true")]).await;
    assert_eq!(r.status, 400);
    // A running VM needs online=1.
    power(&api, "pve1", 501, "start").await;
    let r = post("pve1", &[("target", "pve2")]).await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (500, "can't migrate running VM without --online")
    );
    // The route is a proxied call: the node asked must be up.
    sim.set_node_online("pve1", false);
    assert_eq!(post("pve1", &[("target", "pve2")]).await.status, 595);
    sim.shutdown().await;
}

#[tokio::test]
async fn migrate_moves_the_config_and_local_disks_under_lock_migrate() {
    // 0.05: the 10 GiB copies take 41 s nominal, 2 s on the wall.
    let (sim, api) = start(0.05).await;
    assert_eq!(
        api.clone_vm(
            "pve1",
            100,
            &[("newid", "501"), ("full", "1"), ("name", "m1")]
        )
        .await,
        "OK"
    );
    // Stopped VM with a local disk: offline migration copies the disk, no option needed.
    let r = api
        .call(
            "POST",
            "/nodes/pve1/qemu/501/migrate",
            &[("target", "pve2")],
        )
        .await;
    let upid = r.data().as_str().unwrap().to_string();
    let f: Vec<&str> = upid.split(':').collect();
    assert_eq!(
        (f[1], f[5], f[6], f[7]),
        ("pve1", "qmigrate", "501", "root@pam!labfleet")
    );
    // The task writes `lock: migrate` first; while the copy runs the VM stays locked on
    // the source node.
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.get("/nodes/pve1/qemu/501/config").await.data()["lock"] != "migrate" {
        assert!(Instant::now() < deadline, "no lock: migrate");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = api
        .call("PUT", "/nodes/pve1/qemu/501/config", &[("cores", "4")])
        .await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (500, "VM is locked (migrate)")
    );
    let res = api
        .call("GET", "/cluster/resources", &[("type", "vm")])
        .await;
    let entry = res
        .data()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["vmid"] == 501)
        .unwrap()
        .clone();
    assert_eq!(
        (entry["node"].as_str(), entry["lock"].as_str()),
        (Some("pve1"), Some("migrate"))
    );
    assert_eq!(api.wait_task("pve1", &upid).await["exitstatus"], "OK");
    let log = task_log(&api, "pve1", &upid).await;
    assert!(
        log.iter()
            .any(|l| l.ends_with("starting migration of VM 501 to node 'pve2' (10.0.0.2)")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.ends_with("found local disk 'local-lvm:vm-501-disk-0' (attached)"))
    );
    assert!(log.iter().any(|l| l.ends_with("copying local disk images")));
    assert_eq!(log.last().map(String::as_str), Some("TASK OK"));
    let moved = api.get("/nodes/pve2/qemu/501/config").await;
    assert_eq!(moved.status, 200);
    assert_eq!(moved.data()["name"], "m1");
    assert!(moved.data().get("lock").is_none());
    assert!(
        moved.data()["scsi0"]
            .as_str()
            .unwrap()
            .starts_with("local-lvm:vm-501-disk-0")
    );
    let gone = api.get("/nodes/pve1/qemu/501/config").await;
    assert_eq!(
        gone.reason,
        "Configuration file 'nodes/pve1/qemu-server/501.conf' does not exist"
    );
    // Running with a local disk: live migration needs with-local-disks=1, else the task
    // fails like PVE's and the VM stays where it was, unlocked.
    power(&api, "pve2", 501, "start").await;
    let (upid, exit) = migrate(&api, "pve2", 501, &[("target", "pve3"), ("online", "1")]).await;
    assert_eq!(exit, "migration aborted");
    let log = task_log(&api, "pve2", &upid).await;
    assert!(
        log.iter().any(|l| l.ends_with(
            "can't migrate local disk 'local-lvm:vm-501-disk-0': can't live migrate attached local disks without with-local-disks option"
        )),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.ends_with("aborting phase 1 - cleanup resources"))
    );
    assert!(
        log.iter()
            .any(|l| l.contains("ERROR: migration aborted (duration ")
                && l.ends_with(
                    "): Problem found while scanning volumes - can't migrate VM - check log"
                ))
    );
    assert_eq!(
        log.last().map(String::as_str),
        Some("TASK ERROR: migration aborted")
    );
    let c = api.get("/nodes/pve2/qemu/501/config").await;
    assert!(c.data().get("lock").is_none(), "{c:?}");
    let (_, exit) = migrate(
        &api,
        "pve2",
        501,
        &[
            ("target", "pve3"),
            ("online", "1"),
            ("with-local-disks", "1"),
        ],
    )
    .await;
    assert_eq!(exit, "OK");
    let cur = api.get("/nodes/pve3/qemu/501/status/current").await;
    assert_eq!(cur.data()["status"], "running");
    // Shared storage: a linked clone of the router template moves, its disk stays.
    assert_eq!(api.clone_vm("pve1", 120, &[("newid", "502")]).await, "OK");
    let before = api.get("/nodes/pve1/qemu/502/config").await.data()["scsi0"].clone();
    let (upid, exit) = migrate(&api, "pve1", 502, &[("target", "pve2")]).await;
    assert_eq!(exit, "OK");
    assert!(
        !task_log(&api, "pve1", &upid)
            .await
            .iter()
            .any(|l| l.contains("copying"))
    );
    assert_eq!(
        api.get("/nodes/pve2/qemu/502/config").await.data()["scsi0"],
        before
    );
    // A linked clone on local storage cannot leave its base; nor can the base while used.
    assert_eq!(api.clone_vm("pve1", 100, &[("newid", "503")]).await, "OK");
    let (upid, exit) = migrate(&api, "pve1", 503, &[("target", "pve2")]).await;
    assert_eq!(exit, "migration aborted");
    let clone_of = "can't migrate 'local-lvm:base-100-disk-0/vm-503-disk-0' as it's a clone of 'base-100-disk-0'";
    let log = task_log(&api, "pve1", &upid).await;
    assert!(log.iter().any(|l| l.ends_with(clone_of)), "{log:?}");
    let (upid, exit) = migrate(&api, "pve1", 100, &[("target", "pve2")]).await;
    assert_eq!(exit, "migration aborted");
    let base_used =
        "can't migrate local disk 'local-lvm:base-100-disk-0': referenced by linked clone(s)";
    let log = task_log(&api, "pve1", &upid).await;
    assert!(log.iter().any(|l| l.ends_with(base_used)), "{log:?}");
    assert_eq!(
        sim.vms().iter().find(|v| v.vmid == 100).unwrap().node,
        "pve1"
    );
    let stats = sim.stats();
    assert_eq!(stats["tasks"]["qmigrate"]["ok"], 3, "{stats}");
    sim.shutdown().await;
}

#[tokio::test]
async fn lock_property_is_settable_by_root_only_and_blocks_clone_and_migrate() {
    let (sim, api) = start(0.0).await;
    let root = api.login("root@pam", "labfleet").await;
    let r = root
        .call("PUT", "/nodes/pve1/qemu/110/config", &[("lock", "backup")])
        .await;
    assert_eq!((r.status, r.data()), (200, &Value::Null), "{r:?}");
    assert_eq!(
        api.get("/nodes/pve1/qemu/110/config").await.data()["lock"],
        "backup"
    );
    let r = api
        .call("POST", "/nodes/pve1/qemu/110/clone", &[("newid", "600")])
        .await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (500, "VM is locked (backup)")
    );
    let r = api
        .call(
            "POST",
            "/nodes/pve1/qemu/110/migrate",
            &[("target", "pve2")],
        )
        .await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (500, "VM is locked (backup)")
    );
    // A value outside the schema's enum is a parameter error.
    let r = root
        .call("PUT", "/nodes/pve2/qemu/111/config", &[("lock", "bogus")])
        .await;
    assert_eq!(
        (r.status, r.body["errors"]["lock"].as_str()),
        (
            400,
            Some(
                "value 'bogus' does not have a value in the enumeration 'backup, clone, create, migrate, rollback, snapshot, snapshot-delete, suspending, suspended'"
            )
        )
    );
    // Everyone but root@pam (root's token too) is refused, for setting and deleting.
    let r = api
        .call("PUT", "/nodes/pve2/qemu/111/config", &[("lock", "backup")])
        .await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (500, "only root can set 'lock' config")
    );
    let r = api
        .call("POST", "/nodes/pve2/qemu/111/config", &[("lock", "backup")])
        .await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (500, "only root can set 'lock' config")
    );
    let r = api
        .call("PUT", "/nodes/pve1/qemu/110/config", &[("delete", "lock")])
        .await;
    assert_eq!(
        (r.status, r.reason.as_str()),
        (500, "only root can set 'lock' config")
    );
    // Removing it needs skiplock (the VM is locked), which needs root's ticket.
    let r = root
        .call("PUT", "/nodes/pve1/qemu/110/config", &[("delete", "lock")])
        .await;
    assert_eq!(r.reason, "VM is locked (backup)");
    let r = root
        .call(
            "PUT",
            "/nodes/pve1/qemu/110/config",
            &[("delete", "lock"), ("skiplock", "1")],
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        api.get("/nodes/pve1/qemu/110/config")
            .await
            .data()
            .get("lock")
            .is_none()
    );
    sim.shutdown().await;
}
