//! Short-lived cluster facts shared by all jobs of a worker process (API economy): users,
//! pools and the interfaces of each node, fetched at most once per TTL and invalidated by
//! our own writes. Nothing here decides; handlers still treat "already exists" as success.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::pve::{PveClient, PveError};

pub struct Cache {
    ttl: Duration,
    sets: Mutex<HashMap<String, (Instant, BTreeSet<String>)>>,
    fetch: tokio::sync::Mutex<()>,
}

impl Cache {
    pub fn new(ttl: Duration) -> Cache {
        Cache {
            ttl,
            sets: Mutex::default(),
            fetch: tokio::sync::Mutex::new(()),
        }
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
