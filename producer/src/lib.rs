//! The producer: validates a lab description, plans it, submits its jobs to Redis, and lets
//! the admin watch, retry and tear down deployments. `main.rs` only calls [`main_with_args`].

pub mod cli;
pub mod cmd;
pub mod exit;
pub mod output;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use shared::telemetry::{self, LogOptions};

use cli::{Cli, Command};
use exit::{Exit, Failure};
use output::Out;

/// Parses `args`, sets up logging, runs the command and maps the outcome to an exit code.
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => Exit::Usage.into(),
            };
        }
    };
    let log = LogOptions {
        format: cli.global.log_format,
        verbosity: cli.global.verbose as i8 - cli.global.quiet as i8,
        file: cli.global.log_file.clone(),
        ..LogOptions::default()
    };
    if let Err(e) = telemetry::init(&log) {
        eprintln!("error: cannot open the log file: {e}");
        return Exit::Usage.into();
    }
    let mut out = Out;
    match run(cli, &mut out) {
        Ok(code) => code.into(),
        Err(f) => {
            out.err_line(format!("error: {:#}", f.error));
            f.exit.into()
        }
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli, out: &mut Out) -> Result<Exit, Failure> {
    match &cli.command {
        Command::Validate => cmd::validate::run(&cli.global, out),
        Command::Secret(s) => cmd::secret::run(s, out),
    }
}
