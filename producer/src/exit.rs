//! Exit codes, chosen from the error's variant (listed in `--help`).

use std::process::ExitCode;

use shared::pve::PveError;
use shared::queue::QueueError;

use crate::deploy::DeployError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    InvalidConfig = 1,
    Usage = 2,
    RedisUnreachable = 3,
    ProxmoxUnreachable = 4,
    AuthRefused = 5,
    DeploymentFailed = 6,
    /// `submit` refused a class that does not fit (memory_overcommit or a full storage).
    CapacityRefused = 7,
    /// `audit` found objects nobody owns and did not remove them.
    AuditUnowned = 8,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok
  1  invalid configuration
  2  usage error
  3  Redis unreachable
  4  Proxmox unreachable or TLS failure
  5  authentication or permission refused
  6  deployment finished with failures (also: start, stop, shutdown, reset)
  7  capacity refused: the class does not fit (a node over memory_overcommit, or a full storage)
  8  audit found objects no deployment owns (run `producer audit --fix` to remove them)";

/// An error that carries the exit code it should end the process with.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn new(exit: Exit, error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            exit,
            error: error.into(),
        }
    }
}

/// Any error becomes a failure whose exit code its cause decides ([`exit_of`]).
impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        let error = e.into();
        Failure {
            exit: exit_of(&error),
            error,
        }
    }
}

/// The exit code of an error: that of the first typed cause in its chain that has one
/// (a [`DeployError`]'s variant, a Redis or Proxmox error), else a usage error.
pub fn exit_of(error: &anyhow::Error) -> Exit {
    for cause in error.chain() {
        if let Some(d) = cause.downcast_ref::<DeployError>() {
            return d.exit();
        }
        if cause.downcast_ref::<QueueError>().is_some() {
            return Exit::RedisUnreachable;
        }
        if let Some(p) = cause.downcast_ref::<PveError>() {
            return crate::deploy::pve_exit(p);
        }
    }
    Exit::Usage
}
