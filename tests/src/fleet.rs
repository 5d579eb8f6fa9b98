//! A fleet of real `worker` processes for crash tests: spawned against a Redis URL and a data
//! folder, each with its own name and log file, and stopped, resumed, terminated or killed by
//! signal. Every process still running is killed when the fleet is dropped.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::bins::bin;

/// How the fleet's workers run (the `worker` flags; short leases in tests).
#[derive(Debug, Clone)]
pub struct WorkerOpts {
    pub concurrency: usize,
    /// `--lease` in seconds.
    pub lease: f64,
    /// `--sweep` in seconds.
    pub sweep: f64,
    /// `--grace` in seconds.
    pub grace: f64,
    /// `--backoff-cap` in seconds.
    pub backoff_cap: f64,
    /// `--log-format`: `text` or `json`.
    pub log_format: &'static str,
    /// `-v` (debug) when true.
    pub verbose: bool,
    /// `LABFLEET_TEST_CLOCK=1`: the worker's schedule clock adds the test-only offset
    /// (`shared::scheduler`).
    pub test_clock: bool,
    /// `--time-scale`: labfleet's timers at the simulator's time scale (`None`: real time).
    pub time_scale: Option<f64>,
}

impl Default for WorkerOpts {
    fn default() -> Self {
        WorkerOpts {
            concurrency: 4,
            lease: 3.0,
            sweep: 0.5,
            grace: 5.0,
            backoff_cap: 1.0,
            log_format: "text",
            verbose: false,
            test_clock: false,
            time_scale: None,
        }
    }
}

/// Worker processes sharing one Redis, one data folder and one secret key.
#[derive(Debug)]
pub struct Fleet {
    redis_url: String,
    data_dir: PathBuf,
    key_b64: String,
    logs: tempfile::TempDir,
    procs: BTreeMap<String, Child>,
    spawned: Vec<String>,
    pub opts: WorkerOpts,
}

impl Fleet {
    /// A fleet with no process yet. `key_b64` becomes each worker's `LABFLEET_SECRET_KEY`.
    pub fn new(redis_url: &str, data_dir: &Path, key_b64: &str, opts: WorkerOpts) -> Fleet {
        Fleet {
            redis_url: redis_url.to_owned(),
            data_dir: data_dir.to_owned(),
            key_b64: key_b64.to_owned(),
            logs: tempfile::tempdir().expect("temp dir for worker logs"),
            procs: BTreeMap::new(),
            spawned: Vec::new(),
            opts,
        }
    }

    /// Starts a worker with the fleet's options; returns its name (`w0`, `w1`, ...).
    pub fn spawn(&mut self) -> String {
        let opts = self.opts.clone();
        self.spawn_with(&opts)
    }

    /// Starts a worker with the given options; returns its name.
    pub fn spawn_with(&mut self, o: &WorkerOpts) -> String {
        let name = format!("w{}", self.spawned.len());
        let log = File::create(self.log_path(&name)).expect("worker log file");
        let mut cmd = Command::new(bin("worker"));
        cmd.arg("--redis")
            .arg(&self.redis_url)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--concurrency", &o.concurrency.to_string()])
            .args(["--name", &name])
            .args(["--lease", &o.lease.to_string()])
            .args(["--sweep", &o.sweep.to_string()])
            .args(["--grace", &o.grace.to_string()])
            .args(["--backoff-cap", &o.backoff_cap.to_string()])
            .args(["--log-format", o.log_format]);
        if o.verbose {
            cmd.arg("-v");
        }
        if let Some(f) = o.time_scale {
            cmd.args(["--time-scale", &f.to_string()]);
        }
        if o.test_clock {
            cmd.env("LABFLEET_TEST_CLOCK", "1");
        } else {
            cmd.env_remove("LABFLEET_TEST_CLOCK");
        }
        let child = cmd
            .env("LABFLEET_SECRET_KEY", &self.key_b64)
            .env_remove("RUST_LOG")
            .env_remove("REDIS_URL")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawning the worker binary");
        self.procs.insert(name.clone(), child);
        self.spawned.push(name.clone());
        name
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.logs.path().join(format!("{name}.log"))
    }

    fn signal(&self, name: &str, sig: &str) {
        let pid = self.pid(name);
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("running kill");
        assert!(ok.success(), "kill {sig} {name} (pid {pid}) failed");
    }

    /// The process id of a running worker.
    pub fn pid(&self, name: &str) -> u32 {
        self.procs
            .get(name)
            .unwrap_or_else(|| panic!("no running worker {name}"))
            .id()
    }

    /// SIGKILL, then reaps the process.
    pub fn kill(&mut self, name: &str) {
        self.signal(name, "-KILL");
        let mut c = self.procs.remove(name).expect("worker");
        let _ = c.wait();
    }

    /// Freezes the worker (SIGSTOP).
    pub fn stop(&self, name: &str) {
        self.signal(name, "-STOP");
    }

    /// Thaws the worker (SIGCONT).
    pub fn cont(&self, name: &str) {
        self.signal(name, "-CONT");
    }

    /// Asks for a graceful shutdown (SIGTERM).
    pub fn term(&self, name: &str) {
        self.signal(name, "-TERM");
    }

    /// Waits up to `deadline` for the worker to exit; returns its status and forgets it.
    pub async fn wait_exit(&mut self, name: &str, deadline: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + deadline;
        loop {
            let c = self.procs.get_mut(name).expect("worker");
            if let Ok(Some(st)) = c.try_wait() {
                self.procs.remove(name);
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Names of the workers still running (reaps those that exited).
    pub fn alive(&mut self) -> Vec<String> {
        let exited: Vec<String> = self
            .procs
            .iter_mut()
            .filter_map(|(n, c)| matches!(c.try_wait(), Ok(Some(_))).then(|| n.clone()))
            .collect();
        for n in exited {
            self.procs.remove(&n);
        }
        self.procs.keys().cloned().collect()
    }

    /// Whether the worker is still running.
    pub fn is_alive(&mut self, name: &str) -> bool {
        self.alive().iter().any(|n| n == name)
    }

    /// Everything a worker wrote to stdout and stderr so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Every worker ever spawned, with its log.
    pub fn logs(&self) -> Vec<(String, String)> {
        self.spawned
            .iter()
            .map(|n| (n.clone(), self.log(n)))
            .collect()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in self.procs.values_mut() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
