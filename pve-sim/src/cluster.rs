//! The cluster description file (`data/sim/cluster.yml`) and the simulator's start-up
//! configuration. This module only parses and checks the file; the live state built from it
//! is in `state.rs`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::faults::FaultPlan;

/// How the simulator serves HTTP.
#[derive(Clone, Debug)]
pub enum TlsMode {
    /// A certificate generated at start (SANs 127.0.0.1, ::1, localhost).
    SelfSigned,
    /// A certificate and key read from PEM files.
    Pem { cert: PathBuf, key: PathBuf },
    /// Plain HTTP (no TLS).
    Plain,
}

/// Everything `Sim::start` needs.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub cluster: ClusterSpec,
    pub listen: SocketAddr,
    /// Multiplies every simulated duration (tasks, copies, lock holds, lock timeouts, fault
    /// windows). 0 = zero-cost mode: tasks end at once and there is no lock model.
    pub time_scale: f64,
    pub faults: FaultPlan,
    pub seed: u64,
    pub tls: TlsMode,
}

impl SimConfig {
    /// Reads a cluster file: listen on 127.0.0.1:0, `time_scale` from the file (or 1.0),
    /// no faults, seed 0, a self-signed certificate.
    pub fn from_cluster_file(path: &Path) -> anyhow::Result<SimConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading cluster file {}", path.display()))?;
        Self::from_cluster_yaml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Same as `from_cluster_file` from YAML text.
    pub fn from_cluster_yaml(yaml: &str) -> anyhow::Result<SimConfig> {
        let cluster = ClusterSpec::from_yaml(yaml)?;
        Ok(SimConfig {
            time_scale: cluster.time_scale,
            cluster,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            faults: FaultPlan::default(),
            seed: 0,
            tls: TlsMode::SelfSigned,
        })
    }
}

/// The parsed cluster file. All fields are public so tests can tweak a parsed file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    #[serde(default = "default_cluster_name")]
    pub name: String,
    #[serde(default = "one")]
    pub time_scale: f64,
    #[serde(default)]
    pub api: ApiSpec,
    #[serde(default)]
    pub costs: CostSpec,
    pub nodes: Vec<NodeSpec>,
    pub storages: Vec<StorageSpec>,
    #[serde(default)]
    pub bridges: Vec<String>,
    #[serde(default)]
    pub vms: Vec<VmSpec>,
    #[serde(default)]
    pub users: Vec<UserSpec>,
    #[serde(default)]
    pub pools: Vec<PoolSpec>,
    #[serde(default)]
    pub acl: Vec<AclSpec>,
}

/// Knobs of the HTTP front end.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSpec {
    /// Delay before every 401 (real pveproxy: about 3 s). Not scaled by `time_scale`.
    pub auth_failure_delay_seconds: f64,
    /// Put `"message"` in error bodies (libpve-http-server >= 5.2.0). `false` emulates older
    /// servers where the text is only in the reason phrase.
    pub error_message_field: bool,
    /// Reported by `GET /version`.
    pub version: String,
    /// Lifetime of a ticket (7200 s on real PVE). Checked against the advanceable clock.
    pub ticket_lifetime_seconds: u64,
    /// pvedaemon worker processes per node (3 in `PVE/Service/pvedaemon.pm`). Protected
    /// calls (every non-GET except the login) run in one of them and queue for a free one.
    /// 0 = unlimited (no queue).
    pub workers_per_node: u32,
    /// pveproxy's wait for pvedaemon's answer (30 s, scaled): past it the caller gets
    /// `596 Connection timed out` while the call goes on.
    pub proxy_timeout_seconds: f64,
    /// pvestatd's update interval (10 s, scaled): the RRD-derived fields of
    /// `/cluster/resources` (name, status, uptime, cpu, mem, ...) are as of the last update.
    /// 0 = no lag.
    pub rrd_interval_seconds: f64,
}

