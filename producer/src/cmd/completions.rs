//! `producer completions SHELL`: a completion script for bash, zsh, fish, elvish or
//! PowerShell on stdout, generated from the same clap definition as `--help`.

use std::io::Write;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;
use crate::exit::{Exit, Failure};

pub fn run(shell: Shell) -> Result<Exit, Failure> {
    let mut cmd = Cli::command();
    // Generated into memory: clap_complete panics on a write error (`| head`), we do not.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "producer", &mut script);
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&script).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(Exit::Ok),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Exit::Ok),
        Err(e) => Err(Failure::new(Exit::Usage, e)),
    }
}
