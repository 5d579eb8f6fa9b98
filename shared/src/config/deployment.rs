//! `deployment_config.yml`: the machines and deployment-wide keys, converted into a
//! [`Deployment`] (every problem collected as a located issue), and the checks across files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::convert::{Ctx, hint};
use super::ids::{DnsLabel, NodeName, VMID_MAX, VMID_MIN, VmId};
use super::issue::Issue;
use super::model::{
    BridgeTarget, CloneMode, DEFAULT_BRIDGE_RANGE, DEFAULT_POOL_PATTERN, DEFAULT_ROLE, Deployment,
    DeviceType, Machine, Users, VmidPolicy,
};
use super::parse::{
    is_alias, is_bridge_name, is_iface_name, parse_clone, parse_deployment_name, parse_net,
    parse_range, parse_storage_id,
};
use super::raw::{RawBridgeTarget, RawDeployment, RawMachine};

pub fn deployment_from_raw(
    raw: RawDeployment,
    file: &Path,
    default_name: &str,
) -> Result<Deployment, Vec<Issue>> {
    let mut issues = Vec::new();
    let mut cx = Ctx {
        file,
        issues: &mut issues,
    };
    let name = match &raw.name {
        Some(n) => cx.check(n, Some("e.g. `name: netlab-2026`"), |s| {
            parse_deployment_name(s)
        }),
        None => Some(default_name.to_owned()),
    };
    let cluster = raw.cluster.as_ref().map(|c| c.value.clone());
    let default_clone = raw
        .clone
        .as_ref()
        .and_then(|c| {
            cx.check(c, Some("write `clone: linked` or `clone: full`"), |s| {
                parse_clone(s)
            })
        })
        .unwrap_or(CloneMode::Linked);
    let default_storage = raw
        .storage
        .as_ref()
        .and_then(|s| cx.check(s, None, |s| parse_storage_id(s)));
    let pool_pattern = pool_pattern_from_raw(&raw, &mut cx);
    let role = role_from_raw(&raw, &mut cx);
    let start = raw.start.as_ref().is_some_and(|s| s.value);
    let baseline = raw.baseline.as_ref().is_some_and(|s| s.value);
    let schedule = raw
        .schedule
        .as_ref()
        .and_then(|s| super::schedule::from_raw(s, cx.file, &mut *cx.issues));
    let bridge_range = match &raw.bridge_range {
        Some(r) => cx.check(r, Some("e.g. `bridge_range: vmbr1000-vmbr4999`"), |s| {
            let (a, b) = parse_range(s, "vmbr")?;
            if b > 9999 {
                return Err(format!("bridge range {s:?} goes past vmbr9999"));
            }
            Ok((a, b))
        }),
        None => Some(DEFAULT_BRIDGE_RANGE),
    };
    let bridges = bridges_from_raw(&raw, &mut cx);
    let vlan_base = raw.vlan_base.as_ref().and_then(|v| {
        cx.check(
            v,
            Some("tags are vlan_base + the student's index and must stay within 1-4094"),
            |n| {
                if (1..=4094).contains(n) {
                    Ok(*n as u16)
                } else {
                    Err(format!("vlan_base {n} is out of range 1-4094"))
                }
            },
        )
    });
    if vlan_base.is_some() && bridges.is_empty() {
        let v = raw.vlan_base.as_ref().expect("checked");
        let i = cx.at(v, "vlan_base has no effect without a `bridges:` map");
        hint(
            i,
            "map an alias to a shared trunk bridge, e.g. `bridges: {lan: vmbr1}`",
        );
    }
    let vmids = vmids_from_raw(&raw, &mut cx);
    let machines = machines_from_raw(&raw, &mut cx, &bridges, default_clone, &default_storage);
    if let (Some(VmidPolicy::Fixed { stride, .. }), Some(s)) = (&vmids, &raw.vmid_stride)
        && (*stride as usize) < machines.len()
    {
        let i = cx.at(s, format!("vmid_stride {stride} is smaller than the {} machines each student gets: VMIDs would overlap", machines.len()));
        hint(i, format!("use vmid_stride: {} or more", machines.len()));
    }

    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(Deployment {
        name: name.expect("no issues"),
        cluster,
        pool_pattern: pool_pattern.expect("no issues"),
        role: role.expect("no issues"),
        start,
        baseline,
        schedule,
        bridge_range: bridge_range.expect("no issues"),
        vmids: vmids.expect("no issues"),
        vlan_base,
        machines,
    })
}

