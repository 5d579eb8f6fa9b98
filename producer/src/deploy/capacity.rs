//! The producer's capacity check: places the students by the figures of
//! `shared::capacity` (so the plan shown is the plan submitted), measures what the placement
//! commits on every node and storage, and refuses a submit that does not fit (exit 7) before
//! anything is reserved in Redis or made on Proxmox.

use std::collections::BTreeMap;

use shared::capacity::{self, Capacity};
use shared::config::Config;
use shared::placement::{self, Placement};
use shared::plan::{self, Facts, Plan};

use super::DeployError;

/// Places the students (`pinned` to the nodes an earlier plan gave them) and measures the
/// placement. With `enforce` (submit), a placement over a node's `memory_overcommit` or a
/// storage's free space is refused with every node and storage over its limit.
pub fn place(
    cfg: &Config,
    facts: &Facts,
    pinned: &BTreeMap<String, String>,
    prior: Option<&Plan>,
    enforce: bool,
) -> Result<(Placement, Capacity), DeployError> {
    let made = capacity::made(prior, facts);
    let mut demands = plan::demands(cfg, facts, pinned);
    // A resubmit adds only the VMs not made yet: the others are in their node's figures.
    for v in prior.into_iter().flat_map(|p| &p.vms) {
        if made.contains(&v.key)
            && let Some(d) = demands.iter_mut().find(|d| d.user == v.user)
        {
            d.mem = d.mem.saturating_sub(v.source.maxmem);
        }
    }
    let placement = placement::place(&demands, &facts.nodes)?;
    let ratio = cfg.connection().operating.memory_overcommit;
    let cap = capacity::of(cfg, facts, &placement, &made, ratio);
    if enforce && !cap.fits() {
        return Err(DeployError::CapacityRefused {
            cluster: cfg.cluster.clone(),
            refusals: cap.refusals(),
        });
    }
    Ok((placement, cap))
}
