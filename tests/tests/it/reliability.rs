//! Reliability (issue 7): crashes, stale workers, Redis restarts, Proxmox faults, graceful
//! shutdown, caps under chaos, bad input and secrets, one test per property. Real parts only:
//! a real redis-server, the simulator in-process over real HTTPS (pinned fingerprint) and
//! real `worker` processes (`labfleet_tests::fleet`) that are killed, stopped and resumed.
//!
//! Each test first asserts that it exercised its fault, then checks the outcome through the
//! simulator's state and Redis. The scenarios are seeded (`LABFLEET_SEED`, default 7): the
//! simulator's fault draws and the choice and timing of kills follow the seed; the process
//! scheduling of a loaded machine does not. `LABFLEET_FULL=1` runs the full sizes (300 VMs).
//! Measured figures are printed to stderr (`--nocapture`).

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use labfleet_tests::bins::bin;
use labfleet_tests::fleet::{Fleet, WorkerOpts};
use labfleet_tests::lab::{Auth, Lab, LabOpts, LabRedis, ROOT_PW, TOKEN_SECRET};
use labfleet_tests::redis_server::{RedisOptions, RedisServer};
use labfleet_tests::wait::wait_for;
use pve_sim::{Fault, FaultPlan, SimConfig};
use serde_json::Value;
use shared::plan::Plan;
use shared::pve::Method;
use shared::queue::{JobSpec, Queue};
use shared::secret::SecretKey;

/// These tests start several worker processes, a Redis and a simulator each, and measure
/// timing against the lease; running them one at a time keeps a 2-core machine's load (and
/// so the figures) honest, whatever the test harness runs beside them.
pub(crate) static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(crate) const TWO_MACHINES: &str = "name: rel-lab\nmachines:\n  - {device_type: linux, name: student-pc, template_node: pve1, template_vmid: 100, networks: [{bridge: vmbr0}, {bridge: hq.100}]}\n  - {device_type: router, name: gw, template_node: pve1, template_vmid: 120, networks: [{bridge: vmbr0}, {bridge: hq}]}\n";

fn full() -> bool {
    std::env::var("LABFLEET_FULL").is_ok_and(|v| v == "1")
}

pub(crate) fn seed() -> u64 {
    std::env::var("LABFLEET_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7)
}

/// splitmix64: the tests' own seeded choices (victims, intervals).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        let f = (self.next() % 10_000) as f64 / 10_000.0;
        Duration::from_secs_f64(lo + (hi - lo) * f)
    }
}

/// The clone caps of a rig (full clones: 2 per storage).
#[derive(Clone, Copy)]
pub(crate) struct Caps {
    per_node: u64,
    linked_per_storage: u64,
}

impl From<Caps> for labfleet_tests::lab::Caps {
    fn from(c: Caps) -> Self {
        labfleet_tests::lab::Caps {
            per_node: Some(c.per_node as u32),
            linked_per_storage: Some(c.linked_per_storage as u32),
            full_per_storage: Some(2),
            max_requests: None,
            memory_overcommit: None,
            node_lost_after: None,
        }
    }
}

pub(crate) struct RigOpts {
    pub(crate) time_scale: f64,
    pub(crate) users: usize,
    pub(crate) deployment: String,
    pub(crate) auth: Auth,
    pub(crate) caps: Caps,
    pub(crate) workers: WorkerOpts,
    pub(crate) redis: RedisOptions,
    /// Redis Sentinel (a master, a replica, three sentinels) instead of one server; the
    /// inner value is the `requirepass` of every node and sentinel.
    pub(crate) sentinel: Option<Option<&'static str>>,
    /// Changes the simulated cluster before it starts (objects an earlier version made).
    pub(crate) sim_setup: Option<fn(&mut SimConfig)>,
    /// The secret key (default: a new one).
    pub(crate) key: Option<SecretKey>,
}

impl Default for RigOpts {
    fn default() -> Self {
        RigOpts {
            time_scale: 0.25,
            users: 4,
            deployment: TWO_MACHINES.to_owned(),
            auth: Auth::Token,
            caps: Caps {
                per_node: 3,
                linked_per_storage: 2,
            },
            workers: WorkerOpts::default(),
            redis: RedisOptions::default(),
            sentinel: None,
            sim_setup: None,
            key: None,
        }
    }
}

/// The shared lab and a fleet of worker processes on it.
pub(crate) struct Rig {
    pub(crate) lab: Lab,
    pub(crate) fleet: Fleet,
    caps: Caps,
}

impl std::ops::Deref for Rig {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl std::ops::DerefMut for Rig {
    fn deref_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }
}

/// `users.yml` with `student1@pve` .. `student<n>@pve`.
pub(crate) fn users_yaml(n: usize) -> String {
    labfleet_tests::lab::users_yaml(&labfleet_tests::lab::students(n))
}

impl Rig {
    pub(crate) async fn new(o: RigOpts) -> Rig {
        let mut lo = LabOpts::new(&o.deployment, o.users);
        lo.time_scale = o.time_scale;
        lo.auth = o.auth;
        lo.caps = o.caps.into();
        lo.redis = match o.sentinel {
            None => LabRedis::Single(o.redis.clone()),
            Some(pw) => LabRedis::Sentinel(pw),
        };
        lo.seed = Some(seed());
        lo.sim_setup = o
            .sim_setup
            .map(|f| Box::new(f) as labfleet_tests::lab::SimSetup);
        lo.key = o.key;
        let lab = Lab::start(lo).await.unwrap();
        let fleet = lab.fleet(o.workers);
        Rig {
            lab,
            fleet,
            caps: o.caps,
        }
    }

    pub(crate) fn q(&self) -> &Queue {
        self.store.queue()
    }

    pub(crate) async fn submit(&self) -> (String, Plan) {
        self.lab.submit().await.unwrap()
    }

