//! `producer plan`: placement, VMIDs and bridges, before anything happens. Reads the
//! cluster and Redis, writes nothing.

use crate::cli::Global;
use crate::cmd::context;
use crate::deploy;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(g: &Global, out: &mut Out) -> Result<Exit, Failure> {
    let cfg = context::load_config(g, out)?;
    let key = context::secret_key()?;
    let store = context::store(g).await?;
    let pve = deploy::connect_pve(&cfg, key.as_ref())?;
    let mut facts = deploy::gather_facts(&pve, &cfg)
        .await
        .map_err(|e| deploy::DeployError::proxmox("reading the cluster", e))?;
    let plan = deploy::make_plan(&cfg, &mut facts, &store, deploy::AllocMode::Preview).await?;
    if g.json {
        out.json(&serde_json::to_value(&plan).expect("serializes"));
        return Ok(Exit::Ok);
    }
    out.line(format!(
        "deployment {} on {}: {} students, {} VMs",
        plan.id,
        plan.cluster,
        plan.students.len(),
        plan.vms.len()
    ));
    if let Some(cap) = &plan.capacity {
        capacity_table(cap, out);
    }
    for t in &facts.templates {
        out.line(format!(
            "  template {} on {} ({}): {}",
            t.vmid,
            t.node,
            t.name.as_deref().unwrap_or("?"),
            if t.shared {
                "shared storage"
            } else {
                "local storage"
            }
        ));
    }
    out.line(format!(
        "{:<28} {:<14} {:>7} {:<6} {:<10} networks",
        "VM", "student", "VMID", "node", "source"
    ));
    for v in &plan.vms {
        let nets: Vec<String> = v
            .nics
            .iter()
            .map(|n| match n.tag {
                Some(t) => format!("{}.{t}", n.bridge),
                None => n.bridge.clone(),
            })
            .collect();
        out.line(format!(
            "{:<28} {:<14} {:>7} {:<6} {:<10} {}",
            v.name,
            v.user,
            v.vmid,
            v.node,
            format!("{}/{}", v.source.node, v.source.vmid),
            nets.join(" ")
        ));
    }
    for w in &plan.warnings {
        out.err_line(format!("warning: {w}"));
    }
    out.line("(VMIDs and bridge names are a preview; `submit` reserves them)");
    Ok(Exit::Ok)
}

fn gib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 30) as f64)
}

/// Per node: students and VMs placed, memory committed (VMs on it + other deployments'
/// planned + this plan) against the limit; per storage, full clones' disks against free.
fn capacity_table(cap: &shared::capacity::Capacity, out: &mut Out) {
    out.line(format!(
        "  {:<10} {:>8} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "node", "students", "VMs", "on node", "others", "this plan", "committed", "memory", "limit"
    ));
    for n in &cap.nodes {
        out.line(format!(
            "  {:<10} {:>8} {:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}{}",
            n.node,
            n.students,
            n.vms,
            gib(n.existing_mem),
            gib(n.elsewhere_mem),
            gib(n.adds_mem),
            gib(n.committed()),
            gib(n.total_mem),
            gib(n.limit_mem),
            match (n.over, n.online) {
                (true, _) => "  OVER (submit refuses)",
                (false, false) => "  offline",
                _ => "",
            }
        ));
    }
    out.line(format!(
        "  (GiB; limit = memory x memory_overcommit {})",
        cap.memory_overcommit
    ));
    for s in &cap.storages {
        out.line(format!(
            "  {}: {} GiB for full clones, {} GiB free of {}{}",
            s.place(),
            gib(s.adds),
            gib(s.free),
            gib(s.total),
            if s.over {
                "  FULL (submit refuses)"
            } else {
                ""
            }
        ));
    }
}
