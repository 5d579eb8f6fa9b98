//! Configuration: the three YAML files of a data folder, read and validated offline.
//!
//! `connections.yml` (named clusters), `deployment_config.yml` (machines and deployment-wide
//! keys) and `users.yml` (students) are parsed with serde-saphyr into the raw structs of
//! `raw`, then converted into the validated model of `model`, collecting every problem at
//! once as located [`Issue`]s. Reading configuration never calls Proxmox or Redis, and
//! never reads an environment variable or file that holds a secret: that happens in
//! [`resolve_secret`] when a connection is made. How the files are read is fixed by
//! `config-semantics` (see data/README.md).

mod api_caps;
mod classroom;
mod connections;
mod convert;
mod deployment;
mod ids;
mod issue;
mod model;
mod operating;
pub use operating::DEFAULT_NODE_LOST_AFTER;
mod parse;
mod raw;
mod read;
pub mod schedule;
mod users;

use std::path::{Path, PathBuf};

pub use api_caps::DEFAULT_API_PER_NODE;
pub use classroom::DEFAULT_STARTS_PER_NODE;
pub use connections::parse_fingerprint;
pub use ids::{DEFAULT_PVE_PORT, DnsLabel, HostPort, NodeName, UserId, VMID_MAX, VMID_MIN, VmId};
pub use issue::{ConfigError, Issue};
pub use model::{
    BridgeTarget, Caps, CloneMode, Connection, Connections, Credential, DEFAULT_BRIDGE_RANGE,
    DEFAULT_MAX_REQUESTS, DEFAULT_POOL_PATTERN, DEFAULT_ROLE, Deployment, DeviceType, Machine,
    NetSpec, SecretSource, TlsSetting, Users, VmidPolicy,
};
pub use operating::Operating;
pub use parse::{parse_deployment_name, slug_from_dir};
pub use read::MAX_FILE_BYTES;

use crate::secret::{Secret, SecretError, SecretKey, is_sealed, read_secret_file};
use read::Quoting;

/// Where the three files are.
#[derive(Debug, Clone)]
pub struct DataPaths {
    pub dir: PathBuf,
    pub connections: PathBuf,
    pub deployment: PathBuf,
    pub users: PathBuf,
}

impl DataPaths {
    pub fn in_dir(dir: impl Into<PathBuf>) -> DataPaths {
        let dir = dir.into();
        DataPaths {
            connections: dir.join("connections.yml"),
            deployment: dir.join("deployment_config.yml"),
            users: dir.join("users.yml"),
            dir,
        }
    }
}

/// A whole validated data folder, with the cluster it deploys to resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub paths: DataPaths,
    pub connections: Connections,
    pub deployment: Deployment,
    pub users: Users,
    /// The cluster this deployment goes to (a key of `connections.clusters`).
    pub cluster: String,
}

impl Config {
    pub fn connection(&self) -> &Connection {
        &self.connections.clusters[&self.cluster]
    }
}

/// Parses `connections.yml` text.
pub fn parse_connections(text: &str, file: &Path) -> Result<Connections, Vec<Issue>> {
    let raw: raw::RawConnections = read::parse_yaml(
        file,
        text,
        Quoting::SecretsInside,
        "a map of cluster names to connections",
    )
    .map_err(|i| vec![i])?;
    connections::connections_from_raw(raw, file)
}

/// Parses `deployment_config.yml` text; `default_name` names a deployment without `name:`.
pub fn parse_deployment(
    text: &str,
    file: &Path,
    default_name: &str,
) -> Result<Deployment, Vec<Issue>> {
    let raw: raw::RawDeployment = read::parse_yaml(
        file,
        text,
        Quoting::Allowed,
        "`machines:` and optional deployment keys",
    )
    .map_err(|i| vec![i])?;
    deployment::deployment_from_raw(raw, file, default_name)
}

/// Parses `users.yml` text.
pub fn parse_users(text: &str, file: &Path) -> Result<Users, Vec<Issue>> {
    let raw: raw::RawUsers = read::parse_yaml(
        file,
        text,
        Quoting::Allowed,
        "`users:` with a list of user@realm ids",
    )
    .map_err(|i| vec![i])?;
    users::users_from_raw(raw, file)
}

/// Reads and validates `connections.yml` alone (what a worker needs).
pub fn load_connections(path: &Path) -> Result<Connections, ConfigError> {
    let text = read::read_text(path).map_err(|i| ConfigError::new(vec![i]))?;
    parse_connections(&text, path).map_err(ConfigError::new)
}

