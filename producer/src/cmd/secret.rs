//! `producer secret keygen|encrypt`: `enc:` values for connections.yml.

use std::io::Read;

use anyhow::Context;
use shared::secret::{Secret, SecretKey};

use crate::cli::SecretCommand;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub fn run(cmd: &SecretCommand, out: &mut Out) -> Result<Exit, Failure> {
    match cmd {
        SecretCommand::Keygen => {
            // The one place a key is printed: on purpose, to stdout, for the admin to store.
            out.line(SecretKey::generate().to_base64().expose());
            Ok(Exit::Ok)
        }
        SecretCommand::Encrypt => {
            let key = SecretKey::from_env().map_err(|e| Failure::new(Exit::Usage, e))?;
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .context("reading the secret from stdin")?;
            let secret = Secret::new(input.trim_end_matches(['\n', '\r']).to_owned());
            if secret.is_empty() {
                return Err(Failure::new(
                    Exit::Usage,
                    anyhow::anyhow!(
                        "no secret on stdin: pipe it in, e.g. `producer secret encrypt < pw.txt`"
                    ),
                ));
            }
            out.line(key.seal(&secret));
            Ok(Exit::Ok)
        }
    }
}
