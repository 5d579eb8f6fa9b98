//! The keys of the classroom around a deployment: `max_parallel_starts` in
//! connections.yml (how many VMs boot at once on one node). `baseline` is a plain flag of
//! the deployment model.

use std::path::Path;

use serde_saphyr::Spanned;

use super::issue::Issue;
use super::raw::RawStartCaps;

/// The default of `max_parallel_starts.per_node`: a node boots four VMs at once.
pub const DEFAULT_STARTS_PER_NODE: u32 = 4;

/// `max_parallel_starts.per_node`, 1-256 (an issue for anything else).
pub(super) fn starts_per_node(
    raw: Option<&Spanned<RawStartCaps>>,
    file: &Path,
    issues: &mut Vec<Issue>,
) -> u32 {
    let Some(v) = raw.and_then(|r| r.value.per_node.as_ref()) else {
        return DEFAULT_STARTS_PER_NODE;
    };
    if v.value == 0 || v.value > 256 {
        let mut i = Issue::new(
            file,
            v.referenced.line(),
            v.referenced.column(),
            format!(
                "max_parallel_starts.per_node {} is out of range 1-256",
                v.value
            ),
        );
        i.hint = Some(format!(
            "a cap of 0 would stop every start; the default is {DEFAULT_STARTS_PER_NODE} VMs booting at once per node"
        ));
        issues.push(i);
        return DEFAULT_STARTS_PER_NODE;
    }
    v.value
}

#[cfg(test)]
mod tests {
    use crate::config::Connections;

    fn parse(yaml: &str) -> Result<Connections, String> {
        crate::config::parse_connections(yaml, std::path::Path::new("connections.yml"))
            .map_err(|e| crate::config::ConfigError::new(e).to_string())
    }

    #[test]
    fn starts_cap_defaults_to_four_and_is_checked() {
        let base = "lab:\n  host: \"127.0.0.1:8006\"\n  user: root@pam\n  password: x\n";
        let c = parse(base).unwrap();
        assert_eq!(c.clusters["lab"].starts_per_node, 4);
        let c = parse(&format!("{base}  max_parallel_starts: {{per_node: 2}}\n")).unwrap();
        assert_eq!(c.clusters["lab"].starts_per_node, 2);
        let e = parse(&format!("{base}  max_parallel_starts: {{per_node: 0}}\n")).unwrap_err();
        assert!(
            e.contains("max_parallel_starts.per_node 0 is out of range 1-256"),
            "{e}"
        );
        assert!(e.contains("connections.yml:5"), "{e}");
    }
}
