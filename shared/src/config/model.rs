//! The validated configuration: the types every other part of labfleet takes.
//!
//! Built from the raw structs by the converters of `connections`, `users` and `deployment`,
//! which collect every problem they find as a located issue (ripgrep's LowArgs -> HiArgs).
//! Nothing downstream re-checks these values.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ids::{DnsLabel, HostPort, NodeName, UserId, VmId};
use crate::secret::Secret;

/// Every named cluster of `connections.yml`.
#[derive(Debug, Clone)]
pub struct Connections {
    pub clusters: BTreeMap<String, Connection>,
}

/// One cluster connection. Credentials stay as their source until used: an environment
/// variable or file is read only when a connection is made, so validation is offline.
#[derive(Debug, Clone)]
pub struct Connection {
    pub name: String,
    pub host: HostPort,
    pub user: UserId,
    pub credential: Credential,
    pub tls: TlsSetting,
    pub caps: Caps,
    /// VM starts at once on one node (`max_parallel_starts.per_node`, default 4).
    pub starts_per_node: u32,
    /// Most concurrent HTTP requests one process sends to this cluster.
    pub max_requests: u32,
    /// `memory_overcommit` (`config::operating`).
    pub operating: super::operating::Operating,
    /// Most concurrent protected calls all workers make to one node (`max_parallel_api`).
    pub api_per_node: u32,
}

#[derive(Debug, Clone)]
pub enum Credential {
    Password(SecretSource),
    /// An API token `user!name` with its secret.
    Token {
        name: String,
        secret: SecretSource,
    },
}

/// Where a secret comes from.
#[derive(Debug, Clone)]
pub enum SecretSource {
    /// Written in the YAML (plain, or `enc:`-encrypted: decrypted when used).
    Inline(Secret),
    Env(String),
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSetting {
    /// Verify against the system's root certificates (the default).
    SystemRoots,
    CaFile(PathBuf),
    /// Pin the SHA-256 fingerprint of the server's certificate.
    Fingerprint([u8; 32]),
    /// `verify_tls: false`, written explicitly; logged as a warning at every connect.
    Insecure,
}

/// Concurrency caps enforced across all workers through the queue's slot keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    /// Clone tasks running at once on one node (the source node of each clone). The default
    /// of 8 is Proxmox's own ceiling for its node bulk actions (`max_workers`, CPU threads
    /// minus one, clamped to 1..8); the storage caps below are what keeps storage locks from
    /// timing out.
    pub per_node: u32,
    /// Full clones writing to one storage at once.
    pub full_per_storage: u32,
    /// Linked clones allocating on one storage at once.
    pub linked_per_storage: u32,
}

impl Default for Caps {
    fn default() -> Caps {
        Caps {
            per_node: 8,
            full_per_storage: 2,
            linked_per_storage: 6,
        }
    }
}

pub const DEFAULT_MAX_REQUESTS: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneMode {
    Linked,
    Full,
}

/// What a machine is, and what that changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    /// NICs `virtio`.
    Linux,
    /// NICs `e1000`: Windows has no virtio driver until the guest tools are installed.
    Windows,
    /// NICs `virtio` with the Proxmox firewall off (`firewall=0`), since a router forwards
    /// traffic the host firewall would drop.
    Router,
}

impl DeviceType {
    pub const ALL: &'static [&'static str] = &["linux", "windows", "router"];

    pub fn parse(s: &str) -> Result<DeviceType, String> {
        match s {
            "linux" => Ok(DeviceType::Linux),
            "windows" => Ok(DeviceType::Windows),
            "router" => Ok(DeviceType::Router),
            _ => Err(format!(
                "device_type {s:?} is not one of {}",
                DeviceType::ALL.join(", ")
            )),
        }
    }

    pub fn nic_model(self) -> &'static str {
        match self {
            DeviceType::Linux | DeviceType::Router => "virtio",
            DeviceType::Windows => "e1000",
        }
    }

    /// The `firewall=` flag set on this device's NICs, if any.
    pub fn nic_firewall(self) -> Option<bool> {
        match self {
            DeviceType::Router => Some(false),
            _ => None,
        }
    }
}

/// How a deployment picks VMIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VmidPolicy {
    /// Allocated by labfleet (reserved in Redis, checked against the cluster) in `min..=max`.
    Range { min: u32, max: u32 },
    /// `base + student index * stride + machine index`.
    Fixed { base: u32, stride: u32 },
}

/// Where a `bridges:` alias goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BridgeTarget {
    Everywhere(String),
    PerNode(BTreeMap<NodeName, String>),
}

/// One NIC of a machine, in order (`net0`, `net1`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NetSpec {
    /// An existing bridge shared by everyone (`vmbr0`, `vmbr0.20`, `**lan**`).
    Existing { bridge: String, tag: Option<u16> },
    /// The student's private network `alias`: labfleet creates one bridge per student and
    /// alias on the student's node.
    Private { alias: String, tag: Option<u16> },
    /// An alias the `bridges:` map sends to an existing bridge; with `vlan_base` each student
    /// gets their own tag on it.
    Mapped {
        alias: String,
        target: BridgeTarget,
        tag: Option<u16>,
    },
}

impl NetSpec {
    /// The text written in the YAML, for messages and `plan`.
    pub fn describe(&self) -> String {
        match self {
            NetSpec::Existing { bridge, tag } | NetSpec::Private { alias: bridge, tag } => {
                match tag {
                    Some(t) => format!("{bridge}.{t}"),
                    None => bridge.clone(),
                }
            }
            NetSpec::Mapped { alias, tag, .. } => match tag {
                Some(t) => format!("{alias}.{t}"),
                None => alias.clone(),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub name: DnsLabel,
    pub device_type: DeviceType,
    pub template_node: NodeName,
    pub template_vmid: VmId,
    /// Copies of the template on other nodes (node -> VMID). Empty: found by name at plan time.
    pub replicas: BTreeMap<NodeName, VmId>,
    pub networks: Vec<NetSpec>,
    pub clone: CloneMode,
    /// Target storage for full clones.
    pub storage: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub name: String,
    /// Which connection; `None` = the only one (resolved by `Config`).
    pub cluster: Option<String>,
    pub pool_pattern: String,
    pub role: String,
    pub start: bool,
    /// Take a baseline snapshot before the first start (`baseline: true`).
    #[serde(default)]
    pub baseline: bool,
    /// `schedule:` (windows, start_before, warn_before, expires_at).
    #[serde(default)]
    pub schedule: Option<super::schedule::Schedule>,
    pub bridge_range: (u32, u32),
    pub vmids: VmidPolicy,
    pub vlan_base: Option<u16>,
    pub machines: Vec<Machine>,
}

pub const DEFAULT_POOL_PATTERN: &str = "{deployment}-{user}";
pub const DEFAULT_ROLE: &str = "PVEVMUser";
pub const DEFAULT_BRIDGE_RANGE: (u32, u32) = (1000, 4999);

impl Deployment {
    /// The VM name for `machine` and `user`: `<machine name>-<user part>`.
    pub fn vm_name(&self, machine: &Machine, user: &UserId) -> String {
        format!("{}-{}", machine.name, user.label_part())
    }

    /// The pool id for `user`.
    pub fn pool_name(&self, user: &UserId) -> String {
        self.pool_pattern
            .replace("{deployment}", &self.name)
            .replace("{user}", &user.label_part())
    }

    pub fn vm_count(&self, users: usize) -> usize {
        self.machines.len() * users
    }
}

/// The students, in file order (their index is their position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Users {
    pub users: Vec<UserId>,
}
