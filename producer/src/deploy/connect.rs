//! Opening Redis and the Proxmox client for a command.

use shared::clusters::client_config;
use shared::config::Config;
use shared::pve::PveClient;
use shared::queue::{Queue, QueueConfig};
use shared::secret::SecretKey;

use super::DeployError;

/// Opens the queue and proves the server answers.
pub async fn connect_queue(url: &str, cfg: QueueConfig) -> Result<Queue, DeployError> {
    let q = Queue::connect(url, cfg)
        .await
        .map_err(|source| DeployError::RedisUnreachable {
            url: shared::redact_url(url),
            source,
        })?;
    // Queue::connect may succeed lazily; prove the server answers.
    let mut c = q.connection();
    let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut c).await;
    pong.map_err(|source| DeployError::RedisSilent {
        url: shared::redact_url(url),
        source,
    })?;
    Ok(q)
}

/// A client for the configured cluster (no request is made yet).
pub fn connect_pve(cfg: &Config, key: Option<&SecretKey>) -> Result<PveClient, DeployError> {
    let cc = client_config(cfg.connection(), key)?;
    PveClient::new(cc).map_err(|e| DeployError::proxmox("connecting to Proxmox", e))
}
