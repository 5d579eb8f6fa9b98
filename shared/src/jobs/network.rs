//! `network`: set `net0..netN` of one VM as the deployment says (bridge, VLAN tag, NIC model
//! from the device type), keeping the MACs the clone got, and remove NICs beyond N that the
//! template had. One read and one synchronous write, guarded by the config digest.
//! Done when: every NIC matches (then nothing is written).

use crate::jobs::{Env, NetworkJob, pve_error, require_vm};
use crate::pve::{ConfigUpdate, NetDevice};
use crate::queue::{JobError, Lease};

pub async fn run(j: &NetworkJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let facts = require_vm(env, lease, &j.vm).await?;
    let pve = env.pve(&j.vm.cluster)?;
    let cfg = pve
        .vm_config(&facts.node, facts.vmid)
        .await
        .map_err(pve_error)?;
    let current = cfg.nets();
    let mut update = ConfigUpdate::new();
    let mut changed = false;
    for (i, nic) in j.nics.iter().enumerate() {
        let idx = i as u8;
        let have = current.get(&idx);
        let mut want = NetDevice {
            model: nic.model.clone(),
            mac: have.and_then(|d| d.mac.clone()),
            bridge: Some(nic.bridge.clone()),
            tag: nic.tag,
            firewall: nic.firewall.or(have.and_then(|d| d.firewall)),
            other: Default::default(),
        };
        if have.is_some_and(|h| h.model != want.model) {
            // A new model gets a new MAC from Proxmox; keeping the old one is fine too, but
            // the model change is what the device type asks for.
            want.mac = have.and_then(|d| d.mac.clone());
        }
        let same = have.is_some_and(|h| {
            h.model == want.model
                && h.bridge == want.bridge
                && h.tag == want.tag
                && h.firewall == want.firewall
        });
        if !same {
            update = update.set_net(idx, &want);
            changed = true;
        }
    }
    for idx in current.keys().filter(|k| (**k as usize) >= j.nics.len()) {
        update = update.delete(format!("net{idx}"));
        changed = true;
    }
    if !changed {
        return Ok(());
    }
    if let Some(d) = cfg.digest() {
        update = update.digest(d);
    }
    lease.check().await?;
    pve.update_config_sync(&facts.node, facts.vmid, &update)
        .await
        .map_err(pve_error)
}