/// `pool`: a pattern with `{user}` that gives a valid pool id.
fn pool_pattern_from_raw(raw: &RawDeployment, cx: &mut Ctx<'_>) -> Option<String> {
    match &raw.pool {
        Some(p) => cx.check(p, Some("e.g. `pool: \"{deployment}-{user}\"`; placeholders {deployment} and {user}"), |s| {
            if !s.contains("{user}") {
                return Err(format!("pool pattern {s:?} lacks {{user}}: every student needs a pool of their own"));
            }
            let sample = s.replace("{deployment}", "d").replace("{user}", "u");
            if !sample.starts_with(|c: char| c.is_ascii_alphabetic())
                || !sample.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(format!("pool pattern {s:?} does not give a valid pool id (letter first, then letters, digits, '-', '_', '.')"));
            }
            Ok(s.clone())
        }),
        None => Some(DEFAULT_POOL_PATTERN.to_owned()),
    }
}

/// `role`: a Proxmox role id.
fn role_from_raw(raw: &RawDeployment, cx: &mut Ctx<'_>) -> Option<String> {
    match &raw.role {
        Some(r) => cx.check(
            r,
            Some("a Proxmox role id such as PVEVMUser or PVEVMAdmin"),
            |s| {
                if !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    Ok(s.clone())
                } else {
                    Err(format!("role {s:?} is not a valid role id"))
                }
            },
        ),
        None => Some(DEFAULT_ROLE.to_owned()),
    }
}

/// `bridges`: aliases mapped to a shared bridge, everywhere or per node.
fn bridges_from_raw(raw: &RawDeployment, cx: &mut Ctx<'_>) -> BTreeMap<String, BridgeTarget> {
    let mut bridges = BTreeMap::new();
    for (alias, target) in raw.bridges.iter().flatten() {
        if !is_alias(alias) || is_bridge_name(alias) {
            let i = cx.at(
                target,
                format!(
                    "`bridges` key {alias:?} is not a network alias (a name like hq, not vmbrN)"
                ),
            );
            hint(
                i,
                "map aliases used in `networks`, e.g. `bridges: {hq: vmbr1}`",
            );
            continue;
        }
        let t = match &target.value {
            RawBridgeTarget::Everywhere(b) => {
                if !is_iface_name(b) {
                    cx.at(
                        target,
                        format!("bridge {b:?} is not a valid interface name"),
                    );
                    continue;
                }
                BridgeTarget::Everywhere(b.clone())
            }
            RawBridgeTarget::PerNode(m) => {
                let mut out = BTreeMap::new();
                for (node, b) in m {
                    match NodeName::parse(node) {
                        Ok(n) if is_iface_name(b) => {
                            out.insert(n, b.clone());
                        }
                        Ok(_) => {
                            cx.at(
                                target,
                                format!("bridge {b:?} is not a valid interface name"),
                            );
                        }
                        Err(e) => {
                            cx.at(target, e);
                        }
                    }
                }
                BridgeTarget::PerNode(out)
            }
        };
        bridges.insert(alias.clone(), t);
    }
    bridges
}

