//! From facts to a plan: the producer's face of `shared::replan` (facts -> placement by
//! capacity -> pure draft -> one allocation step -> pure build), with students pinned to the
//! nodes an earlier plan gave them. Nothing else here decides anything.

use std::collections::BTreeMap;

use shared::config::Config;
use shared::jobs::state::Store;
use shared::plan::{self, Facts, Plan};
pub use shared::replan::{AllocMode, Allocation};

use super::{DeployError, plan_of, read};

/// Plans the deployment. With [`AllocMode::Reserve`], VMIDs and bridges are reserved and
/// what an earlier submit had but the files no longer have is carried as retired (submit);
/// with `Preview` they are the next free numbers, not reserved (plan).
pub async fn make_plan(
    cfg: &Config,
    facts: &mut Facts,
    store: &Store,
    mode: AllocMode,
) -> Result<Plan, DeployError> {
    let id = plan::deployment_id(cfg);
    let prior = match read(store, &id).await? {
        Some(v) => plan_of(store, &v.rec, v.rec.vm_epoch()).await?,
        None => None,
    };
    let mut plan = plan_with(cfg, facts, store, mode, prior.as_ref()).await?;
    if mode == AllocMode::Reserve
        && let Some(prior) = &prior
    {
        plan.retire_from(prior);
    }
    Ok(plan)
}

/// Plans with students pinned to the nodes `prior` placed them on (without carrying its
/// retired VMs: the caller decides). A submit over the capacity limits is refused here,
/// before any reservation.
pub(super) async fn plan_with(
    cfg: &Config,
    facts: &mut Facts,
    store: &Store,
    mode: AllocMode,
    prior: Option<&Plan>,
) -> Result<Plan, DeployError> {
    // A student keeps their node: those in the files, and those dropped without --prune
    // whose VMs are still there (listed again, they must not be planned elsewhere).
    let pinned: BTreeMap<String, String> = prior
        .map(|p| {
            p.students
                .iter()
                .chain(&p.retired_students)
                .map(|s| (s.user.clone(), s.node.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut plan = shared::replan::plan_with(cfg, facts, store, mode, prior, &pinned).await?;
    if let Some(prior) = prior {
        plan.carry_moves(prior);
    }
    Ok(plan)
}

/// The one allocation step: every VMID and bridge name the draft needs.
pub async fn allocate(
    store: &Store,
    cluster: &str,
    facts: &Facts,
    draft: &plan::Draft,
    mode: AllocMode,
) -> Result<Allocation, DeployError> {
    Ok(shared::replan::allocate(store, cluster, facts, draft, mode).await?)
}
