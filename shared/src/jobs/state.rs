//! Deployment state in Redis: the deployment record and its plans, each VM's facts (VMID,
//! node, UPID), each step's outcome, and an event stream for live progress.
//!
//! A deployment moves through [`Phase`]s; every write that moves it is a compare-and-set on
//! the record as it was read ([`Store::commit`], and the fenced `finish.lua` of the teardown
//! finish job), so two producers, or a producer and a worker, never both win.
//!
//! Progress records are kept per *scope* (`<id>#<epoch>`): a submit made while a teardown
//! of the same deployment still runs writes its own epoch's records, and the teardown's jobs
//! read the epoch they tear down, so neither can touch the other's VMs.
//!
//! Keys (all under the queue's hash tag, so fenced writes and scripts may touch them):
//! - `deployments`: ZSET id -> created (ms).
//! - `d:<id>`: HASH `record` (JSON [`DeploymentRecord`]), `plan:<epoch>` (JSON of the plan
//!   of each epoch still active or being torn down), `vmsteps` (the steps every VM goes
//!   through, one per line, read by `step.lua`).
//! - `d:<scope>:vm`: HASH vm key -> JSON [`VmFacts`], written by the clone job (fenced).
//! - `d:<scope>:step`: HASH `<subject>|<step>` -> JSON [`StepRecord`] (fenced).
//! - `d:<scope>:failed`: SET of the step fields whose record says `failed`.
//! - `d:<scope>:vmstate`: HASH vm key -> `<state>|<node>`, the VM's state derived from its steps.
//! - `d:<scope>:count`: HASH `s:<state>` and `n:<node>:<state>` -> number of VMs (VMs with no
//!   entry are pending). These three are kept exact by `step.lua`, atomically with each step
//!   record, so `status` of a large deployment reads counters, not every record.
//! - `d:<id>:events`: STREAM of progress events, capped at about 10,000 entries.
//! - `quarantine:<cluster>`: HASH vmid -> JSON [`Quarantined`] (kept: an audit needs it).
//! - `tombs:<cluster>`: ZSET `<vmid>|<deployment>|<vm key>` -> when a teardown removed it
//!   (kept [`TOMBSTONE_RETENTION`]: which deployment last used a VMID).
//! - `su:<cluster>:<user>`: SET of the deployments that list the user; a user labfleet
//!   created is deleted only when no deployment lists it any more.
//! - `creators:<cluster>`: HASH user -> the deployment that made the account (while it
//!   exists), for a handout read without Proxmox (the dashboard's).
//! - `removals:<cluster>`: the number of users, pools and bridges teardowns removed (kept):
//!   a worker's cached "it exists" is dropped when it moves (`jobs::cache`).
//!
//! Deployments written before scopes existed (`layout` 0: progress keys per id, one `plan`
//! field) are moved to this layout by [`Store::upgrade`] before anything else touches them.
//!
//! One file (over 600 lines): it is the one place that knows every key of a deployment's
//! records; producer and workers read and write them together, so their names stay together.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::queue::{FencedScript, JobError, Lease, Queue, QueueError};

static STEP: LazyLock<FencedScript> = LazyLock::new(|| FencedScript::new(include_str!("step.lua")));
static FINISH: LazyLock<FencedScript> =
    LazyLock::new(|| FencedScript::new(include_str!("finish.lua")));

/// Compare-and-set of a deployment record (see [`Store::commit`]).
static COMMIT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
-- KEYS[1] d:<id>, KEYS[2] deployments. ARGV: expected record ('' = absent), new record,
-- created ms, id, plan field ('' = none), plan JSON, vm steps, sealed field, sealed JSON.
local cur = redis.call('HGET', KEYS[1], 'record')
if (cur or '') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], ARGV[5], ARGV[6], 'vmsteps', ARGV[7]) end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], ARGV[8], ARGV[9]) end
redis.call('PERSIST', KEYS[1])
return 1
"#,
    )
});

/// Moves a layout-0 deployment's keys to their scope (see [`Store::upgrade`]).
static UPGRADE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
-- KEYS[1] d:<id>. ARGV: expected record, new record, plan field, then pairs old key, new key.
local cur = redis.call('HGET', KEYS[1], 'record')
if (cur or '') ~= ARGV[1] then return 0 end
local plan = redis.call('HGET', KEYS[1], 'plan')
if plan then
  redis.call('HSET', KEYS[1], ARGV[3], plan)
  redis.call('HDEL', KEYS[1], 'plan')
