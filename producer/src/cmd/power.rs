//! `producer start|stop|shutdown ID [--student U]... [--vm NAME]... [--timeout S]`: one job
//! per selected VM under a new operation id, then progress until each is done or failed
//! (`--no-wait` returns once queued). Starts are capped per node
//! (`max_parallel_starts.per_node`); a shutdown the guest does not finish within the
//! timeout falls back to a hard stop.

use std::time::Duration;

use shared::config::{self, DEFAULT_STARTS_PER_NODE};
use shared::jobs::state::Store;

use crate::cli::{Global, OpArgs};
use crate::cmd::{context, progress};
use crate::exit::{Exit, Failure};
use crate::operation::{self, OpKind, OpReport, OpRequest, Selectors};
use crate::output::Out;

pub async fn run(g: &Global, kind: OpKind, a: &OpArgs, out: &mut Out) -> Result<Exit, Failure> {
    let id = context::resolve_id(g, &a.id, out)?;
    let store = context::store(g).await?;
    let req = OpRequest {
        kind,
        selectors: Selectors {
            students: a.student.clone(),
            vms: a.vm.clone(),
        },
        timeout_secs: a.timeout,
        starts_per_node: starts_per_node(g, &store, &id).await,
    };
    let report = operation::start(&store, &id, &req).await?;
    follow(&store, report, a.no_wait, g.json, out).await
}

/// The start cap of the deployment's cluster in connections.yml (the default without it).
pub async fn starts_per_node(g: &Global, store: &Store, id: &str) -> u32 {
    let cluster = match store.deployment(id).await {
        Ok(Some(r)) => r.cluster,
        _ => return DEFAULT_STARTS_PER_NODE,
    };
    config::load_connections(&g.data_paths().connections)
        .ok()
        .and_then(|c| c.clusters.get(&cluster).map(|c| c.starts_per_node))
        .unwrap_or(DEFAULT_STARTS_PER_NODE)
}

/// Prints what was queued, follows it unless `no_wait`, prints the per-VM outcome.
pub async fn follow(
    store: &Store,
    mut report: OpReport,
    no_wait: bool,
    json: bool,
    out: &mut Out,
) -> Result<Exit, Failure> {
    if no_wait {
        if json {
            out.json(&serde_json::to_value(&report).expect("serializes"));
        } else {
            out.line(format!(
                "{} {}: operation {} queued for {} VMs",
                report.action,
                report.id,
                report.op,
                report.vms.iter().filter(|v| v.job.is_some()).count()
            ));
        }
        return Ok(Exit::Ok);
    }
    let bar = progress::Progress::new(json, "VMs");
    let total = report.vms.len() as u64;
    operation::wait(store, &mut report, Duration::from_millis(500), |r| {
        if bar.is_shown() {
            let c = r.counts();
            let finished = ["done", "failed", "not-made"]
                .iter()
                .filter_map(|s| c.get(*s))
                .sum::<usize>() as u64;
            bar.update(finished, total, r.summary());
        } else if !json {
            eprintln!("{}", r.summary());
        }
    })
    .await?;
    bar.finish();
    print(&report, json, out);
    Ok(report.exit())
}

pub fn print(r: &OpReport, json: bool, out: &mut Out) {
    if json {
        out.json(&serde_json::to_value(r).expect("serializes"));
        return;
    }
    out.line(r.summary());
    out.line(format!(
        "{:<28} {:<14} {:>7} {:<6} {:<9} error",
        "VM", "student", "VMID", "node", "state"
    ));
    for v in &r.vms {
        out.line(format!(
            "{:<28} {:<14} {:>7} {:<6} {:<9} {}",
            v.name,
            v.user,
            v.vmid.map(|v| v.to_string()).unwrap_or_default(),
            v.node,
            v.state,
            v.error.as_deref().unwrap_or("")
        ));
    }
}
