//! Lost replies (issue 13): Proxmox ran the call but its answer never came (a 596 after the
//! proxy timeout, a connection dropped after the work). Built on `reliability`'s `Rig`: real
//! redis-server, the simulator in-process over HTTPS, worker processes.
//!
//! Each test first asserts that its faults fired, then checks through the simulator and Redis
//! that every VM exists exactly once, that the clone caps held (a clone whose reply was lost
//! keeps its slots until its task is found again), and that no disk was left on a storage.
//! `LABFLEET_FULL=1` runs the full sizes.

use std::collections::BTreeSet;
use std::time::Duration;

use labfleet_tests::fleet::WorkerOpts;
use labfleet_tests::wait::wait_for;
use pve_sim::{Fault, FaultPlan};
use serde_json::Value;
use shared::pve::Method;

use crate::reliability::{Rig, RigOpts, SERIAL, chaos};
use labfleet_tests::lab::Auth;

fn full() -> bool {
    std::env::var("LABFLEET_FULL").is_ok_and(|v| v == "1")
}

/// Three VMs per student: two linked clones of the linux template (replicated on every
/// node, local storage) and a router linked from shared storage with `target`.
const THREE_MACHINES: &str = "name: lost-lab\nmachines:\n  - {device_type: linux, name: student-pc, template_node: pve1, template_vmid: 100, networks: [{bridge: vmbr0}, {bridge: hq.100}]}\n  - {device_type: linux, name: student-srv, template_node: pve1, template_vmid: 100, networks: [{bridge: vmbr0}]}\n  - {device_type: router, name: gw, template_node: pve1, template_vmid: 120, networks: [{bridge: vmbr0}, {bridge: hq}]}\n";

/// The clone calls of the simulated cluster's templates (and their replicas).
const CLONE_PATHS: &str = "[\"/nodes/pve1/qemu/100/clone\", \"/nodes/pve2/qemu/101/clone\", \"/nodes/pve3/qemu/102/clone\", \"/nodes/pve1/qemu/120/clone\"]";