end
for i = 4, #ARGV, 2 do
  if redis.call('EXISTS', ARGV[i]) == 1 then redis.call('RENAME', ARGV[i], ARGV[i + 1]) end
end
redis.call('HSET', KEYS[1], 'record', ARGV[2])
return 1
"#,
    )
});

/// The layout of records this version writes (see the module header).
pub const LAYOUT: u32 = 1;
/// How long a torn-down deployment's record stays (for `list` and audits).
pub const RECORD_RETENTION: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
/// How long a tombstone says which deployment last used a VMID.
pub const TOMBSTONE_RETENTION: std::time::Duration = std::time::Duration::from_secs(180 * 86_400);

/// Where a deployment is in its life. The stored text is the serde name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Its current epoch's jobs run or ran (waiting first for `teardowns` to finish).
    Active,
    /// Teardown `epoch` is removing the VMs of `epoch - 1`.
    TearingDown,
    /// Nothing of it is left on the cluster; only the kept records remain.
    TornDown,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Active => "active",
            Phase::TearingDown => "tearing-down",
            Phase::TornDown => "torn-down",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub id: String,
    pub cluster: String,
    pub name: String,
    /// Bumped by each teardown, so a later submit gets fresh job keys.
    pub epoch: u32,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
    #[serde(default)]
    pub finished: Option<DateTime<Utc>>,
    pub phase: Phase,
    /// What the current plan holds, for the counter-based `status` (absent in records
    /// written before it existed: those get the per-VM status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<Totals>,
    /// The key layout (0 = before scopes; see the module header).
    #[serde(default)]
    pub layout: u32,
    /// Teardowns started and not finished yet (their epochs, oldest first). An active
    /// epoch's jobs wait for them (gated on their finish jobs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teardowns: Vec<u32>,
}

/// The plan's size as `status` needs it without reading the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub vms: usize,
    /// VMs of an earlier submit no longer in the files (kept until teardown).
    pub retired: usize,
    pub per_node: BTreeMap<String, usize>,
}

/// A submit's plan as stored with the deployment.
#[derive(Debug, Clone, Copy)]
pub struct PlanDoc<'a> {
    /// The plan as JSON.
    pub json: &'a str,
    /// The steps every VM goes through, in order.
    pub vm_steps: &'a [&'a str],
    /// The students' sealed initial passwords (JSON user -> `enc:` value), kept beside the
    /// plan so that a teardown's finish job can enqueue the epoch a submit made meanwhile.
    pub sealed: Option<&'a str>,
}

/// One step's new state, as a job records it.
#[derive(Debug, Clone, Copy)]
pub struct StepUpdate<'a> {
    /// A VM key, `student:<user>` or `node:<node>`.
    pub subject: &'a str,
    pub step: &'a str,
    /// The VM's planned node, for a VM's step (its state and the counters follow).
    pub node: Option<&'a str>,
    pub state: StepState,
    pub error: Option<&'a str>,
}

/// The counters `step.lua` keeps, and the failed steps.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// VM state -> VMs (pending VMs are not counted).
    pub states: BTreeMap<String, usize>,
    /// node -> VM state -> VMs.
    pub per_node: BTreeMap<String, BTreeMap<String, usize>>,
    /// Step fields (`<subject>|<step>`) whose record says failed.
    pub failed: Vec<String>,
}

impl DeploymentRecord {
    /// A new deployment's record.
    pub fn new(id: &str, cluster: &str, name: &str, now: DateTime<Utc>) -> DeploymentRecord {
        DeploymentRecord {
            id: id.to_owned(),
            cluster: cluster.to_owned(),
            name: name.to_owned(),
            epoch: 0,
            created: now,
            updated: now,
            finished: None,
            phase: Phase::Active,
            totals: None,
            layout: LAYOUT,
            teardowns: Vec::new(),
        }
    }

    /// The job group (and job key prefix) of the current epoch.
    pub fn scope(&self) -> String {
        crate::jobs::scope(&self.id, self.epoch)
    }

