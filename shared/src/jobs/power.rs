//! `power`: start, stop or shut down one VM of a deployment, as one VM's part of an
//! operation (`producer start|stop|shutdown`). Done when: the VM is in the asked state.
//!
//! Each operation has its own id, which is part of its job keys
//! (`<scope>/op/<op>/vm/<vm>/<action>`), so a second `stop` runs again even though the first
//! one's done job is kept for a week. Starts hold the node's start slot
//! ([`start_slot`], capped from `max_parallel_starts.per_node`), so a class booting at once
//! does not storm a node. A shutdown that the guest does not finish within the timeout
//! falls back to a hard stop.
//!
//! What labfleet last did to a VM's power is recorded in `d:<scope>:power` (vm key -> JSON
//! [`PowerRecord`], fenced): `status` shows it without asking Proxmox.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::jobs::state::Store;
use crate::jobs::{Env, VmRef, pve_error, require_vm, scope_of_key};
use crate::pve::{PveError, ShutdownParams};
use crate::queue::{JobError, Lease, QueueError};

/// What a power job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerAction {
    Start,
    Stop,
    Shutdown,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::Start => "start",
            PowerAction::Stop => "stop",
            PowerAction::Shutdown => "shutdown",
        }
    }
}

/// One VM's power change within operation `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerJob {
    pub vm: VmRef,
    /// The operation's id (also in the job key).
    pub op: String,
    pub action: PowerAction,
    /// Shutdown only: seconds the guest gets before the VM is stopped hard (default 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
}

/// The default of `--timeout` for a shutdown.
pub const DEFAULT_SHUTDOWN_TIMEOUT: u32 = 120;

/// The concurrency key of VM starts on a node (capped from `max_parallel_starts.per_node`).
pub fn start_slot(cluster: &str, node: &str) -> String {
    format!("start-node:{cluster}/{node}")
}

/// The key that serializes every job changing one VM's power (`power`, `reset`, the
/// deployment's `start`): a power job delivered again after its worker died keeps it into
/// the re-delivery, so a later operation on the VM waits for it instead of racing it.
pub fn vm_mutex(scope: &str, vm: &str) -> String {
    format!("mutex:power/{scope}/{vm}")
}

/// The concurrency keys of a job that changes the power of VM `vm` (in `scope`, on `node`
/// of `cluster`): always the VM's [`vm_mutex`], and the node's [`start_slot`] when it may
/// start the VM (a start, a reset of a running VM).
pub fn slot_keys(scope: &str, vm: &str, cluster: &str, node: &str, starts: bool) -> Vec<String> {
    let mut keys = vec![vm_mutex(scope, vm)];
    if starts {
        keys.push(start_slot(cluster, node));
    }
    keys
}

/// The power state labfleet last brought a VM to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerRecord {
    /// `running` or `stopped`.
    pub state: String,
    pub at: DateTime<Utc>,
    /// The operation (or `deploy` for a deployment's own start).
    pub by: String,
    /// How it got there when it matters: `forced after 120 s` for a shutdown that fell back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// When the job that wrote it was enqueued (ms, Redis' clock): orders operations
    /// without trusting worker clocks. Absent in records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enqueued: Option<i64>,
}

impl Store {
    /// `d:<scope>:power`.
    pub fn key_power(&self, scope: &str) -> String {
        self.queue().key(&format!("d:{scope}:power"))
    }

    /// Every VM's last recorded power state in a scope.
    pub async fn power_records(
        &self,
        scope: &str,
    ) -> Result<HashMap<String, PowerRecord>, QueueError> {
        use redis::AsyncCommands;
        let mut c = self.queue().connection();
        let raw: HashMap<String, String> = c.hgetall(self.key_power(scope)).await?;
        Ok(raw
            .into_iter()
            .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
            .collect())
    }
}

/// Records a VM's power state (fenced by the job's lease).
pub async fn record(
    env: &Env,
    lease: &Lease,
    vm: &str,
    running: bool,
    by: &str,
    note: Option<String>,
) -> Result<(), JobError> {
    let rec = PowerRecord {
        state: if running { "running" } else { "stopped" }.into(),
        at: Utc::now(),
        by: by.to_owned(),
        note,
        enqueued: Some(lease.enqueued_at()),
    };
    let json = serde_json::to_string(&rec).expect("serializes");
    let key = env.store.key_power(scope_of_key(lease.job_key()));
    lease.hset_fenced(&key, &[(vm, &json)]).await
}

/// Whether a later operation on this VM already ran: this job was delivered again after its
/// worker died or Redis lost its ack, and acting now would undo that later one (a start of
/// last week's class after this week's shutdown). Known by the VM's power record, written
/// by another operation enqueued after this job. The VM's power mutex ([`vm_mutex`]) keeps
/// the two from running at once, so the record read here is not about to change.
async fn superseded(j: &PowerJob, lease: &Lease, env: &Env) -> Result<bool, JobError> {
    let redis = |e: crate::queue::QueueError| JobError::Retry(format!("redis: {e}"));
    let mut c = env.store.queue().connection();
    let key = env.store.key_power(scope_of_key(lease.job_key()));
    let rec: Option<String> = redis::AsyncCommands::hget(&mut c, &key, &j.vm.key)
        .await
        .map_err(|e| redis(e.into()))?;
    let Some(rec) = rec.and_then(|r| serde_json::from_str::<PowerRecord>(&r).ok()) else {
        return Ok(false);
    };
    let later = rec.enqueued.unwrap_or_else(|| rec.at.timestamp_millis());
    Ok(rec.by != j.op && later > lease.enqueued_at())
}

pub async fn run(j: &PowerJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    if superseded(j, lease, env).await? {
        tracing::info!(vm = %j.vm.key, op = %j.op, "a later operation already ran on this VM; nothing to do");
        return Ok(());
    }
    let facts = require_vm(env, lease, &j.vm).await?;
    let pve = env.pve(&j.vm.cluster)?;
    let (node, vmid) = (facts.node.as_str(), facts.vmid);
    let running = pve
        .vm_status(node, vmid)
        .await
        .map_err(pve_error)?
        .is_running();
    let want_running = j.action == PowerAction::Start;
    if running == want_running {
        return record(env, lease, &j.vm.key, running, &j.op, None).await;
    }
    lease.check().await?;
    let mut note = None;
    match j.action {
        PowerAction::Start => {
            let upid = pve.start_vm(node, vmid).await.map_err(pve_error)?;
            env.wait(&pve, &upid, lease).await?;
        }
        PowerAction::Stop => {
            let upid = pve.stop_vm(node, vmid).await.map_err(pve_error)?;
            env.wait(&pve, &upid, lease).await?;
        }
        PowerAction::Shutdown => {
            let timeout = j.timeout_secs.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT);
            let p = ShutdownParams {
                timeout: Some(timeout),
                force_stop: false,
            };
            let upid = pve.shutdown_vm(node, vmid, &p).await.map_err(pve_error)?;
            match env.wait_task(&pve, &upid, lease).await? {
                Ok(()) => {}
                // The guest did not power off in time (or refused): stop it hard.
                Err(PveError::TaskFailed { .. }) => {
                    tracing::info!(vmid, timeout, "shutdown timed out; stopping the VM");
                    lease.check().await?;
                    let upid = pve.stop_vm(node, vmid).await.map_err(pve_error)?;
                    env.wait(&pve, &upid, lease).await?;
                    note = Some(format!(
                        "stopped after the guest's {timeout} s shutdown timeout"
                    ));
                }
                Err(e) => return Err(pve_error(e)),
            }
        }
    }
    record(env, lease, &j.vm.key, want_running, &j.op, note).await
}
