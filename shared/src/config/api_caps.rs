//! `max_parallel_api` in `connections.yml`: how many protected calls (every write but the
//! login: the calls pveproxy hands to a node's pvedaemon) all of labfleet's workers make to
//! one node at once. Proxmox's pvedaemon runs 3 API workers per node; a call beyond them
//! queues there and, past pveproxy's 30 s proxy timeout, is answered 596 while it may still
//! run. The default is therefore 3.

use serde::Deserialize;
use serde_saphyr::Spanned;

/// The default: pvedaemon's 3 workers per node.
pub const DEFAULT_API_PER_NODE: u32 = 3;

/// `max_parallel_api: {per_node: N}` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiCaps {
    pub per_node: Option<Spanned<u32>>,
}

/// A value out of range: where, what, and how to fix it.
pub struct ApiCapIssue<'a> {
    pub at: &'a Spanned<u32>,
    pub message: String,
    pub hint: &'static str,
}

/// The cap per node, from the key if given.
pub fn per_node(raw: Option<&Spanned<RawApiCaps>>) -> Result<u32, ApiCapIssue<'_>> {
    match raw.and_then(|r| r.value.per_node.as_ref()) {
        None => Ok(DEFAULT_API_PER_NODE),
        Some(v) if v.value == 0 || v.value > 64 => Err(ApiCapIssue {
            at: v,
            message: format!("max_parallel_api.per_node {} is out of range 1-64", v.value),
            hint: "a node's pvedaemon runs 3 API workers (the default); raise it only with `max_workers` in /etc/default/pvedaemon",
        }),
        Some(v) => Ok(v.value),
    }
}