    /// The epoch whose VMs exist or are being made: the current one when active, the one
    /// being torn down otherwise.
    pub fn vm_epoch(&self) -> u32 {
        match self.phase {
            Phase::Active => self.epoch,
            Phase::TearingDown | Phase::TornDown => self.epoch.saturating_sub(1),
        }
    }

    /// The scope whose progress records `status` reads.
    pub fn vm_scope(&self) -> String {
        crate::jobs::scope(&self.id, self.vm_epoch())
    }

    /// Whether teardown `epoch` of this deployment has finished.
    pub fn teardown_finished(&self, epoch: u32) -> bool {
        let running = self.phase == Phase::TearingDown && self.epoch == epoch;
        !(running || self.teardowns.contains(&epoch))
    }
}

/// A record as read, with the exact stored text a compare-and-set compares against.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub rec: DeploymentRecord,
    raw: String,
}

impl Versioned {
    /// The stored text, for a compare-and-set elsewhere (the finish job's script).
    pub fn raw(&self) -> &str {
        &self.raw
    }
}

/// The field of `d:<id>` holding epoch `epoch`'s plan.
pub fn plan_field(epoch: u32) -> String {
    format!("plan:{epoch}")
}

/// The field of `d:<id>` holding epoch `epoch`'s sealed initial passwords.
pub fn sealed_field(epoch: u32) -> String {
    format!("sealed:{epoch}")
}

/// What the teardown finish job changes besides the record, in its one fenced script.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FinishOps {
    /// Keys to delete.
    pub del: Vec<String>,
    /// Fields of `d:<id>` to delete.
    pub hdel: Vec<String>,
    /// Reservations to free: (ids key, owners key, owners).
    pub release: Vec<(String, String, Vec<String>)>,
    /// (set key, member) to remove.
    pub srem: Vec<(String, String)>,
    /// (zset key, score, member) to add, and (zset key, max score) to trim below.
    pub zadd: Vec<(String, i64, String)>,
    pub ztrim: Vec<(String, i64)>,
    /// Expire `d:<id>` after this many ms (0 = keep); `deployments` forgets ids whose
    /// record is gone when it is read ([`Store::deployments`]).
    pub expire_ms: u64,
    /// A prune: VM keys whose records leave the scope whose progress keys are `scope_keys`
    /// (vm, step, failed, vmstate, count: [`Store::progress_keys`]), with the counters
    /// adjusted, for each of `vm_steps`; and job records to forget (the removed VMs' and
    /// students' jobs, so that listing them again makes them anew).
    pub forget_vms: Vec<String>,
    pub scope_keys: Vec<String>,
    pub vm_steps: Vec<String>,
    pub forget_jobs: Vec<String>,
    /// (group, glob) of job keys to forget as well: the node-network jobs of the nodes a
    /// prune touched (their keys name the bridge set they made).
    pub forget_matching: Vec<(String, String)>,
}

pub use crate::queue::glob_prefix;

/// What the clone job learned about its VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFacts {
    /// The epoch whose clone made (or is making) this VM. Absent in facts written before
    /// epochs were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
    pub vmid: u32,
    pub node: String,
    #[serde(default)]
    pub upid: Option<String>,
    /// VMIDs given up because a half-made VM could not be removed (see `quarantine`).
    #[serde(default)]
    pub quarantined: Vec<u32>,
    /// When the clone call was about to be made: a `lock: clone` found without a known
    /// task is trusted to be a running clone until `since + task_deadline`.
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    Running,
    Retrying,
    Done,
    Failed,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Running => "running",
            StepState::Retrying => "retrying",
            StepState::Done => "done",
            StepState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub state: StepState,
    pub attempt: u32,
    #[serde(default)]
    pub error: Option<String>,
    pub at: DateTime<Utc>,
    #[serde(default)]
    pub worker: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub vmid: u32,
    pub node: String,
    pub deployment: String,
    pub vm: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

impl Quarantined {
    /// What an admin runs on the node to clear it.
    pub fn command(&self) -> String {
        format!(
            "ssh root@{node} 'qm unlock {id} && qm destroy {id} --purge'",
            node = self.node,
            id = self.vmid
        )
    }
}

