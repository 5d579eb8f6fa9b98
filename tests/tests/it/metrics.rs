//! The worker's `/metrics`: a known workload (a 4-student x 2-machine class deployed by one
//! in-process worker with metrics on a free port, against the simulator over HTTPS and a
//! real redis-server), then the page's values checked against what the class needs, the
//! queue's own counts and the simulator's request counters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use labfleet_tests::redis_server::RedisServer;
use labfleet_tests::wait::wait_for;
use pve_sim::{Sim, SimConfig};
use shared::config::{DataPaths, load};
use shared::jobs::state::Store;
use tokio_util::sync::CancellationToken;

const DEPLOYMENT: &str = "name: metrics-lab\nmachines:\n  - {device_type: linux, name: pc, template_node: pve1, template_vmid: 100, networks: [{bridge: vmbr0}, {bridge: hq.100}]}\n  - {device_type: router, name: gw, template_node: pve1, template_vmid: 120, networks: [{bridge: vmbr0}, {bridge: hq}]}\n";
const STUDENTS: usize = 4;
const VMS: u64 = 8;

/// One parsed sample line: name, labels, value.
type Samples = Vec<(String, BTreeMap<String, String>, f64)>;

/// Parses the text exposition format (enough of it for our own page: no escapes in values
/// other than the ones our labels never contain).
fn parse(page: &str) -> Samples {
    let mut out = Vec::new();
    for line in page
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value.parse().expect("numeric value");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').expect("closed label set");
                let labels = body
                    .split("\",")
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").expect("k=\"v\"");
                        (k.to_owned(), v.trim_end_matches('"').to_owned())
                    })
                    .collect();
                (n.to_owned(), labels)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        out.push((name, labels, value));
    }
    out
}

/// The value of the one sample of `name` whose labels include `labels`.
fn get(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let hits: Vec<f64> = s
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
        })
        .map(|x| x.2)
        .collect();
    assert_eq!(hits.len(), 1, "one sample {name}{labels:?}, found {hits:?}");
    hits[0]
}

