//! `producer submit [--wait]`: validate, plan, reserve, enqueue. Submitting again converges.

use std::time::Duration;

use crate::cli::Global;
use crate::cmd::{common, handout, status};
use crate::deploy;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(g: &Global, wait: bool, out: &mut Out) -> Result<Exit, Failure> {
    let cfg = common::load_config(g, out)?;
    let key = common::secret_key()?;
    let store = common::store(g).await?;
    let pve = deploy::connect_pve(&cfg, key.as_ref())?;
    let (id, plan) = deploy::submit(&cfg, &pve, &store, key.as_ref()).await?;
    if g.json && !wait {
        out.json(&serde_json::json!({ "id": id }));
        return Ok(Exit::Ok);
    }
    if !g.json {
        out.line(format!(
            "submitted {id}: {} VMs for {} students",
            plan.vms.len(),
            plan.students.len()
        ));
        if !plan.retired.is_empty() {
            out.err_line(format!(
                "note: {} VMs of an earlier submit are no longer in the files; they are kept (listed as not-in-files in `status`) and `teardown` removes them",
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
    let code = status::watch(&store, &id, g.json, out, Duration::from_millis(500)).await?;
    if let Some(k) = key.as_ref() {
        let path = handout::write(&store, &id, k, &g.data_dir, out).await?;
        if !g.json {
            out.line(format!("handout written to {}", path.display()));
        }
    }
    Ok(code)
}
