//! Identifier newtypes with the rules Proxmox VE (and labfleet) put on them.
//!
//! Each type is parsed once, at the edge; code downstream takes the newtype and never
//! re-checks. Error texts are written for a person editing YAML: they say what is wrong
//! and what a valid value looks like.

use std::fmt;
use std::net::Ipv6Addr;

use serde::{Deserialize, Serialize};

/// A Proxmox user id `user@realm` (`student1@pve`, `root@pam`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId {
    user: String,
    realm: String,
}

impl UserId {
    pub fn parse(s: &str) -> Result<UserId, String> {
        let Some((user, realm)) = s.rsplit_once('@') else {
            return Err(format!(
                "user id {s:?} has no realm: write it as user@realm, e.g. \"{s}@pve\""
            ));
        };
        if !(3..=64).contains(&s.len()) {
            return Err(format!(
                "user id {s:?} is {} characters long; Proxmox allows 3 to 64",
                s.len()
            ));
        }
        if user.is_empty()
            || user
                .chars()
                .any(|c| c.is_whitespace() || c == ':' || c == '/')
        {
            return Err(format!(
                "user part of {s:?} must be non-empty without spaces, ':' or '/'"
            ));
        }
        let mut rc = realm.chars();
        let realm_ok = rc.next().is_some_and(|c| c.is_ascii_alphabetic())
            && realm.len() >= 2
            && rc.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !realm_ok {
            return Err(format!(
                "realm {realm:?} of {s:?} is not valid: it starts with a letter and has at least 2 characters of [A-Za-z0-9._-] (e.g. pve, pam)"
            ));
        }
        Ok(UserId {
            user: user.to_owned(),
            realm: realm.to_owned(),
        })
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The user part made into a DNS label fragment: lowercased, every character a DNS
    /// label does not allow replaced by `-`, dashes trimmed (`Anna.Maria@pve` -> `anna-maria`).
    pub fn label_part(&self) -> String {
        label_chars(&self.user)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.user, self.realm)
    }
}

impl TryFrom<String> for UserId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        UserId::parse(&s)
    }
}

impl From<UserId> for String {
    fn from(u: UserId) -> String {
        u.to_string()
    }
}

/// A Proxmox node name (`^[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?$`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

impl NodeName {
    pub fn parse(s: &str) -> Result<NodeName, String> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-';
        if ok {
            Ok(NodeName(s.to_owned()))
        } else {
            Err(format!(
                "node name {s:?} is not valid: letters, digits and inner '-' only (e.g. pve1)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for NodeName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        NodeName::parse(&s)
    }
}

impl From<NodeName> for String {
    fn from(n: NodeName) -> String {
        n.0
    }
}

/// The lowest and highest VMID labfleet accepts (the original design's rule).
pub const VMID_MIN: u32 = 100;
pub const VMID_MAX: u32 = 999_999;

/// A VM id in 100..=999999.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct VmId(u32);

impl VmId {
    pub fn new(n: u32) -> Result<VmId, String> {
        if (VMID_MIN..=VMID_MAX).contains(&n) {
            Ok(VmId(n))
        } else {
            Err(format!("VM id {n} is out of range {VMID_MIN}-{VMID_MAX}"))
        }
    }

    pub fn parse(s: &str) -> Result<VmId, String> {
        let n: u32 = s
            .trim()
            .parse()
            .map_err(|_| format!("VM id {s:?} is not a number in {VMID_MIN}-{VMID_MAX}"))?;
        VmId::new(n)
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl TryFrom<u32> for VmId {
    type Error = String;
    fn try_from(n: u32) -> Result<Self, String> {
        VmId::new(n)
    }
}

impl From<VmId> for u32 {
    fn from(v: VmId) -> u32 {
        v.0
    }
}

/// A lowercase DNS label: `[a-z0-9-]`, 1 to 63 characters, no leading or trailing `-`.
/// Machine names must already be one; labfleet never silently rewrites them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DnsLabel(String);

impl DnsLabel {
    pub fn parse(s: &str) -> Result<DnsLabel, String> {
        if s.is_empty() {
            return Err("name is empty".into());
        }
        if s.len() > 63 {
            return Err(format!(
                "name {s:?} has {} characters; a DNS label has at most 63",
                s.len()
            ));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(format!(
                "name {s:?} contains {c:?}; only lowercase letters, digits and '-' are allowed (e.g. {:?})",
                label_chars(s)
            ));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(format!("name {s:?} must not start or end with '-'"));
        }
        Ok(DnsLabel(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `s` lowercased, with every character a DNS label does not allow replaced by `-`, and
/// leading and trailing `-` trimmed.
fn label_chars(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    t.trim_matches('-').to_owned()
}

impl fmt::Display for DnsLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for DnsLabel {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        DnsLabel::parse(&s)
    }
}

impl From<DnsLabel> for String {
    fn from(n: DnsLabel) -> String {
        n.0
    }
}

/// A VLAN tag, 1..=4094.
pub fn parse_vlan(s: &str, whole: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(v) if (1..=4094).contains(&v) => Ok(v),
        _ => Err(format!(
            "bridge {whole:?}: VLAN tag {s:?} is out of range 1-4094"
        )),
    }
}

/// A Proxmox host: `name[:port]`, `ip[:port]` or `[ipv6][:port]`; port 1-65535, default 8006.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

pub const DEFAULT_PVE_PORT: u16 = 8006;

impl HostPort {
    pub fn parse(s: &str) -> Result<HostPort, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("host is empty: write name[:port], e.g. \"pve1.lab:8006\"".into());
        }
        if s.contains("://") {
            return Err(format!(
                "host {s:?} must not carry a scheme: write only name[:port] (labfleet always speaks HTTPS to Proxmox)"
            ));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let Some((addr, tail)) = rest.split_once(']') else {
                return Err(format!(
                    "host {s:?}: IPv6 address is missing its closing ']'"
                ));
            };
            addr.parse::<Ipv6Addr>()
                .map_err(|_| format!("host {s:?}: {addr:?} is not an IPv6 address"))?;
            let port = match tail {
                "" => None,
                t => Some(t.strip_prefix(':').ok_or_else(|| {
                    format!("host {s:?}: expected ':port' after the IPv6 address")
                })?),
            };
            (addr.to_owned(), port)
        } else if s.matches(':').count() > 1 {
            return Err(format!(
                "host {s:?}: write an IPv6 address in brackets, e.g. \"[::1]:8006\""
            ));
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (s.to_owned(), None),
            }
        };
        if !host.contains(':') {
            let ok = !host.is_empty()
                && host.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                });
            if !ok {
                return Err(format!(
                    "host {host:?} is not a valid host name or IPv4 address"
                ));
            }
        }
        let port = match port {
            None => DEFAULT_PVE_PORT,
            Some(p) => match p.parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => n as u16,
                _ => return Err(format!("port {p:?} of host {s:?} is out of range 1-65535")),
            },
        };
        Ok(HostPort { host, port })
    }