/// Access to deployment state, for the producer (reads, records) and handlers (fenced writes).
#[derive(Clone)]
pub struct Store {
    queue: Queue,
}

pub fn step_field(subject: &str, step: &str) -> String {
    format!("{subject}|{step}")
}

impl Store {
    pub fn new(queue: Queue) -> Store {
        Store { queue }
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn key_deployments(&self) -> String {
        self.queue.key("deployments")
    }
    pub fn key_deployment(&self, id: &str) -> String {
        self.queue.key(&format!("d:{id}"))
    }
    /// The progress keys take a scope (`<id>#<epoch>`; a bare id for layout 0).
    pub fn key_vms(&self, scope: &str) -> String {
        self.queue.key(&format!("d:{scope}:vm"))
    }
    pub fn key_steps(&self, scope: &str) -> String {
        self.queue.key(&format!("d:{scope}:step"))
    }
    pub fn key_failed(&self, scope: &str) -> String {
        self.queue.key(&format!("d:{scope}:failed"))
    }
    pub fn key_vm_states(&self, scope: &str) -> String {
        self.queue.key(&format!("d:{scope}:vmstate"))
    }
    pub fn key_counts(&self, scope: &str) -> String {
        self.queue.key(&format!("d:{scope}:count"))
    }
    /// Every progress key of a scope.
    pub fn progress_keys(&self, scope: &str) -> [String; 5] {
        [
            self.key_vms(scope),
            self.key_steps(scope),
            self.key_failed(scope),
            self.key_vm_states(scope),
            self.key_counts(scope),
        ]
    }
    pub fn key_events(&self, id: &str) -> String {
        self.queue.key(&format!("d:{id}:events"))
    }
    pub fn key_quarantine(&self, cluster: &str) -> String {
        self.queue.key(&format!("quarantine:{cluster}"))
    }
    pub fn key_tombstones(&self, cluster: &str) -> String {
        self.queue.key(&format!("tombs:{cluster}"))
    }
    pub fn key_removals(&self, cluster: &str) -> String {
        self.queue.key(&format!("removals:{cluster}"))
    }

    /// How many removals of users, pools or bridges teardowns made on `cluster` (see
    /// `Cache::sync`).
    pub async fn removals(&self, cluster: &str) -> Result<u64, QueueError> {
        let mut c = self.queue.connection();
        let n: Option<u64> = c.get(self.key_removals(cluster)).await?;
        Ok(n.unwrap_or(0))
    }

    /// Counts a removal, after it happened.
    pub async fn count_removal(&self, cluster: &str) -> Result<(), QueueError> {
        let mut c = self.queue.connection();
        let _: u64 = c.incr(self.key_removals(cluster), 1).await?;
        Ok(())
    }

    pub fn key_creators(&self, cluster: &str) -> String {
        self.queue.key(&format!("creators:{cluster}"))
    }

    /// Records that `deployment` made account `user` (what the dashboard's handout reads;
    /// the user's comment on Proxmox says the same).
    pub async fn note_creator(
        &self,
        cluster: &str,
        user: &str,
        deployment: &str,
    ) -> Result<(), QueueError> {
        let mut c = self.queue.connection();
        let _: () = c.hset(self.key_creators(cluster), user, deployment).await?;
        Ok(())
    }

    /// Forgets a deleted account's creator.
    pub async fn forget_creator(&self, cluster: &str, user: &str) -> Result<(), QueueError> {
        let mut c = self.queue.connection();
        let _: () = c.hdel(self.key_creators(cluster), user).await?;
        Ok(())
    }

    /// The recorded creators of some accounts.
    pub async fn creators(
        &self,
        cluster: &str,
        users: &[&str],
    ) -> Result<HashMap<String, String>, QueueError> {
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let mut c = self.queue.connection();
        let v: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.key_creators(cluster))
            .arg(users)
            .query_async(&mut c)
            .await?;
        Ok(users
            .iter()
            .zip(v)
            .filter_map(|(u, d)| Some(((*u).to_owned(), d?)))
            .collect())
    }

    pub fn key_student_users(&self, cluster: &str, user: &str) -> String {
        self.queue.key(&format!("su:{cluster}:{user}"))
    }