    /// Waits for the deployment's state; on timeout fails with what was still open.
    pub(crate) async fn wait_state(&self, id: &str, want: &str, deadline: Duration) {
        let end = tokio::time::Instant::now() + deadline;
        while self.state(id).await != want {
            if tokio::time::Instant::now() >= end {
                panic!(
                    "timed out after {deadline:?} waiting for: deployment {want}\n{}",
                    self.diagnose(id).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What a stuck deployment still has open: VM counts, failures, the queue's view, every
    /// capped slot, and the first unfinished jobs with where they wait.
    pub(crate) async fn diagnose(&self, id: &str) -> String {
        let mut out = String::new();
        if let Ok(st) = producer::deploy::status(&self.store, id).await {
            out += &format!("status {}: {:?}\n", st.state, st.counts);
            for v in st.vms.iter().filter(|v| v.state != "done").take(20) {
                out += &format!("  {} {} {}: {:?}\n", v.name, v.node, v.state, v.error);
            }
            out += &format!("setup failures: {:?}\n", st.setup_failures);
        }
        let q = self.q();
        if let Some(rec) = self.store.deployment(id).await.ok().flatten() {
            out += &format!("jobs: {:?}\n", q.group_stats(&rec.scope()).await);
            let mut c = q.connection();
            let caps: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                .arg(q.key("caps"))
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            for slot in caps.keys() {
                out += &format!("slot {slot}: {:?}\n", q.slot_stats(slot).await);
            }
            let keys: Vec<String> = redis::cmd("SMEMBERS")
                .arg(q.key(&format!("group:{}", rec.scope())))
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            let mut open = 0;
            for k in keys {
                let f = self
                    .job_fields(&k, &["state", "attempts", "waiting_on", "last_error"])
                    .await;
                if f[0].as_deref() != Some("done") && open < 20 {
                    open += 1;
                    out += &format!("  {k}: {f:?}\n");
                    // A dead job's attempts: what each one ended on, and when.
                    if f[0].as_deref() == Some("dead")
                        && let Ok(Some(job)) = q.job(&k).await
                    {
                        for h in &job.history {
                            out += &format!(
                                "    attempt {} {} at {:?}: {}\n",
                                h.attempt, h.outcome, h.started_at, h.error
                            );
                        }
                    }
                    // And what the workers logged of its VM (which call failed, when).
                    if f[0].as_deref() == Some("dead")
                        && let Some((vm, _step)) =
                            k.split_once("/vm/").and_then(|(_, r)| r.rsplit_once('/'))
                    {
                        let logs = self.fleet.logs();
                        let lines: Vec<&str> = logs
                            .iter()
                            .flat_map(|(_, l)| l.lines())
                            .filter(|l| l.contains(vm))
                            .collect();
                        for l in &lines[lines.len().saturating_sub(40)..] {
                            out += &format!("    log: {l}\n");
                        }
                    }
                }
            }
        }
        out
    }

    /// A field of a job's hash, read raw.
    async fn job_fields(&self, key: &str, fields: &[&str]) -> Vec<Option<String>> {
        let mut c = self.q().connection();
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.q().key(&format!("job:{key}")));
        for f in fields {
            cmd.arg(*f);
        }
        cmd.query_async(&mut c)
            .await
            .unwrap_or_else(|_| vec![None; fields.len()])
    }

    /// Claimed jobs right now: (job key, kind, worker), from `inflight` and the job hashes.
    async fn running(&self) -> Vec<(String, String, String)> {
        let mut c = self.q().connection();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.q().key("inflight"))
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        let mut out = Vec::new();
        for id in ids {
            let f = self.job_fields(&id, &["state", "kind", "worker"]).await;
            if f[0].as_deref() == Some("running") {
                out.push((
                    id,
                    f[1].clone().unwrap_or_default(),
                    f[2].clone().unwrap_or_default(),
                ));
            }
        }
        out
    }

    /// Clone tasks running in the simulator right now.
    pub(crate) fn running_clones(&self) -> u64 {
        self.sim.stats()["running_clones"]["nodes"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    }

    pub(crate) fn faults(&self) -> BTreeMap<String, u64> {
        self.sim.stats()["faults_injected"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every job key of the deployment's group with its state.
    async fn group_states(&self, group: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for k in self.q().group_jobs(group).await.unwrap() {
            let s = self.job_fields(&k, &["state"]).await;
            out.insert(k, s[0].clone().unwrap_or_default());
        }
        out
    }

    /// The outcome every test ends with, checked through the simulator and Redis: every
    /// planned VM exists exactly once, complete, with our marker; no orphan (a VM that is not
    /// a template and not in the plan or without its marker); caps never exceeded; each clone
    /// ran to its end once (`extra_clones` for clones the test made itself); nothing in flight.
    pub(crate) async fn check_outcome(
        &self,
        id: &str,
        plans: &[&Plan],
        extra_clones: u64,
    ) -> Value {
        let planned: BTreeMap<&str, &shared::plan::VmPlan> = plans
            .iter()
            .flat_map(|p| p.vms.iter())
            .map(|v| (v.name.as_str(), v))
            .collect();
        let vms: Vec<_> = self.sim.vms().into_iter().filter(|v| !v.template).collect();
        let mut per_name: BTreeMap<String, usize> = BTreeMap::new();
        let mut orphans = Vec::new();
        for v in &vms {
            let name = v.name.clone().unwrap_or_default();
            *per_name.entry(name.clone()).or_default() += 1;
            let ok = planned.get(name.as_str()).is_some_and(|p| {
                let dep = plans
                    .iter()
                    .find(|pl| pl.vms.iter().any(|x| x.key == p.key && x.name == p.name))
                    .map(|pl| pl.id.clone())
                    .unwrap_or_default();
                shared::jobs::find_marker(
                    v.description.as_deref().unwrap_or_default(),
                    &dep,
                    &p.key,
                ) != shared::jobs::MarkerMatch::None
            });
            if !ok || v.lock.is_some() {
                orphans.push(format!("{} {:?} lock={:?}", v.vmid, v.name, v.lock));
            }
        }
        let dups: Vec<_> = per_name.iter().filter(|(_, n)| **n > 1).collect();
        assert!(dups.is_empty(), "duplicate VMs: {dups:?}");
        assert!(orphans.is_empty(), "orphan or unfinished VMs: {orphans:?}");
        assert_eq!(vms.len(), planned.len(), "every planned VM exists once");

        let stats = self.sim.stats();
        for (n, peak) in stats["peak_concurrent_clones"]["nodes"]
            .as_object()
            .unwrap()
        {
            assert!(
                peak.as_u64().unwrap() <= self.caps.per_node,
                "node {n}: {peak} clones at once, over its cap of {}",
                self.caps.per_node
            );
        }
        assert!(plans.iter().all(|p| p.vms.iter().all(|v| !v.full)));
        for (s, peak) in stats["peak_concurrent_clones"]["storages"]
            .as_object()
            .unwrap()
        {
            assert!(
                peak.as_u64().unwrap() <= self.caps.linked_per_storage,
                "storage {s}: {peak} linked clones at once, over its cap of {}",
                self.caps.linked_per_storage
            );
        }
        assert_eq!(
            stats["tasks"]["qmclone"]["ok"].as_u64().unwrap_or(0),
            planned.len() as u64 + extra_clones,
            "each VM cloned to its end exactly once: {}",
            stats["tasks"]["qmclone"]
        );

        let qs = self.q().stats().await.unwrap();
        assert_eq!(qs.in_flight, 0, "jobs left in flight: {qs:?}");
        for p in plans {
            let rec = self.store.deployment(&p.id).await.unwrap().unwrap();
            let g = self.q().group_stats(&rec.scope()).await.unwrap();
            assert_eq!(
                (
                    g.in_flight,
                    g.ready,
                    g.scheduled,
                    g.waiting_for_slot,
                    g.gated,
                    g.dead
                ),
                (0, 0, 0, 0, 0, 0),
                "group {} not finished: {g:?}",
                rec.scope()
            );
        }
        assert_eq!(self.state(id).await, "done");
        stats
    }
}

/// What a chaos run did.
#[derive(Debug, Default)]
pub(crate) struct Chaos {
    pub(crate) kills: usize,
    /// Kills of a worker that held a claimed job.
    pub(crate) hits: usize,
    /// Kills of a worker that held a clone job while clone tasks ran.
    clone_hits: usize,
    /// Time from a kill until each job the victim held was claimed by another worker.
    redelivery: Vec<Duration>,
    /// Clone jobs re-delivered while the clone task of the killed attempt still ran.
    redelivered_mid_clone: usize,
}

/// How many times the chaos kills the worker of one job. The queue dead-letters a job whose
/// worker died `max_lease_losses` (10) times, taking it for a job that kills its workers; the
/// kills prefer the holders of the last jobs, so without this bound one slow job at the end
/// (a clone waiting for a lost reply's task) drew every kill until it was dead-lettered
/// (1 run in 24 of l2).
const KILLS_PER_JOB: u32 = 5;

/// Kills a worker every `every` (seeded jitter) until the deployment is done, restarting one
/// each time, preferring a worker that holds a claimed job (a clone while clones run, until
/// one such kill happened), never one holding a job whose worker it has killed
/// [`KILLS_PER_JOB`] times.
pub(crate) async fn chaos(rig: &mut Rig, id: &str, every: (f64, f64), deadline: Duration) -> Chaos {
    let mut rng = Rng(seed());
    let start = Instant::now();
    let mut next_kill = start + rng.secs(every.0, every.1);
    let mut report = Chaos::default();
    let mut pending: Vec<(String, String, Instant)> = Vec::new();
    let mut killed_under: std::collections::HashMap<String, u32> = Default::default();
    loop {
        if start.elapsed() >= deadline {
            panic!(
                "deployment not done after {deadline:?} of chaos ({report:?})\n{}",
                rig.diagnose(id).await
            );
        }
        let mut still = Vec::new();
        for (key, victim, at) in pending.drain(..) {
            let f = rig.job_fields(&key, &["state", "worker"]).await;
            let taken = (f[0].as_deref() == Some("running") && f[1].as_deref() != Some(&victim))
                || f[0].as_deref() == Some("done");
            if taken {
                report.redelivery.push(at.elapsed());
                if clone_still_running(rig, &key).await {
                    report.redelivered_mid_clone += 1;
                }
            } else {
                still.push((key, victim, at));
            }
        }
        pending = still;
        if rig.state(id).await == "done" && pending.is_empty() {
            break;
        }
        if Instant::now() >= next_kill && rig.state(id).await != "done" {
            let running = rig.running().await;
            let clones_now = rig.running_clones();
            let spared: Vec<&String> = running
                .iter()
                .filter(|r| killed_under.get(&r.0).copied().unwrap_or(0) >= KILLS_PER_JOB)
                .map(|r| &r.2)
                .collect();
            let alive: Vec<String> = rig
                .fleet
                .alive()
                .into_iter()
                .filter(|w| !spared.contains(&w))
                .collect();
            if alive.is_empty() {
                next_kill = Instant::now() + rng.secs(every.0, every.1);
                continue;
            }
            let holders: Vec<&String> = alive
                .iter()
                .filter(|w| running.iter().any(|r| &r.2 == *w))
                .collect();
            let clone_holders: Vec<&String> = alive
                .iter()
                .filter(|w| running.iter().any(|r| &r.2 == *w && r.1 == "clone"))
                .collect();
            let pool = if report.clone_hits == 0 && clones_now > 0 && !clone_holders.is_empty() {
                clone_holders.clone()
            } else if !holders.is_empty() {
                holders.clone()
            } else {
                alive.iter().collect()
            };
            let victim = pool[rng.below(pool.len())].clone();
            let held: Vec<_> = running.iter().filter(|r| r.2 == victim).collect();
            rig.fleet.kill(&victim);
            let at = Instant::now();
            report.kills += 1;
            if !held.is_empty() {
                report.hits += 1;
            }
            if clones_now > 0 && held.iter().any(|r| r.1 == "clone") {
                report.clone_hits += 1;
            }
            for r in held {
                *killed_under.entry(r.0.clone()).or_default() += 1;
                pending.push((r.0.clone(), victim.clone(), at));
            }
            rig.fleet.spawn();
            next_kill = Instant::now() + rng.secs(every.0, every.1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report
}

/// Whether the VM of a clone job is still locked by its clone task in the simulator.
async fn clone_still_running(rig: &Rig, key: &str) -> bool {
    let f = rig.job_fields(key, &["kind", "payload"]).await;
    if f[0].as_deref() != Some("clone") {
        return false;
    }
    let Some(Ok(shared::jobs::Job::Clone(j))) = f[1].as_deref().map(serde_json::from_str) else {
        return false;
    };
    let scope = shared::jobs::scope_of_key(key);
    let Ok(Some(facts)) = rig.store.one_vm(scope, &j.vm.key).await else {
        return false;
    };
    rig.sim
        .vms()
        .iter()
        .any(|v| v.vmid == facts.vmid && v.lock.as_deref() == Some("clone"))
}

fn max(d: &[Duration]) -> Duration {
    d.iter().copied().max().unwrap_or_default()
}

/// Property 1: workers SIGKILLed mid-job lose nothing and clone nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p1_sigkilled_workers_lose_nothing_and_clone_nothing_twice() {
    let _one_at_a_time = SERIAL.lock().await;
    let users = if full() { 150 } else { 30 };
    let mut rig = Rig::new(RigOpts {
        users,
        time_scale: 0.3,
        ..RigOpts::default()
    })
    .await;
    for _ in 0..3 {
        rig.fleet.spawn();
    }
    let (id, plan) = rig.submit().await;
    assert_eq!(plan.vms.len(), users * 2);
    // A quarter of the tasks run 8 times longer (6 s for a clone), longer than lease + sweep:
    // some jobs come back while the killed attempt's clone still runs on Proxmox.
    rig.sim
        .set_faults(FaultPlan::from_yaml("slow_task_rate: 0.25\nslow_task_factor: 8\n").unwrap());
    let deadline = Duration::from_secs(if full() { 900 } else { 150 });
    let report = chaos(&mut rig, &id, (1.5, 3.0), deadline).await;
    eprintln!(
        "p1: {} VMs, {} kills, {} hit a claimed job, {} during a clone task, {} re-delivered while their clone ran; re-delivery max {:?} over {} jobs (lease 3 s + sweep 0.5 s)",
        plan.vms.len(),
        report.kills,
        report.hits,
        report.clone_hits,
        report.redelivered_mid_clone,
        max(&report.redelivery),
        report.redelivery.len()
    );
    assert!(
        report.hits >= 3,
        "fewer than 3 kills hit a claimed job: {report:?}"
    );
    assert!(
        report.clone_hits >= 1,
        "no kill during a clone task: {report:?}"
    );
    assert!(
        report.redelivered_mid_clone >= 1,
        "no clone job came back while its clone still ran: {report:?}"
    );
    let o = &rig.fleet.opts;
    let bound = Duration::from_secs_f64(o.lease + o.sweep + 1.5);
    assert!(
        max(&report.redelivery) <= bound,
        "a job came back after {:?}, over lease + sweep (+1.5 s slack) {bound:?}",
        max(&report.redelivery)
    );
    rig.check_outcome(&id, &[&plan], 0).await;
}

/// Property 2: a worker frozen past its lease and resumed cannot overwrite the new owner's
/// result; every job completes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2_a_stale_worker_is_fenced_off() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut rig = Rig::new(RigOpts {
        users: 6,
        time_scale: 0.6,
        workers: WorkerOpts {
            lease: 2.0,
            sweep: 0.3,
            verbose: true,
            ..WorkerOpts::default()
        },
        ..RigOpts::default()
    })
    .await;
    let a = rig.fleet.spawn();
    let (id, plan) = rig.submit().await;
    wait_for(Duration::from_secs(60), "A holds a clone job", || async {
        let r = rig.running().await;
        r.iter().any(|x| x.2 == a && x.1 == "clone") && rig.running_clones() > 0
    })
    .await;
    let held: Vec<(String, String)> = rig
        .running()
        .await
        .into_iter()
        .filter(|x| x.2 == a)
        .map(|x| (x.0, x.1))
        .collect();
    rig.fleet.stop(&a);
    let stopped = Instant::now();
    let b = rig.fleet.spawn();
    wait_for(Duration::from_secs(60), "B finished A's jobs", || async {
        let mut all = true;
        for (k, _) in &held {
            let f = rig.job_fields(k, &["state"]).await;
            all &= f[0].as_deref() == Some("done");
        }
        all
    })
    .await;
    let taken_after = stopped.elapsed();
    // What the new owner wrote, before A wakes up.
    let steps_key = rig.store.key_steps(&format!("{id}#0"));
    let vms_key = rig.store.key_vms(&format!("{id}#0"));
    let c = rig.q().connection();
    let read = |k: String| {
        let mut c = c.clone();
        async move {
            redis::cmd("HGETALL")
                .arg(k)
                .query_async::<BTreeMap<String, String>>(&mut c)
                .await
                .unwrap()
        }
    };
    let mut fields = Vec::new();
    for (k, _) in &held {
        let payload = rig.job_fields(k, &["payload"]).await[0].clone().unwrap();
        let job: shared::jobs::Job = serde_json::from_str(&payload).unwrap();
        let (subject, step) = shared::jobs::subject_and_step(&job);
        fields.push((shared::jobs::state::step_field(&subject, step), subject));
    }
    let steps_before = read(steps_key.clone()).await;
    let vms_before = read(vms_key.clone()).await;
    for (f, _) in &fields {
        let rec = steps_before.get(f).unwrap_or_else(|| panic!("no step {f}"));
        assert!(
            rec.contains(&b) || !rec.contains(&format!("\"{a}\"")),
            "{rec}"
        );
    }

    rig.fleet.cont(&a);
    // A resumes mid-job: each of its jobs tries to settle and is refused (debug log line).
    wait_for(
        Duration::from_secs(30),
        "A tried to settle its jobs",
        || async {
            let log = rig.fleet.log(&a);
            held.iter().all(|(k, _)| {
                log.lines()
                    .any(|l| l.contains(k.as_str()) && l.contains("settled"))
            })
        },
    )
    .await;
    rig.wait_state(&id, "done", Duration::from_secs(90)).await;

    let steps_after = read(steps_key).await;
    let vms_after = read(vms_key).await;
    for (f, subject) in &fields {
        assert_eq!(
            steps_after.get(f),
            steps_before.get(f),
            "step {f} overwritten by the stale worker"
        );
        if let Some(v) = vms_before.get(subject) {
            assert_eq!(
                vms_after.get(subject),
                Some(v),
                "VM record of {subject} overwritten"
            );
        }
    }
    for (k, kind) in &held {
        let j = rig.q().job(k).await.unwrap().unwrap();
        assert!(
            j.history
                .iter()
                .any(|h| h.outcome == "lease_lost" && h.worker.as_deref() == Some(a.as_str())),
            "{kind} job {k}: A's lease was not lost: {:?}",
            j.history
        );
        assert_eq!(j.state, "done");
    }
    // ... and was refused each time.
    let log = rig.fleet.log(&a);
    for (k, kind) in &held {
        assert!(
            log.lines()
                .any(|l| l.contains(k.as_str()) && l.contains("settled") && l.contains("Stale")),
            "{kind} job {k}: A's settle was not refused as stale"
        );
    }
    let jobs = rig.q().group_jobs(&format!("{id}#0")).await.unwrap().len() as u64;
    let qs = rig.q().stats().await.unwrap();
    eprintln!(
        "p2: A held {} jobs ({:?}); B had them done {:?} after SIGSTOP (lease 2 s, sweep 0.3 s); {} jobs acked {} times",
        held.len(),
        held.iter().map(|h| h.1.as_str()).collect::<Vec<_>>(),
        taken_after,
        jobs,
        qs.acked_total
    );
    assert_eq!(qs.acked_total, jobs, "exactly one completion per job");
    rig.check_outcome(&id, &[&plan], 0).await;
}

/// Property 3: Redis SIGKILLed and restarted mid-deployment (AOF on): workers and producer
/// reconnect by themselves, nothing acknowledged is lost, the deployment completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p3_redis_killed_and_restarted_mid_deployment() {
    let _one_at_a_time = SERIAL.lock().await;
    let users = if full() { 150 } else { 20 };
    let mut rig = Rig::new(RigOpts {
        users,
        time_scale: 0.3,
        ..RigOpts::default()
    })
    .await;
    rig.fleet.spawn();
    rig.fleet.spawn();
    let (id, plan) = rig.submit().await;
    let group = format!("{id}#0");
    wait_for(
        Duration::from_secs(60),
        "jobs ready, in flight and done",
        || async {
            let s = rig.q().stats().await.unwrap();
            s.ready + s.waiting_for_slot > 0 && s.in_flight > 0 && s.done >= 10
        },
    )
    .await;
    let before = rig.group_states(&group).await;
    let s = rig.q().stats().await.unwrap();
    let done_before: Vec<_> = before
        .iter()
        .filter(|(_, s)| *s == "done")
        .map(|(k, _)| k.clone())
        .collect();
    rig.redis.as_mut().unwrap().kill();
    assert!(s.in_flight > 0 && s.ready + s.waiting_for_slot > 0, "{s:?}");
    // Down long enough that every worker meets a refused connection.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.redis.as_mut().unwrap().restart();
    let restarted = Instant::now();
    wait_for(
        Duration::from_secs(30),
        "the producer reads again",
        || async { rig.q().stats().await.is_ok() },
    )
    .await;
    let producer_back = restarted.elapsed();
    let acked_at_restart = rig.q().stats().await.unwrap().acked_total;
    wait_for(Duration::from_secs(30), "a worker acks again", || async {
        rig.q()
            .stats()
            .await
            .is_ok_and(|s| s.acked_total > acked_at_restart)
    })
    .await;
    let workers_back = restarted.elapsed();
    assert_eq!(rig.fleet.alive().len(), 2, "a worker died with Redis");
    let after = rig.group_states(&group).await;
    for k in &done_before {
        assert_eq!(
            after.get(k).map(String::as_str),
            Some("done"),
            "{k} lost its ack"
        );
    }
    eprintln!(
        "p3: at the kill {} ready/waiting, {} in flight, {} done; producer back {:?}, workers acking {:?} after the restart",
        s.ready + s.waiting_for_slot,
        s.in_flight,
        done_before.len(),
        producer_back,
        workers_back
    );
    rig.wait_state(
        &id,
        "done",
        Duration::from_secs(if full() { 600 } else { 120 }),
    )
    .await;
    rig.check_outcome(&id, &[&plan], 0).await;

    // A worker warns at start when Redis would lose what it acknowledges.
    let loose = RedisServer::start_with(RedisOptions {
        appendonly: false,
        appendfsync: "everysec",
    });
    let mut f = Fleet::new(
        &loose.url(),
        rig.data.path(),
        rig.key.to_base64().expose(),
        WorkerOpts::default(),
    );
    let w = f.spawn();
    wait_for(
        Duration::from_secs(20),
        "warning about appendonly",
        || async { f.log(&w).contains("appendonly no") },
    )
    .await;
}

/// Property 4: Proxmox faults at a 20% rate; half-made VMs cleaned before the retry; a
/// permanent error (a template gone) fails after one attempt with Proxmox's message and
/// `producer retry` brings it back once fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_proxmox_faults_at_20_percent() {
    let _one_at_a_time = SERIAL.lock().await;
    let users = if full() { 150 } else { 8 };
    let mut rig = Rig::new(RigOpts {
        users,
        time_scale: 0.1,
        auth: Auth::Password,
        // labfleet's timers at the simulator's pace (its re-checks of lost replies hold
        // clone slots), but a 2 s backoff cap against a node offline for 1.5 s (real
        // defaults: 30-60 s caps against minutes).
        workers: WorkerOpts {
            backoff_cap: 2.0,
            time_scale: Some(0.1),
            // Every request in the logs: a dead job's diagnosis shows which call failed.
            verbose: true,
            ..WorkerOpts::default()
        },
        ..RigOpts::default()
    })
    .await;
    let (id, plan) = rig.submit().await;
    // The router template disappears after planning: a permanent error for every `gw`.
    let pve = rig.pve();
    let upid = pve
        .raw_call(Method::DELETE, "/nodes/pve1/qemu/120", &[])
        .await
        .unwrap();
    wait_for(Duration::from_secs(20), "template 120 gone", || async {
        !rig.sim.vms().iter().any(|v| v.vmid == 120)
    })
    .await;
    drop(upid);
    let faults = FaultPlan::from_yaml(
        "requests: {rate: 0.2, paths: [\"/nodes/\"]}\nlock_timeout_rate: 0.2\nslow_task_rate: 0.2\nslow_task_factor: 3\nclone_half_fail_rate: 0.2\n",
    )
    .unwrap();
    rig.sim.set_faults(faults.clone());
    // One-shot faults on top of the rates, so that every kind occurs whatever the draws.
    rig.sim.inject(Fault::LockTimeouts { count: 2 });
    rig.sim.inject(Fault::CloneHalfFail { count: 1 });
    for _ in 0..3 {
        rig.fleet.spawn();
    }
    wait_for(Duration::from_secs(60), "jobs running on pve2", || async {
        rig.running_clones() > 0
    })
    .await;
    rig.sim.inject(Fault::NodeOffline {
        node: "pve2".into(),
        duration: Duration::from_millis(1500),
    });
    rig.wait_state(
        &id,
        "failed",
        Duration::from_secs(if full() { 900 } else { 150 }),
    )
    .await;
    let injected = rig.faults();
    eprintln!("p4: faults injected {injected:?}");
    for k in ["request", "lock_timeout", "slow_task", "clone_half_fail"] {
        assert!(
            injected.get(k).copied().unwrap_or(0) > 0,
            "no {k} fault: {injected:?}"
        );
    }
    let gws: Vec<_> = plan.vms.iter().filter(|v| v.machine == "gw").collect();
    for v in &gws {
        let job = rig
            .q()
            .job(&shared::jobs::keys::vm_step(
                &format!("{id}#0"),
                &v.key,
                "clone",
            ))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("clone job of {}", v.key));
        assert_eq!(job.state, "dead", "{job:?}");
        let err = job.last_error.clone().unwrap_or_default();
        assert!(
            err.contains("120"),
            "Proxmox's message kept: {err}: {:#?}",
            job.history
        );
        let permanent = job
            .history
            .iter()
            .filter(|h| h.outcome == "failed" && h.error == err)
            .count();
        assert_eq!(
            permanent, 1,
            "one attempt spent on the permanent error: {:?}",
            job.history
        );
    }
    let st = producer::deploy::status(&rig.store, &id).await.unwrap();
    let failed: Vec<_> = st
        .vms
        .iter()
        .filter(|v| v.state == "failed")
        .map(|v| format!("{} {}: {:?}", v.name, v.machine, v.error))
        .collect();
    if failed.len() != gws.len() {
        for v in st
            .vms
            .iter()
            .filter(|v| v.state == "failed" && v.machine != "gw")
        {
            let key = plan
                .vms
                .iter()
                .find(|p| p.name == v.name)
                .unwrap()
                .key
                .clone();
            for step in ["clone", "network", "permission"] {
                let k = shared::jobs::keys::vm_step(&format!("{id}#0"), &key, step);
                let j = rig.q().job(&k).await.unwrap();
                eprintln!("{k}: {j:#?}");
            }
        }
    }
    assert_eq!(failed.len(), gws.len(), "only the gw VMs fail: {failed:#?}");

    // The admin restores the template (faults off for the repair), then `producer retry`.
    rig.sim.set_faults(FaultPlan::default());
    let upid = pve
        .raw_call(
            Method::POST,
            "/nodes/pve1/qemu/100/clone",
            &[
                ("newid", "120"),
                ("full", "1"),
                ("storage", "ceph-vm"),
                ("name", "router-template"),
            ],
        )
        .await
        .unwrap();
    let upid: shared::pve::Upid = upid.as_str().unwrap().parse().unwrap();
    pve.wait_task(&upid, &Default::default()).await.unwrap();
    let upid = pve
        .raw_call(Method::POST, "/nodes/pve1/qemu/120/template", &[])
        .await
        .unwrap();
    if let Some(u) = upid
        .as_str()
        .and_then(|u| u.parse::<shared::pve::Upid>().ok())
    {
        pve.wait_task(&u, &Default::default()).await.unwrap();
    }
    let out = producer(&rig, &["retry", &id], &[]);
    assert!(
        out.status.success(),
        "producer retry: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    rig.sim.set_faults(faults);
    rig.wait_state(
        &id,
        "done",
        Duration::from_secs(if full() { 900 } else { 150 }),
    )
    .await;
    let half = rig.faults().get("clone_half_fail").copied().unwrap_or(0);
    rig.check_outcome(&id, &[&plan], 1).await;
    eprintln!(
        "p4: done; {half} half-made clones cleaned up, faults {:?}",
        rig.faults()
    );
}

/// Runs the producer binary against the rig's data folder and Redis.
pub(crate) fn producer(rig: &Rig, args: &[&str], extra: &[&str]) -> Output {
    rig.producer_cmd()
        .args(extra)
        .args(args)
        .env("LABFLEET_SECRET_KEY", rig.key.to_base64().expose())
        .output()
        .expect("running the producer binary")
}

/// Property 5: SIGTERM stops fetching at once, hands unfinished jobs back without burning an
/// attempt within the grace period, and the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_sigterm_hands_jobs_back_within_the_grace_period() {
    let _one_at_a_time = SERIAL.lock().await;
    let grace = 3.0;
    let mut rig = Rig::new(RigOpts {
        users: 6,
        time_scale: 1.0,
        workers: WorkerOpts {
            grace,
            concurrency: 6,
            ..WorkerOpts::default()
        },
        ..RigOpts::default()
    })
    .await;
    let w = rig.fleet.spawn();
    let (id, plan) = rig.submit().await;
    wait_for(Duration::from_secs(60), "a clone task running", || async {
        rig.running().await.iter().any(|x| x.1 == "clone") && rig.running_clones() > 0
    })
    .await;
    let mut c = rig.q().connection();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
    let t0_ms = secs * 1000 + micros / 1000;
    let held: Vec<(String, String)> = rig
        .running()
        .await
        .into_iter()
        .filter(|x| x.2 == w)
        .map(|x| (x.0, x.1))
        .collect();
    let term = Instant::now();
    rig.fleet.term(&w);
    let status = rig
        .fleet
        .wait_exit(&w, Duration::from_secs_f64(grace + 20.0))
        .await
        .expect("worker exited after SIGTERM");
    let took = term.elapsed();
    assert!(status.success(), "worker exit status {status:?}");
    let mut handed_back = 0;
    for (k, kind) in &held {
        let f = rig
            .job_fields(k, &["state", "attempts", "worker", "started_at"])
            .await;
        let state = f[0].clone().unwrap_or_default();
        match state.as_str() {
            "done" => {}
            "ready" | "waiting" => {
                handed_back += 1;
                assert_eq!(f[1].as_deref(), Some("0"), "{kind} {k}: attempt burned");
            }
            other => panic!("{kind} job {k} left {other} after SIGTERM"),
        }
    }
    // Nothing claimed after the signal (0.5 s slack for a claim already under way).
    for k in rig.q().group_jobs(&format!("{id}#0")).await.unwrap() {
        let j = rig.q().job(&k).await.unwrap().unwrap();
        for h in &j.history {
            if h.worker.as_deref() == Some(w.as_str()) {
                assert!(
                    h.started_at.unwrap_or(0.0) <= (t0_ms + 500) as f64,
                    "{k} claimed after SIGTERM"
                );
            }
        }
        let f = rig.job_fields(&k, &["worker", "started_at"]).await;
        if f[0].as_deref() == Some(w.as_str()) {
            let s: f64 = f[1].as_deref().unwrap_or("0").parse().unwrap();
            assert!(s <= (t0_ms + 500) as f64, "{k} claimed after SIGTERM");
        }
    }
    eprintln!(
        "p5: SIGTERM with {} jobs held ({:?}); exited {:?} later (grace {grace} s); {handed_back} handed back",
        held.len(),
        held.iter().map(|h| h.1.as_str()).collect::<Vec<_>>(),
        took
    );
    assert!(handed_back >= 1, "no job was handed back: {held:?}");
    assert!(
        took <= Duration::from_secs_f64(grace + 5.0),
        "exit took {took:?}, grace {grace} s"
    );
    rig.fleet.spawn();
    rig.wait_state(&id, "done", Duration::from_secs(120)).await;
    for (k, kind) in &held {
        let j = rig.q().job(k).await.unwrap().unwrap();
        assert_eq!(j.attempts, 1, "{kind} {k}: {:?}", j.history);
    }
    rig.check_outcome(&id, &[&plan], 0).await;
}

/// Property 6: the simulator's exact high-water marks of concurrent clones per node and per
/// storage never exceed the caps while workers are killed (slots held across lost leases).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p6_caps_hold_under_chaos() {
    let _one_at_a_time = SERIAL.lock().await;
    let users = if full() { 150 } else { 24 };
    let caps = Caps {
        per_node: 2,
        linked_per_storage: 2,
    };
    let mut rig = Rig::new(RigOpts {
        users,
        time_scale: 0.3,
        caps,
        workers: WorkerOpts {
            concurrency: 6,
            ..WorkerOpts::default()
        },
        ..RigOpts::default()
    })
    .await;
    for _ in 0..3 {
        rig.fleet.spawn();
    }
    let (id, plan) = rig.submit().await;
    let report = chaos(
        &mut rig,
        &id,
        (1.0, 2.0),
        Duration::from_secs(if full() { 900 } else { 150 }),
    )
    .await;
    let stats = rig.check_outcome(&id, &[&plan], 0).await;
    let peaks = &stats["peak_concurrent_clones"];
    eprintln!("p6: {report:?}; peaks {peaks}");
    assert!(
        report.clone_hits >= 1,
        "no kill during a clone task: {report:?}"
    );
    // Saturated: the caps were the binding limit somewhere, so the check above means something.
    assert!(
        peaks["nodes"]
            .as_object()
            .unwrap()
            .values()
            .any(|p| p.as_u64() == Some(caps.per_node)),
        "no node reached its cap: {peaks}"
    );
}

