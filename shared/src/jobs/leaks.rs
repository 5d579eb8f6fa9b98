//! Disks a destroy left behind. qemu-server's `destroy_vm` frees each disk under its
//! storage's lock; when it cannot get the lock it only warns (`Could not remove disk
//! '<volid>', check manually: ...`) and the task ends with `WARNINGS: n`, the volume still
//! on the storage. After every destroy labfleet makes (a teardown's, or a half-made clone's
//! removal) that ended with warnings, the volumes its log names are freed
//! (`DELETE /nodes/{node}/storage/{storage}/content/{volume}`), but only those named for
//! the VMID that was destroyed, a VMID reserved for this VM in Redis. What cannot be freed
//! is recorded in `leaks:<cluster>` (HASH volid -> JSON [`Leak`]) for `status` and the
//! teardown's output, and forgotten once a later destroy of the same VMID frees it.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::alloc::{self, Space};
use crate::jobs::lost_reply::{self, vm_disk_owner};
use crate::jobs::state::Store;
use crate::jobs::{Env, pve_error};
use crate::pve::{PveClient, PveError, TaskOutcome, Upid};
use crate::queue::{JobError, Lease, QueueError};

/// Tries to free one volume this many times before recording it.
const FREE_TRIES: u32 = 3;

/// A volume a destroy left behind that labfleet could not free.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Leak {
    /// `<storage>:<volname>`.
    pub volid: String,
    pub vmid: u32,
    pub node: String,
    pub deployment: String,
    pub vm: String,
    /// Why it is still there (the last error freeing it).
    pub error: String,
    pub at: DateTime<Utc>,
}

impl Leak {
    /// What an admin runs to free it by hand.
    pub fn command(&self) -> String {
        format!("pvesm free {}  # on node {}", self.volid, self.node)
    }
}

/// The destroyed VM whose leftovers these are.
pub struct Destroyed<'a> {
    pub cluster: &'a str,
    pub deployment: &'a str,
    pub vm: &'a str,
    pub vmid: u32,
    /// The node the destroy ran on (a local storage's volume is freed there).
    pub node: &'a str,
    /// The owner its VMID's reservation must have for its disks to be ours.
    pub owner: &'a str,
}

impl Store {
    pub fn key_leaks(&self, cluster: &str) -> String {
        self.queue().key(&format!("leaks:{cluster}"))
    }

    pub async fn record_leak(&self, cluster: &str, leak: &Leak) -> Result<(), QueueError> {
        let mut c = self.queue().connection();
        let json = serde_json::to_string(leak).expect("serializes");
        let _: () = c.hset(self.key_leaks(cluster), &leak.volid, json).await?;
        Ok(())
    }

    pub async fn forget_leak(&self, cluster: &str, volid: &str) -> Result<(), QueueError> {
        let mut c = self.queue().connection();
        let _: () = c.hdel(self.key_leaks(cluster), volid).await?;
        Ok(())
    }

    /// Every recorded leak of the cluster, by volid.
    pub async fn leaks(&self, cluster: &str) -> Result<Vec<Leak>, QueueError> {
        let mut c = self.queue().connection();
        let m: HashMap<String, String> = c.hgetall(self.key_leaks(cluster)).await?;
        let mut v: Vec<Leak> = m
            .values()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect();
        v.sort_by(|a, b| a.volid.cmp(&b.volid));
        Ok(v)
    }
}

