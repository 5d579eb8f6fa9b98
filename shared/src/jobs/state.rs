//! Deployment state in Redis: the deployment record, each VM's facts (VMID, node, UPID),
//! each step's outcome, and an event stream for live progress.
//!
//! Keys (all under the queue's hash tag, so fenced writes and scripts may touch them):
//! - `deployments`: ZSET id -> created (ms).
//! - `d:<id>`: HASH `record` (JSON [`DeploymentRecord`]), `plan` (JSON of the plan).
//! - `d:<id>:vm`: HASH vm key -> JSON [`VmFacts`], written by the clone job (fenced).
//! - `d:<id>:step`: HASH `<subject>|<step>` -> JSON [`StepRecord`], written by each job (fenced).
//! - `d:<id>:failed`: SET of the step fields whose record says `failed`.
//! - `d:<id>:vmstate`: HASH vm key -> `<state>|<node>`, the VM's state derived from its steps.
//! - `d:<id>:count`: HASH `s:<state>` and `n:<node>:<state>` -> number of VMs (VMs with no
//!   entry are pending). These three are kept exact by `step.lua`, atomically with each step
//!   record, so `status` of a large deployment reads counters, not every record.
//! - `d:<id>:events`: STREAM of progress events, capped at about 10,000 entries.
//!
//! The deployment hash also holds `vmsteps`: the steps every VM goes through, one per line,
//! which `step.lua` reads to decide a VM's state.
//! - `quarantine:<cluster>`: HASH vmid -> JSON [`Quarantined`].

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::queue::{FencedScript, JobError, Lease, Queue, QueueError};

static STEP: LazyLock<FencedScript> = LazyLock::new(|| FencedScript::new(include_str!("step.lua")));

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
    /// `active` or `torn-down` / `tearing-down`.
    pub phase: String,
    /// What the current plan holds, for the counter-based `status` (absent in records
    /// written before it existed: those get the per-VM status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<Totals>,
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
    /// The job group (and job key prefix) of the current epoch.
    pub fn scope(&self) -> String {
        format!("{}#{}", self.id, self.epoch)
    }
}

/// What the clone job learned about its VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFacts {
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
    pub fn key_vms(&self, id: &str) -> String {
        self.queue.key(&format!("d:{id}:vm"))
    }
    pub fn key_steps(&self, id: &str) -> String {
        self.queue.key(&format!("d:{id}:step"))
    }
    pub fn key_failed(&self, id: &str) -> String {
        self.queue.key(&format!("d:{id}:failed"))
    }
    pub fn key_vm_states(&self, id: &str) -> String {
        self.queue.key(&format!("d:{id}:vmstate"))
    }
    pub fn key_counts(&self, id: &str) -> String {
        self.queue.key(&format!("d:{id}:count"))
    }
    pub fn key_events(&self, id: &str) -> String {
        self.queue.key(&format!("d:{id}:events"))
    }
    pub fn key_quarantine(&self, cluster: &str) -> String {
        self.queue.key(&format!("quarantine:{cluster}"))
    }

    /// Writes the deployment's record and, at a submit, its plan with the steps every VM
    /// goes through (read by `step.lua`), in one atomic call.
    pub async fn put_deployment(
        &self,
        rec: &DeploymentRecord,
        plan: Option<PlanDoc<'_>>,
    ) -> Result<(), QueueError> {
        let mut c = self.queue.connection();
        let mut p = redis::pipe();
        p.atomic()
            .hset(
                self.key_deployment(&rec.id),
                "record",
                serde_json::to_string(rec).expect("serializes"),
            )
            .ignore()
            .zadd(
                self.key_deployments(),
                &rec.id,
                rec.created.timestamp_millis(),
            )
            .ignore();
        if let Some(plan) = plan {
            p.hset(self.key_deployment(&rec.id), "plan", plan.json)
                .ignore()
                .hset(
                    self.key_deployment(&rec.id),
                    "vmsteps",
                    plan.vm_steps.join("\n"),
                )
                .ignore();
        }
        p.query_async::<()>(&mut c).await?;
        Ok(())
    }

    /// The progress counters and the failed steps (a few small reads, whatever the size).
    pub async fn progress(&self, id: &str) -> Result<Progress, QueueError> {
        let mut c = self.queue.connection();
        let (counts, failed): (HashMap<String, i64>, Vec<String>) = redis::pipe()
            .hgetall(self.key_counts(id))
            .smembers(self.key_failed(id))
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
        id: &str,
        fields: &[String],
    ) -> Result<HashMap<String, StepRecord>, QueueError> {
        self.hmget_json(&self.key_steps(id), fields).await
    }

    /// VM facts for a few known VMs.
    pub async fn some_vms(
        &self,
        id: &str,
        vms: &[String],
    ) -> Result<HashMap<String, VmFacts>, QueueError> {
        self.hmget_json(&self.key_vms(id), vms).await
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

    pub async fn plan_json(&self, id: &str) -> Result<Option<String>, QueueError> {
        let mut c = self.queue.connection();
        Ok(c.hget(self.key_deployment(id), "plan").await?)
    }

    pub async fn deployments(&self) -> Result<Vec<DeploymentRecord>, QueueError> {
        let mut c = self.queue.connection();
        let ids: Vec<String> = c.zrange(self.key_deployments(), 0, -1).await?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(r) = self.deployment(&id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }

    pub async fn vm_facts(&self, id: &str) -> Result<HashMap<String, VmFacts>, QueueError> {
        let mut c = self.queue.connection();
        let m: HashMap<String, String> = c.hgetall(self.key_vms(id)).await?;
        Ok(m.into_iter()
            .filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|f| (k, f)))
            .collect())
    }

    pub async fn one_vm(&self, id: &str, vm: &str) -> Result<Option<VmFacts>, QueueError> {
        let mut c = self.queue.connection();
        let v: Option<String> = c.hget(self.key_vms(id), vm).await?;
        Ok(v.and_then(|s| serde_json::from_str(&s).ok()))
    }

    pub async fn steps(&self, id: &str) -> Result<HashMap<String, StepRecord>, QueueError> {
        let mut c = self.queue.connection();
        let m: HashMap<String, String> = c.hgetall(self.key_steps(id)).await?;
        Ok(m.into_iter()
            .filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|f| (k, f)))
            .collect())
    }

    /// Writes a VM's facts, only while `lease` holds.
    pub async fn put_vm(
        &self,
        lease: &Lease,
        id: &str,
        vm: &str,
        facts: &VmFacts,
    ) -> Result<(), JobError> {
        let json = serde_json::to_string(facts).expect("serializes");
        lease.hset_fenced(&self.key_vms(id), &[(vm, &json)]).await
    }

    /// Records a step's state, only while `lease` holds, appends an event and, for a VM's
    /// step, updates the VM's state and the counters, all in one fenced script.
    pub async fn put_step(
        &self,
        lease: &Lease,
        id: &str,
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
            self.key_steps(id),
            self.key_failed(id),
            self.key_vm_states(id),
            self.key_counts(id),
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

    /// Removes the per-VM and per-step state of a deployment (after a finished teardown).
    pub async fn clear_progress(&self, id: &str) -> Result<(), QueueError> {
        let mut c = self.queue.connection();
        let _: () = redis::pipe()
            .del(self.key_vms(id))
            .del(self.key_steps(id))
            .del(self.key_failed(id))
            .del(self.key_vm_states(id))
            .del(self.key_counts(id))
            .query_async(&mut c)
            .await?;
        Ok(())
    }
}
