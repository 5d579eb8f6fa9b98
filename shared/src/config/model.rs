//! The validated configuration: what every other part of labfleet takes.
//!
//! Built from the raw structs by `TryFrom`-style conversions that collect every problem
//! they find (ripgrep's LowArgs -> HiArgs). Nothing downstream re-checks these values.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use super::ids::{DnsLabel, HostPort, NodeName, UserId, VMID_MAX, VMID_MIN, VmId, parse_vlan};
use super::issue::Issue;
use super::raw::{
    RawBridgeTarget, RawConnection, RawConnections, RawDeployment, RawMachine, RawUsers,
};
use crate::secret::Secret;

/// Every named cluster of `connections.yml`.
#[derive(Debug, Clone)]
pub struct Connections {
    pub clusters: BTreeMap<String, Connection>,
}

/// One cluster connection. Credentials stay as their source until used: an environment
/// variable or file is read only when a connection is made, so validation is offline.
#[derive(Debug, Clone)]
pub struct Connection {
    pub name: String,
    pub host: HostPort,
    pub user: UserId,
    pub credential: Credential,
    pub tls: TlsSetting,
    pub caps: Caps,
    /// Most concurrent HTTP requests one process sends to this cluster.
    pub max_requests: u32,
    /// Most concurrent protected calls all workers make to one node (`max_parallel_api`).
    pub api_per_node: u32,
}

#[derive(Debug, Clone)]
pub enum Credential {
    Password(SecretSource),
    /// An API token `user!name` with its secret.
    Token {
        name: String,
        secret: SecretSource,
    },
}

/// Where a secret comes from.
#[derive(Debug, Clone)]
pub enum SecretSource {
    /// Written in the YAML (plain, or `enc:`-encrypted: decrypted when used).
    Inline(Secret),
    Env(String),
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSetting {
    /// Verify against the system's root certificates (the default).
    SystemRoots,
    CaFile(PathBuf),
    /// Pin the SHA-256 fingerprint of the server's certificate.
    Fingerprint([u8; 32]),
    /// `verify_tls: false`, written explicitly; logged as a warning at every connect.
    Insecure,
}

/// Concurrency caps enforced across all workers through the queue's slot keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    /// Clone tasks running at once on one node (the source node of each clone). The default
    /// of 8 is Proxmox's own ceiling for its node bulk actions (`max_workers`, CPU threads
    /// minus one, clamped to 1..8); the storage caps below are what keeps storage locks from
    /// timing out.
    pub per_node: u32,
    /// Full clones writing to one storage at once.
    pub full_per_storage: u32,
    /// Linked clones allocating on one storage at once.
    pub linked_per_storage: u32,
}

impl Default for Caps {
    fn default() -> Caps {
        Caps {
            per_node: 8,
            full_per_storage: 2,
            linked_per_storage: 6,
        }
    }
}

pub const DEFAULT_MAX_REQUESTS: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneMode {
    Linked,
    Full,
}

/// What a machine is, and what that changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    /// NICs `virtio`.
    Linux,
    /// NICs `e1000`: Windows has no virtio driver until the guest tools are installed.
    Windows,
    /// NICs `virtio` with the Proxmox firewall off (`firewall=0`), since a router forwards
    /// traffic the host firewall would drop.
    Router,
}

impl DeviceType {
    pub const ALL: &'static [&'static str] = &["linux", "windows", "router"];

    pub fn parse(s: &str) -> Result<DeviceType, String> {
        match s {
            "linux" => Ok(DeviceType::Linux),
            "windows" => Ok(DeviceType::Windows),
            "router" => Ok(DeviceType::Router),
            _ => Err(format!(
                "device_type {s:?} is not one of {}",
                DeviceType::ALL.join(", ")
            )),
        }
    }

    pub fn nic_model(self) -> &'static str {
        match self {
            DeviceType::Linux | DeviceType::Router => "virtio",
            DeviceType::Windows => "e1000",
        }
    }

    /// The `firewall=` flag set on this device's NICs, if any.
    pub fn nic_firewall(self) -> Option<bool> {
        match self {
            DeviceType::Router => Some(false),
            _ => None,
        }
    }
}

/// How a deployment picks VMIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum VmidPolicy {
    /// Allocated by labfleet (reserved in Redis, checked against the cluster) in `min..=max`.
    Range { min: u32, max: u32 },
    /// `base + student index * stride + machine index`.
    Fixed { base: u32, stride: u32 },
}

/// Where a `bridges:` alias goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BridgeTarget {
    Everywhere(String),
    PerNode(BTreeMap<NodeName, String>),
}

/// One NIC of a machine, in order (`net0`, `net1`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NetSpec {
    /// An existing bridge shared by everyone (`vmbr0`, `vmbr0.20`, `**lan**`).
    Existing { bridge: String, tag: Option<u16> },
    /// The student's private network `alias`: labfleet creates one bridge per student and
    /// alias on the student's node.
    Private { alias: String, tag: Option<u16> },
    /// An alias the `bridges:` map sends to an existing bridge; with `vlan_base` each student
    /// gets their own tag on it.
    Mapped {
        alias: String,
        target: BridgeTarget,
        tag: Option<u16>,
    },
}

