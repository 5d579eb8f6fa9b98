//! `producer`: validates a lab description, plans it and drives its deployment through Redis.
//! The work is in the library (`producer::run`); this file only parses arguments and exits.

fn main() -> std::process::ExitCode {
    producer::main_with_args(std::env::args_os())
}
