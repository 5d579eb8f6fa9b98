//! How labfleet operates on one cluster, beyond connecting to it: `memory_overcommit` (how
//! much configured VM memory a node may be given, as a multiple of its memory; `submit`
//! refuses more) and `node_lost_after` (how long a node may stay offline or unreachable
//! before the workers take it for lost and re-place its students, `jobs::replace`).

use std::path::Path;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::issue::Issue;
use crate::capacity::DEFAULT_MEMORY_OVERCOMMIT;

/// The operating limits of one cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Operating {
    pub memory_overcommit: f64,
    pub node_lost_after: Duration,
}

/// A node offline or unreachable this long is lost (Proxmox' own HA fences a node after
/// about two minutes without quorum; a reboot of a lab server takes less).
pub const DEFAULT_NODE_LOST_AFTER: Duration = Duration::from_secs(120);

impl Default for Operating {
    fn default() -> Operating {
        Operating {
            memory_overcommit: DEFAULT_MEMORY_OVERCOMMIT,
            node_lost_after: DEFAULT_NODE_LOST_AFTER,
        }
    }
}

fn issue<T>(file: &Path, s: &Spanned<T>, msg: String, hint: &str) -> Issue {
    Issue::new(file, s.referenced.line(), s.referenced.column(), msg).with_hint(hint)
}

/// The keys as written (each optional), checked; every problem is returned.
pub fn from_raw(
    file: &Path,
    memory_overcommit: Option<&Spanned<f64>>,
    node_lost_after: Option<&Spanned<String>>,
) -> (Operating, Vec<Issue>) {
    let mut out = Operating::default();
    let mut issues = Vec::new();
    if let Some(v) = memory_overcommit {
        if v.value.is_finite() && (0.1..=100.0).contains(&v.value) {
            out.memory_overcommit = v.value;
        } else {
            issues.push(issue(
                file,
                v,
                format!("memory_overcommit {} is out of range 0.1-100", v.value),
                "a multiple of each node's memory, e.g. 1.5 (the default) lets the VMs' configured memory reach 150% of it",
            ));
        }
    }
    if let Some(v) = node_lost_after {
        match super::schedule::parse_duration(&v.value) {
            Ok(secs) if (1..=86_400).contains(&secs) => {
                out.node_lost_after = Duration::from_secs(secs)
            }
            Ok(secs) => issues.push(issue(
                file,
                v,
                format!("node_lost_after {secs}s is out of range 1s-1d"),
                "how long a node may stay offline before its students are moved, e.g. 120s (the default) or 10m",
            )),
            Err(e) => issues.push(issue(
                file,
                v,
                format!("node_lost_after: {e}"),
                "how long a node may stay offline before its students are moved, e.g. 120s (the default) or 10m",
            )),
        }
    }
    (out, issues)
}

#[cfg(test)]
mod tests {
    use crate::config::parse_connections;
    use std::path::Path;
    use std::time::Duration;

    const BASE: &str = "lab:\n  host: \"127.0.0.1:8006\"\n  user: root@pam\n  password: x\n";

    #[test]
    fn memory_overcommit_defaults_reads_and_is_checked() {
        let f = Path::new("connections.yml");
        let c = parse_connections(BASE, f).unwrap();
        assert_eq!(c.clusters["lab"].operating.memory_overcommit, 1.5);
        let c = parse_connections(&format!("{BASE}  memory_overcommit: 2.25\n"), f).unwrap();
        assert_eq!(c.clusters["lab"].operating.memory_overcommit, 2.25);
        let e = parse_connections(&format!("{BASE}  memory_overcommit: 0\n"), f).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].col), (5, 22), "{}", e[0]);
        assert!(
            e[0].message
                .contains("memory_overcommit 0 is out of range 0.1-100")
        );
        assert!(e[0].hint.as_deref().unwrap().contains("1.5 (the default)"));
    }

    #[test]
    fn node_lost_after_defaults_reads_and_is_checked() {
        let f = Path::new("connections.yml");
        let c = parse_connections(BASE, f).unwrap();
        assert_eq!(
            c.clusters["lab"].operating.node_lost_after,
            Duration::from_secs(120)
        );
        let c = parse_connections(&format!("{BASE}  node_lost_after: 2m30s\n"), f).unwrap();
        assert_eq!(
            c.clusters["lab"].operating.node_lost_after,
            Duration::from_secs(150)
        );
        for bad in ["0s", "2 minutes", "3d"] {
            let e = parse_connections(&format!("{BASE}  node_lost_after: {bad}\n"), f).unwrap_err();
            assert_eq!(e.len(), 1, "{bad}");
            assert_eq!(e[0].line, 5, "{}", e[0]);
            assert!(e[0].message.contains("node_lost_after"), "{}", e[0]);
        }
    }
}
