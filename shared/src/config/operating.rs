//! How labfleet operates on one cluster, beyond connecting to it: `memory_overcommit` (how
//! much configured VM memory a node may be given, as a multiple of its memory; `submit`
//! refuses more) and `node_lost_after` (how long a node may stay unreachable or offline
//! before the workers record it as lost and re-place its unfinished students).

use std::path::Path;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::issue::Issue;
use crate::capacity::DEFAULT_MEMORY_OVERCOMMIT;

/// `node_lost_after` when `connections.yml` does not set it.
pub const DEFAULT_NODE_LOST_AFTER: Duration = Duration::from_secs(120);

/// The operating limits of one cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Operating {
    pub memory_overcommit: f64,
    pub node_lost_after: Duration,
}

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

/// The two keys as written (each optional), checked; every problem is returned.
pub fn from_raw(
    file: &Path,
    memory_overcommit: Option<&Spanned<f64>>,
    node_lost_after: Option<&Spanned<f64>>,
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
        if v.value.is_finite() && v.value > 0.0 && v.value <= 86_400.0 {
            out.node_lost_after = Duration::from_secs_f64(v.value);
        } else {
            issues.push(issue(
                file,
                v,
                format!("node_lost_after {} is out of range (0, 86400] seconds", v.value),
                "seconds a node may stay unreachable before its students are moved, e.g. 120 (the default)",
            ));
        }
    }
    (out, issues)
}
