//! `producer workers [--json]`: the workers whose heartbeat record has not expired
//! (`shared::heartbeat`): name, host, version, pid, start, last seen, jobs in flight.

use chrono::Utc;

use crate::cli::Global;
use crate::cmd::context;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub async fn run(g: &Global, out: &mut Out) -> Result<Exit, Failure> {
    let store = context::store(g).await?;
    let workers = shared::heartbeat::list(store.queue())
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
    if g.json {
        out.json(&serde_json::to_value(&workers).expect("serializes"));
        return Ok(Exit::Ok);
    }
    if workers.is_empty() {
        out.line("no worker has beaten recently (start one: `worker --redis URL --data-dir DIR`)");
        return Ok(Exit::Ok);
    }
    out.line(format!(
        "{:<28} {:<16} {:<8} {:>7} {:<20} {:>9} {:>9}",
        "worker", "host", "version", "pid", "started", "last seen", "in flight"
    ));
    let now = Utc::now();
    for w in workers {
        out.line(format!(
            "{:<28} {:<16} {:<8} {:>7} {:<20} {:>8.1}s {:>5} / {}",
            w.name,
            w.host,
            w.version,
            w.pid,
            w.started.format("%Y-%m-%d %H:%M:%S"),
            (now - w.last_seen).num_milliseconds() as f64 / 1000.0,
            w.in_flight,
            w.concurrency
        ));
    }
    Ok(Exit::Ok)
}
