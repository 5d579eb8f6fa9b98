//! One module per subcommand.

pub mod check;
pub mod common;
pub mod demo;
pub mod handout;
pub mod list;
pub mod plan;
pub mod retry;
pub mod secret;
pub mod status;
pub mod submit;
pub mod teardown;
pub mod validate;
