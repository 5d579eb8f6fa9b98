//! The lock and bandwidth model: node-local VM config flocks (shared/exclusive, with
//! timeouts), per-storage allocation locks (no FIFO: racing flock waiters, polling pmxcfs
//! waiters; 10 s wait timeout), the cluster-wide `user.cfg` lock, and fair sharing of a
//! storage's bandwidth among concurrent full-clone copies (processor sharing, exact).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, oneshot, watch};

/// `/var/lock/qemu-server/lock-<vmid>.conf`, node-local: keyed by (node, vmid).
#[derive(Default)]
pub(crate) struct Flocks {
    map: Mutex<HashMap<FlockKey, Arc<RwLock<()>>>>,
}

/// (node, vmid).
type FlockKey = (String, u32);

pub(crate) enum FlockGuard {
    Shared(#[allow(dead_code)] OwnedRwLockReadGuard<()>), // held for its Drop only
    Exclusive(#[allow(dead_code)] OwnedRwLockWriteGuard<()>), // held for its Drop only
    None,
}

pub(crate) fn flock_timeout_msg(vmid: u32) -> String {
    format!("can't lock file '/var/lock/qemu-server/lock-{vmid}.conf' - got timeout")
}

impl Flocks {
    fn get(&self, node: &str, vmid: u32) -> Arc<RwLock<()>> {
        self.map
            .lock()
            .entry((node.to_string(), vmid))
            .or_default()
            .clone()
    }

    pub async fn lock(
        &self,
        node: &str,
        vmid: u32,
        exclusive: bool,
        timeout: Duration,
    ) -> Result<FlockGuard, String> {
        let l = self.get(node, vmid);
        let r = if exclusive {
            tokio::time::timeout(timeout, l.write_owned())
                .await
                .map(FlockGuard::Exclusive)
        } else {
            tokio::time::timeout(timeout, l.read_owned())
                .await
                .map(FlockGuard::Shared)
        };
        r.map_err(|_| flock_timeout_msg(vmid))
    }
}

/// Per-storage allocation locks. Keys: `node/storage` for local storage, `storage` for shared.
///
/// Neither kind hands the lock over first come, first served. A local storage lock is an
/// `flock` (pve-common `lock_file_full`): when it is released one of the blocked waiters wins,
/// which one is a race, drawn here from a seeded RNG. A shared storage lock is a pmxcfs lock
/// (pve-cluster `cfs_lock`): a waiter tries, sleeps 1 s down to 0.1 s and tries again until
/// its timeout, so the lock may sit free between a release and the next try, and whoever
/// tries first afterwards wins.
pub(crate) struct StorageLocks {
    map: Mutex<HashMap<String, Arc<StorageLock>>>,
    rng: Mutex<StdRng>,
}

#[derive(Default)]
struct LockInner {
    held: bool,
    next_waiter: u64,
    /// Blocked `flock` waiters; on release one of them, chosen at random, gets the lock.
    waiters: Vec<(u64, oneshot::Sender<()>)>,
    /// Polling (pmxcfs) waiters between their tries.
    pollers: u32,
    usage: LockUsage,
}

/// How one lock was used, for `/sim/stats` (wall seconds; the caller scales them): time held,
/// time free while someone waited for it (the handover's cost), takes and timeouts.
#[derive(Default, Clone)]
pub(crate) struct LockUsage {
    pub held_s: f64,
    pub free_while_waited_s: f64,
    pub takes: u64,
    pub timeouts: u64,
    pub first_take: Option<Instant>,
    pub last_release: Option<Instant>,
    last: Option<Instant>,
}

impl LockInner {
    /// Adds the time since the last change to the right total; called before every change.
    fn account(&mut self, now: Instant) {
        if let Some(last) = self.usage.last {
            let dt = now.duration_since(last).as_secs_f64();
            if self.held {
                self.usage.held_s += dt;
            } else if self.pollers > 0 || !self.waiters.is_empty() {
                self.usage.free_while_waited_s += dt;
            }
        }
        self.usage.last = Some(now);
    }

    fn took(&mut self, now: Instant) {
        self.account(now);
        self.held = true;
        self.usage.takes += 1;
        self.usage.first_take.get_or_insert(now);
    }
}

pub(crate) struct StorageLock {
    inner: Mutex<LockInner>,
    locks: std::sync::Weak<StorageLocks>,
}

/// Holding a storage lock; released on drop.
pub(crate) struct StorageLockGuard {
    lock: Arc<StorageLock>,
}

impl Drop for StorageLockGuard {
    fn drop(&mut self) {
        self.lock.release();
    }
}

impl StorageLock {
    fn release(&self) {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        inner.account(now);
        inner.usage.last_release = Some(now);
        while !inner.waiters.is_empty() {
            let i = match self.locks.upgrade() {
                Some(l) => l.rng.lock().random_range(0..inner.waiters.len()),
                None => 0,
            };
            let (_, tx) = inner.waiters.swap_remove(i);
            // A waiter that has just timed out dropped its receiver: try the next one.
            if tx.send(()).is_ok() {
                inner.usage.takes += 1;
                return;
            }
        }
        inner.held = false;
    }

    fn try_take(&self) -> bool {
        let mut inner = self.inner.lock();
        if inner.held {
            false
        } else {
            inner.took(Instant::now());
            true
        }
    }

    /// A polling waiter starts (`+1`) or ends (`-1`) its wait between tries.
    fn polling(&self, delta: i32) {
        let mut inner = self.inner.lock();
        inner.account(Instant::now());
        inner.pollers = inner.pollers.saturating_add_signed(delta);
    }

    fn timed_out(&self) {
        self.inner.lock().usage.timeouts += 1;
    }
}

impl StorageLocks {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(StorageLocks {
            map: Mutex::new(HashMap::new()),
            rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0x10c4_5eed)),
        })
    }

    /// Every lock's use so far, by key (`node/storage`, `storage`, `file-user_cfg`).
    pub fn usage(&self) -> Vec<(String, LockUsage)> {
        let now = Instant::now();
        let mut out: Vec<(String, LockUsage)> = self
            .map
            .lock()
            .iter()
            .map(|(k, l)| {
                let mut inner = l.inner.lock();
                inner.account(now);
                (k.clone(), inner.usage.clone())
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn get(self: &Arc<Self>, key: &str) -> Arc<StorageLock> {
        self.map
            .lock()
            .entry(key.to_string())
            .or_insert_with(|| {
                Arc::new(StorageLock {
                    inner: Mutex::new(LockInner::default()),
                    locks: Arc::downgrade(self),
                })
            })
            .clone()
    }

    /// Takes the lock of `key`, waiting at most `timeout` (wall time). `tenth` is the wall
    /// time of 0.1 simulated seconds. A local lock blocks and races; a `shared` (pmxcfs)
    /// one polls as pve-cluster's `cfs_lock` does: try, sleep `min(remaining s, 10)` tenths
    /// of a second (1 s at first, 0.1 s near the end), try again, give up once the sleeps
    /// reach the timeout.
    pub async fn lock(
        self: &Arc<Self>,
        key: &str,
        shared: bool,
        timeout: Duration,
        tenth: Duration,
    ) -> Option<StorageLockGuard> {
        let lock = self.get(key);
        if shared {
            let timeout_s = if tenth.is_zero() {
                0
            } else {
                (timeout.as_secs_f64() / (tenth.as_secs_f64() * 10.0)).round() as u64
            };
            let mut slept_tenths = 0u64;
            loop {
                if lock.try_take() {
                    return Some(StorageLockGuard { lock });
                }
                let slept_s = slept_tenths / 10;
                let remaining = timeout_s.saturating_sub(slept_s).max(1);
                let nap = remaining.min(10);
                if (slept_tenths + nap) / 10 >= timeout_s {
                    lock.timed_out();
                    return None;
                }
                lock.polling(1);
                tokio::time::sleep(tenth * nap as u32).await;
                lock.polling(-1);
                slept_tenths += nap;
            }
        }
        let (id, mut rx) = {
            let mut inner = lock.inner.lock();
            if !inner.held {
                inner.took(Instant::now());
                drop(inner);
                return Some(StorageLockGuard { lock });
            }
            inner.account(Instant::now());
            let (tx, rx) = oneshot::channel();
            let id = inner.next_waiter;
            inner.next_waiter += 1;
            inner.waiters.push((id, tx));
            (id, rx)
        };
        match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(())) => Some(StorageLockGuard { lock }),
            _ => {
                let mut inner = lock.inner.lock();
                if let Some(i) = inner.waiters.iter().position(|(w, _)| *w == id) {
                    inner.account(Instant::now());
                    inner.waiters.swap_remove(i);
                    inner.usage.timeouts += 1;
                    None
                } else {
                    // Handed over just as the wait ran out: the lock is ours.
                    drop(inner);
                    Some(StorageLockGuard { lock })
                }
            }
        }
    }
}

