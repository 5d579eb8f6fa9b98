//! `producer retry ID`: bring the failed (dead-lettered) jobs back, attempts reset; nothing
//! that succeeded runs again.

use crate::cli::Global;
use crate::cmd::context;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(g: &Global, id: &Option<String>, out: &mut Out) -> Result<Exit, Failure> {
    let id = context::resolve_id(g, id, out)?;
    let store = context::store(g).await?;
    let rec = crate::deploy::read(&store, &id)
        .await?
        .map(|v| v.rec)
        .ok_or_else(|| Failure::new(Exit::Usage, anyhow::anyhow!("no deployment {id:?}")))?;
    // The current epoch's jobs and those of every teardown not finished yet (a failed
    // destroy holds up its teardown, and a submit waiting behind it).
    let mut n = 0;
    let mut scopes = vec![rec.scope()];
    scopes.extend(rec.teardowns.iter().map(|e| shared::jobs::scope(&id, *e)));
    scopes.dedup();
    for scope in &scopes {
        n += store
            .queue()
            .retry_dead_group(scope)
            .await
            .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
    }
    crate::deploy::ensure_teardowns(&store, &rec).await?;
    if g.json {
        out.json(&serde_json::json!({"id": id, "retried": n}));
    } else {
        out.line(format!("{id}: {n} failed jobs queued again"));
    }
    Ok(Exit::Ok)
}
