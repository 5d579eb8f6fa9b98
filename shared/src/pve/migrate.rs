//! Moving a VM to another node: `POST /nodes/{node}/qemu/{vmid}/migrate` → a `qmigrate`
//! task on the source node. The VM carries `lock: migrate` while the task runs; at its end
//! the config is on the target node (disks on shared storage stay, local disks are copied).
//! Proxmox refuses a running VM without `online` and a config `lock` before starting the
//! task; a running VM's local disks need `with_local_disks`, else the task fails with
//! `migration aborted`.

use reqwest::Method;

use super::client::{Params, PveClient, seg};
use super::error::PveError;
use super::upid::Upid;

/// Parameters of `POST /nodes/{node}/qemu/{vmid}/migrate`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrateParams {
    /// The node to move the VM to.
    pub target: String,
    /// Live migration of a running VM (Proxmox ignores it for a stopped one).
    pub online: bool,
    /// Copy a running VM's local disks while it runs.
    pub with_local_disks: bool,
    /// Where local disks go on the target: one storage id, or `source:target` pairs.
    pub targetstorage: Option<String>,
}

impl MigrateParams {
    /// An offline migration to `target`.
    pub fn to(target: impl Into<String>) -> MigrateParams {
        MigrateParams {
            target: target.into(),
            ..MigrateParams::default()
        }
    }
}

impl PveClient {
    /// Offline migration of a stopped VM from `node` to `target`; returns the task's UPID
    /// (on `node`). Wait for it with [`PveClient::wait_task`].
    pub async fn migrate_vm(&self, node: &str, vmid: u32, target: &str) -> Result<Upid, PveError> {
        self.migrate_vm_with(node, vmid, &MigrateParams::to(target))
            .await
    }

    /// `POST /nodes/{node}/qemu/{vmid}/migrate` with every option.
    pub async fn migrate_vm_with(
        &self,
        node: &str,
        vmid: u32,
        p: &MigrateParams,
    ) -> Result<Upid, PveError> {
        let params = Params::new()
            .str("target", p.target.as_str())
            .flag("online", p.online)
            .flag("with-local-disks", p.with_local_disks)
            .opt_str("targetstorage", p.targetstorage.as_deref());
        self.call(
            Method::POST,
            &format!("/nodes/{}/qemu/{vmid}/migrate", seg(node)),
            params,
        )
        .await
    }
}