    /// Reads a record with the text a [`Store::commit`] compares against.
    pub async fn read(&self, id: &str) -> Result<Option<Versioned>, QueueError> {
        let mut c = self.queue.connection();
        let v: Option<String> = c.hget(self.key_deployment(id), "record").await?;
        Ok(v.and_then(|raw| {
            serde_json::from_str(&raw)
                .ok()
                .map(|rec| Versioned { rec, raw })
        }))
    }

    /// Writes `rec` only if the stored record is still `prev` (`None`: none stored yet),
    /// with epoch `rec.epoch`'s plan when given, in one atomic call. `false`: somebody else
    /// moved the deployment in between; read it again and decide again.
    pub async fn commit(
        &self,
        prev: Option<&Versioned>,
        rec: &DeploymentRecord,
        plan: Option<PlanDoc<'_>>,
    ) -> Result<bool, QueueError> {
        let mut c = self.queue.connection();
        let json = serde_json::to_string(rec).expect("serializes");
        let field = plan.map(|_| plan_field(rec.epoch)).unwrap_or_default();
        let ok: i64 = COMMIT
            .key(self.key_deployment(&rec.id))
            .key(self.key_deployments())
            .arg(prev.map(|p| p.raw.as_str()).unwrap_or(""))
            .arg(&json)
            .arg(rec.created.timestamp_millis())
            .arg(&rec.id)
            .arg(&field)
            .arg(plan.map(|p| p.json).unwrap_or(""))
            .arg(plan.map(|p| p.vm_steps.join("\n")).unwrap_or_default())
            .arg(
                plan.and_then(|p| p.sealed)
                    .map(|_| sealed_field(rec.epoch))
                    .unwrap_or_default(),
            )
            .arg(plan.and_then(|p| p.sealed).unwrap_or(""))
            .invoke_async(&mut c)
            .await?;
        Ok(ok == 1)
    }

    /// Moves a deployment recorded before scopes existed (layout 0) to this layout: its
    /// progress keys to the scope of the epoch whose VMs they describe, its `plan` to that
    /// epoch's plan field. Returns the record as it is now. Idempotent; safe to race.
    pub async fn upgrade(&self, id: &str) -> Result<Option<Versioned>, QueueError> {
        for _ in 0..5 {
            let Some(v) = self.read(id).await? else {
                return Ok(None);
            };
            if v.rec.layout >= LAYOUT {
                return Ok(Some(v));
            }
            let mut rec = v.rec.clone();
            rec.layout = LAYOUT;
            if rec.phase == Phase::TearingDown && !rec.teardowns.contains(&rec.epoch) {
                rec.teardowns.push(rec.epoch);
            }
            let scope = rec.vm_scope();
            let mut inv = UPGRADE.key(self.key_deployment(id));
            inv.arg(&v.raw)
                .arg(serde_json::to_string(&rec).expect("serializes"))
                .arg(plan_field(rec.vm_epoch()));
            for (old, new) in self
                .progress_keys(id)
                .iter()
                .zip(self.progress_keys(&scope))
            {
                inv.arg(old).arg(new);
            }
            let mut c = self.queue.connection();
            let ok: i64 = inv.invoke_async(&mut c).await?;
            if ok == 1 {
                tracing::info!(deployment = id, "records moved to the scoped layout");
            }
        }
        self.read(id).await
    }

    /// The sealed initial passwords stored with epoch `epoch`'s plan.
    pub async fn sealed(
        &self,
        id: &str,
        epoch: u32,
    ) -> Result<BTreeMap<String, String>, QueueError> {
        let mut c = self.queue.connection();
        let v: Option<String> = c.hget(self.key_deployment(id), sealed_field(epoch)).await?;
        Ok(v.and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default())
    }

    /// The plan of one epoch, as JSON.
    pub async fn plan_json(&self, id: &str, epoch: u32) -> Result<Option<String>, QueueError> {
        let mut c = self.queue.connection();
        Ok(c.hget(self.key_deployment(id), plan_field(epoch)).await?)
    }

