//! The scenarios of `bench`: each prints its figures (and writes a JSON of them under
//! `bench/results/`) for BENCHMARKS.md.
//!
//! One file (over 600 lines): each scenario is a few functions, and they share the lab set-up,
//! the report writers and the figures BENCHMARKS.md is made from.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::pve::Method;
use tokio_util::sync::CancellationToken;

use crate::ClassArgs;
use crate::baseline::{self, Failures};
use crate::lab::{self, Lab, LabSpec};
use crate::plot::{self, Series};

const DEADLINE: Duration = Duration::from_secs(3600);

/// One approach's run of the class.
struct Run {
    name: String,
    e2e: f64,
    stats: Value,
    series: Series,
    /// Failed clone tasks by cause, from the simulator's task list.
    task_failures: BTreeMap<&'static str, u64>,
    client: Option<Failures>,
    vms_ok: usize,
    /// Requests counted by the simulator when the producer's submit returned.
    requests_at_submit: Option<Value>,
    /// Wall seconds of the submit (facts, plan, enqueue).
    submit_s: Option<f64>,
}

/// Failed clone tasks on the simulator, by cause (the last 500 tasks: every task of a run).
async fn task_failures(lab: &Lab) -> anyhow::Result<BTreeMap<&'static str, u64>> {
    let pve = lab.pve()?;
    let tasks = pve.raw_call(Method::GET, "/cluster/tasks", &[]).await?;
    let mut out = BTreeMap::new();
    for t in tasks.as_array().into_iter().flatten() {
        if t["type"] != "qmclone" {
            continue;
        }
        let s = t["status"].as_str().unwrap_or_default();
        if s == "OK" || s == "RUNNING" || s.starts_with("WARNINGS") {
            continue;
        }
        *out.entry(baseline::classify(s)).or_default() += 1;
    }
    Ok(out)
}

fn vms_ok(lab: &Lab) -> usize {
    lab.sim
        .vms()
        .iter()
        .filter(|v| !v.template && v.lock.is_none() && v.name.is_some())
        .count()
}

async fn finish(
    lab: &Lab,
    name: &str,
    e2e: f64,
    series: Series,
    client: Option<Failures>,
) -> anyhow::Result<Run> {
    Ok(Run {
        name: name.to_owned(),
        e2e,
        stats: lab.sim.stats(),
        series,
        task_failures: task_failures(lab).await?,
        client,
        vms_ok: vms_ok(lab),
        requests_at_submit: None,
        submit_s: None,
    })
}

/// labfleet: submit, in-process workers, wait until `status` says done.
async fn run_labfleet(
    spec: &LabSpec,
    workers: usize,
    workers_after_submit: bool,
) -> anyhow::Result<Run> {
    let lab = Lab::new(spec).await?;
    let stop = CancellationToken::new();
    let sampler = plot::sample(&lab.sim, stop.clone());
    let mut at_submit = None;
    let mut submit_s = 0.0;
    let flow = async {
        let t0 = Instant::now();
        let r = async {
            let (id, _) = lab.submit().await?;
            submit_s = t0.elapsed().as_secs_f64();
            at_submit = Some(lab.sim.stats()["requests"].clone());
            let end = if workers_after_submit {
                lab.with_workers(workers, 16, lab.wait_done(&id, DEADLINE))
                    .await?
            } else {
                lab.wait_done(&id, DEADLINE).await?
            };
            anyhow::Ok((end - t0).as_secs_f64())
        }
        .await;
        stop.cancel();
        r
    };
    let (series, e2e) = if workers_after_submit {
        tokio::join!(sampler, flow)
    } else {
        let (series, r) =
            tokio::join!(sampler, async { lab.with_workers(workers, 16, flow).await });
        (series, r)
    };
    if let Ok(path) = std::env::var("BENCH_TRACE") {
        trace_jobs(&lab, &path).await?;
    }
    let mut run = finish(&lab, "labfleet", e2e?, series, None).await?;
    run.requests_at_submit = at_submit;
    run.submit_s = Some(submit_s);
    Ok(run)
}