impl Default for ApiSpec {
    fn default() -> Self {
        ApiSpec {
            auth_failure_delay_seconds: 3.0,
            error_message_field: true,
            version: "9.0.10".into(),
            ticket_lifetime_seconds: 7200,
            workers_per_node: 3,
            proxy_timeout_seconds: 30.0,
            rrd_interval_seconds: 10.0,
        }
    }
}

/// Cost model constants, in seconds of real Proxmox time (multiplied by `time_scale`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostSpec {
    /// Fixed work of a linked clone besides the storage-lock hold (config write, firewall copy).
    pub linked_clone_seconds: f64,
    /// Fixed work of a full clone besides allocation and copy.
    pub full_clone_overhead_seconds: f64,
    /// How long one disk allocation (lvcreate / rbd clone) holds the storage lock.
    pub storage_lock_hold_seconds: f64,
    /// How long a waiter waits for the storage lock before failing (10 s in PVE).
    pub storage_lock_timeout_seconds: f64,
    /// VM config flock timeout used by start/stop/destroy/config (10 s in PVE).
    pub vm_lock_timeout_seconds: f64,
    /// Flock timeout for both locks a clone takes (1 s in PVE).
    pub clone_lock_timeout_seconds: f64,
    pub start_seconds: f64,
    pub stop_seconds: f64,
    pub shutdown_seconds: f64,
    pub destroy_seconds: f64,
    pub config_seconds: f64,
    pub template_seconds: f64,
    /// A disk-only snapshot (`qmsnapshot`), its rollback (`qmrollback`) and its removal
    /// (`qmdelsnapshot`): thin-provisioned storages take about a second each.
    pub snapshot_seconds: f64,
    pub rollback_seconds: f64,
    pub snapshot_delete_seconds: f64,
    pub network_reload_seconds: f64,
    /// How long freeing one volume (`vdisk_free` in a destroy or `DELETE .../content`)
    /// holds the storage lock.
    pub volume_free_seconds: f64,
    /// How long one `user.cfg` write (user, token, ACL, pool, a clone's pool add) holds the
    /// cluster-wide `user.cfg` lock.
    pub user_cfg_write_seconds: f64,
    /// How long a waiter waits for the `user.cfg` lock before failing (10 s in PVE).
    pub user_cfg_lock_timeout_seconds: f64,
}

