//! `producer teardown ID [--wait]`: cancel, fence, destroy what the deployment created.

use std::time::Duration;

use crate::cli::Global;
use crate::cmd::{common, progress};
use crate::deploy;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(
    g: &Global,
    id: &Option<String>,
    wait: bool,
    out: &mut Out,
) -> Result<Exit, Failure> {
    let id = common::resolve_id(g, id, out)?;
    let store = common::store(g).await?;
    let scope = deploy::teardown(&store, &id).await?;
    let cfg = common::load_config(g, out)?;
    let pve = deploy::connect_pve(&cfg, common::secret_key()?.as_ref())?;
    if !g.json {
        out.line(format!("teardown of {id} started"));
    }
    if !wait {
        if g.json {
            out.json(&serde_json::json!({"id": id, "state": "tearing-down"}));
        }
        return Ok(Exit::Ok);
    }
    let bar = progress::Progress::new(g.json, "teardown jobs");
    loop {
        if bar.is_shown()
            && let Ok(gs) = store.queue().group_stats(&scope).await
        {
            let finished = gs.done + gs.dead + gs.cancelled;
            let total = finished + gs.ready + gs.scheduled + gs.gated + gs.waiting_for_slot;
            bar.update(
                finished,
                total + gs.in_flight,
                format!("running {}, failed {}", gs.in_flight, gs.dead),
            );
        }
        if deploy::finish_teardown(&store, &id, &pve).await? {
            bar.finish();
            if g.json {
                out.json(&serde_json::json!({"id": id, "state": "torn-down"}));
            } else {
                out.line(format!("{id} torn down"));
            }
            return Ok(Exit::Ok);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