/// Reads and validates all three files, reporting every problem found.
/// `cluster_override` is the `--cluster` flag.
pub fn load(paths: &DataPaths, cluster_override: Option<&str>) -> Result<Config, ConfigError> {
    let mut issues = Vec::new();
    let connections = read::read_text(&paths.connections)
        .map_err(|i| vec![i])
        .and_then(|t| parse_connections(&t, &paths.connections))
        .map_err(|e| issues.extend(e))
        .ok();
    let default_name = slug_from_dir(&paths.dir);
    let deployment = read::read_text(&paths.deployment)
        .map_err(|i| vec![i])
        .and_then(|t| parse_deployment(&t, &paths.deployment, &default_name))
        .map_err(|e| issues.extend(e))
        .ok();
    let users = read::read_text(&paths.users)
        .map_err(|i| vec![i])
        .and_then(|t| parse_users(&t, &paths.users))
        .map_err(|e| issues.extend(e))
        .ok();
    if let (Some(d), Some(u)) = (&deployment, &users) {
        issues.extend(deployment::cross_check(
            d,
            u,
            &paths.deployment,
            &paths.users,
        ));
    }
    let cluster = match (&connections, &deployment) {
        (Some(c), Some(d)) => match resolve_cluster(c, d, cluster_override, paths) {
            Ok(name) => Some(name),
            Err(i) => {
                issues.push(i);
                None
            }
        },
        _ => None,
    };
    if !issues.is_empty() {
        return Err(ConfigError::new(issues));
    }
    Ok(Config {
        paths: paths.clone(),
        connections: connections.expect("no issues"),
        deployment: deployment.expect("no issues"),
        users: users.expect("no issues"),
        cluster: cluster.expect("no issues"),
    })
}

fn resolve_cluster(
    c: &Connections,
    d: &Deployment,
    cli: Option<&str>,
    paths: &DataPaths,
) -> Result<String, Issue> {
    let names: Vec<&str> = c.clusters.keys().map(String::as_str).collect();
    let wanted = cli.map(str::to_owned).or_else(|| d.cluster.clone());
    match wanted {
        Some(w) if c.clusters.contains_key(&w) => Ok(w),
        Some(w) => {
            let mut i = Issue::new(
                &paths.deployment,
                1,
                1,
                format!(
                    "cluster {w:?} is not defined in {}",
                    paths.connections.display()
                ),
            );
            i.hint = Some(match issue::did_you_mean(&w, &names) {
                Some(s) => format!("did you mean {s:?}? defined clusters: {}", names.join(", ")),
                None => format!("defined clusters: {}", names.join(", ")),
            });
            Err(i)
        }
        None if names.len() == 1 => Ok(names[0].to_owned()),
        None => Err(Issue::new(
            &paths.deployment,
            1,
            1,
            format!(
                "{} clusters are defined and the deployment names none",
                names.len()
            ),
        )
        .with_hint(format!(
            "add `cluster: <name>` to deployment_config.yml or pass --cluster; defined: {}",
            names.join(", ")
        ))),
    }
}

/// The deployment and users files as a submit read them, kept with the epoch's plan so that
/// a worker can plan that epoch again (`jobs::replace`, when a node is lost) with the same
/// placement code as the producer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredFiles {
    pub deployment: String,
    pub users: String,
}

impl StoredFiles {
    /// Reads the two files of `cfg` again (as the submit that planned `cfg` saw them).
    pub fn read(cfg: &Config) -> Result<StoredFiles, ConfigError> {
        let deployment =
            read::read_text(&cfg.paths.deployment).map_err(|i| ConfigError::new(vec![i]))?;
        let users = read::read_text(&cfg.paths.users).map_err(|i| ConfigError::new(vec![i]))?;
        Ok(StoredFiles { deployment, users })
    }

    /// The configuration these files make with `connections` (a worker's own), for
    /// deployment `name` on `cluster`: validated as `producer validate` does.
    pub fn config(
        &self,
        connections: Connections,
        cluster: &str,
        name: &str,
    ) -> Result<Config, ConfigError> {
        let paths = DataPaths::in_dir(format!("(stored with deployment {name}@{cluster})"));
        let mut issues = Vec::new();
        let deployment = parse_deployment(&self.deployment, &paths.deployment, name)
            .map_err(|e| issues.extend(e))
            .ok();
        let users = parse_users(&self.users, &paths.users)
            .map_err(|e| issues.extend(e))
            .ok();
        if let (Some(d), Some(u)) = (&deployment, &users) {
            issues.extend(deployment::cross_check(
                d,
                u,
                &paths.deployment,
                &paths.users,
            ));
        }
        if !connections.clusters.contains_key(cluster) {
            issues.push(Issue::new(
                &paths.connections,
                1,
                1,
                format!("cluster {cluster:?} is not defined in this worker's connections.yml"),
            ));
        }
        if !issues.is_empty() {
            return Err(ConfigError::new(issues));
        }
        Ok(Config {
            paths,
            connections,
            deployment: deployment.expect("no issues"),
            users: users.expect("no issues"),
            cluster: cluster.to_owned(),
        })
    }
}

/// Reads a secret from its source. `enc:` values need `key` (from [`SecretKey::from_env`]).
pub fn resolve_secret(src: &SecretSource, key: Option<&SecretKey>) -> Result<Secret, SecretError> {
    let raw = match src {
        SecretSource::Inline(s) => s.clone(),
        SecretSource::Env(var) => {
            Secret::new(std::env::var(var).map_err(|_| SecretError::EnvMissing(var.clone()))?)
        }
        SecretSource::File(path) => {
            let text = read_secret_file(path)?;
            Secret::new(text.expose().trim_end_matches(['\n', '\r']).to_owned())
        }
    };
    if is_sealed(raw.expose()) {
        let key = match key {
            Some(k) => k.clone(),
            None => SecretKey::from_env()?,
        };
        key.open(raw.expose())
    } else {
        Ok(raw)
    }
}

#[cfg(test)]
mod tests;