impl NetSpec {
    /// The text written in the YAML, for messages and `plan`.
    pub fn describe(&self) -> String {
        match self {
            NetSpec::Existing { bridge, tag } | NetSpec::Private { alias: bridge, tag } => {
                match tag {
                    Some(t) => format!("{bridge}.{t}"),
                    None => bridge.clone(),
                }
            }
            NetSpec::Mapped { alias, tag, .. } => match tag {
                Some(t) => format!("{alias}.{t}"),
                None => alias.clone(),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub name: DnsLabel,
    pub device_type: DeviceType,
    pub template_node: NodeName,
    pub template_vmid: VmId,
    /// Copies of the template on other nodes (node -> VMID). Empty: found by name at plan time.
    pub replicas: BTreeMap<NodeName, VmId>,
    pub networks: Vec<NetSpec>,
    pub clone: CloneMode,
    /// Target storage for full clones.
    pub storage: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub name: String,
    /// Which connection; `None` = the only one (resolved by `Config`).
    pub cluster: Option<String>,
    pub pool_pattern: String,
    pub role: String,
    pub start: bool,
    pub bridge_range: (u32, u32),
    pub vmids: VmidPolicy,
    pub vlan_base: Option<u16>,
    pub machines: Vec<Machine>,
}

pub const DEFAULT_POOL_PATTERN: &str = "{deployment}-{user}";
pub const DEFAULT_ROLE: &str = "PVEVMUser";
pub const DEFAULT_BRIDGE_RANGE: (u32, u32) = (1000, 4999);

impl Deployment {
    /// The VM name for `machine` and `user`: `<machine name>-<user part>`.
    pub fn vm_name(&self, machine: &Machine, user: &UserId) -> String {
        format!("{}-{}", machine.name, user.label_part())
    }

    /// The pool id for `user`.
    pub fn pool_name(&self, user: &UserId) -> String {
        self.pool_pattern
            .replace("{deployment}", &self.name)
            .replace("{user}", &user.label_part())
    }

    pub fn vm_count(&self, users: usize) -> usize {
        self.machines.len() * users
    }
}

/// The students, in file order (their index is their position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Users {
    pub users: Vec<UserId>,
}

// ---------------------------------------------------------------------------------------
// Conversion helpers

struct Ctx<'a> {
    file: &'a Path,
    issues: &'a mut Vec<Issue>,
}

impl Ctx<'_> {
    fn at<T>(&mut self, s: &Spanned<T>, msg: impl Into<String>) -> &mut Issue {
        self.issues.push(Issue::new(
            self.file,
            s.referenced.line(),
            s.referenced.column(),
            msg,
        ));
        self.issues.last_mut().expect("just pushed")
    }

    fn check<T, U>(
        &mut self,
        s: &Spanned<T>,
        hint: Option<&str>,
        f: impl FnOnce(&T) -> Result<U, String>,
    ) -> Option<U> {
        match f(&s.value) {
            Ok(v) => Some(v),
            Err(msg) => {
                let issue = self.at(s, msg);
                if let Some(h) = hint {
                    issue.hint = Some(h.to_owned());
                }
                None
            }
        }
    }
}

fn hint(issue: &mut Issue, h: impl Into<String>) {
    issue.hint = Some(h.into());
}

// ---------------------------------------------------------------------------------------
// connections.yml

pub fn connections_from_raw(raw: RawConnections, file: &Path) -> Result<Connections, Vec<Issue>> {
    let mut issues = Vec::new();
    let mut clusters = BTreeMap::new();
    if raw.is_empty() {
        issues.push(
            Issue::new(file, 1, 1, "no cluster defined")
                .with_hint("add an entry such as `lab: {host: \"127.0.0.1:8006\", user: \"root@pam\", password_env: PVE_PASSWORD}`"),
        );
    }
    for (name, conn) in raw {
        let mut cx = Ctx {
            file,
            issues: &mut issues,
        };
        let name_ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !name_ok {
            let i = cx.at(
                &conn,
                format!("cluster name {name:?} may use only letters, digits, '-', '_' and '.'"),
            );
            hint(i, "rename the cluster, e.g. `prod-cluster`");
        }
        if let Some(c) = connection_from_raw(&name, &conn.value, &mut cx, &conn) {
            clusters.insert(name, c);
        }
    }
    if issues.is_empty() {
        Ok(Connections { clusters })
    } else {
        Err(issues)
    }
}