/// With `BENCH_TRACE=<file>`: every job's kind, key, claim and done times (Redis ms) as
/// TSV, for reading a run's order by hand. Not part of any figure.
async fn trace_jobs(lab: &Lab, path: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/", lab.redis_port()))?;
    let mut c = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("{lf}:job:*")
        .query_async(&mut c)
        .await?;
    let mut out = String::new();
    for k in keys {
        let f: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&k)
            .arg(&[
                "kind",
                "created_at",
                "started_at",
                "done_at",
                "attempts",
                "slots",
            ])
            .query_async(&mut c)
            .await?;
        let v: Vec<String> = f.into_iter().map(|x| x.unwrap_or_default()).collect();
        out.push_str(&format!("{}\t{}\n", k, v.join("\t")));
    }
    std::fs::write(path, out)?;
    Ok(())
}

async fn run_baseline(spec: &LabSpec, kind: baseline::Kind) -> anyhow::Result<Run> {
    let lab = Lab::new(spec).await?;
    let pve = lab.pve()?;
    let stop = CancellationToken::new();
    let sampler = plot::sample(&lab.sim, stop.clone());
    let flow = async {
        let t0 = Instant::now();
        let r = baseline::run(kind, &pve, &lab.cfg).await;
        stop.cancel();
        r.map(|f| (t0.elapsed().as_secs_f64(), f))
    };
    let (series, r) = tokio::join!(sampler, flow);
    let (e2e, f) = r?;
    let name = match kind {
        baseline::Kind::Sequential => "sequential",
        baseline::Kind::Naive => "naive (forks=5)",
    };
    finish(&lab, name, e2e, series, Some(f)).await
}