/// `vmid_range`, or `vmid_base` with `vmid_stride` (exclusive), or the whole VMID space.
fn vmids_from_raw(raw: &RawDeployment, cx: &mut Ctx<'_>) -> Option<VmidPolicy> {
    match (&raw.vmid_range, &raw.vmid_base, &raw.vmid_stride) {
        (Some(r), None, None) => cx.check(r, Some("e.g. `vmid_range: 10000-19999`"), |s| {
            let (a, b) = parse_range(s, "")?;
            if a < VMID_MIN || b > VMID_MAX {
                return Err(format!("vmid range {s:?} leaves {VMID_MIN}-{VMID_MAX}"));
            }
            Ok(VmidPolicy::Range { min: a, max: b })
        }),
        (None, Some(base), stride) => {
            let base_v = cx.check(base, None, |n| VmId::new(*n).map(|v| v.get()));
            let stride_v = match stride {
                Some(s) if s.value == 0 => {
                    cx.at(s, "vmid_stride must be at least 1");
                    None
                }
                Some(s) => Some(s.value),
                None => Some(raw.machines.value.len().max(1) as u32),
            };
            match (base_v, stride_v) {
                (Some(base), Some(stride)) => Some(VmidPolicy::Fixed { base, stride }),
                _ => None,
            }
        }
        (None, None, Some(s)) => {
            let i = cx.at(s, "vmid_stride needs vmid_base");
            hint(
                i,
                "add `vmid_base: 10000`, or remove vmid_stride to let labfleet allocate VMIDs",
            );
            None
        }
        (Some(r), _, _) => {
            let i = cx.at(r, "vmid_range and vmid_base/vmid_stride exclude each other");
            hint(
                i,
                "keep vmid_range (allocated VMIDs) or vmid_base + vmid_stride (predictable VMIDs)",
            );
            None
        }
        (None, None, None) => Some(VmidPolicy::Range {
            min: VMID_MIN,
            max: VMID_MAX,
        }),
    }
}

/// `machines`: at least one, each valid, names unique.
fn machines_from_raw(
    raw: &RawDeployment,
    cx: &mut Ctx<'_>,
    bridges: &BTreeMap<String, BridgeTarget>,
    default_clone: CloneMode,
    default_storage: &Option<String>,
) -> Vec<Machine> {
    if raw.machines.value.is_empty() {
        let i = cx.at(
            &raw.machines,
            "`machines` is empty: a deployment needs at least one machine",
        );
        hint(i, "see data/README.md for a machine entry");
    }
    let mut machines = Vec::new();
    let mut names: BTreeMap<String, u64> = BTreeMap::new();
    for m in &raw.machines.value {
        if let Some(machine) = machine_from_raw(m, cx, bridges, default_clone, default_storage) {
            if let Some(line) = names.get(machine.name.as_str()) {
                let i = cx.at(
                    &m.name,
                    format!(
                        "machine name {:?} is used twice (first on line {line})",
                        machine.name.as_str()
                    ),
                );
                hint(
                    i,
                    "each machine needs its own name: VM names are <machine>-<user>",
                );
                continue;
            }
            names.insert(machine.name.to_string(), m.name.referenced.line());
            machines.push(machine);
        }
    }
    machines
}

fn machine_from_raw(
    m: &RawMachine,
    cx: &mut Ctx<'_>,
    bridges: &BTreeMap<String, BridgeTarget>,
    default_clone: CloneMode,
    default_storage: &Option<String>,
) -> Option<Machine> {
    let name = cx.check(
        &m.name,
        Some("machine names are lowercase DNS labels: a-z, 0-9 and inner '-' (e.g. student-pc)"),
        |s| DnsLabel::parse(s),
    );
    let device_type = cx.check(
        &m.device_type,
        Some("linux: virtio NICs; windows: e1000 NICs; router: virtio NICs, firewall off"),
        |s| DeviceType::parse(s),
    );
    let template_node = cx.check(&m.template_node, None, |s| NodeName::parse(s));
    let template_vmid = cx.check(
        &m.template_vmid,
        Some("the template's VMID, 100-999999"),
        |n| VmId::new(*n),
    );
    let clone = match &m.clone {
        Some(c) => cx.check(c, Some("write `clone: linked` or `clone: full`"), |s| {
            parse_clone(s)
        }),
        None => Some(default_clone),
    };
    let storage = match &m.storage {
        Some(s) => cx.check(s, None, |s| parse_storage_id(s)).map(Some),
        None => Some(default_storage.clone()),
    };
    let mut replicas = BTreeMap::new();
    for (node, vmid) in m.replicas.iter().flatten() {
        let n = match NodeName::parse(node) {
            Ok(n) => n,
            Err(e) => {
                cx.at(vmid, e);
                continue;
            }
        };
        if let Some(v) = cx.check(vmid, None, |v| VmId::new(*v)) {
            if template_node.as_ref() == Some(&n) {
                let i = cx.at(vmid, format!("replica on {n} is the template's own node"));
                hint(i, "list only copies on other nodes under `replicas`");
                continue;
            }
            replicas.insert(n, v);
        }
    }
    let mut networks = Vec::new();
    if m.networks.len() > 32 {
        let i = cx.at(
            &m.name,
            format!(
                "machine has {} networks; Proxmox allows net0-net31",
                m.networks.len()
            ),
        );
        hint(i, "use at most 32 networks");
    }
    for n in &m.networks {
        if let Some(spec) = cx.check(&n.bridge, Some("vmbrN or vmbrN.VLAN for an existing bridge, **name** for an existing bridge of another name, alias or alias.VLAN (e.g. hq.100) for a private network"), |s| parse_net(s, bridges)) {
            networks.push(spec);
        }
    }
    if clone == Some(CloneMode::Linked)
        && let (Some(s), Some(st)) = (&m.storage, storage.as_ref().and_then(|s| s.as_ref()))
    {
        let i = cx.at(s, format!("storage {st:?} is set for a linked clone; Proxmox refuses `storage` for linked clones"));
        hint(i, "add `clone: full` to this machine, or remove `storage`");
    }
    Some(Machine {
        name: name?,
        device_type: device_type?,
        template_node: template_node?,
        template_vmid: template_vmid?,
        replicas,
        networks,
        clone: clone?,
        storage: storage?,
    })
}

