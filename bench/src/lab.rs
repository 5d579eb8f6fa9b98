//! One benchmark lab: a `redis-server` on a free port, the simulator in-process with the
//! pinned `data/sim/cluster.yml`, a temporary data folder aimed at it (a class from
//! `bench/data/`, N generated students), and the producer's store. Runs labfleet on it
//! with in-process workers or `worker` processes, and waits for the deployment.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use labfleet_tests::redis_server::{RedisOptions, RedisServer};
use pve_sim::{Sim, SimConfig, SimHandle};
use shared::config::{Config, DataPaths, load};
use shared::jobs::state::Store;
use shared::pve::PveClient;
use shared::queue::QueueConfig;
use shared::secret::SecretKey;
use tokio_util::sync::CancellationToken;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Caps written into the lab's `connections.yml` (`None`: labfleet's default).
#[derive(Debug, Clone, Default)]
pub struct Caps {
    pub per_node: Option<u32>,
    pub linked_per_storage: Option<u32>,
    pub full_per_storage: Option<u32>,
    pub max_requests: Option<u32>,
}

impl Caps {
    fn yaml(&self) -> String {
        let mut caps = Vec::new();
        if let Some(v) = self.per_node {
            caps.push(format!("per_node: {v}"));
        }
        if let Some(v) = self.linked_per_storage {
            caps.push(format!("linked_per_storage: {v}"));
        }
        if let Some(v) = self.full_per_storage {
            caps.push(format!("full_per_storage: {v}"));
        }
        let mut out = String::new();
        if !caps.is_empty() {
            out.push_str(&format!("  max_parallel_clones: {{{}}}\n", caps.join(", ")));
        }
        if let Some(v) = self.max_requests {
            out.push_str(&format!("  max_requests: {v}\n"));
        }
        out
    }
}

/// What a lab is made of.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Folder under `bench/data/` with the `deployment_config.yml`.
    pub class: String,
    pub students: usize,
    pub time_scale: f64,
    pub caps: Caps,
}

pub struct Lab {
    pub redis: RedisServer,
    pub sim: SimHandle,
    pub data: tempfile::TempDir,
    pub cfg: Config,
    pub key: SecretKey,
    pub qcfg: QueueConfig,
    pub store: Store,
}

pub async fn start_sim(time_scale: f64) -> anyhow::Result<SimHandle> {
    start_sim_with(&root().join("data/sim/cluster.yml"), time_scale).await
}

/// The simulator with another cluster file (a class's own, under `bench/data/<class>/`).
pub async fn start_sim_with(cluster: &Path, time_scale: f64) -> anyhow::Result<SimHandle> {
    let mut sc = SimConfig::from_cluster_file(cluster)?;
    sc.time_scale = time_scale;
    Sim::start(sc).await
}

impl Lab {
    pub async fn new(spec: &LabSpec) -> anyhow::Result<Lab> {
        // Durability as the README asks of production (AOF, fsync every second).
        let redis = RedisServer::start_with(RedisOptions::default());
        // A class may bring its own cluster (`bench/data/<class>/cluster.yml`).
        let own = root()
            .join("bench/data")
            .join(&spec.class)
            .join("cluster.yml");
        let sim = if own.exists() {
            start_sim_with(&own, spec.time_scale).await?
        } else {
            start_sim(spec.time_scale).await?
        };
        let data = tempfile::tempdir()?;
        let conn = std::fs::read_to_string(root().join("bench/data/connections.yml.in"))?
            .replace("{port}", &sim.addr().port().to_string())
            .replace("{fingerprint}", &sim.fingerprint().unwrap_or_default())
            .replace("{caps}\n", &spec.caps.yaml());
        std::fs::write(data.path().join("connections.yml"), conn)?;
        std::fs::copy(
            root()
                .join("bench/data")
                .join(&spec.class)
                .join("deployment_config.yml"),
            data.path().join("deployment_config.yml"),
        )
        .with_context(|| format!("class {}", spec.class))?;
        std::fs::write(data.path().join("users.yml"), users_yml(spec.students))?;
        let cfg =
            load(&DataPaths::in_dir(data.path()), None).map_err(|e| anyhow::anyhow!("{e}"))?;
        let qcfg = worker::queue_config();
        let queue = shared::queue::Queue::connect(&redis.url(), qcfg.clone()).await?;
        Ok(Lab {
            redis,
            sim,
            data,
            cfg,
            key: SecretKey::generate(),
            qcfg,
            store: Store::new(queue),
        })
    }

    pub fn pve(&self) -> anyhow::Result<PveClient> {
        producer::deploy::connect_pve(&self.cfg, Some(&self.key)).map_err(|f| f.error)
    }

    pub async fn submit(&self) -> anyhow::Result<(String, shared::plan::Plan)> {
        producer::deploy::submit(&self.cfg, &self.pve()?, &self.store, Some(&self.key))
            .await
            .map_err(|f| f.error)
    }

    /// The counter-based status, as `producer status` and its polling read it.
    pub async fn status(&self, id: &str) -> anyhow::Result<producer::deploy::Status> {
        producer::deploy::summary(&self.store, id)
            .await
            .map_err(|f| f.error)
    }

    /// Every VM's status (`producer status --vms`).
    pub async fn status_all(&self, id: &str) -> anyhow::Result<producer::deploy::Status> {
        producer::deploy::status(&self.store, id)
            .await
            .map_err(|f| f.error)
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
            let mut wc = worker::WorkerConfig::new(self.redis.url(), self.data.path());
            wc.queue = self.qcfg.clone();
            wc.name = Some(format!("bench-w{i}"));
            wc.secret_key = Some(self.key.clone());
            wc.concurrency = conc;
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
                .args(["--redis", &self.redis.url(), "--data-dir"])
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

/// `users.yml` with students `s0001@pve` ...
pub fn users_yml(n: usize) -> String {
    let mut s = String::from("users:\n");
    for i in 1..=n {
        s.push_str(&format!("  - \"s{i:05}@pve\"\n"));
    }
    s
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
