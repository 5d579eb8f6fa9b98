//! Capacity (issue 15): `plan` shows what a class commits per node and storage, and `submit`
//! refuses a class that does not fit (exit 7) without writing anything to Redis or Proxmox.
//! Real parts: a real redis-server, the simulator over HTTPS, the `producer` binary.

use serde_json::Value;

use crate::reliability::{Rig, RigOpts, producer};

/// Everything a refused submit must leave as it was: Redis's key count and the cluster's
/// guests, users and pools.
async fn snapshot(rig: &Rig) -> (u64, usize, usize, usize) {
    let mut c = rig.q().connection();
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    let pve = rig.pve();
    (
        keys,
        pve.cluster_vms().await.unwrap().len(),
        pve.users().await.unwrap().len(),
        pve.pools().await.unwrap().len(),
    )
}

fn small_nodes(sc: &mut pve_sim::SimConfig) {
    // 4 GiB each: with memory_overcommit 1.5 a node may hold 6 GiB of VMs, two students of
    // 2.5 GiB (a 2 GiB linux VM and a 512 MiB router).
    for n in &mut sc.cluster.nodes {
        n.memory_gib = 4;
        n.base_memory_used_gib = 0.5;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c1_a_class_that_does_not_fit_is_refused_and_nothing_is_made() {
    let rig = Rig::new(RigOpts {
        users: 8,
        sim_setup: Some(small_nodes),
        ..RigOpts::default()
    })
    .await;
    let before = snapshot(&rig).await;

    // `plan` shows the figures and marks the nodes over their limit (and still exits 0).
    let out = producer(&rig, &["plan"], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("c1: producer plan:\n{text}");
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("OVER (submit refuses)"), "{text}");
    assert!(text.contains("memory_overcommit 1.5"), "{text}");
    let out = producer(&rig, &["plan"], &["--json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = doc["capacity"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let placed: u64 = nodes.iter().map(|n| n["students"].as_u64().unwrap()).sum();
    assert_eq!(placed, 8);
    let over: Vec<&Value> = nodes.iter().filter(|n| n["over"] == true).collect();
    assert!(!over.is_empty(), "{nodes:?}");
    for n in &over {
        assert_eq!(n["total_mem"].as_u64().unwrap(), 4 << 30);
        assert_eq!(n["limit_mem"].as_u64().unwrap(), 6 << 30);
        assert!(n["adds_mem"].as_u64().unwrap() >= 3 * (2560 << 20), "{n}");
        // The templates on the node do not count: they never run.
        assert_eq!(n["existing_mem"].as_u64().unwrap(), 0, "{n}");
    }

    // `submit` refuses: exit 7, the node, its figures and the fix; nothing written anywhere.
    let out = producer(&rig, &["submit"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("c1: producer submit:\n{err}");
    assert_eq!(out.status.code(), Some(7), "{err}");
    let node = over[0]["node"].as_str().unwrap();
    assert!(
        err.contains(&format!("node {node} would commit 7.5 GiB")),
        "{err}"
    );
    assert!(
        err.contains("may hold 6.0 GiB (4.0 GiB x memory_overcommit 1.5)"),
        "{err}"
    );
    assert!(
        err.contains(
            "fewer students, another cluster, or a higher memory_overcommit for cluster lab"
        ),
        "{err}"
    );
    assert!(err.contains("nothing was submitted"), "{err}");
    assert_eq!(
        snapshot(&rig).await,
        before,
        "a refused submit wrote nothing"
    );
    assert!(rig.store.deployments().await.unwrap().is_empty());

    // Six students fit (two per node); the same class with a higher ratio fits too.
    let conn = rig.data.path().join("connections.yml");
    let yaml = std::fs::read_to_string(&conn).unwrap();
    std::fs::write(&conn, format!("{yaml}  memory_overcommit: 2.0\n")).unwrap();
    let out = producer(&rig, &["submit"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rig.store.deployments().await.unwrap().len(), 1);
}

fn small_local_storage(sc: &mut pve_sim::SimConfig) {
    // local-lvm holds the linux (10 GiB) and windows (64 GiB) templates on every node: with
    // 100 GiB, 26 GiB stay free there, two full clones of the 10 GiB linux template.
    for s in &mut sc.cluster.storages {
        if s.id == "local-lvm" {
            s.capacity_gib = 100;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c2_full_clones_that_fill_a_storage_are_refused() {
    let rig = Rig::new(RigOpts {
        users: 8,
        deployment: "name: full-lab\nmachines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100, clone: full, networks: [{bridge: vmbr0}]}\n".into(),
        sim_setup: Some(small_local_storage),
        ..RigOpts::default()
    })
    .await;
    let before = snapshot(&rig).await;
    let out = producer(&rig, &["plan"], &["--json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let storages = doc["capacity"]["storages"].as_array().unwrap();
    assert!(
        storages
            .iter()
            .any(|s| s["over"] == true && s["storage"] == "local-lvm"),
        "{storages:?}"
    );
    for s in storages {
        // 100 GiB less the templates' 10 GiB, 64 GiB and 4 MiB (the windows EFI disk).
        assert_eq!(s["free"].as_u64().unwrap(), (26 << 30) - (4 << 20), "{s}");
        assert_eq!(s["adds"].as_u64().unwrap() % (10 << 30), 0, "{s}");
    }
    let out = producer(&rig, &["submit"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{err}");
    assert!(err.contains("storage local-lvm on pve"), "{err}");
    assert!(
        err.contains("would need 30.0 GiB for full clones but has 26.0 GiB free of 100.0 GiB"),
        "{err}"
    );
    assert_eq!(
        snapshot(&rig).await,
        before,
        "a refused submit wrote nothing"
    );
}