async fn run_one(spec: &LabSpec, approach: &str, workers: usize) -> anyhow::Result<Run> {
    match approach {
        "labfleet" => run_labfleet(spec, workers, false).await,
        "sequential" => run_baseline(spec, baseline::Kind::Sequential).await,
        "naive" => run_baseline(spec, baseline::Kind::Naive).await,
        other => anyhow::bail!("unknown approach {other:?} (labfleet, naive, sequential)"),
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn summary(r: &Run, scale: f64) -> Value {
    let s = &r.stats;
    let (tm, lb, clb) = (
        f(&s["task_makespan_seconds"]),
        f(&s["lower_bound_seconds"]),
        f(&s["clone_lower_bound_seconds"]),
    );
    json!({
        "approach": r.name,
        "e2e_wall_s": r.e2e,
        "e2e_sim_s": if scale > 0.0 { r.e2e / scale } else { 0.0 },
        "submit_wall_s": r.submit_s,
        "task_makespan_s": tm,
        "lower_bound_s": lb,
        "clone_lower_bound_s": clb,
        "task_makespan_over_bound": if lb > 0.0 { tm / lb } else { 0.0 },
        "peak_concurrent_clones": s["peak_concurrent_clones"],
        "clone_tasks": s["tasks"]["qmclone"],
        "failed_clone_tasks": r.task_failures,
        "client_failures": r.client,
        "vms_ok": r.vms_ok,
        "requests_total": s["requests_total"],
        "requests_per_vm": requests_per_vm(&s["requests"], r.vms_ok),
        "locks": s["locks"],
    })
}

/// Every request the simulator served in a run (the producer's and logins included), per
/// VM made: task polls (status, log and the watcher's listings) and the rest.
fn requests_per_vm(requests: &Value, vms: usize) -> Value {
    let vms = (vms as f64).max(1.0);
    let (mut polls, mut others) = (0u64, 0u64);
    for (k, v) in requests.as_object().into_iter().flatten() {
        let n = v.as_u64().unwrap_or(0);
        if request_kind(k) == "poll" {
            polls += n;
        } else {
            others += n;
        }
    }
    json!({"poll": polls as f64 / vms, "other": others as f64 / vms})
}

/// Which lock bounded a run: each lock's held time, the time it sat free while someone
/// waited (the handover's cost), its span (first take to last release), takes and timeouts,
/// in simulated seconds.
fn print_locks(r: &Value) {
    println!(
        "{}: requests per VM made, producer's included: polls {:.2}, others {:.2}",
        r["approach"].as_str().unwrap_or("?"),
        f(&r["requests_per_vm"]["poll"]),
        f(&r["requests_per_vm"]["other"])
    );
    let Some(locks) = r["locks"].as_object() else {
        return;
    };
    println!(
        "{}: lock | held s | free while waited s | span s (first take - last release, from the first task) | takes | timeouts",
        r["approach"].as_str().unwrap_or("?")
    );
    for (k, u) in locks {
        println!(
            "  {k} | {:.1} | {:.1} | {:.1} ({:.1} - {:.1}) | {} | {}",
            f(&u["held_seconds"]),
            f(&u["free_while_waited_seconds"]),
            f(&u["span_seconds"]),
            f(&u["first_take_at"]),
            f(&u["last_release_at"]),
            u["takes"],
            u["timeouts"]
        );
    }
}

fn print_table(rows: &[Value]) {
    println!(
        "| approach | end-to-end (wall s) | end-to-end (sim s) | task makespan (sim s) | lower bound | clone lower bound | makespan / bound | peak clones per node | failed clone tasks | client-side failures | VMs ok |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let peaks = r["peak_concurrent_clones"]["nodes"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let client = &r["client_failures"];
        let client = if client.is_null() {
            "-".to_owned()
        } else {
            format!(
                "lock-timeout {}, dup-VMID {}, other {} ({} rounds, {} given up)",
                client["lock_timeout"],
                client["duplicate_vmid"],
                client["other"],
                client["rounds"],
                client["given_up"]
            )
        };
        println!(
            "| {} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} | {} | {} | {} | {} |",
            r["approach"].as_str().unwrap_or_default(),
            f(&r["e2e_wall_s"]),
            f(&r["e2e_sim_s"]),
            f(&r["task_makespan_s"]),
            f(&r["lower_bound_s"]),
            f(&r["clone_lower_bound_s"]),
            f(&r["task_makespan_over_bound"]),
            peaks,
            r["failed_clone_tasks"],
            client,
            r["vms_ok"]
        );
    }
}

fn results_dir() -> PathBuf {
    lab::root().join("bench/results")
}

fn write_json(name: &str, v: &Value) -> anyhow::Result<()> {
    let p = results_dir().join(name);
    std::fs::create_dir_all(results_dir())?;
    std::fs::write(&p, serde_json::to_string_pretty(v)? + "\n")?;
    println!("wrote {}", p.display());
    Ok(())
}

pub async fn class(
    a: &ClassArgs,
    workers: usize,
    approaches: &[String],
    concurrent: bool,
    plot_path: Option<PathBuf>,
) -> anyhow::Result<()> {
    let spec = a.spec();
    println!(
        "class: {} students x 3 machines ({}), time scale {}, labfleet with {workers} in-process workers x 16, approaches {approaches:?}{}",
        a.students,
        a.clone,
        a.time_scale,
        if concurrent {
            ", run concurrently on separate simulators"
        } else {
            ""
        }
    );
    let runs: Vec<Run> = if concurrent {
        let fs = approaches.iter().map(|ap| run_one(&spec, ap, workers));
        futures::future::join_all(fs)
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?
    } else {
        let mut v = Vec::new();
        for ap in approaches {
            let r = run_one(&spec, ap, workers).await?;
            println!(
                "  {} done: {:.1} s wall (load {})",
                r.name,
                r.e2e,
                lab::loadavg()
            );
            v.push(r);
        }
        v
    };
    let rows: Vec<Value> = runs.iter().map(|r| summary(r, a.time_scale)).collect();
    print_table(&rows);
    for r in &rows {
        print_locks(r);
    }
    let path =
        plot_path.unwrap_or_else(|| results_dir().join(format!("class-{}-clones.png", a.tag())));
    let panels: Vec<(String, Series)> = runs
        .iter()
        .map(|r| {
            (
                format!(
                    "{}: task makespan {:.0} s, lower bound {:.0} s",
                    r.name,
                    f(&r.stats["task_makespan_seconds"]),
                    f(&r.stats["lower_bound_seconds"])
                ),
                r.series.clone(),
            )
        })
        .collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    plot::draw(
        &path,
        &format!(
            "Concurrent clones per (source) node, {} x 3 {} clones, time scale {}",
            a.students, a.clone, a.time_scale
        ),
        &panels,
    )?;
    println!("wrote {}", path.display());
    write_json(
        &format!("class-{}.json", a.tag()),
        &json!({"time_scale": a.time_scale, "students": a.students, "workers": workers, "concurrent": concurrent, "load_at_end": lab::loadavg(), "runs": rows}),
    )?;
    Ok(())
}

pub async fn scaling(a: &ClassArgs, workers: &[usize], conc: usize) -> anyhow::Result<()> {
    let spec = a.spec();
    println!(
        "scaling: {} students x 3 ({}), time scale {}, worker processes x concurrency {conc}",
        a.students, a.clone, a.time_scale
    );
    println!(
        "| worker processes | end-to-end (wall s) | jobs | jobs/s | task makespan (sim s) | lower bound | makespan / bound | load |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for &n in workers {
        let lab = Lab::new(&spec).await?;
        let mut children = lab.spawn_workers(n, conc)?;
        let r = async {
            let t0 = Instant::now();
            let (id, _) = lab.submit().await?;
            let end = lab.wait_done(&id, DEADLINE).await?;
            let rec = lab
                .store
                .deployment(&id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no record"))?;
            let g = lab.store.queue().group_stats(&rec.scope()).await?;
            anyhow::Ok(((end - t0).as_secs_f64(), g.done))
        }
        .await;
        lab::stop_workers(&mut children);
        let (e2e, jobs) = r?;
        let s = lab.sim.stats();
        let (tm, lb) = (f(&s["task_makespan_seconds"]), f(&s["lower_bound_seconds"]));
        println!(
            "| {n} | {e2e:.2} | {jobs} | {:.1} | {tm:.1} | {lb:.1} | {:.2} | {} |",
            jobs as f64 / e2e,
            tm / lb,
            lab::loadavg()
        );
        rows.push(json!({"workers": n, "e2e_wall_s": e2e, "jobs": jobs, "jobs_per_s": jobs as f64 / e2e, "task_makespan_s": tm, "lower_bound_s": lb}));
    }
    write_json(
        &format!("scaling-{}.json", a.tag()),
        &json!({"time_scale": a.time_scale, "students": a.students, "concurrency": conc, "rows": rows}),
    )
}

fn overhead_spec(students: usize, caps: lab::Caps) -> LabSpec {
    LabSpec {
        class: "overhead".into(),
        students,
        time_scale: 0.0,
        // These classes measure labfleet's own path, not the cluster: the simulated nodes'
        // memory is far from enough for thousands of VMs, so the capacity check (exit 7,
        // issue 15) is told to let them through.
        caps: lab::Caps {
            memory_overcommit: Some(100.0),
            ..caps
        },
        scaled_clocks: false,
    }
}

pub async fn overhead(
    students: usize,
    workers: usize,
    conc: usize,
    caps: lab::Caps,
    rounds: usize,
) -> anyhow::Result<()> {
    let spec = overhead_spec(students, caps);
    println!(
        "overhead: data/ example x {students} students = {} VMs, --time-scale 0, {workers} worker processes x {conc}, caps {caps:?}",
        students * 2
    );
    let mut rows = Vec::new();
    for round in 0..rounds {
        let lab = Lab::new(&spec).await?;
        let mut children = lab.spawn_workers(workers, conc)?;
        // Let the workers connect before the clock starts.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let redis_pid = lab::redis_pid(lab.redis_port());
        let pids: Vec<(String, Option<u32>)> = [
            (
                "bench (simulator + producer)".to_owned(),
                Some(std::process::id()),
            ),
            ("redis-server".to_owned(), redis_pid),
        ]
        .into_iter()
        .chain(
            children
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("worker {i}"), Some(c.id()))),
        )
        .collect();
        let cpu = |pids: &[(String, Option<u32>)]| -> Vec<f64> {
            pids.iter()
                .map(|(_, p)| p.and_then(lab::cpu_seconds).unwrap_or(0.0))
                .collect()
        };
        let cpu0 = cpu(&pids);
        let r = async {
            let t0 = Instant::now();
            let (id, plan) = lab.submit().await?;
            let submitted = t0.elapsed().as_secs_f64();
            let end = lab.wait_done(&id, DEADLINE).await?;
            anyhow::Ok((submitted, (end - t0).as_secs_f64(), plan.vms.len()))
        }
        .await;
        let used: Vec<(String, f64)> = pids
            .iter()
            .zip(cpu(&pids).iter().zip(&cpu0))
            .map(|((n, _), (a, b))| (n.clone(), a - b))
            .collect();
        if let Ok(path) = std::env::var("BENCH_TRACE") {
            trace_jobs(&lab, &path).await?;
        }
        lab::stop_workers(&mut children);
        let (sub, e2e, vms) = r?;
        let s = lab.sim.stats();
        println!(
            "  CPU seconds during the run: {}; total {:.1} s = {:.2} ms per VM",
            used.iter()
                .map(|(n, c)| format!("{n} {c:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            used.iter().map(|u| u.1).sum::<f64>(),
            used.iter().map(|u| u.1).sum::<f64>() * 1e3 / vms as f64
        );
        println!(
            "round {round}: {vms} VMs in {e2e:.2} s = {:.0} VMs/s end to end (submit {sub:.2} s), {} Proxmox requests, load {}",
            vms as f64 / e2e,
            s["requests_total"],
            lab::loadavg()
        );
        rows.push(json!({"vms": vms, "e2e_s": e2e, "submit_s": sub, "vms_per_s": vms as f64 / e2e, "requests_total": s["requests_total"], "requests": s["requests"], "cpu_seconds": used, "load": lab::loadavg()}));
    }
    let mut v: Vec<f64> = rows.iter().map(|r| f(&r["vms_per_s"])).collect();
    v.sort_by(f64::total_cmp);
    println!("median: {:.0} VMs/s", v[v.len() / 2]);
    write_json(
        "overhead.json",
        &json!({"students": students, "workers": workers, "concurrency": conc, "caps": format!("{caps:?}"), "rounds": rows}),
    )
}

/// Runs a binary to its end while sampling its VmHWM; (wall s, peak KiB, stdout).
fn run_measured(cmd: &mut std::process::Command) -> anyhow::Result<(f64, u64, String)> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id();
    let mut peak = 0;
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut o) = stdout {
            let _ = std::io::Read::read_to_string(&mut o, &mut s);
        }
        s
    });
    loop {
        if let Some(k) = lab::vm_hwm_kib(pid) {
            peak = peak.max(k);
        }
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = reader.join().unwrap_or_default();
    Ok((t0.elapsed().as_secs_f64(), peak, out))
}

