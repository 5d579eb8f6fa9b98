//! The producer's side of a deployment, one file per concern: `connect` (Redis, Proxmox),
//! `allocate` (the producer's face of `shared::replan`: facts -> placement by the
//! capacity figures `submit` enforces, exit 7 -> pure draft -> one allocation step -> plan), `submit`, `status` and `teardown`. Planning itself is pure (`shared::plan`); this
//! module does the I/O. Every function returns a [`DeployError`], whose variant decides the
//! exit code (in [`DeployError::exit`], the only place).

mod allocate;
mod connect;
mod error;
mod status;
mod submit;
mod teardown;

pub use allocate::{AllocMode, Allocation, allocate, make_plan};
pub use connect::{connect_pve, connect_queue};
pub use error::{DeployError, pve_exit};
pub use shared::replan::gather_facts;
pub use status::{
    DeploymentState, Listing, Status, VmState, VmStatus, overall_state, status, summary,
};
pub use submit::{SubmitOptions, Submitted, student_password, submit, submit_with};
pub use teardown::{
    TeardownProgress, TeardownStarted, ensure_teardowns, teardown, teardown_progress,
};

use shared::jobs::state::{DeploymentRecord, Store, Versioned};
use shared::plan::Plan;

/// A deployment's record, moved to the current key layout first.
pub async fn read(store: &Store, id: &str) -> Result<Option<Versioned>, DeployError> {
    Ok(store.upgrade(id).await?)
}

/// The stored plan of one epoch of a deployment, if any.
pub async fn plan_of(
    store: &Store,
    rec: &DeploymentRecord,
    epoch: u32,
) -> Result<Option<Plan>, DeployError> {
    Ok(store
        .plan_json(&rec.id, epoch)
        .await?
        .and_then(|s| serde_json::from_str(&s).ok()))
}

/// A deployment's record, or why there is none.
async fn record(store: &Store, id: &str) -> Result<DeploymentRecord, DeployError> {
    read(store, id)
        .await?
        .map(|v| v.rec)
        .ok_or_else(|| DeployError::NoDeployment { id: id.to_owned() })
}

/// A deployment's record and plan. The plan is the one whose VMs exist: the active epoch's,
/// or the one being torn down.
pub async fn load(store: &Store, id: &str) -> Result<(DeploymentRecord, Plan), DeployError> {
    let rec = record(store, id).await?;
    let plan = vm_plan(store, &rec).await?;
    Ok((rec, plan))
}

/// The plan whose VMs exist (the active epoch's, or the one being torn down), or why none.
async fn vm_plan(store: &Store, rec: &DeploymentRecord) -> Result<Plan, DeployError> {
    plan_of(store, rec, rec.vm_epoch())
        .await?
        .ok_or_else(|| DeployError::NoPlan {
            id: rec.id.clone(),
            phase: rec.phase,
        })
}