    /// `host:port` with IPv6 in brackets, for URLs and messages.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Whether the host is on the loopback network (`127.0.0.0/8`, `::1`, `localhost`).
    pub fn is_loopback(&self) -> bool {
        if self.host.eq_ignore_ascii_case("localhost") {
            return true;
        }
        match self.host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.is_loopback(),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        let u = UserId::parse("student1@pve").unwrap();
        assert_eq!((u.user(), u.realm()), ("student1", "pve"));
        assert_eq!(
            UserId::parse("Anna.Maria@pve").unwrap().label_part(),
            "anna-maria"
        );
        assert!(UserId::parse("student1").unwrap_err().contains("no realm"));
        assert!(UserId::parse("a b@pve").is_err());
        assert!(UserId::parse("x@1pve").is_err());
        assert!(UserId::parse("@pve").is_err());
        assert!(UserId::parse(&format!("{}@pve", "a".repeat(70))).is_err());
        assert!(UserId::parse("user@ldap-corp.example").is_ok());
    }

    #[test]
    fn node_names() {
        assert!(NodeName::parse("pve1").is_ok());
        assert!(NodeName::parse("pve-node-2").is_ok());
        for bad in ["", "-pve", "pve-", "pve_1", "pve.lab"] {
            assert!(NodeName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vmids() {
        assert_eq!(VmId::new(100).unwrap().get(), 100);
        assert!(VmId::new(99).is_err());
        assert!(VmId::new(999_999).is_ok());
        assert!(VmId::new(1_000_000).is_err());
        assert_eq!(VmId::parse("105").unwrap().get(), 105);
        assert!(VmId::parse("abc").is_err());
    }

    #[test]
    fn dns_labels() {
        assert!(DnsLabel::parse("student-pc").is_ok());
        assert!(
            DnsLabel::parse("Student-PC")
                .unwrap_err()
                .contains("\"student-pc\"")
        );
        assert!(DnsLabel::parse("-a").is_err());
        assert!(DnsLabel::parse("a_b").is_err());
        assert!(DnsLabel::parse(&"a".repeat(64)).is_err());
        assert!(DnsLabel::parse(&"a".repeat(63)).is_ok());
    }

    // 192.168.1.100 is the original design's example host: parsed here, never contacted.
    #[test]
    fn hosts() {
        assert_eq!(
            HostPort::parse("192.168.1.100:8006").unwrap(),
            HostPort {
                host: "192.168.1.100".into(),
                port: 8006
            }
        );
        assert_eq!(HostPort::parse("pve1.lab").unwrap().port, 8006);
        let v6 = HostPort::parse("[::1]:8443").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 8443));
        assert_eq!(v6.authority(), "[::1]:8443");
        assert!(v6.is_loopback());
        assert!(HostPort::parse("[::1]").is_ok());
        for bad in [
            "",
            "pve:0",
            "pve:65536",
            "pve:x",
            "::1:8006",
            "https://pve",
            "[zz]:1",
            "a..b",
        ] {
            assert!(HostPort::parse(bad).is_err(), "{bad}");
        }
        assert!(HostPort::parse("127.0.0.1:8006").unwrap().is_loopback());
        assert!(!HostPort::parse("192.168.1.100:8006").unwrap().is_loopback());
    }

    #[test]
    fn vlans() {
        assert_eq!(parse_vlan("100", "hq.100").unwrap(), 100);
        assert!(parse_vlan("0", "hq.0").is_err());
        assert!(
            parse_vlan("4095", "hq.4095")
                .unwrap_err()
                .contains("1-4094")
        );
    }
}
