//! `producer demo`: the whole path on this machine. Starts the Proxmox simulator in-process
//! on 127.0.0.1:8006 with the demo certificate (the shipped connections.yml pins it), two
//! workers in-process, submits the `data/` example, shows live progress and a final table.
//! Needs only Redis; its state goes under a namespace of its own, removed at the end.
//! It also takes a baseline snapshot of every VM, resets the first student to it and
//! lists the weekly schedule it installs (the classroom commands).
//! Built only with the `demo` feature (on by default), the one user of `worker` and
//! `pve-sim` in the producer.
//! With `--serve` the dashboard runs beside it from the start, and the deployment, the
//! workers and the dashboard stay up after the table until Ctrl-C; the namespace goes then.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use pve_sim::{Sim, SimConfig, SimHandle, TlsMode};
use shared::jobs::state::Store;
use shared::secret::SecretKey;
use tokio_util::sync::CancellationToken;

use crate::cli::Global;
use crate::cmd::{context, handout, serve as serve_cmd, status};
use crate::deploy;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(
    g: &Global,
    time_scale: f64,
    serve: Option<SocketAddr>,
    out: &mut Out,
) -> Result<Exit, Failure> {
    let cfg = with_classroom(context::load_config(g, out)?);
    // Bound first, so a taken port fails before anything starts.
    let listener = match serve {
        Some(addr) => {
            if !addr.ip().is_loopback() {
                return Err(Failure::new(
                    Exit::Usage,
                    anyhow::anyhow!(
                        "the demo's dashboard has no tokens and listens on loopback only, not on {addr}; for more, run `producer serve` with tokens"
                    ),
                ));
            }
            Some(serve_cmd::bind(addr).await?)
        }
        None => None,
    };
    let mut qcfg = shared::jobs::queue_config();
    qcfg.namespace = format!("lf-demo-{}", std::process::id());
    let queue = deploy::connect_queue(&g.redis, qcfg.clone()).await?;
    let store = Store::new(queue.clone());

    let sim = start_sim(g, &cfg, time_scale, out).await?;

    let key = match context::secret_key()? {
        Some(k) => k,
        None => SecretKey::generate(),
    };
    let shutdown = CancellationToken::new();
    let workers: Vec<_> = (1..=2u32)
        .map(|i| {
            let mut wc = worker::WorkerConfig::new(g.redis.clone(), g.data_dir.clone());
            wc.queue = qcfg.clone();
            wc.name = Some(format!("demo-worker-{i}"));
            wc.secret_key = Some(key.clone());
            wc.concurrency = 16;
            worker::run(wc, shutdown.child_token())
        })
        .collect();

    // The workers run in this task beside the submit-and-watch flow (apalis worker futures
    // are not `Send`-general enough for `tokio::spawn`).
    let workers = futures::future::join_all(workers);
    let serve_stop = CancellationToken::new();
    let keep_serving = listener.is_some();
    if let Some(l) = &listener {
        serve_cmd::announce(l, out);
    }
    let dashboard = async {
        match listener {
            Some(l) => {
                let cfg = crate::serve::ServeConfig {
                    secret_key: Some(key.clone()),
                    ..crate::serve::ServeConfig::default()
                };
                crate::serve::run(store.clone(), cfg, l, serve_stop.clone()).await
            }
            None => Ok(()),
        }
    };
    let flow = async {
        let pve = deploy::connect_pve(&cfg, Some(&key))?;
        let started = std::time::Instant::now();
        let (id, plan) = deploy::submit(&cfg, &pve, &store, Some(&key)).await?;
        out.err_line(format!(
            "submitted {id}: {} VMs for {} students on {} nodes",
            plan.vms.len(),
            plan.students.len(),
            plan.placement.load.len()
        ));
        let code = status::watch(&store, &id, g.json, out, Duration::from_millis(300)).await?;
        let took = started.elapsed();
        let dir: PathBuf = std::env::temp_dir();
        let console = handout::console_base(&cfg, &store, &pve, &id, out).await?;
        let handout = handout::write(&store, &pve, &id, &key, &dir, console.as_deref()).await?;
        if !g.json {
            out.line(format!("finished in {:.1} s", took.as_secs_f64()));
            out.line(handout.describe());
            let stats = sim.stats();
            out.line(format!(
                "simulator: task makespan {:.1} s (lower bound {:.1} s), peak concurrent clones per node {}",
                stats["task_makespan_seconds"].as_f64().unwrap_or(0.0),
                stats["lower_bound_seconds"].as_f64().unwrap_or(0.0),
                stats["peak_concurrent_clones"]["nodes"]
            ));
        }
        if !g.json {
            classroom(&store, &plan, &cfg, out).await?;
        }
        Ok::<Exit, Failure>(code)
    };
    let flow = async {
        let r = flow.await;
        if keep_serving && r.is_ok() {
            eprintln!(
                "the demo deployment and its dashboard stay up; Ctrl-C stops them and removes the demo's Redis keys"
            );
            serve_cmd::wait_for_signal().await;
        }
        serve_stop.cancel();
        shutdown.cancel();
        r
    };
    let (result, _, served) = tokio::join!(flow, workers, dashboard);
    if let Err(e) = served {
        tracing::warn!(error = %e, "the demo's dashboard stopped with an error");
    }
    sim.shutdown().await;
    cleanup(&queue).await;
    result
}

