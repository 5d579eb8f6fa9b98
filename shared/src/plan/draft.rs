//! The pure step between the placement and the allocation in Redis: which VMID and bridge
//! reservations the plan needs (their owners, ranges and the
//! numbers the cluster already uses). `plan` previews a draft, `submit` reserves it; both
//! then [`build`](super::build) the same plan from it.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::{Config, VmidPolicy};
use crate::placement::Placement;

use super::{Facts, bridge_owner, fixed_vmid, private_aliases, vm_key, vm_owner};

/// The VMIDs a plan needs.
#[derive(Debug, Clone, PartialEq)]
pub enum VmidRequest {
    /// One VMID per owner from `min..=max`, skipping the cluster's and everyone's reservations.
    Range {
        min: u32,
        max: u32,
        owners: Vec<String>,
    },
    /// Exactly these VMIDs (`vmid_base`/`vmid_stride`): (owner, VMID).
    Fixed(Vec<(String, u32)>),
}

/// The private bridges a plan needs on one node.
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeRequest {
    pub node: String,
    pub owners: Vec<String>,
    /// `vmbrN` numbers the node already has.
    pub taken: BTreeSet<u32>,
}

/// Placement plus the reservations to make, before any of them is made.
#[derive(Debug, Clone, PartialEq)]
pub struct Draft {
    pub placement: Placement,
    pub vmids: VmidRequest,
    pub bridges: Vec<BridgeRequest>,
    /// The deployment's `bridge_range`.
    pub bridge_range: (u32, u32),
}

/// Lists the reservations `placement` needs.
pub fn draft(cfg: &Config, facts: &Facts, placement: Placement) -> Draft {
    let id = super::deployment_id(cfg);
    let mut owners = Vec::new();
    for (ui, u) in cfg.users.users.iter().enumerate() {
        for (mi, m) in cfg.deployment.machines.iter().enumerate() {
            owners.push((vm_owner(&id, &vm_key(u, m)), ui, mi));
        }
    }
    let vmids = match cfg.deployment.vmids {
        VmidPolicy::Range { min, max } => VmidRequest::Range {
            min,
            max,
            owners: owners.into_iter().map(|o| o.0).collect(),
        },
        policy @ VmidPolicy::Fixed { .. } => VmidRequest::Fixed(
            owners
                .into_iter()
                .map(|(o, ui, mi)| {
                    let want = fixed_vmid(&policy, ui, mi).expect("a fixed policy");
                    (o, want)
                })
                .collect(),
        ),
    };
    let aliases = private_aliases(cfg);
    let mut per_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if !aliases.is_empty() {
        for u in &cfg.users.users {
            let node = &placement.nodes[&u.to_string()];
            for alias in aliases.keys() {
                per_node
                    .entry(node.clone())
                    .or_default()
                    .push(bridge_owner(&id, u, alias));
            }
        }
    }
    let bridges = per_node
        .into_iter()
        .map(|(node, owners)| BridgeRequest {
            taken: facts
                .ifaces
                .get(&node)
                .into_iter()
                .flatten()
                .filter_map(|i| i.strip_prefix("vmbr").and_then(|n| n.parse().ok()))
                .collect(),
            node,
            owners,
        })
        .collect();
    Draft {
        placement,
        vmids,
        bridges,
        bridge_range: cfg.deployment.bridge_range,
    }
}
