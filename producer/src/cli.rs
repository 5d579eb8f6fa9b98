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
        "  producer completions bash          # shell completions (bash, zsh, fish)\n",
        "  producer serve                     # the live web dashboard on http://127.0.0.1:8080\n",
        "  producer                           # in a terminal: an interactive menu of these\n",
        "\n",
    ),
    after_long_help = EXIT_CODES_HELP,
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    /// Without a command, in a terminal: the interactive menu.
    #[command(subcommand)]
    pub command: Option<Command>,
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

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Check the three files offline and print every problem found (exit 1 if any).
    #[command(
        after_help = "Examples:\n  producer validate\n  producer validate --data-dir labs/netlab --json"
    )]
    Validate,
    /// Log in to the cluster; print its version, nodes and templates.
    #[command(
        after_help = "Examples:\n  producer check-connection\n  producer check-connection --cluster lab --json"
    )]
    CheckConnection,
    /// Show placement, VMIDs and bridges before anything happens.
    #[command(
        after_help = "Examples:\n  producer plan\n  producer plan --json | jq '.vms[] | {name, node, vmid}'"
    )]
    Plan,
    /// Submit the deployment (again: converge, adding what is missing).
    #[command(
        after_help = "Accepted while the deployment is being torn down: its jobs wait for the teardown to finish\n(a reset of the lab: `teardown` then `submit` at once). Students no longer in users.yml keep\ntheir VMs (listed as not-in-files) unless --prune.\n\nExamples:\n  producer submit                    # enqueue and return; prints the deployment id\n  producer submit --wait             # progress, final table, handout (.md, .csv)\n  producer submit --wait --json      # one JSON document: status and handout paths\n  producer submit --prune --wait     # also remove the VMs, pools and bridges of dropped students"
    )]
    Submit {
        /// Wait until every VM is done or failed, then write the handout.
        #[arg(long)]
        wait: bool,
        /// Remove what students no longer in the files had (VMs, pools, bridges, and users
        /// no other deployment lists), with the same jobs and safety rules as a teardown.
        #[arg(long)]
        prune: bool,
    },
    /// Progress of a deployment (default: the data folder's).
    #[command(
        after_help = "Counts by state and per node, failed VMs with their Proxmox message, quarantined VMIDs.\nEvery VM is listed when there are at most 100 (or with --vms).\n\nExamples:\n  producer status\n  producer status demo-lab@lab --watch\n  producer status demo-lab@lab --vms --json | jq '.vms[] | select(.state != \"done\")'\n  producer status demo-lab@lab --json | jq .state"
    )]
    Status {
        /// Deployment id (`<name>@<cluster>`, see `producer list`); default: the data folder's.
        id: Option<String>,
        /// Refresh until the deployment finishes.
        #[arg(long)]
        watch: bool,
        /// List every VM, however many (reads every step record: slower on large classes).
        #[arg(long)]
        vms: bool,
        /// Ask Proxmox for each VM's power state now (students may power their own VMs)
        /// instead of showing the one labfleet last recorded.
        #[arg(long)]
        live: bool,
    },
    /// Start the deployment's VMs (or those selected), at most `max_parallel_starts.per_node` at once per node.
    #[command(
        after_help = "Each call is its own operation (its jobs carry a new operation id), so it runs again after\nan earlier start. Waits and shows progress unless --no-wait.\n\nExamples:\n  producer start demo-lab@lab\n  producer start demo-lab@lab --student student1 --vm student-pc\n  producer start demo-lab@lab --json | jq '.vms[] | {name, state}'"
    )]
    Start(OpArgs),
    /// Stop the selected VMs hard (like pulling the plug).
    #[command(
        after_help = "Examples:\n  producer stop demo-lab@lab\n  producer stop demo-lab@lab --student student2@pve"
    )]
    Stop(OpArgs),
    /// Shut the selected VMs down cleanly (ACPI); a guest still running after --timeout is stopped hard.
    #[command(
        after_help = "Examples:\n  producer shutdown demo-lab@lab\n  producer shutdown demo-lab@lab --timeout 30 --vm gw"
    )]
    Shutdown(OpArgs),
    /// Roll the selected VMs back to their baseline snapshot (deployments with `baseline: true`).
    #[command(
        after_help = "A running VM is stopped, rolled back and started again; a stopped one stays stopped. A VM\nwithout the baseline snapshot fails with its own message (exit 6).\n\nExamples:\n  producer reset demo-lab@lab --student student3\n  producer reset demo-lab@lab --vm student-pc --json"
    )]
    Reset(OpArgs),
    /// What is coming and what ran of the deployment's schedule (`schedule:` in the deployment file).
    #[command(
        after_help = "Examples:\n  producer schedule demo-lab@lab\n  producer schedule demo-lab@lab --skip next        # skip the next occurrence\n  producer schedule demo-lab@lab --extend 30m       # move the next shutdown (or the expiry) later\n  producer schedule demo-lab@lab --json | jq '.coming[0]'"
    )]
    Schedule {
        /// Deployment id; default: the data folder's.
        id: Option<String>,
        /// Skip an occurrence: `next`, or its id (`2026-12-07T08:00`, local start).
        #[arg(long, value_name = "NEXT")]
        skip: Option<String>,
        /// Move the next shutdown, or the expiry when it comes first, later by DURATION (`30m`, `1h`).
        #[arg(long, value_name = "DURATION")]
        extend: Option<String>,
    },
    /// Queue the failed parts of a deployment again.
    #[command(after_help = "Examples:\n  producer retry demo-lab@lab\n  producer retry --json")]
    Retry {
        /// Deployment id; default: the data folder's.
        id: Option<String>,
    },
    /// Destroy what a deployment created.
    #[command(
        after_help = "The teardown finishes by itself (a worker job checks the cluster and frees VMIDs and\nbridges last), whether anyone waits for it or not; run again, it resumes an unfinished one.\n\nExamples:\n  producer teardown demo-lab@lab          # start it and return\n  producer teardown demo-lab@lab --wait   # progress bar until all of it is gone"
    )]
    Teardown {
        /// Deployment id; default: the data folder's.
        id: Option<String>,
        /// Wait until everything is removed and verified against the cluster.
        #[arg(long)]
        wait: bool,
    },
    /// List deployments.
    #[command(after_help = "Examples:\n  producer list\n  producer list --json | jq -r '.[].id'")]
    List,
    /// Write the teacher's handout as Markdown and CSV (mode 0600), in the data folder.
    #[command(
        after_help = "Examples:\n  LABFLEET_SECRET_KEY=... producer handout demo-lab@lab\n      # writes data/handout-demo-lab_lab.md and data/handout-demo-lab_lab.csv\n  producer handout --json            # {\"id\": ..., \"handout\": {\"markdown\": ..., \"csv\": ...}}"
    )]
    Handout {
        /// Deployment id; default: the data folder's.
        id: Option<String>,
    },
    /// Run a full demo deployment against the embedded simulator (needs only Redis).
    #[command(
        after_help = "Examples:\n  producer demo\n  producer demo --time-scale 0.05 --redis redis://127.0.0.1:6380\n  producer demo --serve              # then keep it and its dashboard (http://127.0.0.1:8080) up until Ctrl-C"
    )]
    Demo {
        /// Simulated time scale (1.0 = real Proxmox durations).
        #[arg(long, default_value_t = 0.25)]
        time_scale: f64,
        /// Also serve the dashboard, and keep the deployment and the dashboard up until
        /// Ctrl-C (the demo's Redis namespace is removed then).
        #[arg(long)]
        serve: bool,
        /// Where the demo's dashboard listens (with --serve; loopback only, no tokens).
        #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
        listen: std::net::SocketAddr,
    },
    /// Serve the live web dashboard (reads Redis and the data folder; never talks to Proxmox).
    #[command(
        after_help = "Without tokens it listens on loopback only and every visitor is an admin; with tokens, a login\nsets an HttpOnly, SameSite=Strict cookie. A token file holds one line.\n\nEnvironment: LABFLEET_WEB_ADMIN_TOKEN, LABFLEET_WEB_VIEWER_TOKEN (instead of the files),\nLABFLEET_SECRET_KEY (only to serve handouts).\n\nExamples:\n  producer serve                                   # http://127.0.0.1:8080, local use\n  producer serve --listen 0.0.0.0:8080 --admin-token-file /etc/labfleet/web-admin --viewer-token-file /etc/labfleet/web-viewer\n  LABFLEET_SECRET_KEY=... producer serve --redis redis://queue.lab:6379"
    )]
    Serve(ServeArgs),
    /// List the workers whose heartbeat is fresh: name, host, version, start, last seen, jobs in flight.
    #[command(
        after_help = "Examples:\n  producer workers\n  producer workers --json | jq '.[] | {name, in_flight}'"
    )]
    Workers,
    /// Find what labfleet left on the cluster that no deployment in Redis owns; --fix removes it.
    #[command(
        after_help = "Lists every marked VM, pool, user, private bridge and ACL, every volume no VM config\nreferences, the quarantined VMIDs and the tombstones, with the live deployment that owns each.\nExit 8 when something nobody owns was found and not removed.\n\nExamples:\n  producer audit --cluster lab\n  producer audit --fix            # removes through the queue: needs a running worker\n  producer audit --json | jq '.found[] | select(.owner.by == \"nobody\")'"
    )]
    Audit {
        /// Remove what nobody owns (through the queue, with teardown's safety rules).
        #[arg(long)]
        fix: bool,
        /// With --fix: how long to wait for the workers to remove it, in seconds.
        #[arg(long, default_value_t = 300, value_name = "SECS")]
        timeout: u64,
    },
    /// Manage `enc:` secrets for connections.yml.
    #[command(
        subcommand,
        after_help = "Examples:\n  producer secret keygen > key && chmod 600 key\n  LABFLEET_SECRET_KEY=$(cat key) producer secret encrypt < pw.txt"
    )]
    Secret(SecretCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  producer completions bash > /etc/bash_completion.d/producer\n  producer completions zsh > \"${fpath[1]}/_producer\"\n  producer completions fish > ~/.config/fish/completions/producer.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The flags of an operation on a deployment's VMs (`start`, `stop`, `shutdown`, `reset`).
#[derive(Debug, Clone, Args)]
pub struct OpArgs {
    /// Deployment id; default: the data folder's.
    pub id: Option<String>,
    /// Only this student's VMs (as in users.yml, `student1@pve`, or the user part, `student1`); repeatable.
    #[arg(long, value_name = "USER")]
    pub student: Vec<String>,
    /// Only the VMs of this machine (its `name` in the deployment file); repeatable.
    #[arg(long, value_name = "NAME")]
    pub vm: Vec<String>,
    /// `shutdown`: seconds the guest gets before it is stopped hard (default 120).
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u32>,
    /// Return once the jobs are queued.
    #[arg(long)]
    pub no_wait: bool,
}

/// `producer serve`'s flags.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (IP:PORT). Off loopback an admin token is required.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// File holding the admin token (retry, teardown, handouts); or LABFLEET_WEB_ADMIN_TOKEN.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// File holding the viewer token (pages only); or LABFLEET_WEB_VIEWER_TOKEN.
    #[arg(long, value_name = "FILE")]
    pub viewer_token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SecretCommand {
    /// Print a new random key (base64); keep it in LABFLEET_SECRET_KEY or a key file.
    #[command(
        after_help = "Example:\n  producer secret keygen > /etc/labfleet/key && chmod 600 /etc/labfleet/key"
    )]
    Keygen,
    /// Read a secret from stdin and print it as an `enc:` value for connections.yml.
    #[command(
        after_help = "Example:\n  LABFLEET_SECRET_KEY_FILE=/etc/labfleet/key producer secret encrypt < pw.txt"
    )]
    Encrypt,
}
