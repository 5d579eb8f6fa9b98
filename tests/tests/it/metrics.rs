//! The worker's `/metrics`: a known workload (a 4-student x 2-machine class deployed by one
//! in-process worker with metrics on a free port, against the simulator over HTTPS and a
//! real redis-server), then the page's values checked against what the class needs, the
//! queue's own counts and the simulator's request counters.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use labfleet_tests::wait::wait_for;
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
    let mut o = labfleet_tests::lab::LabOpts::new(DEPLOYMENT, STUDENTS);
    o.time_scale = 0.02;
    o.caps = labfleet_tests::lab::Caps {
        per_node: Some(2),
        linked_per_storage: Some(2),
        ..Default::default()
    };
    o.queue = Some(|q| {
        q.idle_poll = Duration::from_millis(100);
        labfleet_tests::retries::fast(q);
    });
    let lab = labfleet_tests::lab::Lab::start(o).await.unwrap();
    let root = labfleet_tests::bins::root();
    let (sim, cfg, key, store) = (&lab.sim, &lab.cfg, &lab.key, &lab.store);
    let mut wc = lab.worker_config("metrics-worker");
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

        let pve = producer::deploy::connect_pve(cfg, Some(key)).unwrap();
        let (id, plan) = producer::deploy::submit(cfg, &pve, store, Some(key))
            .await
            .unwrap();
        assert_eq!(plan.vms.len() as u64, VMS);
        wait_for(Duration::from_secs(90), "deployment done", || async {
            producer::deploy::status(store, &id)
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

        // The shipped Grafana dashboard and alert rules query only what this page serves.
        let served: std::collections::BTreeSet<String> =
            m.iter().map(|(n, _, _)| n.clone()).collect();
        let dashboard = dashboard_queries(&root.join("deploy/grafana/labfleet-workers.json"));
        assert!(
            dashboard.len() >= 10,
            "the dashboard has its panels: {dashboard:?}"
        );
        let missing = unserved(&dashboard, &served);
        assert!(
            missing.is_empty(),
            "dashboard panels query metrics /metrics does not serve: {missing:?}"
        );
        let rules = rule_queries(&root.join("deploy/prometheus/labfleet.rules.yml"));
        assert!(rules.len() >= 4, "the alert rules: {rules:?}");
        let missing = unserved(&rules, &served);
        assert!(
            missing.is_empty(),
            "alert rules query metrics /metrics does not serve: {missing:?}"
        );
        shutdown.cancel();
    };
    let (result, ()) = tokio::join!(worker, flow);
    result.expect("worker ran and stopped cleanly");
    lab.sim.shutdown().await;
}

/// Series Prometheus makes itself (not served by the worker), which panels and rules may use.
const PROMETHEUS_SERIES: &[&str] = &["up"];

/// (panel or rule title, PromQL expression) of every query in the dashboard, rows included.
fn dashboard_queries(path: &std::path::Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_default();
                assert!(
                    !expr.is_empty(),
                    "panel {title} has a target without a query"
                );
                out.push((title.clone(), expr.to_owned()));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&doc["panels"], &mut out);
    out
}

/// (alert name, expression) of every rule in a Prometheus rule file (read as text: each
/// `expr:` is one line after its `- alert:`).
fn rule_queries(path: &std::path::Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    let mut name = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(n) = line.strip_prefix("- alert:") {
            name = n.trim().to_owned();
        } else if let Some(e) = line.strip_prefix("expr:") {
            out.push((name.clone(), e.trim().to_owned()));
        }
    }
    out
}

/// The metric names an expression uses: identifiers not followed by `(` (functions), not
/// PromQL keywords, not label names (before `=`, `!=`, `=~`, `!~`, or in `by (...)`), not
/// inside quotes or `[...]` ranges.
fn metric_names(expr: &str) -> Vec<String> {
    const KEYWORDS: &[&str] = &[
        "by",
        "without",
        "and",
        "or",
        "unless",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
    ];
    // Aggregations may be followed by `by (...)` before their parentheses.
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut depth_braces, mut depth_range) = (0, 0, 0);
    let mut grouping = false;
    while i < b.len() {
        let c = b[i] as char;
        match c {
            '"' | '\'' => {
                let q = b[i];
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                continue;
            }
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            '[' => depth_range += 1,
            ']' => depth_range -= 1,
            ')' => grouping = false,
            _ => {}
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < b.len()
                && ((b[i] as char).is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':')
            {
                i += 1;
            }
            let word = &expr[start..i];
            let rest = expr[i..].trim_start();
            let is_function = rest.starts_with('(') || AGGREGATIONS.contains(&word);
            if KEYWORDS.contains(&word) {
                grouping = matches!(
                    word,
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                );
                continue;
            }
            if depth_braces == 0 && depth_range == 0 && !is_function && !grouping {
                out.push(word.to_owned());
            }
            continue;
        }
        i += 1;
    }
    out
}

/// Every (title, metric) that a query uses and the page does not serve.
fn unserved(
    queries: &[(String, String)],
    served: &std::collections::BTreeSet<String>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (title, expr) in queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{title}: no metric found in `{expr}`");
        for n in names {
            if !served.contains(&n) && !PROMETHEUS_SERIES.contains(&n.as_str()) {
                out.push((title.clone(), n));
            }
        }
    }
    out
}

/// The dashboard check itself: it finds metric names in the PromQL the dashboard uses, and
/// reports one that the page does not serve.
#[test]
fn dashboard_check_finds_an_unserved_metric() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.95, sum by (le, kind) (rate(labfleet_pve_request_duration_seconds_bucket{kind=~"po.*"}[5m])))"#
        ),
        vec!["labfleet_pve_request_duration_seconds_bucket"]
    );
    assert_eq!(
        metric_names(
            r#"max by (slot) (a_held{slot=~"x"}) >= max by (slot) (b_cap) > 0 and on() c"#
        ),
        vec!["a_held", "b_cap", "c"]
    );
    let served = ["labfleet_queue_up".to_owned()].into_iter().collect();
    let q = vec![
        (
            "ok".to_owned(),
            "min(labfleet_queue_up) + sum(up{job=\"w\"})".to_owned(),
        ),
        ("typo".to_owned(), "max(labfleet_queue_upp)".to_owned()),
    ];
    assert_eq!(
        unserved(&q, &served),
        vec![("typo".to_owned(), "labfleet_queue_upp".to_owned())]
    );
}
