//! `RedisConn`: the one connection a `Queue` and all its clones share, for a single server or
//! for a master followed through Redis Sentinel. It speaks `redis::aio::ConnectionLike`, so
//! commands, pipelines and `Script`s run on it as on any redis-crate connection.
//!
//! - One server (`redis://`, `rediss://`): a `ConnectionManager`, which reconnects to that
//!   address by itself.
//! - Sentinel (`redis+sentinel://`): a multiplexed connection to the current master. It is
//!   found by asking the sentinels (`SENTINEL get-master-addr-by-name`, every sentinel at once,
//!   the address most of them name first) and then asking the node itself: only a node whose
//!   `ROLE` says `master` is used, so a sentinel that has not seen a failover yet, or an old
//!   master that came back, is never written to. A connection error, a timeout, `READONLY` or
//!   `MASTERDOWN` drops the connection; the next command looks the master up again (at most
//!   one look-up at a time, at most every `RELOOK_EVERY`; callers waiting meanwhile share its
//!   result). A command that failed is not repeated here: every queue call may be retried by
//!   its caller, as after a restart of a single Redis.
//!
//! It does not subscribe to the sentinels' `+switch-master` events: a failover either breaks
//! the connection (the old master died or was partitioned: error or timeout) or is followed by
//! the sentinels' reconfiguring the old master as a replica, which closes its clients
//! (`CLIENT KILL TYPE normal`) and answers writes with `READONLY`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::join_all;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo,
    RedisConnectionInfo, RedisError, RedisFuture, RedisResult, ServerErrorKind, Value,
};
use tokio::time::Instant;

use super::target::{RedisTarget, SentinelTarget};

/// Least time between two master look-ups (a failover takes the sentinels' down-after time
/// plus an election; asking more often only loads them).
const RELOOK_EVERY: Duration = Duration::from_millis(100);

/// A shared, self-healing connection (see the module header). Cheap to clone.
#[derive(Clone)]
pub struct RedisConn(Inner);

#[derive(Clone)]
enum Inner {
    Direct(ConnectionManager),
    Sentinel(Arc<Follower>),
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Inner::Direct(_) => f.write_str("RedisConn(direct)"),
            Inner::Sentinel(s) => write!(f, "RedisConn({})", s.target.redacted()),
        }
    }
}

/// Where the connection points now, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterInfo {
    /// `ip:port` of the master in use.
    pub addr: String,
    /// How many times a master has been connected to (1 after the first connection).
    pub connects: u64,
}

impl RedisConn {
    /// Connects to what `url` names. `timeout` bounds connecting and every reply.
    pub async fn connect(url: &str, timeout: Duration) -> RedisResult<Self> {
        let target = RedisTarget::parse(url).map_err(|e| {
            RedisError::from((
                ErrorKind::InvalidClientConfig,
                "invalid Redis URL",
                e.to_string(),
            ))
        })?;
        match target {
            RedisTarget::Direct(url) => {
                let client = Client::open(url)?;
                let cm = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(timeout))
                    .set_connection_timeout(Some(timeout))
                    .set_max_delay(Duration::from_secs(2));
                let conn = ConnectionManager::new_with_config(client, cm).await?;
                Ok(RedisConn(Inner::Direct(conn)))
            }
            RedisTarget::Sentinel(target) => {
                let f = Arc::new(Follower::new(target, timeout));
                // Fail now, as a single server's connect does, if no master can be found.
                f.current().await?;
                Ok(RedisConn(Inner::Sentinel(f)))
            }
        }
    }

    /// The master in use (`None` for a single server, or while none is connected).
    pub fn master(&self) -> Option<MasterInfo> {
        match &self.0 {
            Inner::Direct(_) => None,
            Inner::Sentinel(f) => f.slot().as_ref().map(|c| MasterInfo {
                addr: c.addr.clone(),
                connects: f.connects.load(Ordering::Relaxed),
            }),
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Inner::Direct(c) => c.req_packed_command(cmd),
            Inner::Sentinel(f) => {
                let f = f.clone();
                async move {
                    let (generation, mut c) = f.current().await?;
                    let r = c.send_packed_command(cmd).await;
                    f.after(generation, r.as_ref().err());
                    r
                }
                .boxed()
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Inner::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Sentinel(f) => {
                let f = f.clone();
                async move {
                    let (generation, mut c) = f.current().await?;
                    let r = c.send_packed_commands(pipeline, offset, count).await;
                    f.after(generation, r.as_ref().err());
                    r
                }
                .boxed()
            }
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Inner::Direct(c) => c.get_db(),
            Inner::Sentinel(f) => f.target.db,
        }
    }
}

struct Current {
    generation: u64,
    addr: String,
    conn: MultiplexedConnection,
}

#[derive(Default)]
struct Lookup {
    /// Look-ups done so far (a waiter that sees this change shares the result).
    done: u64,
    last_at: Option<Instant>,
    last_error: Option<RedisError>,
}

/// The Sentinel side: the master connection in use, and the look-up that replaces it.
struct Follower {
    target: SentinelTarget,
    timeout: Duration,
    slot: std::sync::Mutex<Option<Current>>,
    lookup: tokio::sync::Mutex<Lookup>,
    lookups_done: AtomicU64,
    connects: AtomicU64,
}

