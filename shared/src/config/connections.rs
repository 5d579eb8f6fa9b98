//! `connections.yml`: named clusters, each converted into a [`Connection`] with every
//! problem collected as a located issue.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_saphyr::Spanned;

use super::convert::{Ctx, hint};
use super::ids::{HostPort, UserId};
use super::issue::Issue;
use super::model::{
    Caps, Connection, Connections, Credential, DEFAULT_MAX_REQUESTS, SecretSource, TlsSetting,
};
use super::raw::{RawConnection, RawConnections};
use crate::secret::Secret;

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

    let credential = credential_from_raw(name, raw, cx, whole);
    let tls = tls_from_raw(name, raw, cx, whole);
    let caps = caps_from_raw(raw, cx);
    let max_requests = max_requests_from_raw(raw, cx);
    let (operating, more) = super::operating::from_raw(
        cx.file,
        raw.memory_overcommit.as_ref(),
        raw.node_lost_after.as_ref(),
    );
    cx.issues.extend(more);
    let api_per_node =
        super::api_caps::per_node(raw.max_parallel_api.as_ref()).unwrap_or_else(|e| {
            let i = cx.at(e.at, e.message);
            hint(i, e.hint);
            super::api_caps::DEFAULT_API_PER_NODE
        });
    let starts_per_node = super::classroom::starts_per_node(
        raw.max_parallel_starts.as_ref(),
        cx.file,
        &mut *cx.issues,
    );

    Some(Connection {
        name: name.to_owned(),
        host: host?,
        user: user?,
        credential: credential?,
        tls: tls?,
        caps,
        starts_per_node,
        max_requests,
        operating,
        api_per_node,
    })
}

/// Exactly one credential: a password (inline, `_env` or `_file`) or an API token.
fn credential_from_raw(
    name: &str,
    raw: &RawConnection,
    cx: &mut Ctx<'_>,
    whole: &Spanned<RawConnection>,
) -> Option<Credential> {
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
    match (pw.len(), tok.len(), &raw.token_name) {
        (1, 0, None) => secret_source(pw[0], cx).map(Credential::Password),
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
                secret_source(tok[0], cx).map(|secret| Credential::Token {
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
    }
}

/// How the server is trusted: at most one of fingerprint, ca_file, verify_tls: false.
fn tls_from_raw(
    name: &str,
    raw: &RawConnection,
    cx: &mut Ctx<'_>,
    whole: &Spanned<RawConnection>,
) -> Option<TlsSetting> {
    let tls_keys = [
        raw.fingerprint.is_some(),
        raw.ca_file.is_some(),
        raw.verify_tls.as_ref().is_some_and(|v| !v.value),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if tls_keys > 1 {
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
    }
}

/// `max_parallel_clones`, each cap within 1-256 (an out-of-range one keeps the default).
fn caps_from_raw(raw: &RawConnection, cx: &mut Ctx<'_>) -> Caps {
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
    caps
}

/// `max_requests`, within 1-1024.
fn max_requests_from_raw(raw: &RawConnection, cx: &mut Ctx<'_>) -> u32 {
    match &raw.max_requests {
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
    }
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

/// One secret key's value: inline (not empty), the name of an environment variable, or a file.
fn secret_source((key, s): (&str, &Spanned<String>), cx: &mut Ctx<'_>) -> Option<SecretSource> {
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
                    format!("`{key}` must name an environment variable ([A-Za-z_][A-Za-z0-9_]*)"),
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
}
