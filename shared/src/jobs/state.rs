//! Deployment state in Redis: the deployment record, each VM's facts (VMID, node, UPID),
//! each step's outcome, and an event stream for live progress.
//!
//! Keys (all under the queue's hash tag, so fenced writes and scripts may touch them):
//! - `deployments`: ZSET id -> created (ms).
//! - `d:<id>`: HASH `record` (JSON [`DeploymentRecord`]), `plan` (JSON of the plan).
//! - `d:<id>:vm`: HASH vm key -> JSON [`VmFacts`], written by the clone job (fenced).
//! - `d:<id>:step`: HASH `<subject>|<step>` -> JSON [`StepRecord`], written by each job (fenced).
//! - `d:<id>:events`: STREAM of progress events, capped at about 10,000 entries.
//! - `quarantine:<cluster>`: HASH vmid -> JSON [`Quarantined`].

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::queue::{JobError, Lease, Queue, QueueError};

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
    pub fn key_events(&self, id: &str) -> String {
        self.queue.key(&format!("d:{id}:events"))
    }
    pub fn key_quarantine(&self, cluster: &str) -> String {
        self.queue.key(&format!("quarantine:{cluster}"))
    }

    pub async fn put_deployment(
        &self,
        rec: &DeploymentRecord,
        plan_json: Option<&str>,
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
        if let Some(plan) = plan_json {
            p.hset(self.key_deployment(&rec.id), "plan", plan).ignore();
        }
        p.query_async::<()>(&mut c).await?;
        Ok(())
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

    /// Records a step's state, only while `lease` holds, and appends an event.
    pub async fn put_step(
        &self,
        lease: &Lease,
        id: &str,
        subject: &str,
        step: &str,
        state: StepState,
        error: Option<String>,
    ) -> Result<(), JobError> {
        let rec = StepRecord {
            state,
            attempt: lease.attempt(),
            error: error.clone(),
            at: Utc::now(),
            worker: Some(lease.worker().to_owned()),
        };
        let json = serde_json::to_string(&rec).expect("serializes");
        lease
            .hset_fenced(&self.key_steps(id), &[(&step_field(subject, step), &json)])
            .await?;
        let _ = self.event(id, subject, step, state, error.as_deref()).await;
        Ok(())
    }

    pub async fn event(
        &self,
        id: &str,
        subject: &str,
        step: &str,
        state: StepState,
        error: Option<&str>,
    ) -> Result<(), QueueError> {
        let mut c = self.queue.connection();
        let state = serde_json::to_value(state).expect("serializes");
        let mut fields = vec![
            ("subject", subject.to_owned()),
            ("step", step.to_owned()),
            ("state", state.as_str().unwrap_or("").to_owned()),
        ];
        if let Some(e) = error {
            fields.push(("error", e.to_owned()));
        }
        let _: String = redis::cmd("XADD")
            .arg(self.key_events(id))
            .arg("MAXLEN")
            .arg("~")
            .arg(10_000)
            .arg("*")
            .arg(&fields)
            .query_async(&mut c)
            .await?;
        Ok(())
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
            .query_async(&mut c)
            .await?;
        Ok(())
    }
}