/// Volumes on the cluster's storages that no VM names: leaked disks. Read through the API
/// (`GET /nodes/{node}/storage/{storage}/content`), as an admin would.
async fn leaked_volumes(rig: &Rig) -> Vec<String> {
    let pve = rig.pve();
    let vms: BTreeSet<u32> = rig.sim.vms().iter().map(|v| v.vmid).collect();
    let mut out = BTreeSet::new();
    for node in ["pve1", "pve2", "pve3"] {
        for storage in ["local-lvm", "ceph-vm"] {
            let path = format!("/nodes/{node}/storage/{storage}/content");
            let list = pve.raw_call(Method::GET, &path, &[]).await.unwrap();
            for v in list.as_array().cloned().unwrap_or_default() {
                let owner = v.get("vmid").and_then(Value::as_u64).unwrap_or(0) as u32;
                if !vms.contains(&owner) {
                    out.insert(v["volid"].as_str().unwrap_or_default().to_owned());
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Every clone call's reply is lost half the time (596 after the proxy timeout, or the
/// connection dropped after the call ran) while tasks run long: each clone is found again by
/// its task or its VM, keeps its slots meanwhile, and is made once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_lost_clone_replies_clone_nothing_twice_and_keep_the_caps() {
    let _one_at_a_time = SERIAL.lock().await;
    let users = if full() { 40 } else { 8 };
    let mut rig = Rig::new(RigOpts {
        users,
        time_scale: 0.1,
        ..RigOpts::default()
    })
    .await;
    rig.sim.set_faults(
        FaultPlan::from_yaml(&format!(
            "requests: {{rate: 0.6, weight_596_after_commit: 3, weight_reset_after_commit: 1, paths: {CLONE_PATHS}}}\nslow_task_rate: 1\nslow_task_factor: 20\n"
        ))
        .unwrap(),
    );
    for _ in 0..3 {
        rig.fleet.spawn();
    }
    let (id, plan) = rig.submit().await;
    rig.wait_state(
        &id,
        "done",
        Duration::from_secs(if full() { 600 } else { 120 }),
    )
    .await;
    let injected = rig.faults();
    eprintln!("l1: {} VMs, faults {injected:?}", plan.vms.len());
    for k in ["request_596_after_commit", "request_reset_after_commit"] {
        assert!(
            injected.get(k).copied().unwrap_or(0) > 0,
            "no {k} fault: {injected:?}"
        );
    }
    rig.check_outcome(&id, &[&plan], 0).await;
    assert_eq!(leaked_volumes(&rig).await, Vec::<String>::new());
}

/// The "done when" of issue 13: 20 students x 3 VMs under 20% request faults that include
/// lost replies, storage-lock timeouts, half-made clones, a node outage and a worker SIGKILLed
/// every 3-5 s: every VM exactly once, no orphan, no leaked disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_lost_replies_kills_and_an_outage_leave_every_vm_once_and_no_disk() {
    let _one_at_a_time = SERIAL.lock().await;
    let users = if full() { 100 } else { 20 };
    let mut rig = Rig::new(RigOpts {
        users,
        time_scale: 0.1,
        auth: Auth::Password,
        deployment: THREE_MACHINES.to_owned(),
        // A 596 after commit comes when pveproxy's proxy timeout has passed: at 30 s x 0.1 a
        // call so answered takes 3 s, and a job of three such calls never ends between two
        // kills that always pick the worker holding the last jobs. 10 s (1 s here) keeps the
        // fault and lets the kills fall between calls.
        sim_setup: Some(|sc| sc.cluster.api.proxy_timeout_seconds = 10.0),
        workers: WorkerOpts {
            backoff_cap: 2.0,
            ..WorkerOpts::default()
        },
        ..RigOpts::default()
    })
    .await;
    let faults = FaultPlan::from_yaml(
        "requests: {rate: 0.2, weight_596: 1, weight_500: 1, weight_reset: 1, weight_596_after_commit: 2, weight_reset_after_commit: 2}\nlock_timeout_rate: 0.1\nclone_half_fail_rate: 0.1\n",
    )
    .unwrap();
    for _ in 0..3 {
        rig.fleet.spawn();
    }
    let (id, plan) = rig.submit().await;
    assert_eq!(plan.vms.len(), users * 3);
    rig.sim.set_faults(faults.clone());
    rig.sim.inject(Fault::LockTimeouts { count: 2 });
    rig.sim.inject(Fault::CloneHalfFail { count: 2 });
    wait_for(Duration::from_secs(60), "clones running", || async {
        rig.running_clones() > 0
    })
    .await;
    rig.sim.inject(Fault::NodeOffline {
        node: "pve2".into(),
        duration: Duration::from_millis(1500),
    });
    let deadline = Duration::from_secs(if full() { 900 } else { 150 });
    let run = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(chaos(
        &mut rig,
        &id,
        (3.0, 5.0),
        deadline,
    )))
    .await;
    let report = match run {
        Ok(r) => r,
        Err(p) => {
            if let Ok(dir) = std::env::var("LABFLEET_KEEP_LOGS") {
                for (name, log) in rig.fleet.logs() {
                    let _ = std::fs::write(format!("{dir}/{name}.log"), log);
                }
            }
            std::panic::resume_unwind(p);
        }
    };
    let injected = rig.faults();
    eprintln!(
        "l2: {} VMs, {} kills ({} hit a claimed job), faults {injected:?}",
        plan.vms.len(),
        report.kills,
        report.hits
    );
    for k in [
        "request_596",
        "request_500",
        "request_reset",
        "request_596_after_commit",
        "request_reset_after_commit",
        "lock_timeout",
        "clone_half_fail",
    ] {
        assert!(
            injected.get(k).copied().unwrap_or(0) > 0,
            "no {k} fault: {injected:?}"
        );
    }
    assert!(report.hits >= 1, "no kill hit a claimed job: {report:?}");
    // The faults end with the chaos: what follows is the admin's read of the outcome (a CI
    // run's storage listing had its own connection dropped by the still-running plan).
    rig.sim.set_faults(FaultPlan::default());
    rig.check_outcome(&id, &[&plan], 0).await;
    let leaked = leaked_volumes(&rig).await;
    assert!(leaked.is_empty(), "disks left on the storages: {leaked:?}");
}

/// A destroy that cannot take its storage lock leaves the disk behind with a warning: the
/// destroy job frees it (`DELETE .../storage/{s}/content/{volume}`); what cannot be freed
/// either is listed by `status` and by the teardown's output (text and `--json`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l3_disks_a_destroy_left_behind_are_freed_or_listed() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut rig = Rig::new(RigOpts {
        users: 3,
        time_scale: 0.1,
        ..RigOpts::default()
    })
    .await;
    for _ in 0..2 {
        rig.fleet.spawn();
    }
    let (id, plan) = rig.submit().await;
    rig.wait_state(&id, "done", Duration::from_secs(60)).await;

    // The first destroys' storage locks time out: their disks stay; the workers free them.
    rig.sim.inject(Fault::LockTimeouts { count: 3 });
    producer::deploy::teardown(&rig.store, &id).await.unwrap();
    rig.wait_state(&id, "torn-down", Duration::from_secs(60))
        .await;
    let leaked_first = rig
        .faults()
        .get("destroy_leaked_volume")
        .copied()
        .unwrap_or(0);
    assert!(
        leaked_first >= 1,
        "no destroy left a disk: {:?}",
        rig.faults()
    );
    assert_eq!(leaked_volumes(&rig).await, Vec::<String>::new());
    let st = producer::deploy::status(&rig.store, &id).await.unwrap();
    assert!(st.leaked.is_empty(), "{:?}", st.leaked);
    let non_template = rig.sim.vms().iter().filter(|v| !v.template).count();
    assert_eq!(non_template, 0);

    // Deployed again, then torn down while every storage lock times out: nothing can be
    // freed, and the teardown says so, volume by volume.
    let (id2, _) = rig.submit().await;
    assert_eq!(id2, id);
    rig.wait_state(&id, "done", Duration::from_secs(60)).await;
    rig.sim
        .set_faults(FaultPlan::from_yaml("lock_timeout_rate: 1\n").unwrap());
    let out = crate::reliability::producer(&rig, &["teardown", &id, "--wait"], &["--json"]);
    assert!(
        out.status.success(),
        "teardown: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The last JSON document printed is the outcome (progress may come before it).
    let json: Value = serde_json::Deserializer::from_str(&stdout)
        .into_iter::<Value>()
        .filter_map(Result::ok)
        .last()
        .unwrap_or_else(|| panic!("no JSON in the teardown's output: {stdout}"));
    let listed: BTreeSet<String> = json["leaked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["volid"].as_str().unwrap().to_owned())
        .collect();
    let on_storage: BTreeSet<String> = leaked_volumes(&rig).await.into_iter().collect();
    assert_eq!(
        listed.len(),
        plan.vms.len(),
        "one disk per VM listed: {stdout}"
    );
    assert_eq!(listed, on_storage, "the listed disks are the ones left");
    let text = crate::reliability::producer(&rig, &["status", &id], &[]);
    let text = String::from_utf8_lossy(&text.stdout);
    eprintln!("l3: producer status:\n{text}\nl3: producer --json teardown --wait:\n{stdout}");
    assert_eq!(
        text.matches("leaked disk ").count(),
        plan.vms.len(),
        "status lists every leaked disk:\n{text}"
    );
}

/// Runs a 12-student deployment with 3 workers of 4 jobs each against nodes with one API
/// worker each, the workers capped at `per_node` protected calls per node; returns the
/// simulator's `api_workers` stats.
async fn api_run(per_node: u32) -> Value {
    let mut rig = Rig::new(RigOpts {
        users: 12,
        time_scale: 0.25,
        sim_setup: Some(|sc| sc.cluster.api.workers_per_node = 1),
        ..RigOpts::default()
    })
    .await;
    let path = rig.data.path().join("connections.yml");
    let mut yaml = std::fs::read_to_string(&path).unwrap();
    yaml += &format!("  max_parallel_api: {{per_node: {per_node}}}\n");
    std::fs::write(&path, yaml).unwrap();
    for _ in 0..3 {
        rig.fleet.spawn();
    }
    let (id, plan) = rig.submit().await;
    rig.wait_state(&id, "done", Duration::from_secs(120)).await;
    rig.check_outcome(&id, &[&plan], 0).await;
    rig.sim.stats()["api_workers"].clone()
}

/// `max_parallel_api.per_node`: the workers together never make more protected calls to a
/// node than it has API workers, so calls wait far less in pvedaemon's queue (and none
/// reaches the proxy timeout) than in the same run with a cap of 12.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_protected_calls_are_capped_per_node_across_workers() {
    let _one_at_a_time = SERIAL.lock().await;
    let capped = api_run(1).await;
    let uncapped = api_run(12).await;
    eprintln!("l4: capped at 1: {capped}\nl4: capped at 12: {uncapped}");
    let total = |v: &Value, k: &str| {
        v[k].as_object()
            .map(|m| m.values().filter_map(Value::as_f64).sum::<f64>())
            .unwrap_or(0.0)
    };
    let (calls, queued) = (total(&capped, "calls"), total(&capped, "queued_calls"));
    assert!(calls > 0.0, "no protected call counted: {capped}");
    assert_eq!(capped["proxy_timeouts"], 0, "{capped}");
    // A call that finds its node's worker free may still be counted as queued when the
    // machine is slow to schedule it (a millisecond of simulated time is 0.25 ms here), and
    // a pass is given back just after its answer arrives: some waiting remains. Measured:
    // uncapped, 0.4-1.1 s of waiting in 20-24 queued calls; capped, 0.05-0.07 s in 1-4. (Since
    // no clone task adds its VM to a pool, our `user.cfg` writers no longer nap at that lock
    // while holding a worker, so the uncapped run waits less than it did: 10x failed 1 run
    // in 4.)
    assert!(
        capped["wait_seconds_total"].as_f64().unwrap() * 5.0
            < uncapped["wait_seconds_total"].as_f64().unwrap(),
        "calls waited in the queue about as long with the cap as without: {capped} vs {uncapped}"
    );
    assert!(
        queued * 3.0 < total(&uncapped, "queued_calls"),
        "about as many calls queued with the cap as without: {capped} vs {uncapped}"
    );
    assert!(queued <= calls, "{capped}");
}

