//! Audit (issue 15): `producer audit` finds what labfleet left that no deployment in Redis
//! owns, and `--fix` removes exactly that through the queue (a real worker process), never
//! an object of a live deployment nor one labfleet did not make. Real parts: a real
//! redis-server, the simulator over HTTPS, the `producer` and `worker` binaries.

use std::collections::BTreeSet;

use pve_sim::Fault;
use serde_json::Value;
use shared::pve::{CloneParams, DestroyParams, Method, WaitOptions};

use crate::reliability::{Rig, RigOpts, producer};

const GONE: &str = "name: gone-lab\nmachines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100, networks: [{bridge: vmbr0}, {bridge: hq}]}\n  - {device_type: router, name: gw, template_node: pve1, template_vmid: 120, networks: [{bridge: hq}]}\n";

fn run_ok(rig: &Rig, args: &[&str]) -> Vec<u8> {
    let out = producer(rig, args, &[]);
    assert!(
        out.status.success(),
        "producer {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Forgets everything Redis knew of a deployment, as a lost or flushed Redis would.
async fn forget(rig: &Rig, id: &str, user: &str) {
    let q = rig.q();
    let mut c = q.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(q.key(&format!("d:{id}*")))
        .query_async(&mut c)
        .await
        .unwrap();
    for k in keys {
        let _: () = redis::cmd("DEL").arg(&k).query_async(&mut c).await.unwrap();
    }
    for (cmd, key, member) in [
        ("ZREM", q.key("deployments"), id.to_owned()),
        ("SREM", q.key(&format!("su:lab:{user}")), id.to_owned()),
        ("HDEL", q.key("creators:lab"), user.to_owned()),
    ] {
        let _: () = redis::cmd(cmd)
            .arg(key)
            .arg(member)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    assert!(rig.store.deployment(id).await.unwrap().is_none());
}

/// Objects labfleet did not make: a pool, a user with an ACL on it, and a VM, all unmarked.
async fn plant_foreign(rig: &Rig) {
    let pve = rig.pve();
    pve.raw_call(
        Method::POST,
        "/pools",
        &[("poolid", "admin-pool"), ("comment", "kept by the admin")],
    )
    .await
    .unwrap();
    pve.raw_call(
        Method::POST,
        "/access/users",
        &[("userid", "teacher@pve"), ("comment", "a teacher")],
    )
    .await
    .unwrap();
    pve.raw_call(
        Method::PUT,
        "/access/acl",
        &[
            ("path", "/pool/admin-pool"),
            ("roles", "PVEVMUser"),
            ("users", "teacher@pve"),
        ],
    )
    .await
    .unwrap();
    let upid = pve
        .clone_vm(
            "pve1",
            100,
            &CloneParams {
                newid: 9100,
                name: Some("admin-vm".into()),
                description: None,
                pool: None,
                target: None,
                full: None,
                storage: None,
            },
        )
        .await
        .unwrap();
    pve.wait_task(&upid, &WaitOptions::default()).await.unwrap();
    // And a disk an admin's destroy left behind (a VMID no labfleet record names).
    let params = CloneParams {
        newid: 9101,
        name: Some("admin-tmp".into()),
        description: None,
        pool: None,
        target: None,
        full: None,
        storage: None,
    };
    let upid = pve.clone_vm("pve1", 100, &params).await.unwrap();
    pve.wait_task(&upid, &WaitOptions::default()).await.unwrap();
    leak_destroy(rig, "pve1", 9101).await;
}

/// Destroys a VM while a storage lock times out: its disk stays ("Could not remove disk").
async fn leak_destroy(rig: &Rig, node: &str, vmid: u32) {
    let pve = rig.pve();
    rig.sim.inject(Fault::LockTimeouts { count: 1 });
    let p = DestroyParams {
        purge: true,
        ..Default::default()
    };
    let upid = pve.destroy_vm(node, vmid, &p).await.unwrap();
    let _ = pve.wait_task(&upid, &WaitOptions::default()).await;
}

async fn leaked(rig: &Rig, node: &str, storage: &str, vmid: u32) -> bool {
    let content = rig
        .pve()
        .storage_content(node, storage, None)
        .await
        .unwrap();
    content.iter().any(|e| e.vmid == Some(vmid as u64))
}

fn objects(doc: &Value, owner: &str) -> BTreeSet<String> {
    doc["found"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| match owner {
            "nobody" => f["owner"]["by"] == "nobody",
            id => f["owner"]["id"] == id,
        })
        .map(|f| {
            format!(
                "{} {}",
                f["object"]["type"].as_str().unwrap(),
                f["object"]["deployment"]
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a1_audit_finds_debris_of_each_kind_and_fix_removes_exactly_it() {
    let mut rig = Rig::new(RigOpts {
        users: 1,
        deployment: GONE.into(),
        ..RigOpts::default()
    })
    .await;
    rig.fleet.spawn();
    // A deployment that ran, then lost its Redis state, and one of whose VMs was destroyed
    // by hand while a storage lock timed out: the disk stayed ("Could not remove disk").
    run_ok(&rig, &["submit", "--wait"]);
    let gone_vms = rig
        .sim
        .vms()
        .into_iter()
        .filter(|v| !v.template)
        .collect::<Vec<_>>();
    assert_eq!(gone_vms.len(), 2);
    let gw = gone_vms
        .iter()
        .find(|v| v.name.as_deref().is_some_and(|n| n.starts_with("gw-")))
        .unwrap();
    leak_destroy(&rig, &gw.node, gw.vmid).await;
    assert!(
        leaked(&rig, "pve1", "ceph-vm", gw.vmid).await,
        "the destroy left the disk of {}",
        gw.vmid
    );
    forget(&rig, "gone-lab@lab", "student1@pve").await;

    // A live deployment beside it, and objects labfleet did not make.
    std::fs::write(
        rig.data.path().join("deployment_config.yml"),
        GONE.replace("gone-lab", "live-lab"),
    )
    .unwrap();
    std::fs::write(
        rig.data.path().join("users.yml"),
        "users:\n  - \"student2@pve\"\n",
    )
    .unwrap();
    run_ok(&rig, &["submit", "--wait"]);
    plant_foreign(&rig).await;
    let live_before = (
        rig.sim
            .vms()
            .iter()
            .filter(|v| v.pool.as_deref() == Some("live-lab-student2"))
            .count(),
        rig.sim
            .acls()
            .iter()
            .filter(|a| a.ugid == "student2@pve")
            .count(),
    );
    assert_eq!(live_before, (2, 1), "two VMs, one role on their pool");

    // The audit: exit 8, each kind of debris named with its deployment, owned by nobody.
    let out = producer(&rig, &["audit"], &["--json"]);
    assert_eq!(
        out.status.code(),
        Some(8),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gone = "\"gone-lab@lab\"";
    let want: BTreeSet<String> = ["acl", "bridge", "pool", "user", "vm", "volume"]
        .iter()
        .map(|k| format!("{k} {gone}"))
        .collect();
    assert_eq!(objects(&doc, "nobody"), want, "{doc:#}");
    let live: BTreeSet<String> = ["acl", "bridge", "pool", "user", "vm"]
        .iter()
        .map(|k| format!("{k} \"live-lab@lab\""))
        .collect();
    assert_eq!(objects(&doc, "live-lab@lab"), live, "{doc:#}");
    let not_ours: Vec<&Value> = doc["found"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["owner"]["by"] == "not-ours")
        .collect();
    assert_eq!(not_ours.len(), 1, "{doc:#}");
    assert_eq!(not_ours[0]["object"]["vmid"], 9101);
    let text = String::from_utf8_lossy(&producer(&rig, &["audit"], &[]).stdout).into_owned();
    eprintln!("a1: producer audit:\n{text}");
    assert!(
        text.contains("NOBODY") && text.contains("tombstones kept"),
        "{text}"
    );
    assert!(
        !text.contains("admin-pool") && !text.contains("teacher@pve") && !text.contains("vm 9100"),
        "{text}"
    );

    // --fix removes exactly those, through the queue, and says so; then nothing is unowned.
    let out = producer(&rig, &["audit", "--fix", "--timeout", "120"], &["--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let removed: BTreeSet<String> = doc["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            format!(
                "{} \"{}\"",
                d["type"].as_str().unwrap(),
                d["deployment"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(removed, want, "{doc:#}");
    assert_eq!(doc["unowned"], 0);
    assert_eq!(
        objects(&doc, "live-lab@lab"),
        live,
        "the live deployment keeps everything"
    );

    // On the cluster: the gone deployment's objects are gone; the rest is as it was.
    let vms = rig.sim.vms();
    assert!(
        !vms.iter()
            .any(|v| v.pool.as_deref() == Some("gone-lab-student1"))
    );
    assert!(
        !vms.iter()
            .any(|v| v.vmid == gone_vms[0].vmid || v.vmid == gone_vms[1].vmid)
    );
    assert!(vms.iter().any(|v| v.vmid == 9100), "the admin's VM stays");
    let pools: Vec<String> = rig.sim.pools().into_iter().map(|p| p.poolid).collect();
    assert!(
        pools.contains(&"admin-pool".to_owned()) && pools.contains(&"live-lab-student2".to_owned())
    );
    assert!(!pools.contains(&"gone-lab-student1".to_owned()));
    let users = rig.sim.users();
    assert!(
        users.contains(&"teacher@pve".to_owned()) && users.contains(&"student2@pve".to_owned())
    );
    assert!(!users.contains(&"student1@pve".to_owned()));
    let acls = rig.sim.acls();
    assert!(
        acls.iter()
            .any(|a| a.ugid == "teacher@pve" && a.path == "/pool/admin-pool")
    );
    assert!(!acls.iter().any(|a| a.ugid == "student1@pve"));
    let live_after = (
        vms.iter()
            .filter(|v| v.pool.as_deref() == Some("live-lab-student2"))
            .count(),
        acls.iter().filter(|a| a.ugid == "student2@pve").count(),
    );
    assert_eq!(live_after, live_before);
    assert!(
        !leaked(&rig, "pve1", "ceph-vm", gw.vmid).await,
        "the gone deployment's disk is freed"
    );
    assert!(
        leaked(&rig, "pve1", "local-lvm", 9101).await,
        "the admin's leaked disk stays"
    );
    let bridges: usize = ["pve1", "pve2", "pve3"]
        .iter()
        .map(|n| rig.sim.bridges(n).len())
        .sum();
    assert_eq!(
        bridges,
        3 + 1,
        "vmbr0 on each node and live-lab's private bridge"
    );
    // A second audit finds nothing to remove.
    let out = producer(&rig, &["audit"], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
