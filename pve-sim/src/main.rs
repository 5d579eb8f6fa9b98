//! `pve-sim` binary: parse arguments, set up tracing, call `pve_sim::run`.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = pve_sim::Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(pve_sim::run(args))
}