/// Property 7: a malformed payload is dead-lettered with a reason and the worker keeps
/// running; an invalid config writes nothing to Redis; a deployment submitted twice at once
/// is not duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p7_bad_input_never_loses_or_corrupts_state() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut rig = Rig::new(RigOpts {
        users: 3,
        time_scale: 0.05,
        ..RigOpts::default()
    })
    .await;
    let q = rig.q().clone();
    let mut c = q.connection();
    // Not JSON at all, written by hand over a scheduled job's payload.
    let raw = JobSpec::new("bad/raw", "clone", serde_json::json!({"kind": "clone"}))
        .run_after(Duration::from_secs(60));
    q.enqueue(&raw).await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(q.key("job:bad/raw"))
        .arg("payload")
        .arg("{\"kind\":\"clone\",\"vm\":{\"deploy")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg(q.key("scheduled"))
        .arg(0)
        .arg("bad/raw")
        .query_async(&mut c)
        .await
        .unwrap();
    // JSON of the wrong shape for a known kind.
    let shape = JobSpec::new(
        "bad/shape",
        "network",
        serde_json::json!({"kind": "network", "vm": 42}),
    );
    q.enqueue(&shape).await.unwrap();

    // An invalid config: the producer refuses it before writing anything to Redis.
    let keys = |mut c: shared::queue::RedisConn| async move {
        let mut k: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut c)
            .await
            .unwrap();
        k.sort();
        k
    };
    let keys_before = keys(c.clone()).await;
    std::fs::write(
        rig.data.path().join("broken.yml"),
        format!("{TWO_MACHINES}colour: red\n").replace("template_vmid: 120", "template_vmid: 99"),
    )
    .unwrap();
    let broken = rig.data.path().join("broken.yml");
    let out = producer(
        &rig,
        &["submit"],
        &["--deployment", broken.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "invalid config exit code: {err}"
    );
    assert!(err.contains("colour"), "{err}");
    assert_eq!(
        keys(c.clone()).await,
        keys_before,
        "nothing written to Redis"
    );

    let w = rig.fleet.spawn();
    wait_for(Duration::from_secs(30), "both dead-lettered", || async {
        let mut ok = true;
        for k in ["bad/raw", "bad/shape"] {
            ok &= q
                .job(k)
                .await
                .ok()
                .flatten()
                .is_some_and(|j| j.state == "dead");
        }
        ok
    })
    .await;
    for k in ["bad/raw", "bad/shape"] {
        let j = q.job(k).await.unwrap().unwrap();
        let e = j.last_error.unwrap_or_default();
        assert!(e.contains("undecodable payload"), "{k}: {e}");
    }
    assert!(q.dead_letters(10).await.unwrap().len() >= 2);

    // The worker keeps running and serves a real deployment submitted twice at once.
    let (pve1, pve2) = (rig.pve(), rig.pve());
    let (a, b) = tokio::join!(
        producer::deploy::submit(&rig.cfg, &pve1, &rig.store, Some(&rig.key)),
        producer::deploy::submit(&rig.cfg, &pve2, &rig.store, Some(&rig.key)),
    );
    let (ida, pa) = a.unwrap();
    let (idb, pb) = b.unwrap();
    assert_eq!(ida, idb);
    assert_eq!(
        pa.vms
            .iter()
            .map(|v| (v.key.clone(), v.vmid))
            .collect::<Vec<_>>(),
        pb.vms
            .iter()
            .map(|v| (v.key.clone(), v.vmid))
            .collect::<Vec<_>>(),
        "both submits planned the same VMIDs"
    );
    let expected = shared::plan::jobs(&pa, &format!("{ida}#0"), &BTreeMap::new()).len();
    rig.wait_state(&ida, "done", Duration::from_secs(60)).await;
    assert!(rig.fleet.is_alive(&w), "the worker died");
    assert_eq!(
        q.group_jobs(&format!("{ida}#0")).await.unwrap().len(),
        expected,
        "jobs enqueued once"
    );
    // And once more through the binary, after the fact: still nothing new.
    let out = producer(&rig, &["submit"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rig.wait_state(&ida, "done", Duration::from_secs(60)).await;
    rig.check_outcome(&ida, &[&pa], 0).await;
    eprintln!(
        "p7: 2 malformed payloads dead-lettered, worker alive, double submit = {expected} jobs once"
    );
}

/// Property 8: after full deployments with password and token auth and students created by
/// labfleet, no secret is anywhere in Redis, in any log line (text and JSON) of the workers
/// and the producer, or in an error message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p8_no_secret_in_redis_logs_or_errors() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut rig = Rig::new(RigOpts {
        users: 3,
        time_scale: 0.05,
        ..RigOpts::default()
    })
    .await;
    // Three clusters on the one simulator: token, password, and a refused login.
    let port = rig.sim.addr().port();
    let fp = rig.sim.fingerprint().unwrap();
    let caps = rig.caps;
    let conn = format!(
        "{}{}bad:\n  host: \"127.0.0.1:{port}\"\n  user: nobody@pam\n  password: \"{ROOT_PW}\"\n  fingerprint: \"{fp}\"\n",
        labfleet_tests::lab::connection_yaml("tok", port, &fp, Auth::Token, caps.into()),
        labfleet_tests::lab::connection_yaml("pw", port, &fp, Auth::Password, caps.into()),
    );
    let d = rig.data.path().to_owned();
    std::fs::write(d.join("connections.yml"), conn).unwrap();
    std::fs::write(
        d.join("dep-tok.yml"),
        TWO_MACHINES.replace("rel-lab", "sec-tok") + "cluster: tok\n",
    )
    .unwrap();
    std::fs::write(
        d.join("dep-pw.yml"),
        TWO_MACHINES.replace("rel-lab", "sec-pw") + "cluster: pw\n",
    )
    .unwrap();
    // The token deployment's students are new too (users are cluster-wide).
    std::fs::write(
        d.join("users-tok.yml"),
        "users:\n  - \"student4@pve\"\n  - \"student5@pve\"\n  - \"student6@pve\"\n",
    )
    .unwrap();
    rig.fleet.opts.verbose = true;
    rig.fleet.spawn();
    rig.fleet.opts.log_format = "json";
    rig.fleet.spawn();

    let dep = |f: &str| d.join(f).to_str().unwrap().to_owned();
    let mut outputs: Vec<(String, Output)> = Vec::new();
    let mut run = |name: &str, args: &[&str], extra: &[&str]| {
        let out = producer(&rig, args, extra);
        outputs.push((name.to_owned(), out));
        outputs.last().unwrap().1.status.code()
    };
    let dtok = dep("dep-tok.yml");
    let dpw = dep("dep-pw.yml");
    let utok = dep("users-tok.yml");
    let code = run(
        "submit pw (text, -v)",
        &["submit", "--wait"],
        &["--deployment", &dpw, "-v"],
    );
    assert_eq!(
        code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&outputs.last().unwrap().1.stderr)
    );
    let code = run(
        "submit tok (json, -v)",
        &["submit", "--wait"],
        &[
            "--deployment",
            &dtok,
            "--users",
            &utok,
            "-v",
            "--log-format",
            "json",
        ],
    );
    assert_eq!(
        code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&outputs.last().unwrap().1.stderr)
    );
    run("status pw", &["status"], &["--deployment", &dpw, "-v"]);
    run(
        "handout tok",
        &["handout"],
        &["--deployment", &dtok, "--users", &utok, "-v"],
    );
    run("list", &["list"], &["--deployment", &dtok, "--json"]);
    run(
        "check-connection pw",
        &["check-connection"],
        &["--deployment", &dpw, "-v"],
    );
    let code = run(
        "check-connection bad (refused)",
        &["check-connection"],
        &["--deployment", &dpw, "--cluster", "bad", "-v"],
    );
    assert_ne!(code, Some(0), "a refused login must fail");
    let code = run(
        "submit bad (refused, json)",
        &["submit"],
        &[
            "--deployment",
            &dpw,
            "--cluster",
            "bad",
            "--log-format",
            "json",
            "-v",
        ],
    );
    assert_ne!(code, Some(0));

    // The secrets: cluster password, token secret, any ticket, every student's password.
    let mut secrets: Vec<(String, String)> = vec![
        ("cluster password".into(), ROOT_PW.into()),
        ("token secret".into(), TOKEN_SECRET.into()),
        ("ticket".into(), "PVE:".into()),
    ];
    let mut students = 0;
    for id in ["sec-pw@pw", "sec-tok@tok"] {
        let plan: Plan =
            serde_json::from_str(&rig.store.plan_json(id, 0).await.unwrap().unwrap()).unwrap();
        for s in plan.students.iter().filter(|s| s.create_user) {
            students += 1;
            secrets.push((
                format!("password of {} in {id}", s.user),
                producer::deploy::student_password(&rig.key, id, &s.user)
                    .expose()
                    .to_owned(),
            ));
        }
        assert_eq!(rig.state(id).await, "done");
    }
    assert_eq!(students, 6, "labfleet created the students");
    // The students' passwords work: the secret scanned for is the real one.
    assert!(rig.sim.users().iter().any(|u| u == "student1@pve"));

    // Redis: every key name and every value of every type.
    let mut c = rig.q().connection();
    let mut corpus: Vec<(String, String)> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(500)
            .query_async(&mut c)
            .await
            .unwrap();
        for k in batch {
            let t: String = redis::cmd("TYPE")
                .arg(&k)
                .query_async(&mut c)
                .await
                .unwrap();
            let v: String = match t.as_str() {
                "string" => redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap(),
                "hash" => format!(
                    "{:?}",
                    redis::cmd("HGETALL")
                        .arg(&k)
                        .query_async::<Vec<String>>(&mut c)
                        .await
                        .unwrap()
                ),
                "list" => format!(
                    "{:?}",
                    redis::cmd("LRANGE")
                        .arg(&k)
                        .arg(0)
                        .arg(-1)
                        .query_async::<Vec<String>>(&mut c)
                        .await
                        .unwrap()
                ),
                "set" => format!(
                    "{:?}",
                    redis::cmd("SMEMBERS")
                        .arg(&k)
                        .query_async::<Vec<String>>(&mut c)
                        .await
                        .unwrap()
                ),
                "zset" => format!(
                    "{:?}",
                    redis::cmd("ZRANGE")
                        .arg(&k)
                        .arg(0)
                        .arg(-1)
                        .arg("WITHSCORES")
                        .query_async::<Vec<String>>(&mut c)
                        .await
                        .unwrap()
                ),
                "stream" => format!(
                    "{:?}",
                    redis::cmd("XRANGE")
                        .arg(&k)
                        .arg("-")
                        .arg("+")
                        .query_async::<redis::Value>(&mut c)
                        .await
                        .unwrap()
                ),
                other => panic!("unexpected Redis type {other} of {k}"),
            };
            corpus.push((format!("redis key {k}"), format!("{k}\n{v}")));
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let redis_keys = corpus.len();
    for (name, log) in rig.fleet.logs() {
        corpus.push((format!("worker {name} log"), log));
    }
    for (name, out) in &outputs {
        corpus.push((
            format!("producer {name} stdout"),
            String::from_utf8_lossy(&out.stdout).into(),
        ));
        corpus.push((
            format!("producer {name} stderr"),
            String::from_utf8_lossy(&out.stderr).into(),
        ));
    }
    // Exercised: JSON and text logs of both kinds of process, refused logins reported.
    let all: String = corpus.iter().map(|(_, t)| t.as_str()).collect();
    assert!(
        all.contains("\"level\":\"DEBUG\"") || all.contains("\"level\":\"INFO\""),
        "JSON logs present"
    );
    assert!(all.contains("job done"), "worker logs present");
    let refused = &outputs
        .iter()
        .find(|o| o.0.starts_with("check-connection bad"))
        .unwrap()
        .1;
    assert!(!refused.stderr.is_empty(), "the refusal is reported");
    let mut found = Vec::new();
    for (what, secret) in &secrets {
        for (place, text) in &corpus {
            if text.contains(secret.as_str()) {
                let line = text
                    .lines()
                    .find(|l| l.contains(secret.as_str()))
                    .unwrap_or("");
                found.push(format!("{what} in {place}: {line}"));
            }
        }
    }
    eprintln!(
        "p8: scanned {redis_keys} Redis keys, {} worker logs, {} producer runs for {} secrets",
        rig.fleet.logs().len(),
        outputs.len(),
        secrets.len()
    );
    assert!(found.is_empty(), "secrets found:\n{}", found.join("\n"));
    // The handout (mode 0600) is the one place a student's password is written.
    let handout = std::fs::read_dir(&d)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("handout"))
        .collect::<BTreeSet<_>>();
    assert!(!handout.is_empty(), "no handout written in {}", d.display());
    for p in &handout {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
}