async fn make_users(pve: &shared::pve::PveClient, prefix: &str, n: usize) {
    let calls = (0..n).map(|i| {
        let u = shared::pve::UserCreate {
            userid: format!("{prefix}{i}@pve"),
            ..Default::default()
        };
        async move { pve.create_user(&u).await.unwrap() }
    });
    futures::future::join_all(calls).await;
}

/// labfleet's own writers of `user.cfg` queue for one pass in Redis (`ApiGate::
/// enter_user_cfg`) instead of meeting at Proxmox's cluster-wide lock, whose waiters poll
/// with 1 s naps: 16 users made at once through the gate leave the lock free while someone
/// waited for it for no time at all, where the same 16 without the gate did (it failed
/// before the gate: the simulator's lock was free 1-3 s while its pollers slept). And a
/// writer that makes what clones wait for (a user, a pool) goes before the others waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l5_our_user_cfg_writes_queue_for_one_pass_and_creates_go_first() {
    use shared::jobs::api_slots::ApiSlots;
    use shared::pve::ApiGate;
    let _one_at_a_time = SERIAL.lock().await;
    // At 0.25 the ungated writers' 10 s lock wait was 2.5 s, only 0.5 s past the 16 writes'
    // span: on a loaded machine one of them could time out.
    let rig = Rig::new(RigOpts {
        users: 1,
        time_scale: 0.5,
        ..RigOpts::default()
    })
    .await;
    let lock = |rig: &Rig| rig.sim.stats()["locks"]["file-user_cfg"].clone();
    let waited = |v: &Value| v["free_while_waited_seconds"].as_f64().unwrap_or(0.0);

    make_users(&rig.pve(), "plain", 16).await;
    let ungated = lock(&rig);
    let gate = ApiSlots::new(rig.queue().clone(), "lab", 3, Duration::from_millis(2));
    let gated = rig.pve();
    gated.set_api_gate(gate.clone());
    make_users(&gated, "gated", 16).await;
    let after = lock(&rig);
    eprintln!("l5: without the gate {ungated}, after the gated run {after}");
    assert_eq!(after["takes"].as_u64(), Some(32), "{after}");
    assert!(
        waited(&ungated) > 0.3,
        "16 writers at once never made Proxmox's pollers wait: {ungated}"
    );
    assert!(
        waited(&after) - waited(&ungated) < 0.05,
        "our gated writers still met at the lock: {ungated} -> {after}"
    );

    // Priority: with the pass held, three plain writers wait, then an urgent one; when the
    // pass is given back the urgent one gets it first (by chance it would one time in four).
    let held = gate.enter_user_cfg(false).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (name, urgent) in [
        ("plain", false),
        ("plain", false),
        ("plain", false),
        ("urgent", true),
    ] {
        let (gate, tx) = (gate.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let pass = gate.enter_user_cfg(urgent).await;
            tx.send(name).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(pass);
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // Every writer asks before the pass is given back (on a loaded machine 30 ms may not be
    // enough for the urgent one's first try): its note is in Redis, the plain ones poll.
    let urgent_key = format!("{}:urgent", gate.user_cfg_key());
    wait_for(
        Duration::from_secs(10),
        "the urgent writer waits",
        || async {
            let mut c = rig.queue().connection();
            let n: redis::RedisResult<u64> = redis::cmd("ZCARD")
                .arg(&urgent_key)
                .query_async(&mut c)
                .await;
            n.is_ok_and(|n| n == 1)
        },
    )
    .await;
    drop(held);
    for t in tasks {
        t.await.unwrap();
    }
    let first = rx.recv().await.unwrap();
    assert_eq!(
        first, "urgent",
        "the plain writer went before the urgent one"
    );
}

/// A pass given back wakes the next waiter of its process at once instead of leaving the
/// room free until that waiter's next try: with the retry at 30 s, ten writers of one
/// process that each hold the `user.cfg` pass for 10 ms all get it within seconds (by
/// polling alone the second would wait 30-60 s). The next urgent waiter of the process is
/// the one woken when there is one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l6_a_pass_given_back_wakes_the_next_waiter_of_the_process() {
    use shared::jobs::api_slots::ApiSlots;
    use shared::pve::ApiGate;
    let _one_at_a_time = SERIAL.lock().await;
    let rig = Rig::new(RigOpts {
        users: 1,
        time_scale: 0.0,
        ..RigOpts::default()
    })
    .await;
    let gate = ApiSlots::new(rig.queue().clone(), "lab", 3, Duration::from_secs(30));
    let held = gate.enter_user_cfg(false).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (gate, tx) = (gate.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            let pass = gate.enter_user_cfg(i == 9).await;
            tx.send(i).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(pass);
        }));
    }
    // Every writer has asked once (each then waits up to 30-60 s for its next try).
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    let all = tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(tasks))
        .await
        .expect("every waiting writer got the pass without waiting for its next try");
    assert!(all.iter().all(Result::is_ok));
    assert_eq!(rx.recv().await, Some(9), "the urgent writer went first");
}

