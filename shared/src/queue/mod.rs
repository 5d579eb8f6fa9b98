//! The Redis job queue and its apalis glue. It owns every Redis key under `{<namespace>}:`,
//! the Lua scripts that change them, and the worker-side lease handling; it knows no job kinds
//! and nothing of Proxmox. See `KEYS.md` for the key layout and why it looks like this.
//!
//! - `store`: `Queue`, typed async calls (enqueue, claim, renew, ack, fail, release, fenced
//!   writes, reaper sweep, caps, cancel, dead-letter retry, stats). Producers use only this.
//! - `backend`: `LeaseBackend<Args>`, the apalis `Backend` that claims from a `Queue`.
//! - `layer`: `LeaseLayer`, renewal and settle-by-error-class inside each job's future.
//! - `lease`: `Lease`, the handler's extractor (token, attempt, `is_lost`, fenced writes).
//! - `error`: `JobError` (what handlers return), `QueueError`, `SettleError`.
//! - `target`: `RedisTarget`, a Redis URL parsed (one server, or a Sentinel master).
//! - `connection`: `RedisConn`, the shared connection that follows a Sentinel failover.
//!
//! Guarantees rest on Redis: with `appendonly yes` and `appendfsync everysec` a host crash can
//! lose the last second or two of writes (an ack or an enqueue), with `appendfsync always`
//! nothing; behind Redis Sentinel, a failover can lose what the old master had not yet
//! replicated. Handlers must therefore tolerate running a job again (converge, check "already
//! done?"), and producers re-enqueue by key, which is idempotent.

//! A worker is an apalis worker over `LeaseBackend`:
//! `WorkerBuilder::new(name).backend(LeaseBackend::<Args>::new(queue, WorkerOptions::new(8)))
//! .catch_panic().build(handler)`, where the handler is
//! `async fn(args: Args, lease: Lease, ...) -> Result<(), JobError>`; run it with
//! `run_until(shutdown)`. The backend claims, the `LeaseLayer` (added by apalis outside every
//! user layer) renews and settles; do not add apalis `retry`: retries belong to the queue.

mod backend;
mod config;
mod connection;
mod error;
mod keys;
mod layer;
mod lease;
#[allow(clippy::module_inception)] // `queue::queue` holds `Queue`, the type a reader looks for
mod queue;
mod scripts;
mod spec;
mod stats;
mod target;

pub use backend::{LeaseBackend, WorkerOptions};
pub use config::{QueueConfig, RetryPolicy};
pub use connection::{MasterInfo, RedisConn};
pub use error::{JobError, QueueError, SettleError};
pub use layer::{LeaseLayer, LeaseService};
pub use lease::Lease;
pub use queue::{
    AttemptRecord, Claim, ClaimedJob, FailOutcome, JobInfo, Queue, ReapReport, ReaperHandle,
    Settled, glob_prefix,
};
pub use scripts::FencedScript;
pub use spec::{Enqueued, JobSpec};
pub use stats::{GroupStats, QueueStats, SlotStats};
pub use target::{RedisTarget, SentinelTarget, TargetError};