pub async fn scale(students: usize, workers: usize, conc: usize) -> anyhow::Result<()> {
    let spec = overhead_spec(students, lab::Caps::default());
    let lab = Lab::new(&spec).await?;
    let vms = students * 2;
    println!("scale: data/ example x {students} students = {vms} VMs, --time-scale 0");
    let paths = shared::config::DataPaths::in_dir(lab.data.path());
    let t = Instant::now();
    let cfg = shared::config::load(&paths, None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let t_load = t.elapsed().as_secs_f64();
    let pve = lab.pve()?;
    let t = Instant::now();
    let mut facts = producer::deploy::gather_facts(&pve, &cfg).await?;
    let t_facts = t.elapsed().as_secs_f64();
    // Placement + VMID/bridge reservation + plan, as `submit` does (allocating in Redis).
    let t = Instant::now();
    let plan = producer::deploy::make_plan(
        &cfg,
        &mut facts,
        &lab.store,
        producer::deploy::AllocMode::Reserve,
    )
    .await?;
    let t_plan = t.elapsed().as_secs_f64();
    anyhow::ensure!(plan.vms.len() == vms, "planned {} VMs", plan.vms.len());
    // Where a submit's time goes: the plan's jobs built, then enqueued into a scratch
    // namespace of the same Redis (the real submit below enqueues them again, for real).
    let (t_plan_json, t_jobs, t_enqueue, n_jobs) = submit_breakdown(&lab, &plan).await?;
    // The whole submit (facts again, plan with the reservations already made, caps,
    // record, enqueue of every job).
    let t = Instant::now();
    let (id, _) = lab.submit().await?;
    let t_submit = t.elapsed().as_secs_f64();
    println!(
        "config load {:.3} s; facts {:.3} s; placement+allocation+plan {:.3} s; whole submit (facts+plan+enqueue) {:.3} s",
        t_load, t_facts, t_plan, t_submit
    );
    println!(
        "validated, planned and enqueued (load + submit - facts): {:.3} s",
        t_load + t_submit - t_facts
    );
    // Both forms of status, median of n calls each: the counters (`producer status`) and
    // every VM (`producer status --vms`).
    let (st_pending, st_pending_all, state) = timed_status(&lab, &id, 5).await?;
    println!(
        "status (in-process, {state}): median {:.1} ms from the counters, {:.1} ms listing every VM",
        st_pending * 1e3,
        st_pending_all * 1e3
    );
    let (t_deploy, peaks) = deploy_with_rss(&lab, &id, vms, workers, conc).await?;
    let (st_done, st_done_all, state) = timed_status(&lab, &id, 5).await?;
    println!(
        "status (in-process, {state}): median {:.1} ms from the counters, {:.1} ms listing every VM",
        st_done * 1e3,
        st_done_all * 1e3
    );
    let cli = cli_figures(&lab, &id)?;
    write_json(
        "scale.json",
        &json!({
            "vms": vms, "load_s": t_load, "facts_s": t_facts, "plan_s": t_plan, "submit_s": t_submit,
            "plan_json_s": t_plan_json, "jobs": n_jobs, "jobs_build_s": t_jobs, "enqueue_scratch_s": t_enqueue,
            "validated_planned_enqueued_s": t_load + t_submit - t_facts,
            "status_pending_ms": st_pending * 1e3, "status_done_ms": st_done * 1e3,
            "status_all_pending_ms": st_pending_all * 1e3, "status_all_done_ms": st_done_all * 1e3,
            "cli_status_all_s": cli.status_all.0, "cli_status_all_peak_rss_kib": cli.status_all.1,
            "deploy_s": t_deploy, "worker_peak_rss_kib": peaks,
            "cli_status_s": cli.status.0, "cli_status_peak_rss_kib": cli.status.1,
            "cli_plan_s": cli.plan.0, "cli_plan_peak_rss_kib": cli.plan.1,
        }),
    )
}

/// Where a submit's time goes: the plan's JSON, its jobs built, then enqueued into a
/// scratch namespace of the same Redis (the real submit enqueues them again, for real).
/// Returns (JSON s, jobs built s, enqueued s, jobs).
async fn submit_breakdown(
    lab: &Lab,
    plan: &shared::plan::Plan,
) -> anyhow::Result<(f64, f64, f64, usize)> {
    let t = Instant::now();
    let plan_json = serde_json::to_string(&plan)?;
    let t_plan_json = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let specs = shared::plan::jobs(plan, &format!("{}#0", plan.id), &BTreeMap::new());
    let t_jobs = t.elapsed().as_secs_f64();
    let scratch = shared::queue::Queue::connect(
        &lab.redis_url,
        shared::queue::QueueConfig::with_namespace("bench-scratch"),
    )
    .await?;
    let mut rc = scratch.connection();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut rc)
        .await?;
    let t = Instant::now();
    scratch.enqueue_batch(&specs).await?;
    let t_enqueue = t.elapsed().as_secs_f64();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut rc)
        .await?;
    let redis_us: f64 = info
        .lines()
        .filter(|l| l.starts_with("cmdstat_eval"))
        .filter_map(|l| {
            l.split("usec=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum();
    println!(
        "enqueue: Redis spent {:.3} s in scripts ({:.1} us per job)",
        redis_us / 1e6,
        redis_us / specs.len() as f64
    );
    println!(
        "of a submit: plan JSON {:.3} s ({} MB), {} job specs built {:.3} s, enqueued {:.3} s",
        t_plan_json,
        plan_json.len() / 1_000_000,
        specs.len(),
        t_jobs,
        t_enqueue
    );
    Ok((t_plan_json, t_jobs, t_enqueue, specs.len()))
}

/// Both forms of status, median of `n` calls each: the counters (`producer status`) and
/// every VM (`producer status --vms`), checked to agree. Returns (counters s, all s, state).
async fn timed_status(lab: &Lab, id: &str, n: usize) -> anyhow::Result<(f64, f64, String)> {
    let mut counters = Vec::new();
    let mut all = Vec::new();
    let mut state = String::new();
    for _ in 0..n {
        let t = Instant::now();
        let st = lab.status(id).await?;
        counters.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let full = lab.status_all(id).await?;
        all.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(
            (&st.state, &st.counts, &st.per_node) == (&full.state, &full.counts, &full.per_node),
            "the counters disagree with the per-VM status: {:?} vs {:?}",
            st.counts,
            full.counts
        );
        state = st.state.to_string();
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    anyhow::Ok((median(counters), median(all), state))
}

/// Deploys with `workers` processes, sampling their peak RSS. Returns (seconds, peaks KiB).
async fn deploy_with_rss(
    lab: &Lab,
    id: &str,
    vms: usize,
    workers: usize,
    conc: usize,
) -> anyhow::Result<(f64, Vec<u64>)> {
    let mut children = lab.spawn_workers(workers, conc)?;
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    let t = Instant::now();
    let mut peaks = vec![0u64; pids.len()];
    let done = lab.wait_done(id, DEADLINE);
    tokio::pin!(done);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let end = loop {
        tokio::select! {
            r = &mut done => break r,
            _ = tick.tick() => {
                for (i, p) in pids.iter().enumerate() {
                    peaks[i] = peaks[i].max(lab::vm_hwm_kib(*p).unwrap_or(0));
                }
            }
        }
    };
    let t_deploy = (end? - t).as_secs_f64();
    for (i, p) in pids.iter().enumerate() {
        peaks[i] = peaks[i].max(lab::vm_hwm_kib(*p).unwrap_or(0));
    }
    lab::stop_workers(&mut children);
    println!(
        "deployed {vms} VMs with {workers} worker processes in {t_deploy:.1} s ({:.0} VMs/s); worker peak RSS (VmHWM) {:?} MiB",
        vms as f64 / t_deploy,
        peaks.iter().map(|k| k / 1024).collect::<Vec<_>>()
    );
    Ok((t_deploy, peaks))
}

/// (wall seconds, peak RSS KiB) of the producer binary's commands.
struct CliFigures {
    status: (f64, u64),
    status_all: (f64, u64),
    plan: (f64, u64),
}

/// The producer binary: `status` and `plan` of the same deployment, with their RSS.
fn cli_figures(lab: &Lab, id: &str) -> anyhow::Result<CliFigures> {
    let bin = lab::release_bin("producer")?;
    let base = |c: &mut std::process::Command| {
        c.arg("--data-dir")
            .arg(lab.data.path())
            .args(["--redis", &lab.redis_url])
            .env("LABFLEET_SECRET_KEY", lab.key.to_base64().expose());
    };
    let mut c = std::process::Command::new(&bin);
    base(&mut c);
    c.args(["status", id, "--json"]);
    let (t_cli_status, rss_status, out) = run_measured(&mut c)?;
    println!(
        "`producer status ID --json` (process, {} bytes of JSON): {:.3} s wall, peak RSS {} MiB",
        out.len(),
        t_cli_status,
        rss_status / 1024
    );
    let mut c = std::process::Command::new(&bin);
    base(&mut c);
    c.args(["status", id, "--vms", "--json"]);
    let (t_cli_status_all, rss_status_all, out) = run_measured(&mut c)?;
    println!(
        "`producer status ID --vms --json` (process, {} bytes of JSON): {:.3} s wall, peak RSS {} MiB",
        out.len(),
        t_cli_status_all,
        rss_status_all / 1024
    );
    let mut c = std::process::Command::new(&bin);
    base(&mut c);
    c.args(["plan"]);
    let (t_cli_plan, rss_plan, _) = run_measured(&mut c)?;
    println!(
        "`producer plan` (process): {:.3} s wall, peak RSS {} MiB",
        t_cli_plan,
        rss_plan / 1024
    );
    Ok(CliFigures {
        status: (t_cli_status, rss_status),
        status_all: (t_cli_status_all, rss_status_all),
        plan: (t_cli_plan, rss_plan),
    })
}

/// What a request template is for.
fn request_kind(key: &str) -> &'static str {
    // Task status and log reads, and the task watcher's `GET /nodes/{node}/tasks`.
    if key.contains("/tasks/") || key.ends_with("/tasks") {
        "poll"
    } else if key.contains("/access/ticket") {
        "login"
    } else if key.ends_with("/clone")
        || key.contains("/qemu/{vmid}/config")
        // The permission step's pool add (the student's role is one ACL on the pool).
        || key == "PUT /pools/{poolid}"
        || key.contains("/status/start")
    {
        "per VM"
    } else if key.contains("/access/users") || key.contains("/pools") || key == "PUT /access/acl" {
        "per student"
    } else if key.contains("/network") {
        "per node"
    } else {
        "other"
    }
}

fn diff(after: &Value, before: &Value) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (k, v) in after.as_object().into_iter().flatten() {
        let d = v.as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
        if d > 0 {
            out.insert(k.clone(), d);
        }
    }
    out
}

pub async fn api(a: &ClassArgs, workers: usize) -> anyhow::Result<()> {
    let spec = a.spec();
    // Submit first, then start the workers: the producer's requests are counted apart.
    let r = run_labfleet(&spec, workers, true).await?;
    let vms = a.students * 3;
    let at_submit = r.requests_at_submit.clone().unwrap_or(Value::Null);
    let producer = diff(&at_submit, &json!({}));
    let workers_req = diff(&r.stats["requests"], &at_submit);
    println!(
        "api: {} students x 3 ({}), time scale {}, {vms} VMs, {workers} workers",
        a.students, a.clone, a.time_scale
    );
    println!(
        "producer (submit: facts and plan), {} requests:",
        producer.values().sum::<u64>()
    );
    for (k, v) in &producer {
        println!("  {v:>5}  {k}");
    }
    println!("| worker request | kind | count | per VM |");
    println!("|---|---|---|---|");
    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    for (k, v) in &workers_req {
        let kind = request_kind(k);
        *by_kind.entry(kind).or_default() += v;
        println!("| `{k}` | {kind} | {v} | {:.2} |", *v as f64 / vms as f64);
    }
    let tasks: u64 = r.stats["tasks"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(_, t)| t["started"].as_u64().unwrap_or(0))
        .sum();
    let polls = by_kind.get("poll").copied().unwrap_or(0);
    for (k, v) in &by_kind {
        println!("{k}: {v} = {:.2} per VM", *v as f64 / vms as f64);
    }
    println!(
        "non-poll requests per VM (per-VM kinds only): {:.2}; with per-student and per-node setup and other: {:.2}",
        by_kind.get("per VM").copied().unwrap_or(0) as f64 / vms as f64,
        (workers_req.values().sum::<u64>() - polls) as f64 / vms as f64
    );
    println!(
        "tasks {tasks} ({}), polls {polls} = {:.2} polls per task; failed clone tasks {:?}",
        r.stats["tasks"],
        polls as f64 / tasks.max(1) as f64,
        r.task_failures
    );
    write_json(
        &format!("api-{}.json", a.tag()),
        &json!({"vms": vms, "producer": producer, "workers": workers_req, "by_kind": by_kind, "tasks": r.stats["tasks"], "polls_per_task": polls as f64 / tasks.max(1) as f64, "summary": summary(&r, a.time_scale)}),
    )
}
