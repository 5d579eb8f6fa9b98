//! The producer's capacity check: places the students by the figures of
//! `shared::capacity` (so the plan shown is the plan submitted), measures what the placement
//! commits on every node and storage, and refuses a submit that does not fit (exit 7) before
//! anything is reserved in Redis or made on Proxmox.

use std::collections::BTreeMap;

use shared::capacity::{self, Capacity};
use shared::config::Config;
use shared::placement::{self, Placement};
use shared::plan::{self, Facts, Plan};

use crate::exit::{Exit, Failure};

/// Places the students (`pinned` to the nodes an earlier plan gave them) and measures the
/// placement. With `enforce` (submit), a placement over a node's `memory_overcommit` or a
/// storage's free space is refused with every node and storage over its limit.
pub fn place(
    cfg: &Config,
    facts: &Facts,
    pinned: &BTreeMap<String, String>,
    prior: Option<&Plan>,
    enforce: bool,
) -> Result<(Placement, Capacity), Failure> {
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
    let placement = placement::place(&demands, &facts.nodes).map_err(|e| {
        Failure::new(
            Exit::InvalidConfig,
            anyhow::Error::new(e).context("placing students"),
        )
    })?;
    let ratio = cfg.connection().operating.memory_overcommit;
    let cap = capacity::of(cfg, facts, &placement, &made, ratio);
    if enforce && !cap.fits() {
        return Err(Failure::new(
            Exit::CapacityRefused,
            anyhow::anyhow!(
                "the class does not fit on cluster {}; nothing was submitted:\n  {}",
                cfg.cluster,
                cap.refusals().join("\n  ")
            ),
        ));
    }
    Ok((placement, cap))
}