fn connection_from_raw(
    name: &str,
    raw: &RawConnection,
    cx: &mut Ctx<'_>,
    whole: &Spanned<RawConnection>,
) -> Option<Connection> {
    let host = cx.check(
        &raw.host,
        Some("write name[:port], e.g. \"pve1.example.org:8006\" or \"[::1]:8006\""),
        |s| HostPort::parse(s),
    );
    let user = cx.check(
        &raw.user,
        Some("write the Proxmox user as user@realm, e.g. root@pam"),
        |s| UserId::parse(s),
    );

    let pw = [
        raw.password.as_ref().map(|s| ("password", s)),
        raw.password_env.as_ref().map(|s| ("password_env", s)),
        raw.password_file.as_ref().map(|s| ("password_file", s)),
    ];
    let tok = [
        raw.token_secret.as_ref().map(|s| ("token_secret", s)),
        raw.token_secret_env
            .as_ref()
            .map(|s| ("token_secret_env", s)),
        raw.token_secret_file
            .as_ref()
            .map(|s| ("token_secret_file", s)),
    ];
    let pw: Vec<_> = pw.into_iter().flatten().collect();
    let tok: Vec<_> = tok.into_iter().flatten().collect();
    let source = |(key, s): (&str, &Spanned<String>), cx: &mut Ctx<'_>| -> Option<SecretSource> {
        match key {
            "password" | "token_secret" => {
                if s.value.is_empty() {
                    let i = cx.at(s, format!("`{key}` is empty"));
                    hint(i, "write the secret, or use the `_env` / `_file` form");
                    return None;
                }
                Some(SecretSource::Inline(Secret::new(s.value.clone())))
            }
            k if k.ends_with("_env") => {
                let ok = !s.value.is_empty()
                    && s.value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !s.value.starts_with(|c: char| c.is_ascii_digit());
                if !ok {
                    // An environment variable's *name* is not a secret, but someone may have
                    // pasted the secret itself here by mistake: do not echo it.
                    let i = cx.at(
                        s,
                        format!(
                            "`{key}` must name an environment variable ([A-Za-z_][A-Za-z0-9_]*)"
                        ),
                    );
                    hint(
                        i,
                        "e.g. `PVE_PASSWORD`; put the secret itself in that variable",
                    );
                    return None;
                }
                Some(SecretSource::Env(s.value.clone()))
            }
            _ => Some(SecretSource::File(PathBuf::from(&s.value))),
        }
    };
    let credential = match (pw.len(), tok.len(), &raw.token_name) {
        (1, 0, None) => source(pw[0], cx).map(Credential::Password),
        (0, 1, Some(tn)) => {
            let name_ok = !tn.value.is_empty()
                && tn
                    .value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && tn.value.starts_with(|c: char| c.is_ascii_alphabetic());
            if !name_ok {
                let i = cx.at(tn, "`token_name` is the token id only, e.g. `labfleet` (letters, digits, '-', '_', '.')");
                hint(
                    i,
                    "the full token id is user!token_name; do not repeat the user here",
                );
                None
            } else {
                source(tok[0], cx).map(|secret| Credential::Token {
                    name: tn.value.clone(),
                    secret,
                })
            }
        }
        (0, 1, None) => {
            let i = cx.at(tok[0].1, "a token secret needs `token_name`");
            hint(
                i,
                "add `token_name: <token id>` (e.g. labfleet for root@pam!labfleet)",
            );
            None
        }
        (0, 0, Some(tn)) => {
            let i = cx.at(tn, "`token_name` has no secret");
            hint(
                i,
                "add one of token_secret, token_secret_env, token_secret_file",
            );
            None
        }
        (0, 0, None) => {
            let i = cx.at(whole, format!("cluster {name:?} has no credential"));
            hint(
                i,
                "add exactly one of password, password_env, password_file, or token_name with token_secret/_env/_file",
            );
            None
        }
        _ => {
            let keys: Vec<&str> = pw
                .iter()
                .chain(tok.iter())
                .map(|(k, _)| *k)
                .chain(raw.token_name.as_ref().map(|_| "token_name"))
                .collect();
            let at = pw.first().or(tok.first()).map(|(_, s)| *s);
            let msg = format!(
                "cluster {name:?} has more than one kind of credential: {}",
                keys.join(", ")
            );
            let i = match at {
                Some(s) => cx.at(s, msg),
                None => cx.at(whole, msg),
            };
            hint(
                i,
                "keep exactly one: a password (password, password_env or password_file) or an API token (token_name + one token_secret form)",
            );
            None
        }
    };

    let tls_keys = [
        raw.fingerprint.is_some(),
        raw.ca_file.is_some(),
        raw.verify_tls.as_ref().is_some_and(|v| !v.value),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    let tls = if tls_keys > 1 {
        let i = cx.at(
            whole,
            format!(
                "cluster {name:?} sets more than one of fingerprint, ca_file, verify_tls: false"
            ),
        );
        hint(
            i,
            "choose one way to trust the server: pin its fingerprint, trust a CA file, or (for a lab only) turn verification off",
        );
        None
    } else if let Some(fp) = &raw.fingerprint {
        cx.check(fp, Some("copy it from the node's Certificates panel or `pvenode cert info` (SHA-256, AB:CD:...)"), |s| {
            parse_fingerprint(s).map(TlsSetting::Fingerprint)
        })
    } else if let Some(ca) = &raw.ca_file {
        Some(TlsSetting::CaFile(PathBuf::from(&ca.value)))
    } else if raw.verify_tls.as_ref().is_some_and(|v| !v.value) {
        Some(TlsSetting::Insecure)
    } else {
        Some(TlsSetting::SystemRoots)
    };

    let mut caps = Caps::default();
    if let Some(c) = &raw.max_parallel_clones {
        for (field, slot) in [
            (&c.value.per_node, &mut caps.per_node),
            (&c.value.full_per_storage, &mut caps.full_per_storage),
            (&c.value.linked_per_storage, &mut caps.linked_per_storage),
        ] {
            if let Some(v) = field {
                if v.value == 0 || v.value > 256 {
                    let i = cx.at(v, format!("cap {} is out of range 1-256", v.value));
                    hint(
                        i,
                        "a cap of 0 would stop every clone; use a small positive number",
                    );
                } else {
                    *slot = v.value;
                }
            }
        }
    }
    let max_requests = match &raw.max_requests {
        Some(v) if v.value == 0 || v.value > 1024 => {
            let i = cx.at(
                v,
                format!("max_requests {} is out of range 1-1024", v.value),
            );
            hint(i, "the default is 16 concurrent requests per process");
            DEFAULT_MAX_REQUESTS
        }
        Some(v) => v.value,
        None => DEFAULT_MAX_REQUESTS,
    };

    let api_per_node =
        super::api_caps::per_node(raw.max_parallel_api.as_ref()).unwrap_or_else(|e| {
            let i = cx.at(e.at, e.message);
            hint(i, e.hint);
            super::api_caps::DEFAULT_API_PER_NODE
        });

    Some(Connection {
        name: name.to_owned(),
        host: host?,
        user: user?,
        credential: credential?,
        tls: tls?,
        caps,
        max_requests,
        api_per_node,
    })
}

