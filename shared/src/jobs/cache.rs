//! Short-lived cluster facts shared by all jobs of a worker process (API economy): users,
//! pools and the interfaces of each node, fetched at most once per TTL and invalidated by
//! our own writes. Nothing here decides; handlers still treat "already exists" as success.
//!
//! A fact that something exists goes stale when another process removes it (a teardown on
//! another worker deletes a pool, and a reset's student job here must make it again), so
//! removals are counted per cluster in Redis (`Store::removals`) and a reader first
//! [`Cache::sync`]s: a count that moved drops the cluster's cached sets.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::pve::{PveClient, PveError};

pub struct Cache {
    ttl: Duration,
    sets: Mutex<HashMap<String, (Instant, BTreeSet<String>)>>,
    fetch: tokio::sync::Mutex<()>,
    /// Per cluster, the removal count the cached sets were read under.
    removals: Mutex<HashMap<String, u64>>,
}

impl Cache {
    pub fn new(ttl: Duration) -> Cache {
        Cache {
            ttl,
            sets: Mutex::default(),
            fetch: tokio::sync::Mutex::new(()),
            removals: Mutex::default(),
        }
    }

    /// Drops what is cached of `cluster` when its removal count is not the one the cache
    /// was filled under (another process removed users, pools or bridges since).
    pub fn sync(&self, cluster: &str, removals: u64) {
        let mut seen = self.removals.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get(cluster) == Some(&removals) {
            return;
        }
        seen.insert(cluster.to_owned(), removals);
        let mut m = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        let users = Cache::users_key(cluster);
        let pools = Cache::pools_key(cluster);
        let ifaces = format!("ifaces:{cluster}:");
        m.retain(|k, _| *k != users && *k != pools && !k.starts_with(&ifaces));
    }

    fn get(&self, key: &str) -> Option<BTreeSet<String>> {
        let m = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        m.get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, s)| s.clone())
    }

    fn put(&self, key: String, set: BTreeSet<String>) {
        let mut m = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(key, (Instant::now(), set));
    }

    /// Records our own write, so the next reader sees it without a request.
    pub fn note(&self, key: &str, item: &str) {
        let mut m = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = m.get_mut(key) {
            s.insert(item.to_owned());
        }
    }

    pub fn forget(&self, key: &str, item: &str) {
        let mut m = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, s)) = m.get_mut(key) {
            s.remove(item);
        }
    }

    pub fn invalidate(&self, key: &str) {
        self.sets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    async fn get_or_fetch<F, Fut>(
        &self,
        key: String,
        fetch: F,
    ) -> Result<BTreeSet<String>, PveError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<BTreeSet<String>, PveError>>,
    {
        if let Some(s) = self.get(&key) {
            return Ok(s);
        }
        // One fetch at a time, so 50 jobs starting together make one request, not 50.
        let _g = self.fetch.lock().await;
        if let Some(s) = self.get(&key) {
            return Ok(s);
        }
        let s = fetch().await?;
        self.put(key, s.clone());
        Ok(s)
    }

    #[cfg(test)]
    fn cached(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn users_key(cluster: &str) -> String {
        format!("users:{cluster}")
    }
    pub fn pools_key(cluster: &str) -> String {
        format!("pools:{cluster}")
    }
    pub fn ifaces_key(cluster: &str, node: &str) -> String {
        format!("ifaces:{cluster}:{node}")
    }

    pub async fn users(
        &self,
        cluster: &str,
        pve: &PveClient,
    ) -> Result<BTreeSet<String>, PveError> {
        self.get_or_fetch(Cache::users_key(cluster), || async {
            Ok(pve.users().await?.into_iter().map(|u| u.userid).collect())
        })
        .await
    }

    pub async fn pools(
        &self,
        cluster: &str,
        pve: &PveClient,
    ) -> Result<BTreeSet<String>, PveError> {
        self.get_or_fetch(Cache::pools_key(cluster), || async {
            Ok(pve.pools().await?.into_iter().map(|p| p.poolid).collect())
        })
        .await
    }

    pub async fn ifaces(
        &self,
        cluster: &str,
        node: &str,
        pve: &PveClient,
    ) -> Result<BTreeSet<String>, PveError> {
        self.get_or_fetch(Cache::ifaces_key(cluster, node), || async {
            Ok(pve
                .network_list(node, None)
                .await?
                .ifaces
                .into_iter()
                .map(|i| i.iface)
                .collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_moved_removal_count_drops_only_that_cluster() {
        let c = Cache::new(Duration::from_secs(60));
        c.sync("a", 0);
        c.put(Cache::pools_key("a"), BTreeSet::from(["p".to_owned()]));
        c.put(Cache::users_key("a"), BTreeSet::new());
        c.put(Cache::ifaces_key("a", "n1"), BTreeSet::new());
        c.put(Cache::pools_key("b"), BTreeSet::new());
        c.sync("a", 0);
        assert!(c.cached(&Cache::pools_key("a")), "same count: kept");
        c.sync("a", 1);
        assert!(!c.cached(&Cache::pools_key("a")));
        assert!(!c.cached(&Cache::users_key("a")));
        assert!(!c.cached(&Cache::ifaces_key("a", "n1")));
        assert!(
            c.cached(&Cache::pools_key("b")),
            "another cluster's facts stay"
        );
    }
}
