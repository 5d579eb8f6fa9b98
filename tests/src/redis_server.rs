//! A real `redis-server` for tests: free port, temp dir, AOF on by default, killed on drop.
//! Restartable on the same port and directory so the AOF is reloaded.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a test server persists.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `appendonly yes|no`.
    pub appendonly: bool,
    /// `appendfsync always|everysec|no`.
    pub appendfsync: &'static str,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            appendonly: true,
            appendfsync: "everysec",
        }
    }
}

/// A running `redis-server` child process.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    opts: RedisOptions,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free local port")
}

fn spawn(port: u16, dir: &Path, opts: &RedisOptions) -> Child {
    let res = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
        .arg(dir)
        .args([
            "--appendonly",
            if opts.appendonly { "yes" } else { "no" },
            "--appendfsync",
            opts.appendfsync,
            "--save",
            "",
            "--protected-mode",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match res {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("redis-server not found: install it with `apt-get install redis-server`")
        }
        Err(e) => panic!("cannot start redis-server: {e}"),
    }
}

fn wait_ping(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let url = format!("redis://127.0.0.1:{port}/");
    loop {
        let ok = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
        if ok.is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not answer PING within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl RedisServer {
    /// Starts a server with AOF on (`appendfsync everysec`).
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a server with the given persistence.
    pub fn start_with(opts: RedisOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // The port may be taken between probe and bind; try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut child = spawn(port, dir.path(), &opts);
            std::thread::sleep(Duration::from_millis(30));
            if let Ok(Some(_)) = child.try_wait() {
                continue;
            }
            wait_ping(port);
            return Self {
                child: Some(child),
                port,
                dir,
                opts,
            };
        }
        panic!("could not start redis-server on a free port");
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server with SIGKILL (no shutdown save) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and directory (the AOF is reloaded).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = spawn(self.port, self.dir.path(), &self.opts);
            std::thread::sleep(Duration::from_millis(50));
            if let Ok(Some(_)) = child.try_wait() {
                assert!(Instant::now() < deadline, "redis-server did not restart");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            self.child = Some(child);
            break;
        }
        wait_ping(self.port);
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// Freezes the server (SIGSTOP).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws the server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}