fn sum(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
        })
        .map(|x| x.2)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_deployment() {
    let redis = RedisServer::start();
    let root = labfleet_tests::bins::root();
    let mut sc = SimConfig::from_cluster_file(&root.join("data/sim/cluster.yml")).unwrap();
    sc.time_scale = 0.02;
    let sim = Sim::start(sc).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(
        data.path().join("connections.yml"),
        format!(
            "lab:\n  host: \"127.0.0.1:{}\"\n  user: root@pam\n  token_name: labfleet\n  token_secret: a3058775-b2df-4b2b-9997-bdc0e3d45c01\n  fingerprint: \"{}\"\n  max_parallel_clones: {{per_node: 2, linked_per_storage: 2}}\n",
            sim.addr().port(),
            sim.fingerprint().unwrap()
        ),
    )
    .unwrap();
    std::fs::write(data.path().join("deployment_config.yml"), DEPLOYMENT).unwrap();
    let users: String = (1..=STUDENTS)
        .map(|i| format!("  - \"student{i}@pve\"\n"))
        .collect();
    std::fs::write(data.path().join("users.yml"), format!("users:\n{users}")).unwrap();
    let cfg = load(&DataPaths::in_dir(data.path()), None).unwrap();
    let key = shared::secret::SecretKey::generate();
    let mut qcfg = worker::queue_config();
    qcfg.idle_poll = Duration::from_millis(100);
    labfleet_tests::retries::fast(&mut qcfg);
    let queue = shared::queue::Queue::connect(&redis.url(), qcfg.clone())
        .await
        .unwrap();
    let store = Store::new(queue.clone());

    let mut wc = worker::WorkerConfig::new(redis.url(), data.path());
    wc.queue = qcfg;
    wc.name = Some("metrics-worker".into());
    wc.secret_key = Some(key.clone());
    wc.concurrency = 8;
    wc.metrics = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let bound = wc.metrics_bound.clone();
    let shutdown = CancellationToken::new();
    let worker = worker::run(wc, shutdown.child_token());

    let flow = async {
        wait_for(Duration::from_secs(10), "metrics server bound", || async {
            bound.get().is_some()
        })
        .await;
        let url = format!("http://{}/metrics", bound.get().unwrap());
        // reqwest is built without a default TLS provider; plain HTTP still asks for one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::new();
        let scrape = || async {
            let r = http.get(&url).send().await.expect("metrics answers");
            assert_eq!(r.status(), 200);
            let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
            assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
            r.text().await.unwrap()
        };

        // Before any job: every kind and outcome listed at zero, the queue empty and up.
        let before = parse(&scrape().await);
        assert_eq!(sum(&before, "labfleet_worker_jobs_total", &[]), 0.0);
        assert_eq!(
            get(
                &before,
                "labfleet_worker_jobs_total",
                &[("kind", "clone"), ("outcome", "done")]
            ),
            0.0
        );
        assert_eq!(get(&before, "labfleet_queue_up", &[]), 1.0);
        assert_eq!(sum(&before, "labfleet_queue_jobs", &[]), 0.0);

        let pve = producer::deploy::connect_pve(&cfg, Some(&key))
            .map_err(|f| f.error)
            .unwrap();
        let (id, plan) = producer::deploy::submit(&cfg, &pve, &store, Some(&key))
            .await
            .map_err(|f| f.error)
            .unwrap();
        assert_eq!(plan.vms.len() as u64, VMS);
        wait_for(Duration::from_secs(90), "deployment done", || async {
            producer::deploy::status(&store, &id)
                .await
                .map(|s| s.state == "done")
                .unwrap_or(false)
        })
        .await;
        let page = scrape().await;
        let m = parse(&page);
        let jobs = |kind: &str, outcome: &str| {
            get(
                &m,
                "labfleet_worker_jobs_total",
                &[("kind", kind), ("outcome", outcome)],
            )
        };

        // Jobs by kind: each VM cloned, wired and granted once; each student set up once;
        // each node holding students got its bridges once. Nothing failed or was lost.
        let nodes: std::collections::BTreeSet<&str> =
            plan.students.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(jobs("clone", "done"), VMS as f64, "{page}");
        assert_eq!(jobs("network", "done"), VMS as f64);
        assert_eq!(jobs("permission", "done"), VMS as f64);
        assert_eq!(jobs("student", "done"), STUDENTS as f64);
        assert_eq!(jobs("node-network", "done"), nodes.len() as f64);
        assert_eq!(jobs("start", "done"), 0.0, "start: false in this lab");
        assert_eq!(
            sum(&m, "labfleet_worker_jobs_total", &[("outcome", "failed")]),
            0.0
        );
        assert_eq!(get(&m, "labfleet_worker_leases_lost_total", &[]), 0.0);
        // A retried run is a run whose attempt > 1: every retry outcome led to exactly one.
        for k in shared::jobs::KINDS {
            assert_eq!(
                get(&m, "labfleet_worker_job_retries_total", &[("kind", k)]),
                jobs(k, "retry"),
                "retries of {k}"
            );
        }

        // The queue agrees: everything this worker acked is done, nothing else is left.
        let done_runs = sum(&m, "labfleet_worker_jobs_total", &[("outcome", "done")]);
        let total_jobs = VMS as f64 * 3.0 + STUDENTS as f64 + nodes.len() as f64;
        assert_eq!(done_runs, total_jobs);
        assert_eq!(
            get(&m, "labfleet_queue_jobs", &[("state", "done")]),
            total_jobs
        );
        assert_eq!(get(&m, "labfleet_queue_acked_total", &[]), total_jobs);
        for state in [
            "ready",
            "scheduled",
            "gated",
            "waiting_for_slot",
            "in_flight",
            "dead",
        ] {
            assert_eq!(
                get(&m, "labfleet_queue_jobs", &[("state", state)]),
                0.0,
                "{state}"
            );
        }
        assert_eq!(get(&m, "labfleet_queue_oldest_ready_age_seconds", &[]), 0.0);

        // In flight per node: the nodes worked on are listed, at zero now; the clone slots
        // of pve1 (the templates' node) were used, never beyond their cap of 2, and are free.
        for n in &nodes {
            assert_eq!(
                get(
                    &m,
                    "labfleet_worker_jobs_in_flight",
                    &[("cluster", "lab"), ("node", n)]
                ),
                0.0
            );
        }
        let slot = [("slot", "clone-node:lab/pve1")];
        assert_eq!(get(&m, "labfleet_queue_slot_cap", &slot), 2.0);
        assert_eq!(get(&m, "labfleet_queue_slot_held", &slot), 0.0);
        let hwm = get(&m, "labfleet_queue_slot_high_water", &slot);
        assert!((1.0..=2.0).contains(&hwm), "high water {hwm}");

        // Proxmox latency: the worker's requests are the simulator's minus the producer's;
        // the histogram is cumulative and its +Inf bucket is its count.
        let h = "labfleet_pve_request_duration_seconds";
        let worker_requests = sum(&m, &format!("{h}_count"), &[("cluster", "lab")]);
        let sim_requests = sim.stats()["requests_total"].as_f64().unwrap();
        let c = pve.request_counts();
        let producer_requests = (c.logins + c.polls + c.other) as f64;
        assert_eq!(worker_requests, sim_requests - producer_requests, "{page}");
        let polls = get(
            &m,
            &format!("{h}_count"),
            &[("cluster", "lab"), ("kind", "poll")],
        );
        assert!(
            polls >= VMS as f64,
            "at least one task poll per clone: {polls}"
        );
        for kind in ["login", "poll", "other"] {
            let labels = [("cluster", "lab"), ("kind", kind)];
            let buckets: Vec<f64> = m
                .iter()
                .filter(|(n, l, _)| {
                    *n == format!("{h}_bucket") && l["cluster"] == "lab" && l["kind"] == kind
                })
                .map(|x| x.2)
                .collect();
            assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
            assert_eq!(
                get(
                    &m,
                    &format!("{h}_bucket"),
                    &[("cluster", "lab"), ("kind", kind), ("le", "+Inf")]
                ),
                get(&m, &format!("{h}_count"), &labels)
            );
        }
        assert!(
            get(
                &m,
                &format!("{h}_sum"),
                &[("cluster", "lab"), ("kind", "other")]
            ) > 0.0
        );
        shutdown.cancel();
    };
    let (result, ()) = tokio::join!(worker, flow);
    result.expect("worker ran and stopped cleanly");
    sim.shutdown().await;
}
