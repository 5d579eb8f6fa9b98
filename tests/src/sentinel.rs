//! A Redis Sentinel set for failover tests, from real processes: a master and a replica
//! (`redis-server`, AOF on) and three `redis-sentinel`s, all on free loopback ports in one temp
//! dir, optionally with `requirepass` on every one of them. Short sentinel timeouts
//! (`down-after-milliseconds` 1000) keep a failover to a few seconds. Everything is killed on
//! drop.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The name the sentinels monitor the master under.
pub const MASTER_NAME: &str = "labfleet";

/// `down-after-milliseconds` of the test sentinels.
pub const DOWN_AFTER_MS: u64 = 1000;

/// One process of the set.
#[derive(Debug)]
struct Proc {
    child: Option<Child>,
    port: u16,
}

impl Proc {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A master, a replica and three sentinels.
#[derive(Debug)]
pub struct SentinelSet {
    /// `[0]` the first master, `[1]` the first replica.
    data: Vec<Proc>,
    sentinels: Vec<Proc>,
    password: Option<String>,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free local port")
}

fn spawn(program: &str, args: &[String], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{program} not found: install it with `apt-get install redis-server redis-sentinel`"
        ),
        Err(e) => panic!("cannot start {program}: {e}"),
    }
}

impl SentinelSet {
    /// Starts the set and waits until every sentinel sees the replica and the other two.
    pub fn start(password: Option<&str>) -> SentinelSet {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut set = SentinelSet {
            data: Vec::new(),
            sentinels: Vec::new(),
            password: password.map(str::to_owned),
            dir,
        };
        let master = set.start_data_on_a_free_port(None);
        let replica = set.start_data_on_a_free_port(Some(master));
        set.wait_ping(master, Duration::from_secs(10));
        set.wait_ping(replica, Duration::from_secs(10));
        set.wait_in_sync(replica, Duration::from_secs(20));
        for i in 0..3 {
            set.start_sentinel(i, master, password);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for s in 0..3 {
            loop {
                let info = set.sentinel_master_info(s);
                let ok = info.as_ref().is_some_and(|m| {
                    m.get("num-slaves").map(String::as_str) == Some("1")
                        && m.get("num-other-sentinels").map(String::as_str) == Some("2")
                });
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "sentinel {s} did not see the replica and the other sentinels within 30 s: {info:?}\n{}",
                    set.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        set
    }

    /// Starts sentinel `i` on a free port, again on another one when the port turns out to be
    /// taken (`free_port` hands out a port that another test's server may bind first).
    fn start_sentinel(&mut self, i: usize, master: u16, password: Option<&str>) {
        for _ in 0..5 {
            let port = free_port();
            let conf = self.dir.path().join(format!("sentinel-{i}.conf"));
            let mut text = format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n\
                 sentinel failover-timeout {MASTER_NAME} 4000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir = self.dir.path().display()
            );
            if let Some(pw) = password {
                text += &format!(
                    "sentinel auth-pass {MASTER_NAME} {pw}\nrequirepass {pw}\nsentinel sentinel-pass {pw}\n"
                );
            }
            std::fs::write(&conf, text).expect("sentinel config");
            let child = spawn(
                "redis-sentinel",
                &[conf.display().to_string()],
                &self.dir.path().join(format!("sentinel-{i}.log")),
            );
            self.sentinels.push(Proc {
                child: Some(child),
                port,
            });
            if self.answers_as_last(&self.sentinels, port) {
                return;
            }
            self.drop_last_sentinel();
        }
        panic!(
            "no sentinel could be started on a free port\n{}",
            self.logs()
        );
    }

    /// Starts a data node on a free port (retried like [`Self::start_sentinel`]).
    fn start_data_on_a_free_port(&mut self, replica_of: Option<u16>) -> u16 {
        for _ in 0..5 {
            let port = free_port();
            self.start_data(port, replica_of);
            if self.answers_as_last(&self.data, port) {
                return port;
            }
            if let Some(mut p) = self.data.pop()
                && let Some(mut c) = p.child.take()
            {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        panic!(
            "no redis-server could be started on a free port\n{}",
            self.logs()
        );
    }

    fn drop_last_sentinel(&mut self) {
        if let Some(mut p) = self.sentinels.pop()
            && let Some(mut c) = p.child.take()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the server answering on `port` is the last process of `procs` (and not one
    /// of another test that bound the port first), asked for up to 10 s.
    fn answers_as_last(&self, procs: &[Proc], port: u16) -> bool {
        let Some(pid) = procs.last().and_then(|p| p.child.as_ref()).map(Child::id) else {
            return false;
        };
        let want = format!("process_id:{pid}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(info) = self
                .sync_conn(port)
                .and_then(|mut c| redis::cmd("INFO").arg("server").query::<String>(&mut c))
            {
                return info.lines().any(|l| l.trim() == want);
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_data(&mut self, port: u16, replica_of: Option<u16>) {
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--dir",
            &self.dir.path().display().to_string(),
            "--dbfilename",
            &format!("dump-{port}.rdb"),
            "--appendonly",
            "yes",
            "--appendfilename",
            &format!("aof-{port}.aof"),
            "--appenddirname",
            &format!("aof-{port}"),
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--protected-mode",
            "no",
            // The first full sync starts at once instead of after 5 s.
            "--repl-diskless-sync-delay",
            "0",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(pw) = &self.password {
            args.extend(["--requirepass".into(), pw.clone()]);
            args.extend(["--masterauth".into(), pw.clone()]);
        }
        if let Some(m) = replica_of {
            args.extend(["--replicaof".into(), "127.0.0.1".into(), m.to_string()]);
        }
        let child = spawn(
            "redis-server",
            &args,
            &self.dir.path().join(format!("redis-{port}.log")),
        );
        self.data.push(Proc {
            child: Some(child),
            port,
        });
    }

    fn auth(&self) -> String {
        match &self.password {
            Some(pw) => format!(":{pw}@"),
            None => String::new(),
        }
    }

    /// `redis+sentinel://[:PASSWORD@]127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/labfleet`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!(
            "redis+sentinel://{}{}/{MASTER_NAME}",
            self.auth(),
            hosts.join(",")
        )
    }

    /// A plain URL for one data node (for the test's own reads of a given node).
    pub fn node_url(&self, port: u16) -> String {
        format!("redis://{}127.0.0.1:{port}/", self.auth())
    }

    /// The password, if the set has one.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    fn sync_conn(&self, port: u16) -> redis::RedisResult<redis::Connection> {
        let c = redis::Client::open(self.node_url(port))?;
        let c = c.get_connection_with_timeout(Duration::from_millis(500))?;
        c.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(c)
    }

    fn wait_ping(&self, port: u16, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self
                .sync_conn(port)
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ok.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis on port {port} did not answer PING: {ok:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the replica on `port` has finished its sync with its master
    /// (`master_link_status:up`).
    pub fn wait_in_sync(&self, port: u16, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let info: String = self
                .query(port, redis::cmd("INFO").arg("replication"))
                .unwrap_or_default();
            if info.contains("master_link_status:up") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica on port {port} did not sync within {within:?}: {info}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sentinel_master_info(&self, s: usize) -> Option<std::collections::HashMap<String, String>> {
        let mut c = self.sync_conn(self.sentinels[s].port).ok()?;
        redis::cmd("SENTINEL")
            .arg("master")
            .arg(MASTER_NAME)
            .query(&mut c)
            .ok()
    }

    /// The master's port as sentinel `s` names it.
    pub fn master_port_seen_by(&self, s: usize) -> Option<u16> {
        let mut c = self.sync_conn(self.sentinels[s].port).ok()?;
        let a: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(MASTER_NAME)
            .query(&mut c)
            .ok()?;
        a.and_then(|(_, p)| p.parse().ok())
    }

    /// The port of the first master.
    pub fn first_master(&self) -> u16 {
        self.data[0].port
    }

    /// The port of the first replica.
    pub fn first_replica(&self) -> u16 {
        self.data[1].port
    }

    /// `ROLE` of the node on `port`: `master`, `slave`, or `None` if it does not answer.
    pub fn role(&self, port: u16) -> Option<String> {
        let mut c = self.sync_conn(port).ok()?;
        let v: Vec<redis::Value> = redis::cmd("ROLE").query(&mut c).ok()?;
        match v.first() {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }

    /// Runs a command on the node on `port`.
    pub fn query<T: redis::FromRedisValue>(
        &self,
        port: u16,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        cmd.query(&mut self.sync_conn(port)?)
    }

    /// SIGKILLs the data node on `port`.
    pub fn kill_node(&mut self, port: u16) {
        if let Some(p) = self.data.iter_mut().find(|p| p.port == port) {
            p.kill();
        }
    }

    /// Starts the data node on `port` again, as it was configured (a former master comes
    /// back as a master until the sentinels turn it into a replica).
    pub fn restart_node(&mut self, port: u16) {
        let replica_of = (port != self.first_master()).then(|| self.first_master());
        self.data.retain(|p| p.port != port);
        self.start_data(port, replica_of);
        self.wait_ping(port, Duration::from_secs(10));
    }

    /// Waits until every sentinel names `port` as the master.
    pub fn wait_master(&self, port: u16, within: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if (0..self.sentinels.len()).all(|s| self.master_port_seen_by(s) == Some(port)) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < within,
                "the sentinels did not all name port {port} as master within {within:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The tail of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut entries: Vec<_> = std::fs::read_dir(self.dir.path())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        entries.sort();
        for p in entries {
            if p.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                out += &format!("--- {}\n{tail}\n", p.display());
            }
        }
        out
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for p in self.data.iter_mut().chain(self.sentinels.iter_mut()) {
            p.kill();
        }
    }
}
