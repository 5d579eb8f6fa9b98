//! The disks a deployment's destroys left behind and the workers could not free
//! (`shared::jobs::leaks`), as `status` and `teardown` list them: volume, node, VMID, why,
//! and the command that frees it by hand.

use shared::jobs::state::{DeploymentRecord, Store};
use shared::queue::QueueError;

use crate::output::Out;

/// The recorded leaks of deployment `id` on `cluster`, as JSON objects.
pub async fn leaked_of(
    store: &Store,
    cluster: &str,
    id: &str,
) -> Result<Vec<serde_json::Value>, QueueError> {
    Ok(store
        .leaks(cluster)
        .await?
        .into_iter()
        .filter(|l| l.deployment == id)
        .map(|l| {
            serde_json::json!({
                "volid": l.volid, "node": l.node, "vmid": l.vmid, "vm": l.vm,
                "error": l.error, "command": l.command(),
            })
        })
        .collect())
}

/// The same, for a deployment's record.
pub async fn leaked_of_record(
    store: &Store,
    rec: &DeploymentRecord,
) -> Result<Vec<serde_json::Value>, QueueError> {
    leaked_of(store, &rec.cluster, &rec.id).await
}

/// One line per leaked disk.
pub fn print(out: &mut Out, leaked: &[serde_json::Value]) {
    for l in leaked {
        out.line(format!(
            "leaked disk {} on {} (VMID {}): {}; free it with: {}",
            l["volid"].as_str().unwrap_or(""),
            l["node"].as_str().unwrap_or(""),
            l["vmid"],
            l["error"].as_str().unwrap_or(""),
            l["command"].as_str().unwrap_or("")
        ));
    }
}
