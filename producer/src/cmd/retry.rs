//! `producer retry ID`: bring the failed (dead-lettered) jobs back, attempts reset; nothing
//! that succeeded runs again.

use crate::cli::Global;
use crate::cmd::common;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(g: &Global, id: &Option<String>, out: &mut Out) -> Result<Exit, Failure> {
    let id = common::resolve_id(g, id, out)?;
    let store = common::store(g).await?;
    let rec = store
        .deployment(&id)
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?
        .ok_or_else(|| Failure::new(Exit::Usage, anyhow::anyhow!("no deployment {id:?}")))?;
    let n = store
        .queue()
        .retry_dead_group(&rec.scope())
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
    if g.json {
        out.json(&serde_json::json!({"id": id, "retried": n}));
    } else {
        out.line(format!("{id}: {n} failed jobs queued again"));
    }
    Ok(Exit::Ok)
}