/// Error text of a storage-lock timeout, local vs shared, as PVE words it.
pub(crate) fn storage_timeout_msg(storage: &str, shared: bool) -> String {
    if shared {
        format!("cfs-lock 'storage-{storage}' error: got lock request timeout")
    } else {
        format!("can't lock file '/var/lock/pve-manager/pve-storage-{storage}' - got timeout")
    }
}

struct PoolInner {
    active: HashMap<u64, f64>,
    last: Instant,
    next_id: u64,
}

impl PoolInner {
    fn advance(&mut self, now: Instant, bw: f64) {
        let n = self.active.len();
        if n > 0 {
            let per = now.duration_since(self.last).as_secs_f64() * bw / n as f64;
            for v in self.active.values_mut() {
                *v -= per;
            }
        }
        self.last = now;
    }
}

/// One storage's copy bandwidth, shared equally among the copies running at each moment.
pub(crate) struct CopyPool {
    /// MB per wall-clock second (already divided by the time scale).
    bw: f64,
    inner: Mutex<PoolInner>,
    tx: watch::Sender<u64>,
}

impl CopyPool {
    pub fn new(bw_per_wall_second: f64) -> Self {
        CopyPool {
            bw: bw_per_wall_second,
            inner: Mutex::new(PoolInner {
                active: HashMap::new(),
                last: Instant::now(),
                next_id: 0,
            }),
            tx: watch::channel(0).0,
        }
    }