impl Default for CostSpec {
    fn default() -> Self {
        CostSpec {
            linked_clone_seconds: 1.5,
            full_clone_overhead_seconds: 1.5,
            storage_lock_hold_seconds: 1.0,
            storage_lock_timeout_seconds: 10.0,
            vm_lock_timeout_seconds: 10.0,
            clone_lock_timeout_seconds: 1.0,
            start_seconds: 3.0,
            stop_seconds: 2.0,
            shutdown_seconds: 5.0,
            destroy_seconds: 2.0,
            config_seconds: 0.5,
            template_seconds: 2.0,
            snapshot_seconds: 1.0,
            rollback_seconds: 1.5,
            snapshot_delete_seconds: 1.0,
            network_reload_seconds: 3.0,
            volume_free_seconds: 0.5,
            user_cfg_write_seconds: 0.05,
            user_cfg_lock_timeout_seconds: 10.0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    #[serde(default)]
    pub ip: Option<String>,
    pub cpus: u32,
    pub memory_gib: u64,
    /// Memory used by the host itself, before any VM runs.
    #[serde(default = "default_base_mem")]
    pub base_memory_used_gib: f64,
    #[serde(default = "default_rootfs")]
    pub rootfs_gib: u64,
    #[serde(default)]
    pub offline: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSpec {
    pub id: String,
    /// Plugin type: lvmthin, lvm, dir, zfspool, rbd, nfs, ...
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub shared: bool,
    #[serde(default = "default_content")]
    pub content: Vec<String>,
    /// Nodes where it is enabled (all when empty).
    #[serde(default)]
    pub nodes: Vec<String>,
    pub capacity_gib: u64,
    /// Sequential copy throughput, shared fairly among concurrent full clones.
    pub bandwidth_mb_per_s: f64,
}

impl StorageSpec {
    /// Whether `vdisk_clone` of a base volume works on this plugin (linked clones).
    pub fn supports_linked_clone(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "lvmthin" | "zfspool" | "rbd" | "dir" | "nfs" | "cifs"
        )
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub vmid: u32,
    pub node: String,
    pub name: String,
    #[serde(default)]
    pub template: bool,
    #[serde(default = "default_cores")]
    pub cores: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// `netN` values without MAC, e.g. `virtio,bridge=vmbr0`.
    #[serde(default)]
    pub nets: Vec<String>,
    #[serde(default)]
    pub ostype: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tags: Option<String>,
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub running: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Config key: scsi0, virtio0, sata0, ide0, efidisk0, tpmstate0.
    pub key: String,
    pub storage: String,
    pub size_gib: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub userid: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub tokens: Vec<TokenSpec>,
    #[serde(default)]
    pub comment: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    pub id: String,
    pub secret: String,
    #[serde(default = "yes")]
    pub privsep: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub poolid: String,
    #[serde(default)]
    pub comment: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclSpec {
    pub path: String,
    /// `user@realm` or `user@realm!token`.
    pub ugid: String,
    pub role: String,
    #[serde(default = "yes")]
    pub propagate: bool,
}

fn default_cluster_name() -> String {
    "lab".into()
}
fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_base_mem() -> f64 {
    2.0
}
fn default_rootfs() -> u64 {
    100
}
fn default_cores() -> u32 {
    1
}
fn default_memory() -> u64 {
    2048
}
fn default_content() -> Vec<String> {
    vec!["images".into(), "rootdir".into()]
}

impl ClusterSpec {
    /// Parses and checks a cluster description.
    pub fn from_yaml(yaml: &str) -> anyhow::Result<ClusterSpec> {
        let spec: ClusterSpec = serde_saphyr::from_str(yaml).context("parsing cluster YAML")?;
        spec.check()?;
        Ok(spec)
    }

    fn check(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        let nodes: BTreeSet<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        if nodes.is_empty() {
            problems.push("no nodes".to_string());
        }
        if nodes.len() != self.nodes.len() {
            problems.push("duplicate node names".into());
        }
        if !(self.time_scale >= 0.0 && self.time_scale.is_finite()) {
            problems.push(format!("time_scale {} must be >= 0", self.time_scale));
        }
        for s in &self.storages {
            for n in &s.nodes {
                if !nodes.contains(n.as_str()) {
                    problems.push(format!("storage {}: unknown node {n}", s.id));
                }
            }
            if s.bandwidth_mb_per_s <= 0.0 {
                problems.push(format!("storage {}: bandwidth must be > 0", s.id));
            }
        }
        let mut ids = BTreeSet::new();
        for vm in &self.vms {
            if !ids.insert(vm.vmid) {
                problems.push(format!("duplicate vmid {}", vm.vmid));
            }
            if !(100..=999_999_999).contains(&vm.vmid) {
                problems.push(format!("vmid {} out of range", vm.vmid));
            }
            if !nodes.contains(vm.node.as_str()) {
                problems.push(format!("vm {}: unknown node {}", vm.vmid, vm.node));
            }
            for d in &vm.disks {
                match self.storages.iter().find(|s| s.id == d.storage) {
                    None => problems.push(format!("vm {}: unknown storage {}", vm.vmid, d.storage)),
                    Some(s) if !s.nodes.is_empty() && !s.nodes.contains(&vm.node) => {
                        problems.push(format!(
                            "vm {}: storage {} not on node {}",
                            vm.vmid, d.storage, vm.node
                        ))
                    }
                    _ => {}
                }
            }
            if let Some(p) = &vm.pool
                && !self.pools.iter().any(|x| &x.poolid == p)
            {
                problems.push(format!("vm {}: unknown pool {p}", vm.vmid));
            }
        }
        for u in &self.users {
            if !u.userid.contains('@') {
                problems.push(format!("user {}: missing @realm", u.userid));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("invalid cluster file: {}", problems.join("; "))
        }
    }
}
