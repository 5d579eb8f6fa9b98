//! The cluster facts a plan is made from, read in a handful of requests whatever the size.

use std::collections::{BTreeMap, BTreeSet};

use shared::capacity;
use shared::config::Config;
use shared::placement::NodeCapacity;
use shared::plan::{Facts, Template};
use shared::pve::{ClusterResource, PveClient, PveError};

fn disk_storages(cfg: &shared::pve::VmConfig) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in &cfg.raw {
        if !capacity::is_disk_key(k) {
            continue;
        }
        if let Some(s) = v.as_str() {
            if s.contains("media=cdrom") {
                continue;
            }
            if let Some((st, _)) = s.split_once(':')
                && !out.iter().any(|o| o == st)
            {
                out.push(st.to_owned());
            }
        }
    }
    out
}

/// Reads what planning needs from the cluster: nodes, templates (with their storages),
/// used VMIDs, users, and each node's interfaces. A handful of requests, whatever the size.
pub async fn gather_facts(pve: &PveClient, cfg: &Config) -> Result<Facts, PveError> {
    let resources = pve.cluster_resources(None).await?;
    let mut nodes = Vec::new();
    let mut shared_storage: BTreeMap<String, bool> = BTreeMap::new();
    let mut vms = Vec::new();
    let mut storages = Vec::new();
    for r in resources {
        match r {
            ClusterResource::Node(n) => nodes.push(NodeCapacity {
                online: n.status == "online",
                maxmem: n.maxmem.unwrap_or(0),
                mem: n.mem.unwrap_or(0),
                committed: 0,
                cpu: n.cpu.unwrap_or(0.0),
                maxcpu: n.maxcpu.unwrap_or(0) as u32,
                planned_elsewhere: 0,
                name: n.node,
            }),
            ClusterResource::Storage(s) => {
                shared_storage.insert(s.storage.clone(), s.shared);
                storages.push(capacity::StorageFree::from(&s));
            }
            ClusterResource::Vm(v) => vms.push(v),
            _ => {}
        }
    }
    let mut templates = Vec::new();
    // Template configs: only templates whose name matches one the deployment uses, plus
    // the named template VMIDs themselves (a few requests).
    let wanted_ids: BTreeSet<(String, u32)> = cfg
        .deployment
        .machines
        .iter()
        .flat_map(|m| {
            std::iter::once((m.template_node.to_string(), m.template_vmid.get()))
                .chain(m.replicas.iter().map(|(n, v)| (n.to_string(), v.get())))
        })
        .collect();
    let wanted_names: BTreeSet<String> = vms
        .iter()
        .filter(|v| wanted_ids.contains(&(v.node.clone(), v.vmid)))
        .filter_map(|v| v.name.clone())
        .collect();
    for v in vms.iter().filter(|v| v.template) {
        let relevant = wanted_ids.contains(&(v.node.clone(), v.vmid))
            || v.name.as_ref().is_some_and(|n| wanted_names.contains(n));
        if !relevant {
            continue;
        }
        let c = pve.vm_config(&v.node, v.vmid).await?;
        let storages = disk_storages(&c);
        let shared = !storages.is_empty()
            && storages
                .iter()
                .all(|s| shared_storage.get(s).copied().unwrap_or(false));
        templates.push(Template {
            vmid: v.vmid,
            node: v.node.clone(),
            name: c.name().or(v.name.clone()),
            storages,
            shared,
            maxmem: c.memory_mib().map(|m| m << 20).or(v.maxmem).unwrap_or(0),
            disk: capacity::disk_bytes(&c.raw),
        });
    }
    let users = pve.users().await?.into_iter().map(|u| u.userid).collect();
    let mut ifaces = BTreeMap::new();
    for n in nodes.iter().filter(|n| n.online) {
        let list = pve.network_list(&n.name, None).await?;
        ifaces.insert(
            n.name.clone(),
            list.ifaces.into_iter().map(|i| i.iface).collect(),
        );
    }
    let committed = capacity::committed_by_node(&vms);
    for n in &mut nodes {
        n.committed = committed.get(&n.name).copied().unwrap_or(0);
    }
    Ok(Facts {
        nodes,
        templates,
        vmids_in_use: vms.iter().map(|v| v.vmid).collect(),
        users,
        ifaces,
        vm_nodes: vms.iter().map(|v| (v.vmid, v.node.clone())).collect(),
        storages,
    })
}
