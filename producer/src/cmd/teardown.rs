//! `producer teardown ID [--wait]`: cancel, fence, destroy what the deployment created.

use std::time::Duration;

use crate::cli::Global;
use crate::cmd::common;
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
    deploy::teardown(&store, &id).await?;
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
    loop {
        if deploy::finish_teardown(&store, &id, &pve).await? {
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
