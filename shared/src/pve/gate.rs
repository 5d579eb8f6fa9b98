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

    /// Room for one writer of `user.cfg` (users, groups, roles, ACLs, pools) at a time,
    /// across processes: Proxmox writes that file under one cluster-wide pmxcfs lock that its
    /// waiters poll (1 s naps at first), so two of our writers that meet cost the later one
    /// a nap while it holds an API worker; queued here, they do not meet (labfleet's clones
    /// carry no `pool`, whose add would take that lock inside the clone task).
    /// Taken before [`ApiGate::enter`], so no API worker is held while waiting for it. An
    /// `urgent` write ([`urgent_user_cfg`]) goes before the others waiting. The default
    /// holds nothing.
    fn enter_user_cfg(&self, urgent: bool) -> Pin<Box<dyn Future<Output = ApiPass> + Send + '_>> {
        let _ = urgent;
        Box::pin(async { ApiPass::free() })
    }
}

/// Whether a `user.cfg` write makes what clones wait for (a student's user, their pool, the
/// role on it: the student job, which the student's clones wait for): those go before the
/// writes nothing waits for but the end (pool adds of cloned VMs, removals), or a class's
/// last students waited behind the pool adds of its first VMs.
pub(crate) fn urgent_user_cfg(method: &str, path: &str) -> bool {
    (method == "POST" && (path == "/access/users" || path == "/pools"))
        || (method == "PUT" && path == "/access/acl")
}

/// Whether a write to `path` changes `user.cfg` (and so waits for its cluster-wide lock).
pub(crate) fn writes_user_cfg(path: &str) -> bool {
    [
        "/access/users",
        "/access/groups",
        "/access/roles",
        "/access/acl",
        "/pools",
    ]
    .iter()
    .any(|p| path == *p || path.starts_with(&format!("{p}/")))
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

    #[test]
    fn only_creating_users_and_pools_is_urgent() {
        assert!(urgent_user_cfg("POST", "/access/users"));
        assert!(urgent_user_cfg("POST", "/pools"));
        assert!(urgent_user_cfg("PUT", "/access/acl"));
        assert!(!urgent_user_cfg("DELETE", "/pools/p1"));
        assert!(!urgent_user_cfg("PUT", "/pools/p1"));
    }

    #[test]
    fn user_cfg_writes_are_known_by_their_path() {
        for p in [
            "/access/users",
            "/access/users/s1@pve",
            "/access/acl",
            "/pools",
            "/pools/p1",
            "/access/roles/R",
        ] {
            assert!(writes_user_cfg(p), "{p}");
        }
        for p in [
            "/access/ticket",
            "/access/password",
            "/nodes/pve1/qemu/100/clone",
            "/poolsx",
            "/cluster/status",
        ] {
            assert!(!writes_user_cfg(p), "{p}");
        }
    }
}
