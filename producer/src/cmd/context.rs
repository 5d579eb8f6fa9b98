//! What the deployment commands share: loading the config, opening Redis.

use shared::config::{self, Config};
use shared::jobs::state::Store;
use shared::secret::SecretKey;

use crate::cli::Global;
use crate::cmd::validate;
use crate::deploy;
use crate::exit::{Exit, Failure};
use crate::output::Out;

pub fn load_config(g: &Global, out: &mut Out) -> Result<Config, Failure> {
    config::load(&g.data_paths(), g.cluster.as_deref()).map_err(|e| {
        validate::report(&e, g.json, out);
        Failure::new(
            Exit::InvalidConfig,
            anyhow::anyhow!("the configuration is invalid (see above)"),
        )
    })
}

pub async fn store(g: &Global) -> Result<Store, Failure> {
    Ok(Store::new(
        deploy::connect_queue(&g.redis, shared::jobs::queue_config()).await?,
    ))
}

/// The `enc:` key, if configured (a malformed one is an error, a missing one is not).
pub fn secret_key() -> Result<Option<SecretKey>, Failure> {
    match SecretKey::from_env() {
        Ok(k) => Ok(Some(k)),
        Err(shared::secret::SecretError::NoKey) => Ok(None),
        Err(e) => Err(Failure::new(Exit::InvalidConfig, e)),
    }
}

/// The deployment id named on the command line, or the data folder's.
pub fn resolve_id(g: &Global, id: &Option<String>, out: &mut Out) -> Result<String, Failure> {
    match id {
        Some(i) => Ok(i.clone()),
        None => Ok(shared::plan::deployment_id(&load_config(g, out)?)),
    }
}
