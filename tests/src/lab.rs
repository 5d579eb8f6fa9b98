//! One lab for every integration test and benchmark: a real Redis (one `redis-server`, or a
//! Sentinel set), the simulator in-process over HTTPS with the pinned `data/sim/cluster.yml`,
//! a temporary data folder aimed at it (`connections.yml` with the caps asked for, the
//! deployment, the students), the secret key and the producer's store. Workers run either
//! in-process ([`Lab::with_workers`]) or as real processes ([`Lab::fleet`]).
//!
//! The simulated cluster's root password and token secret are this module's, not the demo's:
//! the demo's secret is public, and `labfleet` (the demo password) appears in every marker,
//! so a scan of logs for it would prove nothing.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use pve_sim::{Sim, SimConfig, SimHandle};
use shared::config::{Config, DataPaths, load};
use shared::jobs::state::Store;
use shared::plan::Plan;
use shared::pve::PveClient;
use shared::queue::{Queue, QueueConfig};
use shared::secret::SecretKey;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, WorkerOpts};
use crate::redis_server::{RedisOptions, RedisServer};
use crate::sentinel::SentinelSet;

/// The root password of the simulated cluster.
pub const ROOT_PW: &str = "Rel1ab-root-pw-7c41e9";
/// The secret of root@pam's `labfleet` API token in the simulated cluster.
pub const TOKEN_SECRET: &str = "5e1f0c2a-7d43-4b9e-a8c1-3f2d9b6e0a71";

/// How labfleet logs in to the simulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    Token,
    Password,
}

/// Caps written into `connections.yml` (`None`: labfleet's default).
#[derive(Clone, Copy, Debug, Default)]
pub struct Caps {
    pub per_node: Option<u32>,
    pub linked_per_storage: Option<u32>,
    pub full_per_storage: Option<u32>,
    pub max_requests: Option<u32>,
    /// `memory_overcommit` (`None`: labfleet's default, 1.5).
    pub memory_overcommit: Option<f64>,
    /// `node_lost_after` (`None`: labfleet's default, 120s).
    pub node_lost_after: Option<&'static str>,
}

/// Which Redis the lab runs.
#[derive(Clone, Debug)]
pub enum LabRedis {
    Single(RedisOptions),
    /// A master, a replica and three sentinels; the `requirepass` of every node, if any.
    Sentinel(Option<&'static str>),
}

/// A change to the simulated cluster before it starts.
pub type SimSetup = Box<dyn FnOnce(&mut SimConfig) + Send>;

/// What a lab is made of.
pub struct LabOpts {
    pub time_scale: f64,
    /// The students, as users.yml lists them.
    pub users: Vec<String>,
    /// The text of `deployment_config.yml`.
    pub deployment: String,
    pub auth: Auth,
    pub caps: Caps,
    pub redis: LabRedis,
    /// The simulated cluster's file (default `data/sim/cluster.yml`).
    pub cluster_file: Option<std::path::PathBuf>,
    /// The simulator's seed (fault draws); `None`: the cluster file's.
    pub seed: Option<u64>,
    /// Changes the simulated cluster before it starts (objects an earlier version made).
    pub sim_setup: Option<SimSetup>,
    /// The secret key (default: a new one).
    pub key: Option<SecretKey>,
    /// Adjusts the queue settings of the store and of in-process workers.
    pub queue: Option<fn(&mut QueueConfig)>,
}

impl LabOpts {
    /// `n` students `student1@pve` .. on `deployment`, at time scale 0, defaults otherwise.
    pub fn new(deployment: &str, n: usize) -> LabOpts {
        LabOpts {
            time_scale: 0.0,
            users: students(n),
            deployment: deployment.to_owned(),
            auth: Auth::Token,
            caps: Caps::default(),
            redis: LabRedis::Single(RedisOptions::default()),
            cluster_file: None,
            seed: None,
            sim_setup: None,
            key: None,
            queue: None,
        }
    }
}

/// `student1@pve` .. `student<n>@pve`.
pub fn students(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("student{i}@pve")).collect()
}

