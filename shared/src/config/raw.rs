//! The three files as they are written: serde structs with `deny_unknown_fields` and a
//! `Spanned` location on every value that a later check may have to point at.
//!
//! Nothing here checks meaning; `model` converts these into the validated types. Keep the
//! structs flat: `Spanned` loses its location under `flatten` and inside untagged enums.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

/// `connections.yml`: cluster name -> connection.
pub type RawConnections = BTreeMap<String, Spanned<RawConnection>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnection {
    pub host: Spanned<String>,
    pub user: Spanned<String>,
    pub password: Option<Spanned<String>>,
    pub password_env: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    pub token_name: Option<Spanned<String>>,
    pub token_secret: Option<Spanned<String>>,
    pub token_secret_env: Option<Spanned<String>>,
    pub token_secret_file: Option<Spanned<String>>,
    pub fingerprint: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
    pub verify_tls: Option<Spanned<bool>>,
    pub max_parallel_clones: Option<Spanned<RawCaps>>,
    pub max_parallel_api: Option<Spanned<super::api_caps::RawApiCaps>>,
    pub max_requests: Option<Spanned<u32>>,
    pub memory_overcommit: Option<Spanned<f64>>,
    pub node_lost_after: Option<Spanned<String>>,
    pub max_parallel_starts: Option<Spanned<RawStartCaps>>,
}

/// `max_parallel_starts` in connections.yml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStartCaps {
    pub per_node: Option<Spanned<u32>>,
}

/// Concurrency caps for one cluster: `max_parallel_clones` in connections.yml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCaps {
    pub per_node: Option<Spanned<u32>>,
    pub full_per_storage: Option<Spanned<u32>>,
    pub linked_per_storage: Option<Spanned<u32>>,
}

/// `deployment_config.yml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployment {
    pub name: Option<Spanned<String>>,
    pub cluster: Option<Spanned<String>>,
    pub clone: Option<Spanned<String>>,
    pub storage: Option<Spanned<String>>,
    pub pool: Option<Spanned<String>>,
    pub role: Option<Spanned<String>>,
    pub start: Option<Spanned<bool>>,
    /// Snapshot each VM (`labfleet-baseline`) before its first start, for `producer reset`.
    pub baseline: Option<Spanned<bool>>,
    /// When the class runs, and when the deployment expires (`config::schedule`).
    pub schedule: Option<Spanned<super::schedule::RawSchedule>>,
    pub bridges: Option<BTreeMap<String, Spanned<RawBridgeTarget>>>,
    pub bridge_range: Option<Spanned<String>>,
    pub vmid_range: Option<Spanned<String>>,
    pub vmid_base: Option<Spanned<u32>>,
    pub vmid_stride: Option<Spanned<u32>>,
    pub vlan_base: Option<Spanned<u32>>,
    pub machines: Spanned<Vec<RawMachine>>,
}

/// The target of a `bridges:` alias: one bridge everywhere, or a bridge per node.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawBridgeTarget {
    Everywhere(String),
    PerNode(BTreeMap<String, String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMachine {
    pub device_type: Spanned<String>,
    pub name: Spanned<String>,
    pub template_node: Spanned<String>,
    pub template_vmid: Spanned<u32>,
    #[serde(default)]
    pub networks: Vec<RawNetwork>,
    pub clone: Option<Spanned<String>>,
    pub storage: Option<Spanned<String>>,
    pub replicas: Option<BTreeMap<String, Spanned<u32>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetwork {
    pub bridge: Spanned<String>,
}

/// `users.yml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsers {
    pub users: Spanned<Vec<Spanned<String>>>,
}