/// Parses a SHA-256 fingerprint written as `AB:CD:...` (Proxmox's form) or as 64 hex digits.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    let bad = || {
        format!(
            "fingerprint must be a SHA-256 fingerprint: 32 bytes as hex pairs separated by ':' ({} characters given)",
            s.len()
        )
    };
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    if s.contains(':') && s.split(':').any(|p| p.len() != 2) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// users.yml

pub fn users_from_raw(raw: RawUsers, file: &Path) -> Result<Users, Vec<Issue>> {
    let mut issues = Vec::new();
    let mut cx = Ctx {
        file,
        issues: &mut issues,
    };
    if raw.users.value.is_empty() {
        let i = cx.at(
            &raw.users,
            "`users` is empty: a deployment needs at least one student",
        );
        hint(i, "list the students' Proxmox ids, e.g. - \"student1@pve\"");
    }
    let mut seen: BTreeMap<UserId, u64> = BTreeMap::new();
    let mut labels: BTreeMap<String, (String, u64)> = BTreeMap::new();
    let mut users = Vec::new();
    for u in &raw.users.value {
        let Some(id) = cx.check(
            u,
            Some("write each student as user@realm, e.g. \"student1@pve\""),
            |s| UserId::parse(s),
        ) else {
            continue;
        };
        if let Some(first) = seen.get(&id) {
            let i = cx.at(
                u,
                format!("user {id} is listed twice (first on line {first})"),
            );
            hint(i, "remove the duplicate line");
            continue;
        }
        let label = id.label_part();
        if label.is_empty() {
            let i = cx.at(
                u,
                format!("user {id} has no letter or digit to name its VMs after"),
            );
            hint(i, "use a user part with at least one letter or digit");
            continue;
        }
        if let Some((other, line)) = labels.get(&label) {
            let i = cx.at(u, format!("users {other} (line {line}) and {id} would give their VMs and pools the same name (`{label}`)"));
            hint(
                i,
                "VM names use the user part only; rename one of the users",
            );
            continue;
        }
        seen.insert(id.clone(), u.referenced.line());
        labels.insert(label, (id.to_string(), u.referenced.line()));
        users.push(id);
    }
    if issues.is_empty() {
        Ok(Users { users })
    } else {
        Err(issues)
    }
}

// ---------------------------------------------------------------------------------------
// deployment_config.yml

fn parse_clone(s: &str) -> Result<CloneMode, String> {
    match s {
        "linked" => Ok(CloneMode::Linked),
        "full" => Ok(CloneMode::Full),
        _ => Err(format!("clone {s:?} is not `linked` or `full`")),
    }
}

fn parse_storage_id(s: &str) -> Result<String, String> {
    let ok = s.len() >= 2
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("storage id {s:?} is not valid (e.g. local-lvm)"))
    }
}

/// `lo-hi` with a prefix (`vmbr1000-vmbr4999`) or plain numbers (`100-999999`).
fn parse_range(s: &str, prefix: &str) -> Result<(u32, u32), String> {
    let bad = || format!("range {s:?} is not of the form {p}LOW-{p}HIGH", p = prefix);
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u32 = a
        .trim()
        .strip_prefix(prefix)
        .unwrap_or(a.trim())
        .parse()
        .map_err(|_| bad())?;
    let b: u32 = b
        .trim()
        .strip_prefix(prefix)
        .unwrap_or(b.trim())
        .parse()
        .map_err(|_| bad())?;
    if a > b {
        return Err(format!(
            "range {s:?} is empty: its low end is above its high end"
        ));
    }
    Ok((a, b))
}

