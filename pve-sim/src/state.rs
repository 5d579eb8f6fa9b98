//! The simulated cluster's live state (pmxcfs-like VM registry, nodes, storages, network
//! files, users, ACLs, pools, tasks) behind one mutex, plus the shared context every
//! handler and task gets (`Shared`): locks, copy pools, clocks, secrets, fault state.
//!
//! One file (over 600 lines): every handler reads and writes this one state under one lock;
//! its types and their small accessors belong together (the first state is built in `seed`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rand::Rng;
use rand::rngs::StdRng;
use serde::Serialize;
use serde_json::{Value, json};

use crate::access::{AclEntry, Identity, effective_privs};
use crate::cluster::{CostSpec, StorageSpec};
use crate::error::{PveError, PveResult};
use crate::faults::FaultState;
use crate::locks::{CopyPool, Flocks, StorageLockGuard, StorageLocks};
use crate::stats::Stats;
use crate::tasks::Task;

pub(crate) type Iface = BTreeMap<String, Value>;

pub(crate) struct NodeState {
    pub name: String,
    pub ip: String,
    pub cpus: u32,
    pub memory: u64,
    pub base_used: u64,
    pub rootfs: u64,
    pub online: bool,
    /// Until when a fault keeps it offline.
    pub offline_until: Option<Instant>,
    /// `/etc/network/interfaces`.
    pub net_applied: BTreeMap<String, Iface>,
    /// Interfaces that exist in the kernel (`/sys/class/net`): those of the file as of the
    /// last completed `ifreload`. A VM can only plug into a live bridge.
    pub net_live: BTreeSet<String>,
    pub net_pending: Option<BTreeMap<String, Iface>>,
    pub pstart: u32,
}