/// The demo also shows the classroom: a baseline to reset to, and a weekly schedule.
fn with_classroom(mut cfg: shared::config::Config) -> shared::config::Config {
    cfg.deployment.baseline = true;
    if cfg.deployment.schedule.is_none() {
        cfg.deployment.schedule = Some(demo_schedule());
    }
    cfg
}

/// The demo's schedule: Mondays and Thursdays 08:00-09:30 in Berlin.
fn demo_schedule() -> shared::config::schedule::Schedule {
    use chrono::NaiveTime;
    let at = |h, m| NaiveTime::from_hms_opt(h, m, 0).expect("valid time");
    shared::config::schedule::Schedule {
        timezone: "Europe/Berlin".into(),
        start_before_secs: 600,
        warn_before_secs: 600,
        expires_at: None,
        windows: vec![shared::config::schedule::Window {
            days: vec![0, 3],
            date: None,
            start: at(8, 0),
            end: at(9, 30),
        }],
    }
}

/// Resets the first student's VMs to their baseline, then lists the schedule.
async fn classroom(
    store: &Store,
    plan: &shared::plan::Plan,
    cfg: &shared::config::Config,
    out: &mut Out,
) -> Result<(), Failure> {
    use crate::operation::{self, OpKind, OpRequest, Selectors};
    let Some(first) = plan.students.first() else {
        return Ok(());
    };
    out.line(format!("reset of {} to the baseline snapshot:", first.user));
    let req = OpRequest {
        kind: OpKind::Reset,
        selectors: Selectors {
            students: vec![first.user.clone()],
            vms: vec![],
        },
        timeout_secs: None,
        starts_per_node: cfg.connection().starts_per_node,
    };
    let mut rep = operation::start(store, &plan.id, &req).await?;
    operation::wait(store, &mut rep, Duration::from_millis(200), |_| {}).await?;
    crate::cmd::power::print(&rep, false, out);
    crate::cmd::schedule::print_listing(store, &plan.id, false, out).await
}

/// Removes the demo's namespace from Redis.
async fn cleanup(queue: &shared::queue::Queue) {
    if let Err(e) = queue.delete_namespace().await {
        tracing::warn!(error = %e, "could not remove the demo's Redis keys");
    }
}

/// Starts the simulator on the address the shipped connections.yml names, with the demo
/// certificate it pins.
async fn start_sim(
    g: &Global,
    cfg: &shared::config::Config,
    time_scale: f64,
    out: &mut Out,
) -> Result<SimHandle, Failure> {
    let sim_dir = g.data_dir.join("sim");
    let mut sc = SimConfig::from_cluster_file(&sim_dir.join("cluster.yml"))
        .map_err(|e| Failure::new(Exit::Usage, e))?;
    sc.listen = SocketAddr::from(([127, 0, 0, 1], cfg.connection().host.port));
    sc.tls = TlsMode::Pem {
        cert: sim_dir.join("demo-cert.pem"),
        key: sim_dir.join("demo-key.pem"),
    };
    sc.time_scale = time_scale;
    let sim = Sim::start(sc)
        .await
        .with_context(|| {
            format!(
                "starting the simulator on {} (is another one running?)",
                cfg.connection().host.authority()
            )
        })
        .map_err(|e| Failure::new(Exit::ProxmoxUnreachable, e))?;
    out.err_line(format!(
        "simulated Proxmox VE cluster on {} (time scale {time_scale})",
        sim.base_url()
    ));
    Ok(sim)
}