fn is_bridge_name(s: &str) -> bool {
    s.strip_prefix("vmbr")
        .is_some_and(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|c| c.is_ascii_digit()))
}

fn is_iface_name(s: &str) -> bool {
    // Proxmox: ^[a-z][a-z0-9_]{1,20}([:.]\d+)?$, case-insensitive.
    let mut c = s.chars();
    c.next().is_some_and(|c| c.is_ascii_alphabetic())
        && (2..=21).contains(&s.len())
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_alias(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.len() <= 32
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_net(s: &str, bridges: &BTreeMap<String, BridgeTarget>) -> Result<NetSpec, String> {
    if let Some(inner) = s.strip_prefix("**").and_then(|r| r.strip_suffix("**")) {
        if !is_iface_name(inner) {
            return Err(format!(
                "bridge {s:?}: {inner:?} is not a valid interface name"
            ));
        }
        return Ok(NetSpec::Existing {
            bridge: inner.to_owned(),
            tag: None,
        });
    }
    let (base, tag) = match s.split_once('.') {
        Some((b, t)) => (b, Some(parse_vlan(t, s)?)),
        None => (s, None),
    };
    if base.is_empty() {
        return Err(format!("bridge {s:?} has no name before the VLAN tag"));
    }
    if is_bridge_name(base) {
        return Ok(NetSpec::Existing {
            bridge: base.to_owned(),
            tag,
        });
    }
    if !is_alias(base) {
        return Err(format!(
            "bridge {s:?} is neither an existing bridge (vmbrN[.VLAN], **name**) nor a network alias (a name like hq or hq.100)"
        ));
    }
    if let Some(target) = bridges.get(base) {
        return Ok(NetSpec::Mapped {
            alias: base.to_owned(),
            target: target.clone(),
            tag,
        });
    }
    Ok(NetSpec::Private {
        alias: base.to_owned(),
        tag,
    })
}

/// A deployment name: a letter-led slug (lowercase letters, digits, `-`), at most 40 chars.
pub fn parse_deployment_name(s: &str) -> Result<String, String> {
    let ok = s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.len() <= 40
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "deployment name {s:?} must start with a lowercase letter and use only a-z, 0-9 and '-' (at most 40 characters)"
        ))
    }
}

