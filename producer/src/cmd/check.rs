//! `producer check-connection`: log in, print the version, the nodes with their load and the
//! templates found, with the exit code of each way it can fail.

use shared::pve::{ClusterResource, PveError};

use crate::cli::Global;
use crate::cmd::context;
use crate::deploy;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(g: &Global, out: &mut Out) -> Result<Exit, Failure> {
    let cfg = context::load_config(g, out)?;
    let key = context::secret_key()?;
    let pve = deploy::connect_pve(&cfg, key.as_ref())?;
    let fail = |e: PveError| {
        let hint = match &e {
            PveError::Tls { .. } => {
                "\nhint: pin the fingerprint shown above with `fingerprint:` in connections.yml if it is your node's"
            }
            PveError::Auth { .. } => "\nhint: check the user, password or token in connections.yml",
            PveError::Permission { .. } => {
                "\nhint: the account needs the privileges listed in the README (Sys.Audit on /, VM.* on /vms, ...)"
            }
            _ => "",
        };
        let exit = if matches!(e, PveError::Auth { .. } | PveError::Permission { .. }) {
            Exit::AuthRefused
        } else {
            Exit::ProxmoxUnreachable
        };
        Failure::new(
            exit,
            anyhow::anyhow!(
                "{} ({}): {e}{hint}",
                cfg.cluster,
                cfg.connection().host.authority()
            ),
        )
    };
    let version = pve.version().await.map_err(fail)?;
    // Reading the cluster's state needs Sys.Audit on `/`; without it labfleet cannot place
    // students or find templates, so say so now rather than at submit.
    pve.raw_call(shared::pve::Method::GET, "/cluster/status", &[])
        .await
        .map_err(fail)?;
    let resources = pve.cluster_resources(None).await.map_err(fail)?;
    let mut nodes = Vec::new();
    let mut templates = Vec::new();
    for r in resources {
        match r {
            ClusterResource::Node(n) => nodes.push(n),
            ClusterResource::Vm(v) if v.template => templates.push(v),
            _ => {}
        }
    }
    if g.json {
        out.json(&serde_json::json!({
            "cluster": cfg.cluster,
            "version": version.version,
            "nodes": nodes.iter().map(|n| serde_json::json!({"node": n.node, "status": n.status, "cpu": n.cpu, "mem": n.mem, "maxmem": n.maxmem})).collect::<Vec<_>>(),
            "templates": templates.iter().map(|t| serde_json::json!({"vmid": t.vmid, "node": t.node, "name": t.name})).collect::<Vec<_>>(),
        }));
        return Ok(Exit::Ok);
    }
    out.line(format!(
        "connected to {} ({}): Proxmox VE {}",
        cfg.cluster,
        cfg.connection().host.authority(),
        version.version.as_deref().unwrap_or("?")
    ));
    for n in &nodes {
        let mem = match (n.mem, n.maxmem) {
            (Some(m), Some(x)) if x > 0 => format!("{} / {} GiB", m >> 30, x >> 30),
            _ => "?".into(),
        };
        out.line(format!(
            "  node {:<10} {:<8} cpu {:>5.1}%  mem {mem}",
            n.node,
            n.status,
            n.cpu.unwrap_or(0.0) * 100.0
        ));
    }
    for t in &templates {
        out.line(format!(
            "  template {:>6} on {:<8} {}",
            t.vmid,
            t.node,
            t.name.as_deref().unwrap_or("")
        ));
    }
    Ok(Exit::Ok)
}
