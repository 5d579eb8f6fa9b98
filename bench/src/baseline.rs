//! The two baselines labfleet is compared with, written as small client programs with
//! labfleet's own Proxmox client (so HTTP and TLS costs are the same):
//!
//! - `sequential`: what the original Python plan and most teacher scripts do. One VM at a
//!   time: `GET /cluster/nextid`, clone from the template on its node, wait for the task,
//!   read the config and set the NICs, grant the ACL.
//! - `naive`: a node-unaware parallel client, as Ansible with `forks=5` running
//!   `proxmox_kvm` (nextid inside the module, then clone): 5 VMs in flight, VMIDs from
//!   `/cluster/nextid` (no reservation), every clone aimed at the template's node.
//!
//! Both first create each student's user and pool and one private bridge per student on the
//! template's node (one network apply), as a script would. A failed VM (lock timeout,
//! duplicate VMID) is counted and redone in a later round, as a teacher re-running the
//! playbook on the failed hosts would (at most 5 rounds).

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use shared::config::{CloneMode, Config, NetSpec};
use shared::pve::{
    AclUpdate, CloneParams, ConfigUpdate, NetDevice, NetworkCreate, PveClient, PveError,
    UserCreate, WaitOptions,
};
use shared::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sequential,
    Naive,
}

/// Failures seen by a baseline, by cause.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Failures {
    pub lock_timeout: u64,
    pub duplicate_vmid: u64,
    pub other: u64,
    pub rounds: u32,
    /// VMs not deployed after the last round.
    pub given_up: u64,
    pub examples: Vec<String>,
}

/// What kind of failure an error text is.
pub fn classify(msg: &str) -> &'static str {
    let m = msg.to_ascii_lowercase();
    if m.contains("already exists") || m.contains("file exists") {
        "duplicate_vmid"
    } else if m.contains("lock-") && m.contains(".conf") && m.contains("timeout") {
        // The new VMID's config flock, held by another clone into the same VMID.
        "duplicate_vmid"
    } else if m.contains("got timeout") || m.contains("lock request timeout") {
        "lock_timeout"
    } else {
        "other"
    }
}

impl Failures {
    fn note(&mut self, msg: &str) {
        match classify(msg) {
            "duplicate_vmid" => self.duplicate_vmid += 1,
            "lock_timeout" => self.lock_timeout += 1,
            _ => self.other += 1,
        }
        if self.examples.len() < 4 {
            self.examples.push(msg.chars().take(160).collect());
        }
    }
}

#[derive(Debug, Clone)]
struct Item {
    user: String,
    student: usize,
    machine: usize,
    name: String,
}

fn items(cfg: &Config) -> Vec<Item> {
    let mut v = Vec::new();
    for (ui, u) in cfg.users.users.iter().enumerate() {
        let short = u
            .to_string()
            .split('@')
            .next()
            .unwrap_or_default()
            .to_owned();
        for (mi, m) in cfg.deployment.machines.iter().enumerate() {
            v.push(Item {
                user: u.to_string(),
                student: ui,
                machine: mi,
                name: format!("{}-{short}", m.name),
            });
        }
    }
    v
}

fn pool_of(cfg: &Config, user: &str) -> String {
    format!(
        "{}-{}",
        cfg.deployment.name,
        user.split('@').next().unwrap_or_default()
    )
}

fn bridge_of(student: usize) -> String {
    format!("vmbr{}", 1000 + student)
}

/// Users, pools, one bridge per student on the template node, one apply.
async fn setup(pve: &PveClient, cfg: &Config) -> anyhow::Result<()> {
    let node = cfg.deployment.machines[0].template_node.to_string();
    for (i, u) in cfg.users.users.iter().enumerate() {
        let create = UserCreate {
            userid: u.to_string(),
            password: Some(Secret::new("bench-student-pw".to_owned())),
            ..UserCreate::default()
        };
        match pve.create_user(&create).await {
            Ok(()) | Err(PveError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        match pve.create_pool(&pool_of(cfg, &u.to_string()), None).await {
            Ok(()) | Err(PveError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        match pve
            .network_create(&node, &NetworkCreate::bridge(bridge_of(i)))
            .await
        {
            Ok(()) | Err(PveError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let upid = pve.network_apply(&node).await?;
    pve.wait_task(&upid, &WaitOptions::default()).await?;
    Ok(())
}

/// One VM: nextid, clone on the template's node, wait, NICs, ACL. Errors as text.
async fn one_vm(pve: &PveClient, cfg: &Config, it: &Item) -> Result<(), String> {
    let m = &cfg.deployment.machines[it.machine];
    let node = m.template_node.to_string();
    let vmid = pve.nextid(None).await.map_err(|e| e.to_string())?;
    let full = m.clone == CloneMode::Full;
    let params = CloneParams {
        newid: vmid,
        name: Some(it.name.clone()),
        pool: Some(pool_of(cfg, &it.user)),
        full: Some(full),
        storage: if full { m.storage.clone() } else { None },
        ..CloneParams::default()
    };
    let upid = pve
        .clone_vm(&node, m.template_vmid.get(), &params)
        .await
        .map_err(|e| e.to_string())?;
    pve.wait_task(&upid, &WaitOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let vc = pve
        .vm_config(&node, vmid)
        .await
        .map_err(|e| e.to_string())?;
    let nets = vc.nets();
    let mut update = ConfigUpdate::new();
    for (i, n) in m.networks.iter().enumerate() {
        let bridge = match n {
            NetSpec::Existing { bridge, .. } => bridge.clone(),
            _ => bridge_of(it.student),
        };
        let have = nets.get(&(i as u8));
        let dev = NetDevice {
            model: have.map_or("virtio".into(), |d| d.model.clone()),
            mac: have.and_then(|d| d.mac.clone()),
            bridge: Some(bridge),
            tag: None,
            firewall: None,
            other: BTreeMap::new(),
        };
        update = update.set_net(i as u8, &dev);
    }
    pve.update_config_sync(&node, vmid, &update)
        .await
        .map_err(|e| e.to_string())?;
    pve.update_acl(&AclUpdate {
        path: format!("/vms/{vmid}"),
        roles: vec![cfg.deployment.role.clone()],
        users: vec![it.user.clone()],
        propagate: Some(false),
        ..AclUpdate::default()
    })
    .await
    .map_err(|e| e.to_string())
}

/// Runs a baseline to completion; returns its failures. `t0` is taken by the caller.
pub async fn run(kind: Kind, pve: &PveClient, cfg: &Config) -> anyhow::Result<Failures> {
    setup(pve, cfg).await?;
    let mut todo = items(cfg);
    let failures = Arc::new(Mutex::new(Failures::default()));
    let forks = match kind {
        Kind::Sequential => 1,
        Kind::Naive => 5,
    };
    for round in 1..=5u32 {
        failures.lock().rounds = round;
        let queue = Arc::new(Mutex::new(std::mem::take(&mut todo).into_iter()));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let mut forks_f = Vec::new();
        for _ in 0..forks {
            let (queue, failed, failures) = (queue.clone(), failed.clone(), failures.clone());
            forks_f.push(async move {
                loop {
                    let next = queue.lock().next();
                    let Some(it) = next else { break };
                    if let Err(msg) = one_vm(pve, cfg, &it).await {
                        failures.lock().note(&msg);
                        failed.lock().push(it);
                    }
                }
            });
        }
        futures::future::join_all(forks_f).await;
        todo = std::mem::take(&mut *failed.lock());
        if todo.is_empty() {
            break;
        }
    }
    let mut f = failures.lock().clone();
    f.given_up = todo.len() as u64;
    Ok(f)
}
