//! From facts to a plan: the pure draft (`shared::plan::draft`: placement and the
//! reservations it needs), one allocation step in Redis (reserve for `submit`, preview for
//! `plan`), then the pure build. Nothing else here decides anything.

use std::collections::BTreeMap;

use shared::alloc::{self, Space};
use shared::config::Config;
use shared::jobs::state::{Phase, Store};
use shared::plan::{self, Draft, Facts, Plan, VmidRequest};

use super::{DeployError, plan_of, read};

/// Whether an allocation reserves (submit) or only previews the next free numbers (plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocMode {
    Reserve,
    Preview,
}

/// What an allocation hands out: vm owner -> VMID, bridge owner -> interface.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allocation {
    pub vmids: BTreeMap<String, u32>,
    pub bridges: BTreeMap<String, String>,
}

/// What other active deployments have planned per node and not made yet (memory).
async fn planned_elsewhere(store: &Store, id: &str, facts: &Facts) -> BTreeMap<String, u64> {
    let mut plans = Vec::new();
    if let Ok(deps) = store.deployments().await {
        for d in deps
            .iter()
            .filter(|d| d.id != id && d.phase == Phase::Active)
        {
            if let Ok(Some(p)) = store.plan_json(&d.id, d.epoch).await
                && let Ok(p) = serde_json::from_str::<Plan>(&p)
            {
                plans.push(p);
            }
        }
    }
    shared::capacity::planned_elsewhere(&plans, facts)
}

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
/// retired VMs: the caller decides).
pub(super) async fn plan_with(
    cfg: &Config,
    facts: &mut Facts,
    store: &Store,
    mode: AllocMode,
    prior: Option<&Plan>,
) -> Result<Plan, DeployError> {
    let id = plan::deployment_id(cfg);
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
    let elsewhere = planned_elsewhere(store, &id, facts).await;
    for n in &mut facts.nodes {
        n.planned_elsewhere = elsewhere.get(&n.name).copied().unwrap_or(0);
    }
    // Placement by the capacity figures; a submit is refused here, before any reservation.
    let enforce = mode == AllocMode::Reserve;
    let (placement, capacity) = super::capacity::place(cfg, facts, &pinned, prior, enforce)?;
    let draft = plan::draft(cfg, facts, placement);
    let got = allocate(store, &cfg.cluster, facts, &draft, mode).await?;
    let mut plan = plan::build(cfg, facts, draft.placement, &got.vmids, &got.bridges);
    plan.capacity = Some(capacity);
    Ok(plan)
}

/// The one allocation step: every VMID and bridge name the draft needs.
pub async fn allocate(
    store: &Store,
    cluster: &str,
    facts: &Facts,
    draft: &Draft,
    mode: AllocMode,
) -> Result<Allocation, DeployError> {
    let q = store.queue();
    let mut out = Allocation::default();
    let space = Space::vmids(q, cluster);
    match (&draft.vmids, mode) {
        (VmidRequest::Range { min, max, owners }, AllocMode::Reserve) => {
            out.vmids = alloc::reserve(q, &space, owners, *min, *max, &facts.vmids_in_use).await?;
        }
        (VmidRequest::Range { min, owners, .. }, AllocMode::Preview) => {
            out.vmids = alloc::preview(q, &space, owners, *min, &facts.vmids_in_use).await?;
        }
        (VmidRequest::Fixed(wanted), AllocMode::Reserve) => {
            for (owner, want) in wanted {
                match alloc::reserve_exact(q, &space, owner, *want).await? {
                    Some(v) => {
                        out.vmids.insert(owner.clone(), v);
                    }
                    None => return Err(DeployError::VmidTaken { vmid: *want }),
                }
            }
        }
        (VmidRequest::Fixed(wanted), AllocMode::Preview) => {
            out.vmids = wanted.iter().cloned().collect();
        }
    }
    let (lo, hi) = draft.bridge_range;
    for b in &draft.bridges {
        let space = Space::bridges(q, cluster, &b.node);
        let got = match mode {
            AllocMode::Reserve => alloc::reserve(q, &space, &b.owners, lo, hi, &b.taken).await?,
            AllocMode::Preview => alloc::preview(q, &space, &b.owners, lo, &b.taken).await?,
        };
        for (o, n) in got {
            out.bridges.insert(o, format!("vmbr{n}"));
        }
    }
    Ok(out)
}
