//! pve-sim: a simulator of the Proxmox VE 9 HTTP API for labfleet's tests, demos and
//! benchmarks. It speaks real HTTPS with PVE's envelopes, status codes and reason phrases,
//! runs clone/config/power/destroy/network-apply as tasks with UPIDs, models config,
//! storage and `user.cfg` locks, API workers, the RRD lag and storage bandwidth on a
//! scalable clock, and injects faults (lost replies included).
//!
//! It shares no code with labfleet's Proxmox client on purpose: the client must not be
//! tested against its own idea of Proxmox. Facts come from `shared/pve-api.md`; known
//! differences from real PVE are listed in the crate README.
//!
//! Map: `cluster` (the YAML file), `state` (live state), `api/*` (HTTP handlers), `auth`,
//! `access` (privileges), `params` (parameter checking), `tasks` (UPIDs, runner), `locks`
//! (flocks, storage locks, bandwidth), `faults`, `stats`, `server` (TLS, library face), `cli`.

mod access;
mod api;
mod auth;
mod cli;
mod cluster;
mod error;
mod faults;
mod locks;
mod params;
mod seed;
mod server;
mod state;
mod stats;
mod tasks;

pub use access::AclEntry;
pub use cli::{Args, run};
pub use cluster::{
    AclSpec, ApiSpec, ClusterSpec, CostSpec, DiskSpec, NodeSpec, PoolSpec, SimConfig, StorageSpec,
    TlsMode, TokenSpec, UserSpec, VmSpec,
};
pub use error::PveError;
pub use faults::{Fault, FaultPlan, OfflineWindow, RequestFault, RequestFaults};
pub use server::{Sim, SimHandle};
pub use state::{PoolInfo, VmInfo};