/// A `connections.yml` entry for the simulator at `port` pinned to `fingerprint`.
pub fn connection_yaml(name: &str, port: u16, fingerprint: &str, auth: Auth, caps: Caps) -> String {
    let auth = match auth {
        Auth::Token => format!("  token_name: labfleet\n  token_secret: \"{TOKEN_SECRET}\"\n"),
        Auth::Password => format!("  password: \"{ROOT_PW}\"\n"),
    };
    let mut out = format!(
        "{name}:\n  host: \"127.0.0.1:{port}\"\n  user: root@pam\n{auth}  fingerprint: \"{fingerprint}\"\n"
    );
    let slots: Vec<String> = [
        ("per_node", caps.per_node),
        ("linked_per_storage", caps.linked_per_storage),
        ("full_per_storage", caps.full_per_storage),
    ]
    .iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k}: {v}")))
    .collect();
    if !slots.is_empty() {
        out.push_str(&format!(
            "  max_parallel_clones: {{{}}}\n",
            slots.join(", ")
        ));
    }
    if let Some(v) = caps.max_requests {
        out.push_str(&format!("  max_requests: {v}\n"));
    }
    if let Some(v) = caps.memory_overcommit {
        out.push_str(&format!("  memory_overcommit: {v}\n"));
    }
    if let Some(v) = caps.node_lost_after {
        out.push_str(&format!("  node_lost_after: {v}\n"));
    }
    out
}

/// A `users.yml` listing `users`.
pub fn users_yaml(users: &[String]) -> String {
    let list: String = users.iter().map(|u| format!("  - \"{u}\"\n")).collect();
    format!("users:\n{list}")
}

/// A running lab. Dropping it stops the simulator's server task with the runtime, and the
/// Redis processes and the data folder with it.
pub struct Lab {
    /// The one server, or `None` with `sentinels`.
    pub redis: Option<RedisServer>,
    pub sentinels: Option<SentinelSet>,
    /// What the producer and the workers are given.
    pub redis_url: String,
    pub sim: SimHandle,
    pub data: tempfile::TempDir,
    pub cfg: Config,
    pub key: SecretKey,
    /// The queue settings of the store and of in-process workers.
    pub qcfg: QueueConfig,
    pub store: Store,
}

impl Lab {
    pub async fn start(o: LabOpts) -> anyhow::Result<Lab> {
        let (redis, sentinels) = match o.redis {
            LabRedis::Single(opts) => (Some(RedisServer::start_with(opts)), None),
            LabRedis::Sentinel(pw) => (None, Some(SentinelSet::start(pw))),
        };
        let redis_url = match (&redis, &sentinels) {
            (Some(r), _) => r.url(),
            (_, Some(s)) => s.url(),
            _ => unreachable!("one of the two runs"),
        };
        let cluster = o
            .cluster_file
            .unwrap_or_else(|| crate::bins::root().join("data/sim/cluster.yml"));
        let mut sc = SimConfig::from_cluster_file(&cluster)?;
        sc.time_scale = o.time_scale;
        if let Some(seed) = o.seed {
            sc.seed = seed;
        }
        sc.cluster.api.auth_failure_delay_seconds = 0.0;
        for u in sc
            .cluster
            .users
            .iter_mut()
            .filter(|u| u.userid == "root@pam")
        {
            u.password = Some(ROOT_PW.to_owned());
            for t in &mut u.tokens {
                t.secret = TOKEN_SECRET.to_owned();
            }
        }
        if let Some(setup) = o.sim_setup {
            setup(&mut sc);
        }
        let sim = Sim::start(sc).await?;
        let data = tempfile::tempdir()?;
        let fp = sim.fingerprint().unwrap_or_default();
        let dir = data.path();
        std::fs::write(
            dir.join("connections.yml"),
            connection_yaml("lab", sim.addr().port(), &fp, o.auth, o.caps),
        )?;
        std::fs::write(dir.join("deployment_config.yml"), &o.deployment)?;
        std::fs::write(dir.join("users.yml"), users_yaml(&o.users))?;
        let cfg = load(&DataPaths::in_dir(dir), None).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut qcfg = shared::jobs::queue_config();
        if let Some(adjust) = o.queue {
            adjust(&mut qcfg);
        }
        let queue = Queue::connect(&redis_url, qcfg.clone()).await?;
        Ok(Lab {
            redis,
            sentinels,
            redis_url,
            sim,
            data,
            cfg,
            key: o.key.unwrap_or_else(SecretKey::generate),
            qcfg,
            store: Store::new(queue),
        })
    }