/// Spawns `producer submit --wait --json` against the rig (its output is read at the end).
fn spawn_producer_submit(rig: &Rig) -> std::process::Child {
    Command::new(bin("producer"))
        .arg("--data-dir")
        .arg(rig.data.path())
        .arg("--redis")
        .arg(&rig.redis_url)
        .args(["--json", "submit", "--wait"])
        .env("LABFLEET_SECRET_KEY", rig.key.to_base64().expose())
        .env_remove("RUST_LOG")
        .env_remove("REDIS_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning the producer binary")
}

/// The deployment the producer process submitted, once it is in Redis, with its plan.
async fn submitted(rig: &Rig) -> (String, Plan) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(d) = rig.store.deployments().await
            && let Some(r) = d.first()
            && let Ok(Some(p)) = rig.store.plan_json(&r.id, r.epoch).await
            && let Ok(plan) = serde_json::from_str::<Plan>(&p)
        {
            return (r.id.clone(), plan);
        }
        assert!(
            Instant::now() < end,
            "the producer submitted nothing in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// When the first job was acknowledged at or after `since_ms` (Redis clock, ms): the
/// earliest `done_at` of the group's jobs that is not earlier.
async fn first_ack_since(rig: &Rig, group: &str, since_ms: u64) -> Option<u64> {
    let mut first: Option<u64> = None;
    for k in rig.q().group_jobs(group).await.ok()? {
        let f = rig.job_fields(&k, &["done_at"]).await;
        if let Some(t) = f[0].as_deref().and_then(|t| t.parse::<f64>().ok()) {
            let t = t as u64;
            if t >= since_ms {
                first = Some(first.map_or(t, |f| f.min(t)));
            }
        }
    }
    first
}

/// What a failover run measured.
#[derive(Debug)]
struct Failover {
    /// SIGKILL of the master -> every sentinel names the replica.
    promoted: Duration,
    /// SIGKILL of the master -> the first job acknowledged on the new master.
    first_ack: Duration,
    /// Acks the old master had counted and the new one never got.
    lost_acks: u64,
}

/// How a failover scenario cuts the master off.
#[derive(Clone, Copy, PartialEq)]
enum Cut {
    /// SIGKILL the master; replication was live up to then.
    Kill,
    /// Break the replica's link first, let the master acknowledge writes the replica never
    /// gets, then SIGKILL it: acknowledged writes are lost, as asynchronous replication
    /// allows.
    LoseWrites,
}

/// Property 9 and 10: a Sentinel failover mid-deployment. The producer (`submit --wait`, a
/// process) and three worker processes are given the `redis+sentinel://` URL; the master is
/// SIGKILLed while jobs are in flight; the sentinels promote the replica; everything carries
/// on against the new master and every VM is made exactly once.
async fn failover_mid_deployment(password: Option<&'static str>, cut: Cut) -> Failover {
    let mut rig = Rig::new(RigOpts {
        users: 15,
        time_scale: 0.3,
        sentinel: Some(password),
        ..RigOpts::default()
    })
    .await;
    if let Some(pw) = password {
        assert!(rig.redis_url.contains(pw), "the password is in the URL");
    }
    for _ in 0..3 {
        rig.fleet.spawn();
    }
    let producer = spawn_producer_submit(&rig);
    let (id, plan) = submitted(&rig).await;
    let group = format!("{id}#0");
    wait_for(
        Duration::from_secs(60),
        "jobs waiting, in flight and done",
        || async {
            rig.q().stats().await.is_ok_and(|s| {
                s.ready + s.waiting_for_slot + s.gated > 0 && s.in_flight > 0 && s.done >= 10
            })
        },
    )
    .await;
    let set = rig.sentinels.as_ref().unwrap();
    let (old, new) = (set.first_master(), set.first_replica());
    assert_eq!(
        rig.q().connection().master().map(|m| m.addr),
        Some(format!("127.0.0.1:{old}"))
    );
    let lost_key = rig.q().key("test:written-after-the-cut");
    if cut == Cut::LoseWrites {
        // A wrong masterauth keeps the replica from reconnecting once its link is cut.
        let _: () = set
            .query(
                new,
                redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("masterauth")
                    .arg("wrong"),
            )
            .unwrap();
        let killed: u64 = set
            .query(
                new,
                redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("master"),
            )
            .unwrap();
        assert_eq!(killed, 1, "the replica's link to its master was cut");
        let _: () = set
            .query(old, redis::cmd("SET").arg(&lost_key).arg("1"))
            .unwrap();
    }
    let acked = |port: u16| -> u64 {
        set.query::<Option<u64>>(
            port,
            redis::cmd("HGET").arg(rig.q().key("stats")).arg("acked"),
        )
        .ok()
        .flatten()
        .unwrap_or(0)
    };
    if cut == Cut::LoseWrites {
        // Workers acknowledge jobs the replica never hears of: at least 0.5 s of them and at
        // least one ack, within a few seconds (a replica cut off for much longer than ten
        // times down-after-milliseconds would not be promoted).
        let cut_at = Instant::now();
        while cut_at.elapsed() < Duration::from_millis(500) || acked(old) <= acked(new) {
            assert!(
                cut_at.elapsed() < Duration::from_secs(6),
                "no job acknowledged in 6 s after the replica's link was cut"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // What the master has acknowledged, and what of it the replica (to be promoted) has.
    let acked_old = acked(old);
    let acked_replica = acked(new);
    let in_flight = rig.running().await;
    let kill_ms = now_ms();
    let killed_at = Instant::now();
    rig.sentinels.as_mut().unwrap().kill_node(old);
    let set = rig.sentinels.as_ref().unwrap();
    if cut == Cut::LoseWrites {
        let pw = password.expect("a lost-writes run has a password");
        let _: () = set
            .query(
                new,
                redis::cmd("CONFIG").arg("SET").arg("masterauth").arg(pw),
            )
            .unwrap();
    }
    set.wait_master(new, Duration::from_secs(30));
    let promoted = killed_at.elapsed();
    assert_eq!(set.role(new).as_deref(), Some("master"));
    let end = Instant::now() + Duration::from_secs(60);
    while first_ack_since(&rig, &group, kill_ms).await.is_none() {
        if Instant::now() > end {
            let logs: Vec<String> = rig
                .fleet
                .logs()
                .into_iter()
                .map(|(n, l)| {
                    let lines: Vec<&str> = l.lines().collect();
                    format!(
                        "--- {n}\n{}",
                        lines[lines.len().saturating_sub(12)..].join("\n")
                    )
                })
                .collect();
            panic!(
                "no job acknowledged on the new master within 60 s; stats {:?}, master {:?}\n{}\n{}",
                rig.q().stats().await,
                rig.q().connection().master(),
                logs.join("\n"),
                rig.sentinels.as_ref().unwrap().logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_ack = Duration::from_millis(
        first_ack_since(&rig, &group, kill_ms)
            .await
            .unwrap()
            .saturating_sub(kill_ms),
    );
    assert_eq!(
        rig.q().connection().master().map(|m| m.addr),
        Some(format!("127.0.0.1:{new}")),
        "the producer's side follows the new master"
    );
    let lost: Option<String> = set.query(new, redis::cmd("GET").arg(&lost_key)).unwrap();
    if cut == Cut::LoseWrites {
        assert_eq!(lost, None, "a write acknowledged after the cut is lost");
    }

    // The old master comes back; the sentinels make it a replica of the new one.
    rig.sentinels.as_mut().unwrap().restart_node(old);
    let set = rig.sentinels.as_ref().unwrap();
    wait_for(
        Duration::from_secs(30),
        "the old master turned replica",
        || async { set.role(old).as_deref() == Some("slave") },
    )
    .await;

    let deadline = Instant::now() + Duration::from_secs(150);
    let mut producer = producer;
    let status = loop {
        if let Some(st) = producer.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "producer submit --wait still running after the failover\n{}",
            rig.diagnose(&id).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = producer.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.success(),
        "producer exit {status}\n{stderr}\n{}",
        rig.diagnose(&id).await
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("submit --wait --json prints JSON");
    assert_eq!(doc["state"], "done", "{doc}");
    rig.check_outcome(&id, &[&plan], 0).await;
    assert_eq!(rig.fleet.alive().len(), 3, "a worker died in the failover");
    let logs: String = rig
        .fleet
        .logs()
        .into_iter()
        .map(|(_, l)| l)
        .collect::<String>()
        + &stderr;
    if let Some(pw) = password {
        assert!(!logs.contains(pw), "the password appears in a log");
    }
    assert!(
        logs.contains("asking the sentinels again"),
        "the workers saw the master go"
    );
    let report = Failover {
        promoted,
        first_ack,
        lost_acks: acked_old.saturating_sub(acked_replica),
    };
    eprintln!(
        "p9 ({}, {}): {} jobs in flight at the kill; replica promoted {:?} and the first job acknowledged on it {:?} after the SIGKILL; {} acknowledged jobs lost",
        if password.is_some() {
            "requirepass"
        } else {
            "no password"
        },
        if cut == Cut::LoseWrites {
            "acknowledged writes lost"
        } else {
            "kill"
        },
        in_flight.len(),
        report.promoted,
        report.first_ack,
        report.lost_acks
    );
    report
}

/// Property 9a: a Sentinel failover mid-deployment, no passwords.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9a_sentinel_failover_mid_deployment() {
    let _one_at_a_time = SERIAL.lock().await;
    failover_mid_deployment(None, Cut::Kill).await;
}

/// Property 9b: the same with `requirepass` on the data nodes and the sentinels (the password
/// in the URL), and acknowledged writes lost in the failover: every step converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p9b_sentinel_failover_with_requirepass_and_lost_writes() {
    let _one_at_a_time = SERIAL.lock().await;
    let r = failover_mid_deployment(Some("Sent1nel-pw-4f2a"), Cut::LoseWrites).await;
    assert!(
        r.lost_acks > 0,
        "the failover lost acknowledged jobs: {r:?}"
    );
}

/// Property 10: fencing across a Sentinel failover. Two workers hold leases when the master is
/// SIGKILLed (both frozen for the kill, once the replica has every write, so nothing is lost
/// and acks can be counted exactly). B is thawed after the promotion and goes on renewing
/// and settling its leases on the new master: the tokens were replicated. A stays frozen past
/// its lease: the new master's reaper takes its jobs back, B runs them, and A, thawed, is
/// refused on every settle. Every job is acknowledged exactly once; every VM made once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p10_sentinel_failover_while_workers_hold_leases() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut rig = Rig::new(RigOpts {
        users: 6,
        time_scale: 0.6,
        workers: WorkerOpts {
            lease: 5.0,
            sweep: 0.3,
            verbose: true,
            ..WorkerOpts::default()
        },
        sentinel: Some(None),
        ..RigOpts::default()
    })
    .await;
    let a = rig.fleet.spawn();
    let b = rig.fleet.spawn();
    let (id, plan) = rig.submit().await;
    wait_for(Duration::from_secs(60), "A and B hold jobs", || async {
        let r = rig.running().await;
        r.iter().any(|x| x.2 == a) && r.iter().any(|x| x.2 == b)
    })
    .await;
    rig.fleet.stop(&a);
    rig.fleet.stop(&b);
    let running = rig.running().await;
    let held_by = |w: &str| -> Vec<String> {
        running
            .iter()
            .filter(|x| x.2 == w)
            .map(|x| x.0.clone())
            .collect()
    };
    let (held_a, held_b) = (held_by(&a), held_by(&b));
    assert!(!held_a.is_empty() && !held_b.is_empty(), "{running:?}");
    let set = rig.sentinels.as_ref().unwrap();
    let (old, new) = (set.first_master(), set.first_replica());
    // Nothing in flight on the wire: the replica has every write the master acknowledged.
    let offset = |port: u16, field: &str| -> Option<u64> {
        let info: String = set
            .query(port, redis::cmd("INFO").arg("replication"))
            .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().parse().ok())
    };
    wait_for(Duration::from_secs(10), "the replica caught up", || async {
        offset(old, "master_repl_offset:") == offset(new, "slave_repl_offset:")
    })
    .await;
    let tokens: BTreeMap<String, Option<String>> = {
        let mut m = BTreeMap::new();
        for k in held_a.iter().chain(&held_b) {
            m.insert(k.clone(), rig.job_fields(k, &["token"]).await[0].clone());
        }
        m
    };
    let killed_at = Instant::now();
    rig.sentinels.as_mut().unwrap().kill_node(old);
    rig.sentinels
        .as_ref()
        .unwrap()
        .wait_master(new, Duration::from_secs(30));
    let promoted = killed_at.elapsed();
    // The test's own connection meets the dead master once, then follows.
    wait_for(
        Duration::from_secs(30),
        "the test follows the new master",
        || async {
            rig.q().stats().await.is_ok()
                && rig.q().connection().master().map(|m| m.addr) == Some(format!("127.0.0.1:{new}"))
        },
    )
    .await;
    // The leases are on the new master, token for token.
    for (k, t) in &tokens {
        assert_eq!(&rig.job_fields(k, &["token"]).await[0], t, "{k}");
    }
    rig.fleet.cont(&b);
    wait_for(
        Duration::from_secs(60),
        "B took A's jobs on the new master",
        || async {
            let mut all = true;
            for k in &held_a {
                let f = rig.job_fields(k, &["state", "worker"]).await;
                all &= f[0].as_deref() == Some("done")
                    || (f[0].as_deref() == Some("running") && f[1].as_deref() == Some(b.as_str()));
            }
            all
        },
    )
    .await;
    let a_fenced = killed_at.elapsed();
    rig.fleet.cont(&a);
    wait_for(
        Duration::from_secs(30),
        "A tried to settle its jobs",
        || async {
            let log = rig.fleet.log(&a);
            held_a.iter().all(|k| {
                log.lines()
                    .any(|l| l.contains(k.as_str()) && l.contains("settled"))
            })
        },
    )
    .await;
    rig.wait_state(&id, "done", Duration::from_secs(120)).await;
    let log_a = rig.fleet.log(&a);
    for k in &held_a {
        assert!(
            log_a
                .lines()
                .any(|l| l.contains(k.as_str()) && l.contains("settled") && l.contains("Stale")),
            "job {k}: A's settle after the failover was not refused as stale"
        );
        let j = rig.q().job(k).await.unwrap().unwrap();
        assert!(
            j.history
                .iter()
                .any(|h| h.outcome == "lease_lost" && h.worker.as_deref() == Some(a.as_str())),
            "job {k}: A's lease was not lost on the new master: {:?}",
            j.history
        );
    }
    // B's own leases lived through the failover: it settled them itself, none was lost.
    for k in &held_b {
        let j = rig.q().job(k).await.unwrap().unwrap();
        assert_eq!(j.state, "done", "{k}");
        assert!(
            !j.history
                .iter()
                .any(|h| h.outcome == "lease_lost" && h.worker.as_deref() == Some(b.as_str())),
            "job {k}: B lost its lease across the failover: {:?}",
            j.history
        );
    }
    let jobs = rig.q().group_jobs(&format!("{id}#0")).await.unwrap().len() as u64;
    let qs = rig.q().stats().await.unwrap();
    assert_eq!(qs.acked_total, jobs, "exactly one acknowledgement per job");
    rig.check_outcome(&id, &[&plan], 0).await;
    eprintln!(
        "p10: A held {} and B {} leases at the kill; promoted after {promoted:?}; A's jobs taken back on the new master {a_fenced:?} after the kill; A's {} settles refused; {jobs} jobs acknowledged exactly once",
        held_a.len(),
        held_b.len(),
        held_a.len()
    );
}
