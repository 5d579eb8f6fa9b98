//! The API gate: a bound on the protected calls (every write but the login, the calls
//! pveproxy hands to a node's pvedaemon workers, 3 per node by default) that all of
//! labfleet's processes make to one node at once. The client asks its gate before each such
//! call and holds the pass until the answer (or the error) is in; the gate itself lives
//! outside this module (`jobs::api_slots` counts passes in Redis, across processes), so the
//! client stays free of Redis. A client without a gate makes calls as they come.

use std::future::Future;
use std::pin::Pin;

/// Held while one protected call runs; dropping it gives the room back.
pub struct ApiPass(#[allow(dead_code)] Option<Box<dyn Send + Sync>>);

impl ApiPass {
    /// A pass that holds nothing (no gate, or a gate that could not count).
    pub fn free() -> ApiPass {
        ApiPass(None)
    }

    /// A pass whose `release` runs when it is dropped.
    pub fn holding(release: impl Send + Sync + 'static) -> ApiPass {
        ApiPass(Some(Box::new(release)))
    }
}

/// Room for protected calls, per node. `node` is the `{node}` of a `/nodes/{node}/...`
/// path or, for cluster-wide calls (`/access`, `/pools`), the node the connection talks to
/// (learned once from `GET /cluster/status`); `None` when that could not be learned.
pub trait ApiGate: Send + Sync {
    fn enter<'a>(
        &'a self,
        node: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = ApiPass> + Send + 'a>>;
}

/// The node whose API workers run a call to `path` (see [`ApiGate::enter`]).
pub(crate) fn node_of(path: &str) -> Option<&str> {
    path.strip_prefix("/nodes/")
        .and_then(|r| r.split('/').next())
        .filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_comes_from_the_path() {
        assert_eq!(node_of("/nodes/pve2/qemu/100/clone"), Some("pve2"));
        assert_eq!(node_of("/access/acl"), None);
        assert_eq!(node_of("/pools"), None);
    }
}