/// Cross-file checks: names, counts, the cluster. `users_file` and `deployment_file` place
/// the issues.
pub fn cross_check(
    deployment: &Deployment,
    users: &Users,
    deployment_file: &Path,
    users_file: &Path,
) -> Vec<Issue> {
    let mut issues = Vec::new();
    let n_users = users.users.len();
    let total = deployment.vm_count(n_users);
    let mut vm_names: BTreeSet<String> = BTreeSet::new();
    let mut seen_pools: BTreeSet<String> = BTreeSet::new();
    for u in &users.users {
        let pool = deployment.pool_name(u);
        if pool.len() > 64 {
            issues.push(
                Issue::new(
                    users_file,
                    1,
                    1,
                    format!("pool name {pool:?} for {u} is longer than 64 characters"),
                )
                .with_hint("shorten the deployment name or the pool pattern"),
            );
        }
        if !seen_pools.insert(pool.clone()) {
            issues.push(
                Issue::new(
                    users_file,
                    1,
                    1,
                    format!("two students would share the pool {pool:?}"),
                )
                .with_hint("the pool pattern must contain {user}"),
            );
        }
        for m in &deployment.machines {
            let name = deployment.vm_name(m, u);
            if name.len() > 63 {
                issues.push(
                    Issue::new(
                        users_file,
                        1,
                        1,
                        format!(
                            "VM name {name:?} ({m} for {u}) is longer than 63 characters",
                            m = m.name
                        ),
                    )
                    .with_hint("shorten the machine name or the user name"),
                );
            }
            if !vm_names.insert(name.clone()) {
                issues.push(
                    Issue::new(deployment_file, 1, 1, format!("two VMs would be named {name:?}"))
                        .with_hint("a machine name followed by '-' and a user part collides with another machine's VM; rename the machine"),
                );
            }
        }
    }
    match deployment.vmids {
        VmidPolicy::Range { min, max } => {
            let room = (max - min + 1) as usize;
            if total > room {
                issues.push(
                    Issue::new(
                        deployment_file,
                        1,
                        1,
                        format!(
                            "{total} VMs do not fit in the VMID range {min}-{max} ({room} ids)"
                        ),
                    )
                    .with_hint("widen vmid_range"),
                );
            }
        }
        VmidPolicy::Fixed { base, stride } => {
            if n_users > 0 && !deployment.machines.is_empty() {
                let last = base as u64
                    + (n_users as u64 - 1) * stride as u64
                    + deployment.machines.len() as u64
                    - 1;
                if last > VMID_MAX as u64 {
                    issues.push(
                        Issue::new(
                            deployment_file,
                            1,
                            1,
                            format!("the last VMID would be {last}, past {VMID_MAX}"),
                        )
                        .with_hint("lower vmid_base or vmid_stride"),
                    );
                }
            }
        }
    }
    if let Some(base) = deployment.vlan_base
        && base as usize + n_users.saturating_sub(1) > 4094
    {
        issues.push(
            Issue::new(
                deployment_file,
                1,
                1,
                format!("vlan_base {base} + {n_users} students goes past VLAN 4094"),
            )
            .with_hint("lower vlan_base"),
        );
    }
    issues
}
