//! From `connections.yml` to live Proxmox clients: one [`PveClient`] per cluster per
//! process, created on first use and shared by every job (one login per process, not one
//! per job). Secrets are resolved here, at connect time, never during validation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{Connection, Connections, Credential, TlsSetting, resolve_secret};
use crate::pve::{
    ApiGate, Auth, ClientConfig, PveClient, PveError, TaskListShare, TlsPolicy, UnreachableHook,
};
use crate::secret::{SecretError, SecretKey};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cluster {0:?} is not defined in connections.yml")]
    UnknownCluster(String),
    #[error("cluster {cluster:?}: cannot read its secret: {source}")]
    Secret {
        cluster: String,
        #[source]
        source: SecretError,
    },
    #[error(transparent)]
    Pve(#[from] PveError),
}

/// Builds the client configuration of one connection, reading its secret.
pub fn client_config(
    conn: &Connection,
    key: Option<&SecretKey>,
) -> Result<ClientConfig, ConnectError> {
    let secret_err = |source| ConnectError::Secret {
        cluster: conn.name.clone(),
        source,
    };
    let auth = match &conn.credential {
        Credential::Password(src) => Auth::Password {
            user: conn.user.to_string(),
            password: resolve_secret(src, key).map_err(secret_err)?,
        },
        Credential::Token { name, secret } => Auth::Token {
            user: conn.user.to_string(),
            token_name: name.clone(),
            secret: resolve_secret(secret, key).map_err(secret_err)?,
        },
    };
    let mut cfg = ClientConfig::new(conn.name.clone(), conn.host.host.clone(), auth);
    cfg.port = conn.host.port;
    cfg.tls = match &conn.tls {
        TlsSetting::SystemRoots => TlsPolicy::SystemRoots,
        TlsSetting::CaFile(p) => TlsPolicy::CaFile(p.clone()),
        TlsSetting::Fingerprint(fp) => TlsPolicy::Fingerprint(*fp),
        TlsSetting::Insecure => TlsPolicy::Insecure,
    };
    cfg.max_concurrent_requests = conn.max_requests as usize;
    cfg.request_timeout = Duration::from_secs(30);
    cfg.read_retries = 2;
    Ok(cfg)
}

/// The clients of one process, by cluster name.
#[derive(Clone)]
pub struct Clusters {
    connections: Arc<Connections>,
    key: Option<SecretKey>,
    clients: Arc<Mutex<HashMap<String, PveClient>>>,
    /// Makes the API gate of a cluster's client from its name and `max_parallel_api`.
    gates: Option<Arc<GateMaker>>,
    /// Makes the hook a cluster's client tells of unanswered nodes (595), by cluster name.
    watches: Option<Arc<WatchMaker>>,
    /// Makes the share of a cluster's task listings with other processes, by cluster name.
    task_lists: Option<Arc<ShareMaker>>,
}

/// Makes a cluster's [`TaskListShare`] from its name.
pub type ShareMaker = dyn Fn(&str) -> Arc<dyn TaskListShare> + Send + Sync;

/// Makes a cluster's [`UnreachableHook`] from its name.
pub type WatchMaker = dyn Fn(&str) -> UnreachableHook + Send + Sync;

/// Makes a cluster's [`ApiGate`] from its name and its cap per node.
pub type GateMaker = dyn Fn(&str, u32) -> Arc<dyn ApiGate> + Send + Sync;

impl Clusters {
    pub fn new(connections: Connections, key: Option<SecretKey>) -> Clusters {
        Clusters {
            connections: Arc::new(connections),
            key,
            clients: Arc::default(),
            gates: None,
            watches: None,
            task_lists: None,
        }
    }

    /// Every client made from now on puts its protected calls behind the gate `make`
    /// returns for its cluster (the worker's: `jobs::api_slots`, counted in Redis).
    pub fn with_api_gates(mut self, make: Arc<GateMaker>) -> Clusters {
        self.gates = Some(make);
        self
    }

    /// Every client made from now on reports the nodes that do not answer (595) to the hook
    /// `make` returns for its cluster (the worker's: `jobs::node_loss::hook`).
    pub fn with_node_watch(mut self, make: Arc<WatchMaker>) -> Clusters {
        self.watches = Some(make);
        self
    }

    /// Every client made from now on shares its node task listings through what `make`
    /// returns for its cluster (the worker's: `jobs::task_lists`, in Redis).
    pub fn with_task_list_shares(mut self, make: Arc<ShareMaker>) -> Clusters {
        self.task_lists = Some(make);
        self
    }

    pub fn connections(&self) -> &Connections {
        &self.connections
    }

    pub fn secret_key(&self) -> Option<&SecretKey> {
        self.key.as_ref()
    }

    /// The client of `cluster`, created on first use.
    pub fn client(&self, cluster: &str) -> Result<PveClient, ConnectError> {
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(cluster) {
            return Ok(c.clone());
        }
        let conn = self
            .connections
            .clusters
            .get(cluster)
            .ok_or_else(|| ConnectError::UnknownCluster(cluster.to_owned()))?;
        let client = PveClient::new(client_config(conn, self.key.as_ref())?)?;
        if let Some(make) = &self.gates {
            client.set_api_gate(make(cluster, conn.api_per_node));
        }
        if let Some(make) = &self.watches {
            client.on_unreachable_node(make(cluster));
        }
        if let Some(make) = &self.task_lists {
            client.set_task_list_share(make(cluster));
        }
        map.insert(cluster.to_owned(), client.clone());
        Ok(client)
    }

    /// The clients created so far, by cluster name (for metrics: their request counters).
    pub fn clients(&self) -> Vec<(String, PveClient)> {
        let map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = map.iter().map(|(k, c)| (k.clone(), c.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Whether `cluster` authenticates as `root@pam` with a password ticket: the only
    /// identity Proxmox lets use `skiplock`.
    pub fn can_skiplock(&self, cluster: &str) -> bool {
        self.connections.clusters.get(cluster).is_some_and(|c| {
            matches!(c.credential, Credential::Password(_)) && c.user.to_string() == "root@pam"
        })
    }
}
