//! VM snapshots: list, create, roll back, delete (`/nodes/{node}/qemu/{vmid}/snapshot*`).
//! Each change is a task (`qmsnapshot`, `qmrollback`, `qmdelsnapshot`) under the VM's
//! config lock; a rollback stops a running VM first and, with `start`, starts it again.

use reqwest::Method;
use serde::Deserialize;

use super::client::{Params, PveClient, seg};
use super::error::PveError;
use super::lenient;
use super::upid::Upid;

/// One entry of `GET .../snapshot`; the last one is `current` (the VM as it is).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SnapshotEntry {
    pub name: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub parent: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub snaptime: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub description: Option<String>,
}

fn snap_path(node: &str, vmid: u32) -> String {
    format!("/nodes/{}/qemu/{vmid}/snapshot", seg(node))
}

impl PveClient {
    /// `GET .../snapshot`: the VM's snapshots, without the `current` entry.
    pub async fn snapshots(&self, node: &str, vmid: u32) -> Result<Vec<SnapshotEntry>, PveError> {
        let all: Vec<SnapshotEntry> = self.get(&snap_path(node, vmid), Params::new()).await?;
        Ok(all.into_iter().filter(|s| s.name != "current").collect())
    }

    /// `POST .../snapshot` → task `qmsnapshot` (disks only, no RAM).
    pub async fn create_snapshot(
        &self,
        node: &str,
        vmid: u32,
        name: &str,
        description: &str,
    ) -> Result<Upid, PveError> {
        let p = Params::new()
            .str("snapname", name)
            .str("description", description);
        self.call(Method::POST, &snap_path(node, vmid), p).await
    }

    /// `POST .../snapshot/{name}/rollback` → task `qmrollback`; with `start`, the VM is
    /// started after the rollback (needs `VM.PowerMgmt`).
    pub async fn rollback_snapshot(
        &self,
        node: &str,
        vmid: u32,
        name: &str,
        start: bool,
    ) -> Result<Upid, PveError> {
        let p = Params::new().flag("start", start);
        self.call(
            Method::POST,
            &format!("{}/{}/rollback", snap_path(node, vmid), seg(name)),
            p,
        )
        .await
    }

    /// `DELETE .../snapshot/{name}` → task `qmdelsnapshot`.
    pub async fn delete_snapshot(
        &self,
        node: &str,
        vmid: u32,
        name: &str,
    ) -> Result<Upid, PveError> {
        self.call(
            Method::DELETE,
            &format!("{}/{}", snap_path(node, vmid), seg(name)),
            Params::new(),
        )
        .await
    }
}