/// One router per student, linked from the shared-storage template 120.
const ROUTER_ONLY: &str = "name: lost-lab\nmachines:\n  - {device_type: router, name: gw, template_node: pve1, template_vmid: 120, networks: [{bridge: vmbr0}]}\n";

/// A half-made clone left by our own clone task (known by its UPID, ended) is removed at
/// once, even while another clone from the same template waits at the shared storage's lock
/// naming no volume yet. Such a clone could be a late call of ours only if our task had not
/// made the VM's config; waiting for it (as before) held the job, its slots and a read per
/// look for as long as the shared lock stayed busy, and under faults the reads burned the
/// job's attempts (LABFLEET_FULL p4: router clones dead after 20 attempts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_a_half_made_clone_our_known_task_left_is_removed_without_waiting_for_others() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut rig = Rig::new(RigOpts {
        users: 1,
        time_scale: 1.0,
        // root@pam with a password: it may remove a VM under a stale lock (skiplock).
        auth: Auth::Password,
        deployment: ROUTER_ONLY.to_owned(),
        ..RigOpts::default()
    })
    .await;
    rig.sim.inject(Fault::CloneHalfFail { count: 1 });
    rig.fleet.spawn();
    let (id, plan) = rig.submit().await;
    wait_for(Duration::from_secs(20), "our clone running", || async {
        rig.running_clones() > 0
    })
    .await;
    // Another admin's full clone of the same template: it waits for the storage lock, then
    // holds it 12 s, naming no volume all that time.
    rig.sim.inject(Fault::SlowTasks {
        count: 1,
        factor: 12.0,
    });
    let pve = rig.pve();
    let other = pve
        .raw_call(
            Method::POST,
            "/nodes/pve1/qemu/120/clone",
            &[("newid", "9100"), ("full", "1"), ("storage", "ceph-vm")],
        )
        .await
        .unwrap();
    let other: shared::pve::Upid = other.as_str().unwrap().parse().unwrap();
    let destroyed = || async {
        let mut n = 0;
        for node in ["pve1", "pve2", "pve3"] {
            let path = format!("/nodes/{node}/tasks");
            let list = pve
                .raw_call(Method::GET, &path, &[("typefilter", "qmdestroy")])
                .await
                .unwrap();
            n += list.as_array().map_or(0, Vec::len);
        }
        n
    };
    wait_for(
        Duration::from_secs(7),
        "the half-made clone removed while the other clone holds the lock",
        || async { destroyed().await > 0 },
    )
    .await;
    assert!(
        pve.task_status(&other).await.unwrap().is_running(),
        "the other clone still runs: the removal did not wait for it"
    );
    assert_eq!(rig.faults().get("clone_half_fail").copied(), Some(1));
    rig.wait_state(&id, "done", Duration::from_secs(90)).await;
    pve.wait_task(&other, &Default::default()).await.unwrap();
    let upid = pve
        .raw_call(Method::DELETE, "/nodes/pve1/qemu/9100", &[])
        .await
        .unwrap();
    let upid: shared::pve::Upid = upid.as_str().unwrap().parse().unwrap();
    pve.wait_task(&upid, &Default::default()).await.unwrap();
    rig.check_outcome(&id, &[&plan], 1).await;
}
