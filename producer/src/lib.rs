//! The producer: validates a lab description, plans it, submits its jobs to Redis, and lets
//! the admin watch, retry and tear down deployments. `main.rs` only calls [`main_with_args`].

pub mod cli;
pub mod cmd;
pub mod console;
pub mod deploy;
pub mod exit;
pub mod leaks;
pub mod operation;
pub mod output;
pub mod serve;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use shared::telemetry::{self, LogOptions};

use cli::{Cli, Command, Global};
use exit::{Exit, Failure};
use operation::OpKind;
use output::Out;
use shared::jobs::power::PowerAction;

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
        // The demo's workers run in this process; their one line per job would bury the
        // progress display, so the demo logs warnings only unless asked for more.
        verbosity: cli.global.verbose as i8
            - cli.global.quiet as i8
            - i8::from(
                matches!(cli.command, Some(Command::Demo { .. })) && cli.global.verbose == 0,
            ),
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

/// Runs one parsed command; without one, the interactive menu (in a terminal) or the usage.
pub fn run(cli: Cli, out: &mut Out) -> Result<Exit, Failure> {
    match &cli.command {
        Some(c) => run_command(&cli.global, c, out),
        None => cmd::interactive::run(&cli.global, out),
    }
}

/// Runs one command (also what the interactive menu calls for each action).
pub fn run_command(g: &Global, command: &Command, out: &mut Out) -> Result<Exit, Failure> {
    match command {
        Command::Validate => return cmd::validate::run(g, out),
        Command::Secret(s) => return cmd::secret::run(s, out),
        Command::Completions { shell } => return cmd::completions::run(*shell),
        _ => {}
    }
    let rt = tokio::runtime::Runtime::new().map_err(|e| Failure::new(Exit::Usage, e))?;
    rt.block_on(run_async(g, command, out))
}

async fn run_async(g: &Global, command: &Command, out: &mut Out) -> Result<Exit, Failure> {
    match command {
        Command::CheckConnection => cmd::check::run(g, out).await,
        Command::Plan => cmd::plan::run(g, out).await,
        Command::Submit { wait, prune } => cmd::submit::run(g, *wait, *prune, out).await,
        Command::Status {
            id,
            watch,
            vms,
            live,
        } => cmd::status::run(g, id, *watch, *vms, *live, out).await,
        Command::Start(a) => cmd::power::run(g, OpKind::Power(PowerAction::Start), a, out).await,
        Command::Stop(a) => cmd::power::run(g, OpKind::Power(PowerAction::Stop), a, out).await,
        Command::Shutdown(a) => {
            cmd::power::run(g, OpKind::Power(PowerAction::Shutdown), a, out).await
        }
        Command::Reset(a) => cmd::reset::run(g, a, out).await,
        Command::Schedule { id, skip, extend } => {
            cmd::schedule::run(g, id, skip.as_deref(), extend.as_deref(), out).await
        }
        Command::Retry { id } => cmd::retry::run(g, id, out).await,
        Command::Teardown { id, wait } => cmd::teardown::run(g, id, *wait, out).await,
        Command::List => cmd::list::run(g, out).await,
        Command::Handout { id } => cmd::handout::run(g, id, out).await,
        #[cfg(feature = "demo")]
        Command::Demo {
            time_scale,
            serve,
            listen,
        } => {
            let serve = serve.then_some(*listen);
            cmd::demo::run(g, *time_scale, serve, out).await
        }
        #[cfg(not(feature = "demo"))]
        Command::Demo { .. } => Err(Failure::new(
            Exit::Usage,
            anyhow::anyhow!(
                "this producer was built without the demo (cargo feature `demo`); build it with default features to run `producer demo`"
            ),
        )),
        Command::Serve(args) => cmd::serve::run(g, args, out).await,
        Command::Workers => cmd::workers::run(g, out).await,
        Command::Audit { fix, timeout } => cmd::audit::run(g, *fix, *timeout, out).await,
        Command::Validate | Command::Secret(_) | Command::Completions { .. } => {
            unreachable!("handled above")
        }
    }
}
