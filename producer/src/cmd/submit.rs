//! `producer submit [--wait]`: validate, plan, reserve, enqueue. Submitting again converges.

use std::time::Duration;

use crate::cli::Global;
use crate::cmd::{context, handout, status};
use crate::deploy;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(g: &Global, wait: bool, prune: bool, out: &mut Out) -> Result<Exit, Failure> {
    let cfg = context::load_config(g, out)?;
    let key = context::secret_key()?;
    let store = context::store(g).await?;
    let pve = deploy::connect_pve(&cfg, key.as_ref())?;
    let opts = deploy::SubmitOptions { prune };
    let (id, plan, done) = deploy::submit_with(&cfg, &pve, &store, key.as_ref(), opts).await?;
    if g.json && !wait {
        out.json(&serde_json::json!({ "id": id, "submitted": done }));
        return Ok(Exit::Ok);
    }
    if !g.json {
        out.line(format!(
            "submitted {id}: {} VMs for {} students",
            plan.vms.len(),
            plan.students.len()
        ));
        if !done.waits_for_teardowns.is_empty() {
            out.err_line(format!(
                "note: {id} is still being torn down; this submit's jobs start once that teardown has finished"
            ));
        }
        if !done.pruning.is_empty() || !done.pruning_students.is_empty() {
            out.err_line(format!(
                "removing {} VMs of {} students no longer in the files: {}",
                done.pruning.len(),
                done.pruning_students.len(),
                done.pruning_students.join(", ")
            ));
        }
        if !plan.retired.is_empty() {
            out.err_line(format!(
                "note: {} VMs of an earlier submit are no longer in the files; they are kept (listed as not-in-files in `status`); `submit --prune` or `teardown` removes them",
                plan.retired.len()
            ));
        }
        for w in &plan.warnings {
            out.err_line(format!("warning: {w}"));
        }
    }
    if !wait {
        return Ok(Exit::Ok);
    }
    let st =
        status::wait_until_finished(&store, &id, g.json, out, Duration::from_millis(500)).await?;
    let st = status::with_table(&store, &id, st, false).await?;
    let handout = match key.as_ref() {
        Some(k) => {
            let console = handout::console_base(&cfg, &store, &pve, &id, out).await?;
            Some(handout::write(&store, &pve, &id, k, &g.data_dir, console.as_deref()).await?)
        }
        None => None,
    };
    if g.json {
        // One document: the final status, plus where the handout went (null without a key).
        let mut doc = serde_json::to_value(&st).expect("serializes");
        doc["handout"] = serde_json::to_value(&handout).expect("serializes");
        out.json(&doc);
    } else {
        status::print(&st, false, out);
        match &handout {
            Some(h) => out.line(h.describe()),
            None => out.err_line(
                "no handout: set LABFLEET_SECRET_KEY (the key of the students' passwords), then `producer handout`",
            ),
        }
    }
    Ok(status::exit_for(&st))
}
