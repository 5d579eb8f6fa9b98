//! The Proxmox VE client: the only code in labfleet that speaks HTTP to Proxmox.
//!
//! It owns: connecting (TLS with system roots, a CA file, a pinned SHA-256 fingerprint, or
//! explicitly none), authentication (one shared ticket login per process with renewal, or an
//! API token), the per-connection bound on concurrent requests, typed calls that decode
//! Proxmox's number-or-string quirks, UPIDs and task waiting, and the [`PveError`]
//! classification callers decide retries on. It does not own: reading `connections.yml`
//! (the `config` module converts an entry into a [`ClientConfig`]), retry policy (callers
//! retry on [`PveError::is_transient`]), or any decision about what to deploy.
//!
//! Invariants: no secret (password, token secret, ticket, CSRF token) appears in `Debug`,
//! logs or error texts; requests are logged at debug level with method, path, status and
//! latency only. Message texts are interpreted in one place, [`error::classify_message`].
//! No reply is read past [`MAX_RESPONSE_BYTES`] and no text from one is kept past
//! [`MAX_MESSAGE_BYTES`] (`error::bound_message`), so a hostile server cannot fill memory,
//! Redis step records or logs. The client is tested against `pve-sim` over real HTTP(S),
//! never a mock, and against a hostile server started in the test.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shared::pve::PveError> {
//! use shared::pve::*;
//! let mut cfg = ClientConfig::new("lab", "pve1.example", Auth::Password {
//!     user: "root@pam".into(), password: "secret".into() });
//! cfg.tls = TlsPolicy::Fingerprint(parse_fingerprint("AB:CD:...").unwrap());
//! let pve = PveClient::new(cfg)?;
//! let upid = pve.clone_vm("pve1", 9000, &CloneParams { newid: 101, ..Default::default() }).await?;
//! pve.wait_task(&upid, &WaitOptions::default()).await?;
//! # Ok(()) }
//! ```

mod access;
mod body;
mod client;
mod cluster;
mod config;
pub mod error;
mod gate;
mod latency;
mod lenient;
mod migrate;
mod network;
mod snapshot;
mod storage;
mod task;
mod tls;
mod upid;
mod vm;
mod watch;

pub use access::{
    AclEntry, AclUpdate, PoolEntry, PoolInfo, PoolMember, PoolUpdate, RoleEntry, UserCreate,
    UserEntry, UserInfo, UserUpdate,
};
pub use client::{PveClient, RequestCounts, UnreachableHook};
pub use cluster::{
    ClusterResource, CpuInfo, MemoryInfo, NodeEntry, NodeResource, NodeStatus, ResourceType,
    StorageEntry, StorageResource, Version, VmResource,
};
pub use config::{
    Auth, ClientConfig, DEFAULT_PORT, FingerprintError, Scheme, TlsPolicy, format_fingerprint,
    parse_fingerprint,
};
pub use error::{
    ConnectFailure, ErrorClass, MAX_MESSAGE_BYTES, MAX_PARAM_ERRORS, MAX_RESPONSE_BYTES,
    MessageKind, ParamErrors, PveError,
};
pub use gate::{ApiGate, ApiPass};
pub use latency::{LATENCY_BUCKETS, LatencySnapshot};
pub use migrate::MigrateParams;
pub use network::{NetworkCreate, NetworkIface, NetworkList};
pub use reqwest::Method;
pub use snapshot::SnapshotEntry;
pub use storage::StorageVolume;
pub use task::{
    LOG_TAIL_LINES, TaskLogLine, TaskOutcome, TaskStatus, WaitOptions, parse_exitstatus,
};
pub use upid::{Upid, UpidParseError};
pub use vm::{
    CloneParams, ConfigUpdate, DestroyParams, NetDevice, NetDeviceParseError, ShutdownParams,
    VmConfig, VmListEntry, VmStatus,
};
pub use watch::{
    SharedListing, SharedTake, TaskList, TaskListEntry, TaskListShare, TaskQuery, TaskSource,
};