    pub fn queue(&self) -> &Queue {
        self.store.queue()
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// A Proxmox client as the producer makes one.
    pub fn pve(&self) -> PveClient {
        producer::deploy::connect_pve(&self.cfg, Some(&self.key)).expect("the lab's connection")
    }

    /// `producer submit`, in-process.
    pub async fn submit(&self) -> Result<(String, Plan), producer::deploy::DeployError> {
        producer::deploy::submit(&self.cfg, &self.pve(), &self.store, Some(&self.key)).await
    }

    /// The deployment's state word from the per-VM status (empty when it cannot be read).
    pub async fn state(&self, id: &str) -> String {
        producer::deploy::status(&self.store, id)
            .await
            .map(|s| s.state.to_string())
            .unwrap_or_default()
    }

    /// The producer binary aimed at this lab's data folder and Redis (no key, no `RUST_LOG`).
    pub fn producer_cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new(crate::bins::bin("producer"));
        c.arg("--data-dir")
            .arg(self.data.path())
            .arg("--redis")
            .arg(&self.redis_url)
            .env_remove("RUST_LOG");
        c
    }

    /// Worker processes on this lab's Redis, data folder and key (none started yet).
    pub fn fleet(&self, opts: WorkerOpts) -> Fleet {
        Fleet::new(
            &self.redis_url,
            self.data.path(),
            self.key.to_base64().expose(),
            opts,
        )
    }

    /// The configuration of an in-process worker named `name` on this lab.
    pub fn worker_config(&self, name: &str) -> worker::WorkerConfig {
        let mut wc = worker::WorkerConfig::new(self.redis_url.clone(), self.data.path());
        wc.queue = self.qcfg.clone();
        wc.name = Some(name.to_owned());
        wc.secret_key = Some(self.key.clone());
        wc.concurrency = 8;
        wc
    }

    /// Runs `flow` with `n` in-process workers (`w0`, `w1`, ...; `timing` for their
    /// handlers), then stops them and checks that they stopped cleanly.
    pub async fn with_workers<F: Future<Output = ()>>(
        &self,
        n: usize,
        timing: shared::jobs::Timing,
        flow: F,
    ) {
        let shutdown = CancellationToken::new();
        let workers: Vec<_> = (0..n)
            .map(|i| {
                let mut wc = self.worker_config(&format!("w{i}"));
                wc.timing = timing.clone();
                worker::run(wc, shutdown.child_token())
            })
            .collect();
        let workers = futures::future::join_all(workers);
        let flow = async {
            flow.await;
            shutdown.cancel();
        };
        let ((), results) = tokio::join!(flow, workers);
        for r in results {
            r.expect("worker ran and stopped cleanly");
        }
    }
}

/// Short leases and quick retries, for tests that wait on crashes and faults.
pub fn quick_queue(q: &mut QueueConfig) {
    q.lease = Duration::from_secs(5);
    q.renew_every = q.lease / 3;
    q.reap_every = Duration::from_millis(500);
    q.idle_poll = Duration::from_millis(100);
    crate::retries::fast(q);
}