/// The default deployment name: a letter-led slug of the data folder's name.
pub fn slug_from_dir(dir: &Path) -> String {
    let base = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
        .or_else(|| dir.file_name().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let mut slug = String::new();
    for c in base.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            slug.push(c);
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    let mut slug = slug.trim_matches('-').to_owned();
    if !slug.starts_with(|c: char| c.is_ascii_lowercase()) {
        slug = format!("lab-{slug}");
    }
    slug.truncate(40);
    slug.trim_end_matches('-').to_owned()
}

pub fn deployment_from_raw(
    raw: RawDeployment,
    file: &Path,
    default_name: &str,
) -> Result<Deployment, Vec<Issue>> {
    let mut issues = Vec::new();
    let mut cx = Ctx {
        file,
        issues: &mut issues,
    };
    let name = match &raw.name {
        Some(n) => cx.check(n, Some("e.g. `name: netlab-2026`"), |s| {
            parse_deployment_name(s)
        }),
        None => Some(default_name.to_owned()),
    };
    let cluster = raw.cluster.as_ref().map(|c| c.value.clone());
    let default_clone = raw
        .clone
        .as_ref()
        .and_then(|c| {
            cx.check(c, Some("write `clone: linked` or `clone: full`"), |s| {
                parse_clone(s)
            })
        })
        .unwrap_or(CloneMode::Linked);
    let default_storage = raw
        .storage
        .as_ref()
        .and_then(|s| cx.check(s, None, |s| parse_storage_id(s)));
    let pool_pattern = match &raw.pool {
        Some(p) => cx.check(p, Some("e.g. `pool: \"{deployment}-{user}\"`; placeholders {deployment} and {user}"), |s| {
            if !s.contains("{user}") {
                return Err(format!("pool pattern {s:?} lacks {{user}}: every student needs a pool of their own"));
            }
            let sample = s.replace("{deployment}", "d").replace("{user}", "u");
            if !sample.starts_with(|c: char| c.is_ascii_alphabetic())
                || !sample.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(format!("pool pattern {s:?} does not give a valid pool id (letter first, then letters, digits, '-', '_', '.')"));
            }
            Ok(s.clone())
        }),
        None => Some(DEFAULT_POOL_PATTERN.to_owned()),
    };
    let role = match &raw.role {
        Some(r) => cx.check(
            r,
            Some("a Proxmox role id such as PVEVMUser or PVEVMAdmin"),
            |s| {
                if !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    Ok(s.clone())
                } else {
                    Err(format!("role {s:?} is not a valid role id"))
                }
            },
        ),
        None => Some(DEFAULT_ROLE.to_owned()),
    };
    let start = raw.start.as_ref().is_some_and(|s| s.value);
    let bridge_range = match &raw.bridge_range {
        Some(r) => cx.check(r, Some("e.g. `bridge_range: vmbr1000-vmbr4999`"), |s| {
            let (a, b) = parse_range(s, "vmbr")?;
            if b > 9999 {
                return Err(format!("bridge range {s:?} goes past vmbr9999"));
            }
            Ok((a, b))
        }),
        None => Some(DEFAULT_BRIDGE_RANGE),
    };
    let mut bridges = BTreeMap::new();
    for (alias, target) in raw.bridges.iter().flatten() {
        if !is_alias(alias) || is_bridge_name(alias) {
            let i = cx.at(
                target,
                format!(
                    "`bridges` key {alias:?} is not a network alias (a name like hq, not vmbrN)"
                ),
            );
            hint(
                i,
                "map aliases used in `networks`, e.g. `bridges: {hq: vmbr1}`",
            );
            continue;
        }
        let t = match &target.value {
            RawBridgeTarget::Everywhere(b) => {
                if !is_iface_name(b) {
                    cx.at(
                        target,
                        format!("bridge {b:?} is not a valid interface name"),
                    );
                    continue;
                }
                BridgeTarget::Everywhere(b.clone())
            }
            RawBridgeTarget::PerNode(m) => {
                let mut out = BTreeMap::new();
                for (node, b) in m {
                    match NodeName::parse(node) {
                        Ok(n) if is_iface_name(b) => {
                            out.insert(n, b.clone());
                        }
                        Ok(_) => {
                            cx.at(
                                target,
                                format!("bridge {b:?} is not a valid interface name"),
                            );
                        }
                        Err(e) => {
                            cx.at(target, e);
                        }
                    }
                }
                BridgeTarget::PerNode(out)
            }
        };
        bridges.insert(alias.clone(), t);
    }
    let vlan_base = raw.vlan_base.as_ref().and_then(|v| {
        cx.check(
            v,
            Some("tags are vlan_base + the student's index and must stay within 1-4094"),
            |n| {
                if (1..=4094).contains(n) {
                    Ok(*n as u16)
                } else {
                    Err(format!("vlan_base {n} is out of range 1-4094"))
                }
            },
        )
    });
    if vlan_base.is_some() && bridges.is_empty() {
        let v = raw.vlan_base.as_ref().expect("checked");
        let i = cx.at(v, "vlan_base has no effect without a `bridges:` map");
        hint(
            i,
            "map an alias to a shared trunk bridge, e.g. `bridges: {lan: vmbr1}`",
        );
    }
    let vmids = match (&raw.vmid_range, &raw.vmid_base, &raw.vmid_stride) {
        (Some(r), None, None) => cx.check(r, Some("e.g. `vmid_range: 10000-19999`"), |s| {
            let (a, b) = parse_range(s, "")?;
            if a < VMID_MIN || b > VMID_MAX {
                return Err(format!("vmid range {s:?} leaves {VMID_MIN}-{VMID_MAX}"));
            }
            Ok(VmidPolicy::Range { min: a, max: b })
        }),
        (None, Some(base), stride) => {
            let base_v = cx.check(base, None, |n| VmId::new(*n).map(|v| v.get()));
            let stride_v = match stride {
                Some(s) if s.value == 0 => {
                    cx.at(s, "vmid_stride must be at least 1");
                    None
                }
                Some(s) => Some(s.value),
                None => Some(raw.machines.value.len().max(1) as u32),
            };
            match (base_v, stride_v) {
                (Some(base), Some(stride)) => Some(VmidPolicy::Fixed { base, stride }),
                _ => None,
            }
        }
        (None, None, Some(s)) => {
            let i = cx.at(s, "vmid_stride needs vmid_base");
            hint(
                i,
                "add `vmid_base: 10000`, or remove vmid_stride to let labfleet allocate VMIDs",
            );
            None
        }
        (Some(r), _, _) => {
            let i = cx.at(r, "vmid_range and vmid_base/vmid_stride exclude each other");
            hint(
                i,
                "keep vmid_range (allocated VMIDs) or vmid_base + vmid_stride (predictable VMIDs)",
            );
            None
        }
        (None, None, None) => Some(VmidPolicy::Range {
            min: VMID_MIN,
            max: VMID_MAX,
        }),
    };

    if raw.machines.value.is_empty() {
        let i = cx.at(
            &raw.machines,
            "`machines` is empty: a deployment needs at least one machine",
        );
        hint(i, "see data/README.md for a machine entry");
    }
    let mut machines = Vec::new();
    let mut names: BTreeMap<String, u64> = BTreeMap::new();
    for m in &raw.machines.value {
        if let Some(machine) =
            machine_from_raw(m, &mut cx, &bridges, default_clone, &default_storage)
        {
            if let Some(line) = names.get(machine.name.as_str()) {
                let i = cx.at(
                    &m.name,
                    format!(
                        "machine name {:?} is used twice (first on line {line})",
                        machine.name.as_str()
                    ),
                );
                hint(
                    i,
                    "each machine needs its own name: VM names are <machine>-<user>",
                );
                continue;
            }
            names.insert(machine.name.to_string(), m.name.referenced.line());
            machines.push(machine);
        }
    }
    if let (Some(VmidPolicy::Fixed { stride, .. }), Some(s)) = (&vmids, &raw.vmid_stride)
        && (*stride as usize) < machines.len()
    {
        let i = cx.at(s, format!("vmid_stride {stride} is smaller than the {} machines each student gets: VMIDs would overlap", machines.len()));
        hint(i, format!("use vmid_stride: {} or more", machines.len()));
    }

    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(Deployment {
        name: name.expect("no issues"),
        cluster,
        pool_pattern: pool_pattern.expect("no issues"),
        role: role.expect("no issues"),
        start,
        bridge_range: bridge_range.expect("no issues"),
        vmids: vmids.expect("no issues"),
        vlan_base,
        machines,
    })
}

