//! One module per subcommand.

pub mod audit;
pub mod check;
pub mod completions;
pub mod context;
#[cfg(feature = "demo")]
pub mod demo;
pub mod handout;
pub mod interactive;
pub mod list;
pub mod plan;
pub mod power;
pub mod progress;
pub mod reset;
pub mod retry;
pub mod schedule;
pub mod secret;
pub mod serve;
pub mod status;
pub mod submit;
pub mod teardown;
pub mod validate;
pub mod workers;