/// Whether an error means the connection can no longer be trusted to reach the master.
fn must_relook(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

impl Follower {
    fn new(target: SentinelTarget, timeout: Duration) -> Self {
        Follower {
            target,
            timeout,
            slot: std::sync::Mutex::new(None),
            lookup: tokio::sync::Mutex::new(Lookup::default()),
            lookups_done: AtomicU64::new(0),
            connects: AtomicU64::new(0),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        // Nothing panics while holding it; a poisoned lock still holds a valid slot.
        self.slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
    }

    fn redis_info(&self, db: i64) -> RedisConnectionInfo {
        let mut info = RedisConnectionInfo::default().set_db(db);
        if let Some(u) = &self.target.username {
            info = info.set_username(u);
        }
        if let Some(p) = &self.target.password {
            info = info.set_password(p);
        }
        info
    }

    fn addr(&self, host: &str, port: u16) -> ConnectionAddr {
        if self.target.tls {
            ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.to_owned(), port)
        }
    }

    async fn open(&self, host: &str, port: u16, db: i64) -> RedisResult<MultiplexedConnection> {
        let info = self
            .addr(host, port)
            .into_connection_info()?
            .set_redis_settings(self.redis_info(db));
        let client = Client::open(info)?;
        // The connection timeout covers TCP (and TLS) only; the handshake (AUTH, SELECT)
        // is bounded here too.
        tokio::time::timeout(
            self.timeout * 2,
            client.get_multiplexed_async_connection_with_config(&self.config()),
        )
        .await
        .map_err(|_| timed_out(host, port))?
    }

    /// After a command on connection `generation`: forget that connection if the error says
    /// it no longer reaches the master.
    fn after(&self, generation: u64, err: Option<&RedisError>) {
        if err.is_some_and(must_relook) {
            let mut slot = self.slot();
            if slot.as_ref().is_some_and(|c| c.generation == generation) {
                tracing::warn!(
                    master = %slot.as_ref().map(|c| c.addr.as_str()).unwrap_or_default(),
                    error = %err.map(ToString::to_string).unwrap_or_default(),
                    "Redis master connection lost; asking the sentinels again"
                );
                *slot = None;
            }
        }
    }

    /// The master connection, looked up if there is none.
    async fn current(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(c) = self.slot().as_ref() {
            return Ok((c.generation, c.conn.clone()));
        }
        let seen = self.lookups_done.load(Ordering::Acquire);
        let mut lookup = self.lookup.lock().await;
        if let Some(c) = self.slot().as_ref() {
            return Ok((c.generation, c.conn.clone()));
        }
        if lookup.done != seen
            && let Some(e) = &lookup.last_error
        {
            // A look-up failed while this caller waited for it: share its answer.
            return Err(e.clone());
        }
        if let Some(at) = lookup.last_at {
            tokio::time::sleep_until(at + RELOOK_EVERY).await;
        }
        lookup.last_at = Some(Instant::now());
        let found = self.find_master().await;
        lookup.done += 1;
        self.lookups_done.store(lookup.done, Ordering::Release);
        match found {
            Ok((addr, conn)) => {
                lookup.last_error = None;
                let generation = self.connects.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(master = %addr, connects = generation, "connected to the Redis master named by the sentinels");
                *self.slot() = Some(Current {
                    generation,
                    addr,
                    conn: conn.clone(),
                });
                Ok((generation, conn))
            }
            Err(e) => {
                lookup.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Asks every sentinel for the master's address; tries the addresses most sentinels name
    /// first; returns a connection to the first one whose `ROLE` is `master`.
    async fn find_master(&self) -> RedisResult<(String, MultiplexedConnection)> {
        let answers = join_all(
            self.target
                .sentinels
                .iter()
                .map(|(h, p)| self.ask_sentinel(h, *p)),
        )
        .await;
        let mut votes: BTreeMap<(String, u16), usize> = BTreeMap::new();
        let mut last_err = None;
        for a in answers {
            match a {
                Ok(Some(addr)) => *votes.entry(addr).or_default() += 1,
                Ok(None) => {
                    last_err = Some(RedisError::from((
                        ErrorKind::InvalidClientConfig,
                        "the sentinels know no master of that name",
                        self.target.master.clone(),
                    )));
                }
                Err(e) => last_err = Some(e),
            }
        }
        let mut candidates: Vec<_> = votes.into_iter().collect();
        candidates.sort_by_key(|c| std::cmp::Reverse(c.1));
        for ((host, port), _) in candidates {
            match self.open_master(&host, port).await {
                Ok(conn) => return Ok((format!("{host}:{port}"), conn)),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| RedisError::from((ErrorKind::Io, "no sentinel answered"))))
    }

    /// One sentinel's view: `Some((ip, port))`, or `None` if it knows no such master.
    async fn ask_sentinel(&self, host: &str, port: u16) -> RedisResult<Option<(String, u16)>> {
        let mut c = self.open(host, port, 0).await?;
        let addr: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.target.master)
            .query_async(&mut c)
            .await?;
        Ok(addr.and_then(|(h, p)| p.parse().ok().map(|p| (h, p))))
    }

    /// A connection to `host:port` if that node says it is a master.
    async fn open_master(&self, host: &str, port: u16) -> RedisResult<MultiplexedConnection> {
        let mut c = self.open(host, port, self.target.db).await?;
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut c).await?;
        match role.first() {
            Some(Value::BulkString(r)) if r == b"master" => Ok(c),
            Some(Value::SimpleString(r)) if r == "master" => Ok(c),
            _ => Err(RedisError::from((
                ErrorKind::Server(ServerErrorKind::ReadOnly),
                "the node the sentinels name is not a master (yet)",
                format!("{host}:{port}"),
            ))),
        }
    }
}

fn timed_out(host: &str, port: u16) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("connecting to {host}:{port} timed out"),
    ))
}