/// The volumes a destroy's log says it could not remove, named for `vmid` only.
pub fn left_behind(log: &[String], vmid: u32) -> Vec<String> {
    let mut out: Vec<String> = log
        .iter()
        .filter_map(|l| {
            let rest = l.split("Could not remove disk '").nth(1)?;
            let volid = rest.split('\'').next()?;
            (vm_disk_owner(volid) == Some(vmid)).then(|| volid.to_owned())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// After a destroy task (`upid`) ended with `outcome`: frees what it left behind, also the
/// leaks recorded for the VMID before. Never fails the destroy for a leak: what cannot be
/// freed is recorded.
pub async fn free_after_destroy(
    env: &Env,
    pve: &PveClient,
    lease: &Lease,
    d: &Destroyed<'_>,
    upid: Option<&Upid>,
    outcome: TaskOutcome,
) -> Result<(), JobError> {
    let redis = |e: QueueError| JobError::Retry(format!("redis: {e}"));
    // Only a VMID reserved for this VM names disks that are ours to free.
    let q = env.store.queue();
    let owner = alloc::owner_of(q, &Space::vmids(q, d.cluster), d.vmid)
        .await
        .map_err(|e| JobError::Retry(e.to_string()))?;
    if owner.as_deref() != Some(d.owner) {
        return Ok(());
    }
    let mut volids: Vec<String> = env
        .store
        .leaks(d.cluster)
        .await
        .map_err(redis)?
        .into_iter()
        .filter(|l| l.vmid == d.vmid && l.deployment == d.deployment)
        .map(|l| l.volid)
        .collect();
    if let (Some(upid), TaskOutcome::Warnings(_)) = (upid, outcome) {
        let (lines, _) = pve.task_log(upid, 0, 0).await.map_err(pve_error)?;
        let text: Vec<String> = lines.into_iter().map(|l| l.t).collect();
        volids.extend(left_behind(&text, d.vmid));
    }
    volids.sort();
    volids.dedup();
    for volid in volids {
        lease.check().await?;
        match free_one(env, pve, lease, d.node, &volid).await? {
            None => {
                tracing::info!(vmid = d.vmid, volid, "freed a disk the destroy left behind");
                env.store
                    .forget_leak(d.cluster, &volid)
                    .await
                    .map_err(redis)?;
            }
            Some(error) => {
                tracing::warn!(
                    vmid = d.vmid,
                    volid,
                    error,
                    "could not free a disk the destroy left behind"
                );
                let leak = Leak {
                    volid: volid.clone(),
                    vmid: d.vmid,
                    node: d.node.to_owned(),
                    deployment: d.deployment.to_owned(),
                    vm: d.vm.to_owned(),
                    error,
                    at: Utc::now(),
                };
                env.store
                    .record_leak(d.cluster, &leak)
                    .await
                    .map_err(redis)?;
            }
        }
    }
    Ok(())
}

/// Frees one volume: `None` once it is gone from its storage, else the last error.
async fn free_one(
    env: &Env,
    pve: &PveClient,
    lease: &Lease,
    node: &str,
    volid: &str,
) -> Result<Option<String>, JobError> {
    let storage = volid.split(':').next().unwrap_or_default();
    let mut last = String::new();
    for attempt in 0..FREE_TRIES {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
        match pve.delete_volume(node, storage, volid).await {
            Ok(upid) => match env.wait_outcome(pve, &upid, lease).await? {
                Ok(_) => return Ok(None),
                Err(e) => last = e.to_string(),
            },
            Err(e) if lost_reply::may_have_run(&e) => last = e.to_string(),
            Err(PveError::NotFound { .. }) => {}
            Err(e) if !e.is_transient() && !matches!(e, PveError::Server { .. }) => {
                return Ok(Some(e.to_string()));
            }
            Err(e) => last = e.to_string(),
        }
        // Whatever the answer (or none), the storage says whether it is still there.
        match still_there(pve, node, storage, volid).await {
            Ok(false) => return Ok(None),
            Ok(true) => {}
            Err(e) => last = e.to_string(),
        }
    }
    Ok(Some(last))
}

async fn still_there(
    pve: &PveClient,
    node: &str,
    storage: &str,
    volid: &str,
) -> Result<bool, PveError> {
    let owner = vm_disk_owner(volid);
    let list = pve.storage_content(node, storage, owner).await?;
    let short = |v: &str| v.rsplit('/').next().unwrap_or(v).to_owned();
    Ok(list.iter().any(|v| short(&v.volid) == short(volid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_disks_of_the_destroyed_vmid_are_taken_from_the_log() {
        let log = vec![
            "  Logical volume \"vm-130-disk-0\" successfully removed.".to_owned(),
            "Could not remove disk 'local-lvm:vm-130-disk-1', check manually: can't lock file '/var/lock/pve-manager/pve-storage-local-lvm' - got timeout".to_owned(),
            "Could not remove disk 'local-lvm:vm-131-disk-0', check manually: x".to_owned(),
            "Could not remove disk 'ceph-vm:base-120-disk-0/vm-130-disk-0', check manually: x".to_owned(),
            "Could not remove disk 'local-lvm:vm-130-disk-1', check manually: again".to_owned(),
        ];
        assert_eq!(
            left_behind(&log, 130),
            vec![
                "ceph-vm:base-120-disk-0/vm-130-disk-0".to_owned(),
                "local-lvm:vm-130-disk-1".to_owned()
            ]
        );
        assert!(left_behind(&log, 999).is_empty());
    }
}
