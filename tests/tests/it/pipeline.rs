//! End to end: a real redis-server, the simulator over HTTPS (pinned fingerprint), workers
//! and the producer's submit/status/teardown, checked through the simulator's own state.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use labfleet_tests::redis_server::RedisServer;
use labfleet_tests::wait::wait_for;
use pve_sim::{Sim, SimConfig};
use shared::config::{DataPaths, load};
use shared::jobs::state::Store;
use shared::secret::SecretKey;
use tokio_util::sync::CancellationToken;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A data folder aimed at a simulator on `port`, with the shipped deployment and `users`.
fn data_dir(port: u16, fingerprint: &str, users: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("connections.yml"),
        format!(
            "lab:\n  host: \"127.0.0.1:{port}\"\n  user: root@pam\n  token_name: labfleet\n  token_secret: a3058775-b2df-4b2b-9997-bdc0e3d45c01\n  fingerprint: \"{fingerprint}\"\n  max_parallel_clones: {{per_node: 3, linked_per_storage: 2}}\n"
        ),
    )
    .unwrap();
    std::fs::copy(
        root().join("data/deployment_config.yml"),
        dir.path().join("deployment_config.yml"),
    )
    .unwrap();
    let list: String = (1..=users)
        .map(|i| format!("  - \"student{i}@pve\"\n"))
        .collect();
    std::fs::write(dir.path().join("users.yml"), format!("users:\n{list}")).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_converge_and_teardown_a_class() {
    let redis = RedisServer::start();
    let mut sc = SimConfig::from_cluster_file(&root().join("data/sim/cluster.yml")).unwrap();
    sc.time_scale = 0.05;
    let sim = Sim::start(sc).await.unwrap();
    let before = sim.snapshot();
    let data = data_dir(sim.addr().port(), &sim.fingerprint().unwrap(), 8);
    let cfg = load(&DataPaths::in_dir(data.path()), None).unwrap();
    let key = SecretKey::generate();

    let mut qcfg = worker::queue_config();
    qcfg.lease = Duration::from_secs(5);
    qcfg.reap_every = Duration::from_millis(500);
    let queue = shared::queue::Queue::connect(&redis.url(), qcfg.clone())
        .await
        .unwrap();
    let store = Store::new(queue.clone());

    let shutdown = CancellationToken::new();
    let mut workers = Vec::new();
    for i in 0..3 {
        let mut wc = worker::WorkerConfig::new(redis.url(), data.path());
        wc.queue = qcfg.clone();
        wc.name = Some(format!("w{i}"));
        wc.secret_key = Some(key.clone());
        wc.concurrency = 8;
        workers.push(worker::run(wc, shutdown.child_token()));
    }
    let workers = futures::future::join_all(workers);

    let flow = async {
        let pve = producer::deploy::connect_pve(&cfg, Some(&key))
            .map_err(|f| f.error)
            .unwrap();
        let (id, plan) = producer::deploy::submit(&cfg, &pve, &store, Some(&key))
            .await
            .map_err(|f| f.error)
            .unwrap();
        assert_eq!(plan.vms.len(), 16);
        wait_for(Duration::from_secs(60), "deployment done", || async {
            producer::deploy::status(&store, &id)
                .await
                .map(|s| s.state == "done")
                .unwrap_or(false)
        })
        .await;

        // Every VM once, with its name, node, pool, NICs and ACL; a student's VMs on one node.
        let vms = sim.vms();
        let ours: Vec<_> = vms.iter().filter(|v| !v.template).collect();
        assert_eq!(ours.len(), 16, "exactly one VM per planned VM");
        let names: BTreeSet<_> = ours.iter().filter_map(|v| v.name.clone()).collect();
        assert_eq!(names.len(), 16, "no duplicate names");
        let vmids: BTreeSet<_> = ours.iter().map(|v| v.vmid).collect();
        assert_eq!(vmids.len(), 16);
        let mut node_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let acls = sim.acls();
        for p in &plan.vms {
            let v = ours
                .iter()
                .find(|v| v.name.as_deref() == Some(p.name.as_str()))
                .expect("VM exists");
            assert_eq!(v.node, p.node);
            assert_eq!(
                v.pool.as_deref(),
                Some(format!("demo-lab-{}", p.user.split('@').next().unwrap()).as_str())
            );
            let net1 = v
                .config
                .get("net1")
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_owned();
            assert!(
                net1.contains(&format!("bridge={}", p.nics[1].bridge)),
                "{net1}"
            );
            if p.machine == "student-pc" {
                assert!(net1.contains("tag=100"), "{net1}");
            }
            assert!(acls.iter().any(|a| a.path == format!("/vms/{}", v.vmid)
                && a.ugid == p.user
                && a.roleid == "PVEVMUser"));
            node_of
                .entry(p.user.clone())
                .or_default()
                .insert(v.node.clone());
        }
        assert!(
            node_of.values().all(|n| n.len() == 1),
            "a student's VMs share a node"
        );
        for s in &plan.students {
            for (iface, _) in s.bridges.values() {
                assert!(
                    sim.bridges(&s.node).contains(iface),
                    "bridge {iface} applied on {}",
                    s.node
                );
            }
        }
        assert!(sim.users().contains(&"student1@pve".to_owned()));

        // Caps: the simulator's exact high-water marks never exceed them.
        let stats = sim.stats();
        if let Some(per_node) = stats["peak_concurrent_clones"]["per_node"].as_object() {
            for (n, peak) in per_node {
                assert!(peak.as_u64().unwrap_or(0) <= 3, "node {n} peak {peak}");
            }
        }

        // A resubmit changes nothing.
        let before_resubmit = sim.vms().len();
        producer::deploy::submit(&cfg, &pve, &store, Some(&key))
            .await
            .map_err(|f| f.error)
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(sim.vms().len(), before_resubmit);

        // Teardown returns the cluster to its state before the deployment.
        producer::deploy::teardown(&store, &id)
            .await
            .map_err(|f| f.error)
            .unwrap();
        wait_for(Duration::from_secs(60), "teardown finished", || async {
            producer::deploy::finish_teardown(&store, &id)
                .await
                .unwrap_or(false)
        })
        .await;
        let after = sim.snapshot();
        assert_eq!(
            after["vms"], before["vms"],
            "VMs back to the templates only"
        );
        assert_eq!(after["pools"], before["pools"]);
        assert_eq!(after["users"], before["users"]);
        shutdown.cancel();
    };
    let ((), _) = tokio::join!(flow, workers);
}
