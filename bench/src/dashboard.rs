//! `dashboard`: the server-side render time of a deployment's page (`producer serve`) for a
//! 10,000-VM class: the data/ example x 5,000 students, submitted to the simulator, rendered
//! before it runs (every VM pending) and once two in-process workers have deployed it
//! (`--time-scale 0`). What is timed is the page handler itself (Redis reads, the grid,
//! the HTML), called in-process as a request would call it; the first render of each state
//! includes parsing the plan, later ones reuse it (the server keeps parsed plans while the
//! deployment record does not change). Nothing here asserts a time.

use std::time::{Duration, Instant};

use producer::serve::auth::{Role, Session};
use producer::serve::{self, ServeConfig};

use crate::lab::{self, Lab, LabSpec};

/// Renders the page `n` times; (first, median of the rest) in ms, and the page's size.
async fn timed(app: &serve::routes::App, id: &str, n: usize) -> anyhow::Result<(f64, f64, usize)> {
    let session = Session {
        id: "bench".into(),
        role: Some(Role::Admin),
        csrf: "bench".into(),
        fresh: false,
    };
    let mut times = Vec::with_capacity(n);
    let mut size = 0;
    for _ in 0..n {
        let t = Instant::now();
        let resp = serve::routes::render_deployment(app, &session, id).await;
        anyhow::ensure!(resp.status().is_success(), "render: {}", resp.status());
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        size = body.len();
    }
    let first = times[0];
    let mut rest = times[1..].to_vec();
    rest.sort_by(f64::total_cmp);
    Ok((first, rest[rest.len() / 2], size))
}

pub async fn run(students: usize, renders: usize) -> anyhow::Result<()> {
    let spec = LabSpec {
        class: "overhead".into(),
        students,
        time_scale: 0.0,
        caps: lab::Caps::default(),
        scaled_clocks: false,
    };
    let lab = Lab::new(&spec).await?;
    let (id, plan) = lab.submit().await?;
    let vms = plan.vms.len();
    println!(
        "dashboard: {vms} VMs ({students} students x 2 machines), load {}",
        lab::loadavg()
    );
    let app = serve::app(lab.store.clone(), &ServeConfig::default());
    let n = renders.max(2);
    let (first, median, size) = timed(&app, &id, n).await?;
    println!(
        "deployment page, every VM pending: first render {first:.1} ms (plan parsed), median of {} more {median:.1} ms, {:.1} MB of HTML",
        n - 1,
        size as f64 / 1e6
    );
    let t = Instant::now();
    lab.with_workers(2, 16, lab.wait_done(&id, Duration::from_secs(900)))
        .await?;
    println!(
        "deployed by 2 in-process workers in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (first, median, size) = timed(&app, &id, n).await?;
    println!(
        "deployment page, every VM done: first render {first:.1} ms, median of {} more {median:.1} ms, {:.1} MB of HTML",
        n - 1,
        size as f64 / 1e6
    );
    Ok(())
}
