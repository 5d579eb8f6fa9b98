//! One benchmark lab: the tests' lab (`labfleet_tests::lab`: a `redis-server` on a free
//! port, the simulator in-process with the pinned `data/sim/cluster.yml`, a temporary data
//! folder aimed at it) with a class from `bench/data/` and N generated students. Runs
//! labfleet on it with in-process workers or `worker` processes, and waits for the
//! deployment.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use labfleet_tests::lab::{LabOpts, LabRedis};
use labfleet_tests::redis_server::RedisOptions;
use shared::pve::PveClient;
use tokio_util::sync::CancellationToken;

pub use labfleet_tests::bins::root;
/// Caps written into the lab's `connections.yml` (`None`: labfleet's default).
pub use labfleet_tests::lab::Caps;

/// What a lab is made of.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Folder under `bench/data/` with the `deployment_config.yml`.
    pub class: String,
    pub students: usize,
    pub time_scale: f64,
    pub caps: Caps,
    /// Runs labfleet's own clocks (task polls, the idle claim poll, retry backoffs) at the
    /// simulator's time scale too, as they run against a real cluster (time scale 1): with
    /// wall-clock timers, a 1 s poll at time scale 0.1 is a 10 s poll in simulated time.
    pub scaled_clocks: bool,
}

/// The tests' lab (`labfleet_tests::lab`) with a class from `bench/data/` and the bench's
/// students; Redis with the durability the README asks of production (AOF, fsync every
/// second).
pub struct Lab {
    lab: labfleet_tests::lab::Lab,
    time_scale: f64,
    scaled_clocks: bool,
}

impl std::ops::Deref for Lab {
    type Target = labfleet_tests::lab::Lab;
    fn deref(&self) -> &Self::Target {
        &self.lab
    }
}

impl Lab {
    pub async fn new(spec: &LabSpec) -> anyhow::Result<Lab> {
        let class = root()
            .join("bench/data")
            .join(&spec.class)
            .join("deployment_config.yml");
        let deployment =
            std::fs::read_to_string(&class).with_context(|| format!("class {}", spec.class))?;
        let mut o = LabOpts::new(&deployment, 0);
        o.users = (1..=spec.students)
            .map(|i| format!("s{i:05}@pve"))
            .collect();
        o.time_scale = spec.time_scale;
        o.caps = spec.caps;
        o.redis = LabRedis::Single(RedisOptions::default());
        // A class may bring its own cluster (`bench/data/<class>/cluster.yml`).
        let own = root()
            .join("bench/data")
            .join(&spec.class)
            .join("cluster.yml");
        if own.exists() {
            o.cluster_file = Some(own);
        }
        Ok(Lab {
            lab: labfleet_tests::lab::Lab::start(o).await?,
            time_scale: spec.time_scale,
            scaled_clocks: spec.scaled_clocks,
        })
    }

    /// The port of the lab's `redis-server`.
    pub fn redis_port(&self) -> u16 {
        self.redis.as_ref().expect("a single server").port()
    }

    pub fn pve(&self) -> anyhow::Result<PveClient> {
        Ok(producer::deploy::connect_pve(&self.cfg, Some(&self.key))?)
    }

    pub async fn submit(&self) -> anyhow::Result<(String, shared::plan::Plan)> {
        Ok(self.lab.submit().await?)
    }

    /// The counter-based status, as `producer status` and its polling read it.
    pub async fn status(&self, id: &str) -> anyhow::Result<producer::deploy::Status> {
        Ok(producer::deploy::summary(&self.store, id).await?)
    }

    /// Every VM's status (`producer status --vms`).
    pub async fn status_all(&self, id: &str) -> anyhow::Result<producer::deploy::Status> {
        Ok(producer::deploy::status(&self.store, id).await?)
    }

    /// Waits until the deployment is done (or failed); the instant it was seen. Polls the
    /// group's O(1) job counts every 5 ms and confirms with one `status` when nothing is
    /// left to run: calling `status` itself every few ms would cost more CPU than the
    /// workers on a 2,000-VM deployment and distort what is measured.
    pub async fn wait_done(&self, id: &str, deadline: Duration) -> anyhow::Result<Instant> {
        let end = Instant::now() + deadline;
        let scope = self
            .store
            .deployment(id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no deployment {id}"))?
            .scope();
        loop {
            let g = self.store.queue().group_stats(&scope).await?;
            if g.ready + g.scheduled + g.in_flight + g.waiting_for_slot + g.gated > 0 {
                anyhow::ensure!(
                    Instant::now() < end,
                    "deployment {id} not done after {deadline:?}: {g:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            let st = self.status(id).await?;
            match st.state.as_str() {
                "done" => return Ok(Instant::now()),
                "failed" => anyhow::bail!("deployment {id} failed: {:?}", st.counts),
                _ => {}
            }
            anyhow::ensure!(
                Instant::now() < end,
                "deployment {id} not done after {deadline:?}: {:?}",
                st.counts
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs `flow` while `n` in-process workers (concurrency `conc`) consume the queue.
    pub async fn with_workers<F, T>(&self, n: usize, conc: usize, flow: F) -> anyhow::Result<T>
    where
        F: std::future::Future<Output = anyhow::Result<T>>,
    {
        let shutdown = CancellationToken::new();
        let mut workers = Vec::new();
        for i in 0..n {
            let mut wc = self.worker_config(&format!("bench-w{i}"));
            wc.concurrency = conc;
            if self.scaled_clocks {
                wc.scale_clocks(self.time_scale);
            }
            workers.push(worker::run(wc, shutdown.child_token()));
        }
        // apalis worker futures are not Send: they run in this task beside the flow.
        let workers = futures::future::join_all(workers);
        let flow = async {
            let r = flow.await;
            shutdown.cancel();
            r
        };
        let (r, results) = tokio::join!(flow, workers);
        for w in results {
            w?;
        }
        r
    }

    /// Starts `n` `worker` processes (release build) against this lab.
    pub fn spawn_workers(&self, n: usize, conc: usize) -> anyhow::Result<Vec<Child>> {
        let bin = release_bin("worker")?;
        let mut out = Vec::new();
        for i in 0..n {
            let c = Command::new(&bin)
                .args(["--redis", &self.redis_url, "--data-dir"])
                .arg(self.data.path())
                .args([
                    "--concurrency",
                    &conc.to_string(),
                    "--name",
                    &format!("bench-p{i}"),
                    "-q",
                ])
                .env("LABFLEET_SECRET_KEY", self.key.to_base64().expose())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            out.push(c);
        }
        Ok(out)
    }
}

/// Stops worker processes with SIGTERM (graceful) and reaps them.
pub fn stop_workers(children: &mut [Child]) {
    for c in children.iter() {
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

/// The release build of a workspace binary; says how to build it when missing.
pub fn release_bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = labfleet_tests::bins::target_dir()
        .join("release")
        .join(name);
    anyhow::ensure!(
        p.exists(),
        "{} is missing: build it with `cargo build --release -p {name}`",
        p.display()
    );
    Ok(p)
}

/// Peak resident set (`VmHWM`) of a live process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One-minute load average, for the reports.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// CPU seconds (user + system) a live process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// The pid of the `redis-server` listening on `port` (its title is `redis-server ADDR:PORT`).
pub fn redis_pid(port: u16) -> Option<u32> {
    let want = format!(":{port}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read_to_string(e.path().join("cmdline")).ok()?;
        (cmd.starts_with("redis-server") && cmd.contains(&want)).then_some(pid)
    })
}
