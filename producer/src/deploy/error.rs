//! What can go wrong in a deployment command, one variant per cause. The exit code of each is
//! decided in one place, [`DeployError::exit`] (`exit::exit_of` finds it in any error chain).

use shared::alloc::AllocError;
use shared::clusters::ConnectError;
use shared::jobs::state::Phase;
use shared::placement::PlacementError;
use shared::pve::PveError;
use shared::queue::QueueError;

use crate::exit::Exit;

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The first connection to Redis failed.
    #[error(
        "cannot reach Redis at {url}: {source}\nhint: start one (`redis-server --appendonly yes`) or set --redis / REDIS_URL"
    )]
    RedisUnreachable {
        url: String,
        #[source]
        source: QueueError,
    },
    /// Redis accepted the connection but does not answer.
    #[error("Redis at {url} does not answer: {source}")]
    RedisSilent {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    /// A read or write of the deployment's records failed.
    #[error(transparent)]
    Redis(#[from] QueueError),
    /// Reserving VMIDs or bridge names failed.
    #[error("reserving VMIDs and bridges: {0}")]
    Alloc(#[from] AllocError),
    /// A Proxmox call failed; `what` says what labfleet was doing.
    #[error("{what}: {source}")]
    Proxmox {
        what: &'static str,
        #[source]
        source: PveError,
    },
    /// The cluster's connection settings cannot be used (unknown cluster, unreadable secret).
    #[error(transparent)]
    Connect(ConnectError),
    #[error("placing students: {0}")]
    Placement(#[from] PlacementError),
    /// The class does not fit (a node over `memory_overcommit`, or a full storage).
    #[error(
        "the class does not fit on cluster {cluster}; nothing was submitted:\n  {}",
        refusals.join("\n  ")
    )]
    CapacityRefused {
        cluster: String,
        refusals: Vec<String>,
    },
    #[error(
        "VMID {vmid} (vmid_base/vmid_stride) is already reserved by another deployment; choose another vmid_base"
    )]
    VmidTaken { vmid: u32 },
    #[error(
        "labfleet will create @pve users and needs a secret key to hand their passwords to the workers: set LABFLEET_SECRET_KEY (`producer secret keygen`) for the producer and every worker"
    )]
    NoSecretKey,
    #[error("no deployment {id:?} (see `producer list`)")]
    NoDeployment { id: String },
    #[error("deployment {id:?} has no plan ({phase}): `producer submit` makes one")]
    NoPlan { id: String, phase: Phase },
    /// The record kept moving under a compare-and-set loop.
    #[error(
        "deployment {id} kept changing while {doing} (another producer or a teardown finishing); run it again"
    )]
    Contended { id: String, doing: &'static str },
    #[error("serializing the plan: {0}")]
    Encode(#[from] serde_json::Error),
}

impl From<shared::replan::ReplanError> for DeployError {
    fn from(e: shared::replan::ReplanError) -> DeployError {
        use shared::replan::ReplanError as R;
        match e {
            R::Placement(p) => DeployError::Placement(p),
            R::CapacityRefused { cluster, refusals } => {
                DeployError::CapacityRefused { cluster, refusals }
            }
            R::Alloc(a) => DeployError::Alloc(a),
            R::VmidTaken { vmid } => DeployError::VmidTaken { vmid },
        }
    }
}

impl DeployError {
    pub fn proxmox(what: &'static str, source: PveError) -> DeployError {
        DeployError::Proxmox { what, source }
    }

    /// The exit code this error ends the process with (the README's table).
    pub fn exit(&self) -> Exit {
        match self {
            DeployError::RedisUnreachable { .. }
            | DeployError::RedisSilent { .. }
            | DeployError::Redis(_)
            | DeployError::Contended { .. } => Exit::RedisUnreachable,
            DeployError::Alloc(AllocError::Queue(_) | AllocError::Contended) => {
                Exit::RedisUnreachable
            }
            DeployError::Alloc(AllocError::Exhausted { .. })
            | DeployError::Placement(_)
            | DeployError::VmidTaken { .. }
            | DeployError::NoSecretKey => Exit::InvalidConfig,
            DeployError::Proxmox { source, .. }
            | DeployError::Connect(ConnectError::Pve(source)) => pve_exit(source),
            DeployError::Connect(_) => Exit::InvalidConfig,
            DeployError::CapacityRefused { .. } => Exit::CapacityRefused,
            DeployError::NoDeployment { .. } | DeployError::NoPlan { .. } => Exit::Usage,
            DeployError::Encode(_) => Exit::Usage,
        }
    }
}

/// The exit code a Proxmox error calls for: refused credentials or rights, or unreachable.
pub fn pve_exit(e: &PveError) -> Exit {
    match e {
        PveError::Auth { .. } | PveError::Permission { .. } => Exit::AuthRefused,
        _ => Exit::ProxmoxUnreachable,
    }
}

impl From<ConnectError> for DeployError {
    fn from(e: ConnectError) -> DeployError {
        DeployError::Connect(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{Failure, exit_of};

    #[test]
    fn each_cause_has_its_exit_code_wherever_it_sits_in_the_chain() {
        let cases = [
            (DeployError::NoSecretKey, Exit::InvalidConfig),
            (DeployError::NoDeployment { id: "x".into() }, Exit::Usage),
            (
                DeployError::Contended {
                    id: "x".into(),
                    doing: "submitting",
                },
                Exit::RedisUnreachable,
            ),
            (
                DeployError::Alloc(AllocError::Exhausted { min: 1, max: 2 }),
                Exit::InvalidConfig,
            ),
            (
                DeployError::Connect(ConnectError::UnknownCluster("c".into())),
                Exit::InvalidConfig,
            ),
        ];
        for (e, want) in cases {
            assert_eq!(e.exit(), want, "{e}");
            let wrapped = anyhow::Error::new(e).context("while doing something");
            assert_eq!(exit_of(&wrapped), want);
            assert_eq!(Failure::from(wrapped).exit, want);
        }
        assert_eq!(exit_of(&anyhow::anyhow!("plain text")), Exit::Usage);
    }
}