impl NodeState {
    pub fn is_online(&self, now: Instant) -> bool {
        self.online && self.offline_until.is_none_or(|u| now >= u)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Vm {
    pub node: String,
    pub config: BTreeMap<String, Value>,
    pub running: bool,
    pub started: Option<Instant>,
    pub pool: Option<String>,
    /// The template this VM was linked-cloned from.
    pub linked_from: Option<u32>,
    /// pvestatd's last sample of this VM (the RRD-derived fields of `/cluster/resources`),
    /// `None` until the first update after it appeared.
    pub rrd: Option<serde_json::Map<String, Value>>,
}

impl Vm {
    pub fn lock(&self) -> Option<String> {
        self.config
            .get("lock")
            .and_then(|v| v.as_str())
            .map(String::from)
    }
    pub fn is_template(&self) -> bool {
        self.config
            .get("template")
            .is_some_and(|v| v.as_i64() == Some(1) || v.as_str() == Some("1"))
    }
    pub fn name(&self) -> Option<String> {
        self.config
            .get("name")
            .and_then(|v| v.as_str())
            .map(String::from)
    }
    pub fn memory_mib(&self) -> u64 {
        self.config
            .get("memory")
            .and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .unwrap_or(512)
    }
    pub fn cores(&self) -> u64 {
        let g = |k: &str| {
            self.config.get(k).and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
        };
        g("cores").unwrap_or(1) * g("sockets").unwrap_or(1)
    }
    /// The VM's disks (CD-ROMs excluded), in config key order.
    pub fn disks(&self) -> Vec<VmDisk> {
        self.config
            .iter()
            .filter(|(k, _)| is_disk_key(k))
            .filter_map(|(k, v)| {
                let s = v.as_str()?;
                let mut parts = s.split(',');
                let vol = parts.next()?;
                let (storage, volname) = vol.split_once(':')?;
                if parts.clone().any(|p| p == "media=cdrom") {
                    return None;
                }
                let size = parts
                    .find_map(|p| p.strip_prefix("size="))
                    .map(parse_size)
                    .unwrap_or(0);
                Some(VmDisk {
                    key: k.clone(),
                    storage: storage.to_string(),
                    volname: volname.to_string(),
                    size,
                })
            })
            .collect()
    }
}

/// One disk of a VM's config (`scsi0: local-lvm:vm-100-disk-0,size=32G`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDisk {
    /// The config key (`scsi0`).
    pub key: String,
    pub storage: String,
    /// The volume name on the storage (`vm-100-disk-0`, `base-100-disk-0/vm-101-disk-0`).
    pub volname: String,
    /// Bytes.
    pub size: u64,
}

impl VmDisk {
    /// `storage:volname`.
    pub fn volid(&self) -> String {
        format!("{}:{}", self.storage, self.volname)
    }
}

/// A volume no VM config refers to any more: what a destroy could not free ("Could not
/// remove disk ..., check manually"). It uses space and shows in the storage's content.
#[derive(Clone, Debug)]
pub(crate) struct LooseVolume {
    pub storage: String,
    /// The node it was allocated from (where a local storage keeps it).
    pub node: String,
    pub volname: String,
    pub size: u64,
}

/// The owner VMID of a volume name: `vm-101-disk-0`, `base-100-disk-0/vm-101-disk-0`.
pub(crate) fn volume_owner(volname: &str) -> Option<u32> {
    let last = volname.rsplit('/').next()?;
    let rest = last
        .strip_prefix("vm-")
        .or_else(|| last.strip_prefix("base-"))?;
    rest.split('-').next()?.parse().ok()
}

/// The RRD-derived fields of a VM's `/cluster/resources` entry (pve-manager
/// `API2Tools::extract_vm_stats`), as of `now`.
pub(crate) fn rrd_sample(vm: &Vm, now: Instant) -> serde_json::Map<String, Value> {
    let maxdisk: u64 = vm.disks().iter().map(|d| d.size).sum();
    let v = json!({
        "uptime": vm.started.map(|s| now.duration_since(s).as_secs()).unwrap_or(0),
        "name": vm.name().unwrap_or_default(),
        "status": if vm.running { "running" } else { "stopped" },
        "template": vm.is_template() as u8,
        "maxcpu": vm.cores(), "cpu": if vm.running { 0.02 } else { 0.0 },
        "maxmem": vm.memory_mib() << 20,
        "mem": if vm.running { (vm.memory_mib() << 20) / 3 } else { 0 },
        "maxdisk": maxdisk, "disk": 0,
        "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0,
    });
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

pub(crate) fn is_disk_key(k: &str) -> bool {
    let num = |p: &str, max: u32| {
        k.strip_prefix(p)
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n <= max)
    };
    num("scsi", 30)
        || num("virtio", 15)
        || num("sata", 5)
        || num("ide", 3)
        || k == "efidisk0"
        || k == "tpmstate0"
}

/// `8G`, `512M`, `4194304` (bytes) → bytes.
pub(crate) fn parse_size(s: &str) -> u64 {
    let (num, mul) = match s.chars().last() {
        Some('T') => (&s[..s.len() - 1], 1u64 << 40),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('K') => (&s[..s.len() - 1], 1 << 10),
        _ => (s, 1),
    };
    (num.parse::<f64>().unwrap_or(0.0) * mul as f64) as u64
}

pub(crate) fn format_size(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else {
        format!("{}M", bytes.div_ceil(1 << 20))
    }
}

#[derive(Clone, Debug)]
pub(crate) struct User {
    pub password: Option<String>,
    pub enable: bool,
    pub expire: u64,
    pub comment: Option<String>,
    pub email: Option<String>,
    pub firstname: Option<String>,
    pub lastname: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct Token {
    pub secret: String,
    pub privsep: bool,
    pub comment: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Pool {
    pub comment: Option<String>,
    pub vms: BTreeSet<u32>,
    pub storage: BTreeSet<String>,
}

/// A pool as the library face reports it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PoolInfo {
    pub poolid: String,
    pub comment: Option<String>,
    pub vms: Vec<u32>,
    pub storage: Vec<String>,
}

/// A VM as the library face reports it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct VmInfo {
    pub vmid: u32,
    pub node: String,
    pub name: Option<String>,
    pub template: bool,
    pub lock: Option<String>,
    /// `running` or `stopped`.
    pub status: String,
    pub pool: Option<String>,
    pub description: Option<String>,
    pub tags: Option<String>,
    pub config: BTreeMap<String, Value>,
}

pub(crate) struct State {
    pub cluster_name: String,
    pub nodes: BTreeMap<String, NodeState>,
    pub storages: BTreeMap<String, StorageSpec>,
    pub vms: BTreeMap<u32, Vm>,
    pub users: BTreeMap<String, User>,
    pub tokens: BTreeMap<String, Token>,
    pub acls: Vec<AclEntry>,
    pub roles: BTreeMap<String, BTreeSet<String>>,
    pub pools: BTreeMap<String, Pool>,
    pub tasks: HashMap<String, Task>,
    /// Per VM: its snapshots and disk generation (`api/snapshot.rs`).
    pub snaps: BTreeMap<u32, crate::api::VmSnaps>,
    /// VMs whose guest ignores the ACPI power button (`api/power.rs`).
    pub acpi_ignored: BTreeSet<u32>,
    /// Volumes left behind by destroys, until freed with `DELETE .../content/{volume}`.
    pub loose: Vec<LooseVolume>,
    /// Volumes freed while a VM config still names them: (storage key, volume name).
    pub freed: BTreeSet<(String, String)>,
    /// Per node: tasks that ended but are still in the node's active list.
    pub unarchived: HashMap<String, Vec<String>>,
    pub task_order: Vec<String>,
    pub next_pid: u32,
    pub faults: FaultState,
    pub stats: Stats,
    pub rng: StdRng,
}

/// Context shared by the HTTP handlers, the tasks and the library face.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub costs: CostSpec,
    pub scale: f64,
    pub auth_delay: Duration,
    pub message_field: bool,
    pub version: String,
    pub ticket_lifetime: i64,
    pub flocks: Flocks,
    pub storage_locks: Arc<StorageLocks>,
    pub copy_pools: Mutex<HashMap<String, Arc<CopyPool>>>,
    pub clock_offset: AtomicI64,
    pub secret: [u8; 32],
    pub fingerprint: Option<String>,
    pub started: Instant,
    /// Per node: pvedaemon's API workers (absent when `workers_per_node` is 0).
    pub api_workers: HashMap<String, Arc<tokio::sync::Semaphore>>,
    /// Scaled: how long pveproxy waits for a protected call's answer.
    pub proxy_timeout: Duration,
    /// Scaled pvestatd interval; zero = no RRD lag (also in zero-cost mode).
    pub rrd_interval: Duration,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Shared {
    /// Scaled wall-clock duration of `nominal` simulated seconds.
    pub fn wall(&self, nominal: f64) -> Duration {
        Duration::from_secs_f64((nominal * self.scale).max(0.0))
    }

    /// Takes the cluster-wide `user.cfg` lock (pmxcfs `cfs_lock_file`, polled like a shared
    /// storage lock, 10 s wait) and spends one write's time holding it. On timeout the
    /// error is PVE's, prefixed with `errmsg` as `lock_user_config` does. No lock in
    /// zero-cost mode.
    pub async fn user_cfg_lock(&self, errmsg: &str) -> Result<Option<StorageLockGuard>, String> {
        if self.zero_cost() {
            return Ok(None);
        }
        let wait = self.wall(self.costs.user_cfg_lock_timeout_seconds);
        let timeout =
            || format!("{errmsg}: cfs-lock 'file-user_cfg' error: got lock request timeout");
        if self.state.lock().faults.user_cfg_lock_timeout() {
            tokio::time::sleep(wait).await;
            return Err(timeout());
        }
        let g = self
            .storage_locks
            .lock("file-user_cfg", true, wait, self.wall(0.1))
            .await
            .ok_or_else(timeout)?;
        tokio::time::sleep(self.wall(self.costs.user_cfg_write_seconds)).await;
        Ok(Some(g))
    }

    /// Whether `/cluster/resources` reads VM stats live instead of from the RRD samples.
    pub fn rrd_live(&self) -> bool {
        self.rrd_interval.is_zero()
    }

    /// Simulated seconds of a wall-clock duration (0 in zero-cost mode).
    pub fn sim_seconds(&self, wall: Duration) -> f64 {
        if self.scale > 0.0 {
            wall.as_secs_f64() / self.scale
        } else {
            0.0
        }
    }

    pub fn zero_cost(&self) -> bool {
        self.scale == 0.0
    }

    /// The ticket-validation clock: real time plus what tests advanced it by.
    pub fn ticket_clock(&self) -> i64 {
        unix_now() as i64 + self.clock_offset.load(Ordering::Relaxed)
    }

    pub fn copy_pool(&self, key: &str, mb_per_s: f64) -> Arc<CopyPool> {
        let bw = if self.scale > 0.0 {
            mb_per_s / self.scale
        } else {
            f64::INFINITY
        };
        self.copy_pools
            .lock()
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(CopyPool::new(bw)))
            .clone()
    }
}

