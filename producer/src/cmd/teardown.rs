//! `producer teardown ID [--wait]`: cancel, fence, destroy what the deployment created. The
//! teardown's last job (run by a worker) finishes it; `--wait` only watches.

use std::time::Duration;

use crate::cli::Global;
use crate::cmd::{context, progress};
use crate::deploy::{self, DeploymentState};
use crate::exit::{Exit, Failure};
use crate::leaks;
use crate::output::Out;

pub async fn run(
    g: &Global,
    id: &Option<String>,
    wait: bool,
    out: &mut Out,
) -> Result<Exit, Failure> {
    let id = context::resolve_id(g, id, out)?;
    let store = context::store(g).await?;
    let started = deploy::teardown(&store, &id).await?;
    if started.already_torn_down {
        if g.json {
            out.json(&serde_json::json!({"id": id, "state": DeploymentState::TornDown.as_str()}));
        } else {
            out.line(format!("{id} is torn down already"));
        }
        return Ok(Exit::Ok);
    }
    if !g.json {
        out.line(format!("teardown of {id} started"));
    }
    if !wait {
        if g.json {
            out.json(
                &serde_json::json!({"id": id, "state": DeploymentState::TearingDown.as_str(), "epoch": started.epoch}),
            );
        }
        return Ok(Exit::Ok);
    }
    let bar = progress::Progress::new(g.json, "teardown jobs");
    loop {
        let p = deploy::teardown_progress(&store, &id, started.epoch).await?;
        if bar.is_shown() {
            bar.update(
                p.done + p.dead,
                p.done + p.dead + p.open,
                format!("open {}, failed {}", p.open, p.dead),
            );
        }
        if p.finished {
            bar.finish();
            // The deployment's id is `<name>@<cluster>`.
            let cluster = id.rsplit_once('@').map(|(_, c)| c).unwrap_or_default();
            let leaked = leaks::leaked_of(&store, cluster, &id).await?;
            if g.json {
                out.json(&serde_json::json!({
                    "id": id,
                    "state": DeploymentState::TornDown.as_str(),
                    "leaked": leaked
                }));
            } else {
                out.line(format!("{id} torn down"));
                leaks::print(out, &leaked);
            }
            return Ok(Exit::Ok);
        }
        // Only the finish job is left, gated on jobs that failed for good.
        if p.dead > 0 && p.open <= 1 {
            bar.finish();
            return Err(Failure::new(
                Exit::DeploymentFailed,
                anyhow::anyhow!(
                    "{} teardown jobs failed; see `producer status {id}`, fix the cause, then `producer retry {id}` (the teardown then finishes by itself)",
                    p.dead
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
