//! `producer status [ID] [--watch] [--vms]`: counts by state, per node, failures with their
//! Proxmox message, quarantined VMIDs; every VM when there are few (or with `--vms`).
//!
//! Polling reads the workers' counters ([`deploy::summary`]), whose cost does not grow with
//! the class; the per-VM table ([`deploy::status`]) reads every step record and is shown
//! for classes of at most [`TABLE_MAX_VMS`] VMs, or on request.

use std::time::Duration;

use crate::cli::Global;
use crate::cmd::{common, progress};
use crate::deploy::{self, Listing, Status};
use crate::exit::{Exit, Failure};
use crate::output::Out;
use shared::jobs::state::Store;

/// Up to this many VMs, reports list every VM; above, only the failed ones (a table is for
/// reading, and building it reads every step record).
pub const TABLE_MAX_VMS: usize = 100;

pub async fn run(
    g: &Global,
    id: &Option<String>,
    watch_: bool,
    all_vms: bool,
    out: &mut Out,
) -> Result<Exit, Failure> {
    let id = common::resolve_id(g, id, out)?;
    let store = common::store(g).await?;
    if watch_ {
        return watch(&store, &id, g.json, out, Duration::from_secs(1)).await;
    }
    let st = report(&store, &id, all_vms).await?;
    print(&st, g.json, out);
    Ok(exit_for(&st))
}

/// The status to show a person: the counters, and the per-VM table when the class is small
/// or `all_vms` asks for it.
pub async fn report(store: &Store, id: &str, all_vms: bool) -> Result<Status, Failure> {
    let st = deploy::summary(store, id).await?;
    with_table(store, id, st, all_vms).await
}

/// A counter-based status `st`, replaced by the per-VM one when the class is small or
/// `all_vms` asks for it.
pub async fn with_table(
    store: &Store,
    id: &str,
    st: Status,
    all_vms: bool,
) -> Result<Status, Failure> {
    if st.listing == Listing::All || (!all_vms && st.total > TABLE_MAX_VMS) {
        return Ok(st);
    }
    deploy::status(store, id).await
}

pub fn exit_for(st: &Status) -> Exit {
    if st.state == "failed" {
        Exit::DeploymentFailed
    } else {
        Exit::Ok
    }
}

/// Polls until the deployment is done or failed, showing progress, then prints the report
/// (the status document with `--json`).
pub async fn watch(
    store: &Store,
    id: &str,
    json: bool,
    out: &mut Out,
    every: Duration,
) -> Result<Exit, Failure> {
    let st = wait_until_finished(store, id, json, out, every).await?;
    let st = with_table(store, id, st, false).await?;
    if json {
        print(&st, json, out);
    } else {
        // The summary line was just shown (or the bar held it); print the rest of the report.
        if progress::shown(json) {
            out.line(summary(&st));
        }
        print_details(&st, out);
    }
    Ok(exit_for(&st))
}

/// How long a watch goes on polling while Redis does not answer (a restart, a Sentinel
/// failover) before it gives up with exit code 3.
const REDIS_OUTAGE_TOLERATED: Duration = Duration::from_secs(60);

/// Polls until the deployment is done, failed or torn down and returns its last status.
/// Progress: a bar on a terminal; otherwise (not with `--json`) a line on stderr whenever
/// the counts change. Redis errors are ridden out for `REDIS_OUTAGE_TOLERATED`: the workers
/// carry on meanwhile, so the watch does too.
pub async fn wait_until_finished(
    store: &Store,
    id: &str,
    json: bool,
    out: &mut Out,
    every: Duration,
) -> Result<Status, Failure> {
    let bar = progress::Progress::new(json, "VMs");
    let mut last = String::new();
    let mut outage_since: Option<tokio::time::Instant> = None;
    loop {
        let st = match deploy::summary(store, id).await {
            Ok(st) => {
                outage_since = None;
                st
            }
            Err(f) if matches!(f.exit, Exit::RedisUnreachable) => {
                let since = *outage_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= REDIS_OUTAGE_TOLERATED {
                    return Err(f);
                }
                tracing::warn!(error = %format!("{:#}", f.error), "Redis did not answer; still watching");
                tokio::time::sleep(every.min(Duration::from_millis(500))).await;
                continue;
            }
            Err(f) => return Err(f),
        };
        let line = summary(&st);
        if bar.is_shown() {
            let finished: usize = ["done", "failed", "removed"]
                .iter()
                .filter_map(|s| st.counts.get(*s))
                .sum();
            bar.update(finished as u64, st.total as u64, counts(&st));
        } else if !json && line != last {
            out.err_line(&line);
            last = line;
        }
        if matches!(st.state.as_str(), "done" | "failed" | "torn-down") {
            bar.finish();
            return Ok(st);
        }
        tokio::time::sleep(every).await;
    }
}

fn counts(st: &Status) -> String {
    let c: Vec<String> = st.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!("[{}] {}", st.state, c.join(", "))
}

pub fn summary(st: &Status) -> String {
    let counts: Vec<String> = st.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!("{} [{}]: {}", st.id, st.state, counts.join(", "))
}

pub fn print(st: &Status, json: bool, out: &mut Out) {
    if json {
        out.json(&serde_json::to_value(st).expect("serializes"));
        return;
    }
    out.line(summary(st));
    print_details(st, out);
}

fn print_details(st: &Status, out: &mut Out) {
    for (node, c) in &st.per_node {
        let c: Vec<String> = c.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out.line(format!("  {node}: {}", c.join(", ")));
    }
    out.line(format!(
        "{:<28} {:<14} {:>7} {:<6} {:<12} error",
        "VM", "student", "VMID", "node", "state"
    ));
    for v in &st.vms {
        out.line(format!(
            "{:<28} {:<14} {:>7} {:<6} {:<12} {}",
            v.name,
            v.user,
            v.vmid.map(|v| v.to_string()).unwrap_or_default(),
            v.node,
            v.state,
            v.error.as_deref().unwrap_or("")
        ));
    }
    if st.listing == Listing::Failed {
        out.line(format!(
            "({} VMs: the table lists the failed ones; `producer status {} --vms` lists all)",
            st.total, st.id
        ));
    }
    for f in &st.setup_failures {
        out.line(format!("setup failed: {f}"));
    }
    crate::leaks::print(out, &st.leaked);
    for q in &st.quarantined {
        out.line(format!(
            "quarantined VMID {} on {} ({}): {}",
            q["vmid"],
            q["node"].as_str().unwrap_or(""),
            q["reason"].as_str().unwrap_or(""),
            q["command"].as_str().unwrap_or("")
        ));
    }
}
