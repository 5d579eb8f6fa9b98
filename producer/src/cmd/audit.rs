//! `producer audit [--fix]`: what labfleet left on a cluster and who owns it
//! (`shared::audit::scan`); with `--fix`, one `audit-remove` job per object nobody owns
//! (ACLs, VMs and volumes first, then pools and bridges, then users), waited for, and the
//! cluster audited again to report what is gone. Exit 8 when unowned objects remain.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use shared::audit::{self, Debris, Found, Owner, Report};
use shared::clusters::client_config;
use shared::config::{self, Connection};
use shared::jobs::Job;
use shared::jobs::audit::AuditRemoveJob;
use shared::jobs::state::Store;
use shared::pve::PveClient;
use shared::queue::JobSpec;

use crate::cli::Global;
use crate::cmd::{context, validate};
use crate::deploy;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(g: &Global, fix: bool, timeout: u64, out: &mut Out) -> Result<Exit, Failure> {
    let conn = connection(g, out)?;
    let key = context::secret_key()?;
    let store = context::store(g).await?;
    let cc =
        client_config(&conn, key.as_ref()).map_err(|e| Failure::new(Exit::InvalidConfig, e))?;
    let pve =
        PveClient::new(cc).map_err(|e| deploy::DeployError::proxmox("connecting to Proxmox", e))?;
    let before = scan(&pve, &store, &conn.name).await?;
    if !fix {
        print(&before, None, g.json, out);
        return Ok(exit_for(&before));
    }
    let unowned: Vec<&Found> = before.unowned().collect();
    if !unowned.is_empty() {
        let group = enqueue(&store, &conn.name, &unowned).await?;
        wait(&store, &group, Duration::from_secs(timeout)).await?;
    }
    let after = scan(&pve, &store, &conn.name).await?;
    let removed: Vec<Debris> = unowned
        .iter()
        .filter(|f| !after.found.iter().any(|a| a.object == f.object))
        .map(|f| f.object.clone())
        .collect();
    print(&after, Some(&removed), g.json, out);
    Ok(exit_for(&after))
}

fn exit_for(r: &Report) -> Exit {
    if r.unowned().next().is_some() {
        Exit::AuditUnowned
    } else {
        Exit::Ok
    }
}

/// The cluster to audit: `--cluster`, or the only one in connections.yml.
fn connection(g: &Global, out: &mut Out) -> Result<Connection, Failure> {
    let path = g.data_paths().connections;
    let conns = config::load_connections(&path).map_err(|e| {
        validate::report(&e, g.json, out);
        Failure::new(
            Exit::InvalidConfig,
            anyhow::anyhow!("the configuration is invalid (see above)"),
        )
    })?;
    let names: Vec<&String> = conns.clusters.keys().collect();
    let name = match (&g.cluster, names.as_slice()) {
        (Some(c), _) => c.clone(),
        (None, [one]) => (*one).clone(),
        (None, _) => {
            return Err(Failure::new(
                Exit::Usage,
                anyhow::anyhow!(
                    "{} names several clusters ({}); choose one with --cluster",
                    path.display(),
                    names
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    };
    conns.clusters.get(&name).cloned().ok_or_else(|| {
        Failure::new(
            Exit::Usage,
            anyhow::anyhow!("cluster {name:?} is not in {}", path.display()),
        )
    })
}

async fn scan(pve: &PveClient, store: &Store, cluster: &str) -> Result<Report, Failure> {
    audit::scan(pve, store, cluster).await.map_err(|e| match e {
        audit::AuditError::Pve(p) => deploy::DeployError::proxmox("auditing the cluster", p).into(),
        other => Failure::new(Exit::RedisUnreachable, other),
    })
}

/// Stage of an object's removal: what holds others goes last (a pool holds VMs, a user
/// holds ACLs; a bridge is removed once the VMs on it are gone).
fn stage(d: &Debris) -> usize {
    match d {
        Debris::Acl { .. } | Debris::Vm { .. } | Debris::Volume { .. } => 0,
        Debris::Pool { .. } | Debris::Bridge { .. } => 1,
        Debris::User { .. } => 2,
    }
}

async fn enqueue(store: &Store, cluster: &str, found: &[&Found]) -> Result<String, Failure> {
    let round = Utc::now().timestamp_millis();
    let group = format!("audit@{cluster}#{round}");
    let mut keys: [Vec<String>; 3] = Default::default();
    let mut specs = Vec::new();
    for s in 0..3 {
        for (i, f) in found
            .iter()
            .enumerate()
            .filter(|(_, f)| stage(&f.object) == s)
        {
            let key = format!("{group}/{}/{i}", f.object.kind());
            let job = Job::AuditRemove(AuditRemoveJob {
                cluster: cluster.to_owned(),
                audit: group.clone(),
                object: f.object.clone(),
            });
            let gate: Vec<String> = keys[..s].iter().flatten().cloned().collect();
            specs.push(
                JobSpec::new(key.clone(), job.kind(), job.to_value())
                    .group(group.clone())
                    .after(gate),
            );
            keys[s].push(key);
        }
    }
    store
        .queue()
        .enqueue_batch(&specs)
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
    Ok(group)
}

/// Waits until every job of the round is done or dead (or `timeout`), then forgets them.
async fn wait(store: &Store, group: &str, timeout: Duration) -> Result<(), Failure> {
    let q = store.queue();
    let end = Instant::now() + timeout;
    loop {
        let st = q
            .group_stats(group)
            .await
            .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
        let open = st.ready + st.scheduled + st.gated + st.waiting_for_slot + st.in_flight;
        if open == 0 {
            break;
        }
        if Instant::now() >= end {
            tracing::warn!(
                group,
                open,
                "audit removals still queued; is a worker running?"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = q.purge_group(group).await;
    Ok(())
}

fn owner_text(o: &Owner) -> String {
    match o {
        Owner::Deployment { id } => id.clone(),
        Owner::ExistingVm { vmid } => format!("(volume of existing VM {vmid})"),
        Owner::NotOurs => "(not labfleet's)".into(),
        Owner::Nobody => "NOBODY".into(),
    }
}

fn print(r: &Report, removed: Option<&[Debris]>, json: bool, out: &mut Out) {
    let unowned = r.unowned().count();
    if json {
        out.json(&json!({
            "cluster": r.cluster,
            "found": r.found,
            "unowned": unowned,
            "removed": removed,
            "quarantined": r.quarantined,
            "tombstones": r.tombstones,
        }));
        return;
    }
    out.line(format!("{:<48} {:<24} owner", "object", "named deployment"));
    for f in &r.found {
        out.line(format!(
            "{:<48} {:<24} {}",
            f.object.describe(),
            f.object.deployment().unwrap_or("-"),
            owner_text(&f.owner)
        ));
    }
    for q in &r.quarantined {
        out.line(format!(
            "quarantined VMID {} on {} ({} {}): {}",
            q.vmid, q.node, q.deployment, q.vm, q.reason
        ));
    }
    out.line(format!(
        "{} tombstones kept (which deployment last used a VMID)",
        r.tombstones
    ));
    if let Some(removed) = removed {
        out.line(format!("removed {}:", removed.len()));
        for d in removed {
            out.line(format!("  {}", d.describe()));
        }
    }
    if unowned > 0 {
        out.err_line(format!(
            "{unowned} objects no deployment owns{}",
            if removed.is_some() {
                " are still there (see the workers' logs and `producer workers`)"
            } else {
                "; `producer audit --fix` removes them"
            }
        ));
    } else {
        out.line("nothing unowned");
    }
}