impl State {
    /// One pvestatd round: every VM on an online node gets a fresh RRD sample.
    pub fn sample_rrd(&mut self, now: Instant) {
        let online: BTreeSet<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.is_online(now))
            .map(|(k, _)| k.clone())
            .collect();
        for vm in self.vms.values_mut() {
            if online.contains(&vm.node) {
                vm.rrd = Some(rrd_sample(vm, now));
            }
        }
    }

    /// What the node's `active_workers` bookkeeping does when a task starts or ends there:
    /// tasks that ended before (all but `except`) move from the active list to the index.
    /// `ended` (the task that just ended, if any) stays in the active list until then.
    pub fn archive_ended(&mut self, node: &str, ended: Option<&str>) {
        let list = std::mem::take(self.unarchived.entry(node.to_string()).or_default());
        for u in list {
            if let Some(t) = self.tasks.get_mut(&u) {
                t.saved = true;
            }
        }
        if let Some(u) = ended {
            self.unarchived
                .entry(node.to_string())
                .or_default()
                .push(u.to_string());
        }
    }

    pub fn privs(&self, who: &Identity, path: &str) -> BTreeSet<String> {
        let pool = path
            .strip_prefix("/vms/")
            .and_then(|v| v.parse::<u32>().ok())
            .and_then(|id| self.vms.get(&id))
            .and_then(|vm| vm.pool.as_deref());
        effective_privs(&self.acls, &self.roles, who, path, pool)
    }

    pub fn has(&self, who: &Identity, path: &str, privilege: &str) -> bool {
        self.privs(who, path).contains(privilege)
    }

    pub fn check(&self, who: &Identity, path: &str, privilege: &str) -> PveResult<()> {
        if self.has(who, path, privilege) {
            Ok(())
        } else {
            Err(PveError::perm(path, privilege))
        }
    }

    pub fn has_any(&self, who: &Identity, path: &str, privs: &[&str]) -> bool {
        let p = self.privs(who, path);
        privs.iter().any(|x| p.contains(*x))
    }

    /// Checks a proxied call's `{node}`: unknown → 500 hostname lookup; offline → 595.
    pub fn proxy_to(&self, node: &str, now: Instant) -> PveResult<()> {
        match self.nodes.get(node) {
            None => Err(PveError::internal(format!(
                "hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"
            ))),
            Some(n) if !n.is_online(now) => Err(PveError::proxy(595, "No route to host")),
            Some(_) => Ok(()),
        }
    }

    /// The VM on `node`, or the real "does not exist" error.
    pub fn vm_on(&self, node: &str, vmid: u32) -> PveResult<&Vm> {
        match self.vms.get(&vmid) {
            Some(vm) if vm.node == node => Ok(vm),
            _ => Err(PveError::internal(format!(
                "Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"
            ))),
        }
    }

    pub fn vm_on_mut(&mut self, node: &str, vmid: u32) -> PveResult<&mut Vm> {
        match self.vms.get_mut(&vmid) {
            Some(vm) if vm.node == node => Ok(vm),
            _ => Err(PveError::internal(format!(
                "Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' does not exist"
            ))),
        }
    }

    /// Storage usable on `node`.
    pub fn storage_on(&self, id: &str, node: &str) -> Option<&StorageSpec> {
        self.storages
            .get(id)
            .filter(|s| s.nodes.is_empty() || s.nodes.iter().any(|n| n == node))
    }

    /// Lock/stat key of a storage as seen from `node`.
    pub fn storage_key(&self, id: &str, node: &str) -> String {
        match self.storages.get(id) {
            Some(s) if s.shared => id.to_string(),
            _ => format!("{node}/{id}"),
        }
    }

    /// Bytes used on a storage (key as `storage_key`). Linked clones count 0 (copy on write).
    pub fn storage_used(&self, id: &str, node: &str) -> u64 {
        self.volumes(id, node)
            .iter()
            .filter(|v| !v.volname.contains('/'))
            .map(|v| v.size)
            .sum()
    }

    /// Every volume on storage `id` as seen from `node`: VM disks (of VMs on `node` for a
    /// local storage) and loose volumes, minus freed ones.
    pub fn volumes(&self, id: &str, node: &str) -> Vec<LooseVolume> {
        let key = self.storage_key(id, node);
        let mut out: Vec<LooseVolume> = self
            .vms
            .values()
            .filter(|vm| self.storage_key(id, &vm.node) == key)
            .flat_map(|vm| {
                vm.disks()
                    .into_iter()
                    .filter(|d| d.storage == id)
                    .map(|d| LooseVolume {
                        storage: d.storage,
                        node: vm.node.clone(),
                        volname: d.volname,
                        size: d.size,
                    })
            })
            .filter(|v| !self.freed.contains(&(key.clone(), v.volname.clone())))
            .collect();
        out.extend(
            self.loose
                .iter()
                .filter(|v| v.storage == id && self.storage_key(id, &v.node) == key)
                .cloned(),
        );
        out.sort_by(|a, b| a.volname.cmp(&b.volname));
        out.dedup_by(|a, b| a.volname == b.volname);
        out
    }

    pub fn node_mem_used(&self, node: &str) -> u64 {
        let n = &self.nodes[node];
        n.base_used
            + self
                .vms
                .values()
                .filter(|vm| vm.node == node && vm.running)
                .map(|vm| vm.memory_mib() << 20)
                .sum::<u64>()
    }

    pub fn node_cpu(&self, node: &str) -> f64 {
        let n = &self.nodes[node];
        let cores: u64 = self
            .vms
            .values()
            .filter(|vm| vm.node == node && vm.running)
            .map(Vm::cores)
            .sum();
        (0.01 + cores as f64 * 0.05 / n.cpus.max(1) as f64).min(1.0)
    }

    pub fn random_mac(&mut self) -> String {
        random_mac(&mut self.rng)
    }

    pub fn random_uuid(&mut self) -> String {
        random_uuid(&mut self.rng)
    }

    pub fn vm_info(&self, vmid: u32, vm: &Vm) -> VmInfo {
        let s = |k: &str| vm.config.get(k).and_then(|v| v.as_str()).map(String::from);
        VmInfo {
            vmid,
            node: vm.node.clone(),
            name: vm.name(),
            template: vm.is_template(),
            lock: vm.lock(),
            status: if vm.running { "running" } else { "stopped" }.into(),
            pool: vm.pool.clone(),
            description: s("description"),
            tags: s("tags"),
            config: vm.config.clone(),
        }
    }

    /// Whole-cluster state that a deploy/teardown changes (no tasks, no counters).
    pub fn snapshot(&self) -> Value {
        let vms: BTreeMap<String, VmInfo> = self
            .vms
            .iter()
            .map(|(id, vm)| (id.to_string(), self.vm_info(*id, vm)))
            .collect();
        let users: BTreeMap<&String, Value> = self
            .users
            .iter()
            .map(|(id, u)| {
                (
                    id,
                    json!({"enable": u.enable, "comment": u.comment, "email": u.email}),
                )
            })
            .collect();
        let pools: BTreeMap<&String, Value> = self
            .pools
            .iter()
            .map(|(id, p)| {
                (
                    id,
                    json!({"comment": p.comment, "vms": p.vms, "storage": p.storage}),
                )
            })
            .collect();
        let network: BTreeMap<&String, Value> = self
            .nodes
            .iter()
            .map(|(n, ns)| {
                (
                    n,
                    json!({"applied": ns.net_applied, "pending": ns.net_pending}),
                )
            })
            .collect();
        let mut acls = self.acls.clone();
        acls.sort();
        json!({
            "vms": vms,
            "users": users,
            "tokens": self.tokens.keys().collect::<Vec<_>>(),
            "acl": acls,
            "pools": pools,
            "network": network,
        })
    }
}

