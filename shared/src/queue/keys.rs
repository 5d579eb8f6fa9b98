//! Key names of one queue. Every key starts with `{<namespace>}:` so all of them hash to one
//! Redis Cluster slot and a Lua script may touch any of them.

/// Key names for one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(namespace: &str) -> Self {
        Self {
            prefix: format!("{{{namespace}}}:"),
        }
    }

    /// `{ns}:` — the first ARGV of every script.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Any key under the prefix.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// The declared key of every script call (routes the call to the queue's slot).
    pub fn ready(&self) -> String {
        self.key("ready")
    }

    pub fn job(&self, id: &str) -> String {
        self.key(&format!("job:{id}"))
    }
}
