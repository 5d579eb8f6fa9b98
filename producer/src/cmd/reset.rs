//! `producer reset ID [--student U]... [--vm NAME]...`: roll the selected VMs back to their
//! baseline snapshot (`labfleet-baseline`, taken before the first start when the deployment
//! file says `baseline: true`). A running VM is stopped, rolled back and started again; a
//! stopped one stays stopped. A VM without the baseline fails with its own message, and
//! the command exits with 6.

use shared::jobs::state::Store;

use crate::cli::{Global, OpArgs};
use crate::cmd::{context, power};
use crate::exit::{Exit, Failure};
use crate::operation::{self, OpKind, OpRequest, Selectors};
use crate::output::Out;

pub async fn run(g: &Global, a: &OpArgs, out: &mut Out) -> Result<Exit, Failure> {
    let id = context::resolve_id(g, &a.id, out)?;
    let store: Store = context::store(g).await?;
    let req = OpRequest {
        kind: OpKind::Reset,
        selectors: Selectors {
            students: a.student.clone(),
            vms: a.vm.clone(),
        },
        timeout_secs: None,
        starts_per_node: power::starts_per_node(g, &store, &id).await,
    };
    let report = operation::start(&store, &id, &req).await?;
    power::follow(&store, report, a.no_wait, g.json, out).await
}
