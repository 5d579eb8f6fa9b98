//! `reset`: roll one VM back to its baseline snapshot, as one VM's part of a
//! `producer reset` operation. A running VM is stopped, rolled back and started again; a
//! stopped one stays stopped. Done when: the rollback of this operation has happened and
//! the VM is in the power state it had before.
//!
//! The job can run twice (a lost lease, a crash): what it found and how far it got is kept
//! in `d:<scope>:opmemo` (field `<op>|<vm>`, fenced): `running`/`stopped` before the
//! rollback, `rolled-back:<state>` after it, so a re-run neither rolls back twice nor
//! forgets to start the VM again. A VM without the baseline fails for good, changed in
//! nothing, with a message that says why.

use serde::{Deserialize, Serialize};

use crate::jobs::baseline::{BASELINE_SNAPSHOT, has_baseline};
use crate::jobs::state::Store;
use crate::jobs::{Env, VmRef, power, pve_error, require_vm, scope_of_key};
use crate::queue::{JobError, Lease};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetJob {
    pub vm: VmRef,
    /// The operation's id (also in the job key).
    pub op: String,
}

impl Store {
    /// `d:<scope>:opmemo`: how far each VM's part of an operation got.
    pub fn key_op_memo(&self, scope: &str) -> String {
        self.queue().key(&format!("d:{scope}:opmemo"))
    }
}

async fn memo(env: &Env, lease: &Lease, field: &str) -> Result<Option<String>, JobError> {
    use redis::AsyncCommands;
    let key = env.store.key_op_memo(scope_of_key(lease.job_key()));
    let mut c = env.store.queue().connection();
    c.hget(key, field)
        .await
        .map_err(|e| JobError::Retry(format!("redis: {e}")))
}

async fn set_memo(env: &Env, lease: &Lease, field: &str, value: &str) -> Result<(), JobError> {
    let key = env.store.key_op_memo(scope_of_key(lease.job_key()));
    lease.hset_fenced(&key, &[(field, value)]).await
}

pub async fn run(j: &ResetJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let facts = require_vm(env, lease, &j.vm).await?;
    let pve = env.pve(&j.vm.cluster)?;
    let (node, vmid) = (facts.node.as_str(), facts.vmid);
    let field = format!("{}|{}", j.op, j.vm.key);
    let mut stage = memo(env, lease, &field).await?;
    if stage.is_none() {
        if !has_baseline(&pve, node, vmid).await? {
            return Err(JobError::Permanent(format!(
                "VM {vmid} ({}) has no baseline snapshot '{BASELINE_SNAPSHOT}': nothing was changed; set `baseline: true` in deployment_config.yml before the VMs are made (or take the snapshot by hand in Proxmox)",
                j.vm.key
            )));
        }
        let running = pve
            .vm_status(node, vmid)
            .await
            .map_err(pve_error)?
            .is_running();
        let s = if running { "running" } else { "stopped" };
        set_memo(env, lease, &field, s).await?;
        stage = Some(s.to_owned());
    }
    let stage = stage.unwrap_or_default();
    let was_running = stage.ends_with("running");
    if !stage.starts_with("rolled-back:") {
        lease.check().await?;
        // Proxmox's rollback stops a running VM itself (hard, 5 s); it is done here first
        // so that the stop is a task of its own, waited for and visible in the task list.
        let now_running = pve
            .vm_status(node, vmid)
            .await
            .map_err(pve_error)?
            .is_running();
        if now_running {
            let upid = pve.stop_vm(node, vmid).await.map_err(pve_error)?;
            env.wait(&pve, &upid, lease).await?;
        }
        let upid = pve
            .rollback_snapshot(node, vmid, BASELINE_SNAPSHOT, false)
            .await
            .map_err(pve_error)?;
        env.wait(&pve, &upid, lease).await?;
        let done = format!(
            "rolled-back:{}",
            if was_running { "running" } else { "stopped" }
        );
        set_memo(env, lease, &field, &done).await?;
    }
    if was_running {
        let status = pve.vm_status(node, vmid).await.map_err(pve_error)?;
        if !status.is_running() {
            lease.check().await?;
            let upid = pve.start_vm(node, vmid).await.map_err(pve_error)?;
            env.wait(&pve, &upid, lease).await?;
        }
    }
    power::record(
        env,
        lease,
        &j.vm.key,
        was_running,
        &j.op,
        Some("reset".into()),
    )
    .await
}