fn machine_from_raw(
    m: &RawMachine,
    cx: &mut Ctx<'_>,
    bridges: &BTreeMap<String, BridgeTarget>,
    default_clone: CloneMode,
    default_storage: &Option<String>,
) -> Option<Machine> {
    let name = cx.check(
        &m.name,
        Some("machine names are lowercase DNS labels: a-z, 0-9 and inner '-' (e.g. student-pc)"),
        |s| DnsLabel::parse(s),
    );
    let device_type = cx.check(
        &m.device_type,
        Some("linux: virtio NICs; windows: e1000 NICs; router: virtio NICs, firewall off"),
        |s| DeviceType::parse(s),
    );
    let template_node = cx.check(&m.template_node, None, |s| NodeName::parse(s));
    let template_vmid = cx.check(
        &m.template_vmid,
        Some("the template's VMID, 100-999999"),
        |n| VmId::new(*n),
    );
    let clone = match &m.clone {
        Some(c) => cx.check(c, Some("write `clone: linked` or `clone: full`"), |s| {
            parse_clone(s)
        }),
        None => Some(default_clone),
    };
    let storage = match &m.storage {
        Some(s) => cx.check(s, None, |s| parse_storage_id(s)).map(Some),
        None => Some(default_storage.clone()),
    };
    let mut replicas = BTreeMap::new();
    for (node, vmid) in m.replicas.iter().flatten() {
        let n = match NodeName::parse(node) {
            Ok(n) => n,
            Err(e) => {
                cx.at(vmid, e);
                continue;
            }
        };
        if let Some(v) = cx.check(vmid, None, |v| VmId::new(*v)) {
            if template_node.as_ref() == Some(&n) {
                let i = cx.at(vmid, format!("replica on {n} is the template's own node"));
                hint(i, "list only copies on other nodes under `replicas`");
                continue;
            }
            replicas.insert(n, v);
        }
    }
    let mut networks = Vec::new();
    if m.networks.len() > 32 {
        let i = cx.at(
            &m.name,
            format!(
                "machine has {} networks; Proxmox allows net0-net31",
                m.networks.len()
            ),
        );
        hint(i, "use at most 32 networks");
    }
    for n in &m.networks {
        if let Some(spec) = cx.check(&n.bridge, Some("vmbrN or vmbrN.VLAN for an existing bridge, **name** for an existing bridge of another name, alias or alias.VLAN (e.g. hq.100) for a private network"), |s| parse_net(s, bridges)) {
            networks.push(spec);
        }
    }
    if clone == Some(CloneMode::Linked)
        && let (Some(s), Some(st)) = (&m.storage, storage.as_ref().and_then(|s| s.as_ref()))
    {
        let i = cx.at(s, format!("storage {st:?} is set for a linked clone; Proxmox refuses `storage` for linked clones"));
        hint(i, "add `clone: full` to this machine, or remove `storage`");
    }
    Some(Machine {
        name: name?,
        device_type: device_type?,
        template_node: template_node?,
        template_vmid: template_vmid?,
        replicas,
        networks,
        clone: clone?,
        storage: storage?,
    })
}

