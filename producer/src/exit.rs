//! Exit codes, chosen from the error's variant (listed in `--help`).

use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    InvalidConfig = 1,
    Usage = 2,
    RedisUnreachable = 3,
    ProxmoxUnreachable = 4,
    AuthRefused = 5,
    DeploymentFailed = 6,
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
  6  deployment finished with failures (also: start, stop, shutdown, reset)";

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

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::new(Exit::Usage, e)
    }
}
