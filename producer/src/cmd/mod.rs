//! One module per subcommand.

pub mod secret;
pub mod validate;