/// Cross-file checks: names, counts, the cluster. `users_file` and `deployment_file` place
/// the issues.
pub fn cross_check(
    deployment: &Deployment,
    users: &Users,
    deployment_file: &Path,
    users_file: &Path,
) -> Vec<Issue> {
    let mut issues = Vec::new();
    let n_users = users.users.len();
    let total = deployment.vm_count(n_users);
    let mut vm_names: BTreeSet<String> = BTreeSet::new();
    let mut seen_pools: BTreeSet<String> = BTreeSet::new();
    for u in &users.users {
        let pool = deployment.pool_name(u);
        if pool.len() > 64 {
            issues.push(
                Issue::new(
                    users_file,
                    1,
                    1,
                    format!("pool name {pool:?} for {u} is longer than 64 characters"),
                )
                .with_hint("shorten the deployment name or the pool pattern"),
            );
        }
        if !seen_pools.insert(pool.clone()) {
            issues.push(
                Issue::new(
                    users_file,
                    1,
                    1,
                    format!("two students would share the pool {pool:?}"),
                )
                .with_hint("the pool pattern must contain {user}"),
            );
        }
        for m in &deployment.machines {
            let name = deployment.vm_name(m, u);
            if name.len() > 63 {
                issues.push(
                    Issue::new(
                        users_file,
                        1,
                        1,
                        format!(
                            "VM name {name:?} ({m} for {u}) is longer than 63 characters",
                            m = m.name
                        ),
                    )
                    .with_hint("shorten the machine name or the user name"),
                );
            }
            if !vm_names.insert(name.clone()) {
                issues.push(
                    Issue::new(deployment_file, 1, 1, format!("two VMs would be named {name:?}"))
                        .with_hint("a machine name followed by '-' and a user part collides with another machine's VM; rename the machine"),
                );
            }
        }
    }
    match deployment.vmids {
        VmidPolicy::Range { min, max } => {
            let room = (max - min + 1) as usize;
            if total > room {
                issues.push(
                    Issue::new(
                        deployment_file,
                        1,
                        1,
                        format!(
                            "{total} VMs do not fit in the VMID range {min}-{max} ({room} ids)"
                        ),
                    )
                    .with_hint("widen vmid_range"),
                );
            }
        }
        VmidPolicy::Fixed { base, stride } => {
            if n_users > 0 && !deployment.machines.is_empty() {
                let last = base as u64
                    + (n_users as u64 - 1) * stride as u64
                    + deployment.machines.len() as u64
                    - 1;
                if last > VMID_MAX as u64 {
                    issues.push(
                        Issue::new(
                            deployment_file,
                            1,
                            1,
                            format!("the last VMID would be {last}, past {VMID_MAX}"),
                        )
                        .with_hint("lower vmid_base or vmid_stride"),
                    );
                }
            }
        }
    }
    if let Some(base) = deployment.vlan_base
        && base as usize + n_users.saturating_sub(1) > 4094
    {
        issues.push(
            Issue::new(
                deployment_file,
                1,
                1,
                format!("vlan_base {base} + {n_users} students goes past VLAN 4094"),
            )
            .with_hint("lower vlan_base"),
        );
    }
    issues
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        let fp = "AB:".repeat(31) + "AB";
        assert_eq!(parse_fingerprint(&fp).unwrap(), [0xAB; 32]);
        assert_eq!(parse_fingerprint(&"ab".repeat(32)).unwrap(), [0xAB; 32]);
        assert!(parse_fingerprint("AB:CD").is_err());
        assert!(parse_fingerprint(&("ZZ:".repeat(31) + "ZZ")).is_err());
    }

    #[test]
    fn networks_are_read_as_config_semantics_says() {
        let none = BTreeMap::new();
        assert_eq!(
            parse_net("vmbr0", &none).unwrap(),
            NetSpec::Existing {
                bridge: "vmbr0".into(),
                tag: None
            }
        );
        assert_eq!(
            parse_net("vmbr0.20", &none).unwrap(),
            NetSpec::Existing {
                bridge: "vmbr0".into(),
                tag: Some(20)
            }
        );
        assert_eq!(
            parse_net("**lan**", &none).unwrap(),
            NetSpec::Existing {
                bridge: "lan".into(),
                tag: None
            }
        );
        assert_eq!(
            parse_net("hq.100", &none).unwrap(),
            NetSpec::Private {
                alias: "hq".into(),
                tag: Some(100)
            }
        );
        assert_eq!(
            parse_net("dmz", &none).unwrap(),
            NetSpec::Private {
                alias: "dmz".into(),
                tag: None
            }
        );
        assert!(parse_net("hq.4095", &none).unwrap_err().contains("1-4094"));
        assert!(parse_net("hq.0", &none).is_err());
        assert!(parse_net(".5", &none).is_err());
        assert!(parse_net("h q", &none).is_err());
        let mut m = BTreeMap::new();
        m.insert("lan".to_owned(), BridgeTarget::Everywhere("vmbr1".into()));
        assert!(matches!(
            parse_net("lan", &m).unwrap(),
            NetSpec::Mapped { .. }
        ));
    }

    #[test]
    fn slugs() {
        assert_eq!(slug_from_dir(Path::new("/x/Net Lab 2026")), "net-lab-2026");
        assert_eq!(slug_from_dir(Path::new("/x/2026")), "lab-2026");
        assert_eq!(slug_from_dir(Path::new("/x/data")), "data");
    }

    #[test]
    fn device_types_have_effects() {
        assert_eq!(DeviceType::parse("windows").unwrap().nic_model(), "e1000");
        assert_eq!(
            DeviceType::parse("router").unwrap().nic_firewall(),
            Some(false)
        );
        assert!(
            DeviceType::parse("mac")
                .unwrap_err()
                .contains("linux, windows, router")
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(
            parse_range("vmbr1000-vmbr4999", "vmbr").unwrap(),
            (1000, 4999)
        );
        assert_eq!(parse_range("100-999999", "").unwrap(), (100, 999_999));
        assert!(parse_range("9-1", "").is_err());
        assert!(parse_range("x", "").is_err());
    }
}
