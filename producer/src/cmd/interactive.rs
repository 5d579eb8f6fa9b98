//! `producer` without a command: a menu of the everyday actions (check the connection,
//! validate, plan, submit, watch, retry, tear down) for people who prefer menus to flags,
//! as the original design's UI had. Each choice runs the same code as its subcommand, with
//! the same global flags. Prompts are drawn on stderr (dialoguer), results go to stdout.
//!
//! It never prompts when stdin or stderr is not a terminal (a script, a pipe, CI, cron):
//! then it prints the usage and exits 2, like any other usage error.

use std::io::IsTerminal;

use clap::CommandFactory;
use dialoguer::theme::ColorfulTheme;
use dialoguer::{Confirm, Input, Select};

use crate::cli::{Cli, Command, Global};
use crate::cmd::context;
use crate::exit::{Exit, Failure};
use crate::output::Out;

/// The menu, in the order shown.
const ACTIONS: [&str; 9] = [
    "Check the connection to the cluster",
    "Validate the data folder (offline)",
    "Plan: placement, VMIDs, bridges (changes nothing)",
    "Submit the deployment and watch it",
    "Watch a deployment",
    "Retry the failed parts of a deployment",
    "Tear down a deployment",
    "List deployments",
    "Quit",
];

pub fn run(g: &Global, out: &mut Out) -> Result<Exit, Failure> {
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        let mut cmd = Cli::command();
        out.err_line(format!(
            "error: no command given\n\n{}\nRun `producer --help` for the commands; started in a terminal, `producer` offers a menu.",
            cmd.render_usage()
        ));
        return Ok(Exit::Usage);
    }
    let theme = ColorfulTheme::default();
    out.err_line(format!(
        "labfleet producer: data folder {}, Redis {} (Esc or q quits)",
        g.data_dir.display(),
        shared::redact_url(&g.redis)
    ));
    loop {
        let Some(choice) = Select::with_theme(&theme)
            .with_prompt("What do you want to do?")
            .items(ACTIONS)
            .default(0)
            .interact_opt()
            .map_err(prompt_error)?
        else {
            return Ok(Exit::Ok);
        };
        let command = match choice {
            0 => Command::CheckConnection,
            1 => Command::Validate,
            2 => Command::Plan,
            3 => {
                let wait = confirm(&theme, "Wait and show progress until it is done?", true)?;
                Command::Submit { wait, prune: false }
            }
            4 => match pick_deployment(g, &theme, out)? {
                Some(id) => Command::Status {
                    id: Some(id),
                    watch: true,
                    vms: false,
                    live: false,
                },
                None => continue,
            },
            5 => match pick_deployment(g, &theme, out)? {
                Some(id) => Command::Retry { id: Some(id) },
                None => continue,
            },
            6 => {
                let Some(id) = pick_deployment(g, &theme, out)? else {
                    continue;
                };
                let sure = confirm(
                    &theme,
                    &format!("Destroy every VM, pool, user and bridge that {id} created?"),
                    false,
                )?;
                if !sure {
                    continue;
                }
                Command::Teardown {
                    id: Some(id),
                    wait: true,
                }
            }
            7 => Command::List,
            _ => return Ok(Exit::Ok),
        };
        match crate::run_command(g, &command, out) {
            Ok(Exit::Ok) => {}
            Ok(code) => out.err_line(format!("(finished with exit code {})", code as u8)),
            Err(f) => out.err_line(format!("error: {:#}", f.error)),
        }
        out.err_line("");
    }
}

fn confirm(theme: &ColorfulTheme, prompt: &str, default: bool) -> Result<bool, Failure> {
    Ok(Confirm::with_theme(theme)
        .with_prompt(prompt)
        .default(default)
        .interact_opt()
        .map_err(prompt_error)?
        .unwrap_or(false))
}

/// A deployment known to Redis, or one typed in (default: the data folder's); `None` when
/// the person backs out.
fn pick_deployment(
    g: &Global,
    theme: &ColorfulTheme,
    out: &mut Out,
) -> Result<Option<String>, Failure> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| Failure::new(Exit::Usage, e))?;
    let known = match rt.block_on(async {
        let store = context::store(g).await?;
        store
            .deployments()
            .await
            .map_err(|e| Failure::new(Exit::RedisUnreachable, e))
    }) {
        Ok(d) => d,
        Err(f) => {
            out.err_line(format!("error: {:#}", f.error));
            return Ok(None);
        }
    };
    let mut items: Vec<String> = known
        .iter()
        .map(|d| {
            format!(
                "{}  ({}, created {})",
                d.id,
                d.phase,
                d.created.format("%Y-%m-%d %H:%M")
            )
        })
        .collect();
    items.push("another id...".into());
    let Some(i) = Select::with_theme(theme)
        .with_prompt("Which deployment?")
        .items(&items)
        .default(0)
        .interact_opt()
        .map_err(prompt_error)?
    else {
        return Ok(None);
    };
    if let Some(d) = known.get(i) {
        return Ok(Some(d.id.clone()));
    }
    let mut input =
        Input::<String>::with_theme(theme).with_prompt("Deployment id (<name>@<cluster>)");
    if let Ok(cfg) = shared::config::load(&g.data_paths(), g.cluster.as_deref()) {
        input = input.default(shared::plan::deployment_id(&cfg));
    }
    let id = input.interact_text().map_err(prompt_error)?;
    Ok(Some(id.trim().to_owned()).filter(|s| !s.is_empty()))
}

fn prompt_error(e: dialoguer::Error) -> Failure {
    Failure::new(Exit::Usage, anyhow::anyhow!("prompt: {e}"))
}