    fn bump(&self) {
        self.tx.send_modify(|g| *g += 1);
    }

    /// Copies `mb` megabytes; returns when done.
    pub async fn copy(&self, mb: f64) {
        let mut rx = self.tx.subscribe();
        let id = {
            let mut p = self.inner.lock();
            p.advance(Instant::now(), self.bw);
            let id = p.next_id;
            p.next_id += 1;
            p.active.insert(id, mb);
            id
        };
        self.bump();
        loop {
            let eta = {
                let mut p = self.inner.lock();
                p.advance(Instant::now(), self.bw);
                let rem = p.active.get(&id).copied().unwrap_or(0.0);
                rem * p.active.len() as f64 / self.bw
            };
            if eta <= 0.0005 {
                break;
            }
            rx.borrow_and_update();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs_f64(eta)) => {}
                _ = rx.changed() => {}
            }
        }
        {
            let mut p = self.inner.lock();
            p.advance(Instant::now(), self.bw);
            p.active.remove(&id);
        }
        self.bump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five waiters queue in order behind a holder; the order they get the lock in.
    async fn handover_order(seed: u64, shared: bool) -> Vec<u32> {
        let locks = StorageLocks::new(seed);
        let tenth = Duration::from_millis(1);
        let first = locks
            .lock("s", shared, Duration::from_secs(5), tenth)
            .await
            .unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut hs = Vec::new();
        for i in 0..5u32 {
            let (locks, order) = (locks.clone(), order.clone());
            hs.push(tokio::spawn(async move {
                let g = locks.lock("s", shared, Duration::from_secs(5), tenth).await;
                order.lock().push(i);
                tokio::time::sleep(Duration::from_millis(2)).await;
                drop(g);
            }));
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        drop(first);
        for h in hs {
            h.await.unwrap();
        }
        order.lock().clone()
    }

    #[tokio::test]
    async fn storage_lock_handover_is_not_first_come_first_served() {
        for shared in [false, true] {
            let mut orders = Vec::new();
            for seed in 0..4 {
                let o = handover_order(seed, shared).await;
                let mut sorted = o.clone();
                sorted.sort();
                assert_eq!(sorted, vec![0, 1, 2, 3, 4], "every waiter got it once");
                orders.push(o);
            }
            assert!(
                orders.iter().any(|o| *o != vec![0, 1, 2, 3, 4]),
                "shared={shared}: {orders:?}"
            );
        }
        // A waiter gives up after its timeout.
        let locks = StorageLocks::new(1);
        let tenth = Duration::from_millis(1);
        let _held = locks.lock("s", false, Duration::from_secs(1), tenth).await;
        let t = Instant::now();
        assert!(
            locks
                .lock("s", false, Duration::from_millis(30), tenth)
                .await
                .is_none()
        );
        // Shared: naps of 3 tenths (3 s remaining) until they would reach the 3 s timeout.
        assert!(
            locks
                .lock("s", true, Duration::from_millis(30), tenth)
                .await
                .is_none()
        );
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn bandwidth_is_shared_fairly() {
        // 100 MB/s; 4 copies of 10 MB at once take ~0.4 s, one takes ~0.1 s.
        let pool = Arc::new(CopyPool::new(100.0));
        let t = Instant::now();
        pool.copy(10.0).await;
        let one = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let p = pool.clone();
                tokio::spawn(async move { p.copy(10.0).await })
            })
            .collect();
        for h in hs {
            h.await.unwrap();
        }
        let four = t.elapsed().as_secs_f64();
        assert!((0.09..0.2).contains(&one), "{one}");
        assert!((0.38..0.6).contains(&four), "{four}");
    }
}
