//! How to reach one Proxmox VE cluster: address, credentials, TLS policy and limits.
//!
//! This is the client's own, already-validated input. It deliberately does not depend on
//! labfleet's `config` module: whoever reads `connections.yml` converts a connection entry
//! into a [`ClientConfig`]. Secrets are held as [`Secret`], so `Debug` of any value here
//! never shows a password, token secret or ticket.

use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

/// Port pveproxy listens on.
pub const DEFAULT_PORT: u16 = 8006;

/// Everything [`super::PveClient::new`] needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Host name or IP address (an IPv6 literal may be given with or without brackets).
    pub host: String,
    pub port: u16,
    /// `Https` for Proxmox; `Http` only for a simulator started with `--plain-http`.
    pub scheme: Scheme,
    pub auth: Auth,
    pub tls: TlsPolicy,
    /// Upper bound for one HTTP request, connect included.
    pub request_timeout: Duration,
    /// Requests in flight at once for this client and all its clones. A fleet of N
    /// worker processes puts at most N x this many concurrent requests on pveproxy
    /// (which has 3 worker processes by default), so keep it small (4..8).
    pub max_concurrent_requests: usize,
    /// The connection's name in `connections.yml`, used in log events.
    pub connection_name: String,
    /// Age after which a ticket is renewed before use. Tickets live 2 h; proxmoxer renews
    /// after 1 h, which is the default.
    pub ticket_renew_after: Duration,
    /// Extra tries of a GET (a read: safe to repeat) after a transient failure or a 5xx
    /// (100 ms, then doubling), before the error reaches the caller. Default 0: every
    /// failure is the caller's to decide; `clusters::client_config` sets 2, so one dropped
    /// connection or 596 does not cost a job a whole attempt.
    pub read_retries: u32,
}

impl ClientConfig {
    /// A config with the defaults: port 8006, HTTPS, system roots, 30 s timeout, 8
    /// concurrent requests, renewal after 1 h.
    pub fn new(connection_name: impl Into<String>, host: impl Into<String>, auth: Auth) -> Self {
        ClientConfig {
            host: host.into(),
            port: DEFAULT_PORT,
            scheme: Scheme::Https,
            auth,
            tls: TlsPolicy::SystemRoots,
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 8,
            connection_name: connection_name.into(),
            ticket_renew_after: Duration::from_secs(3600),
            read_retries: 0,
        }
    }

    /// `scheme://host:port/api2/json`
    pub fn base_url(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Https => "https",
            Scheme::Http => "http",
        };
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}/api2/json", self.port)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Https,
    /// Plain HTTP: only for the simulator's `--plain-http` mode. Real pveproxy has no HTTP.
    Http,
}

/// Credentials. Ticket auth logs in once per process; token auth never logs in.
#[derive(Debug, Clone)]
pub enum Auth {
    /// `user` is `name@realm`, e.g. `root@pam`.
    Password { user: String, password: Secret },
    /// API token `user!token_name` with its secret (a UUID).
    Token {
        user: String,
        token_name: String,
        secret: Secret,
    },
}

impl Auth {
    /// The identity as Proxmox writes it in UPIDs: `user@realm` or `user@realm!token`.
    pub fn principal(&self) -> String {
        match self {
            Auth::Password { user, .. } => user.clone(),
            Auth::Token {
                user, token_name, ..
            } => format!("{user}!{token_name}"),
        }
    }
}

/// How the server certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Public or OS-installed CAs (rustls-platform-verifier, through reqwest).
    SystemRoots,
    /// A PEM file with the CA(s) to trust, e.g. the cluster's `pve-root-ca.pem`.
    CaFile(PathBuf),
    /// SHA-256 of the leaf certificate's DER, as `GET /nodes` reports in `ssl_fingerprint`.
    Fingerprint([u8; 32]),
    /// No verification at all. Only when written explicitly; logs a warning at startup.
    Insecure,
}

/// Why a fingerprint string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SHA-256 fingerprint {input:?}: {reason}")]
pub struct FingerprintError {
    pub input: String,
    pub reason: &'static str,
}

/// Parses a SHA-256 fingerprint in Proxmox's `AB:CD:...` form (any case) or as 64 plain hex
/// digits. Spaces around it are ignored.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], FingerprintError> {
    let err = |reason| FingerprintError {
        input: s.to_owned(),
        reason,
    };
    let t = s.trim();
    let hex: String = if t.contains(':') {
        let parts: Vec<&str> = t.split(':').collect();
        if parts.len() != 32 || parts.iter().any(|p| p.len() != 2) {
            return Err(err("expected 32 colon-separated pairs of hex digits"));
        }
        parts.concat()
    } else {
        t.to_owned()
    };
    if hex.len() != 64 {
        return Err(err("expected 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| err("not a hexadecimal digit"))?;
    }
    Ok(out)
}

/// Formats a fingerprint the way Proxmox shows it: uppercase, colon-separated.
pub fn format_fingerprint(fp: &[u8; 32]) -> String {
    fp.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";

    #[test]
    fn fingerprint_colon_form_round_trips() {
        let fp = parse_fingerprint(FP).unwrap();
        assert_eq!(fp[0], 0xAB);
        assert_eq!(fp[31], 0x89);
        assert_eq!(format_fingerprint(&fp), FP);
    }

    #[test]
    fn fingerprint_plain_hex_and_lowercase_accepted() {
        let plain = FP.replace(':', "").to_lowercase();
        assert_eq!(
            parse_fingerprint(&format!("  {plain}\n")).unwrap(),
            parse_fingerprint(FP).unwrap()
        );
        assert_eq!(
            parse_fingerprint(&FP.to_lowercase()).unwrap(),
            parse_fingerprint(FP).unwrap()
        );
    }

    #[test]
    fn fingerprint_rejects_bad_input() {
        assert!(parse_fingerprint("").is_err());
        assert!(parse_fingerprint(&FP[3..]).is_err());
        assert!(parse_fingerprint(&FP.replace("AB", "ZZ")).is_err());
        assert!(parse_fingerprint(&"A".repeat(64).replacen('A', "G", 1)).is_err());
        assert!(parse_fingerprint(&format!("{FP}:00")).is_err());
        // sha-1 length
        assert!(parse_fingerprint(&"ab".repeat(20)).is_err());
    }

    #[test]
    fn base_url_forms() {
        let mut c = ClientConfig::new(
            "lab",
            "127.0.0.1",
            Auth::Password {
                user: "root@pam".into(),
                password: "x".into(),
            },
        );
        assert_eq!(c.base_url(), "https://127.0.0.1:8006/api2/json");
        c.scheme = Scheme::Http;
        c.port = 1234;
        c.host = "::1".into();
        assert_eq!(c.base_url(), "http://[::1]:1234/api2/json");
    }

    #[test]
    fn debug_of_auth_hides_secrets() {
        let a = Auth::Token {
            user: "root@pam".into(),
            token_name: "labfleet".into(),
            secret: "1234-secret-uuid".into(),
        };
        let d = format!("{a:?}");
        assert!(!d.contains("1234-secret-uuid"), "{d}");
        assert_eq!(a.principal(), "root@pam!labfleet");
    }
}
