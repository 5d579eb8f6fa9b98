//! The command line: global flags shared by every subcommand, and the subcommands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use shared::telemetry::LogFormat;

use crate::exit::EXIT_CODES_HELP;

#[derive(Debug, Parser)]
#[command(
    name = "producer",
    version,
    about = "Deploy whole classes of lab VMs on a Proxmox VE cluster",
    long_about = "labfleet's producer validates a lab description (connections.yml, deployment_config.yml, users.yml), \
plans it, and submits one job per VM and step to Redis, where workers pick them up.",
    after_help = concat!(
        "Examples:\n",
        "  producer demo                      # full deployment on the embedded simulator\n",
        "  producer validate --data-dir data\n",
        "  producer plan && producer submit --wait\n",
        "  producer status demo-lab@lab --watch\n",
        "  producer teardown demo-lab@lab --wait\n",
        "  producer secret encrypt            # reads the secret from stdin, prints enc:...\n",
        "\n",
    ),
    after_long_help = EXIT_CODES_HELP,
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Folder holding connections.yml, deployment_config.yml and users.yml.
    #[arg(long, global = true, default_value = "data", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// connections.yml to use instead of DIR/connections.yml.
    #[arg(long, global = true, value_name = "FILE")]
    pub connections: Option<PathBuf>,
    /// deployment_config.yml to use instead of DIR/deployment_config.yml.
    #[arg(long, global = true, value_name = "FILE")]
    pub deployment: Option<PathBuf>,
    /// users.yml to use instead of DIR/users.yml.
    #[arg(long, global = true, value_name = "FILE")]
    pub users: Option<PathBuf>,
    /// Cluster (a name in connections.yml); default: the deployment's, or the only one.
    #[arg(long, global = true, value_name = "NAME")]
    pub cluster: Option<String>,
    /// Redis URL (redis://[:password@]host:port[/db], rediss:// for TLS).
    #[arg(
        long,
        global = true,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub redis: String,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log format on stderr or in the log file.
    #[arg(long, global = true, default_value = "text", value_name = "text|json")]
    pub log_format: LogFormat,
    /// Also write logs to this file (rotated at 10 MB, 5 files kept).
    #[arg(long, global = true, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// More log output (-v debug, -vv trace); RUST_LOG wins when set.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
}

impl Global {
    pub fn data_paths(&self) -> shared::config::DataPaths {
        let mut p = shared::config::DataPaths::in_dir(&self.data_dir);
        if let Some(c) = &self.connections {
            p.connections = c.clone();
        }
        if let Some(d) = &self.deployment {
            p.deployment = d.clone();
        }
        if let Some(u) = &self.users {
            p.users = u.clone();
        }
        p
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the three files offline and print every problem found (exit 1 if any).
    Validate,
    /// Log in to the cluster; print its version, nodes and templates.
    CheckConnection,
    /// Show placement, VMIDs and bridges before anything happens.
    Plan,
    /// Submit the deployment (again: converge, adding what is missing).
    Submit {
        /// Wait until every VM is done or failed, then write the handout.
        #[arg(long)]
        wait: bool,
    },
    /// Progress of a deployment (default: the data folder's).
    Status {
        id: Option<String>,
        /// Refresh until the deployment finishes.
        #[arg(long)]
        watch: bool,
    },
    /// Queue the failed parts of a deployment again.
    Retry { id: Option<String> },
    /// Destroy what a deployment created.
    Teardown {
        id: Option<String>,
        #[arg(long)]
        wait: bool,
    },
    /// List deployments.
    List,
    /// Write the teacher's handout (mode 0600).
    Handout { id: Option<String> },
    /// Run a full demo deployment against the embedded simulator (needs only Redis).
    Demo {
        /// Simulated time scale (1.0 = real Proxmox durations).
        #[arg(long, default_value_t = 0.25)]
        time_scale: f64,
    },
    /// Manage `enc:` secrets for connections.yml.
    #[command(subcommand)]
    Secret(SecretCommand),
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Print a new random key (base64); keep it in LABFLEET_SECRET_KEY or a key file.
    Keygen,
    /// Read a secret from stdin and print it as an `enc:` value for connections.yml.
    Encrypt,
}