    /// Every plan still stored for the deployment, by epoch (the active epoch's and those
    /// of epochs being torn down).
    pub async fn plans(&self, id: &str) -> Result<BTreeMap<u32, String>, QueueError> {
        let mut c = self.queue.connection();
        let all: HashMap<String, String> = c.hgetall(self.key_deployment(id)).await?;
        Ok(all
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("plan:")?.parse().ok()?, v)))
            .collect())
    }

    /// Records that `deployment` lists these users (for shared students).
    pub async fn list_students(
        &self,
        cluster: &str,
        deployment: &str,
        users: &[&str],
    ) -> Result<(), QueueError> {
        if users.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        for u in users {
            p.sadd(self.key_student_users(cluster, u), deployment)
                .ignore();
        }
        let mut c = self.queue.connection();
        p.query_async::<()>(&mut c).await?;
        Ok(())
    }

    /// The deployments that list `user` on `cluster`.
    pub async fn listing_user(&self, cluster: &str, user: &str) -> Result<Vec<String>, QueueError> {
        let mut c = self.queue.connection();
        Ok(c.smembers(self.key_student_users(cluster, user)).await?)
    }

    /// Finishes a teardown: the fenced compare-and-set of the record plus `ops`, in one
    /// script run only while `lease` holds. A record changed since `prev` was read fails
    /// the call (retried: the job reads again).
    pub async fn finish(
        &self,
        lease: &Lease,
        prev: &Versioned,
        rec: &DeploymentRecord,
        ops: &FinishOps,
    ) -> Result<(), JobError> {
        let d = self.key_deployment(&rec.id);
        let json = serde_json::to_string(rec).expect("serializes");
        let ops = serde_json::to_string(ops).expect("serializes");
        lease
            .eval_fenced(&FINISH, &[&d], &[&prev.raw, &json, &ops])
            .await
    }

    /// Removes a torn-down scope's progress keys (an empty scope costs one call).
    pub async fn clear_scope(&self, scope: &str) -> Result<(), QueueError> {
        let mut c = self.queue.connection();
        let _: () = c.del(&self.progress_keys(scope)[..]).await?;
        Ok(())
    }

    /// The progress counters and the failed steps (a few small reads, whatever the size).
    pub async fn progress(&self, scope: &str) -> Result<Progress, QueueError> {
        let mut c = self.queue.connection();
        let (counts, failed): (HashMap<String, i64>, Vec<String>) = redis::pipe()
            .hgetall(self.key_counts(scope))
            .smembers(self.key_failed(scope))
            .query_async(&mut c)
            .await?;
        let mut p = Progress {
            failed,
            ..Progress::default()
        };
        for (k, n) in counts {
            let Ok(n) = usize::try_from(n) else { continue };
            if n == 0 {
                continue;
            }
            if let Some(state) = k.strip_prefix("s:") {
                p.states.insert(state.to_owned(), n);
            } else if let Some((node, state)) =
                k.strip_prefix("n:").and_then(|r| r.rsplit_once(':'))
            {
                p.per_node
                    .entry(node.to_owned())
                    .or_default()
                    .insert(state.to_owned(), n);
            }
        }
        p.failed.sort();
        Ok(p)
    }

    /// Step records by field (`<subject>|<step>`), for a few known fields.
    pub async fn some_steps(
        &self,
        scope: &str,
        fields: &[String],
    ) -> Result<HashMap<String, StepRecord>, QueueError> {
        self.hmget_json(&self.key_steps(scope), fields).await
    }

    /// VM facts for a few known VMs.
    pub async fn some_vms(
        &self,
        scope: &str,
        vms: &[String],
    ) -> Result<HashMap<String, VmFacts>, QueueError> {
        self.hmget_json(&self.key_vms(scope), vms).await
    }

    /// The JSON values of a few fields of a hash; absent and unreadable ones are left out.
    async fn hmget_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        fields: &[String],
    ) -> Result<HashMap<String, T>, QueueError> {
        if fields.is_empty() {
            return Ok(HashMap::new());
        }
        let mut c = self.queue.connection();
        let v: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(key)
            .arg(fields)
            .query_async(&mut c)
            .await?;
        Ok(fields
            .iter()
            .zip(v)
            .filter_map(|(f, v)| Some((f.clone(), serde_json::from_str(&v?).ok()?)))
            .collect())
    }

    pub async fn deployment(&self, id: &str) -> Result<Option<DeploymentRecord>, QueueError> {
        let mut c = self.queue.connection();
        let v: Option<String> = c.hget(self.key_deployment(id), "record").await?;
        Ok(v.and_then(|s| serde_json::from_str(&s).ok()))
    }

    pub async fn deployments(&self) -> Result<Vec<DeploymentRecord>, QueueError> {
        let mut c = self.queue.connection();
        let ids: Vec<String> = c.zrange(self.key_deployments(), 0, -1).await?;
        let mut out = Vec::new();
        for id in ids {
            match self.deployment(&id).await? {
                Some(r) => out.push(r),
                // A torn-down deployment's record expired: forget its id too.
                None => {
                    let _: () = c.zrem(self.key_deployments(), &id).await?;
                }
            }
        }
        Ok(out)
    }

    pub async fn vm_facts(&self, scope: &str) -> Result<HashMap<String, VmFacts>, QueueError> {
        let mut c = self.queue.connection();
        let m: HashMap<String, String> = c.hgetall(self.key_vms(scope)).await?;
        Ok(m.into_iter()
            .filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|f| (k, f)))
            .collect())
    }

    pub async fn one_vm(&self, scope: &str, vm: &str) -> Result<Option<VmFacts>, QueueError> {
        let mut c = self.queue.connection();
        let v: Option<String> = c.hget(self.key_vms(scope), vm).await?;
        Ok(v.and_then(|s| serde_json::from_str(&s).ok()))
    }

    pub async fn steps(&self, scope: &str) -> Result<HashMap<String, StepRecord>, QueueError> {
        let mut c = self.queue.connection();
        let m: HashMap<String, String> = c.hgetall(self.key_steps(scope)).await?;
        Ok(m.into_iter()
            .filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|f| (k, f)))
            .collect())
    }

    /// Writes a VM's facts, only while `lease` holds.
    pub async fn put_vm(
        &self,
        lease: &Lease,
        scope: &str,
        vm: &str,
        facts: &VmFacts,
    ) -> Result<(), JobError> {
        let json = serde_json::to_string(facts).expect("serializes");
        lease
            .hset_fenced(&self.key_vms(scope), &[(vm, &json)])
            .await
    }

    /// Records a step's state, only while `lease` holds, appends an event and, for a VM's
    /// step, updates the VM's state and the counters, all in one fenced script.
    pub async fn put_step(
        &self,
        lease: &Lease,
        id: &str,
        scope: &str,
        update: &StepUpdate<'_>,
    ) -> Result<(), JobError> {
        let StepUpdate {
            subject,
            step,
            node,
            state,
            error,
        } = *update;
        let rec = StepRecord {
            state,
            attempt: lease.attempt(),
            error: error.map(str::to_owned),
            at: Utc::now(),
            worker: Some(lease.worker().to_owned()),
        };
        let json = serde_json::to_string(&rec).expect("serializes");
        let (d, steps, failed, vmst, counts, events) = (
            self.key_deployment(id),
            self.key_steps(scope),
            self.key_failed(scope),
            self.key_vm_states(scope),
            self.key_counts(scope),
            self.key_events(id),
        );
        lease
            .eval_fenced(
                &STEP,
                &[&d, &steps, &failed, &vmst, &counts, &events],
                &[
                    &step_field(subject, step),
                    &json,
                    state.as_str(),
                    step,
                    subject,
                    error.unwrap_or(""),
                    node.unwrap_or(""),
                ],
            )
            .await
    }

    pub async fn quarantine(&self, q: &Quarantined, cluster: &str) -> Result<(), QueueError> {
        let mut c = self.queue.connection();
        let _: () = c
            .hset(
                self.key_quarantine(cluster),
                q.vmid,
                serde_json::to_string(q).expect("serializes"),
            )
            .await?;
        Ok(())
    }

    pub async fn quarantined(&self, cluster: &str) -> Result<Vec<Quarantined>, QueueError> {
        let mut c = self.queue.connection();
        let m: HashMap<String, String> = c.hgetall(self.key_quarantine(cluster)).await?;
        let mut v: Vec<Quarantined> = m
            .values()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect();
        v.sort_by_key(|q| q.vmid);
        Ok(v)
    }
}
