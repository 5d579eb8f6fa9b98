//! The small parsers the converters share. Each returns the value or the problem's message
//! (`Result<_, String>`); the converter places that message at the key it read
//! (`Ctx::check`), so the parsers stay free of files and lines.

use std::collections::BTreeMap;
use std::path::Path;

use super::ids::parse_vlan;
use super::model::{BridgeTarget, CloneMode, NetSpec};

pub(super) fn parse_clone(s: &str) -> Result<CloneMode, String> {
    match s {
        "linked" => Ok(CloneMode::Linked),
        "full" => Ok(CloneMode::Full),
        _ => Err(format!("clone {s:?} is not `linked` or `full`")),
    }
}

pub(super) fn parse_storage_id(s: &str) -> Result<String, String> {
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
pub(super) fn parse_range(s: &str, prefix: &str) -> Result<(u32, u32), String> {
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

pub(super) fn is_bridge_name(s: &str) -> bool {
    s.strip_prefix("vmbr")
        .is_some_and(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|c| c.is_ascii_digit()))
}

pub(super) fn is_iface_name(s: &str) -> bool {
    // Proxmox: ^[a-z][a-z0-9_]{1,20}([:.]\d+)?$, case-insensitive.
    let mut c = s.chars();
    c.next().is_some_and(|c| c.is_ascii_alphabetic())
        && (2..=21).contains(&s.len())
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(super) fn is_alias(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.len() <= 32
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub(super) fn parse_net(
    s: &str,
    bridges: &BTreeMap<String, BridgeTarget>,
) -> Result<NetSpec, String> {
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

#[cfg(test)]
mod tests {
    use super::super::connections::parse_fingerprint;
    use super::super::model::DeviceType;
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