pub(crate) fn iface_obj(fields: &[(&str, Value)], active: bool) -> Iface {
    let mut m: Iface = fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    if active {
        m.insert("active".into(), json!(1));
    }
    m.entry("method6".into()).or_insert(json!("manual"));
    m.insert("families".into(), json!(["inet"]));
    m.insert("priority".into(), json!(1));
    m
}

pub(crate) fn random_mac(rng: &mut StdRng) -> String {
    let b: [u8; 3] = rng.random();
    format!("BC:24:11:{:02X}:{:02X}:{:02X}", b[0], b[1], b[2])
}

pub(crate) fn random_uuid(rng: &mut StdRng) -> String {
    let b: [u8; 16] = rng.random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Puts `mac` into a `netN` string: `virtio,bridge=vmbr0` → `virtio=MAC,bridge=vmbr0`; a
/// string that already carries a MAC is kept.
pub(crate) fn with_mac(net: &str, mac: &str) -> String {
    let mut parts: Vec<String> = net.split(',').map(String::from).collect();
    let models = [
        "virtio", "e1000", "e1000e", "vmxnet3", "rtl8139", "ne2k_pci", "pcnet", "i82551",
        "i82557b", "i82559er", "ne2k_isa",
    ];
    if let Some(first) = parts.first_mut()
        && models.contains(&first.as_str())
    {
        *first = format!("{first}={mac}");
    } else if !parts
        .iter()
        .any(|p| models.iter().any(|m| p.starts_with(&format!("{m}="))))
    {
        parts.insert(0, format!("virtio={mac}"));
    }
    parts.join(",")
}

/// Canonical `netN` form: model=MAC first, then the other keys alphabetically.
pub(crate) fn canonical_net(net: &str, fresh_mac: &str) -> Result<String, String> {
    let with = with_mac(net, fresh_mac);
    let mut model = None;
    let mut rest = Vec::new();
    for p in with.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        match k {
            "virtio" | "e1000" | "e1000e" | "vmxnet3" | "rtl8139" | "ne2k_pci" | "pcnet"
            | "i82551" | "i82557b" | "i82559er" | "ne2k_isa" => {
                model = Some(format!("{k}={}", v.to_uppercase()))
            }
            "macaddr" => model = Some(format!("virtio={}", v.to_uppercase())),
            "model" => {}
            "bridge" | "firewall" | "link_down" | "mtu" | "queues" | "rate" | "trunks" => {
                rest.push((k.to_string(), v.to_string()))
            }
            "tag" => {
                let t: u32 = v
                    .parse()
                    .map_err(|_| format!("invalid format - tag '{v}'"))?;
                if !(1..=4094).contains(&t) {
                    return Err(format!(
                        "invalid format - value must have a maximum value of 4094 (tag={v})"
                    ));
                }
                rest.push((k.to_string(), v.to_string()))
            }
            _ => {
                return Err(format!(
                    "invalid format - format error\n{k}: property is not defined in schema"
                ));
            }
        }
    }
    rest.sort();
    let mut out = vec![model.unwrap_or_else(|| format!("virtio={fresh_mac}"))];
    out.extend(rest.into_iter().map(|(k, v)| format!("{k}={v}")));
    Ok(out.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_strings_are_canonical() {
        assert_eq!(
            canonical_net(
                "virtio,bridge=vmbr0,tag=100,firewall=1",
                "BC:24:11:00:00:01"
            )
            .unwrap(),
            "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1,tag=100"
        );
        assert_eq!(
            canonical_net("bridge=vmbr1,virtio=bc:24:11:aa:bb:cc", "X").unwrap(),
            "virtio=BC:24:11:AA:BB:CC,bridge=vmbr1"
        );
        assert!(canonical_net("virtio,bridge=vmbr0,tag=5000", "X").is_err());
        assert_eq!(parse_size("8G"), 8 << 30);
        assert_eq!(format_size(4 << 20), "4M");
    }
}
