//! `producer list`: every deployment Redis knows.

use crate::cli::Global;
use crate::cmd::context;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(g: &Global, out: &mut Out) -> Result<Exit, Failure> {
    let store = context::store(g).await?;
    let deps = store
        .deployments()
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
    if g.json {
        out.json(&serde_json::to_value(&deps).expect("serializes"));
        return Ok(Exit::Ok);
    }
    for d in deps {
        out.line(format!(
            "{:<32} {:<14} created {}",
            d.id,
            d.phase,
            d.created.format("%Y-%m-%d %H:%M")
        ));
    }
    Ok(Exit::Ok)
}
