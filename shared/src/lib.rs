//! labfleet's shared library: everything the `producer` and the `worker` agree on.
//!
//! It owns the configuration model and its validation (`config`), secrets (`secret`), the
//! Proxmox VE client (`pve`), the Redis queue layer (`queue`), the job kinds with their
//! handlers (`jobs`) and the pure placement logic (`placement`) and its capacity figures (`capacity`) and the workers' heartbeats (`heartbeat`). It installs no tracing
//! subscriber and reads no process-wide state except where a function says so.

pub mod alloc;
pub mod audit;
pub mod capacity;
pub mod clusters;
pub mod config;
pub mod heartbeat;
pub mod jobs;
pub mod placement;
pub mod plan;
pub mod pve;
pub mod queue;
mod redact;
pub mod replan;
pub mod scheduler;
pub mod secret;
pub mod telemetry;

pub use redact::redact_url;
