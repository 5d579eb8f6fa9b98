//! labfleet's benchmarks (issue 8), on the simulator with the pinned cost model of
//! `data/sim/cluster.yml`. Never tests: nothing here asserts a time.
//!
//! `cargo run --release -p bench -- <scenario> [flags]`, scenarios:
//! - `class`: 30 students x 3 machines, labfleet vs a sequential script vs a node-unaware
//!   parallel client (Ansible forks=5), each on a fresh simulator; makespans, lower bounds,
//!   lock-timeout and duplicate-VMID failures, and a PNG of concurrent clones per node.
//! - `scaling`: the same class with 1, 2, 4, 8 `worker` processes.
//! - `overhead`: the data/ example scaled to 2,000 VMs in zero-cost mode, VMs/s end to end.
//! - `scale`: 10,000 VMs loaded, planned and enqueued; `status` of them; peak RSS.
//! - `api`: Proxmox requests per VM by kind on the class, task polls per task.
//! - `dashboard`: server-side render time of `producer serve`'s page of a 10,000-VM class.
//!
//! Each scenario starts its own `redis-server` on a free port and the simulator in-process.

mod baseline;
mod dashboard;
mod lab;
mod plot;
mod scenarios;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bench", about = "labfleet benchmarks on the Proxmox simulator")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

/// Flags shared by the scenarios that deploy the class.
#[derive(Debug, Clone, clap::Args)]
pub struct ClassArgs {
    /// `linked` or `full` (bench/data/class-<variant>).
    #[arg(long, default_value = "linked")]
    pub clone: String,
    #[arg(long, default_value_t = 30)]
    pub students: usize,
    /// Simulated seconds per wall second (0.1 = ten times faster than Proxmox).
    #[arg(long, default_value_t = 0.1)]
    pub time_scale: f64,
    /// Override of `max_parallel_clones.per_node` (default: labfleet's).
    #[arg(long)]
    pub per_node: Option<u32>,
    #[arg(long)]
    pub linked_per_storage: Option<u32>,
    #[arg(long)]
    pub full_per_storage: Option<u32>,
    /// Keep labfleet's own timers (task polls, idle claim poll, retry backoffs) on the wall
    /// clock instead of the simulator's time scale (how the figures before 2026-12-02 were taken).
    #[arg(long)]
    pub wall_clocks: bool,
}

impl ClassArgs {
    /// `linked`, or e.g. `linked-pn16-ls8` when caps are overridden: names result files.
    pub fn tag(&self) -> String {
        let mut t = self.clone.clone();
        for (k, v) in [
            ("pn", self.per_node),
            ("ls", self.linked_per_storage),
            ("fs", self.full_per_storage),
        ] {
            if let Some(v) = v {
                t.push_str(&format!("-{k}{v}"));
            }
        }
        if self.wall_clocks {
            t.push_str("-wall");
        }
        t
    }

    pub fn spec(&self) -> lab::LabSpec {
        lab::LabSpec {
            class: format!("class-{}", self.clone),
            students: self.students,
            time_scale: self.time_scale,
            caps: lab::Caps {
                per_node: self.per_node,
                linked_per_storage: self.linked_per_storage,
                full_per_storage: self.full_per_storage,
                max_requests: None,
                memory_overcommit: None,
                node_lost_after: None,
            },
            scaled_clocks: !self.wall_clocks,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Item 1: class makespan, labfleet vs the two baselines, and the plot.
    Class {
        #[command(flatten)]
        class: ClassArgs,
        /// In-process labfleet workers (concurrency 16 each).
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Approaches to run, in this order.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "labfleet,naive,sequential"
        )]
        approaches: Vec<String>,
        /// Run the approaches at the same time, each on its own simulator (for long runs).
        #[arg(long)]
        concurrent: bool,
        /// Where the PNG goes (default bench/results/class-<variant>-clones.png).
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
    },
    /// Item 2: the class with 1, 2, 4, 8 `worker` processes.
    Scaling {
        #[command(flatten)]
        class: ClassArgs,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
        workers: Vec<usize>,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Item 3: data/ example x N students in zero-cost mode through worker processes.
    Overhead {
        #[arg(long, default_value_t = 1000)]
        students: usize,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// `max_requests` of the connection (HTTP requests in flight per process).
        #[arg(long)]
        max_requests: Option<u32>,
        /// Override of `max_parallel_clones.per_node` (default: labfleet's).
        #[arg(long)]
        per_node: Option<u32>,
        #[arg(long)]
        linked_per_storage: Option<u32>,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Item 4: 10,000 VMs validated, planned, enqueued; status; peak RSS.
    Scale {
        #[arg(long, default_value_t = 5000)]
        students: usize,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// The dashboard's deployment page for 10,000 VMs: server-side render time.
    Dashboard {
        #[arg(long, default_value_t = 5000)]
        students: usize,
        /// Renders per state (the first parses the plan).
        #[arg(long, default_value_t = 11)]
        renders: usize,
    },
    /// Item 5: Proxmox requests per VM by kind on the class.
    Api {
        #[command(flatten)]
        class: ClassArgs,
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    println!(
        "machine: {} cores, load {} at start",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        lab::loadavg()
    );
    match Cli::parse().scenario {
        Scenario::Class {
            class,
            workers,
            approaches,
            concurrent,
            plot,
        } => scenarios::class(&class, workers, &approaches, concurrent, plot).await,
        Scenario::Scaling {
            class,
            workers,
            concurrency,
        } => scenarios::scaling(&class, &workers, concurrency).await,
        Scenario::Overhead {
            students,
            workers,
            concurrency,
            max_requests,
            per_node,
            linked_per_storage,
            rounds,
        } => {
            let caps = lab::Caps {
                per_node,
                linked_per_storage,
                full_per_storage: None,
                max_requests,
                memory_overcommit: None,
                node_lost_after: None,
            };
            scenarios::overhead(students, workers, concurrency, caps, rounds).await
        }
        Scenario::Scale {
            students,
            workers,
            concurrency,
        } => scenarios::scale(students, workers, concurrency).await,
        Scenario::Api { class, workers } => scenarios::api(&class, workers).await,
        Scenario::Dashboard { students, renders } => dashboard::run(students, renders).await,
    }
}
