//! `producer status [ID] [--watch] [--vms]`: counts by state, per node, failures with their
//! Proxmox message, quarantined VMIDs; every VM when there are few (or with `--vms`).
//!
//! Polling reads the workers' counters ([`deploy::summary`]), whose cost does not grow with
//! the class; the per-VM table ([`deploy::status`]) reads every step record and is shown
//! for classes of at most [`TABLE_MAX_VMS`] VMs, or on request.

use std::time::Duration;

use crate::cli::Global;
use crate::cmd::{context, progress};
use crate::deploy::{self, DeploymentState, Listing, Status};
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
    live: bool,
    out: &mut Out,
) -> Result<Exit, Failure> {
    let id = context::resolve_id(g, id, out)?;
    let store = context::store(g).await?;
    if watch_ {
        return watch(&store, &id, g.json, out, Duration::from_secs(1)).await;
    }
    let st = report(&store, &id, all_vms).await?;
    let pve = if live {
        let cfg = context::load_config(g, out)?;
        Some(deploy::connect_pve(&cfg, context::secret_key()?.as_ref())?)
    } else {
        None
    };
    let power = crate::operation::power_states(&store, &id, pve.as_ref()).await?;
    let schedule = crate::cmd::schedule::status_summary(&store, &id).await?;
    if g.json {
        let mut doc = serde_json::to_value(&st).expect("serializes");
        doc["schedule"] = serde_json::json!(schedule);
        if let Some(vms) = doc["vms"].as_array_mut() {
            for v in vms {
                let p = v["name"].as_str().and_then(|n| power.get(n)).cloned();
                v["power"] = serde_json::json!(p);
            }
        }
        out.json(&doc);
    } else {
        out.line(summary(&st));
        if let Some(s) = &schedule {
            if let Some(w) = s["warning"].as_str() {
                out.line(format!("warning: {w}"));
            }
            if let Some(n) = s["next"]["local"].as_str() {
                out.line(format!(
                    "schedule: next {} at {n} (`producer schedule {}`)",
                    s["next"]["kind"].as_str().unwrap_or(""),
                    st.id
                ));
            }
        }
        print_table(&st, &power, out);
    }
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
    Ok(deploy::status(store, id).await?)
}

pub fn exit_for(st: &Status) -> Exit {
    if st.state == DeploymentState::Failed {
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
            Err(f) if f.exit() == Exit::RedisUnreachable => {
                let since = *outage_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= REDIS_OUTAGE_TOLERATED {
                    return Err(f.into());
                }
                tracing::warn!(error = %format!("{:#}", anyhow::Error::new(f)), "Redis did not answer; still watching");
                tokio::time::sleep(every.min(Duration::from_millis(500))).await;
                continue;
            }
            Err(f) => return Err(f.into()),
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
        if st.state.is_settled() {
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
    print_table(st, &std::collections::BTreeMap::new(), out);
}

/// The report after its summary line; `power` (VM name -> power state) adds a column.
fn print_table(st: &Status, power: &std::collections::BTreeMap<String, String>, out: &mut Out) {
    for (node, c) in &st.per_node {
        let c: Vec<String> = c.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out.line(format!("  {node}: {}", c.join(", ")));
    }
    let col = |p: &str| {
        if power.is_empty() {
            String::new()
        } else {
            format!("{p:<8} ")
        }
    };
    out.line(format!(
        "{:<28} {:<14} {:>7} {:<6} {:<12} {}error",
        "VM",
        "student",
        "VMID",
        "node",
        "state",
        col("power")
    ));
    for v in &st.vms {
        out.line(format!(
            "{:<28} {:<14} {:>7} {:<6} {:<12} {}{}",
            v.name,
            v.user,
            v.vmid.map(|v| v.to_string()).unwrap_or_default(),
            v.node,
            v.state,
            col(power.get(&v.name).map(String::as_str).unwrap_or("-")),
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
    for m in &st.moves {
        let vms: Vec<String> = m
            .vms
            .iter()
            .map(|(k, old, new)| format!("{k} {old}->{new}"))
            .collect();
        out.line(match &m.to {
            Some(to) => format!(
                "moved {} from {} to {}: {} ({})",
                m.user,
                m.from,
                to,
                m.why,
                vms.join(", ")
            ),
            None => format!("not moved {} (on {}): {}", m.user, m.from, m.why),
        });
    }
    for d in &st.left_on_lost_nodes {
        out.line(format!("left on a lost node, removed when it is back: {d}"));
    }
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
